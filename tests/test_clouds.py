"""Keypoint-cloud path against analytic answers and brute force."""

import itertools
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from cyclereg.clouds.features import (CloudNorm, GraphNetConfig, KnnMaxAggregation, build_graph_net,
                                      regular_block_size)
from cyclereg.clouds.knn import knn_edge_index, knn_indices, symmetric_edge_index
from cyclereg.clouds.lbp import LBPConfig, candidates, lbp_beliefs, lbp_displacements, min_sum
from cyclereg.checkpoint import to_jsonable
from cyclereg.clouds.pipeline import (CloudRegConfig, CloudRegistration, predict_unit, register_clouds,
                                      registration_box)
from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair
from cyclereg.clouds.tps import ThinPlateSpline, TPSConfig, _phi
from cyclereg.frames import UnitBox, mm_disp_to_voxel, voxel_to_world


def test_knn_matches_brute_force(device):
    g = torch.Generator().manual_seed(0)
    q = torch.rand(70, 3, generator=g).to(device)
    r = torch.rand(90, 3, generator=g).to(device)
    idx = knn_indices(q, r, 5)
    d = ((q[:, None] - r[None]) ** 2).sum(-1)
    ref = d.argsort(dim=1)[:, :5]
    assert torch.equal(idx, ref)
    # self-exclusion
    idx_self = knn_indices(q, q, 4, exclude_self=True)
    dq = ((q[:, None] - q[None]) ** 2).sum(-1) + torch.eye(70, device=device) * 1e9
    assert torch.equal(idx_self, dq.argsort(dim=1)[:, :4])


def test_knn_in_pieces_matches_brute_force(monkeypatch):
    """The distance matrix is searched in pieces of query rows (cache-sized on CPU): pieces of
    one row, seven rows (a ragged last piece) and all rows give the brute-force neighbours,
    self-exclusion included (the excluded diagonal lies at another column in every piece)."""
    import cyclereg.clouds.knn as knn_module

    g = torch.Generator().manual_seed(4)
    q = torch.rand(50, 3, generator=g)
    assert knn_module.knn_chunk_rows(q.shape[0], 4, torch.device("cpu")) == knn_module.KNN_CHUNK_BYTES_CPU // 200
    dq = ((q[:, None] - q[None]) ** 2).sum(-1) + torch.eye(50) * 1e9
    for rows in (1, 7, 50):
        monkeypatch.setattr(knn_module, "KNN_CHUNK_BYTES_CPU", 4 * 50 * rows)
        assert knn_module.knn_chunk_rows(50, 4, torch.device("cpu")) == rows
        assert torch.equal(knn_indices(q, q, 6, exclude_self=True), dq.argsort(dim=1)[:, :6])


def test_edge_index_layout():
    p = torch.rand(30, 3, generator=torch.Generator().manual_seed(1))
    ei = knn_edge_index(p, 4, include_self=True)
    assert ei.shape == (2, 120)
    # every centre has itself and its 3 nearest neighbours as sources
    for i in range(30):
        src = set(ei[0, ei[1] == i].tolist())
        d = (p - p[i]).norm(dim=1)
        assert src == set(d.argsort()[:4].tolist())
    sym, rev = symmetric_edge_index(p, 4)
    assert torch.equal(sym[:, rev], sym.flip(0))
    assert (sym[0] != sym[1]).all()


def _tree_energy_min_marginals(unary, cand, edges, alpha):
    """Brute-force min-marginals of sum unary + alpha * sum ||c_i - c_j||^2 over all labelings."""
    n, k = unary.shape
    best = torch.full((n, k), float("inf"), dtype=torch.float64)
    for labels in itertools.product(range(k), repeat=n):
        e = sum(unary[i, l].item() for i, l in enumerate(labels))
        for i, j in edges:
            e += alpha * (cand[i, labels[i]] - cand[j, labels[j]]).pow(2).sum().item()
        for i, l in enumerate(labels):
            best[i, l] = min(best[i, l].item(), e)
    return best


@pytest.mark.parametrize("peaked", [True, False])
def test_pruned_min_convolution_is_exact(peaked):
    """The two-step (pruned) arg-min search gives the messages of the full search, brute force
    over all source labels, and the same gradients; with peaked beliefs (most destination labels
    certified by the first quarter) and flat ones (most searched again)."""
    from cyclereg.clouds.lbp import min_convolution

    g = torch.Generator().manual_seed(11)
    e, k = 700, 128
    belief = torch.rand(e, k, generator=g, dtype=torch.float64) * (5.0 if peaked else 0.05)
    cs = torch.randn(e, k, 3, generator=g, dtype=torch.float64) * 0.1
    cd = torch.randn(e, k, 3, generator=g, dtype=torch.float64) * 0.1
    alpha = 10.0
    brute = (belief[:, :, None] + alpha * (cs[:, :, None, :] - cd[:, None, :, :]).pow(2).sum(-1)).amin(1)
    b1, b2 = belief.clone().requires_grad_(), belief.clone().requires_grad_()
    full = min_convolution(b1, cs, cd, alpha, prune_from=None)
    pruned = min_convolution(b2, cs, cd, alpha, prune_from=k, prune_fraction=0.25)
    torch.testing.assert_close(full, brute)
    torch.testing.assert_close(pruned, brute)
    full.sum().backward()
    pruned.sum().backward()
    torch.testing.assert_close(b1.grad, b2.grad)
    cfg = LBPConfig(num_candidates=128)
    assert cfg.prune_from == 128
    with pytest.raises(ValueError, match="prune_fraction"):
        LBPConfig(prune_fraction=1.0)


def test_min_convolution_chunking_changes_nothing(monkeypatch):
    """The CPU chunk (edges per product) follows K x K' within [1, EDGE_CHUNK], and any chunk
    size, one edge at a time included, gives bitwise the messages of the default one (torch's
    search; the C kernel's chunks: tests/test_lbp_native.py)."""
    from cyclereg import native
    from cyclereg.clouds import lbp

    monkeypatch.setenv(native.DISABLE_ENV, "0")

    cpu = torch.device("cpu")
    assert lbp.edge_chunk(256, 256, cpu) == lbp.CPU_CHUNK_PRODUCTS // 256 ** 2 == 64
    assert lbp.edge_chunk(64, 64, cpu) == lbp.EDGE_CHUNK  # capped
    assert lbp.edge_chunk(5000, 5000, cpu) == 1
    assert lbp.edge_chunk(256, 256, torch.device("meta")) == lbp.EDGE_CHUNK  # off the CPU: as before
    g = torch.Generator().manual_seed(5)
    e, k = 300, 128
    belief = torch.rand(e, k, generator=g)
    cs, cd = (torch.randn(e, k, 3, generator=g) * 0.1 for _ in range(2))
    for prune in (None, k):
        ref = lbp.min_convolution(belief, cs, cd, 10.0, prune_from=prune)
        for products in (1, 7 * k * k):
            with monkeypatch.context() as m:
                m.setattr(lbp, "CPU_CHUNK_PRODUCTS", products)
                assert torch.equal(lbp.min_convolution(belief, cs, cd, 10.0, prune_from=prune), ref)


def test_lbp_hard_min_equals_brute_force_on_tree(device):
    g = torch.Generator().manual_seed(3)
    n, k = 5, 3
    tree = [(0, 1), (1, 2), (1, 3), (3, 4)]
    unary = torch.rand(n, k, generator=g, dtype=torch.float64)
    cand = torch.randn(n, k, 3, generator=g, dtype=torch.float64)
    src = [a for a, b in tree] + [b for a, b in tree]
    dst = [b for a, b in tree] + [a for a, b in tree]
    edge_index = torch.tensor([src, dst])
    m = len(tree)
    reverse = torch.tensor(list(range(m, 2 * m)) + list(range(m)))
    alpha = 0.7
    belief = min_sum(unary.to(device), cand.to(device), edge_index.to(device), reverse.to(device), alpha,
                     iterations=4).cpu()  # diameter of the tree is 3
    ref = _tree_energy_min_marginals(unary, cand, tree, alpha)
    # beliefs equal min-marginals up to one constant per node (messages are normalised)
    diff = belief - ref
    torch.testing.assert_close(diff - diff[:, :1], torch.zeros_like(diff), atol=1e-9, rtol=0)
    assert torch.equal(belief.argmin(1), ref.argmin(1))


def test_lbp_gradients_reach_features():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(40, 3, generator=g)
    m = torch.rand(60, 3, generator=g)
    ff = torch.randn(40, 8, generator=g, requires_grad=True)
    fm = torch.randn(60, 8, generator=g, requires_grad=True)
    u = lbp_displacements(f, m, ff, fm, LBPConfig(num_candidates=16, graph_k=4))
    u.sum().backward()
    assert ff.grad.abs().sum() > 0 and fm.grad.abs().sum() > 0


def test_tps_reproduces_affine_field_exactly(dtype, device):
    g = torch.Generator().manual_seed(0)
    c = (torch.rand(60, 3, generator=g, dtype=dtype) * 2 - 1).to(device)
    A = torch.tensor([[1.1, 0.2, -0.1], [0.05, 0.9, 0.3], [-0.2, 0.1, 1.2]], dtype=dtype, device=device)
    t = torch.tensor([0.3, -0.2, 0.1], dtype=dtype, device=device)
    u = c @ A.T + t - c
    spline = ThinPlateSpline.fit(c, u, regularisation=0.0)
    q = (torch.rand(200, 3, generator=g, dtype=dtype) * 2 - 1).to(device)
    assert spline(q).device == q.device and spline(q).dtype == dtype
    torch.testing.assert_close(spline(q), q @ A.T + t - q, atol=1e-8 if dtype == torch.float64 else 1e-5, rtol=0)
    # and interpolates arbitrary values at the control points
    v = torch.randn(60, 3, generator=g, dtype=dtype).to(device)
    torch.testing.assert_close(ThinPlateSpline.fit(c, v)(c), v, atol=1e-6 if dtype == torch.float64 else 1e-3, rtol=0)


def test_tps_per_point_regularisation():
    g = torch.Generator().manual_seed(5)
    c = torch.rand(40, 3, generator=g, dtype=torch.float64) * 2 - 1
    v = torch.randn(40, 3, generator=g, dtype=torch.float64)
    q = torch.rand(30, 3, generator=g, dtype=torch.float64) * 2 - 1
    # the same lambda for every point is the scalar fit
    torch.testing.assert_close(ThinPlateSpline.fit(c, v, regularisation=torch.full((40,), 0.3, dtype=torch.float64))(q),
                               ThinPlateSpline.fit(c, v, regularisation=0.3)(q), atol=1e-10, rtol=0)
    # a point with lambda 0 is interpolated although every other point is smoothed heavily
    lam = torch.full((40,), 5.0, dtype=torch.float64)
    lam[7] = 0.0
    fitted = ThinPlateSpline.fit(c, v, regularisation=lam)(c)
    torch.testing.assert_close(fitted[7], v[7], atol=1e-9, rtol=0)
    assert (fitted[:7] - v[:7]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="regularisation"):
        ThinPlateSpline.fit(c, v, regularisation=torch.zeros(39))


def test_tps_evaluation_is_the_same_for_any_chunk_size(monkeypatch):
    """The evaluation is split into pieces of query points (cache-sized on CPU); the pieces' size
    changes nothing beyond float64 rounding (the BLAS kernels block differently)."""
    import cyclereg.clouds.tps as tps_module

    g = torch.Generator().manual_seed(11)
    c = torch.rand(300, 3, generator=g, dtype=torch.float64)
    spline = ThinPlateSpline.fit(c, torch.randn(300, 3, generator=g, dtype=torch.float64), regularisation=0.3)
    q = torch.rand(5000, 3, generator=g, dtype=torch.float64)
    rows = tps_module.eval_chunk_rows(300, torch.device("cpu"))
    assert rows == tps_module.EVAL_CHUNK_BYTES_CPU // (8 * 300) and rows < q.shape[0]
    assert tps_module.eval_chunk_rows(10**9, torch.device("cpu")) == 1
    pieces = spline(q)
    monkeypatch.setattr(tps_module, "EVAL_CHUNK_BYTES_CPU", 8 * 300 * q.shape[0])  # one piece
    torch.testing.assert_close(spline(q), pieces, atol=1e-12, rtol=0)
    monkeypatch.setattr(tps_module, "EVAL_CHUNK_BYTES_CPU", 8 * 300 * 7)  # 7 rows, a ragged last piece
    torch.testing.assert_close(spline(q), pieces, atol=1e-12, rtol=0)


def test_tps_kernel_value_and_gradient_to_control_values():
    # r^2 log r at r = 2 between two control points; the spline stays differentiable in
    # its values (the in-place kernel path is only taken without autograd)
    c = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]],
                     dtype=torch.float64)
    torch.testing.assert_close(_phi(torch.tensor([2.0], dtype=torch.float64), "r2logr"),
                               torch.tensor([4.0 * math.log(2.0 + 1e-6)], dtype=torch.float64))
    v = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    c_req = c.clone().requires_grad_(True)
    out = ThinPlateSpline.fit(c_req, v, regularisation=0.1)(torch.rand(7, 3, dtype=torch.float64))
    out.sum().backward()
    assert v.grad.abs().sum() > 0 and torch.isfinite(c_req.grad).all()


def test_dense_field_of_affine_motion_is_exact_on_any_grid():
    """Displacements of an affine motion at scattered points -> the dense field on a grid with an
    oblique, anisotropic affine equals the analytic field in that grid's voxels everywhere (the
    TPS keeps affine fields, trilinear upsampling is exact for them)."""
    g = torch.Generator().manual_seed(3)
    pts = torch.rand(200, 3, generator=g, dtype=torch.float64) * torch.tensor([60.0, 50.0, 40.0])
    M = torch.tensor([[0.05, 0.02, 0.0], [-0.03, 0.04, 0.01], [0.0, 0.02, -0.06]], dtype=torch.float64)
    t = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
    reg = CloudRegistration(fixed_mm=pts, displacements_mm=pts @ M.T + t, box=UnitBox.around(pts),
                            tps=TPSConfig(regularisation=0.3, grid_step=4))
    affine = np.array([[0.0, 0.0, 2.0, 3.0], [0.0, 1.5, 0.2, -1.0], [2.5, 0.0, 0.0, 2.0], [0, 0, 0, 1.0]])
    shape = (17, 30, 26)
    field = reg.dense(affine, shape)
    assert field.shape == (1, 3, *shape)
    vox = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in shape), indexing="ij"), -1)
    world = voxel_to_world(vox, affine)
    expected_mm = (world @ M.T + t).permute(3, 0, 1, 2)[None]
    expected = mm_disp_to_voxel(expected_mm, affine)
    torch.testing.assert_close(field.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("field, value, message", [
    ("fixed_mm", torch.randint(0, 50, (40, 3)), "fixed_mm: torch.int64 values"),
    ("fixed_mm", torch.rand(40, 2, dtype=torch.float64), "fixed_mm: expected (N, 3)"),
    ("fixed_mm", torch.zeros(0, 3, dtype=torch.float64), "fixed_mm: expected (N, 3) with N >= 1"),
    ("displacements_mm", torch.zeros(39, 3, dtype=torch.float64), "displacements_mm: expected (40, 3)"),
    ("displacements_mm", torch.zeros(40, 3, dtype=torch.int32), "displacements_mm: torch.int32 values"),
    ("member_displacements_mm", (torch.zeros(40, 3, dtype=torch.float64), torch.zeros(3, 40, dtype=torch.float64)),
     "member_displacements_mm[1]: expected (40, 3)"),
])
def test_cloud_registration_built_by_hand_checks_its_fields(field, value, message):
    """A result built directly (not by register_clouds) names a wrong field at once: an integer fixed cloud
    used to fail only in dense(), with torch's "not implemented for 'Long'"."""
    pts = torch.rand(40, 3, dtype=torch.float64) * 50
    fields = dict(fixed_mm=pts, displacements_mm=torch.zeros_like(pts), box=UnitBox.around(pts), tps=TPSConfig())
    fields[field] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        CloudRegistration(**fields)
    if field != "member_displacements_mm":  # the same with well-formed values: built, and dense() works
        good = CloudRegistration(fixed_mm=pts, displacements_mm=torch.zeros_like(pts), box=UnitBox.around(pts),
                                 tps=TPSConfig())
        assert float(good.dense(np.eye(4), (5, 6, 7)).abs().max()) < 1e-9


def test_registration_box_follows_the_training_frame():
    g = torch.Generator().manual_seed(4)
    f = torch.rand(50, 3, generator=g, dtype=torch.float64) * 40 + torch.tensor([100.0, 80.0, 60.0])
    m = f + 2.0
    untrained = CloudRegConfig()
    box, how = registration_box(f, m, untrained)
    assert box == UnitBox.around(f, m, margin=untrained.box_margin) and how == "clouds' bounding box"
    trained_box = UnitBox((0.0, 0.0, 0.0), (260.0, 192.0, 336.0))
    trained = replace(untrained, training_box=trained_box)
    assert registration_box(f, m, trained) == (trained_box, "training box")
    # the same clouds 1 m away: same scale, box centred on them
    box, how = registration_box(f + 1000.0, m + 1000.0, trained)
    assert how == "training box, moved to the clouds" and box.extent_mm == trained_box.extent_mm
    own = UnitBox.around(f + 1000.0, m + 1000.0, margin=untrained.box_margin)
    for lo, e, olo, oe in zip(box.lo_mm, box.extent_mm, own.lo_mm, own.extent_mm):
        assert abs((lo + e / 2) - (olo + oe / 2)) < 1e-9
    # a stored box survives the checkpoint round trip through JSON
    assert CloudRegConfig.from_dict(to_jsonable(trained)) == trained


def test_cloud_norm_standardises_each_channel_over_the_rows(dtype):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(500, 7, generator=g, dtype=dtype) * torch.arange(1, 8, dtype=dtype) + 3).requires_grad_(True)
    y = CloudNorm()(x)
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(y, expected, atol=tol, rtol=0)
    w = torch.randn(500, 7, generator=g, dtype=dtype)
    (gy,) = torch.autograd.grad((y * w).sum(), x)
    (ge,) = torch.autograd.grad((expected * w).sum(), x)
    torch.testing.assert_close(gy, ge, atol=tol * 10, rtol=0)
    assert CloudNorm()(torch.ones(1, 7, dtype=dtype)).abs().max() == 0  # one row: no spread


def test_knn_max_aggregation_is_pygs_max_with_its_gradient(dtype, device):
    """On kNN graphs (blocks of k edges per target) and on any other index it gives PyG's max
    aggregation and its gradient to the bit, also where maxima tie (messages on a half-integer
    grid); a maximum of exactly 0 is the one place they differ (below)."""
    from torch_geometric.nn.aggr import MaxAggregation

    g = torch.Generator().manual_seed(3)
    pts = torch.rand(60, 3, generator=g, dtype=dtype)
    regular = knn_edge_index(pts, 7)[1].to(device)
    assert regular_block_size(regular, 60) == 7
    irregular = torch.tensor([0, 0, 1, 3, 3, 3], device=device)  # node 2 has no edge, uneven blocks
    unsorted = regular.flip(0)
    for index, n in ((regular, 60), (irregular, 4), (unsorted, 60)):
        for ties in (False, True):
            raw = torch.randn(index.numel(), 5, generator=g, dtype=dtype)
            x = (raw.round() + 0.5 if ties else raw).to(device)
            out = []
            for aggr in (KnnMaxAggregation(), MaxAggregation()):
                xx = x.clone().requires_grad_(True)
                y = aggr(xx, index, dim_size=n)
                (gx,) = torch.autograd.grad((y * torch.arange(1, 6, dtype=dtype, device=device)).sum(), xx)
                out.append((y, gx))
            assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
            if ties and index is regular:  # ties do occur, and share the gradient
                assert (out[0][1] > 0).logical_and(out[0][1] < torch.arange(1, 6, dtype=dtype, device=device)).any()
    assert regular_block_size(irregular, 4) is None and regular_block_size(unsorted, 60) is None
    assert regular_block_size(regular, 61) is None and regular_block_size(None, 60) is None
    # two tied maxima of exactly 0 share the whole gradient; PyG's scatter counts its zero-filled
    # output as a third and passes on 2/3 of it (PyTorch's scatter_reduce amax, include_self=False)
    zeros = torch.tensor([[0.0], [0.0], [-1.0]], dtype=dtype, device=device, requires_grad=True)
    (gz,) = torch.autograd.grad(KnnMaxAggregation()(zeros, torch.zeros(3, dtype=torch.long, device=device),
                                                    dim_size=1).sum(), zeros)
    assert gz.ravel().tolist() == [0.5, 0.5, 0.0]
    assert all(isinstance(conv.aggr_module, KnnMaxAggregation) for conv in build_graph_net(seed=0).convs)


def test_graph_net_features_and_gradients_are_those_with_pygs_max_aggregation():
    """The whole network: features and weight gradients bitwise those of the same weights with
    PyG's own max aggregation (and LeakyReLU not in place), on a random cloud."""
    import copy

    from torch_geometric.nn.aggr import MaxAggregation

    net = build_graph_net(seed=3)
    plain = copy.deepcopy(net)
    for conv in plain.convs:
        conv.aggr_module = MaxAggregation()
    for module in plain.modules():
        if isinstance(module, torch.nn.LeakyReLU):
            module.inplace = False
    pts = torch.rand(300, 3, generator=torch.Generator().manual_seed(4)) * 2 - 1
    out = []
    for m in (net, plain):
        feats = m(pts, 8)
        grads = torch.autograd.grad(feats.sin().sum(), list(m.parameters()))
        out.append((feats.detach(), grads))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


def test_zero_motion_gives_zero_displacement():
    p = make_breathing_pair(0).fixed_mm[:800]
    cfg = CloudRegConfig()
    net = build_graph_net(seed=0)
    box = UnitBox.around(p)
    pu = box.mm_to_unit(p)
    with torch.no_grad():
        ff, fm = net.pair(pu, pu.clone())
        assert torch.equal(ff, fm)  # identical clouds get identical features
        cand, belief = lbp_beliefs(pu, pu.clone(), ff, fm, cfg.lbp)
    hard = cand.gather(1, belief.argmin(1)[:, None, None].expand(-1, 1, 3))[:, 0]
    assert hard.abs().max() == 0  # the MAP label of every point is exactly zero motion
    reg = register_clouds(p, p.clone(), net, cfg, box=box)
    d = reg.displacements_mm.norm(dim=1)
    assert d.mean() < 0.05 and d.max() < 0.5  # soft-argmin read-out: only sub-voxel blending


def test_translation_is_recovered(device):
    p = (torch.rand(500, 3, generator=torch.Generator().manual_seed(4)) * 100).to(device)
    shift = torch.tensor([3.0, -2.0, 4.0], device=device)
    reg = register_clouds(p, p + shift, build_graph_net(seed=0).to(device), CloudRegConfig())
    assert reg.displacements_mm.device == p.device
    err = (reg.displacements_mm - shift).norm(dim=1)
    assert err.median() < 0.5


@pytest.mark.parametrize("fixed,moving,match", [
    ((50, 2), (60, 3), r"fixed_mm: expected \(N, 3\)"),
    ((50, 3), (0, 3), r"moving_mm: expected \(N, 3\) with N >= 1"),
    ((50, 3), (60, 3, 1), "moving_mm: expected"),
])
def test_register_clouds_names_the_bad_argument(fixed, moving, match):
    with pytest.raises(ValueError, match=match):
        register_clouds(torch.zeros(fixed), torch.zeros(moving), None, CloudRegConfig())
    with pytest.raises(ValueError, match="moving_mm: torch.float64 on cpu, but fixed_mm: torch.float32"):
        register_clouds(torch.rand(50, 3), torch.rand(60, 3, dtype=torch.float64), None, CloudRegConfig())


def test_scaled_motion_scales_every_displacement_and_keeps_the_clouds():
    base = BreathingConfig(n_fixed=200, n_moving=400, branches=6, steps=10)
    one, two = make_breathing_pair(3, base), make_breathing_pair(3, base.scaled_motion(2.0))
    assert torch.equal(one.fixed_mm, two.fixed_mm)
    torch.testing.assert_close(two.displacement_mm, 2 * one.displacement_mm, atol=1e-5, rtol=1e-6)
    still = make_breathing_pair(3, base.scaled_motion(0.0))
    assert still.displacement_mm.abs().max() == 0


def test_random_features_register_synthetic_breathing_pair():
    pair = make_breathing_pair(0)
    reg = register_clouds(pair.fixed_mm, pair.moving_mm, build_graph_net(seed=0), CloudRegConfig())
    before = pair.displacement_mm.norm(dim=1).mean()
    after = (reg.displacements_mm - pair.displacement_mm).norm(dim=1).mean()
    assert before > 8.0
    assert after < 0.5 * before


def test_seeded_network_is_reproducible_and_leaves_the_global_generator_alone():
    a, b, c = build_graph_net(seed=3), build_graph_net(seed=3), build_graph_net(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    build_graph_net(seed=3)
    assert torch.equal(torch.rand(4), expected)  # the caller's random stream goes on as if untouched


def test_network_shapes_and_bad_input():
    net = build_graph_net(GraphNetConfig(out_channels=16), seed=0)
    f, m = net.pair(torch.rand(50, 3), torch.rand(120, 3))
    assert f.shape == (50, 16) and m.shape == (120, 16)
    with pytest.raises(ValueError, match="points"):
        net(torch.rand(10, 2), 4)


def test_unit_box_hyperparameters_are_scale_free():
    """Registering a cloud and its copy scaled by 2 (in mm) gives displacements scaled by 2."""
    pair = make_breathing_pair(1)
    net = build_graph_net(seed=0)
    box = UnitBox.around(pair.fixed_mm, pair.moving_mm)
    box2 = UnitBox(tuple(2 * v for v in box.lo_mm), tuple(2 * v for v in box.extent_mm))
    a = register_clouds(pair.fixed_mm, pair.moving_mm, net, CloudRegConfig(), box=box)
    b = register_clouds(2 * pair.fixed_mm, 2 * pair.moving_mm, net, CloudRegConfig(), box=box2)
    torch.testing.assert_close(b.displacements_mm, 2 * a.displacements_mm, atol=1e-3, rtol=1e-3)


def test_recentred_candidates_are_measured_from_the_fixed_point():
    """Searching around ``f + s`` for a cloud shifted by ``s`` finds the exact shift first."""
    p = torch.rand(300, 3, generator=torch.Generator().manual_seed(5))
    shift = torch.tensor([0.7, -0.5, 0.4])  # far beyond the 8 nearest moving points of any f
    m = p + shift
    cand0, _ = candidates(p, m, 8)
    assert (cand0 - shift).norm(dim=-1).min(dim=1).values.median() > 0.1  # truncated: mostly out of range
    cand, idx = candidates(p, m, 8, centres=p + shift)
    torch.testing.assert_close(cand[:, 0], shift.expand(300, 3), atol=1e-6, rtol=0)
    assert torch.equal(idx[:, 0], torch.arange(300))
    with pytest.raises(ValueError, match="centres"):
        candidates(p, m, 8, centres=p[:10])


def test_recentring_follows_motion_beyond_the_candidate_range():
    """A translation larger than the single-pass search range is recovered by re-centred passes;
    zero passes is exactly the single-pass prediction."""
    p = torch.rand(500, 3, generator=torch.Generator().manual_seed(4)) * 100
    shift = torch.tensor([30.0, -20.0, 20.0])  # 41 mm; 16 candidates reach about 20 mm
    net = build_graph_net(seed=0)
    box = UnitBox.around(p, p + shift)
    cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=16))
    single = register_clouds(p, p + shift, net, cfg, box=box)
    with torch.no_grad():
        ref = predict_unit(net, box.mm_to_unit(p), box.mm_to_unit(p + shift), cfg.lbp)
    torch.testing.assert_close(single.displacements_mm, box.disp_unit_to_mm(ref))
    err0 = (single.displacements_mm - shift).norm(dim=1).median()
    multi = register_clouds(p, p + shift, net, replace(cfg, recentre_passes=2), box=box)
    err2 = (multi.displacements_mm - shift).norm(dim=1).median()
    assert err0 > 15.0 and err2 < 0.01


def test_configs_written_before_recentring_load_as_single_pass():
    assert CloudRegConfig.from_dict({}).recentre_passes == 0
    from cyclereg.training.clouds import CloudCycleConfig, test_time_config
    old = CloudCycleConfig.from_dict({"stages": 2})
    assert old.refine_recentre_passes == 0 and test_time_config(old).recentre_passes == 0
    assert test_time_config(CloudCycleConfig()).recentre_passes == CloudCycleConfig().refine_recentre_passes
    with pytest.raises(ValueError, match="recentre_passes"):
        CloudRegConfig(recentre_passes=-1)


def test_displacements_map_back_through_the_inverse_linear_part(device):
    """For exact correspondences ``m = f + u``, the transformed pair has ``u' = A u``; mapping
    back recovers ``u`` whatever the translation."""
    from cyclereg.clouds.augment import apply_affine, displacements_back, random_affine

    g = torch.Generator().manual_seed(3)
    f = torch.rand(50, 3, generator=g, dtype=torch.float64).to(device)
    u = torch.randn(50, 3, generator=g, dtype=torch.float64).to(device) * 0.1
    A, t = random_affine(g, 30.0, 0.2, 0.5, torch.float64)
    u_t = apply_affine(f + u, A, t) - apply_affine(f, A, t)
    torch.testing.assert_close(u_t, u @ A.T.to(device))
    torch.testing.assert_close(displacements_back(u_t, A), u)
    s = torch.linalg.det(A) ** (1 / 3)
    assert 0.8 - 1e-9 <= s <= 1.2 + 1e-9 and t.abs().max() <= 0.5
    torch.testing.assert_close(A @ A.T / s**2, torch.eye(3, dtype=torch.float64))


def test_test_time_augmentation_keeps_a_translation_and_is_deterministic():
    """Every transformed copy of a translated cloud is again a translation, mapped back to the
    same shift; zero passes is exactly the re-centred prediction; repeated calls agree."""
    from cyclereg.clouds.pipeline import test_time_displacements, predict_recentred

    p = torch.rand(400, 3, generator=torch.Generator().manual_seed(4)) * 100
    shift = torch.tensor([6.0, -4.0, 3.0])
    net = build_graph_net(seed=0)
    box = UnitBox.around(p, p + shift)
    cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=16), recentre_passes=1)
    fu, mu = box.mm_to_unit(p), box.mm_to_unit(p + shift)
    with torch.no_grad():
        torch.testing.assert_close(test_time_displacements(net, fu, mu, cfg), predict_recentred(net, fu, mu, cfg))
    tta = replace(cfg, tta_passes=3)
    a = register_clouds(p, p + shift, net, tta, box=box).displacements_mm
    b = register_clouds(p, p + shift, net, tta, box=box).displacements_mm
    assert torch.equal(a, b)
    assert (a - shift).norm(dim=1).median() < 0.01
    for bad in ({"tta_passes": -1}, {"tta_scale": 1.0}, {"tta_rotation_deg": -5.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CloudRegConfig(**bad)
    assert CloudRegConfig.from_dict({}).tta_passes == 0
    from cyclereg.training.clouds import CloudCycleConfig, test_time_config
    assert CloudCycleConfig.from_dict({"stages": 2}).refine_tta_passes == 0  # runs written before TTA
    assert test_time_config(CloudCycleConfig()).tta_passes == CloudCycleConfig().refine_tta_passes == 4


def test_ensemble_averages_its_members_and_one_member_is_the_network():
    """An ensemble's displacements are the mean of its members' (each with the full test-time
    pipeline); an ensemble of copies of one network equals that network; a bad size is refused."""
    from cyclereg.clouds.features import FeatureEnsemble
    from cyclereg.clouds.pipeline import test_time_displacements

    pair = make_breathing_pair(1, BreathingConfig(n_fixed=200, n_moving=400, branches=10))
    box = UnitBox.around(pair.fixed_mm, pair.moving_mm)
    fu, mu = box.mm_to_unit(pair.fixed_mm), box.mm_to_unit(pair.moving_mm)
    cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=16), recentre_passes=1, tta_passes=1)
    a, b = build_graph_net(seed=1), build_graph_net(seed=2)
    ens = FeatureEnsemble(a.config, 2)
    ens.members[0].load_state_dict(a.state_dict())
    ens.members[1].load_state_dict(b.state_dict())
    with torch.no_grad():
        ua, ub = test_time_displacements(a, fu, mu, cfg), test_time_displacements(b, fu, mu, cfg)
        torch.testing.assert_close(test_time_displacements(ens, fu, mu, cfg), (ua + ub) / 2)
        assert (ua - ub).abs().max() > 1e-3  # the members really differ
        twins = FeatureEnsemble(a.config, 3)
        for m in twins.members:
            m.load_state_dict(a.state_dict())
        torch.testing.assert_close(test_time_displacements(twins, fu, mu, cfg), ua)
    with pytest.raises(ValueError, match="features"):
        test_time_displacements(ens, fu, mu, cfg, features=a.pair(fu, mu))
    with pytest.raises(ValueError, match="ensemble_size"):
        CloudRegConfig(ensemble_size=0)
    assert CloudRegConfig.from_dict({}).ensemble_size == 1  # checkpoints written before ensembles


def test_feature_cost_is_the_mean_squared_feature_difference():
    """Fixed feature (0, 0) against moving features (1, 3) and (2, 0): (1 + 9) / 2 = 5 and (4 + 0) / 2 = 2;
    candidate order follows ``idx`` (an absolute difference would give 2 and 1)."""
    from cyclereg.clouds.lbp import feature_cost

    cost = feature_cost(torch.zeros(1, 2), torch.tensor([[1.0, 3.0], [2.0, 0.0]]), torch.tensor([[0, 1]]))
    assert torch.equal(cost, torch.tensor([[5.0, 2.0]]))
    assert torch.equal(feature_cost(torch.zeros(1, 2), torch.tensor([[1.0, 3.0], [2.0, 0.0]]), torch.tensor([[1, 0]])),
                       torch.tensor([[2.0, 5.0]]))


def test_joint_lbp_cost_is_the_members_mean_feature_cost():
    """Joint LBP over two networks' features equals LBP over their concatenated features (the mean
    of two per-network mean squared differences is the mean over all channels), and a single
    (feat_fixed, feat_moving) pair is exactly the one-network LBP."""
    from cyclereg.clouds.lbp import joint_lbp_beliefs, joint_lbp_displacements

    g = torch.Generator().manual_seed(7)
    f, m = torch.rand(60, 3, generator=g), torch.rand(90, 3, generator=g)
    fa, ma, fb, mb = (torch.randn(n, 8, generator=g) for n in (60, 90, 60, 90))
    cfg = LBPConfig(num_candidates=12, iterations=3)
    cand, joint = joint_lbp_beliefs(f, m, [(fa, ma), (fb, mb)], cfg)
    cand2, cat = lbp_beliefs(f, m, torch.cat([fa, fb], 1), torch.cat([ma, mb], 1), cfg)
    assert torch.equal(cand, cand2)
    torch.testing.assert_close(joint, cat)
    assert torch.equal(joint_lbp_displacements(f, m, [(fa, ma)], cfg), lbp_displacements(f, m, fa, ma, cfg))
    with pytest.raises(ValueError, match="features"):
        joint_lbp_beliefs(f, m, [], cfg)


def test_joint_ensemble_fusion_votes_per_candidate():
    """With ``ensemble_fusion = "joint"`` an ensemble runs one LBP per pass over its members' mean
    cost (re-centred and augmented passes included): equal to the hand-built joint prediction, equal
    to the network for identical members, different from the averaged answers for different
    members; a translated cloud is recovered; unknown values are refused; old configs average."""
    from cyclereg.clouds.features import FeatureEnsemble
    from cyclereg.clouds.pipeline import joint_recentred_displacements, test_time_displacements

    pair = make_breathing_pair(1, BreathingConfig(n_fixed=200, n_moving=400, branches=10))
    box = UnitBox.around(pair.fixed_mm, pair.moving_mm)
    fu, mu = box.mm_to_unit(pair.fixed_mm), box.mm_to_unit(pair.moving_mm)
    cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=16), recentre_passes=1, ensemble_fusion="joint")
    a, b = build_graph_net(seed=1), build_graph_net(seed=2)
    ens = FeatureEnsemble(a.config, 2)
    ens.members[0].load_state_dict(a.state_dict())
    ens.members[1].load_state_dict(b.state_dict())
    twins = FeatureEnsemble(a.config, 2)
    for m in twins.members:
        m.load_state_dict(a.state_dict())
    with torch.no_grad():
        joint = test_time_displacements(ens, fu, mu, cfg)
        torch.testing.assert_close(joint, joint_recentred_displacements(fu, mu, [a.pair(fu, mu), b.pair(fu, mu)], cfg))
        averaged = test_time_displacements(ens, fu, mu, replace(cfg, ensemble_fusion="average"))
        assert (joint - averaged).abs().max() > 1e-4
        torch.testing.assert_close(test_time_displacements(twins, fu, mu, cfg), test_time_displacements(a, fu, mu, cfg))
        tta = replace(cfg, tta_passes=1)
        torch.testing.assert_close(test_time_displacements(twins, fu, mu, tta), test_time_displacements(a, fu, mu, tta))
        # register_clouds: the joint answer, with spread also each member's own; the same answer without
        reg = register_clouds(pair.fixed_mm, pair.moving_mm, ens, cfg, box=box, spread=True)
        torch.testing.assert_close(box.disp_mm_to_unit(reg.displacements_mm), joint)
        alone = register_clouds(pair.fixed_mm, pair.moving_mm, ens, cfg, box=box)
        assert torch.equal(alone.displacements_mm, reg.displacements_mm) and alone.member_displacements_mm is None
        own = test_time_displacements(a, fu, mu, cfg)
        torch.testing.assert_close(box.disp_mm_to_unit(reg.member_displacements_mm[0]), own)
        # a wider re-centred search is the joint registration's; the members' own (spread only) keep K
        wide = replace(cfg, recentre_candidates=24)
        reg = register_clouds(pair.fixed_mm, pair.moving_mm, ens, wide, box=box, spread=True)
        torch.testing.assert_close(box.disp_mm_to_unit(reg.displacements_mm), test_time_displacements(ens, fu, mu, wide))
        assert (box.disp_mm_to_unit(reg.displacements_mm) - joint).abs().max() > 1e-5
        torch.testing.assert_close(box.disp_mm_to_unit(reg.member_displacements_mm[0]), own)
        averaged_wide = register_clouds(pair.fixed_mm, pair.moving_mm, ens, replace(wide, ensemble_fusion="average"),
                                        box=box, spread=True)  # averaged: the members' passes are the result, so K' applies
        torch.testing.assert_close(box.disp_mm_to_unit(averaged_wide.member_displacements_mm[0]),
                                   test_time_displacements(a, fu, mu, wide))
    p = torch.rand(400, 3, generator=torch.Generator().manual_seed(4)) * 100
    shift = torch.tensor([6.0, -4.0, 3.0])
    moved = register_clouds(p, p + shift, ens, cfg, box=UnitBox.around(p, p + shift)).displacements_mm
    assert (moved - shift).norm(dim=1).median() < 0.01
    with pytest.raises(ValueError, match="ensemble_fusion"):
        CloudRegConfig(ensemble_fusion="vote")
    assert CloudRegConfig.from_dict({}).ensemble_fusion == "average"  # checkpoints written before joint fusion


def test_recentred_pass_can_search_more_candidates():
    """``recentre_candidates`` sets K of the re-centred passes only: the result equals a first pass
    with ``lbp.num_candidates`` followed by a pass with the larger K around its smoothed estimate;
    None keeps every pass at ``lbp.num_candidates``; non-positive values are refused."""
    from cyclereg.clouds.pipeline import recentred_displacements, search_centres

    pair = make_breathing_pair(2, BreathingConfig(n_fixed=200, n_moving=400, branches=10))
    box = UnitBox.around(pair.fixed_mm, pair.moving_mm)
    fu, mu = box.mm_to_unit(pair.fixed_mm), box.mm_to_unit(pair.moving_mm)
    net = build_graph_net(seed=3)
    cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=8), recentre_passes=1)
    with torch.no_grad():
        ff, fm = net.pair(fu, mu)
        first = lbp_displacements(fu, mu, ff, fm, cfg.lbp)
        wide = lbp_displacements(fu, mu, ff, fm, replace(cfg.lbp, num_candidates=24),
                                 centres=search_centres(fu, first, cfg.tps))
        narrow = lbp_displacements(fu, mu, ff, fm, cfg.lbp, centres=search_centres(fu, first, cfg.tps))
        assert torch.equal(recentred_displacements(fu, mu, ff, fm, replace(cfg, recentre_candidates=24)), wide)
        assert torch.equal(recentred_displacements(fu, mu, ff, fm, cfg), narrow)
        assert (wide - narrow).abs().max() > 1e-5
        # no re-centred pass: the setting is unused
        assert torch.equal(recentred_displacements(fu, mu, ff, fm, replace(cfg, recentre_passes=0, recentre_candidates=24)),
                           first)
    with pytest.raises(ValueError, match="recentre_candidates"):
        CloudRegConfig(recentre_candidates=0)
    assert CloudRegConfig.from_dict({}).recentre_candidates is None


def test_pyg_template_files_are_removed_at_exit(tmp_path):
    """PyG renders EdgeConv's propagate code into a temporary file it never deletes; a process
    that built the graph CNN leaves nothing behind in its temporary folder."""
    import os
    import subprocess
    import sys

    code = ("import torch; from cyclereg.clouds.features import GraphFeatureNet, pyg_template_files; "
            "GraphFeatureNet()(torch.rand(50, 3), 5); print('\\n'.join(pyg_template_files()))")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmp_path)},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    written = run.stdout.split()
    if not written:
        pytest.skip("this PyG version writes no template files")
    assert all(os.path.dirname(p) == os.path.realpath(tmp_path) for p in written)
    assert sorted(tmp_path.iterdir()) == []


def test_member_spread_is_the_rms_distance_from_the_average():
    from cyclereg.clouds.pipeline import member_spread

    d = torch.randn(7, 3)
    a = torch.tensor([[3.0, 4.0, 0.0]]).expand(7, 3)
    torch.testing.assert_close(member_spread([d, d, d]), torch.zeros(7))
    torch.testing.assert_close(member_spread([d + a, d - a]), torch.full((7,), 5.0))  # each 5 mm from the mean
    # three members at 0, 0 and 3 along x: mean 1, squared distances 1, 1, 4 -> sqrt(2)
    x = torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(member_spread([0 * x, 0 * x, 3 * x]), torch.tensor([2.0]).sqrt())


def _affine_members(g: torch.Generator, fixed: torch.Tensor, tps: TPSConfig):
    """A registration of ``fixed`` whose three members' displacements are random affine fields
    (which each member's TPS reproduces exactly), and ``fields(points)``: those fields' values
    at other points."""
    from cyclereg.clouds.pipeline import CloudRegistration

    affine = [(torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.05,
               torch.randn(3, generator=g, dtype=torch.float64)) for _ in range(3)]

    def fields(points: torch.Tensor) -> list[torch.Tensor]:
        return [points @ A.T + t for A, t in affine]

    members = tuple(fields(fixed))
    return CloudRegistration(fixed, sum(members) / 3, UnitBox.around(fixed, fixed), tps, members), fields


def test_registration_spread_at_queries_for_affine_member_fields():
    """Members whose displacements are affine fields: each TPS reproduces its field exactly, so
    the spread at any query is the analytic spread of the fields there; the average is the
    registered displacement; a single network has no spread."""
    from cyclereg.clouds.pipeline import CloudRegistration, member_spread

    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(60, 3, generator=g, dtype=torch.float64) * 100
    query = torch.rand(25, 3, generator=g, dtype=torch.float64) * 100
    reg, fields = _affine_members(g, fixed, TPSConfig(regularisation=0.3))
    torch.testing.assert_close(reg.spread_mm, member_spread(fields(fixed)))
    torch.testing.assert_close(reg.spread_at(query), member_spread(fields(query)))
    single = CloudRegistration(fixed, fields(fixed)[0], reg.box, TPSConfig())
    assert single.spread_mm is None and single.spread_at(query) is None


def test_spearman_against_hand_computed_values(device):
    from cyclereg.metrics import spearman, tre_stats

    on = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], device=device)  # the inputs' device throughout
    assert spearman(on, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0], device=device)) == pytest.approx(0.8)
    assert tre_stats(on) == pytest.approx({"mean": 3.0, "std": 2.5 ** 0.5, "p25": 2.0, "p50": 3.0, "p75": 4.0})
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])) == pytest.approx(0.8)  # 1 - 6*4/(5*24)
    assert spearman(a, a.exp()) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert math.isnan(spearman(a, torch.ones(5))) and math.isnan(spearman(a[:1], a[:1]))
    with pytest.raises(ValueError, match="a \\(5,\\), b \\(4,\\)"):
        spearman(a, a[:4])


def test_spearman_ties_share_their_mean_rank(device):
    """Equal values share the mean of the ranks they span (ranks by order of appearance made the result depend on
    how tied values were listed): [1, 2, 2, 3] ranks as [0, 1.5, 1.5, 3], so against [1, 2, 3, 4] the centred
    ranks (-1.5, 0, 0, 1.5) and (-1.5, -0.5, 0.5, 1.5) give 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)."""
    from cyclereg.metrics import spearman

    t = lambda *v: torch.tensor(v, device=device)  # noqa: E731
    assert spearman(t(1.0, 2.0, 2.0, 3.0), t(1.0, 2.0, 3.0, 4.0)) == pytest.approx(3 / 10 ** 0.5, abs=1e-12)
    # two tied pairs against a balanced pattern: no association at all (by order it read 0.8)
    assert spearman(t(0.0, 0.0, 1.0, 1.0), t(0.0, 1.0, 0.0, 1.0)) == pytest.approx(0.0, abs=1e-12)
    # swapping tied entries of one sample cannot change the answer
    a, b = t(3.0, 1.0, 3.0, 2.0, 3.0), t(0.5, 0.1, 0.9, 0.2, 0.4)
    assert spearman(a, b) == pytest.approx(spearman(a, t(0.9, 0.1, 0.4, 0.2, 0.5)), abs=1e-12)


def test_dense_spread_at_grid_nodes():
    """dense_spread evaluates the members' spread every tps.grid_step voxels and upsamples: at
    those voxels it equals the analytic spread of affine member fields (reproduced exactly by
    each member's TPS); a single network has none."""
    from cyclereg.clouds.pipeline import CloudRegistration, member_spread
    from cyclereg.frames import voxel_to_world

    g = torch.Generator().manual_seed(1)
    fixed = torch.rand(80, 3, generator=g, dtype=torch.float64) * torch.tensor([16.0, 24.0, 32.0])
    reg, fields = _affine_members(g, fixed, TPSConfig(regularisation=0.3, grid_step=4))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    shape = (9, 13, 17)  # (s - 1) divisible by 4: the evaluated voxels are exactly every 4th
    spread = reg.dense_spread(affine, shape)
    assert spread.shape == (1, 1, *shape)
    nodes = torch.stack(torch.meshgrid(*(torch.arange(0, s, 4, dtype=torch.float64) for s in shape),
                                       indexing="ij"), -1).reshape(-1, 3)
    world = voxel_to_world(nodes, torch.from_numpy(affine))
    want = member_spread(fields(world))
    got = spread[0, 0, ::4, ::4, ::4].reshape(-1).double()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert CloudRegistration(fixed, fields(fixed)[0], reg.box, TPSConfig()).dense_spread(affine, shape) is None


def _lbp_feature_gradients(n_threads: int) -> list[torch.Tensor]:
    """Gradients of a loss through the LBP with respect to both clouds' features, computed
    three times with ``n_threads`` intra-op threads."""
    g = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(600, 3, generator=g) * 2 - 1, torch.rand(1200, 3, generator=g) * 2 - 1
    ff, fm = torch.randn(600, 16, generator=g), torch.randn(1200, 16, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        grads = []
        for _ in range(3):
            a, b = ff.clone().requires_grad_(), fm.clone().requires_grad_()
            lbp_displacements(fixed, moving, a, b, LBPConfig(num_candidates=32)).pow(2).sum().backward()
            grads.append(torch.cat([a.grad.flatten(), b.grad.flatten()]))
        return grads
    finally:
        torch.set_num_threads(previous)


def test_take_rows_is_indexing_and_lbp_gradients_are_reproducible_with_threads():
    """take_rows(x, idx) == x[idx]; and the gradients through the LBP (the learning stream) are
    bitwise the same run to run with two threads (advanced indexing's backward was not, so two
    runs of the same training drifted apart on a 2-core CPU)."""
    from cyclereg.clouds.lbp import take_rows

    x, idx = torch.randn(50, 4, 3), torch.randint(0, 50, (7, 5))
    assert torch.equal(take_rows(x, idx), x[idx])
    first, *rest = _lbp_feature_gradients(2)
    assert first.abs().sum() > 0 and all(torch.equal(first, r) for r in rest)


@pytest.mark.parametrize("members", [1, 2])
def test_test_time_copies_reuse_the_plain_clouds_graphs_with_the_searched_result(members):
    """The kNN graphs of the plain clouds are reused for every test-time copy (a similarity
    transform keeps them): the result is the hand-built one that searches each copy afresh."""
    from cyclereg.clouds.augment import apply_affine, displacements_back, random_affine
    from cyclereg.clouds.features import FeatureEnsemble
    from cyclereg.clouds.pipeline import joint_recentred_displacements, test_time_displacements

    pair = make_breathing_pair(2, BreathingConfig(n_fixed=200, n_moving=400, branches=10))
    box = UnitBox.around(pair.fixed_mm, pair.moving_mm)
    fu, mu = box.mm_to_unit(pair.fixed_mm), box.mm_to_unit(pair.moving_mm)
    cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=16), recentre_passes=1, tta_passes=3,
                         ensemble_size=members, ensemble_fusion="joint")
    nets = [build_graph_net(seed=5 + i) for i in range(members)]
    model = nets[0]
    if members > 1:
        model = FeatureEnsemble(nets[0].config, members)
        for m, n in zip(model.members, nets):
            m.load_state_dict(n.state_dict())
    g = torch.Generator().manual_seed(cfg.tta_seed)
    with torch.no_grad():
        total = joint_recentred_displacements(fu, mu, [n.pair(fu, mu) for n in nets], cfg)
        for _ in range(cfg.tta_passes):
            A, t = random_affine(g, cfg.tta_rotation_deg, cfg.tta_scale, cfg.tta_translation, fu.dtype)
            fa, ma = apply_affine(fu, A, t), apply_affine(mu, A, t)
            total = total + displacements_back(joint_recentred_displacements(fa, ma, [n.pair(fa, ma) for n in nets], cfg), A)
        torch.testing.assert_close(test_time_displacements(model, fu, mu, cfg), total / (cfg.tta_passes + 1))


def test_register_clouds_checks_its_clouds_by_name():
    """As the CLI does for files: too few points for the kNN graphs, NaN, and a fixed cloud on one
    plane (the spline's affine part has no solution) are ValueErrors naming the argument (they were
    raw kNN or linear-algebra errors, or an all-NaN result)."""
    pair = make_breathing_pair(0, BreathingConfig(n_fixed=300, n_moving=600, branches=20))
    cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=16))
    net = build_graph_net(cfg.net, seed=0)
    nan = pair.fixed_mm.clone()
    nan[3, 1] = float("nan")
    flat = pair.fixed_mm.clone()
    flat[:, 2] = 7.0
    for f, m, message in ((pair.fixed_mm[:1], pair.moving_mm, "fixed_mm: 1 point; registration needs at least"),
                          (pair.fixed_mm, pair.moving_mm[:5], "moving_mm: 5 points"),
                          (nan, pair.moving_mm, "fixed_mm: holds NaN or inf"),
                          (flat, pair.moving_mm, "fixed_mm: all points lie on one plane")):
        with pytest.raises(ValueError, match=message):
            register_clouds(f, m, net, cfg)


def test_displacements_at_queries_follow_the_query():
    """Query points of another dtype get displacements in that dtype; no points, no displacements;
    a query that is not (M, 3) is named."""
    pair = make_breathing_pair(1, BreathingConfig(n_fixed=300, n_moving=600, branches=20))
    reg = register_clouds(pair.fixed_mm, pair.moving_mm, None, CloudRegConfig())  # identity: a zero field
    q = pair.fixed_mm[:5].double()
    assert reg.at(q).dtype == torch.float64 and reg.at(q).shape == (5, 3)
    assert reg.at(torch.zeros(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match=r"points: expected \(M, 3\), got \(3,\)"):
        reg.at(pair.fixed_mm[0])
    moved = register_clouds(pair.fixed_mm, pair.moving_mm, build_graph_net(GraphNetConfig(), seed=0),
                            CloudRegConfig(lbp=LBPConfig(num_candidates=16)))
    torch.testing.assert_close(moved.at(q).float(), moved.at(q.float()), atol=1e-4, rtol=0)
