"""Contracts of the keypoint-cloud core (kNN graphs, graph CNN plumbing, augmentation, synthetic lungs)
that a mutation audit of ``cyclereg/clouds/{knn,graphs,features,augment,synthetic}.py`` found open:
each test fails on a specific mutation of the library that the rest of the suite let through, and
checks an analytic answer or an invariant on tiny inputs (brute-force neighbours, Euler angles of the
augmentation, the closed form of the synthetic breathing field), never a snapshot of earlier output."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from cyclereg.clouds import augment
from cyclereg.clouds.features import (GraphNetConfig, FeatureEnsemble, KnnMaxAggregation, build_graph_net,
                                      moving_graph_k, regular_block_size)
from cyclereg.clouds.graphs import PairGraphs, is_similarity
from cyclereg.clouds.knn import knn_chunk_rows, knn_edge_index, knn_indices, symmetric_edge_index
from cyclereg.clouds.lbp import LBPConfig
from cyclereg.clouds.synthetic import BreathingConfig, _vessel_tree, breathing_field, make_breathing_pair


def _cloud(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _brute_knn(points: torch.Tensor, k: int) -> list[list[int]]:
    """The ``k`` nearest other points of every point, by a double loop over squared distances."""
    n = points.shape[0]
    out = []
    for i in range(n):
        d = [((points[i] - points[j]) ** 2).sum().item() if j != i else math.inf for j in range(n)]
        out.append(sorted(range(n), key=lambda j: d[j])[:k])
    return out


# ----------------------------------------------------------------------------- knn
def test_knn_refuses_points_of_two_dimensions_by_name():
    with pytest.raises(ValueError, match=r"query \(4, 3\) / reference \(5, 2\)"):
        knn_indices(_cloud(4, 0), _cloud(5, 1)[:, :2], 1)


def test_knn_refuses_a_bool_k():
    """``True`` is an int to Python but not a neighbour count."""
    with pytest.raises(ValueError, match="k: expected a whole number >= 0, got True"):
        knn_indices(_cloud(4, 0), _cloud(5, 1), True)


def test_knn_with_k_zero_is_empty_and_k_of_every_point_is_all_of_them():
    q, r = _cloud(4, 0), _cloud(5, 1)
    assert knn_indices(q, r, 0).shape == (4, 0)
    every = knn_indices(q, r, 5)  # k = M is allowed: every reference point, nearest first
    assert all(sorted(row) == list(range(5)) for row in every.tolist())
    d = torch.cdist(q, r).gather(1, every)
    assert (d[:, 1:] >= d[:, :-1]).all()
    with pytest.raises(ValueError, match="k=6: needs 6 points, reference has only 5"):
        knn_indices(q, r, 6)


def test_knn_excluding_self_counts_the_excluded_point():
    """With ``exclude_self`` only ``M - 1`` other points exist: ``k = M - 1`` gives them all, ``k = M`` is refused
    (not answered with the point itself or an infinite distance)."""
    p = _cloud(5, 2)
    others = knn_indices(p, p, 4, exclude_self=True)
    assert all(sorted(row) == sorted(set(range(5)) - {i}) for i, row in enumerate(others.tolist()))
    with pytest.raises(ValueError, match=r"k=5 and the point itself \(excluded\): needs 6 points, reference has only 5"):
        knn_indices(p, p, 5, exclude_self=True)


def test_knn_edge_index_names_k_as_given():
    """With its self loop, ``knn_edge_index`` searches ``k - 1`` others: its errors named that count
    (``k=0`` said "got -1", ``k=6`` on 5 points "k=5: reference has only 5 points"), and ``k=True`` gave a
    graph of self loops."""
    p = _cloud(5, 2)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=f"k: expected a whole number >= 1, got {bad!r}"):
            knn_edge_index(p, bad)
    with pytest.raises(ValueError, match="k=6: the cloud has only 5 points"):
        knn_edge_index(p, 6)
    assert knn_edge_index(p, 5).shape == (2, 25) and knn_edge_index(p, 0, include_self=False).shape == (2, 0)


def test_knn_of_an_empty_query_is_an_index_tensor_of_width_k():
    out = knn_indices(_cloud(3, 0)[:0], _cloud(3, 0), 2)
    assert out.shape == (0, 2) and out.dtype == torch.long


def test_knn_against_an_empty_reference_with_k_zero():
    assert knn_indices(_cloud(3, 0), _cloud(3, 0)[:0], 0).shape == (3, 0)


def test_knn_pieces_have_at_least_one_row_for_any_reference():
    """A reference so large that one distance row exceeds the CPU piece still searches one row at a time."""
    assert knn_chunk_rows(10**7, 8, torch.device("cpu")) == 1
    assert knn_chunk_rows(0, 4, torch.device("cpu")) >= 1


def test_knn_edge_index_without_self_loops_has_k_other_neighbours():
    p = _cloud(12, 3)
    ei = knn_edge_index(p, 3, include_self=False)
    assert ei.shape == (2, 36) and (ei[0] != ei[1]).all()
    brute = _brute_knn(p, 3)
    for i in range(12):
        assert sorted(ei[0, ei[1] == i].tolist()) == sorted(brute[i])


def test_knn_edge_index_rows_are_source_then_target_in_blocks_per_target():
    """Row 0 the neighbour j, row 1 the centre i, centres in blocks ``[0]*k + [1]*k + ...``: with k = 2 and
    self loops, each centre's second source is its nearest other point (not the other way round)."""
    p = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0], [7.0, 0, 0]], dtype=torch.float64)
    ei = knn_edge_index(p, 2, include_self=True)
    assert ei[1].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ei[0].tolist() == [0, 1, 1, 0, 2, 1, 3, 2]


def test_symmetric_edge_index_is_the_union_of_both_directions_of_the_knn_graph():
    p = _cloud(15, 4)
    brute = _brute_knn(p, 2)
    want = {(j, i) for i in range(15) for j in brute[i]}
    want |= {(i, j) for j, i in want}
    ei, rev = symmetric_edge_index(p, 2)
    got = list(zip(ei[0].tolist(), ei[1].tolist()))
    assert len(got) == len(set(got)) and set(got) == want
    assert torch.equal(ei[:, rev], ei.flip(0))


# ----------------------------------------------------------------------------- graphs
def test_pair_graphs_use_each_configured_neighbourhood():
    """The LBP graph has ``graph_k`` neighbours, the graph CNN's fixed graph ``k_fixed`` (self included), the
    moving one :func:`moving_graph_k`, and the candidates are the ``min(K, M)`` nearest moving points."""
    f, m = _cloud(20, 5), _cloud(9, 6)
    net, lbp = GraphNetConfig(k_fixed=4), LBPConfig(num_candidates=16, graph_k=3)
    g = PairGraphs.build(f, m, net, lbp)
    edges, reverse = symmetric_edge_index(f, 3)
    assert torch.equal(g.lbp_edges, edges) and torch.equal(g.lbp_reverse, reverse)
    assert torch.equal(g.fixed_edges, knn_edge_index(f, 4, include_self=True))
    assert torch.equal(g.moving_edges, knn_edge_index(m, moving_graph_k(net, 20, 9), include_self=True))
    assert torch.equal(g.candidates, knn_indices(f, m, 9))
    assert g.feature_edges[0] is g.fixed_edges and g.lbp_graph[1] is g.lbp_reverse


def test_is_similarity_tolerance_is_relative_to_the_scale():
    """A 0.1 % shear is not a similarity at any scale; a float32 rotation is one at any scale."""
    shear = torch.eye(3, dtype=torch.float64)
    shear[0, 1] = 1e-3
    stretch = torch.diag(torch.tensor([1.0, 1.0, 1.003], dtype=torch.float64))
    c, s = math.cos(0.3), math.sin(0.3)
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float32)
    for scale in (1e-3, 1.0, 300.0):
        assert not is_similarity(scale * shear) and not is_similarity(scale * stretch)
        assert is_similarity(scale * rot)


def test_is_similarity_names_a_matrix_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"A: expected \(3, 3\), got \(2, 2\)"):
        is_similarity(torch.eye(2))


# ----------------------------------------------------------------------------- features
def test_regular_block_size_checks_every_entry_of_a_block():
    assert regular_block_size(torch.tensor([0, 1, 1, 1]), 2) is None
    assert regular_block_size(torch.tensor([0, 0, 1, 0]), 2) is None
    assert regular_block_size(torch.tensor([0, 0, 1, 1]), 2) == 2


def test_knn_max_aggregation_of_nodes_without_edges_is_pygs():
    from torch_geometric.nn.aggr import MaxAggregation

    x = torch.zeros(0, 4)
    index = torch.zeros(0, dtype=torch.long)
    assert regular_block_size(index, 3) is None
    torch.testing.assert_close(KnnMaxAggregation()(x, index, dim_size=3), MaxAggregation()(x, index, dim_size=3))


def test_forward_refuses_an_edge_to_a_point_that_does_not_exist():
    net = build_graph_net(GraphNetConfig(channels=(4,), out_channels=4), seed=0)
    p = torch.rand(5, 3)
    ei = torch.tensor([[0, 1, 2, 3, 5], [0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"edge_index \(2, 5\) \(torch.int64\): expected \(2, E\) int64 indices 0..4 "
                                         "of the 5 points"):
        net(p, 1, ei)
    for bad in (ei.clamp(max=4) - 1, ei.clamp(max=4).float()):  # index -1 was the last point; floats failed in torch
        with pytest.raises(ValueError, match="expected \\(2, E\\) int64 indices 0..4"):
            net(p, 1, bad)


def test_forward_over_an_empty_graph_is_every_point_aggregating_nothing():
    """A ``(2, 0)`` edge_index (PyG's graph without edges) gives features (``.max()`` of it raised a
    RuntimeError); each point's EdgeConv output is then PyG's empty max, 0, so all points get one feature."""
    net = build_graph_net(GraphNetConfig(channels=(4,), out_channels=4), seed=0).eval()
    p = torch.rand(5, 3)
    out = net(p, 1, torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (5, 4) and torch.isfinite(out).all()
    assert torch.allclose(out, out[:1].expand(5, -1))


def test_pair_uses_k_fixed_for_the_fixed_cloud_and_the_scaled_k_for_the_moving_one():
    cfg = GraphNetConfig(channels=(8,), out_channels=4, k_fixed=3)
    net = build_graph_net(cfg, seed=1)
    f, m = torch.rand(10, 3), torch.rand(25, 3)
    assert net.moving_k(10, 25) == 8 != cfg.k_fixed
    with torch.no_grad():
        pf, pm = net.pair(f, m)
        torch.testing.assert_close(pf, net(f, 3), rtol=0, atol=0)
        torch.testing.assert_close(pm, net(m, 8), rtol=0, atol=0)
        assert not torch.equal(pm, net(m, 3))
        assert not torch.equal(pf, net(f, 8))


def test_graph_net_parameters_follow_the_config_so_checkpoints_keep_loading():
    """Each EdgeConv block is three bias-free linear layers (``2 c_in -> c -> c -> c``, each followed by the
    cloud norm and a LeakyReLU), the head a bias-free linear layer, the norm and a linear layer with bias: the
    state dict that checkpoints store, derived from the config alone."""
    cfg = GraphNetConfig(channels=(5, 7), out_channels=6)
    want, cin = {}, 3
    for i, c in enumerate(cfg.channels):
        for j, fan_in in zip((0, 3, 6), (2 * cin, c, c)):
            want[f"convs.{i}.nn.{j}.weight"] = (c, fan_in)
        cin = c
    want.update({"head.0.weight": (6, 7), "head.2.weight": (6, 6), "head.2.bias": (6,)})
    got = {k: tuple(v.shape) for k, v in build_graph_net(cfg, seed=0).state_dict().items()}
    assert got == want


def test_moving_k_rounds_the_scaled_neighbourhood_to_the_nearest_integer():
    cfg = GraphNetConfig(k_fixed=10)
    assert moving_graph_k(cfg, 100, 157) == 16  # 15.7
    assert moving_graph_k(cfg, 100, 153) == 15  # 15.3


def test_an_ensemble_needs_a_member():
    with pytest.raises(ValueError, match="size=0: need at least one member"):
        FeatureEnsemble(GraphNetConfig(channels=(4,), out_channels=4), 0)
    assert len(FeatureEnsemble(GraphNetConfig(channels=(4,), out_channels=4), 3).members) == 3


# ----------------------------------------------------------------------------- augment
def _euler_zyx(A: torch.Tensor) -> tuple[float, float, float]:
    """Angles (about x, y, z; radians) of a rotation ``R = Rz Ry Rx``."""
    return (math.atan2(A[2, 1].item(), A[2, 2].item()), -math.asin(A[2, 0].item()),
            math.atan2(A[1, 0].item(), A[0, 0].item()))


def test_random_affine_is_rz_ry_rx_with_each_angle_uniform_on_both_sides():
    """Without scale, ``A = Rz(c) Ry(b) Rx(a)`` with each angle within +-rotation_deg and of both signs."""
    g = torch.Generator().manual_seed(5)
    limit = math.radians(20.0)
    angles = []
    for _ in range(200):
        A, t = augment.random_affine(g, 20.0, 0.0, 0.0, torch.float64)
        assert t.abs().max() == 0
        torch.testing.assert_close(A @ A.T, torch.eye(3, dtype=torch.float64))
        assert torch.linalg.det(A) > 0
        angles.append(_euler_zyx(A))
    angles = torch.tensor(angles, dtype=torch.float64)
    assert angles.abs().max() <= limit + 1e-9
    assert (angles.min(0).values < -0.6 * limit).all() and (angles.max(0).values > 0.6 * limit).all()
    assert angles.mean(0).abs().max() < 0.15 * limit


def test_random_affine_returns_the_dtype_asked():
    for dtype in (torch.float32, torch.float64):
        A, t = augment.random_affine(torch.Generator().manual_seed(0), 10.0, 0.1, 0.1, dtype)
        assert A.dtype == dtype and t.dtype == dtype
    A, t = augment.random_affine(torch.Generator().manual_seed(0), 10.0, 0.1, 0.1)
    assert A.dtype == torch.float32 and t.dtype == torch.float32


def test_apply_affine_adds_the_translation_and_follows_the_points_dtype():
    A, t = augment.random_affine(torch.Generator().manual_seed(1), 30.0, 0.2, 0.5, torch.float64)
    p = torch.rand(6, 3)
    out = augment.apply_affine(p, A, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (p.double() @ A.T + t).float())
    torch.testing.assert_close(augment.apply_affine(torch.zeros(1, 3), A, t)[0], t.float())


def test_random_affine_depends_only_on_its_generator():
    a = augment.random_affine(torch.Generator().manual_seed(7), 10.0, 0.1, 0.1)
    torch.manual_seed(1)
    b = augment.random_affine(torch.Generator().manual_seed(7), 10.0, 0.1, 0.1)
    torch.manual_seed(2)
    torch.rand(3)
    c = augment.random_affine(torch.Generator().manual_seed(7), 10.0, 0.1, 0.1)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


# ----------------------------------------------------------------------------- synthetic
_SMALL = BreathingConfig(branches=4, steps=12)


def _in_lungs(p: torch.Tensor, cfg: BreathingConfig, slack: float = 0.0) -> torch.Tensor:
    r = torch.tensor(cfg.lung_radii, dtype=p.dtype)
    inside = torch.zeros(p.shape[0], dtype=torch.bool)
    for c in cfg.lung_centres:
        inside |= (((p - torch.tensor(c, dtype=p.dtype)) / (r + slack)) ** 2).sum(1) <= 1.0
    return inside


@pytest.mark.parametrize("spread", [0.6, 1.0, 1.1])
def test_vessel_tree_walks_in_steps_of_step_mm_inside_the_lungs(spread):
    """Every walk has ``steps`` vertices ``step_mm`` apart and stays inside a lung ellipsoid (a step that would
    leave turns towards the centre) when it starts inside (``start_spread`` below ``2 / sqrt(3)``); the first
    half of the walks starts around the first lung's centre, the second half around the second's."""
    cfg = replace(_SMALL, start_spread=spread)
    tree = _vessel_tree(cfg, torch.Generator().manual_seed(3))
    assert tree.shape == (2 * cfg.branches, cfg.steps, 3)
    steps = (tree[:, 1:] - tree[:, :-1]).norm(dim=-1)
    torch.testing.assert_close(steps, torch.full_like(steps, cfg.step_mm))
    assert _in_lungs(tree.reshape(-1, 3), cfg).all()
    for lung, centre in enumerate(cfg.lung_centres):
        starts = tree[lung * cfg.branches:(lung + 1) * cfg.branches, 0]
        off = (starts - torch.tensor(centre, dtype=starts.dtype)).abs()
        assert (off <= 0.5 * spread * torch.tensor(cfg.lung_radii, dtype=off.dtype)).all()


def test_synthetic_points_lie_on_the_tree_and_the_moving_cloud_is_the_tree_moved_by_the_truth():
    """Without jitter: fixed points on the vessel polylines, inside the lungs; ``fixed + u`` (fixed -> moving)
    lands on the moving cloud, which densely samples the moved tree, and not on the unmoved one."""
    cfg = replace(_SMALL, n_fixed=40, n_moving=6000, jitter=0.0)
    pair = make_breathing_pair(2, cfg)
    tree = _vessel_tree(cfg, torch.Generator().manual_seed(2)).float()
    a, b = tree[:, :-1].reshape(-1, 3), tree[:, 1:].reshape(-1, 3)
    ab = b - a
    s = (((pair.fixed_mm[:, None] - a) * ab).sum(-1) / (ab * ab).sum(-1)).clamp(0, 1)
    dist = (pair.fixed_mm[:, None] - (a + s[..., None] * ab)).norm(dim=-1).min(1).values
    assert dist.max() < 1e-3
    assert _in_lungs(pair.fixed_mm.double(), cfg).all()
    assert pair.displacement_mm.norm(dim=1).mean() > 3.0
    near_moved = torch.cdist(pair.fixed_mm + pair.displacement_mm, pair.moving_mm).min(1).values
    near_unmoved = torch.cdist(pair.fixed_mm, pair.moving_mm).min(1).values
    assert near_moved.max() < 0.3 and near_unmoved.mean() > 2.0


def test_synthetic_moving_points_are_other_points_of_the_tree():
    """The moving cloud samples the tree anew: without jitter no fixed point's true partner ``fixed + u`` is
    itself a moving point (as with real keypoints, nothing has an exact partner)."""
    pair = make_breathing_pair(0, replace(_SMALL, n_fixed=40, n_moving=40, jitter=0.0))
    assert torch.cdist(pair.fixed_mm + pair.displacement_mm, pair.moving_mm).min() > 1e-3


def test_synthetic_jitter_is_gaussian_noise_of_the_configured_spread_on_both_clouds():
    cfg = replace(_SMALL, n_fixed=2000, n_moving=2000)
    plain, noisy = make_breathing_pair(1, replace(cfg, jitter=0.0)), make_breathing_pair(1, cfg)
    for a, b in ((plain.fixed_mm, noisy.fixed_mm), (plain.moving_mm, noisy.moving_mm)):
        noise = b - a
        assert noise.std().item() == pytest.approx(cfg.jitter, rel=0.05) and noise.mean().abs() < 0.1 * cfg.jitter
    assert torch.equal(plain.displacement_mm, noisy.displacement_mm)


def test_synthetic_pairs_are_float32_reproducible_and_differ_by_seed():
    a, b, c = (make_breathing_pair(s, replace(_SMALL, n_fixed=30, n_moving=40)) for s in (4, 4, 5))
    for x in (a.fixed_mm, a.moving_mm, a.displacement_mm):
        assert x.dtype == torch.float32
    assert torch.equal(a.fixed_mm, b.fixed_mm) and torch.equal(a.moving_mm, b.moving_mm)
    assert not torch.equal(a.fixed_mm, c.fixed_mm) and not torch.equal(a.moving_mm, c.moving_mm)


def test_breathing_expansion_is_linear_about_the_apex_above_the_lungs():
    """Without the random part ``u(p) = (p - apex) * stretch`` with the apex at the lungs' mean centre
    raised by the z radius."""
    cfg = replace(BreathingConfig(), random_amplitude=0.0)
    centre = torch.tensor(cfg.lung_centres, dtype=torch.float64).mean(0)
    apex = centre + torch.tensor([0.0, 0.0, cfg.lung_radii[2]], dtype=torch.float64)
    p = torch.cat([apex[None], _cloud(5, 9) * 200])
    u = breathing_field(p, cfg, 0)
    torch.testing.assert_close(u, (p - apex) * torch.tensor(cfg.stretch, dtype=torch.float64), rtol=0, atol=1e-12)
    assert u[0].abs().max() == 0


def test_breathing_random_part_is_one_gaussian_of_the_configured_width_and_peak():
    """One RBF without expansion: ``u(p) = a exp(-|p - c|^2 / (2 w^2))``. Then ``log |u_x|`` has the Hessian
    ``-I / w^2`` and the gradient ``-(p - c) / w^2``, which give back ``c``: it lies within
    ``random_centre_extent`` lung radii of the lungs' centre (both halves used), and ``|a| <= amplitude``
    with either sign."""
    cfg = replace(BreathingConfig(), stretch=(0.0, 0.0, 0.0), random_bases=1, random_width=40.0)
    centre = torch.tensor(cfg.lung_centres, dtype=torch.float64).mean(0)
    half = torch.tensor(cfg.lung_radii, dtype=torch.float64) * torch.tensor(cfg.random_centre_extent,
                                                                            dtype=torch.float64)
    p0 = centre.clone()[None]
    h = 5.0
    centres, peaks = [], []
    for seed in range(24):
        def log_ux(p, seed=seed):
            return breathing_field(p, cfg, seed)[:, 0].abs().log()

        base = log_ux(p0)
        grad, second = [], []
        for axis in range(3):
            e = torch.zeros(1, 3, dtype=torch.float64)
            e[0, axis] = h
            plus, minus = log_ux(p0 + e), log_ux(p0 - e)
            second.append(((plus + minus - 2 * base) / h**2).item())
            grad.append(((plus - minus) / (2 * h)).item())
        assert second == pytest.approx([-1 / cfg.random_width**2] * 3, rel=1e-6)
        c = p0[0] + cfg.random_width**2 * torch.tensor(grad, dtype=torch.float64)
        centres.append(c)
        u = breathing_field(c[None], cfg, seed)[0]  # the peak a itself
        peaks.append(u)
    centres, peaks = torch.stack(centres), torch.stack(peaks)
    off = (centres - centre) / half
    assert off.abs().max() <= 1 + 1e-6
    assert (off.min(0).values < -0.3).all() and (off.max(0).values > 0.3).all()
    assert peaks.abs().max() <= cfg.random_amplitude + 1e-9
    assert (peaks.min(0).values < 0).all() and (peaks.max(0).values > 0).all()


def test_vessel_tree_of_a_wide_start_box_stays_inside_the_lungs():
    """``BreathingConfig(start_spread=2.0)``: the start box is the lung's bounding box; about half its volume
    lies outside the ellipsoid, and walks started there kept vertices outside the lungs for several steps
    (57 % of the walks, 7.4 % of the vertices); a start outside is now drawn again."""
    cfg = replace(_SMALL, start_spread=2.0)
    tree = _vessel_tree(cfg, torch.Generator().manual_seed(0))
    assert _in_lungs(tree.reshape(-1, 3), cfg).all()


def test_pair_graphs_name_the_fixed_and_moving_clouds_of_two_dtypes():
    """The candidate search (fixed points among moving ones) named them "query" and "reference"."""
    net, lbp = GraphNetConfig(k_fixed=4), LBPConfig(num_candidates=16, graph_k=3)
    with pytest.raises(ValueError, match="fixed: torch.float64, but moving: torch.float32; give both alike"):
        PairGraphs.build(_cloud(20, 0), _cloud(30, 1, torch.float32), net, lbp)
