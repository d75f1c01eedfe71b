"""The data term of Adam instance optimisation as a small C kernel (``_trilinear.c``).

Adam instance optimisation (:func:`cyclereg.dense.instance.adam_refine`) minimises, among others,
the mean squared difference between the fixed features and the moving features ``(1, C, D, H, W)``
warped trilinearly with the field it optimises, every iteration with its gradient. On CPU the torch
path (``grid_sample``, then subtract, square and average, and the backward of each whole-volume
step) was about two thirds of a dense registration's time. The kernel computes the value and the
field gradient in one pass each, reading every voxel's eight corners from channels-last copies of
the features made once per optimisation (:class:`cyclereg.dense.instance.WarpedMSE`) and sharing
the voxels among the intra-op threads (docs/benchmarks.md, "Adam's data term in C").

Its sums are those of the formulas in another order than the torch path's, so it agrees with the
torch path to float32 rounding, not bitwise: the check run once per process (:func:`_self_check`)
allows :data:`CHECK_RTOL` of the values' scale. It is built and loaded by
:class:`cyclereg.native.NativeLibrary`; without a compiler, if the check fails, or with
``CYCLEREG_NATIVE=0``, the torch path is used.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from cyclereg.native import NativeLibrary

SOURCE = Path(__file__).with_name("_trilinear.c")
CHECK_RTOL = 1e-5
"""Largest difference from the torch path the self-check allows, relative to the largest magnitude
of the compared values (float32 rounding of sums in another order is about 1e-7 of it)."""


class _Kernel:
    def __init__(self, lib):
        self.forward = lib.cyclereg_warp_mse_forward
        self.backward = lib.cyclereg_warp_mse_backward
        self.forward.restype = ctypes.c_double
        self.forward.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [ctypes.c_int]
        self.backward.restype = ctypes.c_int
        self.backward.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
                                  + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int])


def channels_last(feat: torch.Tensor) -> torch.Tensor:
    """``(1, C, D, H, W)`` -> contiguous ``(D, H, W, C)``, the kernel's layout."""
    return feat[0].permute(1, 2, 3, 0).contiguous()


def _self_check(kernel: _Kernel) -> bool:
    """Value and field gradient of the kernel agree with the torch path
    (:func:`cyclereg.dense.instance.warped_mse_torch`, within :data:`CHECK_RTOL`) on a small random
    problem whose displacements reach past every border."""
    from cyclereg.dense.instance import warped_mse_torch  # imports this module

    gen = torch.Generator().manual_seed(0)
    fix, mov = torch.randn(2, 1, 5, 6, 7, 9, generator=gen)
    disp = (torch.randn(1, 3, 6, 7, 9, generator=gen) * 3.0).requires_grad_(True)
    with torch.enable_grad():  # the first use may come inside a caller's no_grad (registration)
        want = warped_mse_torch(fix, mov, disp)
        (want_grad,) = torch.autograd.grad(want, disp)
        got = _WarpMSE.apply(disp, channels_last(mov), channels_last(fix), kernel)
        (got_grad,) = torch.autograd.grad(got, disp)
    return all(bool((a - b).abs().max() <= CHECK_RTOL * b.abs().max())
               for a, b in ((got.detach(), want.detach()), (got_grad, want_grad)))


LIBRARY = NativeLibrary(SOURCE, "warp_mse", _Kernel, _self_check,
                        "its values differ from the torch path's on this platform")


def kernel() -> _Kernel | None:
    """The loaded kernel, or None (then :func:`reason` says why)."""
    return LIBRARY.kernel()


def reason() -> str:
    """Why :func:`kernel` returns what it does (for diagnostics)."""
    return LIBRARY.reason()


class _WarpMSE(torch.autograd.Function):
    """The kernel's data term as an autograd function of the displacement (the features are constants)."""

    @staticmethod
    def forward(ctx, disp: torch.Tensor, mov_cl: torch.Tensor, fix_cl: torch.Tensor, k: _Kernel) -> torch.Tensor:
        disp = disp.contiguous()
        ctx.save_for_backward(disp, mov_cl, fix_cl)
        ctx.kernel = k
        D, H, W, C = mov_cl.shape
        total = k.forward(mov_cl.data_ptr(), fix_cl.data_ptr(), disp.data_ptr(), D, H, W, C, torch.get_num_threads())
        return torch.tensor(total / mov_cl.numel(), dtype=disp.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        disp, mov_cl, fix_cl = ctx.saved_tensors
        D, H, W, C = mov_cl.shape
        out = torch.empty(1, 3, D, H, W, dtype=disp.dtype)
        ctx.kernel.backward(mov_cl.data_ptr(), fix_cl.data_ptr(), disp.data_ptr(), D, H, W, C,
                            float(grad) / mov_cl.numel(), out.data_ptr(), torch.get_num_threads())
        return out, None, None, None


def usable(feat_fix: torch.Tensor, feat_mov: torch.Tensor) -> bool:
    """Whether the kernel applies to these features: float32 CPU volumes ``(1, C, D, H, W)`` of one
    shape that need no gradient, and a loaded kernel."""
    return (all(f.device.type == "cpu" and f.dtype == torch.float32 and f.ndim == 5 and f.shape[0] == 1
                and not f.requires_grad for f in (feat_fix, feat_mov))
            and feat_fix.shape == feat_mov.shape and kernel() is not None)


def warped_mse(fix_cl: torch.Tensor, mov_cl: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """:func:`cyclereg.dense.instance.warped_mse_torch` from the :func:`channels_last` features ``fix_cl`` and ``mov_cl``
    ``(D, H, W, C)`` (float32, CPU) and ``disp`` ``(1, 3, D, H, W)`` (voxels, float32, CPU): a scalar,
    differentiable with respect to ``disp``. Call only when :func:`usable`."""
    if disp.shape != (1, 3, *mov_cl.shape[:3]) or disp.dtype != mov_cl.dtype or fix_cl.shape != mov_cl.shape:
        raise ValueError(f"warp-MSE kernel: disp {tuple(disp.shape)} {disp.dtype} does not fit features "
                         f"{tuple(mov_cl.shape)} / {tuple(fix_cl.shape)} {mov_cl.dtype}")
    return _WarpMSE.apply(disp, mov_cl, fix_cl, kernel())
