"""Image similarity terms for the metric-supervised baselines ("MIND sup.", "NCC sup.").

Both work on preprocessed images ``(B, 1, D, H, W)`` on one grid and return a scalar
*loss* (lower = more similar), differentiable with respect to both images.

* :func:`mind_ssc` - MIND self-similarity context descriptors (Heinrich et al., MICCAI
  2013): 12 channels, one per pair of six-neighbourhood offsets at distance
  ``sqrt(2) * dilation`` from each other; :func:`mind_loss` is the mean squared
  difference of the descriptors.
* :func:`ncc_loss` - one minus the local normalised cross-correlation in cubic windows
  (as VoxelMorph's NCC loss, written here independently).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from cyclereg.errors import InputError, finite_number, python_number, require_count
from cyclereg.frames import LOW_PRECISION, require_tensor


def _check(name: str, x: torch.Tensor) -> None:
    require_tensor(name, x)
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"{name}: expected (B, 1, D, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():  # local means of integers would be floored by average pooling
        raise ValueError(f"{name}: expected a floating-point (preprocessed) image, got {x.dtype}")


def _check_pair(fixed: torch.Tensor, warped: torch.Tensor) -> None:
    """:class:`ValueError` naming the argument unless both are ``(B, 1, D, H, W)`` of one shape (a batch of 1
    against one of 2 would broadcast into a loss of neither) holding voxels (the mean of an empty batch is NaN)."""
    _check("fixed", fixed)
    _check("warped", warped)
    if warped.shape != fixed.shape:
        raise ValueError(f"warped: shape {tuple(warped.shape)} differs from fixed's {tuple(fixed.shape)}")
    if fixed.numel() == 0:
        raise ValueError(f"fixed, warped: empty images {tuple(fixed.shape)}; a loss needs at least one voxel")


def _whole(name: str, value, minimum: int) -> int:
    """``value`` as a Python int, :class:`InputError` naming ``name`` unless a whole number >= ``minimum``
    (:func:`~cyclereg.errors.require_count`, whose ``None`` means "not given": here there is nothing to fall back
    on, and ``None`` reached the arithmetic as a bare :class:`TypeError`)."""
    if value is None:
        raise InputError(f"{name} None: need a whole number, {minimum} or more")
    return require_count(name, python_number(value), minimum)


def _positive_eps(eps) -> float:
    """``eps`` as a Python number, :class:`ValueError` naming ``eps`` unless finite and > 0."""
    eps = python_number(eps)
    if not (finite_number(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite constant > 0, got {eps!r}")
    return eps


def _working(fixed: torch.Tensor, warped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both images in float32 where either is of :data:`LOW_PRECISION`, else as given."""
    if fixed.dtype in LOW_PRECISION or warped.dtype in LOW_PRECISION:
        return fixed.float(), warped.float()
    return fixed, warped


def box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2r+1)^3`` cube around every voxel (replicate padding)."""
    if radius <= 0:
        return x
    k = 2 * radius + 1
    return F.avg_pool3d(F.pad(x, [radius] * 6, mode="replicate"), k, stride=1)


def _shift(x: torch.Tensor, offset: tuple[int, int, int]) -> torch.Tensor:
    """``y[..., p] = x[..., p + offset]`` with replicate padding."""
    r = max(abs(o) for o in offset)
    if r == 0:
        return x
    pad = F.pad(x, [r] * 6, mode="replicate")
    D, H, W = x.shape[2:]
    a, b, c = (r + o for o in offset)
    return pad[:, :, a:a + D, b:b + H, c:c + W]


def _ssc_pairs(dilation: int) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    six = []
    for axis in range(3):
        for sign in (-1, 1):
            o = [0, 0, 0]
            o[axis] = sign * dilation
            six.append(tuple(o))
    pairs = []
    for p, q in itertools.combinations(six, 2):
        d2 = sum((a - b) ** 2 for a, b in zip(p, q))
        if d2 == 2 * dilation ** 2:  # neighbours on different axes: 12 pairs
            pairs.append((p, q))
    return pairs


VARIANCE_RANGE = 1e3
"""MIND's local variance estimate is clamped to ``[m / VARIANCE_RANGE, m * VARIANCE_RANGE]`` around its
volume mean ``m``, so that flat or very noisy regions do not give degenerate descriptors."""


def mind_ssc(image: torch.Tensor, *, radius: int = 1, dilation: int = 2, eps: float = 1e-6) -> torch.Tensor:
    """MIND-SSC descriptors ``(B, 12, D, H, W)`` of ``image`` ``(B, 1, D, H, W)``.

    Args:
        radius: half-width of the patch over which squared differences are averaged, whole voxels >= 0.
        dilation: distance of the six-neighbourhood offsets from the centre, whole voxels >= 1 (a dilation of 0
            compares every voxel with itself).
        eps: floor of the volume's mean variance, an absolute floor in intensity^2 units (not relative to the
            image: for an image scaled by ``s``, ``eps * s^2`` gives the same descriptors to rounding), and of each
            voxel's largest descriptor entry (a guard against 0: that entry is at least ``exp(-1)`` where the local
            variance is below ``VARIANCE_RANGE`` times the mean); finite and > 0.

    A half-precision image (:data:`~cyclereg.frames.LOW_PRECISION`) is computed in float32 and answered in its dtype.
    """
    _check("image", image)
    radius = _whole("radius", radius, 0)
    dilation = _whole("dilation", dilation, 1)
    eps = _positive_eps(eps)
    if image.dtype in LOW_PRECISION:
        return mind_ssc(image.float(), radius=radius, dilation=dilation, eps=eps).to(image.dtype)
    dist = torch.cat([box_mean((_shift(image, p) - _shift(image, q)).pow(2), radius)
                      for p, q in _ssc_pairs(dilation)], dim=1)
    var = dist.mean(dim=1, keepdim=True)
    mean_var = var.mean(dim=(2, 3, 4), keepdim=True).clamp_min(eps)
    var = var.clamp(mean_var / VARIANCE_RANGE, mean_var * VARIANCE_RANGE)
    desc = torch.exp(-dist / var)
    return desc / desc.amax(dim=1, keepdim=True).clamp_min(eps)


def mind_loss(fixed: torch.Tensor, warped: torch.Tensor, *, radius: int = 1, dilation: int = 2,
              eps: float = 1e-6) -> torch.Tensor:
    """Mean squared difference of MIND-SSC descriptors (0 for identical images; ``radius`` >= 0 and
    ``dilation`` >= 1 whole voxels: a dilation of 0 compares every voxel with itself).

    ``eps`` (finite, > 0) is :func:`mind_ssc`'s: an absolute floor of each image's mean patch variance in
    intensity^2 units, below the variances of preprocessed images; for images scaled by ``s`` (e.g. maps in SI
    units, values about 1e-5) scale it by ``s^2``, else the floor flattens the descriptors and the loss.
    """
    _check_pair(fixed, warped)
    radius = _whole("radius", radius, 0)
    dilation = _whole("dilation", dilation, 1)
    eps = _positive_eps(eps)
    f, w = _working(fixed, warped)
    loss = (mind_ssc(f, radius=radius, dilation=dilation, eps=eps)
            - mind_ssc(w, radius=radius, dilation=dilation, eps=eps)).pow(2).mean()
    return loss.to(fixed.dtype)


def ncc_loss(fixed: torch.Tensor, warped: torch.Tensor, *, radius: int = 4, eps: float = 1e-5) -> torch.Tensor:
    """``1 - mean(local NCC)`` over ``(2r+1)^3`` windows (replicate padding), the local NCC of a window being
    ``cov / sqrt(var_f var_w + eps)`` of the two images' local covariance and variances.

    ``eps`` is added to the *product* of the two local variances (intensity^4 units: scaling both images by
    ``s`` and ``eps`` by ``s^4`` leaves the loss unchanged), so it is negligible only where the local variances
    are large against ``sqrt(eps)`` (3.2e-3 for the default). Two identical images give ``1 - v / sqrt(v^2 + eps)``
    at a window of local variance ``v``: between 0 and 1 (up to rounding), 1 where the image is flat, about
    ``eps / (2 v^2)`` where ``v^2 >> eps``, and at most 1e-3 only where ``v >= 22.34 sqrt(eps)`` (0.0707 for the
    default: a local standard deviation of 0.27; a smooth image scaled to [0, 1] has far less, e.g. a ramp from 0
    to 1 across 32 voxels has ``v = 0.0069`` in its windows of radius 4, which score 0.09 each). In the same limit
    images that are locally affine functions of each other approach 0 (positive slope) or 2 (negative slope).
    Adding a constant to either image leaves the loss unchanged (each image's mean is taken out first, so an
    offset such as raw MRI values does not cancel the float32 local variances away).
    ``radius`` >= 1 whole voxels (a window of one voxel has no variance), ``eps`` finite and > 0.
    """
    _check_pair(fixed, warped)
    radius = _whole("radius", radius, 1)
    eps = _positive_eps(eps)
    out_dtype = fixed.dtype
    fixed, warped = _working(fixed, warped)
    # NCC (and eps, added to the product of the variances) does not change when a constant is added to an image:
    # each image's own mean, taken out first, keeps an offset (raw MRI values) from cancelling the local variances
    # E[x^2] - E[x]^2 away in float32
    fixed = fixed - fixed.mean(dim=(2, 3, 4), keepdim=True)
    warped = warped - warped.mean(dim=(2, 3, 4), keepdim=True)
    mf, mw = box_mean(fixed, radius), box_mean(warped, radius)
    cov = box_mean(fixed * warped, radius) - mf * mw
    vf = (box_mean(fixed * fixed, radius) - mf * mf).clamp_min(0)
    vw = (box_mean(warped * warped, radius) - mw * mw).clamp_min(0)
    ncc = cov / torch.sqrt(vf * vw + eps)
    return (1.0 - ncc.mean()).to(out_dtype)
