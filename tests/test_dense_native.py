"""The C kernel of Adam's data term (cyclereg.dense.native): analytic values and gradients, the torch
path's values and gradients to float32 rounding, the whole instance optimisation with and without
it, and the fallback."""

from __future__ import annotations

import pytest
import torch

from cyclereg import native as shared
from cyclereg.dense import native
from cyclereg.dense.config import AdamConfig
from cyclereg.dense.instance import WarpedMSE, adam_refine, warped_mse_torch

from conftest import require_kernel


@pytest.fixture
def kernel():
    return require_kernel(native)


def _mse(fix, mov, disp):
    return native.warped_mse(native.channels_last(fix), native.channels_last(mov), disp)


def test_linear_features_give_the_analytic_value_and_gradient(kernel):
    """Moving features linear in the voxel position, m_c(p) = a_c . p + b_c, fixed features f, and a
    constant shift u that pushes some positions past the upper borders: the sample is m_c at the
    clamped position p = clamp(x + u), so E = mean (a_c . p + b_c - f_c)^2 exactly, and dE/du_i(x) =
    2 / (C N) sum_c r_c a_ci along the axes where x + u is inside the grid, 0 where it was clamped."""
    shape = (6, 7, 8)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))
    a = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]])
    b = torch.tensor([2.0, -1.0])
    mov = (torch.einsum("ci,ixyz->cxyz", a, grid) + b[:, None, None, None])[None]
    fix = torch.randn(1, 2, *shape, generator=torch.Generator().manual_seed(0))
    u = torch.tensor([0.3, -0.6, 1.45])
    disp = u[None, :, None, None, None].expand(1, 3, *shape).contiguous().requires_grad_(True)
    upper = torch.tensor(shape, dtype=torch.float32)[:, None, None, None] - 1
    pos = (grid + u[:, None, None, None]).clamp(min=torch.zeros_like(upper), max=upper)
    r = torch.einsum("ci,ixyz->cxyz", a, pos) + b[:, None, None, None] - fix[0]
    value = _mse(fix, mov, disp)
    n = r.numel()
    assert value.item() == pytest.approx(r.pow(2).sum().item() / n, rel=1e-5)
    (grad,) = torch.autograd.grad(value, disp)
    inside = (grid + u[:, None, None, None] > 0) & (grid + u[:, None, None, None] < upper)
    want = 2.0 / n * torch.einsum("ci,cxyz->ixyz", a, r) * inside
    torch.testing.assert_close(grad[0], want, rtol=0, atol=1e-6 * want.abs().max().item())
    assert not inside[2].all() and not inside[1].all()  # some positions were clamped on two axes


@pytest.mark.parametrize("threads", [1, 2])
def test_value_and_gradient_are_the_torch_paths(kernel, threads):
    """Random features and a field that reaches past every border: the kernel's value and field
    gradient equal the torch path's (PyTorch's grid_sample, subtract, square, mean) to float32
    rounding, at any thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(3)
        fix, mov = torch.randn(2, 1, 16, 12, 10, 14, generator=gen)
        disp = (torch.randn(1, 3, 12, 10, 14, generator=gen) * 4.0).requires_grad_(True)
        want = warped_mse_torch(fix, mov, disp)
        (want_grad,) = torch.autograd.grad(want, disp)
        term = WarpedMSE(fix, mov)
        assert term.native
        got = term(disp)
        (got_grad,) = torch.autograd.grad(got, disp)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=1e-5 * want_grad.abs().max().item())
    finally:
        torch.set_num_threads(before)


def test_adam_refinement_is_the_same_with_and_without_the_kernel(kernel, monkeypatch):
    """The whole instance optimisation (Adam's default steps) gives the torch path's field up to the
    rounding of the data term, far below a voxel."""
    gen = torch.Generator().manual_seed(1)
    feat_fix = torch.randn(1, 16, 10, 12, 8, generator=gen)
    feat_mov = feat_fix.roll(1, dims=2) + 0.1 * torch.randn(1, 16, 10, 12, 8, generator=gen)
    disp = torch.randn(1, 3, 20, 24, 16, generator=gen)
    cfg = AdamConfig()
    with_kernel = adam_refine(feat_fix, feat_mov, disp, 2, cfg)
    monkeypatch.setenv(shared.DISABLE_ENV, "0")
    assert not WarpedMSE(feat_fix, feat_mov).native  # the torch path now
    without = adam_refine(feat_fix, feat_mov, disp, 2, cfg)
    assert (with_kernel - without).abs().max() < 1e-3
    assert (with_kernel - disp).abs().max() > 0.01  # and the optimisation did move the field


def test_the_kernel_applies_only_where_it_may(kernel, monkeypatch):
    feat = torch.randn(1, 4, 5, 6, 7)
    assert native.usable(feat, feat)
    assert not native.usable(feat.double(), feat.double())
    assert not native.usable(torch.randn(2, 4, 5, 6, 7), torch.randn(2, 4, 5, 6, 7))
    assert not native.usable(feat, torch.randn(1, 4, 5, 6, 8))
    assert not native.usable(feat, feat.clone().requires_grad_(True))  # it gives the features no gradient
    with pytest.raises(ValueError, match="does not fit"):
        _mse(feat, feat, torch.zeros(1, 3, 5, 6, 6))
    monkeypatch.setenv(shared.DISABLE_ENV, "0")
    assert not native.usable(feat, feat) and "disabled" in native.reason()


def test_a_nan_displacement_is_read_safely(kernel):
    """A NaN position goes to the first voxel (never an index out of range) and passes no gradient."""
    gen = torch.Generator().manual_seed(2)
    fix, mov = torch.randn(2, 1, 3, 4, 5, 6, generator=gen)
    disp = torch.zeros(1, 3, 4, 5, 6)
    disp[0, :, 1, 2, 3] = float("nan")
    moved = disp.clone()
    moved[0, :, 1, 2, 3] = torch.tensor([-1.0, -2.0, -3.0])  # the same voxel sent to the first one
    disp.requires_grad_(True)
    value = _mse(fix, mov, disp)
    assert value.item() == pytest.approx(_mse(fix, mov, moved).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(value, disp)
    assert torch.all(grad[0, :, 1, 2, 3] == 0) and torch.isfinite(grad).all()


def test_the_kernel_loads_inside_no_grad(kernel, monkeypatch):
    """Registration runs under no_grad; the first load (and its check against the torch path's
    gradients) may happen there."""
    monkeypatch.setattr(native.LIBRARY, "_kernel", None)
    monkeypatch.setattr(native.LIBRARY, "_reason", "not loaded yet")
    with torch.no_grad():
        assert native.kernel() is not None and native.reason().startswith(shared.IN_USE)


def test_without_a_compiler_adam_uses_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setattr(native.LIBRARY, "_kernel", None)
    monkeypatch.setattr(native.LIBRARY, "_reason", "not loaded yet")
    monkeypatch.setenv(shared.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(shared, "compiler", lambda: None)
    assert native.kernel() is None and "no C compiler" in native.reason()
    fix, mov = torch.randn(2, 1, 4, 5, 6, 7)
    term = WarpedMSE(fix, mov)
    assert not term.native
    disp = torch.zeros(1, 3, 5, 6, 7)
    assert term(disp).item() == pytest.approx((mov - fix).pow(2).mean().item(), rel=1e-6)  # identity warp


def test_with_a_compiler_the_kernel_loads():
    """Where a C compiler exists the kernel must build and pass its check: the tests above skip
    without it, so a kernel failing its check would otherwise only show as skipped tests."""
    if shared.compiler() is None:
        pytest.skip("no C compiler")
    assert native.kernel() is not None, native.reason()
    assert native.reason().startswith(shared.IN_USE)
