"""Real-data end-to-end walk of the fast commands (audited 2026-12-07): ``evaluate --identity`` of the
DIR-Lab COPD keypoint dataset with ``--errors-csv`` and ``--folds``, ``compare`` of such reports, and
``register --model random`` of a real COPD pair's keypoint files with ``--query``. Every figure is checked
against what the dataset's own CSVs give when computed independently here (mean landmark distances, 300
landmarks per pair, the paper's folds), not against what the commands printed. The tests skip when
``../shared/data`` is absent."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import shared_path
from cyclereg_cli.main import app

runner = CliRunner()


def _mm(path: Path) -> np.ndarray:
    with open(path) as fh:
        assert fh.readline().strip() == "x_mm,y_mm,z_mm"
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)


def _landmark_distances(ds: Path) -> dict[str, np.ndarray]:
    """Per pair id: |fixed_landmark - moving_landmark| of each of its landmarks (the identity's errors)."""
    spec = json.loads(ds.read_text())
    return {p["id"]: np.linalg.norm(_mm(ds.parent / p["fixed_landmarks"]) - _mm(ds.parent / p["moving_landmarks"]),
                                    axis=1) for p in spec["pairs"]}


def _fold_of(ds: Path) -> dict[str, int]:
    spec = json.loads(ds.read_text())
    folds = spec["folds"]
    out = {}
    for k, f in enumerate(folds, start=1):
        ids = f["test"] if isinstance(f, dict) else f
        for i in ids:
            out[i] = k
    return out


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    """``evaluate --identity`` of the whole COPD dataset with ``--errors-csv``: (dataset, report, rows)."""
    ds = shared_path("copd-keypoints", "dataset.json")
    d = tmp_path_factory.mktemp("identity")
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(d / "r.json"),
                              "--errors-csv", str(d / "e.csv")])
    assert res.exit_code == 0, res.output
    with open(d / "e.csv") as fh:
        rows = list(csv.DictReader(fh))
    return ds, d / "r.json", rows


def test_identity_tre_equals_the_landmark_distances_computed_from_the_csvs(identity):
    ds, report, _ = identity
    r = json.loads(report.read_text())
    dist = _landmark_distances(ds)
    assert [c["id"] for c in r["cases"]] == list(dist)
    for c in r["cases"]:
        assert c["n_landmarks"] == 300
        assert c["tre_before_mm"]["mean"] == pytest.approx(dist[c["id"]].mean(), abs=1e-5)
        assert c["tre_after_mm"]["mean"] == pytest.approx(dist[c["id"]].mean(), abs=1e-5)
    mean = np.mean([v.mean() for v in dist.values()])
    assert mean == pytest.approx(11.99, abs=0.005)  # the data README's initial TRE
    assert r["initial_tre_mm"] == pytest.approx(mean, abs=1e-5) and r["mean_tre_mm"] == r["initial_tre_mm"]
    assert r["mean_sdlogj"] == 0.0 and r["mean_folding_fraction"] == 0.0


def test_identity_errors_csv_has_300_rows_per_pair_with_its_fold_and_the_report_mean(identity):
    ds, report, rows = identity
    r = json.loads(report.read_text())
    dist, fold = _landmark_distances(ds), _fold_of(ds)
    assert list(rows[0]) == ["pair", "fold", "landmark", "before_mm", "after_mm"]
    assert len(rows) == 3000
    for pid, d in dist.items():
        mine = [row for row in rows if row["pair"] == pid]
        assert [int(row["landmark"]) for row in mine] == list(range(300))
        assert {int(row["fold"]) for row in mine} == {fold[pid]} == {(int(pid[-2:]) + 1) // 2}
        np.testing.assert_allclose([float(row["before_mm"]) for row in mine], d, atol=1e-4)
        np.testing.assert_allclose([float(row["after_mm"]) for row in mine], d, atol=1e-4)
    per_pair = [np.mean([float(row["after_mm"]) for row in rows if row["pair"] == p]) for p in dist]
    assert np.mean(per_pair) == pytest.approx(r["mean_tre_mm"], abs=1e-5)


def test_compare_of_a_report_with_itself_and_with_its_fold_1_subset(identity, tmp_path):
    ds, report, _ = identity
    res = runner.invoke(app, ["compare", str(report), str(report), "--json", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    c = json.loads((tmp_path / "c.json").read_text())["comparisons"][0]
    assert c["n"] == 10 and c["mean_difference"] == 0.0 and c["ci95"] == [0.0, 0.0]
    assert (c["better"], c["worse"], c["tied"]) == (0, 0, 10)
    assert all(p["base"] == p["other"] for p in c["pairs"])
    # an identity of fold 1 only (copd01, copd02) shares exactly those two pairs with the whole one, unchanged
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--folds", "1", "--json", str(tmp_path / "f1.json")])
    assert res.exit_code == 0, res.output
    f1 = json.loads((tmp_path / "f1.json").read_text())
    assert [x["id"] for x in f1["cases"]] == ["copd01", "copd02"] and f1["folds"] == [1]
    res = runner.invoke(app, ["compare", str(report), str(tmp_path / "f1.json"), "--json", str(tmp_path / "c1.json")])
    assert res.exit_code == 0, res.output
    c1 = json.loads((tmp_path / "c1.json").read_text())["comparisons"][0]
    assert c1["n"] == 2 and [p["id"] for p in c1["pairs"]] == ["copd01", "copd02"] and c1["tied"] == 2


def test_register_random_of_a_real_copd_pair_with_the_landmarks_as_query(tmp_path):
    root = shared_path("copd-keypoints", "copd01")
    fixed = root / "fixed_keypoints.csv"
    res = runner.invoke(app, ["register", str(fixed), str(root / "moving_keypoints.csv"), "-o", str(tmp_path / "o"),
                              "--model", "random", "--query", str(root / "fixed_landmarks.csv"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    disp, query = tmp_path / "o" / "displacements.csv", tmp_path / "o" / "query_displacements.csv"
    for path, points in ((disp, _mm(fixed)), (query, _mm(root / "fixed_landmarks.csv"))):
        with open(path) as fh:
            assert fh.readline().strip() == "x_mm,y_mm,z_mm,dx_mm,dy_mm,dz_mm"
        got = np.loadtxt(path, delimiter=",", skiprows=1)
        assert got.shape == (len(points), 6)
        np.testing.assert_allclose(got[:, :3], points, atol=1e-4)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert Path(cfg["fixed"]).resolve() == fixed.resolve() and cfg["model"] == "random"


SPACING = (1.25, 1.0, 1.75)  # the COPD grid's voxel size along x, y, z (dataset.json's spacing_zyx_mm reversed)
SHIFT = np.array([5.0, -3.0, 2.0])


@pytest.fixture(scope="module")
def voxel_register(tmp_path_factory):
    """``register --model random --spacing 1.25,1.0,1.75 --query`` of copd01's fixed keypoints against
    themselves moved by SHIFT mm, all three files as headerless Learn2Reg voxel indices."""
    root = shared_path("copd-keypoints", "copd01")
    d = tmp_path_factory.mktemp("voxels")
    fixed, landmarks = _mm(root / "fixed_keypoints.csv"), _mm(root / "fixed_landmarks.csv")
    for name, points in (("f.csv", fixed), ("m.csv", fixed + SHIFT), ("q.csv", landmarks)):
        np.savetxt(d / name, points / np.array(SPACING), delimiter=",", fmt="%.8f")
    res = runner.invoke(app, ["register", str(d / "f.csv"), str(d / "m.csv"), "-o", str(d / "o"), "--model", "random",
                              "--spacing", ",".join(map(str, SPACING)), "--query", str(d / "q.csv"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return d, fixed, landmarks


def test_register_voxel_index_files_with_spacing_recovers_a_known_shift_in_mm(voxel_register):
    d, fixed, landmarks = voxel_register
    disp = np.loadtxt(d / "o" / "displacements.csv", delimiter=",", skiprows=1)
    query = np.loadtxt(d / "o" / "query_displacements.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(disp[:, :3], fixed, atol=1e-4)  # written in mm: index * spacing
    np.testing.assert_allclose(query[:, :3], landmarks, atol=1e-4)
    np.testing.assert_allclose(np.median(disp[:, 3:6], axis=0), SHIFT, atol=1e-3)
    np.testing.assert_allclose(np.median(query[:, 3:6], axis=0), SHIFT, atol=1e-3)


def test_register_config_records_the_spacing_and_the_query_file(voxel_register):
    d, _, _ = voxel_register
    cfg = json.loads((d / "o" / "config.json").read_text())
    values = [v for k, v in cfg.items() if k != "config"]
    assert any(isinstance(v, list) and [float(x) for x in v] == list(SPACING) for v in values), sorted(cfg)
    assert any(isinstance(v, str) and Path(v).name == "q.csv" for v in values), sorted(cfg)
