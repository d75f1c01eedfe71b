"""The C arg-min kernel of the LBP (cyclereg.clouds.native) against the torch path: the same
indices, messages, beliefs and gradients bitwise, brute force on small cases, and the fallback
when no kernel can be built."""

from __future__ import annotations

import pytest
import torch

from cyclereg import native as shared
from cyclereg.clouds import lbp, native

from conftest import require_kernel


@pytest.fixture
def kernel():
    return require_kernel(native)


def _problem(e, ks, kd, scale, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    cand_src = torch.randn(e, ks, 3, generator=g) * 0.05
    cand_dst = torch.randn(e, kd, 3, generator=g) * 0.05
    belief = torch.rand(e, ks, generator=g) * scale
    if ties and ks > 2:
        cand_src[:, 2] = cand_src[:, 0]
        belief[:, 2] = belief[:, 0]  # labels 0 and 2: equal values for every destination
        cand_dst[:, 0] = cand_src[:, 0]
    return belief, cand_src, cand_dst


@pytest.mark.parametrize("ks,kd", [(1, 1), (3, 5), (33, 31), (64, 64), (256, 256), (300, 40)])
@pytest.mark.parametrize("scale", [1e-4, 0.05, 5.0])
def test_kernel_indices_are_the_torch_searches(kernel, ks, kd, scale):
    """Full and pruned kernel searches return torch's full-search indices (first index among
    exact ties) and the pairwise term at them, bitwise; without ties also torch's pruned search's."""
    belief, cs, cd = _problem(23, ks, kd, scale, seed=ks + kd, ties=True)
    alpha = 10.3  # not a float32 number: -2 alpha and alpha are rounded as torch rounds them
    want = lbp._argmin_chunk(belief, cs, cd, alpha)
    want_pair = alpha * (cs.gather(1, want[..., None].expand(-1, -1, 3)) - cd).pow(2).sum(-1)
    brute = (belief[:, :, None] + alpha * (cs[:, :, None, :] - cd[:, None, :, :]).pow(2).sum(-1))
    for first in {0, 1, ks // 4, ks - 1}:
        arg, pair = native.search(belief, cs, cd, alpha, first, with_pair=True)
        assert torch.equal(arg, want), first
        assert torch.equal(pair, want_pair), first
        # and it is the minimum (up to the rounding of the two ways of writing the cost)
        torch.testing.assert_close(brute.gather(1, arg[:, None, :])[:, 0], brute.amin(1), rtol=1e-5, atol=1e-6)
    if ks >= 4:  # torch's pruned search too, where no two labels tie (it breaks ties by belief)
        belief, cs, cd = _problem(23, ks, kd, scale, seed=ks + kd + 1)
        assert torch.equal(native.search(belief, cs, cd, alpha, ks // 4)[0],
                           lbp._argmin_pruned_chunk(belief, cs, cd, alpha, ks // 4))


def test_ties_go_to_the_first_label(kernel):
    """Identical source labels: the lowest index wins, within a pass and across the two passes
    of the pruned search (whose first pass holds the `first` lowest beliefs)."""
    e, k = 4, 100
    cs = torch.zeros(e, k, 3)
    cd = torch.randn(e, 5, 3) * 0.1
    belief = torch.ones(e, k)
    for first in (0, 25):
        arg, _ = native.search(belief, cs, cd, 10.0, first)
        assert torch.equal(arg, torch.zeros(e, 5, dtype=torch.int64))
    # destinations at 0 and alpha = 1: a label's value is exactly b + |x|^2. The 25 lowest
    # beliefs (the first pass) hold one of two labels of value 0.75; the other is in the second
    cd = torch.zeros(e, 5, 3)
    cs[:] = 1.0
    belief[:] = 1.0
    belief[:, 70:94] = 0.0
    for early, late in ((20, 60), (60, 20)):
        b, x = belief.clone(), cs.clone()
        b[:, early], x[:, early] = 0.5, torch.tensor([0.5, 0.0, 0.0])
        b[:, late], x[:, late] = 0.75, 0.0
        for first in (0, 25):
            arg, _ = native.search(b, x, cd, 1.0, first)
            assert torch.equal(arg, torch.full((e, 5), 20)), (early, first)
            assert torch.equal(arg, lbp._argmin_chunk(b, x, cd, 1.0))


def _lbp_problem(n=400, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.rand(n, 3, generator=g) * 2 - 1
    moving = fixed + 0.05 * torch.randn(n, 3, generator=g)
    feat_f = torch.randn(n, 8, generator=g).requires_grad_()
    feat_m = torch.randn(n, 8, generator=g).requires_grad_()
    return fixed, moving, feat_f, feat_m


@pytest.mark.parametrize("cfg", [lbp.LBPConfig(num_candidates=64),
                                 lbp.LBPConfig(num_candidates=160, iterations=3),
                                 lbp.LBPConfig(num_candidates=64, source_labels=20),
                                 lbp.LBPConfig(num_candidates=64, prune_from=32)])
def test_lbp_displacements_and_gradients_bitwise_as_torch_path(kernel, monkeypatch, cfg):
    """A whole LBP (candidates, sweeps, soft-argmin) and its backward: bitwise the same with the
    kernel's search and with the torch search, pruned or not, restricted source labels or not
    (the sweeps as torch steps; the fused sweeps are checked below)."""
    monkeypatch.setattr(native, "sweeps_usable", lambda unary, cand: False)
    fixed, moving, feat_f, feat_m = _lbp_problem()
    # the features once, as leaves: with two threads, tanh under autograd gave other last bits in
    # about one process of three (torch 2.13 CPU), so features computed per path made this test flaky
    feat_f, feat_m = (f.tanh().detach().requires_grad_(True) for f in (feat_f, feat_m))
    results = []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setenv(shared.DISABLE_ENV, "0")
        assert native.usable(torch.zeros(1, 1)) is use_kernel
        feat_f.grad = feat_m.grad = None
        disp = lbp.lbp_displacements(fixed, moving, feat_f, feat_m, cfg)
        disp.pow(2).sum().backward()
        results.append((disp.detach(), feat_f.grad.clone(), feat_m.grad.clone()))
    (d1, gf1, gm1), (d2, gf2, gm2) = results
    assert gf1.abs().sum() > 0
    assert torch.equal(d1, d2) and torch.equal(gf1, gf2) and torch.equal(gm1, gm2)


def test_kernel_min_sum_is_min_marginals_on_a_tree(kernel):
    """float32 (the kernel's dtype): min-sum beliefs on a tree equal brute-force min-marginals."""
    from test_clouds import _tree_energy_min_marginals

    g = torch.Generator().manual_seed(3)
    n, k = 5, 4
    tree = [(0, 1), (1, 2), (1, 3), (3, 4)]
    unary = torch.rand(n, k, generator=g)
    cand = torch.randn(n, k, 3, generator=g)
    edge_index = torch.tensor([[a for a, b in tree] + [b for a, b in tree], [b for a, b in tree] + [a for a, b in tree]])
    reverse = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    belief = lbp.min_sum(unary, cand, edge_index, reverse, 0.7, iterations=4)
    ref = _tree_energy_min_marginals(unary.double(), cand.double(), tree, 0.7)
    diff = belief.double() - ref
    torch.testing.assert_close(diff - diff[:, :1], torch.zeros_like(diff), atol=1e-5, rtol=0)


def test_threads_change_nothing(kernel):
    belief, cs, cd = _problem(300, 96, 96, 0.05, seed=1)
    ref = lbp.min_convolution(belief, cs, cd, 10.0, prune_from=64)
    threads = torch.get_num_threads()
    try:
        for nthreads in (1, 2, 3):
            torch.set_num_threads(nthreads)
            assert torch.equal(lbp.min_convolution(belief, cs, cd, 10.0, prune_from=64), ref)
    finally:
        torch.set_num_threads(threads)


def test_non_finite_beliefs_and_float64_take_the_torch_path(kernel):
    belief, cs, cd = _problem(5, 8, 8, 1.0, seed=2)
    assert native.usable(belief)
    belief[0, 0] = float("inf")
    assert not native.usable(belief)
    belief[0, 0] = float("nan")
    assert not native.usable(belief)
    assert not native.usable(torch.zeros(2, 2, dtype=torch.float64))
    out = lbp.min_convolution(belief, cs, cd, 10.0)  # runs, through torch
    assert torch.isfinite(out[1:]).all()


def test_without_a_compiler_the_torch_path_is_used(monkeypatch, tmp_path):
    """No compiler (or a build error): kernel() is None with a reason, LBP still works."""
    monkeypatch.setattr(native.LIBRARY, "_kernel", None)
    monkeypatch.setattr(native.LIBRARY, "_reason", "not loaded yet")
    monkeypatch.setenv(shared.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(shared, "compiler", lambda: None)
    assert native.kernel() is None
    assert "no C compiler" in native.reason() and native.reason().endswith(": the torch path runs")
    fixed, moving, feat_f, feat_m = _lbp_problem(n=60, k=16)
    disp = lbp.lbp_displacements(fixed, moving, feat_f, feat_m, lbp.LBPConfig(num_candidates=16))
    assert disp.shape == (60, 3) and torch.isfinite(disp).all()
    # a failing compiler: the same, and nothing is left in the cache
    monkeypatch.setattr(native.LIBRARY, "_reason", "not loaded yet")
    bad = tmp_path / "bad-cc"
    bad.write_text("#!/bin/sh\necho 'bad-cc: broken' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setattr(shared, "compiler", lambda: str(bad))
    assert native.kernel() is None
    assert "could not be built" in native.reason() and "broken" in native.reason()
    assert not any((tmp_path / "cache").rglob("*.so"))


def test_disabling_is_not_remembered(monkeypatch):
    """CYCLEREG_NATIVE=0 holds while it is set: set before the first load, then removed, the
    kernel loads (it had stayed off for the rest of the process)."""
    if shared.compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(native.LIBRARY, "_kernel", None)
    monkeypatch.setattr(native.LIBRARY, "_reason", "not loaded yet")
    monkeypatch.setenv(shared.DISABLE_ENV, "0")
    assert native.kernel() is None and native.reason() == f"disabled by {shared.DISABLE_ENV}=0: the torch path runs"
    monkeypatch.delenv(shared.DISABLE_ENV)
    assert native.kernel() is not None and native.reason().startswith(shared.IN_USE)
    # which library runs, built from which source
    assert str(native.SOURCE) in native.reason() and str(shared.cache_dir()) in native.reason()


def test_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    if shared.compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv(shared.CACHE_ENV, str(tmp_path))
    first = native.LIBRARY.build()
    assert first.parent == tmp_path / "native" and first.suffix == ".so" and first.name.startswith("minconv-")
    mtime = first.stat().st_mtime_ns
    assert native.LIBRARY.build() == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left


@pytest.fixture
def sweeps():
    if native.SWEEPS.kernel() is None:
        pytest.skip(f"no fused min-sum kernel here: {native.SWEEPS.reason()}")
    return native.SWEEPS.kernel()


def _graph_problem(n, k, seed, ties=False):
    from cyclereg.clouds.knn import symmetric_edge_index

    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 3, generator=g)
    edge_index, reverse = symmetric_edge_index(pts, 6)
    cand = torch.randn(n, k, 3, generator=g) * 0.05
    unary = torch.rand(n, k, generator=g)
    if ties and k > 3:
        cand[:, 3] = cand[:, 1]
        unary[:, 3] = unary[:, 1]  # labels 1 and 3 equal everywhere: ties in search and messages
    return unary, cand, edge_index, reverse


@pytest.mark.parametrize("k,prune_from,iterations", [(1, None, 3), (12, None, 5), (64, 128, 5), (160, 128, 3)])
@pytest.mark.parametrize("ties", [False, True])
def test_fused_sweeps_are_the_torch_loop(sweeps, k, prune_from, iterations, ties):
    """All sweeps in C: the torch loop's beliefs bitwise, its gradient to float rounding (the
    same terms summed in another order), with exact ties in the messages, pruned or not."""
    unary, cand, edge_index, reverse = _graph_problem(150, k, seed=k, ties=ties)
    w = torch.randn(150, k, generator=torch.Generator().manual_seed(9))
    out = []
    for fused in (True, False):
        u = unary.clone().requires_grad_(True)
        belief = lbp.min_sum(u, cand, edge_index, reverse, 7.3, iterations, prune_from=prune_from, fused=fused)
        (grad,) = torch.autograd.grad((belief * w).sum(), u)
        out.append((belief.detach(), grad))
    (b1, g1), (b2, g2) = out
    assert torch.equal(b1, b2)
    assert g2.abs().max() > 0
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-5 * float(g2.abs().max()))
    if ties and k > 3:  # labels 1 and 3 are the same label twice: equal messages and beliefs throughout
        assert torch.equal(b1[:, 1], b1[:, 3])


def test_fused_sweeps_gradient_passes_node_shifts_through(sweeps):
    """Adding c to every label's cost of one node adds c to that node's beliefs and leaves all
    messages (normalised to minimum 0, arg-mins unchanged) alone, so the gradient of
    sum(w * belief) summed over a node's labels is exactly sum(w) over them, at every node."""
    for ties in (False, True):
        unary, cand, edge_index, reverse = _graph_problem(60, 10, seed=4, ties=ties)
        w = torch.randn(60, 10, generator=torch.Generator().manual_seed(5))
        u = unary.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((lbp.min_sum(u, cand, edge_index, reverse, 5.0, 4) * w).sum(), u)
        assert (grad - w).abs().max() > 0.1  # the messages do carry gradient between nodes
        torch.testing.assert_close(grad.sum(1), w.sum(1), rtol=0, atol=1e-5)


def test_fused_sweeps_threads_change_nothing(sweeps):
    unary, cand, edge_index, reverse = _graph_problem(300, 48, seed=2)
    ref = lbp.min_sum(unary, cand, edge_index, reverse, 10.0, 5)
    threads = torch.get_num_threads()
    try:
        for nthreads in (1, 2, 3):
            torch.set_num_threads(nthreads)
            assert torch.equal(lbp.min_sum(unary, cand, edge_index, reverse, 10.0, 5), ref)
    finally:
        torch.set_num_threads(threads)


def test_fused_sweeps_apply_only_where_they_are_exact(sweeps, monkeypatch):
    """Coordinates with a gradient, restricted source labels, float64, non-finite costs or
    CYCLEREG_NATIVE=0 take the torch steps; the first use may come under no_grad."""
    unary, cand, edge_index, reverse = _graph_problem(30, 8, seed=3)
    assert native.sweeps_usable(unary, cand)
    assert not native.sweeps_usable(unary, cand.clone().requires_grad_(True))
    assert not native.sweeps_usable(unary.double(), cand.double())
    bad = unary.clone()
    bad[0, 0] = float("nan")
    assert not native.sweeps_usable(bad, cand)
    calls = []
    monkeypatch.setattr(native, "min_sum", lambda *a, **kw: calls.append(1))
    lbp.min_sum(unary, cand, edge_index, reverse, 5.0, 3, source_labels=4)
    assert not calls
    monkeypatch.setenv(shared.DISABLE_ENV, "0")
    assert not native.sweeps_usable(unary, cand)
    monkeypatch.delenv(shared.DISABLE_ENV)
    monkeypatch.setattr(native.SWEEPS, "_kernel", None)
    monkeypatch.setattr(native.SWEEPS, "_reason", "not loaded yet")
    with torch.no_grad():
        assert native.SWEEPS.kernel() is not None and native.SWEEPS.reason().startswith(shared.IN_USE)


def test_fused_sweeps_without_edges_and_with_int32_indices(sweeps):
    """No edges: the beliefs are the unary costs (gradient the identity); int32 edge indices are
    read as the int64 ones."""
    unary, cand, edge_index, reverse = _graph_problem(20, 6, seed=7)
    u = unary.clone().requires_grad_(True)
    empty = torch.zeros(2, 0, dtype=torch.int64)
    belief = lbp.min_sum(u, cand, empty, torch.zeros(0, dtype=torch.int64), 5.0, 3)
    assert torch.equal(belief.detach(), unary)
    (grad,) = torch.autograd.grad(belief.sum(), u)
    assert torch.equal(grad, torch.ones_like(unary))
    assert torch.equal(lbp.min_sum(unary, cand, edge_index.int(), reverse.int(), 5.0, 3),
                       lbp.min_sum(unary, cand, edge_index, reverse, 5.0, 3))


def test_with_a_compiler_the_fused_sweeps_load():
    """Where a C compiler exists the fused sweeps must build and pass their check (the tests above
    skip without them, so a kernel that failed its check would otherwise only show as skips)."""
    if shared.compiler() is None:
        pytest.skip("no C compiler")
    assert native.SWEEPS.kernel() is not None, native.SWEEPS.reason()
    assert native.SWEEPS.reason().startswith(shared.IN_USE)
