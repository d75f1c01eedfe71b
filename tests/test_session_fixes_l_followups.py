"""Contracts of today's follow-up mends (2026-12-07).

Mended: ``cyclereg register FIXED.csv MOVING.csv -o DIR`` (the point-file path,
:func:`cyclereg.clouds.api.register_cloud_files`) refused an output in DIR that is a looping symbolic link, a
folder where an output file goes, or one that would replace an input only when the set moved in, after the
registration had run; it refuses them now before its work (:func:`cyclereg.checkpoint.refuse_replacing_inputs`,
the same one-line messages), as the dense and the ``--via-keypoints`` paths do.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cyclereg.clouds.api as cloud_api
from cyclereg_cli.main import app


def _listing(folder: Path) -> dict[str, str]:
    """Each entry of ``folder``: a link's target, a folder's mark, or a file's text."""
    out = {}
    for p in sorted(folder.iterdir()):
        out[p.name] = ("link " + os.readlink(p)) if p.is_symlink() else "folder" if p.is_dir() else p.read_text()
    return out


# ----------------------------------------------------------------------------- 1. register's point-file path
@pytest.mark.parametrize("case, fragment", [
    ("loop", "out/displacements.csv: is a symbolic link that loops"),
    ("folder", "out/config.json: is a folder; an output file is needed here (nothing was written)"),
    ("link to input", "f.csv: an input of this command, which its output displacements.csv would replace in"),
    ("input in DIR", "out/displacements.csv: an input of this command, which its output displacements.csv would "
                     "replace in"),
])
def test_register_point_files_refuses_bad_outputs_before_its_work(pair_files, monkeypatch, case, fragment):
    d, _ = pair_files
    out = d / "out"
    out.mkdir()
    fixed = d / "f.csv"
    if case == "loop":
        (out / "displacements.csv").symlink_to("displacements.csv")
    elif case == "folder":
        (out / "config.json").mkdir()
    elif case == "link to input":
        (out / "displacements.csv").symlink_to(fixed)
    else:
        fixed = out / "displacements.csv"
        shutil.copy(d / "f.csv", fixed)
    before = _listing(out)

    def no_work(*args, **kwargs):
        raise AssertionError("the registration ran before the outputs were checked")

    monkeypatch.setattr(cloud_api, "register_clouds", no_work)
    monkeypatch.setattr(cloud_api, "load_cloud_model", no_work)
    res = CliRunner().invoke(app, ["register", str(fixed), str(d / "m.csv"), "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert fragment in " ".join(res.output.split()) and "Traceback" not in res.output
    assert _listing(out) == before
