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
    for kwargs, message in (({"max_components": 0}, "max_components must be >= 1, got 0"),
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
    result = api.register(f / "f.csv", f / "m.csv", f / "o1", query=f / "q.csv", spacing="1,2,3",
                          reference=f / "ref.nii.gz", moving_image=f / "img.nii.gz", moving_labels=f / "ml.nii.gz",
                          recentre_passes=2, tta_passes=3, ensemble_fusion="average", disp_mm=True, spread=False,
                          spread_map=True, jacobian=True, device="cpu")
    name, args, kwargs = calls.pop()
    assert name == "register_cloud_files" and args == (f / "f.csv", f / "m.csv", f / "o1")
    assert kwargs == dict(model="random", seed=0, query=f / "q.csv", spacing="1,2,3", device="cpu",
                          recentre_passes=2, tta_passes=3, ensemble_fusion="average", reference=f / "ref.nii.gz",
                          moving_image=f / "img.nii.gz", moving_labels=f / "ml.nii.gz", disp_mm=True, spread=False,
                          spread_map=True, jacobian=True)
    assert result.summary == "summary of register_cloud_files" and result.files == ("displacements.csv",)
    assert result.record["spy"] is True and result.out_dir == f / "o1"

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
                 adam=False, ic=True, disp_mm=True, l2r_name=True, resample_moving=True, jacobian=True, device="cpu")
    name, args, kwargs = calls.pop()
    assert name == "register_volume_files" and args == (f / "f.nii.gz", f / "m.nii.gz", f / "o3")
    assert kwargs == dict(model="random", seed=5, moving_labels=f / "ml.nii.gz", warps=4, adam=False, ic=True,
                          disp_mm=True, l2r_name=True, device="cpu", resample_moving=True, jacobian=True)
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
