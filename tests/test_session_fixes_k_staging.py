"""Contracts of today's mends of the output set writers (2026-12-07).

Mended: ``register ... -o DIR`` (:func:`cyclereg.checkpoint.staged_outputs`) replaced an output that is a symbolic
link in DIR (``DIR/warped.nii.gz -> elsewhere``) by a regular file, where a single output file follows its link:
the link stays now, its target gets the new content atomically (the file is staged under the output's name in a
staging folder beside the target and renamed onto it within the set's move-in, which puts every earlier file back
on a failure), a dangling link makes its target, and a looping link (or one whose target's folder cannot be made)
is refused with one line by :func:`cyclereg.checkpoint.refuse_replacing_inputs`, which ``register`` calls before
its work (the point-file path too since a later mend, tests/test_session_fixes_l_followups.py). Also mended: while replacing an output ``X``, the set writers (:func:`cyclereg.checkpoint.staged_outputs`,
:func:`cyclereg.checkpoint.staged_file_set`) put the earlier ``X`` aside under the fixed name ``.earlier.X`` (or
``.earlier.I.NAME`` for a long name) in the staging folder, where the staged new files lie under their own names:
a set holding both ``X`` and ``.earlier.X`` wrote the earlier ``X`` into ``.earlier.X`` and lost the new one. The
aside names are unique now (:func:`tempfile.mkstemp` in the staging folder, ``.KIND.XXXXXXXX.NAME``, the name cut
to 200 bytes as before).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cyclereg.checkpoint as checkpoint
from cyclereg.checkpoint import atomic_write_text, refuse_replacing_inputs, staged_file_set, staged_outputs
from cyclereg.errors import InputError
from cyclereg_cli.main import app


def _texts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


# ----------------------------------------------------------------------------- 1. a link in the output folder
def _register(d: Path, out: Path):
    return CliRunner().invoke(app, ["register", str(d / "f.csv"), str(d / "m.csv"), "-o", str(out), "--device", "cpu"])


def test_register_follows_a_link_in_its_output_folder_and_keeps_it(pair_files):
    """DIR/displacements.csv linked elsewhere (relative) and DIR/config.json dangling into a folder not made yet:
    both links stay, the first target gets the displacements (a row per fixed point), the second target is made."""
    d, pair = pair_files
    out, far = d / "out", d / "far"
    out.mkdir()
    far.mkdir()
    (far / "disp.csv").write_text("old")
    (out / "displacements.csv").symlink_to("../far/disp.csv")
    (out / "config.json").symlink_to(d / "far" / "new" / "record.json")
    res = _register(d, out)
    assert res.exit_code == 0, res.output
    assert os.readlink(out / "displacements.csv") == "../far/disp.csv" and (out / "config.json").is_symlink()
    rows = (far / "disp.csv").read_text().splitlines()
    assert rows[0] == "x_mm,y_mm,z_mm,dx_mm,dy_mm,dz_mm" and len(rows) == 1 + pair.fixed_mm.shape[0]
    assert json.loads((far / "new" / "record.json").read_text())["outputs"] == ["displacements.csv"]
    assert sorted(os.listdir(out)) == ["config.json", "displacements.csv"]  # no staging folder left
    assert sorted(os.listdir(far)) == ["disp.csv", "new"] and os.listdir(far / "new") == ["record.json"]


def test_register_refuses_a_looping_link_in_its_output_folder_with_one_line(pair_files):
    d, _ = pair_files
    out = d / "out"
    out.mkdir()
    (out / "displacements.csv").symlink_to("displacements.csv")
    res = _register(d, out)
    assert res.exit_code == 2, res.output
    assert "displacements.csv: is a symbolic link that loops" in res.output and "Traceback" not in res.output
    assert os.listdir(out) == ["displacements.csv"] and (out / "displacements.csv").is_symlink()
    with pytest.raises(InputError, match=r"out/displacements\.csv: is a symbolic link that loops"):
        refuse_replacing_inputs(["displacements.csv", "config.json"], out, [])  # what register calls before its work
    (out / "displacements.csv").unlink()
    (d / "file").write_text("")
    (out / "displacements.csv").symlink_to(d / "file" / "x.csv")  # its target's folder would be a file
    with pytest.raises(InputError, match=r"displacements\.csv: cannot make the folder of .*x\.csv, which it links to"):
        refuse_replacing_inputs(["displacements.csv"], out, [])


def test_a_linked_output_is_written_by_its_own_name_and_put_back_when_the_move_in_fails(tmp_path, monkeypatch):
    """A writer choosing its format by suffix sees the output's name (warped.nii.gz: gzip), not the target's; a
    failed move-in puts back the target's earlier content and the other output, and leaves no staging folder."""
    out, far = tmp_path / "out", tmp_path / "far"
    out.mkdir()
    far.mkdir()
    (far / "scan").write_text("old scan")
    (out / "warped.nii.gz").symlink_to(far / "scan")
    (out / "z.txt").write_text("old z")
    with staged_outputs(out) as stage:
        assert (stage / "warped.nii.gz").name == "warped.nii.gz" and (stage / "warped.nii.gz").parent.parent == far
        checkpoint.atomic_write_bytes(stage / "warped.nii.gz", lambda fh: fh.write(b"\x1f\x8b new"))
    assert (far / "scan").read_bytes() == b"\x1f\x8b new" and (out / "warped.nii.gz").is_symlink()
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst) == out / "z.txt" and Path(src).name == "z.txt":  # the last staged file onto its target
            raise OSError(errno.EIO, "injected", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        with staged_outputs(out) as stage:
            atomic_write_text(stage / "warped.nii.gz", "newer")
            atomic_write_text(stage / "z.txt", "new z")
    monkeypatch.undo()
    assert (far / "scan").read_bytes() == b"\x1f\x8b new" and (out / "z.txt").read_text() == "old z"
    assert os.listdir(far) == ["scan"] and sorted(os.listdir(out)) == ["warped.nii.gz", "z.txt"]
    with pytest.raises(RuntimeError):  # a failing body: nothing reaches the target, no folder is left
        with staged_outputs(out) as stage:
            atomic_write_text(stage / "warped.nii.gz", "never")
            raise RuntimeError("the next output failed")
    assert (far / "scan").read_bytes() == b"\x1f\x8b new" and os.listdir(far) == ["scan"]


# ----------------------------------------------------------------------------- 2. aside names are collision-free
def test_an_output_named_like_another_ones_aside_name_keeps_its_own_content(tmp_path):
    """X and .earlier.X written as one set (both there before): each gets its own new content."""
    sets = tmp_path / "set"
    sets.mkdir()
    (sets / "X").write_text("old X")
    (sets / ".earlier.X").write_text("old user file")
    with staged_file_set() as files:
        atomic_write_text(files(sets / "X"), "new X")
        atomic_write_text(files(sets / ".earlier.X"), "new user file")
    assert _texts(sets) == {"X": "new X", ".earlier.X": "new user file"}
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    (out / ".earlier.a.txt").write_text("old user file")
    with staged_outputs(out) as stage:
        atomic_write_text(stage / "a.txt", "new a")
        atomic_write_text(stage / ".earlier.a.txt", "new user file")
    assert _texts(out) == {"a.txt": "new a", ".earlier.a.txt": "new user file"}


def test_a_failed_move_in_puts_back_both_x_and_a_file_named_like_its_aside(tmp_path, monkeypatch):
    """The last staged file cannot be moved in: X and .earlier.X (and the long-named pair, whose cut aside names
    share their first 200 bytes) are all put back as they were, and nothing else is left."""
    long = "k" * 236 + ".csv"
    names = ["X", ".earlier.X", long, long + ".config.json", "z"]
    for name in names:
        (tmp_path / name).write_text("old " + name[:3])
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst) == tmp_path / "z" and Path(src).name == "z":  # the last staged file onto its target
            raise OSError(errno.EIO, "injected", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        with staged_file_set() as files:
            for name in names:
                atomic_write_text(files(tmp_path / name), "new")
    monkeypatch.undo()
    assert _texts(tmp_path) == {name: "old " + name[:3] for name in names}


def test_aside_names_are_distinct_cut_and_free_in_the_staging_folder(tmp_path):
    """``_asides`` gives names unlike the staged files and one another, of at most 255 bytes, and leaves no
    placeholder behind."""
    stage = tmp_path / "stage"
    stage.mkdir()
    long = "é" * 125 + ".csv"  # 254 bytes: its aside name keeps the first 200
    (stage / ".earlier.X").write_text("staged")
    wanted = [(stage, "earlier", tmp_path / "X"), (stage, "earlier", tmp_path / long),
              (stage, "stale", tmp_path / long), (stage, "earlier", tmp_path / ".earlier.X")]
    asides = checkpoint._asides(wanted)
    assert len(set(asides)) == 4 and all(a.parent == stage and not a.exists() for a in asides)
    assert [a.name.split(".")[1] for a in asides] == ["earlier", "earlier", "stale", "earlier"]
    assert all(len(os.fsencode(a.name)) <= 255 for a in asides)
    assert asides[0].name.endswith(".X") and asides[3].name.endswith("..earlier.X")
    assert os.listdir(stage) == [".earlier.X"]
