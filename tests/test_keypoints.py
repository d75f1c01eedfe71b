"""Tests of the Foerstner detector, the automatic lung mask and ``cyclereg keypoints``."""

from __future__ import annotations

import json
from dataclasses import replace
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from typer.testing import CliRunner

from cyclereg.keypoints import FoerstnerConfig, LungMaskConfig, foerstner_keypoints, lung_mask
from cyclereg.keypoints.api import config_path_for, detect_keypoints_file
from cyclereg.pointio import read_points
from cyclereg_cli.main import app

DATA = Path(__file__).parents[1].parent / "shared" / "data"
CHEST_CT = DATA / "chest-ct" / "chest_ct.nii.gz"

AIR_HU, LUNG_HU, TISSUE_HU = -1000.0, -850.0, 40.0


# ----------------------------------------------------------------------------- phantoms
def box_volume(shape=(40, 40, 40), lo=(10, 12, 14), hi=(30, 28, 26)) -> np.ndarray:
    """A bright box (voxels lo..hi-1) on a dark background."""
    vol = np.zeros(shape, dtype=np.float32)
    vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 100.0
    return vol


def texture(shape, seed=0, sigma=1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.standard_normal(shape), sigma).astype(np.float32)


def chest_phantom(shape=(96, 80, 40), seed=0):
    """A CT-like body (tissue) with two air-filled lungs holding small vessels, outside air,
    and a small bowel-gas pocket. Returns (ct_hu, parts) with boolean ``parts`` "lungs",
    "body" and "gas"."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    ci, cj = shape[0] / 2, shape[1] / 2
    body = ((i - ci) / 42) ** 2 + ((j - cj) / 34) ** 2 < 1
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1, 1):
        lungs |= ((i - ci - side * 20) / 14) ** 2 + ((j - cj) / 20) ** 2 + ((k - 20) / 16) ** 2 < 1
    ct = np.full(shape, AIR_HU, dtype=np.float32)
    ct[body] = TISSUE_HU
    ct[lungs] = LUNG_HU
    for _ in range(40):  # vessels: small tissue blobs inside the lungs
        c = np.argwhere(lungs)[rng.integers(lungs.sum())]
        ct[tuple(slice(max(0, v - 1), v + 2) for v in c)] = TISSUE_HU
    gas = ((i - ci) / 3) ** 2 + ((j - cj + 26) / 3) ** 2 + ((k - 20) / 3) ** 2 < 1  # bowel-gas pocket
    gas &= body & ~lungs
    ct[gas] = AIR_HU
    ct += rng.normal(0, 10, shape).astype(np.float32)
    return ct, {"lungs": lungs, "body": body, "gas": gas}


def save_nifti(path: Path, data: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), str(path))
    return path


# ----------------------------------------------------------------------------- detector
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.0)])
def test_box_corners_found_within_one_voxel(spacing):
    lo, hi = (10, 12, 14), (30, 28, 26)
    vol = torch.from_numpy(box_volume(lo=lo, hi=hi))
    cfg = FoerstnerConfig(sigma_mm=1.0 * min(spacing), nms_radius_mm=3.0 * max(spacing), threshold=0.1, max_points=8)
    kp = foerstner_keypoints(vol, spacing, None, cfg)
    found = kp.voxels.numpy().astype(np.float64)
    # The corners of the box are its extreme voxels; "within one voxel" = along every axis.
    corners = np.array([[a, b, c] for a in (lo[0], hi[0] - 1) for b in (lo[1], hi[1] - 1) for c in (lo[2], hi[2] - 1)])
    assert found.shape == (8, 3)
    dist = np.abs(found[:, None] - corners[None]).max(axis=-1)
    assert dist.min(axis=1).max() <= 1.0, dist.min(axis=1)
    assert len(set(dist.argmin(axis=1).tolist())) == 8  # one keypoint per corner


def test_keypoints_follow_an_integer_shift():
    big = texture((90, 90, 70), seed=1)
    shift = np.array([3, -2, 4])
    a = big[5:85, 5:85, 5:65]
    b = big[5 + shift[0]:85 + shift[0], 5 + shift[1]:85 + shift[1], 5 + shift[2]:65 + shift[2]]  # b[x] = a[x + shift]
    cfg = FoerstnerConfig(sigma_mm=1.5, nms_radius_mm=2.5, max_points=None)
    ka = foerstner_keypoints(torch.from_numpy(a), (1.0, 1.0, 1.0), None, cfg).voxels.numpy()
    kb = foerstner_keypoints(torch.from_numpy(np.ascontiguousarray(b)), (1.0, 1.0, 1.0), None, cfg).voxels.numpy()
    # Points of a whose neighbourhood is fully inside b's field of view.
    margin = np.array(cfg.support_voxels((1.0, 1.0, 1.0)))
    moved = ka - shift  # a[x] = b[x - shift]
    inside = np.all((moved >= margin) & (moved < np.array(b.shape) - margin), axis=1)
    assert inside.sum() > 50
    d = np.linalg.norm(moved[inside][:, None] - kb[None], axis=-1).min(axis=1)
    assert (d <= 1.5).mean() >= 0.9, (d <= 1.5).mean()


def test_keypoints_stay_in_mask_and_respect_max_points():
    vol = torch.from_numpy(texture((40, 40, 40), seed=2))
    mask = torch.zeros(40, 40, 40, dtype=torch.bool)
    mask[5:20, 8:30, 10:35] = True
    kp = foerstner_keypoints(vol, (1.0, 1.0, 1.0), mask, FoerstnerConfig(nms_radius_mm=2.0, max_points=7))
    assert kp.voxels.shape == (7, 3)
    assert bool(mask[tuple(kp.voxels.T)].all())
    assert torch.all(kp.scores[:-1] >= kp.scores[1:])  # strongest first
    with pytest.raises(ValueError):
        foerstner_keypoints(vol, (1.0, 1.0, 1.0), torch.zeros_like(mask))


def test_config_validation():
    with pytest.raises(ValueError):
        FoerstnerConfig(sigma_mm=0)
    with pytest.raises(ValueError):
        FoerstnerConfig(threshold=-1)
    assert FoerstnerConfig(nms_radius_mm=4).nms_radius_voxels((0.98, 0.98, 2.0)) == (4, 4, 2)


# ----------------------------------------------------------------------------- lung mask
def test_lung_mask_on_phantom():
    ct, parts = chest_phantom()
    lungs = parts["lungs"]
    mask = lung_mask(ct, np.eye(4), LungMaskConfig(min_component_ml=1.0))
    dice = 2 * (mask & lungs).sum() / (mask.sum() + lungs.sum())
    assert dice > 0.95, dice
    assert parts["gas"].any() and not (mask & parts["gas"]).any()  # no bowel gas
    assert not (mask & ~parts["body"]).any()  # no outside air
    # vessels (tissue blobs well inside the lungs) are part of the mask
    vessels = ndi.binary_erosion(lungs, iterations=3) & (ct > -300)
    assert vessels.sum() > 20 and mask[vessels].mean() > 0.99


def test_lung_mask_empty_without_lungs():
    ct = np.full((30, 30, 10), TISSUE_HU, dtype=np.float32)
    assert not lung_mask(ct, np.eye(4)).any()


# ----------------------------------------------------------------------------- CLI
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, ["keypoints", *map(str, args)])


def test_cli_lung_mask_csv_and_config(tmp_path):
    ct, _ = chest_phantom()
    ct_path = save_nifti(tmp_path / "ct.nii.gz", ct, spacing=(1.5, 1.5, 2.5))
    out = tmp_path / "kp.csv"
    res = _run(ct_path, "-o", out, "--lung-mask", "--save-mask", tmp_path / "lung.nii.gz",
               "--nms-radius", "3", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert out.read_text().splitlines()[0] == "x_mm,y_mm,z_mm"
    pts = read_points(out).numpy()
    vox = np.rint(pts / np.array([1.5, 1.5, 2.5])).astype(int)  # affine = diag(spacing)
    saved = np.asarray(nib.load(str(tmp_path / "lung.nii.gz")).dataobj) > 0
    assert len(pts) > 0 and saved[tuple(vox.T)].all()
    cfg = json.loads(config_path_for(out).read_text())
    assert cfg["num_keypoints"] == len(pts) and cfg["foerstner"]["nms_radius_mm"] == 3.0
    assert {"cyclereg_version", "date", "machine"} <= set(cfg)
    assert cfg["lung_mask"] is True and "total" in cfg["timings_s"]


def test_cli_l2r_holds_the_scans_voxel_indices_on_an_oblique_offset_grid(tmp_path):
    """--format l2r writes the detector's voxel indices, whatever the affine; csv holds their world mm."""
    vol = texture((30, 30, 30), seed=5)
    affine = np.array([[0.0, 0.0, -1.5, 40.0], [2.0, 0.0, 0.0, -12.5], [0.0, 0.8, 0.0, 7.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "ob.nii.gz"))
    assert _run(tmp_path / "ob.nii.gz", "-o", tmp_path / "kp.txt", "--format", "l2r", "--device", "cpu").exit_code == 0
    assert _run(tmp_path / "ob.nii.gz", "-o", tmp_path / "kp.csv", "--device", "cpu").exit_code == 0
    vox = np.loadtxt(tmp_path / "kp.txt", delimiter=",")
    assert len(vox) > 0 and np.allclose(vox, np.rint(vox), atol=1e-4)
    mm = read_points(tmp_path / "kp.csv").double().numpy()
    np.testing.assert_allclose(vox @ affine[:3, :3].T + affine[:3, 3], mm, atol=1e-3)
    # the l2r file's configuration holds what places its indices in the world: the scan's affine
    stored = np.array(json.loads(config_path_for(tmp_path / "kp.txt").read_text())["volume"]["affine"])
    np.testing.assert_allclose(stored, affine, atol=1e-6)


def test_cli_mask_l2r_and_ply(tmp_path):
    vol = texture((30, 30, 30), seed=3)
    ct_path = save_nifti(tmp_path / "img.nii", vol, spacing=(2.0, 1.0, 1.0))
    mask = np.zeros(vol.shape, dtype=np.uint8)
    mask[5:25, 5:25, 5:25] = 1
    mask_path = save_nifti(tmp_path / "mask.nii.gz", mask, spacing=(2.0, 1.0, 1.0))
    res = _run(ct_path, "-o", tmp_path / "kp.txt", "--mask", mask_path, "--format", "l2r", "--device", "cpu")
    assert res.exit_code == 0, res.output
    vox = np.loadtxt(tmp_path / "kp.txt", delimiter=",")
    assert vox.ndim == 2 and vox.shape[1] == 3
    assert np.allclose(vox, np.rint(vox)) and mask[tuple(np.rint(vox).astype(int).T)].all()
    pytest.importorskip("open3d")
    res = _run(ct_path, "-o", tmp_path / "kp.ply", "--mask", mask_path, "--format", "ply", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert read_points(tmp_path / "kp.ply").shape == (len(vox), 3)
    # without --format the suffix says which: a .npy file holds an array that reads back
    res = _run(ct_path, "-o", tmp_path / "kp.npy", "--mask", mask_path, "--device", "cpu")
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(read_points(tmp_path / "kp.npy"), read_points(tmp_path / "kp.ply"), atol=1e-3, rtol=0)
    # an output that cannot be written is refused before any work
    (tmp_path / "adir").mkdir()
    res = _run(ct_path, "-o", tmp_path / "adir", "--device", "cpu")
    assert res.exit_code == 2 and "is a folder" in res.output and "read CT" not in res.output
    # a suffix no reader knows is refused (the file could not be read back), before any work
    res = _run(ct_path, "-o", tmp_path / "kp.xyz", "--device", "cpu")
    assert res.exit_code == 2 and "unknown suffix '.xyz'" in res.output and not (tmp_path / "kp.xyz").exists()
    # a format the suffix contradicts is refused before any work
    res = _run(ct_path, "-o", tmp_path / "kp2.npy", "--format", "csv", "--device", "cpu")
    assert res.exit_code == 2 and "'.npy' file" in res.output and not (tmp_path / "kp2.npy").exists()


def _assert_one_line_error(res, name: str, tmp_path: Path, before: set):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("done ")]  # not the steps
    assert len(lines) == 1 and name in lines[0] and lines[0].startswith("cyclereg: error: "), res.stderr
    assert set(tmp_path.iterdir()) == before  # nothing written


def test_cli_errors(tmp_path):
    vol = texture((20, 20, 20), seed=4)
    ct_path = save_nifti(tmp_path / "ct.nii.gz", vol)
    empty = save_nifti(tmp_path / "empty_mask.nii.gz", np.zeros(vol.shape, dtype=np.uint8))
    four_d = save_nifti(tmp_path / "fourd.nii.gz", np.zeros((8, 8, 8, 2), dtype=np.float32))
    lungless = save_nifti(tmp_path / "nolungs.nii.gz", np.full((20, 20, 10), TISSUE_HU, dtype=np.float32))
    before = set(tmp_path.iterdir())
    out = tmp_path / "kp.csv"
    _assert_one_line_error(_run(ct_path, "-o", out, "--mask", empty), "empty_mask.nii.gz", tmp_path, before)
    # a mask of the CT's shape on another grid (other spacing) would put keypoints elsewhere in the world
    other_grid = save_nifti(tmp_path / "mask_3mm.nii.gz", np.ones(vol.shape, dtype=np.uint8), spacing=(3.0, 3.0, 3.0))
    before = set(tmp_path.iterdir())
    res = _run(ct_path, "-o", out, "--mask", other_grid)
    _assert_one_line_error(res, "mask_3mm.nii.gz", tmp_path, before)
    assert "another grid" in res.stderr
    # a volume too small to keep any voxel off its border (no mask given: no word of a mask)
    tiny = save_nifti(tmp_path / "tiny.nii.gz", vol[:2])
    before = set(tmp_path.iterdir())
    res = _run(tiny, "-o", out)
    _assert_one_line_error(res, "tiny.nii.gz", tmp_path, before)
    assert "too small" in res.stderr and "mask" not in res.stderr
    _assert_one_line_error(_run(four_d, "-o", out), "fourd.nii.gz", tmp_path, before)
    _assert_one_line_error(_run(tmp_path / "missing.nii.gz", "-o", out), "missing.nii.gz", tmp_path, before)
    _assert_one_line_error(_run(lungless, "-o", out, "--lung-mask", "--save-mask", tmp_path / "m.nii.gz"),
                           "nolungs.nii.gz", tmp_path, before)
    # outputs that would overwrite another file of the command: refused before any work
    for args, name in (([ct_path, "-o", out, "--lung-mask", "--save-mask", out], "--save-mask: this is also the "
                        "keypoint output (-o)"),
                       ([ct_path, "-o", out, "--lung-mask", "--save-mask", f"{out}.config.json"], "its configuration"),
                       ([ct_path, "-o", out, "--lung-mask", "--save-mask", tmp_path / "m.txt"], "give a .nii or .nii.gz"),
                       ([ct_path, "-o", tmp_path / "." / "ct.nii.gz"], "-o: this is also the CT")):
        res = _run(*args)
        _assert_one_line_error(res, name.split(":")[0], tmp_path, before)
        assert name in " ".join(res.stderr.split()), res.stderr
    # a folder where the configuration goes: refused before the points replace an earlier output
    out.write_text("earlier\n")
    (tmp_path / "kp.csv.config.json").mkdir()
    res = _run(ct_path, "-o", out)
    assert res.exit_code == 2 and "kp.csv.config.json: is a folder" in " ".join(res.stderr.split()), res.stderr
    assert out.read_text() == "earlier\n"
    out.unlink()
    (tmp_path / "kp.csv.config.json").rmdir()
    res = _run(ct_path, "-o", out, "--sigma", "-1")
    assert res.exit_code == 2 and set(tmp_path.iterdir()) == before
    assert "--sigma must be a positive number, got -1" in res.output  # the option, not the config field
    res = _run(ct_path, "-o", out, "--max-points", "-5")  # 0 is allowed (no limit): the message says so
    assert res.exit_code == 2 and "--max-points must be a whole number >= 0 (0: no limit), got -5" in res.output
    (tmp_path / "p.csv").write_text("id,fixed,moving\n")
    res = _run("--pairs", tmp_path / "p.csv", "-o", tmp_path / "ds", "--moving-nms-radius", "-2")
    assert res.exit_code == 2 and "--moving-nms-radius must be >= 0" in res.output and not (tmp_path / "ds").exists()



def _scan_pairs(tmp_path: Path) -> Path:
    """Three textured scans, a pairs CSV over them (in a subfolder, so paths are relative to it)
    and row-aligned landmark files for the first pair."""
    for i in range(3):
        save_nifti(tmp_path / f"s{i}.nii.gz", texture((30, 28, 24), seed=10 + i) * 100, spacing=(1.5, 1.5, 2.0))
    np.savetxt(tmp_path / "lm_f.csv", np.ones((5, 3)), delimiter=",", header="x_mm,y_mm,z_mm", comments="")
    np.savetxt(tmp_path / "lm_m.csv", np.ones((5, 3)), delimiter=",", header="x_mm,y_mm,z_mm", comments="")
    (tmp_path / "lists").mkdir()
    csv = tmp_path / "lists" / "pairs.csv"
    csv.write_text("id,fixed,moving,fixed_landmarks,moving_landmarks\n"
                   "a,../s0.nii.gz,../s1.nii.gz,../lm_f.csv,../lm_m.csv\n"
                   "b,../s1.nii.gz,../s2.nii.gz,,\n"
                   "c,../s2.nii.gz,../s0.nii.gz,,\n")
    return csv


def test_cli_pairs_builds_a_keypoint_dataset(tmp_path):
    """--pairs: every scan's keypoints (the moving scans' with the smaller NMS box) and a dataset
    JSON that the training and evaluation commands read, with folds and the landmark files."""
    from cyclereg.datasets import load_keypoint_dataset
    from cyclereg.keypoints.api import detect_keypoints
    from cyclereg.volumeio import read_nifti

    csv = _scan_pairs(tmp_path)
    res = _run("--pairs", csv, "-o", tmp_path / "ds", "--folds", "2", "--nms-radius", "3.5", "--device", "cpu")
    assert res.exit_code == 0, res.output
    ds = load_keypoint_dataset(tmp_path / "ds" / "dataset.json")
    assert [q.id for q in ds.pairs] == ["a", "b", "c"] and ds.folds == (("a", "b"), ("c",))
    a, b = ds.pair("a"), ds.pair("b")
    assert a.fixed_landmarks.resolve() == (tmp_path / "lm_f.csv").resolve() and b.fixed_landmarks is None
    # each file holds exactly what the detector gives for that scan with the documented settings
    for q, fixed, moving in ((a, "s0", "s1"), (b, "s1", "s2")):
        for path, scan, radius in ((q.fixed_keypoints, fixed, 3.5), (q.moving_keypoints, moving, 3.0)):
            want = detect_keypoints(read_nifti(tmp_path / f"{scan}.nii.gz"),
                                    config=FoerstnerConfig(nms_radius_mm=radius), device="cpu").points_mm
            np.testing.assert_allclose(read_points(path).numpy(), want.numpy(), atol=1e-3)
    assert read_points(a.moving_keypoints).shape[0] > read_points(a.fixed_keypoints).shape[0]
    cfg = json.loads(config_path_for(tmp_path / "ds" / "dataset.json").read_text())
    assert cfg["foerstner"]["moving"]["nms_radius_mm"] == 3.0 and cfg["foerstner"]["fixed"]["nms_radius_mm"] == 3.5
    assert cfg["num_keypoints"]["a"]["fixed"] == read_points(a.fixed_keypoints).shape[0]
    # per scan, the radius in voxels as its grid applies it: 3.5 mm -> round(3.5 / 1.5) = 2, round(3.5 / 2) = 2;
    # 3.0 mm on the moving scans -> 2, 2 and round(1.5) = 2 (half to even)
    assert cfg["scans"]["a"]["fixed"] == {"shape": [30, 28, 24], "spacing_mm": [1.5, 1.5, 2.0],
                                          "nms_radius_voxels": [2, 2, 2]}
    assert cfg["scans"]["c"]["moving"]["nms_radius_voxels"] == list(
        FoerstnerConfig(nms_radius_mm=3.0).nms_radius_voxels((1.5, 1.5, 2.0)))
    assert {"cyclereg_version", "date", "machine"} <= set(cfg)
    # a second call does not overwrite the dataset
    res = _run("--pairs", csv, "-o", tmp_path / "ds", "--device", "cpu")
    assert res.exit_code == 2 and "already there" in res.output


def test_cli_pairs_refuses_a_dataset_folder_in_a_run_directory(tmp_path):
    """keypoints --pairs -o RUN/fold1/ds: one line naming the folder, nothing written there."""
    csv = _scan_pairs(tmp_path)
    run = tmp_path / "run"
    (run / "fold1").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"kind": "keypoints", "config": {}}))
    res = _run("--pairs", csv, "-o", run / "fold1" / "ds", "--device", "cpu")
    assert res.exit_code == 2 and "is in the run directory" in res.output, res.output
    assert not (run / "fold1" / "ds").exists()


@pytest.mark.parametrize("rows, message", [
    ("id,fixed\na,../s0.nii.gz\n", "missing: moving"),
    ("id,fixed,moving\na,../s0.nii.gz,../nope.nii.gz\n", "nope.nii.gz: file does not exist"),
    ("id,fixed,moving\na,../s0.nii.gz,../s1.nii.gz\na,../s1.nii.gz,../s2.nii.gz\n", "'a' is listed more than once"),
    ("id,fixed,moving,fixed_landmarks,moving_landmarks\na,../s0.nii.gz,../s1.nii.gz,../lm_f.csv,\n", "both fixed_landmarks"),
    ("id,fixed,moving,fixed_landmarks,moving_landmarks\na,../s0.nii.gz,../s1.nii.gz,../lm_f.csv,../lm_3.csv\n",
     "5 fixed vs 3 moving landmarks"),
    ("id,fixed,moving\na,../s0.nii.gz,../lm_f.csv\n", "lm_f.csv"),  # not a NIfTI
    ("id,fixed,moving\n", "no pairs in the pairs CSV"),
    ("id,fixed,moving\n../x,../s0.nii.gz,../s1.nii.gz\n", "id '../x' may hold only"),
    # a field more than the header has was dropped without a word (point CSVs refuse the same)
    ("id,fixed,moving\na,../s0.nii.gz,../s1.nii.gz,../s2.nii.gz\n", "line 2: 4 fields under a header of 3 columns"),
])
def test_cli_pairs_errors_write_nothing(tmp_path, rows, message):
    csv = _scan_pairs(tmp_path)
    np.savetxt(tmp_path / "lm_3.csv", np.ones((3, 3)), delimiter=",", header="x_mm,y_mm,z_mm", comments="")
    csv.write_text(rows)
    res = _run("--pairs", csv, "-o", tmp_path / "ds", "--device", "cpu")
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "ds").exists()

# ----------------------------------------------------------------------------- real data
@pytest.mark.skipif(not CHEST_CT.exists(), reason="shared chest CT not available")
def test_chest_ct_defaults(tmp_path):
    out = tmp_path / "kp.csv"
    start = time.perf_counter()
    res = detect_keypoints_file(CHEST_CT, out, lung_mask=True, save_mask=tmp_path / "lung.nii.gz",
                                device="cpu", verbose=False)
    elapsed = time.perf_counter() - start
    n = res.voxels.shape[0]
    assert 1000 <= n <= 4000, n
    assert res.mask[tuple(res.voxels.T.numpy())].all()
    img = nib.load(str(CHEST_CT))
    vox = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine), read_points(out).numpy())).astype(int)
    assert np.array_equal(vox, res.voxels.numpy())  # CSV is world mm from the affine
    assert elapsed < 60  # the 30 s acceptance figure is measured in docs/benchmarks.md


# ----------------------------------------------------------------------------- end-to-end example
def test_example_field_sign():
    """The example's deformation puts fixed point p at p + u(p) in the moving image."""
    from conftest import load_script

    load_script("examples/chest_ct_end_to_end.py").sign_self_check()


def test_cli_pairs_places_voxel_index_landmarks_on_their_scans(tmp_path):
    """Headerless (Learn2Reg voxel-index) landmark files of a pairs CSV: each on its own scan's grid
    (fixed landmarks on the fixed scan's affine, moving on the moving scan's), written in mm into the
    dataset and read back there as ``index -> affine``; a file in mm stays where it is."""
    from cyclereg.datasets import load_keypoint_dataset

    fixed_affine = np.array([[1.5, 0, 0, -20.0], [0, 1.25, 0, 7.0], [0, 0, 2.0, 3.5], [0, 0, 0, 1]])
    moving_affine = np.array([[0, 1.5, 0, 4.0], [-1.0, 0, 0, 30.0], [0, 0, 2.5, -6.0], [0, 0, 0, 1]])
    for name, affine, seed in (("f", fixed_affine, 21), ("m", moving_affine, 22)):
        nib.save(nib.Nifti1Image((texture((26, 24, 20), seed=seed) * 100).astype(np.float32), affine),
                 str(tmp_path / f"{name}.nii.gz"))
    idx_f = np.array([[1, 2, 3], [10, 4, 7], [0, 0, 0]])
    idx_m = np.array([[2, 2, 2], [5, 9, 1], [20, 3, 4]])
    np.savetxt(tmp_path / "lm_f.csv", idx_f, delimiter=",", fmt="%d")
    np.savetxt(tmp_path / "lm_m.csv", idx_m, delimiter=",", fmt="%d")
    np.savetxt(tmp_path / "lm_mm.csv", np.ones((3, 3)), delimiter=",", header="x_mm,y_mm,z_mm", comments="")
    csv = tmp_path / "pairs.csv"
    csv.write_text("id,fixed,moving,fixed_landmarks,moving_landmarks\n"
                   "a,f.nii.gz,m.nii.gz,lm_f.csv,lm_m.csv\n"
                   "b,m.nii.gz,f.nii.gz,lm_mm.csv,lm_f.csv\n")
    res = _run("--pairs", csv, "-o", tmp_path / "ds", "--device", "cpu")
    assert res.exit_code == 0, res.output
    ds = load_keypoint_dataset(tmp_path / "ds" / "dataset.json")
    world = lambda idx, affine: idx @ affine[:3, :3].T + affine[:3, 3]  # noqa: E731
    lf, lm = ds.read_landmarks(ds.pair("a"), "pair a")
    np.testing.assert_allclose(lf.numpy(), world(idx_f, fixed_affine), atol=1e-4)
    np.testing.assert_allclose(lm.numpy(), world(idx_m, moving_affine), atol=1e-4)
    lf, lm = ds.read_landmarks(ds.pair("b"), "pair b")  # the mm file as it is; lm_f.csv now on f.nii.gz as moving
    np.testing.assert_allclose(lf.numpy(), np.ones((3, 3)))
    np.testing.assert_allclose(lm.numpy(), world(idx_f, fixed_affine), atol=1e-4)
    assert ds.pair("b").fixed_landmarks.resolve() == (tmp_path / "lm_mm.csv").resolve()
    cfg = json.loads(config_path_for(tmp_path / "ds" / "dataset.json").read_text())
    assert set(cfg["landmarks_from_voxel_indices"]) == {"landmarks/a_fixed.csv", "landmarks/a_moving.csv",
                                                         "landmarks/b_moving.csv"}
    # a count mismatch among voxel-index files is still refused before any detection, writing nothing
    np.savetxt(tmp_path / "lm_2.csv", idx_m[:2], delimiter=",", fmt="%d")
    csv.write_text("id,fixed,moving,fixed_landmarks,moving_landmarks\na,f.nii.gz,m.nii.gz,lm_f.csv,lm_2.csv\n")
    res = _run("--pairs", csv, "-o", tmp_path / "ds2", "--device", "cpu")
    assert res.exit_code == 2 and "3 fixed vs 2 moving landmarks" in res.output and not (tmp_path / "ds2").exists()


# ----------------------------------------------------------------------------- analytic checks (mutation audit)
def test_distinctiveness_is_one_over_the_trace_of_the_inverse_tensor():
    """D = det(T) / trace(adj(T)) = 1 / trace(T^-1), against numpy's inverse on random SPD tensors."""
    from cyclereg.keypoints.foerstner import distinctiveness_from_tensor

    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4, 3, 3))
    spd = a @ np.swapaxes(a, -1, -2) + 0.1 * np.eye(3)  # (2, 3, 4, 3, 3)
    rows, cols = (0, 0, 0, 1, 1, 2), (0, 1, 2, 1, 2, 2)  # xx, xy, xz, yy, yz, zz
    T = torch.from_numpy(np.stack([spd[..., r, c] for r, c in zip(rows, cols)])[None])
    want = 1.0 / np.trace(np.linalg.inv(spd), axis1=-2, axis2=-1)
    np.testing.assert_allclose(distinctiveness_from_tensor(T).numpy(), want, rtol=1e-10)


def test_gradient_is_per_millimetre_along_each_axis():
    """The ramp I = 3 i + 2 j - k at spacing (2, 0.5, 1) mm has the gradient (1.5, 4, -1) per mm inside."""
    from cyclereg.keypoints.foerstner import gradient_mm

    i, j, k = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (5, 6, 7)), indexing="ij")
    grad = gradient_mm((3 * i + 2 * j - k)[None, None], (2.0, 0.5, 1.0))[0, :, 1:-1, 1:-1, 1:-1]
    for channel, value in enumerate((1.5, 4.0, -1.0)):
        torch.testing.assert_close(grad[channel], torch.full_like(grad[channel], value))


def test_nms_suppresses_within_a_box_of_half_width_radius_per_axis():
    """(0,0,0) lies in the box of half-width 2 around the stronger (2,2,2) (a ball of radius 2 would keep
    it: 3.5 voxels away); (5,0,0) lies outside. With half-width 1 along the last axis, (0,0,0) is kept."""
    from cyclereg.keypoints.foerstner import greedy_box_nms

    points = np.array([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [5.0, 0.0, 0.0]])
    scores = np.array([1.0, 2.0, 0.5])
    assert greedy_box_nms(points, scores, (2, 2, 2)).tolist() == [1, 2]
    assert greedy_box_nms(points, scores, (2, 2, 1)).tolist() == [1, 0, 2]


def test_nms_half_width_rounds_to_the_nearest_voxel_with_halves_up():
    """radius / spacing rounded to the nearest whole voxel, halves up: on a 2 mm grid 1 mm is one voxel (Python's
    round gave 0, i.e. no suppression at all) and 5 mm three (round gave 2, the box of 3 and 4 mm); below half a
    voxel an axis has no neighbour in the box. Keypoints follow the voxel box: 1 mm and 2 mm on a 2 mm grid find
    the same points, fewer than no suppression, and 5 mm fewer than 4 mm."""
    from cyclereg.frames import half_width_voxels

    assert half_width_voxels(1.0, (2.0, 2.0, 2.0)) == (1, 1, 1)
    assert half_width_voxels(5.0, (2.0, 2.0, 2.0)) == (3, 3, 3)
    assert half_width_voxels(3.0, (2.0, 2.0, 2.0)) == (2, 2, 2)
    assert half_width_voxels(0.9, (2.0, 1.0, 0.5)) == (0, 1, 2)
    assert FoerstnerConfig(nms_radius_mm=2.5).nms_radius_voxels((1.0, 1.0, 5.0)) == (3, 3, 1)
    vol = torch.from_numpy(texture((40, 40, 40), seed=4))
    spacing = (2.0, 2.0, 2.0)

    def found(radius_mm):
        cfg = FoerstnerConfig(sigma_mm=3.0, nms_radius_mm=radius_mm, threshold=0.0, max_points=None)
        return foerstner_keypoints(vol, spacing, None, cfg).voxels

    none, one_mm, two_mm = found(0.0), found(1.0), found(2.0)
    assert torch.equal(one_mm, two_mm) and one_mm.shape[0] < none.shape[0]
    assert found(5.0).shape[0] < found(4.0).shape[0]


def test_the_threshold_keeps_exactly_the_maxima_at_or_above_threshold_times_reference():
    """Raising the threshold between two keypoints' scores keeps exactly the stronger ones: a weaker maximum
    never suppresses a stronger one, and the reference does not depend on the threshold."""
    vol = torch.from_numpy(texture((36, 36, 36), seed=3))
    base = FoerstnerConfig(sigma_mm=1.5, nms_radius_mm=2.5, threshold=0.0, max_points=None)
    every = foerstner_keypoints(vol, (1.0, 1.0, 1.0), None, base)
    assert every.voxels.shape[0] > 20
    m = every.voxels.shape[0] // 2
    level = 0.5 * (float(every.scores[m]) + float(every.scores[m + 1]))
    assert float(every.scores[m]) > level > float(every.scores[m + 1])
    strong = foerstner_keypoints(vol, (1.0, 1.0, 1.0), None, FoerstnerConfig(
        sigma_mm=1.5, nms_radius_mm=2.5, threshold=level / every.reference, max_points=None))
    assert strong.reference == every.reference
    assert torch.equal(strong.voxels, every.voxels[: m + 1])


def test_the_gaussian_scale_is_converted_from_mm_per_axis(monkeypatch):
    """sigma 1.5 mm at spacing (2, 1, 0.5) mm is (0.75, 1.5, 3) voxels along the three axes, both for the
    smoothing of the structure tensor and for the margin of the crop around the mask (gradient half-width 1
    + Gaussian radius ceil(3 sigma) + NMS half-width 2.5 mm / spacing to the nearest voxel, halves up)."""
    import cyclereg.keypoints.foerstner as foerstner

    seen = []
    real = foerstner.structure_tensor
    monkeypatch.setattr(foerstner, "structure_tensor", lambda grad, sigma: seen.append(tuple(sigma)) or real(grad, sigma))
    foerstner.distinctiveness(torch.from_numpy(texture((12, 12, 12))), (2.0, 1.0, 0.5), 1.5)
    assert seen == [(0.75, 1.5, 3.0)]
    cfg = FoerstnerConfig(sigma_mm=1.5, nms_radius_mm=2.5)
    assert cfg.sigma_voxels((2.0, 1.0, 0.5)) == (0.75, 1.5, 3.0)
    assert cfg.support_voxels((2.0, 1.0, 0.5)) == (1 + 3 + 1, 1 + 5 + 3, 1 + 9 + 5)


def test_a_threshold_of_one_at_the_top_quantile_keeps_only_the_strongest_maximum():
    """reference_quantile 1 makes the reference the largest distinctiveness in the mask; threshold 1 keeps
    the maxima at or above it: exactly the global maximum, whose score is the reference."""
    vol = torch.from_numpy(texture((36, 36, 36), seed=3))
    kp = foerstner_keypoints(vol, (1.0, 1.0, 1.0), None, FoerstnerConfig(
        sigma_mm=1.5, nms_radius_mm=2.5, threshold=1.0, reference_quantile=1.0, max_points=None))
    assert kp.voxels.shape[0] == 1 and float(kp.scores[0]) == pytest.approx(kp.reference, rel=1e-6)


def _disk_body_with_one_lung(radius_lung=6.0):
    """(60, 60, 20) CT: outside air -1000 HU, a tissue cylinder (0 HU, radius 28 voxels in i, j,
    every k) and one air sphere (-850 HU) inside it. Returns (ct, body, lung) with bool masks."""
    import numpy as np

    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (60, 60, 20)], indexing="ij")
    body = (i - 29.5) ** 2 + (j - 29.5) ** 2 < 28 ** 2
    lung = (i - 29.5) ** 2 + (j - 29.5) ** 2 + (k - 10) ** 2 < radius_lung ** 2
    ct = np.full(body.shape, -1000.0, dtype=np.float32)
    ct[body] = 0.0
    ct[lung] = -850.0
    return ct, body, lung


def test_lung_mask_keeps_outside_air_out_even_with_room_for_two_components():
    # outside air in the corners of the body's box forms four components larger than the lung (about
    # 3400 voxels each, the lung 888); the lung mask takes air *inside the body* only, so the single
    # component kept is the lung itself
    import numpy as np
    from cyclereg.keypoints import LungMaskConfig, lung_mask

    ct, body, lung = _disk_body_with_one_lung()
    mask = lung_mask(ct, np.eye(4), LungMaskConfig(min_component_ml=0.1, max_components=1,
                                                         opening_mm=0.0, closing_mm=0.0))
    assert int((mask & ~body).sum()) == 0
    assert np.array_equal(mask, lung)  # no opening or closing: exactly the air sphere


def test_lung_mask_minimum_volume_is_in_millilitres():
    # a sphere of radius 6 voxels at 1 mm spacing: 888 voxels = 0.888 ml (< 1 ml: dropped, > 0.5 ml: kept)
    import numpy as np
    from cyclereg.keypoints import LungMaskConfig, lung_mask

    ct, body, lung = _disk_body_with_one_lung()
    assert int(lung.sum()) == 888
    plain = dict(opening_mm=0.0, closing_mm=0.0)
    assert not lung_mask(ct, np.eye(4), LungMaskConfig(min_component_ml=1.0, **plain)).any()
    assert np.array_equal(lung_mask(ct, np.eye(4), LungMaskConfig(min_component_ml=0.5, **plain)), lung)
    # at 2 mm spacing each voxel is 8 mm^3: the same sphere is 7.104 ml (kept at 7 ml, dropped at 7.2 ml)
    two = np.diag([2.0, 2.0, 2.0, 1.0])
    assert np.array_equal(lung_mask(ct, two, LungMaskConfig(min_component_ml=7.0, **plain)), lung)
    assert not lung_mask(ct, two, LungMaskConfig(min_component_ml=7.2, **plain)).any()


def test_the_detector_computes_in_the_images_dtype_when_it_is_float32_or_wider():
    """Device and dtype follow the inputs: a float64 image is not rounded to float32 first (its
    distinctiveness is float64), integer and half-precision images are computed in float32, and
    the keypoints of a well-conditioned image are the same in both precisions."""
    from cyclereg.keypoints.foerstner import distinctiveness

    vol = texture((40, 36, 32), seed=3) * 100.0
    spacing = (1.0, 1.2, 1.5)
    d64 = distinctiveness(torch.from_numpy(vol.astype(np.float64)), spacing, 1.5)
    d32 = distinctiveness(torch.from_numpy(vol), spacing, 1.5)
    assert d64.dtype == torch.float64 and d32.dtype == torch.float32
    assert distinctiveness(torch.from_numpy(vol.astype(np.int16)), spacing, 1.5).dtype == torch.float32
    assert distinctiveness(torch.from_numpy(vol).half(), spacing, 1.5).dtype == torch.float32
    assert torch.allclose(d64.float(), d32, rtol=1e-3, atol=1e-6 * float(d32.max()))
    cfg = FoerstnerConfig(sigma_mm=1.5, nms_radius_mm=3.0, max_points=None)
    k64 = foerstner_keypoints(torch.from_numpy(vol.astype(np.float64)), spacing, None, cfg)
    k32 = foerstner_keypoints(torch.from_numpy(vol), spacing, None, cfg)
    assert k64.scores.dtype == torch.float32 and k64.voxels.shape[0] > 20
    assert {tuple(v) for v in k64.voxels.tolist()} == {tuple(v) for v in k32.voxels.tolist()}


def test_a_failed_write_keeps_the_earlier_points_and_their_configuration(tmp_path, monkeypatch):
    """The points file, its configuration and the saved mask are one set: when the configuration cannot be
    written, the earlier run's points stay (they were replaced, beside a configuration of the earlier run)."""
    import cyclereg.keypoints.api as kp_api

    ct_path = save_nifti(tmp_path / "ct.nii.gz", texture((24, 24, 24), seed=4))
    out = tmp_path / "kp.csv"
    assert _run(ct_path, "-o", out, "--device", "cpu").exit_code == 0
    assert len(read_points(out)) == 7
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = kp_api.write_json

    def disk_full(path, obj):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(kp_api, "write_json", disk_full)
    res = _run(ct_path, "-o", out, "--max-points", "3", "--device", "cpu")  # of the 7 the first run found
    monkeypatch.setattr(kp_api, "write_json", real)
    assert res.exit_code != 0 and "No space left on device" in res.output and str(config_path_for(out)) in res.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_interrupted_pairs_run_leaves_no_part_of_its_dataset(tmp_path, monkeypatch):
    """keypoints --pairs writes its keypoint files, landmarks and dataset.json as one set: interrupted while
    writing them (here: at the second keypoint file), nothing of it is left, not even the folder."""
    import cyclereg.keypoints.api as kp_api

    csv = _scan_pairs(tmp_path)
    real, calls = kp_api.atomic_write_text, []

    def interrupted(path, text):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(kp_api, "atomic_write_text", interrupted)
    res = _run("--pairs", csv, "-o", tmp_path / "ds", "--device", "cpu")
    assert res.exit_code == 130 and len(calls) == 2, res.output
    assert not (tmp_path / "ds").exists()


def test_a_huge_sigma_is_refused_and_a_huge_nms_radius_acts_as_the_whole_volume(tmp_path):
    """--sigma 1e9 built a Gaussian kernel of 6e9 taps (killed for memory, or a traceback): now one line
    naming the scan. --nms-radius 1e9 asked for a pooling window of terabytes: a box wider than the volume
    suppresses exactly as one as wide, so it gives the keypoints of a radius of the volume's size."""
    vol = texture((24, 24, 24), seed=4)
    ct_path = save_nifti(tmp_path / "ct.nii.gz", vol)
    res = _run(ct_path, "-o", tmp_path / "k.csv", "--sigma", "1e9", "--device", "cpu")
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "--sigma 1e+09 mm) is too large for this volume" in said, res.output
    assert str(ct_path) in said and not (tmp_path / "k.csv").exists()
    with pytest.raises(ValueError, match="too large for this volume: 3 sigma is 24 voxels along axis 2, which has 24"):
        foerstner_keypoints(torch.from_numpy(vol), (1.0, 1.0, 0.5), None, FoerstnerConfig(sigma_mm=4.0))
    cfg = FoerstnerConfig(threshold=0.0, max_points=None, mask_erosion_voxels=0)  # every voxel may be a keypoint
    huge = foerstner_keypoints(torch.from_numpy(vol), (1.0, 1.0, 1.0), None, replace(cfg, nms_radius_mm=1e9))
    wide = foerstner_keypoints(torch.from_numpy(vol), (1.0, 1.0, 1.0), None, replace(cfg, nms_radius_mm=24.0))
    assert torch.equal(huge.voxels, wide.voxels) and huge.voxels.shape[0] == 1


def test_a_mask_of_several_labels_is_every_voxel_above_zero(tmp_path):
    """A left/right mask labelled 1 and 2 restricts keypoints as the same mask binarised: label 2 counts
    too (a mutant that took `== 1` dropped the right half silently)."""
    vol = texture((32, 32, 32), seed=5)
    ct_path = save_nifti(tmp_path / "ct.nii.gz", vol)
    labels = np.zeros(vol.shape, dtype=np.uint8)
    labels[4:28, 4:16, 4:28], labels[4:28, 16:28, 4:28] = 1, 2
    two = save_nifti(tmp_path / "two.nii.gz", labels)
    one = save_nifti(tmp_path / "one.nii.gz", (labels > 0).astype(np.uint8))
    for mask, out in ((two, "k2.csv"), (one, "k1.csv")):
        assert _run(ct_path, "-o", tmp_path / out, "--mask", mask, "--device", "cpu").exit_code == 0
    pts = read_points(tmp_path / "k2.csv")
    assert torch.equal(pts, read_points(tmp_path / "k1.csv")) and (pts[:, 1] >= 16).any()
