"""Contracts of the top-level entry points (:mod:`cyclereg.api`), the automatic lung mask
(:mod:`cyclereg.keypoints.lungmask`) and the cloud evaluation / run loading / reporting functions of
:mod:`cyclereg.clouds.api` that a mutation audit (2026-12-07) found unpinned: which axis is axial and how
many voxels a radius in mm is on a rotated, anisotropic grid, where the volume border does not erode, the
strict thresholds, what each entry point passes on to the path it picks, and which run or fold a report
names."""

import json
import re
from pathlib import Path

import numpy as np
import torch
import pytest

from cyclereg.keypoints.lungmask import LungMaskConfig, axial_axis, body_mask, lung_mask

TISSUE, AIR, OUTSIDE = 0.0, -900.0, -1000.0
PLAIN = dict(min_component_ml=0.0, min_component_fraction=0.0, opening_mm=0.0, closing_mm=0.0)
"""No size limits, no opening or closing: the lung mask is exactly the air inside the body."""


# ----------------------------------------------------------------------------- lung mask
def test_axial_axis_is_the_array_axis_mostly_along_world_z_by_direction_not_by_spacing():
    # array axis 0: 2 mm along x and 1 mm along z (z share 1/3); array axis 2: 0.4 mm along y and 0.5 mm along
    # z (z share 5/9): axis 2 points more along z although axis 0 moves farther in z per voxel
    affine = np.eye(4)
    affine[:3, :3] = [[2.0, 0.0, 0.0], [0.0, 1.0, -0.4], [1.0, 0.0, 0.5]]
    assert axial_axis(affine) == 2
    permuted = np.zeros((4, 4))
    permuted[[1, 2, 0, 3], [0, 1, 2, 3]] = [0.6, 2.5, 1.0, 1.0]  # axis 0 -> y, axis 1 -> z, axis 2 -> x
    assert axial_axis(permuted) == 1


def _pockets(shape, pockets, body=(2, -2)):
    """A CT of ``shape``: tissue in a box ``body`` (index range along axes 0 and 2, every slice along axis 1),
    outside air elsewhere, and air in each of ``pockets`` (tuples of three slices)."""
    ct = np.full(shape, OUTSIDE, dtype=np.float32)
    lo, hi = body
    ct[lo:hi, :, lo:hi] = TISSUE
    for pocket in pockets:
        ct[pocket] = AIR
    return ct


def test_a_rotated_anisotropic_grid_fills_along_its_axial_axis_and_opens_by_its_own_spacing():
    """Array axis 0 runs along world y at 0.6 mm, axis 1 along z at 2.5 mm (the axial axis), axis 2 along x at
    1 mm. Both air pockets span every axial slice: only slices across axis 1 enclose them in the body. An
    opening of 1 mm is round(1/0.6) = 2 voxels along axis 0 (a box 5 wide), 0 along axis 1, 1 along axis 2: it
    removes the pocket 3 voxels thin along axis 0 and keeps the lung box exactly."""
    affine = np.zeros((4, 4))
    affine[[1, 2, 0, 3], [0, 1, 2, 3]] = [0.6, 2.5, 1.0, 1.0]
    lung = np.s_[5:15, :, 5:25]
    sheet = np.s_[18:21, :, 5:25]
    ct = _pockets((30, 6, 30), [lung, sheet])
    expected = np.zeros(ct.shape, dtype=bool)
    expected[lung] = True
    config = LungMaskConfig(max_components=2, min_component_ml=0.0, min_component_fraction=0.0,
                            opening_mm=1.0, closing_mm=0.0)
    assert np.array_equal(lung_mask(ct, affine, config), expected)
    # without the opening the thin pocket is lung-like air inside the body too
    expected[sheet] = True
    assert np.array_equal(lung_mask(ct, affine, LungMaskConfig(max_components=2, **PLAIN)), expected)
    # the filled body holds both pockets (filled across axis 1), and nothing outside the tissue box
    body = body_mask(ct, affine, LungMaskConfig())
    assert body[lung].all() and body[sheet].all() and not body[0].any() and not body[:, :, 29].any()


def test_the_volume_border_does_not_erode_a_lung_the_scan_cuts():
    """A lung cut by the first two axial slices of the scan (k = 0, 1): the opening's box may reach past the
    scan (outside counts as foreground), so the two slices are kept; inside the scan the same slab would be
    too thin for a box 3 voxels wide."""
    ct = np.full((30, 30, 8), OUTSIDE, dtype=np.float32)
    ct[2:-2, 2:-2, :] = TISSUE  # the body: in every axial slice (k) a tissue square around the air
    inner = ct.copy()
    ct[8:22, 8:22, 0:2] = AIR
    inner[8:22, 8:22, 3:5] = AIR
    cut = LungMaskConfig(max_components=1, min_component_ml=0.0, min_component_fraction=0.0, opening_mm=1.0,
                         closing_mm=0.0)
    mask = lung_mask(ct, np.eye(4), cut)
    assert int(mask.sum()) == 14 * 14 * 2 and mask[8:22, 8:22, 0:2].all()
    assert not lung_mask(inner, np.eye(4), cut).any()


def test_vessels_crossing_a_lung_along_any_axis_are_filled_into_the_mask():
    """A tissue rod along axis 2 through the whole lung is a hole only in slices across axis 2; one along axis 0
    only in slices across axis 0: both belong to the mask (hole filling along every axis, no closing)."""
    ct = _pockets((24, 24, 24), [np.s_[6:18, 6:18, 6:18]])
    ct[11, 11, :] = np.where(ct[11, 11, :] == AIR, TISSUE, ct[11, 11, :])  # the rod along axis 2
    ct[:, 8, 9] = np.where(ct[:, 8, 9] == AIR, TISSUE, ct[:, 8, 9])  # the rod along axis 0
    expected = np.zeros(ct.shape, dtype=bool)
    expected[6:18, 6:18, 6:18] = True
    assert np.array_equal(lung_mask(ct, np.eye(4), LungMaskConfig(max_components=1, **PLAIN)), expected)


def test_thresholds_are_strict_body_above_and_air_below():
    """The body is tissue *above* body_threshold_hu and lung air *below* air_threshold_hu: a value exactly at
    a threshold is neither."""
    lung = np.s_[8:16, 8:16, 8:16]
    ct = _pockets((24, 24, 24), [lung])
    config = LungMaskConfig(max_components=1, **PLAIN)
    assert int(lung_mask(ct, np.eye(4), config).sum()) == 512
    at_air = ct.copy()
    at_air[lung] = config.air_threshold_hu
    assert not lung_mask(at_air, np.eye(4), config).any()
    at_body = ct.copy()
    at_body[ct == TISSUE] = config.body_threshold_hu
    assert not body_mask(at_body, np.eye(4), config).any()
    assert not lung_mask(at_body, np.eye(4), config).any()


def test_a_component_of_exactly_the_minimum_fraction_is_kept():
    """min_component_fraction drops components *smaller* than that share of the largest: one of exactly half
    the largest stays at 0.5."""
    big, half = np.s_[4:8, 4:8, 4:8], np.s_[14:18, 14:18, 4:6]  # 64 and 32 voxels
    ct = _pockets((24, 24, 12), [big, half])
    both = dict(PLAIN, min_component_fraction=0.5)
    mask = lung_mask(ct, np.eye(4), LungMaskConfig(max_components=2, **both))
    assert int(mask.sum()) == 96 and mask[half].all()
    assert int(lung_mask(ct, np.eye(4), LungMaskConfig(max_components=2,
                                                       **dict(both, min_component_fraction=0.51))).sum()) == 64


def test_lung_mask_settings_are_checked_when_made():
    for kwargs, message in (({"max_components": 0}, "max_components must be a whole number >= 1, got 0"),
                            ({"min_component_fraction": 1.5}, "min_component_fraction must be in [0, 1], got 1.5"),
                            ({"min_component_fraction": -0.1}, "min_component_fraction must be in [0, 1], got -0.1"),
                            ({"opening_mm": -1.0}, "opening_mm must be >= 0, got -1.0"),
                            ({"closing_mm": float("inf")}, "closing_mm must be >= 0, got inf"),
                            ({"min_component_ml": float("nan")}, "min_component_ml must be >= 0, got nan")):
        with pytest.raises(ValueError, match=re.escape(message)):
            LungMaskConfig(**kwargs)
    LungMaskConfig(max_components=1, min_component_fraction=1.0, opening_mm=0.0, closing_mm=0.0, min_component_ml=0.0)


# ----------------------------------------------------------------------------- cyclereg.api: what reaches each path
def _spy(monkeypatch, module, name, calls, result=None, writes=None):
    """Replace ``module.name`` by a recorder of its arguments; ``writes(args, kwargs)`` makes its files."""
    import importlib

    def recorder(*args, **kwargs):
        calls.append((name, args, kwargs))
        if writes is not None:
            writes(args, kwargs)
        return result

    monkeypatch.setattr(importlib.import_module(module), name, recorder)


def _write_config(args, kwargs):
    out = Path(args[2])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"outputs": ["displacements.csv"], "spy": True}))


@pytest.fixture
def files(tmp_path):
    """Placeholder inputs (never read: the path functions are replaced by recorders)."""
    for name in ("f.csv", "m.csv", "q.csv", "f.nii.gz", "m.nii.gz", "ml.nii.gz", "ref.nii.gz", "img.nii.gz",
                 "ct.nii.gz", "mask.nii.gz", "pairs.csv", "model.pt"):
        (tmp_path / name).write_bytes(b"placeholder")
    return tmp_path


def test_keypoints_passes_every_value_to_the_path_it_picks(files, monkeypatch):
    from cyclereg import api
    from cyclereg.keypoints.api import pair_keypoint_config

    calls = []
    _spy(monkeypatch, "cyclereg.keypoints.api", "detect_keypoints_file", calls)
    _spy(monkeypatch, "cyclereg.keypoints.api", "build_keypoint_dataset", calls,
         result=files / "ds" / "dataset.json")
    assert api.keypoints(files / "ct.nii.gz", files / "k.csv", mask=files / "mask.nii.gz", lung_mask=True,
                         save_mask=files / "lung.nii.gz", sigma_mm=1.25, nms_radius_mm=3.5, threshold=1e-6,
                         max_points=77, fmt="npy", device="cpu", verbose=False) is None
    name, args, kwargs = calls.pop()
    assert name == "detect_keypoints_file" and args == (files / "ct.nii.gz", files / "k.csv")
    assert kwargs == dict(mask=files / "mask.nii.gz", lung_mask=True, save_mask=files / "lung.nii.gz", sigma_mm=1.25,
                          nms_radius_mm=3.5, threshold=1e-6, max_points=77, fmt="npy", device="cpu", verbose=False)
    summary = api.keypoints(None, files / "ds", pairs=files / "pairs.csv", lung_mask=True, sigma_mm=1.25,
                            nms_radius_mm=3.5, moving_nms_radius_mm=2.5, threshold=1e-6, max_points=77, folds=3,
                            device="cpu", verbose=False)
    name, args, kwargs = calls.pop()
    assert name == "build_keypoint_dataset" and args == (files / "pairs.csv", files / "ds")
    assert kwargs == dict(lung_mask=True, folds=3, device="cpu", verbose=False,
                          keypoints=pair_keypoint_config(sigma_mm=1.25, nms_radius_mm=3.5, moving_nms_radius_mm=2.5,
                                                         threshold=1e-6, max_points=77))
    assert kwargs["keypoints"].fixed.nms_radius_mm == 3.5 and kwargs["keypoints"].moving.nms_radius_mm == 2.5
    assert summary == f"wrote {files / 'ds' / 'dataset.json'} (keypoints in {files / 'ds' / 'keypoints'})"


def test_register_passes_every_value_to_the_path_it_picks(files, monkeypatch):
    from cyclereg import api

    calls = []
    for module, name in (("cyclereg.clouds.api", "register_cloud_files"),
                         ("cyclereg.clouds.api", "register_volumes_via_keypoints"),
                         ("cyclereg.dense.api", "register_volume_files")):
        _spy(monkeypatch, module, name, calls, result=f"summary of {name}", writes=_write_config)
    f = files
    result = api.register(f / "f.csv", f / "m.csv", f / "o1", query=f / "q.csv",
                          reference=f / "ref.nii.gz", moving_image=f / "img.nii.gz", moving_labels=f / "ml.nii.gz",
                          recentre_passes=2, tta_passes=3, ensemble_fusion="average", disp_mm=True, spread=False,
                          spread_map=True, jacobian=True, device="cpu")
    name, args, kwargs = calls.pop()
    assert name == "register_cloud_files" and args == (f / "f.csv", f / "m.csv", f / "o1")
    assert kwargs == dict(model="random", seed=0, query=f / "q.csv", spacing=None, device="cpu",
                          recentre_passes=2, tta_passes=3, ensemble_fusion="average", reference=f / "ref.nii.gz",
                          moving_image=f / "img.nii.gz", moving_labels=f / "ml.nii.gz", disp_mm=True, spread=False,
                          spread_map=True, jacobian=True, verbose=True)
    assert result.summary == "summary of register_cloud_files" and result.files == ("displacements.csv",)
    assert result.record["spy"] is True and result.out_dir == f / "o1"
    # --spacing goes without --reference (with it: refused before any file check)
    api.register(f / "f.csv", f / "m.csv", f / "o1", spacing="1,2,3", device="cpu")
    name, args, kwargs = calls.pop()
    assert name == "register_cloud_files" and kwargs["spacing"] == "1,2,3" and kwargs["reference"] is None

    api.register(f / "f.nii.gz", f / "m.nii.gz", f / "o2", model=f / "model.pt", via_keypoints=True,
                 lung_mask=True, query=f / "q.csv", moving_labels=f / "ml.nii.gz", recentre_passes=2,
                 tta_passes=3, ensemble_fusion="average", disp_mm=True, spread=True, spread_map=True,
                 jacobian=True, device="cpu", verbose=False)
    name, args, kwargs = calls.pop()
    assert name == "register_volumes_via_keypoints" and args == (f / "f.nii.gz", f / "m.nii.gz", f / "o2")
    assert kwargs == dict(model=str(f / "model.pt"), seed=0, lung_mask=True, query=f / "q.csv", device="cpu",
                          recentre_passes=2, tta_passes=3, ensemble_fusion="average",
                          moving_labels=f / "ml.nii.gz", disp_mm=True, spread=True, spread_map=True, jacobian=True,
                          verbose=False)

    api.register(f / "f.nii.gz", f / "m.nii.gz", f / "o3", seed=5, moving_labels=f / "ml.nii.gz", warps=4,
                 adam=False, ic=True, disp_mm=True, l2r_name=True, resample_moving=True, jacobian=True, device="cpu",
                 verbose=False)
    name, args, kwargs = calls.pop()
    assert name == "register_volume_files" and args == (f / "f.nii.gz", f / "m.nii.gz", f / "o3")
    assert kwargs == dict(model="random", seed=5, moving_labels=f / "ml.nii.gz", warps=4, adam=False, ic=True,
                          disp_mm=True, l2r_name=True, device="cpu", resample_moving=True, jacobian=True,
                          verbose=False)
    assert not calls


def test_register_names_the_cloud_and_the_volume_of_a_mixed_pair(files):
    from cyclereg import api
    from cyclereg.errors import InputError

    for fixed, moving in (("f.csv", "m.nii.gz"), ("f.nii.gz", "m.csv")):
        cloud, volume = (fixed, moving) if fixed.endswith(".csv") else (moving, fixed)
        with pytest.raises(InputError, match=re.escape(f"{files / cloud}: a point cloud, but {files / volume} is a "
                                                       "volume (NIfTI)")):
            api.register(files / fixed, files / moving, files / "out")


def _keypoint_dataset(folder):
    ds = folder / "dataset.json"
    ds.write_text(json.dumps({"pairs": [{"id": "c0", "fixed_keypoints": "f.csv", "moving_keypoints": "m.csv",
                                         "fixed_landmarks": "q.csv", "moving_landmarks": "q.csv"}],
                              "folds": [["c0"]]}))
    return ds


def _write_report(args, kwargs):
    Path(args[1]).write_text(json.dumps({"spy": True}))


def test_evaluate_passes_every_value_to_the_path_it_picks(files, monkeypatch):
    from cyclereg import api

    calls = []
    _spy(monkeypatch, "cyclereg.clouds.api", "evaluate_keypoint_dataset", calls, writes=_write_report)
    _spy(monkeypatch, "cyclereg.dense.api", "evaluate_volume_dataset", calls, writes=_write_report)
    run = files / "run"
    run.mkdir()
    ds = _keypoint_dataset(files)
    assert api.evaluate(ds, files / "r.json", run=run, stage=2, max_pairs=4, recentre_passes=2, tta_passes=3,
                        ensemble_fusion="average", errors_csv=files / "e.csv", spread=True, folds=1,
                        device="cpu") == {"spy": True}
    name, args, kwargs = calls.pop()
    assert name == "evaluate_keypoint_dataset" and args == (ds, files / "r.json")
    assert kwargs == dict(identity=False, model=None, run=run, stage=2, seed=0, max_pairs=4, recentre_passes=2,
                          tta_passes=3, ensemble_fusion="average", device="cpu", spread=True,
                          errors_csv=files / "e.csv", folds="1")
    api.evaluate(ds, files / "r.json", model="random", seed=7, device="cpu")
    assert calls.pop()[2]["seed"] == 7
    volumes = files / "l2r.json"
    volumes.write_text(json.dumps({"registration_val": [], "training": []}))
    api.evaluate(volumes, files / "r.json", run=run, stage=0, max_pairs=4, warps=2, adam=False, ic=True,
                 both_directions=True, resume=True, device="cpu")
    name, args, kwargs = calls.pop()
    assert name == "evaluate_volume_dataset" and args == (volumes, files / "r.json")
    assert kwargs == dict(identity=False, model=None, run=run, stage=0, seed=0, max_pairs=4, warps=2, adam=False,
                          ic=True, device="cpu", both_directions=True, resume=True)
    assert not calls


def test_evaluate_never_writes_its_report_over_a_landmark_file_of_the_keypoint_dataset(files):
    from cyclereg import api
    from cyclereg.errors import InputError

    ds = _keypoint_dataset(files)
    (files / "ml.csv").write_text("x_mm,y_mm,z_mm\n1,2,3\n")
    obj = json.loads(ds.read_text())
    obj["pairs"][0]["moving_landmarks"] = "ml.csv"
    ds.write_text(json.dumps(obj))
    for flag, kwargs in (("--json", {"report": files / "ml.csv"}),
                         ("--errors-csv", {"report": files / "r.json", "errors_csv": files / "ml.csv"})):
        with pytest.raises(InputError, match=re.escape(f"{flag}: this is also the moving landmarks of pair c0 in "
                                                       "the dataset; write it elsewhere")):
            api.evaluate(ds, identity=True, **kwargs)
    assert (files / "ml.csv").read_text() == "x_mm,y_mm,z_mm\n1,2,3\n" and not (files / "r.json").exists()


def test_a_folder_is_no_input_file_and_a_file_is_no_run_directory(files):
    from cyclereg import api
    from cyclereg.errors import InputError

    (files / "adir").mkdir()
    with pytest.raises(InputError, match="is not a regular file") as err:
        api.register(files / "adir", files / "m.csv", files / "out")
    assert str(files / "adir") in str(err.value) and not (files / "out").exists()
    ds = _keypoint_dataset(files)
    with pytest.raises(InputError, match=re.escape("is not a folder (a run directory is)")) as err:
        api.evaluate(ds, files / "r.json", run=files / "model.pt")
    assert str(files / "model.pt") in str(err.value) and not (files / "r.json").exists()


# ----------------------------------------------------------------------------- cloud evaluation: what a report names
def _cloud_checkpoint(path, seed=1, **extra):
    """A cloud checkpoint of a random network (default settings); ``extra`` goes into its ``extra``."""
    from cyclereg.checkpoint import save_checkpoint
    from cyclereg.clouds.features import build_graph_net
    from cyclereg.clouds.pipeline import CloudRegConfig

    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = CloudRegConfig()
    save_checkpoint(path, kind="cloud", config=cfg, state_dict=build_graph_net(cfg.net, seed=seed).state_dict(),
                    extra=extra)
    return path


@pytest.fixture
def known(tmp_path, monkeypatch):
    """The two-pair dataset of test_evaluation_contracts (folds [c0], [c1]) whose every registration is
    half the true motion (no network runs): ``(tmp_path, dataset.json)``."""
    from test_evaluation_contracts import _register_with, _true_field, _write_dataset

    ds = _write_dataset(tmp_path)
    _register_with(monkeypatch, lambda x: 0.5 * _true_field(x))
    return tmp_path, ds


def test_the_report_names_the_seed_only_of_a_random_network_and_the_stage_a_checkpoint_holds(known):
    from cyclereg.checkpoint import file_sha256
    from cyclereg.clouds.api import evaluate_keypoint_dataset

    folder, ds = known
    r = evaluate_keypoint_dataset(ds, folder / "r.json", model="random", seed=4, device="cpu", quiet=True)
    assert r["seed"] == 4 and r["method"] == "model:random" and r["checkpoints"] == {}
    ckpt = _cloud_checkpoint(folder / "m.pt", stage=5)
    r = evaluate_keypoint_dataset(ds, folder / "r.json", model=str(ckpt), device="cpu", quiet=True, tta_passes=2,
                                  folds="2")
    entry = dict(r["checkpoints"]["all"])
    assert entry.pop("config") == r["config"]  # one model: its configuration is the report's
    assert r["seed"] is None and list(r["checkpoints"]) == ["all"] and entry == {"path": str(ckpt),
                                                                                 "sha256": file_sha256(ckpt), "stage": 5}
    assert r["method"] == f"model:{ckpt} (fold 2 only) (tta_passes=2)" and r["folds"] == [2]
    _cloud_checkpoint(folder / "s.pt", stage="5")  # not a stage number: recorded as none
    r = evaluate_keypoint_dataset(ds, folder / "r.json", model=str(folder / "s.pt"), device="cpu", quiet=True)
    assert r["checkpoints"]["all"]["stage"] is None
    r = evaluate_keypoint_dataset(ds, folder / "r.json", identity=True, device="cpu", quiet=True)
    assert r["seed"] is None and r["method"] == "identity" and r["folds"] == "all"


def test_a_run_is_named_with_its_stage_and_each_fold_with_its_own_checkpoint(known):
    from cyclereg.clouds.api import evaluate_keypoint_dataset

    folder, ds = known
    run = folder / "run"
    for k in (1, 2):
        _cloud_checkpoint(run / f"fold{k}" / "stage2.pt", seed=k, stage=2)
    r = evaluate_keypoint_dataset(ds, folder / "r.json", run=run, stage=2, device="cpu", quiet=True)
    assert r["method"] == f"run:{run}:stage2"
    assert {k: (v["path"], v["stage"]) for k, v in r["checkpoints"].items()} == {
        "1": (str(run / "fold1" / "stage2.pt"), 2), "2": (str(run / "fold2" / "stage2.pt"), 2)}


def test_the_errors_csv_of_a_dataset_without_folds_says_fold_0(known):
    from cyclereg.clouds.api import evaluate_keypoint_dataset

    folder, ds = known
    obj = json.loads(ds.read_text())
    del obj["folds"]
    ds.write_text(json.dumps(obj))
    evaluate_keypoint_dataset(ds, folder / "r.json", identity=True, device="cpu", quiet=True,
                              errors_csv=folder / "e.csv")
    rows = [line.split(",") for line in (folder / "e.csv").read_text().splitlines()[1:]]
    assert len(rows) == 24 and {r[1] for r in rows} == {"0"}


def test_the_identity_on_a_volume_grid_has_smoothness_zero(known):
    """The identity's field is zero: J = 1 everywhere, so SDlogJ, std(log J) and the folding fraction are 0."""
    from cyclereg.clouds.api import evaluate_keypoint_dataset

    folder, ds = known
    obj = json.loads(ds.read_text())
    ds.write_text(json.dumps({**obj, "volume_shape_zyx": [12, 12, 40], "spacing_zyx_mm": [2.0, 2.0, 2.0]}))
    r = evaluate_keypoint_dataset(ds, folder / "r.json", identity=True, device="cpu", quiet=True)
    assert [(c["sdlogj"], c["std_logj"], c["folding_fraction"]) for c in r["cases"]] == [(0.0, 0.0, 0.0)] * 2
    assert (r["mean_sdlogj"], r["mean_std_logj"], r["mean_folding_fraction"]) == (0.0, 0.0, 0.0)


def test_a_folds_final_checkpoint_comes_before_an_exported_one_and_missing_stages_are_named(tmp_path):
    from cyclereg.clouds.api import fold_checkpoint
    from cyclereg.errors import InputError

    run = tmp_path / "run"
    _cloud_checkpoint(run / "fold1.pt")
    assert fold_checkpoint(run, 1) == run / "fold1.pt"
    _cloud_checkpoint(run / "fold1" / "final.pt")
    assert fold_checkpoint(run, 1) == run / "fold1" / "final.pt"
    _cloud_checkpoint(run / "fold1" / "stage1.pt")
    _cloud_checkpoint(run / "fold1" / "stage3.pt")
    assert fold_checkpoint(run, 1, stage=3) == run / "fold1" / "stage3.pt"
    with pytest.raises(InputError, match=re.escape("no checkpoint for fold 1 (expected fold1/stage2.pt) (this fold "
                                                   "has the checkpoints of stage(s) 1, 3)")):
        fold_checkpoint(run, 1, stage=2)
    with pytest.raises(InputError, match=re.escape("no checkpoint for fold 2 (expected fold2/final.pt or fold2.pt)")):
        fold_checkpoint(run, 2)
    (run / "run.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(InputError, match=re.escape("(expected fold2/stage1.pt) (this fold has no trained stage yet)")):
        fold_checkpoint(run, 2, stage=1)
    (run / "run.json").unlink()
    with pytest.raises(InputError, match="this folder keeps no per-stage checkpoints"):
        fold_checkpoint(run, 2, stage=1)


def test_a_model_set_records_which_pairs_each_fold_held_out(known):
    """A folder of exported models (scripts/run_model_set.py) keeps its source run's record in model_set.json:
    a pair the dataset puts in another fold than the run held it out in is refused, as with run.json."""
    from cyclereg.clouds.api import evaluate_keypoint_dataset, run_held_out_pairs
    from cyclereg.errors import InputError

    folder, ds = known
    models = folder / "models"
    for k in (1, 2):
        _cloud_checkpoint(models / f"fold{k}.pt", seed=k)
    (models / "model_set.json").write_text(json.dumps(
        {"training": {"runs/a": {"pairs": ["c0", "c1"], "folds": [["c1"], ["c0"]]}}}))
    assert run_held_out_pairs(models) == [["c1"], ["c0"]]
    with pytest.raises(InputError, match="pair c0 is in fold 1 of the dataset, but fold 1 of this run held out c1"):
        evaluate_keypoint_dataset(ds, folder / "r.json", run=models, device="cpu", quiet=True)
    assert not (folder / "r.json").exists()


def test_ensemble_members_with_a_different_number_of_folds_are_refused(tmp_path):
    from cyclereg.clouds.api import run_held_out_pairs
    from cyclereg.errors import InputError

    (tmp_path / "ensemble.json").write_text(json.dumps({"training": {
        "runs/a": {"pairs": ["c0", "c1", "c2"], "folds": [["c0"], ["c1"]]},
        "runs/b": {"pairs": ["c0", "c1", "c2"], "folds": [["c0"], ["c1"], ["c2"]]}}}))
    with pytest.raises(InputError, match="the runs of this ensemble's members have different folds"):
        run_held_out_pairs(tmp_path)


def test_a_dataset_fold_beyond_the_runs_folds_is_refused_naming_it(known):
    from cyclereg.clouds.api import evaluate_keypoint_dataset
    from cyclereg.errors import InputError

    folder, ds = known
    run = folder / "run"
    for k in (1, 2):
        _cloud_checkpoint(run / f"fold{k}.pt", seed=k)
    (run / "run.json").write_text(json.dumps({"pairs": ["c0", "c1"], "folds": [["c0", "c1"]], "config": {}}))
    with pytest.raises(InputError, match=re.escape("pair c1 is in fold 2 of the dataset, but fold 2 of this run held "
                                                   "out nothing (the run has fewer folds)")):
        evaluate_keypoint_dataset(ds, folder / "r.json", run=run, device="cpu", quiet=True)


def test_options_a_single_network_or_a_foldless_dataset_cannot_serve_are_refused(known):
    from cyclereg.clouds.api import evaluate_keypoint_dataset, load_cloud_model
    from cyclereg.errors import InputError

    folder, ds = known
    ckpt = _cloud_checkpoint(folder / "m.pt")
    with pytest.raises(InputError, match="--spread needs ensemble models"):
        evaluate_keypoint_dataset(ds, folder / "r.json", model=str(ckpt), spread=True, device="cpu", quiet=True)
    with pytest.raises(InputError, match="--ensemble-fusion needs an ensemble model"):
        load_cloud_model(ckpt, ensemble_fusion="average")
    with pytest.raises(InputError, match=re.escape("--ensemble-fusion 'mean': expected one of")):
        load_cloud_model("random", ensemble_fusion="mean")
    with pytest.raises(InputError, match="--stage needs --run"):
        evaluate_keypoint_dataset(ds, folder / "r.json", model=str(ckpt), stage=1, device="cpu", quiet=True)
    _, config = load_cloud_model(ckpt, recentre_passes=3, tta_passes=0)
    assert (config.recentre_passes, config.tta_passes) == (3, 0)  # the stored ones are (0, 0)
    _, config = load_cloud_model(ckpt, recentre_passes=0, tta_passes=2)
    assert (config.recentre_passes, config.tta_passes) == (0, 2)
    obj = json.loads(ds.read_text())
    del obj["folds"]
    ds.write_text(json.dumps(obj))
    (folder / "run").mkdir()
    with pytest.raises(InputError, match="--run needs a dataset with folds"):
        evaluate_keypoint_dataset(ds, folder / "r.json", run=folder / "run", device="cpu", quiet=True)
    assert not (folder / "r.json").exists()


def test_demo_reports_its_error_against_the_known_motion_and_writes_it(tmp_path, monkeypatch):
    """A registration that recovers half of the synthetic motion: the error before is |u_true| at each fixed
    keypoint, the error after exactly half of it; the files hold the clouds, the prediction and the truth."""
    from types import SimpleNamespace

    import cyclereg.clouds.api as clouds_api
    import cyclereg.clouds.synthetic as synthetic
    from cyclereg.pointio import read_points

    from conftest import SMALL_BREATHING

    pair = synthetic.make_breathing_pair(3, SMALL_BREATHING)  # the demo's pair, smaller
    monkeypatch.setattr(synthetic, "make_breathing_pair", lambda seed: pair if seed == 3 else None)

    registered = []

    def half(fixed_mm, moving_mm, net, config, **kwargs):
        registered.extend([fixed_mm, moving_mm])
        return SimpleNamespace(displacements_mm=0.5 * pair.displacement_mm)

    monkeypatch.setattr(clouds_api, "register_clouds", half)
    result = clouds_api.run_demo(tmp_path / "demo", seed=3, device="cpu")
    true = pair.displacement_mm.norm(dim=1)
    assert result["seed"] == 3
    assert result["error_before_mm"]["mean"] == pytest.approx(float(true.mean()), rel=1e-5)
    assert result["error_after_mm"]["mean"] == pytest.approx(0.5 * float(true.mean()), rel=1e-5)
    assert result["error_after_mm"]["p50"] == pytest.approx(0.5 * result["error_before_mm"]["p50"], rel=1e-5)
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["error_after_mm"]["mean"] == pytest.approx(
        result["error_after_mm"]["mean"])
    torch.testing.assert_close(read_points(tmp_path / "demo" / "fixed.csv"), pair.fixed_mm, atol=1e-3, rtol=0)
    torch.testing.assert_close(read_points(tmp_path / "demo" / "moving.csv"), pair.moving_mm, atol=1e-3, rtol=0)
    # the clouds registered are those the files hold (4 decimals), so that `register` of the files repeats it
    assert torch.equal(registered[0], read_points(tmp_path / "demo" / "fixed.csv"))
    assert torch.equal(registered[1], read_points(tmp_path / "demo" / "moving.csv"))
    lines = (tmp_path / "demo" / "displacements.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header == ["x_mm", "y_mm", "z_mm", "dx_mm", "dy_mm", "dz_mm", "true_dx_mm", "true_dy_mm", "true_dz_mm"]
    values = torch.tensor([[float(v) for v in line.split(",")] for line in lines[1:]])
    torch.testing.assert_close(values[:, 3:6], 0.5 * pair.displacement_mm, atol=1e-3, rtol=0)
    torch.testing.assert_close(values[:, 6:9], pair.displacement_mm, atol=1e-3, rtol=0)


def test_a_pair_counts_as_trained_on_only_when_both_its_clouds_were_and_names_every_holder(tmp_path):
    """training_matches: by content, in either role; a pair one of whose clouds the model never saw is held out;
    the training pairs named are those holding either cloud."""
    from cyclereg.checkpoint import data_fingerprint
    from cyclereg.clouds.api import pairs_in_training, training_matches
    from cyclereg.datasets import KeypointPair

    for name, text in (("a", "1,2,3\n"), ("b", "4,5,6\n"), ("c", "7,8,9\n"), ("d", "0,0,1\n"), ("a2", "1,2,3\n")):
        (tmp_path / f"{name}.csv").write_text(text)
    fp = {name: data_fingerprint(tmp_path / f"{name}.csv") for name in "abcd"}
    record = {"dataset": "train", "fold": 1, "pairs": {"t1": {"fixed": fp["a"], "moving": fp["b"]},
                                                        "t2": {"fixed": fp["c"], "moving": fp["a"]}}}

    def pair(pid, fixed, moving):
        return KeypointPair(pid, tmp_path / f"{fixed}.csv", tmp_path / f"{moving}.csv", None, None)

    pairs = [pair("same", "a2", "b"), pair("reversed", "b", "c"), pair("half", "a", "d"), pair("new", "d", "d")]
    assert training_matches(pairs, record) == {"same": ["t1", "t2"], "reversed": ["t1", "t2"]}
    assert pairs_in_training(pairs, record) == {"same", "reversed"}
    assert training_matches(pairs, None) == {} and training_matches(pairs, {"dataset": "x"}) == {}


def test_a_run_fold_without_the_asked_stage_names_the_pair_and_the_folds_option(known):
    from cyclereg.clouds.api import evaluate_keypoint_dataset
    from cyclereg.errors import InputError

    folder, ds = known
    run = folder / "run"
    _cloud_checkpoint(run / "fold1" / "stage1.pt")
    (run / "run.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(InputError, match=re.escape("no checkpoint for fold 2 (expected fold2/stage1.pt) (this fold has "
                                                   "no trained stage yet) (pair c1 is in fold 2; --folds N evaluates "
                                                   "only the pairs of a fold the run has a checkpoint for)")):
        evaluate_keypoint_dataset(ds, folder / "r.json", run=run, stage=1, device="cpu", quiet=True)


def test_a_models_training_pairs_are_named_in_the_report(known):
    """A checkpoint that records c0's keypoint files among its training data: the report lists c0 in
    pairs_in_training and marks that case (and only it) in_training."""
    from cyclereg.checkpoint import data_fingerprint, training_record
    from cyclereg.clouds.api import evaluate_keypoint_dataset

    folder, ds = known
    seen = {"fixed": data_fingerprint(folder / "c0" / "fixed_keypoints.csv"),
            "moving": data_fingerprint(folder / "c0" / "moving_keypoints.csv")}
    ckpt = _cloud_checkpoint(folder / "m.pt", training=training_record("other", 1, pairs={"x0": seen}))
    r = evaluate_keypoint_dataset(ds, folder / "r.json", model=str(ckpt), device="cpu", quiet=True)
    assert r["pairs_in_training"] == ["c0"] and [c["in_training"] for c in r["cases"]] == [True, False]


def test_a_training_record_whose_pairs_are_no_list_is_refused_naming_its_file(known):
    from cyclereg.clouds.api import evaluate_keypoint_dataset
    from cyclereg.errors import InputError

    folder, ds = known
    run = folder / "run"
    for k in (1, 2):
        _cloud_checkpoint(run / f"fold{k}.pt", seed=k)
    (run / "run.json").write_text(json.dumps({"pairs": "c0 c1", "folds": [["c0"], ["c1"]], "config": {}}))
    with pytest.raises(InputError, match=re.escape("'pairs' of a training record should be a list of pair ids, got "
                                                   "'c0 c1'")) as err:
        evaluate_keypoint_dataset(ds, folder / "r.json", run=run, device="cpu", quiet=True)
    assert str(run / "run.json") in str(err.value) and not (folder / "r.json").exists()


def test_a_run_given_as_text_gets_the_same_missing_stage_message(known):
    from cyclereg.clouds.api import evaluate_keypoint_dataset
    from cyclereg.errors import InputError

    folder, ds = known
    run = folder / "run"
    _cloud_checkpoint(run / "fold1" / "stage1.pt")
    (run / "run.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(InputError, match=re.escape("(pair c1 is in fold 2; --folds N evaluates only")):
        evaluate_keypoint_dataset(str(ds), str(folder / "r.json"), run=str(run), stage=1, device="cpu", quiet=True)
