"""Contracts of three small mends of the evaluation and registration entry points (2026-12-07).

Mended: a stage asked for with ``--stage t`` of a run whose stage files were removed to save space (as
``carried-runs/abd4``) is its ``final.pt`` where that records stage ``t`` (:func:`cyclereg.api.stage_checkpoint`,
the one rule of :func:`cyclereg.dense.api.run_checkpoint` and :func:`cyclereg.clouds.api.fold_checkpoint`);
the report of :func:`cyclereg.clouds.api.evaluate_keypoint_dataset` names the ``--errors-csv`` file it wrote beside
it (``errors_csv``: its file name).
"""

from __future__ import annotations

import json
import re

import pytest

from cyclereg.checkpoint import save_checkpoint
from cyclereg.clouds.api import evaluate_keypoint_dataset, fold_checkpoint
from cyclereg.dense.api import run_checkpoint
from cyclereg.errors import InputError
from tests.conftest import write_two_pair_dataset


def _checkpoint(path, kind, **extra):
    """A checkpoint file of ``kind`` whose ``extra`` is ``extra`` (no network: only the stage is read here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, kind=kind, config={}, state_dict={}, extra=extra)
    return path


def _cloud_checkpoint(path, **extra):
    """A cloud checkpoint of a random network (default settings) whose ``extra`` is ``extra``."""
    from cyclereg.clouds.features import build_graph_net
    from cyclereg.clouds.pipeline import CloudRegConfig

    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = CloudRegConfig()
    save_checkpoint(path, kind="cloud", config=cfg, state_dict=build_graph_net(cfg.net, seed=1).state_dict(),
                    extra=extra)
    return path


def test_a_volume_run_trimmed_to_its_final_checkpoint_gives_that_stage(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"config": {}}))
    final = _checkpoint(tmp_path / "all" / "final.pt", "dense", stage=4)
    assert run_checkpoint(tmp_path, 4) == final
    assert run_checkpoint(tmp_path) == final
    with pytest.raises(InputError, match=re.escape(f"{tmp_path}: no checkpoint of stage 3")):
        run_checkpoint(tmp_path, 3)
    own = _checkpoint(tmp_path / "all" / "stage4.pt", "dense", stage=4)  # a stage's own file comes first
    assert run_checkpoint(tmp_path, 4) == own


def test_a_keypoint_fold_trimmed_to_its_final_checkpoint_gives_that_stage(tmp_path):
    final = _checkpoint(tmp_path / "fold1" / "final.pt", "cloud", stage=5)
    assert fold_checkpoint(tmp_path, 1, stage=5) == final
    with pytest.raises(InputError, match=re.escape("no checkpoint for fold 1 (expected fold1/stage4.pt)")):
        fold_checkpoint(tmp_path, 1, stage=4)
    own = _checkpoint(tmp_path / "fold1" / "stage5.pt", "cloud", stage=5)
    assert fold_checkpoint(tmp_path, 1, stage=5) == own


def test_an_unreadable_final_checkpoint_is_no_stage(tmp_path):
    from cyclereg.api import stage_checkpoint

    (tmp_path / "final.pt").write_bytes(b"not a checkpoint")
    assert stage_checkpoint(tmp_path, 2) is None


def test_evaluate_with_the_stage_of_a_trimmed_keypoint_run_names_the_stage(tmp_path):
    ds = write_two_pair_dataset(tmp_path)
    run = tmp_path / "run"
    final = _cloud_checkpoint(run / "fold1" / "final.pt", stage=2)
    (run / "run.json").write_text(json.dumps({"pairs": ["c0", "c1"], "folds": [["c0"], ["c1"]], "config": {}}))
    r = evaluate_keypoint_dataset(ds, tmp_path / "r.json", run=run, stage=2, folds="1", device="cpu", quiet=True)
    assert r["method"] == f"run:{run}:stage2 (fold 1 only)"
    assert r["checkpoints"]["1"]["path"] == str(final) and r["checkpoints"]["1"]["stage"] == 2


def test_the_keypoint_report_names_its_errors_csv(tmp_path):
    ds = write_two_pair_dataset(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    r = evaluate_keypoint_dataset(ds, out / "r.json", identity=True, device="cpu", quiet=True,
                                  errors_csv=str(out / "e.csv"))
    assert r["errors_csv"] == "e.csv" and json.loads((out / "r.json").read_text())["errors_csv"] == "e.csv"
    assert (out / "e.csv").read_text().startswith("pair,fold,landmark,before_mm,after_mm\n")
    r = evaluate_keypoint_dataset(ds, out / "r0.json", identity=True, device="cpu", quiet=True)
    assert "errors_csv" not in r  # no file, no name
