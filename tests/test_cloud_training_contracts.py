"""Keypoint-cloud learning path pinned by analytic values and invariants: difficulty weights from the gap
between network output and refined label, weighted draws in batches of batch_size, the logged loss, train-point
subsets with their own labels, the refined pseudo-label stream, forward-backward consistency, augmentation and
TTA ranges and seeds, the moving graph's k, the training box, LR milestones, re-centred learning passes (each
test fails on a specific mutation of the library; 2026-12-07 audit)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cyclereg.clouds import augment
from cyclereg.clouds import pipeline as pipeline_mod
from cyclereg.clouds.features import GraphNetConfig, build_graph_net, moving_graph_k
from cyclereg.clouds.pipeline import CloudRegConfig, registration_box
from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair
from cyclereg.clouds.tps import ThinPlateSpline
from cyclereg.frames import UnitBox
from cyclereg.training import clouds as clouds_mod
from cyclereg.training.clouds import CloudCycleConfig, CloudCycleTask, CloudPairData, cycle_config, learning_prediction
from conftest import intraop_threads

# (test_time_config and test_time_displacements are used through their modules: pytest would collect
# a module-level name starting with ``test_``)

CPU = torch.device("cpu")
BOX = UnitBox((0.0, 0.0, 0.0), (200.0, 100.0, 50.0))
"""Half extents (100, 50, 25) mm: a unit-frame displacement of 0.01 along x is 1 mm."""


@pytest.fixture(autouse=True)
def _one_thread():
    with intraop_threads(1):
        yield


def _pairs(n: int, n_fixed: int = 60, n_moving: int = 80) -> list[CloudPairData]:
    g = torch.Generator().manual_seed(0)
    return [CloudPairData(f"p{i}", torch.rand(n_fixed, 3, generator=g) * 2 - 1,
                          torch.rand(n_moving, 3, generator=g) * 2 - 1) for i in range(n)]


def _fake_learning_stream(monkeypatch, calls: list, predict=None):
    """Replace the learning stream by ``predict(fixed, moving, model, call index)`` (default 0), kept in the
    network's gradient graph; every call's inputs are recorded in ``calls``."""

    def fake(model, fixed, moving, cfg, features=None, graphs=None):
        k = len(calls)
        calls.append({"fixed": fixed.detach().clone(), "moving": moving.detach().clone(), "graphs": graphs})
        out = torch.zeros_like(fixed) if predict is None else predict(fixed, moving, model, k)
        return out + 0 * sum(p.sum() for p in model.parameters())

    monkeypatch.setattr(clouds_mod, "learning_prediction", fake)


def _net():
    return build_graph_net(GraphNetConfig(), seed=0)


# ----------------------------------------------------------------------------- difficulty weights
def test_sampling_weights_rank_pairs_by_the_gap_between_network_output_and_refined_label(monkeypatch):
    """Paper Sec. 2.3.1: a pair's difficulty is how far the network's own output lies from its refined
    pseudo label (not how long the label is), and the pair with the smallest gap gets sigmoid(+5).
    Here the gaps are 1, 5 and 10 mm while the labels are 30, 20 and 10 mm long (opposite order)."""
    pairs = _pairs(3)
    task = CloudCycleTask(pairs, BOX, CloudCycleConfig(), CPU)
    spec = {"p0": (0.01, 0.30), "p1": (0.05, 0.20), "p2": (0.10, 0.10)}  # (raw - refined, refined) along x, unit

    def refine(model, pair, labeller=None):
        gap, length = spec[pair.id]
        ref = torch.zeros_like(pair.fixed)
        ref[:, 0] = length
        raw = ref.clone()
        raw[:, 0] += gap
        return raw, ref

    monkeypatch.setattr(task, "refine", refine)
    labels, info = task.make_pseudo_labels(None, 1)
    assert info["stats"]["pseudo_label_disagreement_mm"] == pytest.approx((1 + 5 + 10) / 3, rel=1e-5)
    assert info["stats"]["mean_pseudo_displacement_mm"] == pytest.approx(20.0, rel=1e-5)
    w = info["weights"]
    assert w["p0"] == pytest.approx(1 / (1 + math.exp(-5)))
    assert w["p1"] == pytest.approx(0.5)
    assert w["p2"] == pytest.approx(1 / (1 + math.exp(5)))
    torch.testing.assert_close(labels["p0"][:, 0], torch.full((60,), 0.30))


# ----------------------------------------------------------------------------- batches
def test_training_draws_pairs_by_their_weights_in_batches_of_batch_size(monkeypatch):
    """An epoch is len(pairs) // batch_size optimiser steps of batch_size samples each, drawn with the
    sampling weights: pairs of weight 0 are never drawn."""
    calls = []
    _fake_learning_stream(monkeypatch, calls)
    pairs = _pairs(4)
    cfg = replace(CloudCycleConfig(), epochs=3, batch_size=2, augment=False)
    task = CloudCycleTask(pairs, BOX, cfg, CPU)
    labels = {p.id: torch.zeros(60, 3) for p in pairs}
    task.train_stage(_net(), labels, {"p0": 1.0, "p1": 0.0, "p2": 1.0, "p3": 0.0}, 1)
    assert len(calls) == 3 * (4 // 2) * 2
    drawn = [next(p.id for p in pairs if torch.equal(c["fixed"], p.fixed)) for c in calls]
    assert set(drawn) == {"p0", "p2"}


def test_the_logged_loss_is_the_mean_per_sample_distance_over_the_last_five_epochs(monkeypatch):
    """Batches of 2 samples, 8 epochs of one step; in epoch e every prediction is e mm off its label, so a
    step's loss is e mm (the mean over its samples, not their sum) and the logged loss is the mean over
    epochs 3..7, 5 mm (2 mm over the first five)."""
    calls = []

    def predict(fixed, moving, model, k):
        out = torch.zeros_like(fixed)
        out[:, 0] = 0.01 * (k // 2)  # 0.01 unit along x = 1 mm in BOX
        return out

    _fake_learning_stream(monkeypatch, calls, predict)
    pairs = _pairs(1)
    cfg = replace(CloudCycleConfig(), epochs=8, batch_size=2, augment=False)
    stats = CloudCycleTask(pairs, BOX, cfg, CPU).train_stage(_net(), {"p0": torch.zeros(60, 3)}, {}, 1)
    assert len(calls) == 16
    assert stats["train_loss_mm"] == pytest.approx(5.0, rel=1e-5)


def test_every_step_applies_the_gradient_of_its_own_batch_alone(monkeypatch):
    """The prediction is (s + 10, 0, 0) with s the sum of the head's last bias, label 0: every sample's
    loss is 100 (s + 10) / batch_size mm, so at every optimiser step the gradient of each bias entry is
    exactly 100 (batch_size samples), not accumulated over earlier steps."""
    seen = []
    real_adam = torch.optim.Adam

    class SpyAdam(real_adam):
        def step(self, closure=None):
            seen.append(net.head[-1].bias.grad.clone())
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)

    def predict(fixed, moving, model, k):
        out = torch.zeros_like(fixed)
        return out + torch.stack([model.head[-1].bias.sum() + 10, out[0, 1], out[0, 2]])

    _fake_learning_stream(monkeypatch, [], predict)
    net = _net()
    pairs = _pairs(2)
    cfg = replace(CloudCycleConfig(), epochs=3, batch_size=2, augment=False)
    CloudCycleTask(pairs, BOX, cfg, CPU).train_stage(net, {p.id: torch.zeros(60, 3) for p in pairs}, {}, 1)
    assert len(seen) == 3
    for grad in seen:
        torch.testing.assert_close(grad, torch.full_like(grad, 100.0), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- point subsets
def test_train_points_draw_random_subsets_of_each_cloud_with_their_own_labels(monkeypatch):
    """--train-points 20,50: every sample holds 20 fixed and 50 moving points, the subsets vary from
    sample to sample, and each fixed point is compared with its own label (a prediction that is the
    label of the point it is given has loss 0)."""
    calls = []
    _fake_learning_stream(monkeypatch, calls, lambda fixed, moving, model, k: 0.1 * fixed)
    pairs = _pairs(1)
    cfg = replace(CloudCycleConfig(), epochs=4, batch_size=1, augment=False, train_fixed_points=20,
                  train_moving_points=50)
    stats = CloudCycleTask(pairs, BOX, cfg, CPU).train_stage(_net(), {"p0": 0.1 * pairs[0].fixed}, {}, 1)
    assert stats["train_loss_mm"] == pytest.approx(0.0, abs=1e-5)
    assert [tuple(c["fixed"].shape) for c in calls] == [(20, 3)] * 4
    assert [tuple(c["moving"].shape) for c in calls] == [(50, 3)] * 4
    rows = set()
    for c in calls:
        idx = torch.cdist(c["fixed"], pairs[0].fixed).argmin(dim=1)
        assert torch.equal(pairs[0].fixed[idx], c["fixed"]) and idx.unique().numel() == 20
        rows |= set(idx.tolist())
    assert len(rows) > 20  # not always the same (first) points


# ----------------------------------------------------------------------------- pseudo-label stream
def test_a_single_networks_refined_label_is_the_smoothed_test_time_registration():
    """The pseudo-label stream registers with the test-time settings (more LBP sweeps, a re-centred
    pass, TTA) and smooths with the refinement TPS; the raw output is the learning stream's."""
    pair = make_breathing_pair(0, BreathingConfig(n_fixed=150, n_moving=300, branches=10, steps=20))
    box = UnitBox.around(pair.fixed_mm, pair.moving_mm, margin=0.05)
    f, m = box.mm_to_unit(pair.fixed_mm), box.mm_to_unit(pair.moving_mm)
    base = CloudCycleConfig()
    cfg = replace(base, refine_tta_passes=1, refine_recentre_passes=1,
                  reg=replace(base.reg, lbp=replace(base.reg.lbp, num_candidates=16)))
    net = build_graph_net(cfg.reg.net, seed=0)
    task = CloudCycleTask([CloudPairData("p", f, m)], box, cfg, CPU)
    raw, ref = task.refine(net, task.pairs[0])
    with torch.no_grad():
        tps = clouds_mod.test_time_config(cfg).tps
        registered = pipeline_mod.test_time_displacements(net, f, m, clouds_mod.test_time_config(cfg))
        expected = ThinPlateSpline.fit(f, registered, regularisation=cfg.refine_tps_regularisation,
                                       kernel=tps.kernel)(f)
        torch.testing.assert_close(raw, learning_prediction(net, f, m, cfg))
        smoothed_raw = ThinPlateSpline.fit(f, raw, regularisation=cfg.refine_tps_regularisation, kernel=tps.kernel)(f)
    torch.testing.assert_close(ref, expected)
    assert (ref - smoothed_raw).abs().max() > 1e-4  # the stream's own registration matters


def test_forward_backward_consistency_averages_with_the_negated_backward_field(monkeypatch):
    """A translation u forward and exactly -u backward are consistent: the refined label is u
    (0.5 (u - (-u))), which the TPS keeps (an affine field)."""
    monkeypatch.setattr(clouds_mod, "learning_prediction", lambda model, fixed, *a, **k: torch.zeros_like(fixed))
    u = torch.tensor([0.03, -0.02, 0.01])
    pairs = _pairs(1, 60, 80)

    def registered(net, a, b, stream, **kw):
        return (u if a.shape[0] == 60 else -u).expand(a.shape[0], 3).clone()

    monkeypatch.setattr(clouds_mod, "test_time_displacements", registered)
    cfg = replace(CloudCycleConfig(), refine_consistency=True)
    raw, ref = CloudCycleTask(pairs, BOX, cfg, CPU).refine(_net(), pairs[0])
    torch.testing.assert_close(ref, u.expand(60, 3), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- augmentation draws
def _rotation_angle_deg(A: torch.Tensor) -> float:
    s = torch.linalg.det(A) ** (1 / 3)
    cos = ((torch.trace(A / s) - 1) / 2).clamp(-1, 1)
    return math.degrees(math.acos(float(cos)))


def test_random_affine_draws_fill_the_configured_ranges():
    """Rotations of at most 10 degrees about each axis (at most 30 in all), scales on both sides of 1
    within +-10 %, translations of both signs within +-0.1."""
    g = torch.Generator().manual_seed(0)
    draws = [augment.random_affine(g, 10.0, 0.1, 0.1, torch.float64) for _ in range(300)]
    angles = [_rotation_angle_deg(A) for A, _ in draws]
    assert max(angles) <= 30.0 + 1e-6 and max(angles) > 10.0
    scales = torch.stack([torch.linalg.det(A) ** (1 / 3) for A, _ in draws])
    assert scales.min() >= 0.9 - 1e-9 and scales.max() <= 1.1 + 1e-9
    assert scales.min() < 0.95 and scales.max() > 1.05
    t = torch.stack([t for _, t in draws])
    assert t.abs().max() <= 0.1
    assert (t.min(0).values < -0.05).all() and (t.max(0).values > 0.05).all()


def test_relative_affine_entries_have_the_configured_spread():
    """R = I + s N, c = s n with standard normal N, n: both spread by s (0.05)."""
    g = torch.Generator().manual_seed(0)
    draws = [augment.random_relative_affine(g, 0.05, torch.float64) for _ in range(2000)]
    dev = torch.stack([R - torch.eye(3, dtype=torch.float64) for R, _ in draws])
    c = torch.stack([c for _, c in draws])
    assert dev.std().item() == pytest.approx(0.05, rel=0.05) and abs(dev.mean().item()) < 0.005
    assert c.std().item() == pytest.approx(0.05, rel=0.05) and abs(c.mean().item()) < 0.005


# ----------------------------------------------------------------------------- graph CNN
def test_moving_graph_scales_k_with_the_point_ratio():
    """k_moving = 0: k_fixed times n_moving / n_fixed, clamped to [k_fixed, 4 k_fixed] (the authors' 4x
    for 2048 and 8192 points)."""
    cfg = GraphNetConfig(k_fixed=10)
    assert moving_graph_k(cfg, 2048, 8192) == 40
    assert moving_graph_k(cfg, 100, 150) == 15
    assert moving_graph_k(cfg, 100, 50) == 10
    assert moving_graph_k(cfg, 100, 1000) == 40
    assert moving_graph_k(replace(cfg, k_moving=7), 100, 1000) == 7


def test_graph_net_head_and_slope():
    """The head normalises each channel over the cloud before its last linear layer, so the features'
    mean over the points is that layer's bias; the edge MLPs' LeakyReLU slope is the configured one."""
    pts = torch.rand(120, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    net = build_graph_net(GraphNetConfig(), seed=0)
    with torch.no_grad():
        feats = net(pts, 10)
        torch.testing.assert_close(feats.mean(0), net.head[-1].bias, rtol=0, atol=1e-5)
        steep = build_graph_net(GraphNetConfig(negative_slope=0.3), seed=0)
        assert (steep(pts, 10) - feats).abs().max() > 1e-3


# ----------------------------------------------------------------------------- test time
def test_tta_averages_the_copies_mapped_back_and_draws_them_from_tta_seed(monkeypatch):
    """With a prediction that is the (transformed) fixed points themselves, a copy x -> A x + t maps
    back to f + A^-1 t: the result is f + sum_i A_i^-1 t_i / (P + 1), the copies drawn from tta_seed with
    the configured rotation, scale and translation ranges."""
    monkeypatch.setattr(pipeline_mod, "joint_recentred_displacements",
                        lambda f, m, feats, config, graphs=None: f.clone())
    g = torch.Generator().manual_seed(2)
    f, m = torch.rand(80, 3, generator=g) * 2 - 1, torch.rand(120, 3, generator=g) * 2 - 1
    cfg = CloudRegConfig(tta_passes=3, tta_seed=7, tta_rotation_deg=20.0, tta_scale=0.3, tta_translation=0.02)
    with torch.no_grad():
        got = pipeline_mod.test_time_displacements(_net(), f, m, cfg)
    draws = torch.Generator().manual_seed(7)
    shift = torch.zeros(3)
    for _ in range(3):
        A, t = augment.random_affine(draws, 20.0, 0.3, 0.02, torch.float32)
        shift = shift + torch.linalg.solve(A, t)
    torch.testing.assert_close(got, f + shift / 4, rtol=0, atol=1e-5)


def test_registration_box_keeps_a_training_box_that_holds_the_clouds_centre():
    """A training box away from the origin: a pair centred inside it is registered in it, one centred
    outside in a box of its extent moved to the pair."""
    trained = UnitBox((100.0, 100.0, 100.0), (60.0, 60.0, 60.0))
    cfg = CloudRegConfig(training_box=trained)
    g = torch.Generator().manual_seed(0)
    f = torch.rand(40, 3, generator=g, dtype=torch.float64) * 20 + 120.0  # centre ~130 mm, inside
    assert registration_box(f, f + 1.0, cfg) == (trained, "training box")
    box, how = registration_box(f - 100.0, f - 99.0, cfg)  # centre ~30 mm, outside
    assert how == "training box, moved to the clouds" and box.extent_mm == trained.extent_mm


def test_lr_milestones_scale_to_the_nearest_epoch():
    """40 and 52 of 60 epochs at 10 epochs: 6.67 -> 7 and 8.67 -> 9."""
    assert cycle_config(epochs=10).lr_milestones == (7, 9)


def test_the_pseudo_label_stream_can_search_its_own_number_of_candidates():
    """refine_num_candidates sets K of the pseudo-label stream and of the stored test-time settings;
    None keeps the learning stream's."""
    cfg = CloudCycleConfig(refine_num_candidates=24)
    assert clouds_mod.test_time_config(cfg).lbp.num_candidates == 24 != cfg.reg.lbp.num_candidates
    assert clouds_mod.test_time_config(CloudCycleConfig()).lbp.num_candidates == CloudCycleConfig().reg.lbp.num_candidates


@pytest.mark.parametrize("passes", [1, 2])
def test_learning_stream_runs_learn_recentre_passes_gradient_free_passes_then_one_differentiable(monkeypatch, passes):
    """learn_recentre_passes = P: P LBP passes without gradients (the first and P - 1 re-centred ones),
    then the one differentiable pass."""
    import cyclereg.clouds.lbp as lbp_mod

    grad_modes = []
    real = lbp_mod.joint_lbp_displacements

    def counted(*a, **k):
        grad_modes.append(torch.is_grad_enabled())
        return real(*a, **k)

    monkeypatch.setattr(pipeline_mod, "joint_lbp_displacements", counted)
    monkeypatch.setattr(clouds_mod, "joint_lbp_displacements", counted)
    pairs = _pairs(1, 60, 80)
    base = CloudCycleConfig()
    cfg = replace(base, learn_recentre_passes=passes,
                  reg=replace(base.reg, lbp=replace(base.reg.lbp, num_candidates=16)))
    learning_prediction(_net(), pairs[0].fixed, pairs[0].moving, cfg)
    assert grad_modes == [False] * passes + [True]

