"""Contracts of today's mends of the output set writers (2026-12-07).

Mended: while replacing an output ``X``, the set writers (:func:`cyclereg.checkpoint.staged_outputs`,
:func:`cyclereg.checkpoint.staged_file_set`) put the earlier ``X`` aside under the fixed name ``.earlier.X`` (or
``.earlier.I.NAME`` for a long name) in the staging folder, where the staged new files lie under their own names:
a set holding both ``X`` and ``.earlier.X`` wrote the earlier ``X`` into ``.earlier.X`` and lost the new one. The
aside names are unique now (:func:`tempfile.mkstemp` in the staging folder, ``.KIND.XXXXXXXX.NAME``, the name cut
to 200 bytes as before).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import cyclereg.checkpoint as checkpoint
from cyclereg.checkpoint import atomic_write_text, staged_file_set, staged_outputs


def _texts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir()}


# ----------------------------------------------------------------------------- 1. aside names are collision-free
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
