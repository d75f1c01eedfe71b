"""Contracts of today's output and input mends (2026-12-07).

Mended: ``--json -`` (``evaluate``, ``status``, ``compare``; any output file checked by
:func:`cyclereg.errors.require_output_file`) wrote a file named ``-``; it is refused with one line, since
the commands print their tables on stdout and write their reports through staged files. A path holding a NUL
character passed every path check and failed at the write with a bare ``ValueError`` (the command line's
own parser already refused it with one line): :func:`cyclereg.errors.refuse_empty_paths` refuses it. An output
path that is a symbolic link had the link replaced by a regular file (its target unchanged): the atomic writers
(:func:`cyclereg.checkpoint.atomic_write_bytes`, :func:`cyclereg.checkpoint.staged_file_set`) now write the
target, atomically beside it, and keep the link; a dangling or looping link (the output's, or a folder's on
its way) is refused before any work, where it said "File exists" after it, and a link into a run directory is
judged by its target. ``keypoints`` printed its step timings on stdout beside its result line (so did
``register --via-keypoints``): they go to stderr. A ``.csv`` point file of one line that is neither numbers nor
the header (JSON, prose) was "point cloud is empty": it cannot be parsed as points, naming the line. An output
name too long for the file system in a folder not made yet (``keypoints -o new/NAME``) failed only after the
detection, and replacing an output whose name is near the limit (``NAME.config.json`` of 247 to 255 bytes)
failed after it too, naming the staging folder (the earlier file's aside name ``.earlier.NAME`` was too long):
:func:`cyclereg.errors.require_output_file` / ``require_output_dir`` refuse a too-long name before any work,
and the set writers cut the aside names. :func:`cyclereg.console.print_note` raised ``ValueError`` where
``sys.stderr`` was a closed stream object: the note is dropped, as where its reader is gone.
"""

from __future__ import annotations

import errno
import io
import json
import os
import sys

import pytest
from typer.testing import CliRunner

from conftest import write_two_pair_dataset
from cyclereg.api import evaluate
from cyclereg.checkpoint import atomic_write_text, staged_file_set
from cyclereg.console import print_note
from cyclereg.errors import InputError, require_file, require_output_dir, require_output_file
from cyclereg.pointio import read_points
from cyclereg_cli import entry
from cyclereg_cli.main import app


# ----------------------------------------------------------------------------- 1. --json - (standard output)
def test_dash_output_is_refused_not_written(tmp_path, monkeypatch):
    """``-`` is refused naming it; a file named ``-`` given by its full path is still an output."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"^-: standard output is not an output here"):
        require_output_file("-")
    assert require_output_file(tmp_path / "-") == tmp_path / "-"
    ds = write_two_pair_dataset(tmp_path / "ds")
    (tmp_path / "run").mkdir()
    for args in (["evaluate", str(ds), "--identity", "--json", "-"], ["status", str(tmp_path / "run"), "--json", "-"],
                 ["compare", "a.json", "b.json", "--json", "-"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "cyclereg: error: -: standard output is not an output here" in res.output
        assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "run"]


# ----------------------------------------------------------------------------- 2. a NUL character in a path
def test_nul_in_a_path_is_one_line_naming_it(tmp_path):
    for check, name in ((require_output_file, "output file"), (require_file, "input file"),
                        (require_output_dir, "output folder")):
        with pytest.raises(InputError) as err:
            check(tmp_path / "out\0.json")
        assert str(err.value).startswith(f"{name} '{tmp_path}/out\\x00.json': holds a NUL character")
    ds = write_two_pair_dataset(tmp_path / "ds")
    with pytest.raises(InputError, match=r"^report '.*out\\x00\.json': holds a NUL character"):
        evaluate(ds, tmp_path / "out\0.json", identity=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# ----------------------------------------------------------------------------- 3. an output that is a symbolic link
def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_an_output_link_is_followed_and_kept(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "t.json").write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to("real/t.json")  # relative, into another folder
    require_output_file(link)
    atomic_write_text(link, "one")
    assert link.is_symlink() and os.readlink(link) == "real/t.json"
    assert (tmp_path / "real" / "t.json").read_text() == "one"
    with staged_file_set() as files:
        atomic_write_text(files(link), "two")
    assert link.is_symlink() and (tmp_path / "real" / "t.json").read_text() == "two"
    assert _names(tmp_path) == ["link.json", "real"] and _names(tmp_path / "real") == ["t.json"]  # no temporary left
    ds = write_two_pair_dataset(tmp_path / "ds")
    res = CliRunner().invoke(app, ["evaluate", str(ds), "--identity", "--json", str(link)])
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and json.loads((tmp_path / "real" / "t.json").read_text())["method"]


def test_a_looping_output_link_or_one_through_a_dangling_folder_is_one_line_before_any_work(tmp_path):
    (tmp_path / "dangling.json").symlink_to("nowhere.json")
    (tmp_path / "loop.json").symlink_to("loop.json")
    (tmp_path / "gone").symlink_to("nodir")
    (tmp_path / "far.json").symlink_to(tmp_path / "file" / "x.json")  # its folder would be a file
    (tmp_path / "file").write_text("")
    assert require_output_file(tmp_path / "dangling.json") == tmp_path / "dangling.json"  # followed, as open() would
    with pytest.raises(InputError, match=r"far\.json: cannot make the folder of .*x\.json, which it links to \("
                                         r".*file is a file\)"):
        require_output_file(tmp_path / "far.json")
    with pytest.raises(InputError, match=r"loop\.json: is a symbolic link that loops"):
        require_output_file(tmp_path / "loop.json")
    with pytest.raises(InputError, match=r"gone/r\.json: cannot make its folder \(.*gone is a symbolic link to nodir, "
                                         r"which does not exist\)"):
        require_output_file(tmp_path / "gone" / "r.json")
    with pytest.raises(InputError, match=r"gone/o: cannot make this folder \(.*gone is a symbolic link to nodir"):
        require_output_dir(tmp_path / "gone" / "o")
    ds = write_two_pair_dataset(tmp_path / "ds")
    res = CliRunner().invoke(app, ["evaluate", str(ds), "--identity", "--json", str(tmp_path / "gone" / "r.json")])
    assert res.exit_code == 2 and "gone is a symbolic link to nodir, which does not exist" in res.output, res.output
    assert "TRE" not in res.output  # refused before the evaluation
    assert _names(tmp_path) == ["dangling.json", "ds", "far.json", "file", "gone", "loop.json"]


def test_an_output_link_that_dangles_makes_its_target_and_stays(tmp_path):
    """``--json latest.json`` where latest.json links to reports/new.json, not written yet: the report is made
    there and the link kept (``open(path, "w")`` would do the same), by the atomic writer and the set writer."""
    from cyclereg.checkpoint import atomic_write_text, staged_file_set

    (tmp_path / "reports").mkdir()
    (tmp_path / "latest.json").symlink_to("reports/new.json")
    (tmp_path / "set.json").symlink_to("reports/set.json")
    require_output_file(tmp_path / "latest.json")
    atomic_write_text(tmp_path / "latest.json", "one")
    with staged_file_set() as files:
        atomic_write_text(files(tmp_path / "set.json"), "two")
    assert (tmp_path / "reports" / "new.json").read_text() == "one" and (tmp_path / "latest.json").is_symlink()
    assert (tmp_path / "reports" / "set.json").read_text() == "two" and (tmp_path / "set.json").is_symlink()
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["new.json", "set.json"]


def test_an_output_link_into_a_run_directory_is_judged_by_its_target(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "clouds", "config": {}}))
    (tmp_path / "r.json").symlink_to(run / "run.json")
    with pytest.raises(InputError, match=r"r\.json: would be one of the own files of the run directory"):
        require_output_file(tmp_path / "r.json")


# ----------------------------------------------------------------------------- 4. keypoints: stdout holds the result
def _ct(path):
    import nibabel as nib
    import numpy as np
    from scipy import ndimage as ndi

    vol = ndi.gaussian_filter(np.random.default_rng(0).standard_normal((26, 24, 20)), 1.5) * 100
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), str(path))
    return path


def _cli(monkeypatch, capsys, *args):
    """The console script in this process: ``(exit code, stdout, stderr)``."""
    monkeypatch.setattr(sys, "argv", ["cyclereg", *map(str, args)])
    code = 0
    try:
        entry.main()
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_keypoints_prints_only_its_result_line_on_stdout(tmp_path, monkeypatch, capsys):
    out_csv = tmp_path / "k.csv"
    code, out, err = _cli(monkeypatch, capsys, "keypoints", _ct(tmp_path / "ct.nii.gz"), "-o", out_csv,
                          "--device", "cpu")
    assert code == 0, err
    n = len(out_csv.read_text().splitlines()) - 1
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{n} keypoints -> "), out
    assert "done read CT" in err and "done Foerstner keypoints (cpu)" in err and "done write" in err, err


def test_keypoints_result_line_counts_one_keypoint_in_the_singular(tmp_path, monkeypatch, capsys):
    out_csv = tmp_path / "k.csv"
    code, out, err = _cli(monkeypatch, capsys, "keypoints", _ct(tmp_path / "ct.nii.gz"), "-o", out_csv,
                          "--device", "cpu", "--max-points", "1")
    assert code == 0, err
    assert len(out_csv.read_text().splitlines()) == 2  # header + the one point
    assert out.startswith("1 keypoint -> "), out


def test_keypoints_result_line_says_when_max_points_cut_the_candidates(tmp_path, monkeypatch, capsys):
    """A cut by --max-points is said in the result line (a chest CT at small radii keeps 3000 of 703,661
    candidates; the count alone read like all there were), with the candidate count the record holds; without a
    cut the line says nothing of it."""
    ct = _ct(tmp_path / "ct.nii.gz")
    code, out, err = _cli(monkeypatch, capsys, "keypoints", ct, "-o", tmp_path / "all.csv", "--device", "cpu",
                          "--max-points", "100000")
    assert code == 0, err
    n = len((tmp_path / "all.csv").read_text().splitlines()) - 1
    assert n >= 3 and "candidates" not in out, out
    code, out, err = _cli(monkeypatch, capsys, "keypoints", ct, "-o", tmp_path / "two.csv", "--device", "cpu",
                          "--max-points", "2")
    assert code == 0, err
    record = json.loads((tmp_path / "two.csv.config.json").read_text())
    assert record["num_keypoints"] == 2 and record["num_candidates"] == n
    assert out.startswith("2 keypoints -> ") and f"the strongest of {n:,} candidates, --max-points 2" in out, out


# ----------------------------------------------------------------------------- 5. a .csv that holds no points
@pytest.mark.parametrize("text", ['{"points": [[1, 2, 3]]}\n', "[[1,2,3],[4,5,6]]", "\n\nhello world\n"])
def test_a_csv_of_json_or_prose_cannot_be_parsed_as_points(tmp_path, pair_files, text):
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    line = 3 if text.startswith("\n") else 1
    with pytest.raises(InputError, match=rf"bad\.csv: cannot be parsed as points: line {line} is neither numbers "
                                         r"nor the header x_mm,y_mm,z_mm: "):
        read_points(bad)
    res = CliRunner().invoke(app, ["register", str(bad), str(tmp_path / "m.csv"), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "bad.csv: cannot be parsed as points" in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_a_csv_of_the_header_alone_is_still_an_empty_cloud(tmp_path):
    (tmp_path / "h.csv").write_text(" Y_mm,x_mm,z_mm\n")
    with pytest.raises(InputError, match=r"h\.csv: point cloud is empty$"):
        read_points(tmp_path / "h.csv")


# ----------------------------------------------------------------------------- 6. names too long for the file system
def test_a_too_long_output_name_is_refused_before_detection(tmp_path, monkeypatch, capsys):
    ct = _ct(tmp_path / "ct.nii.gz")
    for out in (tmp_path / "new" / ("d" * 300 + ".csv"), tmp_path / ("e" * 250 + ".csv")):  # the name; its config's
        code, out_text, err = _cli(monkeypatch, capsys, "keypoints", ct, "-o", out, "--device", "cpu")
        assert code == 2 and "a name in it is too long for the file system (" in err, err
        assert "done read CT" not in err and out_text == ""
    assert _names(tmp_path) == ["ct.nii.gz"]
    with pytest.raises(InputError, match=r"a name in it is too long for the file system \(300 bytes, at most \d+\)"):
        require_output_dir(tmp_path / ("f" * 300))


def test_an_output_whose_name_is_near_the_limit_is_replaced(tmp_path, monkeypatch, capsys):
    ct = _ct(tmp_path / "ct.nii.gz")
    out = tmp_path / ("c" * 236 + ".csv")  # its configuration's name: 252 bytes
    for _ in range(2):
        code, _, err = _cli(monkeypatch, capsys, "keypoints", ct, "-o", out, "--device", "cpu")
        assert code == 0, err
    assert _names(tmp_path) == sorted(["ct.nii.gz", out.name, out.name + ".config.json"])


# ----------------------------------------------------------------------------- 7. a closed stderr object
class _BadDescriptor(io.StringIO):
    def write(self, text):
        raise OSError(errno.EBADF, "Bad file descriptor")


def test_a_note_to_a_closed_or_broken_stderr_is_dropped(monkeypatch, tmp_path):
    closed = io.StringIO()
    closed.close()
    with open(tmp_path / "e.txt", "w") as closed_file:
        pass
    for stream in (closed, closed_file, _BadDescriptor(), None):
        monkeypatch.setattr(sys, "stderr", stream)
        assert print_note("a remark [mm]") is None
    written = io.StringIO()
    monkeypatch.setattr(sys, "stderr", written)
    print_note("a remark [mm]")
    assert written.getvalue() == "note: a remark [mm]\n"
