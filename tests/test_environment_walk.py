"""Bad-environment walk over the ``cyclereg`` command line (audited 2026-12-07).

What was audited: not the arguments but the SURROUNDINGS the commands run in. ``register``, ``keypoints``,
``evaluate``, ``compare``, ``status``, ``pretrain-random`` and ``cycle`` were run (as real processes,
``python -m cyclereg_cli``, and through typer's CliRunner) on tiny inputs under: file and folder names
with spaces, non-ASCII characters (``ü``, ``日本``), rich-markup brackets (``[red]``, ``[/b]``), a leading
dash, 250-character names and 800-character paths; symlinked inputs and output folders, dangling and
looping links; ``~`` (not expanded when quoted, like other tools); relative paths from another working
folder; ``LANG=C`` / ``LC_ALL=C`` (Python's UTF-8 mode: harmless), ``PYTHONIOENCODING=ascii`` and
``LC_ALL=C PYTHONUTF8=0`` (an ASCII stdout), ``COLUMNS=20`` and a log file (80 columns), a closed stdout
(``| head -1``); a missing output parent, an existing folder where a file goes and the reverse; two
``register`` processes writing one output folder at once; a run locked by another process and a lock
left by a process killed with SIGKILL; and the environment variables the tool reads
(``CYCLEREG_NATIVE``, ``CC``, ``CYCLEREG_CACHE_DIR``, ``HOME``/``XDG_CACHE_HOME``) plus ``OMP_NUM_THREADS``
set to ``0``, ``-3`` or ``abc`` (libgomp warns, the command runs). Permissions were not walked: the
audit ran as root, for whom ``chmod 444`` does not bite.

The project's rule (README, ``cyclereg_cli/main.py``): bad input is one line naming the file, exit 2, no
output; a command's files reach their places together; what the commands print about their progress
never breaks their output. The handled cases that no other test covers are pinned first; the mishandled
ones follow, each as a strict xfail naming the bug.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

from conftest import write_pair_files
from cyclereg_cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
CHEAP_RUN = ["--stages", "1", "--epochs", "1", "--train-points", "100,200", "--tta-passes", "0",
             "--recentre-passes", "0", "--device", "cpu"]


def _env(**extra: str) -> dict:
    """The environment of a real ``cyclereg`` process: this checkout first on the path, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1", **extra)
    return env


def _process(*args, env: dict | None = None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """``python -m cyclereg_cli ARGS`` as a separate process (stderr captured, text)."""
    return subprocess.run([sys.executable, "-B", "-m", "cyclereg_cli", *map(str, args)], stdout=stdout,
                          stderr=subprocess.PIPE, env=env or _env(), timeout=120, text=True, cwd=REPO)


def _ct(path: Path) -> Path:
    """A small textured volume (26 x 24 x 20 voxels of 1 mm): a few Foerstner keypoints, quickly."""
    vol = ndi.gaussian_filter(np.random.default_rng(0).standard_normal((26, 24, 20)), 1.5) * 100
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), str(path))
    return path


def _dataset(folder: Path) -> Path:
    """One keypoint pair with landmarks (the pair of ``pair_files``) and its dataset.json."""
    folder.mkdir(parents=True, exist_ok=True)
    write_pair_files(folder)
    ds = folder / "dataset.json"
    ds.write_text(json.dumps({"name": "tiny", "pairs": [
        {"id": "p1", "fixed_keypoints": "f.csv", "moving_keypoints": "m.csv",
         "fixed_landmarks": "l.csv", "moving_landmarks": "ml.csv"}]}))
    return ds


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """An ``evaluate --identity`` report of the one-pair dataset (the input of ``compare``)."""
    d = tmp_path_factory.mktemp("report")
    res = runner.invoke(app, ["evaluate", str(_dataset(d / "data")), "--identity", "--json", str(d / "r.json")])
    assert res.exit_code == 0, res.output
    return d / "r.json"


# ----------------------------------------------------------------------------- names and places


@pytest.mark.parametrize("name", ["with space", "dü 日本", "-out"])
def test_output_folders_named_oddly_get_the_whole_result(pair_files, monkeypatch, name):
    """Spaces, non-ASCII characters and a leading dash (``-o ./-out`` and ``-o -out``: click takes the
    option's value as it is) name an output folder like any other: both files there, the summary line
    naming the folder, and the working folder (``-out`` given relative) is where it lands."""
    d, _ = pair_files
    monkeypatch.chdir(d)
    for given in (f"./{name}", name):
        res = runner.invoke(app, ["register", "f.csv", "m.csv", "-o", given])
        assert res.exit_code == 0, res.output
        assert res.output.strip().endswith(f"wrote displacements.csv to {name}")  # ./ dropped, as pathlib does
        assert sorted(p.name for p in (d / name).iterdir()) == ["config.json", "displacements.csv"]


def test_symlinked_inputs_and_output_folder_are_followed(pair_files):
    """Inputs reached through links read as their targets, and an output folder that is a link to a
    folder receives the files in that folder (the link stays a link); a missing parent is made."""
    d, _ = pair_files
    (d / "lf.csv").symlink_to(d / "f.csv")
    (d / "lm.csv").symlink_to("m.csv")  # relative link
    (d / "real").mkdir()
    (d / "link").symlink_to(d / "real", target_is_directory=True)
    res = runner.invoke(app, ["register", str(d / "lf.csv"), str(d / "lm.csv"), "-o", str(d / "link")])
    assert res.exit_code == 0, res.output
    assert (d / "link").is_symlink() and (d / "real" / "displacements.csv").is_file()
    res = runner.invoke(app, ["register", str(d / "f.csv"), str(d / "m.csv"), "-o", str(d / "new" / "a" / "b")])
    assert res.exit_code == 0, res.output
    assert (d / "real" / "displacements.csv").read_bytes() == (d / "new" / "a" / "b" / "displacements.csv").read_bytes()


@pytest.mark.parametrize("command, said", [
    (["register", "{d}/f.csv", "{d}/m.csv", "-o", "{d}/afile"], "afile: exists and is not a folder"),
    (["register", "{d}/f.csv", "{d}/m.csv", "-o", "{d}/afile/sub"], "afile/sub: cannot make this folder ("),
    (["compare", "{r}", "{r}", "--json", "{d}/adir.json"], "adir.json: is a folder; an output file is needed here"),
    (["register", "{d}/dangling", "{d}/m.csv", "-o", "{d}/o"], "dangling: file does not exist"),
])
def test_a_file_where_a_folder_goes_and_back_is_one_line(pair_files, report, command, said):
    """An existing file where an output folder goes, a folder where an output file goes, a dangling
    link as an input: one line naming the path, exit 2, nothing written."""
    d, _ = pair_files
    (d / "afile").write_text("kept")
    (d / "adir.json").mkdir()
    (d / "dangling").symlink_to(d / "nowhere.csv")
    res = runner.invoke(app, [a.format(d=d, r=report) for a in command])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and said in res.output, res.output
    assert (d / "afile").read_text() == "kept" and not any((d / "adir.json").iterdir())
    assert not (d / "o").exists()


# ----------------------------------------------------------------------------- locks between processes


def test_a_run_locked_by_another_process_is_refused_and_a_sigkilled_lock_is_no_lock(tmp_path):
    """A second process working on the run (here: one holding the run's fold lock, as ``cycle`` does)
    makes ``cycle`` stop at once with one line; once that process is killed with SIGKILL its lock file
    stays behind but locks nothing (flock goes with the process), and ``cycle`` trains."""
    from cyclereg.errors import RUN_LOCK

    ds = _dataset(tmp_path / "data")
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *CHEAP_RUN])
    assert res.exit_code == 0, res.output
    holder = subprocess.Popen(
        [sys.executable, "-B", "-c", "import sys, time; from pathlib import Path; "
         "from cyclereg.training.api import fold_locks\n"
         "with fold_locks(Path(sys.argv[1]), [None]):\n    print('locked', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = runner.invoke(app, ["cycle", str(ds), "--run", str(run)])
        assert res.exit_code == 2 and "another cyclereg command (pretrain-random or cycle) is working on this run" \
            in " ".join(res.output.split()), res.output
        assert not (run / "all" / "stage1.pt").exists()
    finally:
        holder.kill()  # SIGKILL: no cleanup in the holder
        holder.wait()
    assert (run / "all" / RUN_LOCK).is_file()
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run)])
    assert res.exit_code == 0 and "finished stages: all: 1" in res.output, res.output


# ----------------------------------------------------------------------------- environment variables


@pytest.mark.parametrize("variables", [
    {"CC": "/nonexistent/cc"},  # falls back to cc / gcc / clang, or to torch without any
    {"CYCLEREG_CACHE_DIR": "{d}/afile"},  # a file where the cache folder goes
    {"CYCLEREG_NATIVE": "garbage"},  # only 0 disables
])
def test_bad_native_kernel_settings_never_fail_a_command(tmp_path, monkeypatch, variables):
    """The C kernel's environment (``CC``, ``CYCLEREG_CACHE_DIR``, ``CYCLEREG_NATIVE``) set badly: the
    kernel either loads or says why not in one line, and never raises (the torch path runs instead)."""
    from cyclereg.clouds.native import LIBRARY
    from cyclereg.native import IN_USE, NativeLibrary

    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv("CYCLEREG_CACHE_DIR", str(tmp_path / "cache"))
    for name, value in variables.items():
        monkeypatch.setenv(name, value.format(d=tmp_path))
    fresh = NativeLibrary(LIBRARY.source, LIBRARY.stem, LIBRARY.bind, LIBRARY.check, LIBRARY.mismatch)
    reason = fresh.reason()
    assert "\n" not in reason
    assert reason.startswith(IN_USE) == (fresh.kernel() is not None)
    if "CYCLEREG_CACHE_DIR" in variables:
        assert fresh.kernel() is None and reason.startswith("could not be built") and "torch path runs" in reason


# ----------------------------------------------------------------------------- mishandled (bugs)


def test_evaluate_writes_its_report_under_an_ascii_stdout(tmp_path):
    ds = _dataset(tmp_path / "data")
    proc = _process("evaluate", ds, "--identity", "--json", tmp_path / "r.json", env=_env(PYTHONIOENCODING="ascii"))
    assert "Traceback" not in proc.stderr and proc.returncode == 0, proc.stderr[-600:]
    assert json.loads((tmp_path / "r.json").read_text())["num_pairs"] == 1


def _ascii_stdout(monkeypatch) -> io.TextIOWrapper:
    """Replace ``sys.stdout`` by an ASCII text stream (strict errors), as ``PYTHONIOENCODING=ascii`` makes it."""
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", stream)
    return stream


def _cli_in_process(args: list[str]) -> int:
    """Run the CLI in this process on the real ``sys.stdout`` (no CliRunner): its exit code."""
    try:
        app([str(a) for a in args], prog_name="cyclereg")
    except SystemExit as stop:
        return stop.code or 0
    return 0


def test_keypoints_with_a_non_ascii_output_under_an_ascii_stdout(tmp_path, monkeypatch):
    ct = _ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "dü 日本" / "k ü.csv"
    _ascii_stdout(monkeypatch)
    assert _cli_in_process(["keypoints", ct, "-o", out, "--device", "cpu"]) == 0
    assert out.is_file()


def test_compare_with_a_non_ascii_report_under_an_ascii_stdout(tmp_path, report, monkeypatch):
    other = tmp_path / "dü 日本.json"
    other.write_bytes(report.read_bytes())
    _ascii_stdout(monkeypatch)
    assert _cli_in_process(["compare", report, other, "--json", tmp_path / "c.json"]) == 0
    assert (tmp_path / "c.json").is_file()


def test_compare_shows_a_bracketed_report_name_as_it_is(tmp_path, report):
    other = tmp_path / "r[red].json"
    other.write_bytes(report.read_bytes())
    res = runner.invoke(app, ["compare", str(report), str(other)])
    assert res.exit_code == 0, res.output
    assert "r[red].json" in res.output


def test_compare_of_a_report_whose_path_looks_like_a_closing_tag(tmp_path, report):
    base = tmp_path / "x[" / "b].json"
    base.parent.mkdir()
    base.write_bytes(report.read_bytes())
    res = runner.invoke(app, ["compare", str(base), str(report), "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0 and res.exception is None, res.output
    assert (tmp_path / "c.json").is_file()


def test_status_shows_a_bracketed_run_name_as_it_is(tmp_path):
    ds = _dataset(tmp_path / "data")
    run = tmp_path / "[red]"
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *CHEAP_RUN]).exit_code == 0
    res = runner.invoke(app, ["status", str(run)])
    assert res.exit_code == 0, res.output
    assert f"{run}: tiny (keypoints)" in " ".join(res.output.split())


def test_keypoints_summary_names_a_long_output_path_on_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    ct = _ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "a_rather_long_folder_name_for_outputs" / "another_level_of_folders" / "keypoints_fixed.csv"
    res = runner.invoke(app, ["keypoints", str(ct), "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 0 and out.is_file(), res.output
    assert f"keypoints -> {out} (total" in res.output


def test_a_long_but_legal_output_file_name_is_written(tmp_path, report):
    out = tmp_path / ("r" * 245 + ".json")
    res = runner.invoke(app, ["compare", str(report), str(report), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["metric"] == "tre"


@pytest.mark.parametrize("command", ["keypoints", "evaluate"])
def test_a_closed_stdout_does_not_drop_the_result(tmp_path, command):
    if command == "keypoints":
        out = tmp_path / "k.csv"
        args = ["keypoints", _ct(tmp_path / "ct.nii.gz"), "-o", out, "--device", "cpu"]
    else:
        out = tmp_path / "r.json"
        args = ["evaluate", _dataset(tmp_path / "data"), "--identity", "--json", out]
    read, write = os.pipe()
    os.close(read)  # nobody reads: every write to stdout gets EPIPE
    try:
        proc = _process(*args, stdout=write)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr, proc.stderr[-600:]
    assert out.is_file(), (proc.returncode, proc.stderr[-600:])


def test_evaluate_of_a_pair_id_that_looks_like_a_closing_tag(tmp_path):
    ds = _dataset(tmp_path / "data")
    ds.write_text(ds.read_text().replace('"id": "p1"', '"id": "case[/b]"'))
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0 and res.exception is None, res.output
    assert "1/1 case[/b]: TRE" in res.output and (tmp_path / "r.json").is_file()


def test_a_console_whose_reader_is_gone_goes_quiet_and_the_caller_goes_on(tmp_path):
    """:func:`cyclereg.console.make_console` on a pipe nobody reads: printing neither raises nor exits (rich's
    own handler exits 1), later prints are dropped, and the pipe's descriptor now writes to the null device."""
    from cyclereg.console import make_console

    read, write = os.pipe()
    os.close(read)
    stream = os.fdopen(write, "w")
    try:
        console = make_console(file=stream, force_terminal=False)
        console.print("first line")  # EPIPE: quiet from here on
        console.print("second line")
        assert console.quiet
        stream.write("buffered text\n")
        stream.flush()  # the descriptor goes to the null device: no BrokenPipeError at exit either
    finally:
        stream.close()


def test_the_cli_escapes_what_its_ascii_streams_cannot_encode(monkeypatch):
    """:func:`cyclereg.console.tolerate_unencodable` (the CLI calls it first): an ASCII, strict stdout and stderr
    write ``ü`` as ``\\xfc``; a stream that already tolerates (or has no ``reconfigure``) is left as it is."""
    from cyclereg.console import tolerate_unencodable

    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    err = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="replace")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    tolerate_unencodable()
    out.write("dü")
    out.flush()
    assert out.buffer.getvalue() == b"d\\xfc" and err.errors == "replace"


def test_register_with_a_closed_stdout_writes_its_outputs_and_succeeds(tmp_path):
    """``register ... | head -0``: the outputs are written, and the closing line nobody reads is dropped
    with exit 0 (it was 'cyclereg: error: Broken pipe', exit 2: the code of bad input)."""
    write_pair_files(tmp_path)
    read, write = os.pipe()
    os.close(read)
    try:
        proc = _process("register", tmp_path / "f.csv", tmp_path / "m.csv", "-o", tmp_path / "out", "--device", "cpu",
                        stdout=write)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-600:]
    assert (tmp_path / "out" / "displacements.csv").is_file() and (tmp_path / "out" / "config.json").is_file()
