"""Evaluation and reporting checked against figures known in closed form (mutation audit).

Each test pins a figure a user reads off a report to a value derived by hand: a known registration
field gives known landmark errors, an analytic displacement gives known Jacobian determinants, paired
differences with a known sign pattern give known exact p-values.
"""

import json
import math

import numpy as np
import pytest
import torch

from cyclereg.clouds.pipeline import CloudRegistration, registration_box
from cyclereg.pointio import write_points

# ----------------------------------------------------------------------------- a registration with a known field
B = torch.tensor([[0.05, 0.02, 0.0], [0.0, -0.04, 0.01], [0.03, 0.0, 0.02]], dtype=torch.float64)
T = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)


def _true_field(x):
    """The affine motion the moving landmarks are made with: u(x) = B x + t (mm)."""
    return x @ B.T.to(x) + T.to(x)


def _write_dataset(tmp_path, grid=None, n_pairs=2):
    """Pairs c0, c1 (folds [c0], [c1]); moving landmarks = fixed landmarks + u(fixed landmarks)."""
    g = torch.Generator().manual_seed(3)
    lo = torch.tensor([6.0, 4.0, 4.0], dtype=torch.float64)
    size = torch.tensor([60.0, 14.0, 14.0], dtype=torch.float64)
    pairs = []
    for i in range(n_pairs):
        fk = lo + size * torch.rand(80, 3, generator=g, dtype=torch.float64)
        fl = lo + size * torch.rand(12, 3, generator=g, dtype=torch.float64)
        files = {"fixed_keypoints": fk, "moving_keypoints": fk + torch.tensor([0.5, -0.3, 0.4], dtype=torch.float64),
                 "fixed_landmarks": fl, "moving_landmarks": fl + _true_field(fl)}
        entry = {"id": f"c{i}"}
        for key, pts in files.items():
            write_points(tmp_path / f"c{i}" / f"{key}.csv", pts)
            entry[key] = f"c{i}/{key}.csv"
        pairs.append(entry)
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"name": "known", "pairs": pairs, "folds": [[p["id"]] for p in pairs], **(grid or {})}))
    return ds


def _landmarks(tmp_path, pid):
    from cyclereg.pointio import read_points

    return (read_points(tmp_path / pid / "fixed_landmarks.csv").double(),
            read_points(tmp_path / pid / "moving_landmarks.csv").double())


def _register_with(monkeypatch, field, spread=None, analytic=True):
    """Make every registration (of ``evaluate``, ``register``) the displacement ``field`` (mm -> mm) at the
    fixed points; with ``analytic`` also where the TPS would be evaluated (at landmarks, on the dense grid:
    every voxel, no upsampling), and the members' spread (``spread``: mm -> (N,) mm) where one is asked."""
    from dataclasses import replace

    import cyclereg.clouds.api as api

    class Analytic(CloudRegistration):
        def at(self, query_mm, spline=None):
            return field(query_mm.to(self.fixed_mm))

        @property
        def spread_mm(self):
            return None if spread is None else spread(self.fixed_mm)

        def spread_at(self, query_mm):
            return None if spread is None else spread(query_mm.to(self.fixed_mm))

    def register(fixed_mm, moving_mm, net, config, *, box=None, spread=False):
        box = box or registration_box(fixed_mm, moving_mm, config)[0]
        return (Analytic if analytic else CloudRegistration)(
            fixed_mm=fixed_mm, displacements_mm=field(fixed_mm), box=box, tps=replace(config.tps, grid_step=1))

    monkeypatch.setattr(api, "register_clouds", register)


def test_evaluate_tre_of_a_known_half_registration(tmp_path, monkeypatch):
    """A registration recovering half of the true affine motion leaves exactly half of every landmark's
    initial error: after = 0.5 * before per landmark (so per statistic), and before is |u(fixed landmark)|.
    Catches a flipped displacement sign, the field taken at the moving landmarks, landmark roles swapped,
    the initial TRE or the median reported as the mean TRE."""
    from cyclereg.clouds.api import evaluate_keypoint_dataset

    ds = _write_dataset(tmp_path)
    _register_with(monkeypatch, lambda x: 0.5 * _true_field(x))
    errors = tmp_path / "e.csv"
    r = evaluate_keypoint_dataset(ds, tmp_path / "r.json", identity=True, device="cpu", quiet=True, errors_csv=errors)
    assert [c["id"] for c in r["cases"]] == ["c0", "c1"] and [c["fold"] for c in r["cases"]] == [1, 2]
    befores = []
    for case in r["cases"]:
        fl, _ = _landmarks(tmp_path, case["id"])
        before = _true_field(fl).norm(dim=1).numpy()
        befores.append(before.mean())
        assert case["tre_before_mm"]["mean"] == pytest.approx(before.mean(), abs=5e-4)
        assert case["tre_before_mm"]["p50"] == pytest.approx(float(np.median(before)), abs=5e-4)
        for key in ("mean", "std", "p25", "p50", "p75"):
            assert case["tre_after_mm"][key] == pytest.approx(0.5 * case["tre_before_mm"][key], abs=5e-4), key
    assert r["initial_tre_mm"] == pytest.approx(np.mean(befores), abs=5e-4)
    assert r["mean_tre_mm"] == pytest.approx(0.5 * np.mean(befores), abs=5e-4)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["mean_tre_mm"] == pytest.approx(r["mean_tre_mm"]) and saved["num_pairs"] == 2
    rows = [line.split(",") for line in errors.read_text().splitlines()[1:]]
    assert [(r_[0], int(r_[1])) for r_ in rows] == [("c0", 1)] * 12 + [("c1", 2)] * 12
    np.testing.assert_allclose([float(r_[4]) for r_ in rows], [0.5 * float(r_[3]) for r_ in rows], atol=2e-4)


def test_evaluate_one_fold_scores_exactly_that_folds_pairs(tmp_path, monkeypatch):
    from cyclereg.clouds.api import evaluate_keypoint_dataset

    ds = _write_dataset(tmp_path, n_pairs=3)
    _register_with(monkeypatch, _true_field)  # the exact motion: TRE 0
    r = evaluate_keypoint_dataset(ds, tmp_path / "r.json", identity=True, device="cpu", quiet=True, folds="2")
    assert [c["id"] for c in r["cases"]] == ["c1"] and r["folds"] == [2] and r["num_pairs"] == 1
    assert r["mean_tre_mm"] == pytest.approx(0.0, abs=5e-4) and r["initial_tre_mm"] > 1.0


def test_evaluate_smoothness_of_a_known_quadratic_field(tmp_path, monkeypatch):
    """u_x = c x^2 (mm) on a grid with sx = 2 mm: J = 1 + 2 c x exactly at every interior voxel (central
    differences are exact for quadratics; x = k sx); SDlogJ, std(log J) and the folding fraction follow
    in closed form, per case and as the report's means. Catches the grid's spacing left out of the field,
    a report mean taken from another figure."""
    from cyclereg.clouds.api import evaluate_keypoint_dataset

    shape, spacing = (7, 8, 40), (3.0, 2.5, 2.0)  # z, y, x
    ds = _write_dataset(tmp_path, grid={"volume_shape_zyx": list(shape), "spacing_zyx_mm": list(spacing)})
    c = -0.01

    def field(x):
        u = torch.zeros_like(x)
        u[:, 0] = c * x[:, 0] ** 2
        return u

    _register_with(monkeypatch, field)
    r = evaluate_keypoint_dataset(ds, tmp_path / "r.json", model="random", device="cpu", quiet=True)
    k = np.arange(1, shape[2] - 1)  # interior voxels along x (the border is dropped)
    J = np.broadcast_to(1 + 2 * c * k * spacing[2], (shape[0] - 2, shape[1] - 2, shape[2] - 2))
    want = {"sdlogj": float(np.log(np.clip(J[1:-1, 1:-1, 1:-1] + 3, 1e-9, 1e9)).std()),
            "std_logj": float(np.log(J[J > 0]).std(ddof=1)), "folding_fraction": float((J <= 0).mean())}
    assert 0 < want["folding_fraction"] < 1 and len({round(v, 6) for v in want.values()}) == 3
    for case in r["cases"]:
        for key, value in want.items():
            assert case[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
        fl, ml = _landmarks(tmp_path, case["id"])
        after = (fl + field(fl) - ml).norm(dim=1).numpy()
        assert case["tre_after_mm"]["mean"] == pytest.approx(after.mean(), abs=5e-4)
    for key, value in want.items():
        assert r[f"mean_{key}"] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def test_evaluate_spread_correlation_is_with_the_errors_after_registration(tmp_path, monkeypatch):
    """--spread: the reported Spearman correlation of the members' spread with the landmark errors is the one
    with the errors *after* registration (here |h(x)|, h the part of the motion the registration misses),
    pooled over the landmarks of every case, computed independently with scipy."""
    from dataclasses import replace

    from scipy import stats

    import cyclereg.clouds.api as api
    from cyclereg.clouds.api import evaluate_keypoint_dataset

    def missed(x):
        h = torch.zeros_like(x)
        h[:, 1] = 2.0 * torch.sin(x[:, 2] / 3.0) + 0.1 * x[:, 0]
        return h

    # a spread is a root-mean-square distance (>= 0, which tre_stats requires): shifted by 1 mm, the ranks unchanged
    spread = lambda x: 1.0 + 0.01 * x[:, 0] + 0.3 * torch.cos(x[:, 1])  # noqa: E731
    ds = _write_dataset(tmp_path)
    _register_with(monkeypatch, lambda x: _true_field(x) - missed(x), spread=spread)
    real = api.load_cloud_model
    monkeypatch.setattr(api, "load_cloud_model", lambda *a, **k: (lambda net, cfg: (net, replace(cfg, ensemble_size=2)))(
        *real(*a, **k)))
    r = evaluate_keypoint_dataset(ds, tmp_path / "r.json", model="random", device="cpu", quiet=True, spread=True)
    fls = [_landmarks(tmp_path, c)[0] for c in ("c0", "c1")]
    after = torch.cat([missed(f).norm(dim=1) for f in fls]).numpy()
    before = torch.cat([_true_field(f).norm(dim=1) for f in fls]).numpy()
    s = torch.cat([spread(f) for f in fls]).numpy()
    want = stats.spearmanr(s, after).statistic
    assert abs(want - stats.spearmanr(s, before).statistic) > 0.05  # the two differ here
    assert r["member_spread"]["spearman_landmarks"] == pytest.approx(want, abs=1e-6)
    assert r["member_spread"]["mean_at_landmarks_mm"] == pytest.approx(s.mean(), rel=1e-5)


def test_register_writes_the_field_at_the_fixed_and_the_query_points(tmp_path, monkeypatch):
    """An affine registration u(x) = B x + t: displacements.csv holds u at the fixed points, and
    query_displacements.csv u at the query points (the TPS reproduces an affine field exactly)."""
    from cyclereg.clouds.api import register_cloud_files
    from cyclereg.pointio import read_points

    g = torch.Generator().manual_seed(5)
    fixed = 10 + 50 * torch.rand(60, 3, generator=g, dtype=torch.float64)
    query = 15 + 40 * torch.rand(9, 3, generator=g, dtype=torch.float64)
    write_points(tmp_path / "f.csv", fixed)
    write_points(tmp_path / "m.csv", fixed + 1.0)
    write_points(tmp_path / "q.csv", query)
    _register_with(monkeypatch, _true_field, analytic=False)
    register_cloud_files(tmp_path / "f.csv", tmp_path / "m.csv", tmp_path / "out", query=tmp_path / "q.csv",
                         device="cpu")
    for name, pts in (("displacements.csv", fixed), ("query_displacements.csv", query)):
        rows = np.array([[float(v) for v in line.split(",")] for line in
                         (tmp_path / "out" / name).read_text().splitlines()[1:]])
        np.testing.assert_allclose(rows[:, :3], read_points(tmp_path / ("f.csv" if pts is fixed else "q.csv")).numpy(),
                                   atol=1e-4)
        np.testing.assert_allclose(rows[:, 3:6], _true_field(torch.from_numpy(rows[:, :3])).numpy(), atol=1e-3)


# ----------------------------------------------------------------------------- metrics in closed form
def test_spearman_equals_the_rank_correlation_for_any_order():
    """Ranks are the inverse of the sorting permutation: [0.3, 0.1, 0.2] ranks as [2, 0, 1] (its argsort
    is [1, 2, 0]); the earlier hand-computed cases used self-inverse permutations, for which the two agree."""
    from cyclereg.metrics import spearman

    a = torch.tensor([0.3, 0.1, 0.2, 0.5, 0.4])  # ranks [2, 0, 1, 4, 3]
    b = torch.tensor([0.2, 0.5, 0.1, 0.3, 0.4])  # ranks [1, 4, 0, 2, 3]
    assert spearman(a, b) == pytest.approx(-0.1)  # sum d^2 = 22: 1 - 6 * 22 / 120 (argsorts as ranks: +0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, generator=g, dtype=torch.float64), torch.rand(30, generator=g, dtype=torch.float64)
    rx, ry = (torch.argsort(torch.argsort(v)).double() for v in (x, y))
    n = 30
    assert spearman(x, y) == pytest.approx(1 - 6 * float(((rx - ry) ** 2).sum()) / (n * (n * n - 1)), rel=1e-12)


def test_sdlogj_clips_j_plus_3_as_learn2reg_where_the_field_folds_hard():
    """u_0 = -i^2 / 2: J = 1 - i exactly, down to -5 at i = 6; Learn2Reg's log(clip(J + 3, 1e-9, 1e9))
    keeps J + 3 <= 0 finite (log 1e-9) instead of NaN / -inf."""
    from cyclereg.metrics import sdlogj

    d = 9
    i = torch.arange(d, dtype=torch.float64).view(-1, 1, 1)
    u = torch.zeros(1, 3, d, 6, 6, dtype=torch.float64)
    u[:, 0] = -(i ** 2) / 2
    J = (1 - np.arange(1, d - 1, dtype=np.float64))[:, None, None] * np.ones((1, 4, 4))
    expected = np.log(np.clip(J[1:-1, 1:-1, 1:-1] + 3, 1e-9, 1e9)).std()
    s = sdlogj(u)
    assert math.isfinite(s["sdlogj"]) and s["sdlogj"] == pytest.approx(float(expected), rel=1e-12)
    assert s["folding_fraction"] == pytest.approx(float((J <= 0).mean()))


# ----------------------------------------------------------------------------- compare
def test_tied_pairs_do_not_change_the_paired_tests():
    """compare drops pairs whose values are equal before both tests: appending tied pairs leaves the
    Wilcoxon and sign-test p-values exactly as they were (scipy on differences that still hold zeros
    falls back to the normal approximation when other differences tie in magnitude). With all 6
    differences better, the exact two-sided signed-rank p-value is 2 / 2^6 whatever is appended."""
    from cyclereg.compare import paired_statistics

    diffs = [-4.0, -3.0, -3.0, -2.0, -2.0, 1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0]  # tied magnitudes
    base = [10.0 + i for i in range(len(diffs))]
    plain = paired_statistics(base, [b + d for b, d in zip(base, diffs)], lower_is_better=True)
    tied = paired_statistics(base + [7.0, 8.0], [b + d for b, d in zip(base, diffs)] + [7.0, 8.0], lower_is_better=True)
    assert tied["tied"] == 2 and plain["tied"] == 0
    assert tied["wilcoxon_p"] == plain["wilcoxon_p"] and tied["sign_test_p"] == plain["sign_test_p"]
    better = paired_statistics([5.0] * 8, [4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 5.0, 5.0], lower_is_better=True)
    assert better["wilcoxon_p"] == pytest.approx(2 / 2 ** 6) and better["sign_test_p"] == pytest.approx(2 / 2 ** 6)


def _volume_report(path, values: dict):
    """A minimal volume report: per pair (dice, hd95_mm)."""
    pairs = [{"id": k, "dice": d, "hd95_mm": h, "sdlogj": 0.1} for k, (d, h) in values.items()]
    path.write_text(json.dumps({"dataset": "abd.json", "method": path.stem, "pairs": pairs}))
    return path


def test_compare_hd95_counts_a_smaller_distance_as_better_and_reports_both_means(tmp_path):
    """HD95 is a distance: other's 4 pairs all 2 mm closer are 4 better, none worse; base_mean and
    other_mean are the two reports' own means (25 and 23 mm), mean_difference their difference; the
    comparison names the first report as its base."""
    from cyclereg.compare import compare_reports

    a = _volume_report(tmp_path / "a.json", {f"p{i}": (0.5, 22.0 + 2 * i) for i in range(4)})
    b = _volume_report(tmp_path / "b.json", {f"p{i}": (0.5, 20.0 + 2 * i) for i in range(4)})
    r = compare_reports([a, b], metric="hd95", quiet=True)
    c = r["comparisons"][0]
    assert r["lower_is_better"] is True and r["unit"] == "mm" and r["base"] == str(a)
    assert c["report"] == str(b)
    assert (c["better"], c["worse"], c["tied"]) == (4, 0, 0)
    assert (c["base_mean"], c["other_mean"], c["mean_difference"]) == pytest.approx((25.0, 23.0, -2.0))
    d = compare_reports([a, b], quiet=True)["comparisons"][0]  # Dice: equal everywhere
    assert (d["better"], d["worse"], d["tied"]) == (0, 0, 4) and d["base_mean"] == d["other_mean"] == 0.5


def test_compare_leaves_out_a_non_finite_value_as_missing(tmp_path):
    """A report written by another tool may hold NaN / Infinity (JSON extensions Python reads): such a
    pair is left out as documented (`left_out`), not refused as a damaged report."""
    from cyclereg.compare import compare_reports

    a = _volume_report(tmp_path / "a.json", {"p1": (0.3, 10.0), "p2": (0.4, 10.0), "p3": (0.5, 10.0)})
    b = tmp_path / "b.json"
    b.write_text('{"dataset": "abd.json", "pairs": [{"id": "p1", "dice": 0.35}, {"id": "p2", "dice": NaN}, '
                 '{"id": "p3", "dice": Infinity}]}')
    c = compare_reports([a, b], quiet=True)["comparisons"][0]
    assert c["left_out"] == ["p2", "p3"] and c["n"] == 1
    assert c["mean_difference"] == pytest.approx(0.05) and c["better"] == 1


# ----------------------------------------------------------------------------- datasets
def test_dataset_folds_split_the_pairs_into_held_out_and_training(tmp_path):
    """Fold k holds out its listed pairs and trains on exactly the others; 'all' (or None) selects every
    fold 1..n; paths are resolved against the dataset file's folder, landmarks keep their roles."""
    from cyclereg.datasets import load_keypoint_dataset, select_folds

    ds_path = _write_dataset(tmp_path, n_pairs=3)
    obj = json.loads(ds_path.read_text())
    obj["folds"] = [["c0", "c2"], ["c1"]]
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    for entry in obj["pairs"]:
        for key in ("fixed_keypoints", "moving_keypoints", "fixed_landmarks", "moving_landmarks"):
            entry[key] = "../" + entry[key]
    (sub / "ds.json").write_text(json.dumps(obj))
    ds = load_keypoint_dataset(sub / "ds.json")
    assert select_folds(ds, "all") == select_folds(ds, None) == [1, 2] and select_folds(ds, "2") == [2]
    assert [ds.fold_of(p) for p in ("c0", "c1", "c2")] == [1, 2, 1]
    assert ds.training_ids(1) == ["c1"] and ds.training_ids(2) == ["c0", "c2"]
    assert ds.training_ids(None) == ["c0", "c1", "c2"]
    pair = ds.pair("c1")
    assert pair.fixed_landmarks.resolve() == (tmp_path / "c1" / "fixed_landmarks.csv").resolve()
    fl, ml = ds.read_landmarks(pair, "pair c1")
    want_f, want_m = _landmarks(tmp_path, "c1")
    torch.testing.assert_close(fl.double(), want_f)
    torch.testing.assert_close(ml.double(), want_m)
