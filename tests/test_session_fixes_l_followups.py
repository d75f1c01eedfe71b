"""Contracts of today's follow-up mends (2026-12-07).

Mended: ``cyclereg register FIXED.csv MOVING.csv -o DIR`` (the point-file path,
:func:`cyclereg.clouds.api.register_cloud_files`) refused an output in DIR that is a looping symbolic link, a
folder where an output file goes, or one that would replace an input only when the set moved in, after the
registration had run; it refuses them now before its work (:func:`cyclereg.checkpoint.refuse_replacing_inputs`,
the same one-line messages), as the dense and the ``--via-keypoints`` paths do.

Mended: :func:`cyclereg.dense.similarity.mind_ssc` took any ``eps``: ``None`` (or a string) raised a bare
``TypeError`` from torch, NaN gave NaN descriptors and inf, 0 or a negative value garbage (all zero, or 0 / 0
on a flat image). It refuses a non-finite or non-positive ``eps`` with one line naming ``eps``, as
:func:`~cyclereg.dense.similarity.ncc_loss` does; a valid ``eps`` gives the same descriptors as before
(``mind_loss`` has no ``eps`` of its own: it uses the default).

Mended: ``python scripts/ensemble_stage.py ENSEMBLE ""`` (or ``"" OUT``, ``--dataset ""``, ``--learner ""``) read
the empty path as the current folder (``Path("")``) and wrote the new stage there; each is refused now in one line
``error: NAME: an empty path ...`` naming the argument, exit 1, nothing written
(:func:`cyclereg.errors.refuse_empty_paths`, as ``scripts/set_cloud_test_time.py`` does).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cyclereg.clouds.api as cloud_api
from cyclereg.dense.similarity import mind_ssc
from cyclereg_cli.main import app

from conftest import load_script
from test_scripts_walk import _fake_cloud_run, _outcome


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


# ----------------------------------------------------------------------------- 2. mind_ssc's eps
@pytest.mark.parametrize("eps", [None, float("nan"), float("inf"), -float("inf"), 0.0, 0, -1e-6, "1e-6", True])
def test_mind_ssc_refuses_an_eps_that_is_not_a_finite_positive_number(eps):
    with pytest.raises(ValueError, match=r"^eps: expected a finite constant > 0, got "):
        mind_ssc(torch.rand(1, 1, 5, 5, 5), eps=eps)


def test_mind_ssc_with_a_valid_eps_is_unchanged():
    """A flat image: every squared difference is 0, so each descriptor entry is exp(0) = 1 and the largest is 1
    (the mean variance is floored at eps), divided by max(1, eps); a NumPy eps works as its Python value; half
    precision too."""
    flat = torch.full((1, 1, 5, 6, 7), 3.0)
    for eps, value in ((1e-6, 1.0), (np.float32(1e-3), 1.0), (1, 1.0), (np.float64(2.0), 0.5), (4, 0.25)):
        assert torch.equal(mind_ssc(flat, eps=eps), torch.full((1, 12, 5, 6, 7), value))
    assert torch.equal(mind_ssc(flat.half(), eps=1e-6), torch.ones(1, 12, 5, 6, 7, dtype=torch.half))
    img = torch.rand(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mind_ssc(img, eps=np.float64(1e-6)), mind_ssc(img))


# ----------------------------------------------------------------------------- 3. ensemble_stage.py's paths
@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> Path:
    """``cyclereg ensemble`` of two keypoint runs of random networks (folds 1 and 2)."""
    d = tmp_path_factory.mktemp("ens")
    _fake_cloud_run(d / "ra")
    _fake_cloud_run(d / "rb", seed=100)
    res = CliRunner().invoke(app, ["ensemble", str(d / "ra"), str(d / "rb"), "-o", str(d / "e")])
    assert res.exit_code == 0, res.output
    return d / "e"


@pytest.mark.parametrize("name", ["ensemble", "out", "--dataset", "--learner"])
@pytest.mark.parametrize("empty", ["", "  "])
def test_ensemble_stage_refuses_an_empty_path_in_one_line(ensemble, tmp_path, monkeypatch, capsys, name, empty):
    mod = load_script("scripts/ensemble_stage.py")
    monkeypatch.setattr(mod, "run_parallel", lambda *a, **k: pytest.fail("no job may start"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # what an empty path stood for
    given = {"ensemble": str(ensemble), "out": str(tmp_path / "out")}
    if name in given:
        given[name] = empty
    argv = [given["ensemble"], given["out"], *([name, empty] if name.startswith("--") else [])]
    monkeypatch.setattr(sys, "argv", ["ensemble_stage.py", *argv])
    code, err = _outcome(mod.main, capsys)
    assert code == 1 and err == f"error: {name}: an empty path (an unset shell variable?); give '.' to mean the " \
                                 "current folder", err
    assert os.listdir(work) == [] and not (tmp_path / "out").exists()
