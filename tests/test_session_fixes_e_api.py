"""Contracts of three small mends of the evaluation and registration entry points (2026-12-07).

Mended: a stage asked for with ``--stage t`` of a run whose stage files were removed to save space (as
``carried-runs/abd4``) is its ``final.pt`` where that records stage ``t`` (:func:`cyclereg.api.stage_checkpoint`,
the one rule of :func:`cyclereg.dense.api.run_checkpoint` and :func:`cyclereg.clouds.api.fold_checkpoint`);
the report of :func:`cyclereg.clouds.api.evaluate_keypoint_dataset` names the ``--errors-csv`` file it wrote beside
it (``errors_csv``: its path from the report's folder); ``register`` on two point files names the options that do not go together
(``--moving-image`` / ``--moving-labels`` / ``--spread-map`` / ``--jacobian`` / ``--disp-mm`` without ``--reference``,
``--spacing`` with it) before any file check (:func:`cyclereg.api.refuse_cloud_option_pairs`, called first by
``register`` and by :func:`cyclereg.clouds.api.register_cloud_files`).
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
    with pytest.raises(InputError, match=re.escape("no checkpoint for fold 1 (expected fold1/stage4.pt) (this fold "
                                                   "keeps no per-stage checkpoints; its final.pt is stage 5's)")):
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
    (tmp_path / "csvs").mkdir()
    r = evaluate_keypoint_dataset(ds, out / "r1.json", identity=True, device="cpu", quiet=True,
                                  errors_csv=str(tmp_path / "csvs" / "e.csv"))
    assert r["errors_csv"] == "../csvs/e.csv"  # from the report's folder


@pytest.mark.parametrize("options, message", [
    ({"jacobian": True}, "--jacobian needs --reference (the grid to write it on)"),
    ({"spread_map": True}, "--spread-map needs --reference (the grid to write it on)"),
    ({"disp_mm": True}, "--disp-mm needs --reference: it sets the unit of the dense field"),
    ({"moving_image": "mi.nii.gz"}, "mi.nii.gz: --moving-image needs --reference (the grid to warp it onto)"),
    ({"moving_labels": "ml.nii.gz"}, "ml.nii.gz: --moving-labels needs --reference (the grid to warp it onto)"),
])
def test_register_names_an_option_that_needs_a_reference_before_any_file_check(tmp_path, options, message):
    """A missing moving file and a missing model: neither is named, the option conflict is; nothing is written."""
    from cyclereg.api import register

    (tmp_path / "f.csv").write_text("x,y,z\n0,0,0\n")
    for model in ("random", str(tmp_path / "no_model.pt")):
        with pytest.raises(InputError, match=re.escape(message)):
            register(tmp_path / "f.csv", tmp_path / "missing.csv", tmp_path / "out", model=model, verbose=False,
                     **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.csv"]


def test_register_cloud_files_names_spacing_with_a_reference_before_opening_a_file(tmp_path):
    from cyclereg.clouds.api import register_cloud_files

    missing = tmp_path / "missing.csv"
    with pytest.raises(InputError, match=re.escape("--spacing: not used with --reference")):
        register_cloud_files(missing, missing, tmp_path / "out", spacing="1,1,1", reference=tmp_path / "r.nii.gz")
    with pytest.raises(InputError, match=re.escape("--jacobian needs --reference")):
        register_cloud_files(missing, missing, tmp_path / "out", spacing="1,1,1", jacobian=True)
    assert not any(tmp_path.iterdir())


def test_volume_evaluate_of_a_registration_holding_nan_is_one_result_error(tmp_path, monkeypatch):
    """A registration that returns NaN displacements (e.g. a diverged model) inside ``evaluate`` on volumes:
    the one-line ResultError naming the fixed scan that ``register`` gives, no report (it was a ValueError of
    ``sdlogj`` deep in the scoring, a traceback at the command line)."""
    import numpy as np
    import torch

    import cyclereg.dense.api as dense_api
    from cyclereg.errors import ResultError
    from tests.test_nifti_geometry_walk import _single_voxel_dataset

    dataset = _single_voxel_dataset(tmp_path, np.eye(4), (6, 6, 6), (7, 6, 6))
    monkeypatch.setattr(dense_api, "register_pair",
                        lambda fv, mv, net, cfg, modality=None: torch.full((1, 3, *fv.shape), float("nan")))
    with pytest.raises(ResultError, match=r"G_0001_0000\.nii\.gz: the displacements hold NaN or inf"):
        dense_api.evaluate_volume_dataset(dataset, tmp_path / "r.json", model="random", device="cpu", figures=False)
    assert not (tmp_path / "r.json").exists()


def test_run_model_set_takes_a_trimmed_fold_final_checkpoint_for_its_stage(tmp_path):
    """``scripts/run_model_set.py RUN --stage 1`` of a run whose fold 2 kept only final.pt, which is stage 1's: the
    set holds that file for fold 2 (the one rule of stage_checkpoint), byte for byte."""
    from tests.conftest import load_script
    from tests.test_scripts_walk import _fake_cloud_run

    run = _fake_cloud_run(tmp_path / "run")
    (run / "fold2" / "stage1.pt").unlink()
    assert load_script("scripts/run_model_set.py").main([str(run), "-o", str(tmp_path / "set"), "--stage", "1"]) == 0
    assert (tmp_path / "set" / "fold2.pt").read_bytes() == (run / "fold2" / "final.pt").read_bytes()


def test_the_errors_csv_path_is_from_the_report_s_real_folder(tmp_path):
    """A report written through a linked folder: ``errors_csv`` leads from the folder the report really lies in
    (a path from the link's name pointed elsewhere once the link's target is another folder)."""
    import os

    ds = write_two_pair_dataset(tmp_path)
    (tmp_path / "deep" / "reports").mkdir(parents=True)
    (tmp_path / "csvs").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "deep" / "reports")
    r = evaluate_keypoint_dataset(ds, tmp_path / "latest" / "r.json", identity=True, device="cpu", quiet=True,
                                  errors_csv=str(tmp_path / "csvs" / "e.csv"))
    real_report_folder = tmp_path / "deep" / "reports"
    assert os.path.normpath(real_report_folder / r["errors_csv"]) == str(tmp_path / "csvs" / "e.csv")
