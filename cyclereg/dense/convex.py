"""Optimiser ``h``: correlation layer, coupled convex optimisation, inverse consistency,
and the field resampling helpers shared by the dense path.

All fields are ``(B, 3, d, h, w)`` displacements in voxels of their own grid, fixed ->
moving, channel c along array axis c (package convention). Everything here is
differentiable (except where stated) and follows the device/dtype of its inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cyclereg.dense.config import ConvexConfig
from cyclereg.errors import finite_number, python_number, require_count, whole_number
from cyclereg.frames import (LOW_PRECISION, check_displacement, check_shape, floating_dtype, voxel_coordinates,
                             voxel_to_grid)
from cyclereg.warp import sample_grid, warp_unchecked


# ----------------------------------------------------------------------------- small helpers
def _box_sum(x: torch.Tensor, axis: int, kernel: int) -> torch.Tensor:
    """Sum of ``kernel`` consecutive entries along ``axis`` (valid part: the axis shrinks by ``kernel - 1``)."""
    n = x.shape[axis] - (kernel - 1)
    total = x.narrow(axis, 0, n)
    for shift in range(1, kernel):
        total = total + x.narrow(axis, shift, n)
    return total


class _BoxFilter(torch.autograd.Function):
    """One replicate-padded cubic box filter of odd width ``kernel``: the cube mean factorises into
    one running sum per axis (replicate padding clamps each index on its own). The backward pass is
    the filter's adjoint, computed the same way (a zero-padded box sum whose border entries fold back
    onto the edge voxels they were replicated from), not autograd through the shifted views."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: int) -> torch.Tensor:
        ctx.kernel = kernel
        x = F.pad(x, (kernel // 2,) * 6, mode="replicate")
        for axis in (2, 3, 4):
            x = _box_sum(x, axis, kernel)
        return x / kernel ** 3

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kernel = ctx.kernel
        p = kernel // 2
        g = F.pad(grad, (2 * p,) * 6)
        for axis in (2, 3, 4):
            g = _box_sum(g, axis, kernel)  # gradient of the padded input: each axis n + 2p long
        for axis in (2, 3, 4):
            m = g.shape[axis]
            below = g.narrow(axis, 0, p).sum(axis, keepdim=True)
            above = g.narrow(axis, m - p, p).sum(axis, keepdim=True)
            g = g.narrow(axis, p, m - 2 * p).clone()
            g.narrow(axis, 0, 1).add_(below)
            g.narrow(axis, m - 2 * p - 1, 1).add_(above)
        return g / kernel ** 3, None


def box_smooth(x: torch.Tensor, kernel: int = 3, passes: int = 1) -> torch.Tensor:
    """``passes`` cubic box filters of odd width ``kernel`` with replicate padding (no shrinking
    towards zero at the border, unlike zero-padded average pooling) on ``(B, C, D, H, W)``.

    The same values as replicate padding + ``avg_pool3d`` of width ``kernel`` up to float rounding
    (and the same gradient), computed as one running sum per axis (:class:`_BoxFilter`): on CPU the
    filter alone is 2.5-4x faster than ``avg_pool3d`` on 3-channel fields (forward and backward) and
    about as fast on the training's 343-channel cost volumes; a default registration at 96 x 80 x 128
    is 1.4-1.5x faster (docs/benchmarks.md, "Box filters as running sums")."""
    if x.ndim != 5:
        raise ValueError(f"x: expected (B, C, D, H, W), got {tuple(x.shape)}")
    kernel = require_count("kernel", python_number(kernel), 1)
    passes = require_count("passes", python_number(passes), 0)
    if kernel % 2 == 0:
        raise ValueError(f"box_smooth: kernel must be odd (an even box filter shifts by half a voxel), got {kernel}")
    if kernel <= 1:
        return x
    for _ in range(passes):
        x = _BoxFilter.apply(x, kernel)
    return x


def standardize(feat: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit standard deviation per channel and volume over the spatial axes (half-precision
    features, :data:`~cyclereg.frames.LOW_PRECISION`, computed in float32 and answered in their dtype)."""
    if feat.dtype in LOW_PRECISION:  # the mean rounded to half precision before it is subtracted: 55 ulps
        return standardize(feat.float(), eps).to(feat.dtype)
    mean = feat.mean(dim=(2, 3, 4), keepdim=True)
    std = feat.std(dim=(2, 3, 4), keepdim=True)
    return (feat - mean) / (std + eps)


def displacement_set(radius: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The ``(2r+1)^3`` candidate displacements ``(K, 3)`` in (i, j, k) order, i slowest (``radius``: whole
    voxels, 0 or more)."""
    radius = require_count("radius", python_number(radius), 0)
    r = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


# ----------------------------------------------------------------------------- correlation
def correlate(feat_fix: torch.Tensor, feat_mov: torch.Tensor, cfg: ConvexConfig) -> torch.Tensor:
    """Dissimilarity cost of every candidate displacement.

    Returns ``(B, K, d, h, w)`` with ``K = (2r+1)^3`` ordered like :func:`displacement_set`:
    ``cost[:, n, x] = patch-mean over x' of reduce_c |f(x') - m(x' + o_n)|``. The moving
    features are extended by replication outside the volume.
    """
    if feat_fix.ndim != 5:
        raise ValueError(f"feat_fix: expected (B, C, D, H, W), got {tuple(feat_fix.shape)}")
    if feat_fix.shape != feat_mov.shape:
        raise ValueError(f"feat_fix, feat_mov: shapes differ: {tuple(feat_fix.shape)} vs {tuple(feat_mov.shape)}")
    r = cfg.radius
    f = feat_fix * cfg.feature_scale
    m = F.pad(feat_mov * cfg.feature_scale, (r,) * 6, mode="replicate")
    D, H, W = f.shape[2:]
    costs = []
    for o in displacement_set(r).long().tolist():
        shifted = m[:, :, r + o[0]: r + o[0] + D, r + o[1]: r + o[1] + H, r + o[2]: r + o[2] + W]
        diff = (f - shifted).abs()
        costs.append(diff.mean(1) if cfg.cost_reduction == "mean" else diff.sum(1))
    cost = torch.stack(costs, dim=1)
    return box_smooth(cost, cfg.patch_size)


# ----------------------------------------------------------------------------- coupled convex
def _soft_argmin(cost: torch.Tensor, disps: torch.Tensor, delta: float) -> torch.Tensor:
    """Expected displacement under ``softmax(-delta * cost)`` -> ``(B, 3, d, h, w)``."""
    prob = torch.softmax(-delta * cost, dim=1)
    return torch.einsum("bkdhw,kc->bcdhw", prob, disps)


def coupled_convex(cost: torch.Tensor, cfg: ConvexConfig) -> torch.Tensor:
    """Coupled convex optimisation on a cost volume ``(B, K, d, h, w)``.

    Alternates a point-wise soft argmin of ``cost + alpha_j * |o - v(x)|^2`` (data term
    coupled to the current smooth field ``v``) with box smoothing of the result, for the
    increasing coupling schedule ``cfg.coupling``. Returns ``(B, 3, d, h, w)`` in voxels of
    the cost volume's grid. A half-precision cost volume (:data:`~cyclereg.frames.LOW_PRECISION`) is
    computed in float32 and answered in its dtype.
    """
    if cost.ndim != 5 or cost.shape[1] != (2 * cfg.radius + 1) ** 3:
        raise ValueError(f"cost: expected (B, {(2 * cfg.radius + 1) ** 3}, d, h, w) for radius {cfg.radius}, "
                         f"got {tuple(cost.shape)}")
    if cost.dtype in LOW_PRECISION:  # -delta * cost is about -50, where a bfloat16 ulp is 0.25
        return coupled_convex(cost.float(), cfg).to(cost.dtype)
    disps = displacement_set(cfg.radius, device=cost.device, dtype=cost.dtype)
    v = _soft_argmin(cost, disps, cfg.softmax_temperature)
    for alpha in cfg.coupling:
        # |o - v|^2 for every candidate o: (B, K, d, h, w)
        dist = (disps.view(1, -1, 3, 1, 1, 1) - v.unsqueeze(1)).pow(2).sum(2)
        v = _soft_argmin(cost + alpha * dist, disps, cfg.softmax_temperature)
        v = box_smooth(v, cfg.smooth_kernel)
    return v


def inverse_consistency(forward: torch.Tensor, backward: torch.Tensor, iterations: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Make forward (fixed->moving) and backward (moving->fixed) fields mutually inverse.

    Fixed-point iteration ``a <- (a - b o (id + a)) / 2``, ``b <- (b - a o (id + b)) / 2``
    (both updates from the previous iterate), which drives ``a + b(x + a(x))`` to zero.
    Both fields are in voxels of the same grid. ``iterations``: a whole number >= 0 (0: both fields
    are returned as given); :class:`ValueError` naming it otherwise.
    """
    iterations = require_count("iterations", python_number(iterations), 0)
    a, b = forward, backward
    for _ in range(iterations):
        a, b = a.to(floating_dtype(a)), b.to(floating_dtype(b))  # integer fields are sampled as numbers
        a_new = 0.5 * (a - warp_unchecked(b, a))
        b_new = 0.5 * (b - warp_unchecked(a, b))
        a, b = a_new, b_new
    return a, b


def composition_error(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """Mean norm of ``a(x) + b(x + a(x))`` (zero for exact inverses), voxels."""
    backward = backward.to(floating_dtype(backward))  # an integer field is sampled as numbers, and its norm taken
    return (forward + warp_unchecked(backward, forward)).norm(dim=1).mean()


# ----------------------------------------------------------------------------- resampling
def resample_disp(disp: torch.Tensor, out_shape: tuple[int, int, int], ratio: float) -> torch.Tensor:
    """Resample a field between grids related by a stride.

    Output voxel ``x`` lies at source voxel ``x * ratio`` (``ratio`` = output voxel size /
    source voxel size: 2 for 2x downsampling, 0.5 for 2x upsampling), which is the exact
    centre relation of stride-2, kernel-3, padding-1 convolutions. Displacements are
    rescaled by ``1 / ratio``; positions outside the source are clamped (border). A half-precision field
    (:data:`~cyclereg.frames.LOW_PRECISION`) is resampled in float32 and answered in its dtype.
    """
    check_displacement("disp", disp)
    ratio = python_number(ratio)
    if not (finite_number(ratio) and ratio > 0):
        raise ValueError(f"ratio: expected a voxel size ratio > 0, got {ratio!r}")
    if disp.dtype in LOW_PRECISION:  # at float32 positions: bfloat16 grid coordinates are up to a quarter voxel off
        return resample_disp(disp.float(), out_shape, ratio).to(disp.dtype)
    disp = disp.to(floating_dtype(disp))  # an integer field is resampled as numbers
    src_shape = tuple(disp.shape[2:])
    pts = voxel_coordinates(check_shape("out_shape", out_shape), device=disp.device, dtype=disp.dtype) * ratio
    grid = voxel_to_grid(pts, src_shape).unsqueeze(0).expand(disp.shape[0], -1, -1, -1, -1)
    return sample_grid(disp, grid, "bilinear", "border") / ratio


def upsample_field(disp: torch.Tensor, factor: int, out_shape: tuple[int, int, int], cfg: ConvexConfig) -> torch.Tensor:
    """Upsample a coarse field by ``factor`` (a power of 2) in 2x steps, smoothing after
    each intermediate step (``cfg.upsample_smooth_passes`` box filters), to ``out_shape``
    (:class:`ValueError` naming ``factor`` when it is no power of 2: the 2x steps could not reach it)."""
    factor = python_number(factor)
    if not whole_number(factor) or factor < 1 or factor & (factor - 1):
        raise ValueError(f"factor: expected a power of 2 (1, 2, 4, ...), got {factor!r}")
    if factor == 1 and tuple(disp.shape[2:]) != tuple(out_shape):  # no 2x step would reach out_shape
        raise ValueError(f"out_shape {tuple(out_shape)}: factor 1 keeps disp's grid {tuple(disp.shape[2:])}")
    cur = disp
    f = 1
    while f < factor:
        f *= 2
        shape = tuple(max(1, -(-s * f // factor)) for s in out_shape) if f < factor else tuple(out_shape)
        cur = resample_disp(cur, shape, 0.5)
        if f < factor:
            cur = box_smooth(cur, cfg.upsample_smooth_kernel, cfg.upsample_smooth_passes)
    return cur
