"""The files cyclereg writes, read back by other tools and by cyclereg itself (bad-input walk, 2026-12-07).

Audited: every command's outputs on tiny inputs, as a reader other than the writer meets them. JSON
(``config.json``, reports, ``K.csv.config.json``) must be strict (no ``NaN`` / ``Infinity`` tokens, which
``JSON.parse`` and jq reject; a figure without a value is ``null``) and the resolved configuration in it must
rebuild the configuration that ran (``CloudRegConfig.from_dict``). CSV outputs (displacements, the
per-landmark errors) must have the documented header, one row per input point or landmark, and parse with
Python's ``csv`` module and ``numpy.loadtxt``. NIfTI outputs must carry the fixed scan's affine (sform and
qform), float32 images, integer label maps, the Learn2Reg ``(D, H, W, 3)`` layout and the intent name of
their unit, and a field written in voxels and the same written with ``--disp-mm`` must agree through the
affine's linear part, here on an oblique, flipped, anisotropic reference grid.

Two bugs are pinned with strict xfails (each passes once mended): ``evaluate --errors-csv`` writes pair ids
without CSV quoting, so an id holding a comma (any non-blank text is a valid id) shifts every column of its
rows; ``register`` treats any ``config.json`` in its output folder as its own earlier record and deletes the
files its ``outputs`` list names, even when another tool wrote it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import cyclereg.api as api
from cyclereg.clouds.pipeline import CloudRegConfig
from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair
from cyclereg.pointio import read_points, write_points

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

TINY = BreathingConfig(n_fixed=120, n_moving=240, branches=10, steps=20)
"""A small synthetic lung pair: a registration in a fraction of a second."""


def _strict(text: str):
    """``text`` parsed as strict JSON: Python's NaN / Infinity / -Infinity tokens are an error."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _tiny_pair(folder: Path):
    pair = make_breathing_pair(0, TINY)
    write_points(folder / "f.csv", pair.fixed_mm)
    write_points(folder / "m.csv", pair.moving_mm)
    return pair


# ----------------------------------------------------------------------------- register: NIfTI and CSV outputs
def _oblique_grid(points_mm: torch.Tensor, shape=(20, 22, 16)) -> np.ndarray:
    """A voxel -> mm affine rotated about z, flipped along k, anisotropic, centred on the points."""
    th = 0.3
    rot = np.array([[np.cos(th), -np.sin(th), 0.0], [np.sin(th), np.cos(th), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([6.0, 5.0, -8.0])
    centre = ((points_mm.min(0).values + points_mm.max(0).values) / 2).double().numpy()
    affine[:3, 3] = centre - affine[:3, :3] @ (np.array(shape) - 1) / 2
    return affine


def test_cloud_register_outputs_on_an_oblique_grid_read_back_as_documented(tmp_path):
    """``register F.csv M.csv --reference --moving-image --moving-labels --jacobian``, once in voxels and once
    with ``--disp-mm``: every NIfTI output has the reference's affine in its sform and qform, the displacement
    is float32 ``(D, H, W, 3)`` with the intent name of its unit, the warped int16 scan is float32 and the
    uint8 label map integer; the mm field is the linear part of the affine times the voxel field; the CSV has
    the documented header and one row per fixed point; config.json is strict JSON whose configuration
    rebuilds the one that ran."""
    pair = _tiny_pair(tmp_path)
    shape = (20, 22, 16)
    affine = _oblique_grid(torch.cat([pair.fixed_mm, pair.moving_mm]), shape)
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image((rng.normal(size=shape) * 100).astype(np.int16), affine), tmp_path / "ref.nii.gz")
    nib.save(nib.Nifti1Image((np.arange(np.prod(shape)).reshape(shape) % 5).astype(np.uint8), affine),
             tmp_path / "lab.nii.gz")
    common = dict(reference=tmp_path / "ref.nii.gz", device="cpu", verbose=False)
    vox = api.register(tmp_path / "f.csv", tmp_path / "m.csv", tmp_path / "vox", moving_image=tmp_path / "ref.nii.gz",
                       moving_labels=tmp_path / "lab.nii.gz", jacobian=True, **common)
    mm = api.register(tmp_path / "f.csv", tmp_path / "m.csv", tmp_path / "mm", disp_mm=True, **common)
    expected = {"displacement.nii.gz": ("float32", (*shape, 3), "disp voxel ijk"),
                "jacobian.nii.gz": ("float32", shape, ""), "warped.nii.gz": ("float32", shape, ""),
                "warped_labels.nii.gz": ("int16", shape, "")}
    assert sorted(vox.files) == sorted([*expected, "displacements.csv"])
    for name, (dtype, dims, intent) in expected.items():
        img = nib.load(vox.path(name))
        assert (str(img.get_data_dtype()), img.shape, img.header.get_intent()[2]) == (dtype, dims, intent), name
        assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0, name
        np.testing.assert_allclose(img.get_sform(), affine, atol=1e-5)
        np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
    assert nib.load(mm.path("displacement.nii.gz")).header.get_intent()[2] == "disp mm xyz"
    field_vox = np.asarray(nib.load(vox.path("displacement.nii.gz")).dataobj, dtype=np.float64)
    field_mm = np.asarray(nib.load(mm.path("displacement.nii.gz")).dataobj, dtype=np.float64)
    assert np.abs(field_mm).max() > 1.0
    np.testing.assert_allclose(field_mm, field_vox @ affine[:3, :3].T, atol=1e-4)
    # the points' CSV: documented header, one row per fixed point, in the fixed file's order
    text = vox.path("displacements.csv").read_text()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["x_mm", "y_mm", "z_mm", "dx_mm", "dy_mm", "dz_mm"] and len(rows) == 1 + TINY.n_fixed
    table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1)
    np.testing.assert_allclose(table[:, :3], pair.fixed_mm.double().numpy(), atol=5e-5 + 1e-6)
    # config.json: strict JSON; its configuration is the one that ran (the random network's defaults)
    record = _strict(vox.path("config.json").read_text())
    assert record["displacement_unit"] == "voxel" and _strict(mm.path("config.json").read_text())[
        "displacement_unit"] == "mm"
    assert CloudRegConfig.from_dict(record["config"]) == CloudRegConfig()


# ----------------------------------------------------------------------------- evaluate: report and errors CSV
def _keypoint_dataset(folder: Path, ids: list[str], n_landmarks: int = 4) -> Path:
    """Pairs ``ids`` of small random clouds whose moving landmarks are the fixed ones shifted by (1, 2, 2) mm
    (TRE 3 mm before, and after the identity)."""
    g = torch.Generator().manual_seed(0)
    pairs = []
    for n, pid in enumerate(ids):
        fixed = 50 * torch.rand(40, 3, generator=g, dtype=torch.float64)
        landmarks = 50 * torch.rand(n_landmarks, 3, generator=g, dtype=torch.float64)
        files = {"fixed_keypoints": fixed, "moving_keypoints": fixed + 1.0, "fixed_landmarks": landmarks,
                 "moving_landmarks": landmarks + torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)}
        entry = {"id": pid}
        for key, pts in files.items():
            write_points(folder / f"p{n}_{key}.csv", pts)
            entry[key] = f"p{n}_{key}.csv"
        pairs.append(entry)
    ds = folder / "dataset.json"
    ds.write_text(json.dumps({"name": "known", "pairs": pairs}))
    return ds


def _ensemble(folder: Path) -> Path:
    """An ensemble checkpoint of two random networks (seeds 1 and 2), made by ``cyclereg ensemble``."""
    from cyclereg.checkpoint import save_checkpoint
    from cyclereg.clouds.api import combine_cloud_models
    from cyclereg.clouds.features import build_graph_net
    from cyclereg.clouds.lbp import LBPConfig

    cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=16))
    for seed in (1, 2):
        save_checkpoint(folder / f"m{seed}.pt", kind="cloud", config=cfg,
                        state_dict=build_graph_net(cfg.net, seed=seed).state_dict(), extra={"stage": 5})
    combine_cloud_models([folder / "m1.pt", folder / "m2.pt"], folder / "ens.pt")
    return folder / "ens.pt"


def test_a_report_with_figures_without_a_value_is_strict_json_and_its_errors_csv_has_a_row_per_landmark(tmp_path):
    """``evaluate --spread`` of one pair: the correlation across pairs has no value (one pair), and the report
    writes it as ``null`` (strict JSON, the report as returned); the ensemble's record ``ens.json`` is strict
    JSON whose configuration rebuilds the checkpoint's; the errors CSV has the documented header with the
    spread column and one row per landmark, readable by ``csv`` and ``numpy``, the identity's rows the known
    3 mm."""
    from cyclereg.checkpoint import load_checkpoint

    ds = _keypoint_dataset(tmp_path, ["a"], n_landmarks=3)
    ens = _ensemble(tmp_path)
    report = api.evaluate(ds, tmp_path / "r.json", model=ens, spread=True, device="cpu", errors_csv=tmp_path / "e.csv")
    written = _strict((tmp_path / "r.json").read_text())
    assert written == report and written["member_spread"]["spearman_cases"] is None
    assert written["member_spread"]["mean_at_landmarks_mm"] >= 0.0
    record = _strict((tmp_path / "ens.json").read_text())
    assert CloudRegConfig.from_dict(record["config"]) == CloudRegConfig.from_dict(
        load_checkpoint(ens, kind="cloud")["config"])
    assert record["config"]["ensemble_size"] == 2 and len(record["members"]) == 2
    rows = list(csv.DictReader(io.StringIO((tmp_path / "e.csv").read_text())))
    assert list(rows[0]) == ["pair", "fold", "landmark", "before_mm", "after_mm", "spread_mm"]
    assert [(r["pair"], r["fold"], r["landmark"]) for r in rows] == [("a", "0", "0"), ("a", "0", "1"), ("a", "0", "2")]
    assert all(float(r["before_mm"]) == pytest.approx(3.0, abs=1e-4) for r in rows)
    values = np.loadtxt(tmp_path / "e.csv", delimiter=",", skiprows=1, usecols=(3, 4, 5), ndmin=2)
    assert values.shape == (3, 3)
    api.evaluate(ds, tmp_path / "id.json", identity=True, device="cpu", errors_csv=tmp_path / "id.csv")
    identity = np.loadtxt(tmp_path / "id.csv", delimiter=",", skiprows=1, usecols=(3, 4), ndmin=2)
    np.testing.assert_allclose(identity, 3.0, atol=1e-4)


@pytest.mark.parametrize("pid", ["upper, left", "case\n7"])
def test_the_errors_csv_keeps_a_pair_id_holding_a_comma_or_a_line_break_in_its_column(tmp_path, pid):
    ds = _keypoint_dataset(tmp_path, [pid, "plain"], n_landmarks=2)
    api.evaluate(ds, tmp_path / "r.json", identity=True, device="cpu", errors_csv=tmp_path / "e.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "e.csv").read_text(), newline="")))
    assert [r["pair"] for r in rows] == [pid, pid, "plain", "plain"]
    assert all(None not in r and float(r["after_mm"]) == pytest.approx(3.0, abs=1e-4) for r in rows)


# ----------------------------------------------------------------------------- register: an earlier record in -o
def test_register_leaves_the_files_a_foreign_config_json_names_alone(tmp_path):
    _tiny_pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": "another tool", "outputs": ["predictions.csv", "notes.txt"]}))
    for name in ("predictions.csv", "notes.txt"):
        (out / name).write_text("mine")
    api.register(tmp_path / "f.csv", tmp_path / "m.csv", out, device="cpu", verbose=False)
    assert (out / "displacements.csv").is_file()
    assert (out / "predictions.csv").read_text() == "mine" and (out / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- keypoints: every point format
def test_keypoints_of_one_scan_read_back_alike_in_every_format_by_cyclereg_and_open3d(tmp_path):
    """``keypoints CT -o K.{csv,npy,ply,pcd}`` and ``--format l2r`` of one oblique, offset scan: each file
    holds as many points as its configuration counts, and they are the same world points read back by
    cyclereg (the l2r indices through the scan's affine, which the configuration records), and by open3d
    for PLY and PCD (float32 storage and 4 decimals apart at most)."""
    o3d = pytest.importorskip("open3d")
    from scipy import ndimage

    from cyclereg.keypoints.api import config_path_for

    vol = ndimage.gaussian_filter(np.random.default_rng(5).standard_normal((20, 20, 20)), 1.5).astype(np.float32)
    affine = np.array([[0.0, 0.0, -1.5, 400.0], [2.0, 0.0, 0.0, -1250.5], [0.0, 0.8, 0.0, 7.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "ct.nii.gz")
    read = {}
    for name, fmt in (("k.csv", None), ("k.npy", None), ("k.ply", None), ("k.pcd", None), ("l2r.csv", "l2r")):
        api.keypoints(tmp_path / "ct.nii.gz", tmp_path / name, fmt=fmt, device="cpu", verbose=False)
        record = _strict(config_path_for(tmp_path / name).read_text())
        placed = np.array(record["volume"]["affine"]) if fmt == "l2r" else None
        read[name] = read_points(tmp_path / name, affine=placed).double().numpy()
        assert read[name].shape == (record["num_keypoints"], 3), name
        if name.endswith((".ply", ".pcd")):
            np.testing.assert_allclose(np.asarray(o3d.io.read_point_cloud(str(tmp_path / name)).points), read[name],
                                       atol=2e-4, rtol=0)
    assert len(read["k.csv"]) > 5
    for name, pts in read.items():
        np.testing.assert_allclose(pts, read["k.csv"], atol=2e-4, rtol=0, err_msg=name)


def test_points_written_to_a_txt_name_are_csv_and_read_back(tmp_path):
    """``write_points("k.txt")`` without ``fmt``: the csv format (header x_mm,y_mm,z_mm), which
    ``read_points`` reads a ``.txt`` as; the same points back to the 4 decimals csv keeps."""
    pts = torch.tensor([[1.25, -2.5, 3.0], [10.0, 20.125, -0.5]], dtype=torch.float64)
    write_points(tmp_path / "k.txt", pts)
    assert (tmp_path / "k.txt").read_text().splitlines()[0] == "x_mm,y_mm,z_mm"
    torch.testing.assert_close(read_points(tmp_path / "k.txt").double(), pts, rtol=0, atol=1e-4)


def test_register_of_the_demo_files_gives_the_demo_displacements(tmp_path):
    """``demo -o OUT`` registers the clouds as its fixed.csv / moving.csv hold them (4 decimals), so
    ``register OUT/fixed.csv OUT/moving.csv`` (same seed's random network) writes the very displacements of
    ``OUT/displacements.csv`` (the unrounded clouds differed by up to 0.0075 mm: a candidate can flip)."""
    from cyclereg.clouds.api import run_demo

    run_demo(tmp_path / "demo", seed=0, device="cpu")
    api.register(tmp_path / "demo" / "fixed.csv", tmp_path / "demo" / "moving.csv", tmp_path / "reg", seed=0,
                 device="cpu", verbose=False)
    demo = np.loadtxt(tmp_path / "demo" / "displacements.csv", delimiter=",", skiprows=1)
    again = np.loadtxt(tmp_path / "reg" / "displacements.csv", delimiter=",", skiprows=1)
    assert again.shape == (demo.shape[0], 6)
    np.testing.assert_array_equal(again, demo[:, :6])
