"""Analytic checks of the test-time keypoint pipeline written by a mutation audit: each test kills
a mutant that the rest of the suite let through (tiny sizes, well under a second each)."""

from __future__ import annotations

import pytest
import torch

from cyclereg.clouds.knn import knn_indices
from cyclereg.clouds.lbp import candidates
from cyclereg.clouds.tps import ThinPlateSpline, _phi


def test_every_moving_point_is_a_candidate_when_k_exceeds_the_cloud():
    """With ``num_candidates >= M`` each fixed point gets all ``M`` moving points as candidates
    (``min(k, M)``, not one fewer), each displacement measured from the fixed point."""
    g = torch.Generator().manual_seed(0)
    f = torch.rand(6, 3, generator=g, dtype=torch.float64)
    m = torch.rand(5, 3, generator=g, dtype=torch.float64)
    for k in (5, 9):
        cand, idx = candidates(f, m, k)
        assert idx.shape == (6, 5)
        assert all(sorted(row) == list(range(5)) for row in idx.tolist())
        torch.testing.assert_close(cand, m[idx] - f[:, None, :], atol=0, rtol=0)


def test_regularised_tps_solves_its_defining_system():
    """``(Phi + lambda I) w + P a = v`` and ``P^T w = 0``: at the control points the smoothed spline
    misses the values by exactly ``lambda w`` (lambda added to the kernel diagonal, not subtracted)."""
    g = torch.Generator().manual_seed(1)
    c = torch.rand(30, 3, generator=g, dtype=torch.float64) * 2 - 1
    v = torch.randn(30, 3, generator=g, dtype=torch.float64)
    lam = 0.7
    spline = ThinPlateSpline.fit(c, v, regularisation=lam)
    torch.testing.assert_close(spline(c) + lam * spline.weights, v, atol=1e-9, rtol=0)
    P = torch.cat([torch.ones(30, 1, dtype=torch.float64), c], dim=1)
    torch.testing.assert_close(P.T @ spline.weights, torch.zeros(4, 3, dtype=torch.float64), atol=1e-9, rtol=0)


def test_regularised_tps_still_reproduces_an_affine_field():
    """An affine field lies in the null space of the bending term, so any lambda reproduces it
    exactly (the regularisation acts on the kernel weights only, not on the affine part)."""
    g = torch.Generator().manual_seed(2)
    c = torch.rand(25, 3, generator=g, dtype=torch.float64) * 2 - 1
    A = torch.tensor([[0.1, 0.2, -0.1], [0.05, -0.1, 0.3], [-0.2, 0.1, 0.2]], dtype=torch.float64)
    t = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    q = torch.rand(40, 3, generator=g, dtype=torch.float64) * 2 - 1
    for lam in (0.5, torch.full((25,), 2.0, dtype=torch.float64)):
        spline = ThinPlateSpline.fit(c, c @ A.T + t, regularisation=lam)
        torch.testing.assert_close(spline(q), q @ A.T + t, atol=1e-9, rtol=0)
        torch.testing.assert_close(spline.weights, torch.zeros_like(spline.weights), atol=1e-9, rtol=0)


def test_biharmonic_kernel_is_r_and_interpolates():
    """The ``"r"`` kernel is the 3-D biharmonic ``phi(r) = r``; its spline interpolates its control points."""
    r = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(_phi(r.clone(), "r"), r, atol=0, rtol=0)
    g = torch.Generator().manual_seed(3)
    c = torch.rand(20, 3, generator=g, dtype=torch.float64)
    v = torch.randn(20, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ThinPlateSpline.fit(c, v, kernel="r")(c), v, atol=1e-8, rtol=0)


def test_knn_refuses_k_that_the_reference_cannot_give_without_self():
    """With ``exclude_self`` a cloud of M points has only M - 1 neighbours per point: k = M is refused."""
    p = torch.rand(5, 3, generator=torch.Generator().manual_seed(4))
    assert knn_indices(p, p, 4, exclude_self=True).shape == (5, 4)
    with pytest.raises(ValueError, match="k=5"):
        knn_indices(p, p, 5, exclude_self=True)


def _small_pair(seed: int = 0, n: int = 120):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, 3, generator=g) * 2 - 1
    u = 0.05 * torch.sin(3 * p[:, [1, 2, 0]])  # smooth, non-affine motion (unit frame)
    return p, p + u


def test_each_test_time_copy_is_registered_on_its_own_features_and_mapped_back():
    """``tta_passes = P``: the mean of the plain prediction and, for each seeded copy ``x -> A x + t`` of
    both clouds, the prediction on the copy (the network run on the copy) mapped back by ``A^{-1}``."""
    from cyclereg.clouds.augment import random_affine
    from cyclereg.clouds.features import build_graph_net
    from cyclereg.clouds.lbp import LBPConfig
    from cyclereg.clouds.pipeline import CloudRegConfig, predict_recentred, test_time_displacements

    fu, mu = _small_pair()
    net = build_graph_net(seed=0)
    plain_cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=8, graph_k=4), recentre_passes=1, tta_seed=7)
    cfg = CloudRegConfig(**{**plain_cfg.__dict__, "tta_passes": 2})
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        expected = predict_recentred(net, fu, mu, plain_cfg)
        for _ in range(2):
            A, t = random_affine(g, cfg.tta_rotation_deg, cfg.tta_scale, cfg.tta_translation, fu.dtype)
            copy = predict_recentred(net, fu @ A.T + t, mu @ A.T + t, plain_cfg)
            expected = expected + copy @ torch.linalg.inv(A).T
        got = test_time_displacements(net, fu, mu, cfg)
    torch.testing.assert_close(got, expected / 3, atol=1e-5, rtol=0)


def test_search_centres_use_the_regularised_spline():
    """A re-centred pass searches around ``f + s(f)`` with ``s`` the TPS of the previous displacements
    fitted with ``tps.regularisation`` (lambda > 0 smooths: not the raw ``f + u``)."""
    from cyclereg.clouds.pipeline import search_centres
    from cyclereg.clouds.tps import TPSConfig

    g = torch.Generator().manual_seed(8)
    f = torch.rand(40, 3, generator=g, dtype=torch.float64) * 2 - 1
    u = 0.1 * torch.randn(40, 3, generator=g, dtype=torch.float64)
    tps = TPSConfig(regularisation=0.5)
    centres = search_centres(f, u, tps)
    torch.testing.assert_close(centres, f + ThinPlateSpline.fit(f, u, regularisation=0.5)(f), atol=1e-12, rtol=0)
    assert (centres - (f + u)).abs().max() > 1e-3
    torch.testing.assert_close(search_centres(f, u, TPSConfig(regularisation=0.0)), f + u, atol=1e-8, rtol=0)


def test_training_box_is_kept_for_a_pair_inside_it_away_from_the_origin():
    """The training box is used as is when the pair's centre lies inside it, also for a box whose
    corner is not the origin (``lo <= c <= lo + extent`` per axis), and moved otherwise."""
    from cyclereg.clouds.pipeline import CloudRegConfig, registration_box
    from cyclereg.frames import UnitBox

    trained = UnitBox((100.0, 200.0, 300.0), (50.0, 60.0, 70.0))
    cfg = CloudRegConfig(training_box=trained)
    g = torch.Generator().manual_seed(9)
    f = torch.rand(30, 3, generator=g, dtype=torch.float64) * 10 + torch.tensor([120.0, 225.0, 330.0])
    assert registration_box(f, f + 1.0, cfg) == (trained, "training box")
    box, how = registration_box(f + 100.0, f + 101.0, cfg)
    assert how == "training box, moved to the clouds" and tuple(box.extent_mm) == tuple(trained.extent_mm)


def test_knn_graph_with_self_loops_on_a_cloud_of_exactly_k_points():
    """``knn_edge_index(points, k, include_self=True)`` needs only ``k`` points (the point itself and
    its ``k - 1`` nearest others): on ``k`` points every point gathers the whole cloud, itself first."""
    from cyclereg.clouds.knn import knn_edge_index

    p = torch.rand(5, 3, generator=torch.Generator().manual_seed(10))
    ei = knn_edge_index(p, 5, include_self=True)
    assert ei.shape == (2, 25)
    for i in range(5):
        sources = ei[0, ei[1] == i].tolist()
        assert sources[0] == i and sorted(sources) == list(range(5))


def test_is_similarity_rejects_a_small_shear():
    """A scaled rotation keeps every kNN graph; a 0.1 % shear or a 1 % stretch does not pass as one."""
    from cyclereg.clouds.augment import random_affine
    from cyclereg.clouds.graphs import is_similarity

    A, _ = random_affine(torch.Generator().manual_seed(11), 30.0, 0.2, 0.0, torch.float32)
    assert is_similarity(A) and is_similarity(-2.0 * A)
    shear = torch.eye(3, dtype=torch.float64)
    shear[0, 1] = 1e-3
    stretch = torch.diag(torch.tensor([1.0, 1.0, 1.01], dtype=torch.float64))
    assert not is_similarity(shear) and not is_similarity(stretch @ A.double())


def test_pruned_search_does_not_trust_a_label_just_above_the_bound():
    """The pruned min-convolution certifies a destination label only when the best of the first source
    labels is below the next belief (the bound); 5e-7 above it the label is searched again, so an
    unsearched source label that is cheaper still wins (exact min-sum, not within a margin)."""
    from cyclereg.clouds.lbp import _argmin_pruned_chunk

    belief = torch.tensor([[0.0, 1.0]], dtype=torch.float64)  # first = 1: label 0 searched, bound = 1.0
    y = torch.zeros(1, 1, 3, dtype=torch.float64)
    x0 = torch.tensor([(1.0 + 5e-7) ** 0.5, 0.0, 0.0], dtype=torch.float64)  # label 0: 0 + |x0 - y|^2 = 1 + 5e-7
    cand_src = torch.stack([x0, y[0, 0]])[None]  # label 1: 1.0 + 0 = 1.0, the true minimum
    assert _argmin_pruned_chunk(belief, cand_src, y, 1.0, 1).tolist() == [[1]]
