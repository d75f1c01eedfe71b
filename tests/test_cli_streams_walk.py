"""Streams, exit codes and messages walk over the ``cyclereg`` command line (audited 2026-12-07).

What was audited: for every command of ``cyclereg --help`` (keypoints, pretrain-random, cycle, status,
register, evaluate, compare, ensemble, demo) which stream each kind of output goes to, the exit codes, and
the wording of errors. Inputs: a missing file, a folder where a file goes, a dangling symlink, a FIFO (an
unreadable file as root: opening it would block), an empty file and a file of the wrong kind (a JSON where
a CSV goes, a CSV where a dataset JSON or a checkpoint goes); usage errors (unknown option, option typo,
missing argument, missing option value, ``--stages two``, unknown command); ``--help`` of every command at
``COLUMNS`` 1, 20, 40, 60, 80 and 200; the successful runs of demo, register, evaluate, pretrain-random,
cycle and status (``--json``, ``--history``) as real processes with pipes (no terminal), ``COLUMNS``
unset, and output paths of ~150 characters; ``--help``, evaluate and a bad-input register in a pseudo-terminal
with ``NO_COLOR`` (colours dropped, bold kept, as no-color.org allows) and ``TERM=dumb`` (no escape codes at
all), by hand; output paths that are a FIFO, a device node (a copy of /dev/null) or a symlink. There is no
``--quiet`` option.

The project's rule (``cyclereg_cli/main.py``, ``cyclereg/errors.py``): bad input is one line on stderr
naming the file, exit 2, nothing on stdout; a dead worker or a non-finite result exits 1; an interrupt 130,
a kill 143; usage errors are one line naming the option, exit 2, and where the options are listed
(``see 'cyclereg COMMAND --help'``). ``cyclereg`` alone prints the help on stdout and exits 2 (click's
``NoArgsIsHelpError``). Handled cases no other test covers are pinned first; mishandled ones follow (each
a strict xfail naming the bug until it was mended).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from conftest import write_pair_files, write_two_pair_dataset
from cyclereg_cli import entry
from cyclereg_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
CHEAP_RUN = ["--stages", "1", "--epochs", "1", "--train-points", "64,64", "--tta-passes", "0",
             "--recentre-passes", "0", "--candidates", "8", "--device", "cpu"]
LONG = "/".join(["a_rather_long_folder_name_for_wrapping_checks"] * 3)
"""A folder path of 140 characters: longer than the 80 columns a pipe is assumed to have."""


def _cli(monkeypatch, capsys, *args):
    """Run the console script in this process: ``(exit code, stdout, stderr)``."""
    monkeypatch.setattr(sys, "argv", ["cyclereg", *map(str, args)])
    code = 0
    try:
        entry.main()
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def _bad_files(folder: Path) -> dict[str, Path]:
    """Each kind of unusable input file, by name (the FIFO would block whoever opens it to read)."""
    folder.mkdir(exist_ok=True)
    (folder / "folder.csv").mkdir()
    os.symlink(folder / "gone.csv", folder / "dangling.csv")
    os.mkfifo(folder / "fifo.csv")
    (folder / "empty.csv").write_text("")
    (folder / "empty.json").write_text("")
    return {"missing": folder / "missing.csv", "folder": folder / "folder.csv", "dangling": folder / "dangling.csv",
            "fifo": folder / "fifo.csv", "empty": folder / "empty.csv", "empty json": folder / "empty.json"}


# command line with BAD in the place of the file under test; the fragment every message must hold besides the path
BAD_FILE_COMMANDS = {
    "register fixed": (["register", "BAD", "m.csv", "-o", "out"], None),
    "register --query": (["register", "f.csv", "m.csv", "-o", "out", "--query", "BAD"], None),
    "pretrain-random": (["pretrain-random", "BAD", "-o", "run"], None),
    "evaluate": (["evaluate", "BAD", "--json", "r.json", "--identity"], None),
    "evaluate --model": (["evaluate", "dataset.json", "--json", "r.json", "--model", "BAD"], None),
    "compare": (["compare", "BAD", "dataset.json"], None),
    "ensemble": (["ensemble", "BAD", "f.csv", "-o", "e.pt"], None),
    "keypoints": (["keypoints", "BAD", "-o", "k.csv"], None),
    "keypoints --pairs": (["keypoints", "--pairs", "BAD", "-o", "kp"], None),
}
EXPECTED = {"missing": "does not exist", "dangling": "does not exist", "folder": "not a regular file",
            "fifo": "not a regular file"}


@pytest.mark.parametrize("kind", ["missing", "folder", "dangling", "fifo", "empty", "empty json"])
def test_an_unusable_input_file_is_one_line_on_stderr_naming_it_and_exit_2(tmp_path, monkeypatch, capsys, kind):
    """Every command, every kind of unusable file: exit 2, nothing on stdout, one stderr line that starts
    with ``cyclereg: error:`` and names the file (and, where it can tell, why), no traceback, and no
    output written. A FIFO is refused before it is opened (opening it to read would block for ever)."""
    write_two_pair_dataset(tmp_path)
    bad = _bad_files(tmp_path / "bad")[kind]
    monkeypatch.chdir(tmp_path)
    for name, (args, _) in BAD_FILE_COMMANDS.items():
        if kind == "empty json" and name in ("register fixed", "register --query", "keypoints --pairs"):
            continue  # a .json where a point file or the pairs CSV goes: the wrong-kind test below
        if kind == "folder" and name == "ensemble":
            continue  # a folder is a source there (a run directory): mixed with a checkpoint, that is refused
        code, out, err = _cli(monkeypatch, capsys, *[str(bad) if a == "BAD" else a for a in args])
        assert code == 2 and out == "" and len(err.splitlines()) == 1, (name, code, out, err)
        assert err.startswith(f"cyclereg: error: {bad}: "), (name, err)
        assert EXPECTED.get(kind, "") in err, (name, err)
    assert not {"out", "run", "r.json", "e.pt", "k.csv", "kp"} & {p.name for p in tmp_path.iterdir()}


@pytest.mark.parametrize("args, said", [
    (["register", "dataset.json", "m.csv", "-o", "out"], "dataset.json: unknown point-cloud format '.json'"),
    (["pretrain-random", "f.csv", "-o", "run"], "f.csv: not valid JSON"),
    (["evaluate", "dataset.json", "--json", "r.json", "--model", "f.csv"], "f.csv: not a readable cyclereg checkpoint"),
    (["compare", "dataset.json", "dataset.json"], "dataset.json: a keypoint dataset, not an evaluate report"),
    (["keypoints", "f.csv", "-o", "k.csv"], "f.csv: unreadable NIfTI"),
    (["keypoints", "--pairs", "dataset.json", "-o", "kp"], "dataset.json: pairs CSV needs the columns id, fixed, moving"),
    (["status", "f.csv"], "f.csv: is not a folder (a run directory is)"),
    (["cycle", "dataset.json", "--run", "f.csv"], "f.csv: is not a folder (a run directory is)"),
    (["demo", "-o", "f.csv"], "f.csv: exists and is not a folder"),
])
def test_a_file_of_the_wrong_kind_is_one_line_naming_it_and_what_it_should_be(tmp_path, monkeypatch, capsys, args,
                                                                               said):
    write_two_pair_dataset(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("cyclereg: error: "), err
    assert said in err


@pytest.mark.parametrize("args, said, where", [
    (["register", "f.csv", "m.csv", "-o", "o", "--seeed", "3"], "No such option: --seeed (Possible options: --seed",
     "cyclereg register"),
    (["register", "f.csv", "m.csv", "-o", "o", "--modle", "random"], "(Possible options: --model)", "cyclereg register"),
    (["cycle", "d.json", "--run", "r", "--stages", "two"], "Invalid value for '--stages'", "cyclereg cycle"),
    (["regster"], "No such command 'regster'. Did you mean 'register'?", "cyclereg"),
    (["status"], "Missing argument 'run'", "cyclereg status"),
    (["--helpp"], "No such option: --helpp", "cyclereg"),
])
def test_usage_errors_name_the_option_and_suggest_the_one_meant(monkeypatch, capsys, args, said, where):
    """A typo of an option or command gets click's suggestion; a value of the wrong type names its option;
    all one line, exit 2, pointing at the help of the command they belong to."""
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert said in err and err.rstrip().endswith(f"(see '{where} --help')"), err


def test_cyclereg_alone_prints_the_help_on_stdout_and_exits_2(monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys)
    assert code == 2 and err == ""
    assert "Usage: cyclereg" in out and all(c in out for c in typer.main.get_command(app).commands)


COMMANDS = list(typer.main.get_command(app).commands)


def test_every_option_of_every_command_has_a_help_text():
    for name, cmd in typer.main.get_command(app).commands.items():
        for param in cmd.params:
            assert getattr(param, "help", None), (name, param.name)


@pytest.mark.parametrize("columns", ["40", "200"])
def test_every_help_renders_at_any_width(monkeypatch, capsys, columns):
    monkeypatch.setenv("COLUMNS", columns)
    for name in [None, *COMMANDS]:
        code, out, err = _cli(monkeypatch, capsys, *([name] if name else []), "--help")
        assert code == 0 and err == "" and "Usage: cyclereg" in " ".join(out.split()), (name, err)


ANSI = re.compile(r"\x1b\[")


def _process(*args, env=None):
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    environ.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "cyclereg_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=environ, stdin=subprocess.DEVNULL)


def test_a_piped_register_keeps_its_result_on_stdout_whole_and_plain(tmp_path):
    """A real process with pipes (no terminal, COLUMNS unset: 80 columns): the result line on stdout names the
    output folder whole (a 140-character path is not cut at 80 columns), nothing on stderr, no escape codes
    and no carriage returns (no progress-bar redraws)."""
    write_pair_files(tmp_path)
    out_dir = tmp_path / LONG / "reg"
    done = _process("register", tmp_path / "f.csv", tmp_path / "m.csv", "-o", out_dir, "--tta-passes", "0",
                    "--recentre-passes", "0", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and len(done.stdout.splitlines()) == 1
    assert done.stdout.rstrip().endswith(f"wrote displacements.csv to {out_dir}")
    assert not ANSI.search(done.stdout) and "\r" not in done.stdout
    assert (out_dir / "displacements.csv").is_file()


def test_a_piped_evaluate_puts_its_table_on_stdout_and_its_progress_on_stderr(tmp_path):
    """evaluate: the per-pair lines and notes go to stderr, the result table to stdout; plain text."""
    ds = write_two_pair_dataset(tmp_path)
    done = _process("evaluate", ds, "--identity", "--json", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    assert "1/2 c0" in done.stderr and "2/2 c1" in done.stderr and "c0" not in done.stdout.split("case")[0]
    rows = [line for line in done.stdout.splitlines() if re.search(r"\bc[01]\b", line)]
    assert len(rows) == 2 and all("14.81" in row for row in rows)  # the identity's TRE of the pair files
    for stream in (done.stdout, done.stderr):
        assert not ANSI.search(stream) and "\r" not in stream
    assert json.loads((tmp_path / "r.json").read_text())["cases"][0]["id"] == "c0"


def test_a_command_that_did_its_work_with_a_note_exits_0_and_keeps_the_note_off_stdout(tmp_path, monkeypatch,
                                                                                        capsys):
    """compare of a report with itself: the comparison is made (exit 0, the table on stdout, the same TRE before
    and after: a difference of +0.0000) and the remark that it is identical by construction goes to stderr."""
    ds = write_two_pair_dataset(tmp_path)
    report = tmp_path / "r.json"
    assert _cli(monkeypatch, capsys, "evaluate", ds, "--identity", "--json", report)[0] == 0
    code, out, err = _cli(monkeypatch, capsys, "compare", report, report, "--json", tmp_path / "c.json")
    assert code == 0 and err.startswith(f"note: {report} is the same file as the base")
    assert "note" not in out and "+0.0000" in out and (tmp_path / "c.json").is_file()


# ---------------------------------------------------------------------------------------------------- bugs


@pytest.mark.parametrize("args, said", [
    (["evaluate", "d.json", "--json"], "Option '--json' requires an argument"),
    (["register", "f", "m", "-o"], "Option '-o' requires an argument"),
    (["cycle", "d.json", "--run"], "Option '--run' requires an argument"),
    (["pretrain-random", "d.json", "-o", "r", "--augment=yes"], "Option '--augment' does not take a value"),
])
def test_an_option_without_its_value_points_at_its_commands_help(monkeypatch, capsys, args, said):
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 2 and said in err and len(err.splitlines()) == 1
    assert err.rstrip().endswith(f"(see 'cyclereg {args[0]} --help')"), err


@pytest.mark.parametrize("columns", ["80", "40"])
def test_every_option_name_is_shown_whole_in_the_help(monkeypatch, capsys, columns):
    monkeypatch.setenv("COLUMNS", columns)
    cut = []
    for name, cmd in typer.main.get_command(app).commands.items():
        code, out, _ = _cli(monkeypatch, capsys, name, "--help")
        assert code == 0
        cut += [(name, opt) for p in cmd.params if p.param_type_name == "option"
                for opt in [*p.opts, *p.secondary_opts] if not re.search(re.escape(opt) + r"(?![\w-])", out)]
    assert cut == []


def test_demo_names_a_long_output_folder_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    out_dir = tmp_path / LONG / "demo"
    code, out, err = _cli(monkeypatch, capsys, "demo", "-o", out_dir, "--device", "cpu")
    assert code == 0 and (out_dir / "report.json").is_file(), err
    assert str(out_dir) in out.splitlines()[-1], out


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A keypoint run (fold 1 labelled, stage 0) in a folder whose path is longer than 80 columns."""
    folder = tmp_path_factory.mktemp("streams")
    ds = write_two_pair_dataset(folder)
    run = folder / LONG / "run"
    done = subprocess.run([sys.executable, "-c", "from cyclereg_cli.entry import main; main()", "pretrain-random",
                           str(ds), "-o", str(run), "--fold", "1", *CHEAP_RUN], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return ds, run


def test_status_names_a_long_run_path_whole(long_run, monkeypatch, capsys):
    monkeypatch.delenv("COLUMNS", raising=False)
    code, out, err = _cli(monkeypatch, capsys, "status", long_run[1])
    assert code == 0, err
    assert str(long_run[1]) in out, out


def test_cycle_leaves_no_progress_bar_in_piped_stdout(long_run, monkeypatch, capsys):
    ds, run = long_run
    code, out, err = _cli(monkeypatch, capsys, "cycle", ds, "--run", run, "--folds", "1", "--device", "cpu")
    assert code == 0, err
    assert out.splitlines()[-1] == "finished stages: fold 1: 1"
    assert "━" not in out + err and "folds" not in out.replace("finished stages", ""), out


@pytest.mark.parametrize("option", ["--json", "--errors-csv"])
def test_an_output_that_is_a_fifo_is_written_through_or_refused_never_replaced(tmp_path, monkeypatch, capsys,
                                                                                 option):
    import stat

    ds = write_two_pair_dataset(tmp_path)
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader is there: a writer's open does not block
    try:
        args = ["--json", fifo] if option == "--json" else ["--json", tmp_path / "r.json", "--errors-csv", fifo]
        code, out, err = _cli(monkeypatch, capsys, "evaluate", ds, "--identity", *args)
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
        assert code == 2 and str(fifo) in err or code == 0 and os.read(reader, 1 << 16)
    finally:
        os.close(reader)


def test_a_resumed_stage_names_its_long_snapshot_path_whole(tmp_path, monkeypatch, capsys):
    from cyclereg.training import scheduler as scheduler_mod

    monkeypatch.delenv("COLUMNS", raising=False)
    ds = write_two_pair_dataset(tmp_path)
    run = tmp_path / LONG / "run"
    assert _cli(monkeypatch, capsys, "pretrain-random", ds, "-o", run, "--fold", "1", *CHEAP_RUN, "--epochs", "2")[0] == 0
    real = scheduler_mod.StageSnapshot.offer

    def dies_after_the_first_epoch(self, s, **kw):
        wrote = real(self, s, **kw)
        if s == 1:
            raise KeyboardInterrupt
        return wrote

    monkeypatch.setattr(scheduler_mod.StageSnapshot, "offer", dies_after_the_first_epoch)
    cmd = ["cycle", ds, "--run", run, "--folds", "1", "--snapshot-every", "1e-9", "--device", "cpu"]
    assert _cli(monkeypatch, capsys, *cmd)[0] == 130
    monkeypatch.setattr(scheduler_mod.StageSnapshot, "offer", real)
    code, out, err = _cli(monkeypatch, capsys, *cmd)
    assert code == 0, err
    assert "training resumes after epoch 1/2" in " ".join((out + err).split())
    assert str(run / "fold1" / "stage1.partial.pt") in out + err, out + err


def _ct_pair(folder: Path) -> Path:
    """Two small textured CT volumes (1 mm voxels, a few keypoints each) and the pairs CSV naming them."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage as ndi

    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in (("f.nii.gz", 0), ("m.nii.gz", 1)):
        vol = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal((26, 24, 20)), 1.5) * 100
        nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), str(folder / name))
    (folder / "pairs.csv").write_text("id,fixed,moving\np1,f.nii.gz,m.nii.gz\n")
    return folder / "pairs.csv"


@pytest.mark.parametrize("command", ["keypoints", "pretrain-random"])
def test_piped_stdout_holds_no_blank_line_left_by_a_progress_bar(tmp_path, monkeypatch, capsys, command):
    if command == "keypoints":
        args = ["keypoints", "--pairs", _ct_pair(tmp_path), "-o", tmp_path / "kp", "--device", "cpu"]
    else:
        args = ["pretrain-random", write_two_pair_dataset(tmp_path), "-o", tmp_path / "run", "--fold", "1",
                *CHEAP_RUN]
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "" not in [line.strip() for line in out.splitlines()], out


def test_evaluate_of_volumes_prints_its_table_on_stdout_like_keypoints(tmp_path, monkeypatch, capsys,
                                                                        one_intraop_thread):
    from test_dense_cli import _blob_image, _save

    names = []
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    for n, shift in enumerate([(0, 0, 0), (0, 2, 1)], start=1):
        img, lab = _blob_image(shift, seed=0)
        names.append(f"Tiny_{n:04d}_0000.nii.gz")
        _save(tmp_path / "imagesTr" / names[-1], img)
        _save(tmp_path / "labelsTr" / names[-1], lab)
    ds = tmp_path / "Tiny_dataset.json"
    ds.write_text(json.dumps({
        "name": "tiny", "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "registration_val": [{"fixed": f"./imagesTr/{names[0]}", "moving": f"./imagesTr/{names[1]}"}]}))
    code, out, err = _cli(monkeypatch, capsys, "evaluate", ds, "--identity", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "Dice init" in out and "Dice init" not in err, (out, err)
