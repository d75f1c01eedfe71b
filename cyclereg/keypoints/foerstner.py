"""Foerstner keypoint detector (structure tensor + non-maximum suppression), in torch.

Everything is computed on the volume's own voxel grid with its own (possibly anisotropic)
spacing: gradients are taken in intensity per millimetre, and the Gaussian scale and the
non-maximum-suppression radius are given in millimetres and converted per array axis.

Distinctiveness (Foerstner & Guelch 1987) of the smoothed gradient structure tensor ``T``
(a symmetric 3x3 matrix per voxel)::

    D = 1 / trace(T^-1) = det(T) / trace(adj(T))

``D`` is large only where the gradient varies in all three directions (corners, vessel
branchings) and vanishes at edges and in flat regions. Keypoints are local maxima of ``D``
inside a mask whose value exceeds a threshold relative to a robust reference of ``D``
(see :class:`FoerstnerConfig`).

Shapes: volumes are ``(D, H, W)`` tensors with axes ``(i, j, k)`` as in
:mod:`cyclereg.frames`; keypoints are returned as voxel indices ``(N, 3)`` in ``(i, j, k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cyclereg.errors import finite_number, whole_number
from cyclereg.frames import half_width_voxels

DEFAULT_SIGMA_MM = 1.5
"""Gaussian scale of the structure tensor. The authors use 1.4 voxels on 1-1.75 mm lung
CT; 1.5 mm resolves the small peripheral vessel branchings (see docs/benchmarks.md for the
sweep on the chest CT that fixed this value together with the NMS radius)."""

DEFAULT_NMS_RADIUS_MM = 4.0
"""Half-width of the non-maximum-suppression box. The authors use a 9-voxel window (radius
4 voxels); 4 mm gives about 1.4k keypoints in the 5.5 l of lungs of the chest CT, the
density of the paper's clouds (about 1k exhale / 2k inhale)."""

DEFAULT_THRESHOLD = 0.01
"""Keep maxima with ``D >= threshold * reference`` (reference: see ``reference_quantile``).
A floor against maxima of pure noise in nearly flat regions; on the chest CT almost all
local maxima in the lungs lie above it (the authors also use a near-zero threshold)."""

DEFAULT_REFERENCE_QUANTILE = 0.999
"""Quantile of ``D`` over the (eroded) mask that the threshold is relative to. A high
quantile instead of the maximum keeps a few extreme voxels (metal, contrast agent) from
moving the threshold."""

DEFAULT_MAX_POINTS = 3000
"""Keep at most this many strongest keypoints (``None``: no limit). The paper's lung
clouds hold about 1k (exhale) and 2k (inhale) points; 3000 bounds the cost of the cloud
registration (k-NN graphs) on unusually large or noisy scans."""

DEFAULT_MASK_EROSION_VOXELS = 1
"""The mask is eroded by this many voxels (box) before picking maxima, so that no
keypoint lies on the mask boundary or on the volume border."""

GAUSSIAN_TRUNCATE = 3.0
"""Gaussian kernels are cut at ``GAUSSIAN_TRUNCATE * sigma`` voxels per side."""

GRADIENT_HALF_WIDTH = 1
"""Central differences reach one voxel to each side."""

INTENSITY_RANGE_QUANTILES = (0.01, 0.99)
"""The image is scaled so that these quantiles of its intensities become 0 and 1 before the
structure tensor (a robust range: a few extreme voxels do not set the scale)."""

MIN_INTENSITY_RANGE = 1e-6
"""Floor of that range, relative to the image's largest magnitude ``max |x|`` (a few float32 ulp of it; at least
the dtype's smallest normal number), so that a (nearly) constant image is not divided by 0, whatever its
intensity unit."""


@dataclass(frozen=True)
class FoerstnerConfig:
    """Parameters of :func:`foerstner_keypoints`.

    Attributes:
        sigma_mm: standard deviation [mm] of the Gaussian that smooths the structure tensor,
            converted to voxels per axis with the volume spacing.
        nms_radius_mm: half-width [mm] of the non-maximum-suppression box; a keypoint is the
            strongest point within ``+-nms_radius_mm / spacing`` voxels per axis, rounded to the
            nearest whole voxel, halves up (:func:`cyclereg.frames.half_width_voxels`).
        threshold: relative distinctiveness threshold (dimensionless, >= 0): maxima need
            ``D >= threshold * quantile(D over the mask, reference_quantile)``.
        reference_quantile: quantile (0, 1] of the distinctiveness inside the eroded mask
            used as the threshold reference (1.0: the maximum).
        max_points: keep at most this many keypoints, strongest first (None: all).
        mask_erosion_voxels: erosion [voxels, box element] of the mask before detection.
    """

    sigma_mm: float = DEFAULT_SIGMA_MM
    nms_radius_mm: float = DEFAULT_NMS_RADIUS_MM
    threshold: float = DEFAULT_THRESHOLD
    reference_quantile: float = DEFAULT_REFERENCE_QUANTILE
    max_points: int | None = DEFAULT_MAX_POINTS
    mask_erosion_voxels: int = DEFAULT_MASK_EROSION_VOXELS

    def __post_init__(self):
        # finite_number: not a bool (True > 0 was taken as 1 mm) nor a text (a TypeError from the comparison)
        if not (finite_number(self.sigma_mm) and self.sigma_mm > 0):
            raise ValueError(f"sigma_mm must be a positive number, got {self.sigma_mm!r}")
        if not (finite_number(self.nms_radius_mm) and self.nms_radius_mm >= 0):
            raise ValueError(f"nms_radius_mm must be >= 0, got {self.nms_radius_mm!r}")
        if not (finite_number(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")
        if not (0 < self.reference_quantile <= 1):
            raise ValueError(f"reference_quantile must be in (0, 1], got {self.reference_quantile}")
        # whole_number: not 2.5 (a TypeError in the slicing), True (one point) nor 1.5 (eroded by 1)
        if self.max_points is not None and not (whole_number(self.max_points) and self.max_points >= 1):
            raise ValueError(f"max_points must be a whole number >= 1, got {self.max_points!r}")
        if not (whole_number(self.mask_erosion_voxels) and self.mask_erosion_voxels >= 0):
            raise ValueError(f"mask_erosion_voxels must be a whole number >= 0, got {self.mask_erosion_voxels!r}")

    def sigma_voxels(self, spacing_mm) -> tuple[float, float, float]:
        """Gaussian scale per array axis [voxels]."""
        return gaussian_scale_voxels(self.sigma_mm, spacing_mm)

    def nms_radius_voxels(self, spacing_mm) -> tuple[int, int, int]:
        """Non-maximum-suppression half-width per array axis [voxels]."""
        return half_width_voxels(self.nms_radius_mm, spacing_mm)  # type: ignore[return-value]

    def support_voxels(self, spacing_mm) -> tuple[int, int, int]:
        """How far [voxels per axis] a keypoint decision looks: gradient + Gaussian + NMS."""
        return tuple(GRADIENT_HALF_WIDTH + _gauss_radius(s) + r
                     for s, r in zip(self.sigma_voxels(spacing_mm), self.nms_radius_voxels(spacing_mm)))  # type: ignore[return-value]



MOVING_NMS_RADIUS_MM = 3.0
"""NMS half-width for the moving scan when a pair is registered through keypoints. A smaller box
than :data:`DEFAULT_NMS_RADIUS_MM` gives the moving scan a denser cloud (the paper's moving clouds have
about twice the fixed points: about 1k exhale / 2k inhale keypoints), so that a fixed point's candidates
include points close to its true match; on the chest CT walk-through (docs/benchmarks.md) 1.3x: 1440
fixed points with 4 mm, 1895 moving points with 3 mm."""


@dataclass(frozen=True)
class PairKeypointConfig:
    """Detector parameters for the two scans of a pair registered through keypoints.

    Attributes:
        fixed: parameters for the fixed scan (defaults of :class:`FoerstnerConfig`).
        moving: parameters for the moving scan (NMS half-width :data:`MOVING_NMS_RADIUS_MM`).
    """

    fixed: FoerstnerConfig = FoerstnerConfig()
    moving: FoerstnerConfig = FoerstnerConfig(nms_radius_mm=MOVING_NMS_RADIUS_MM)

# ----------------------------------------------------------------------------- filters
def gaussian_scale_voxels(sigma_mm: float, spacing_mm) -> tuple[float, float, float]:
    """A Gaussian scale [mm] in voxels along each array axis of a grid with ``spacing_mm``: the one
    conversion the detector's smoothing and its crop margin (:meth:`FoerstnerConfig.sigma_voxels`) share."""
    return tuple(sigma_mm / float(s) for s in spacing_mm)  # type: ignore[return-value]


def _gauss_radius(sigma_vox: float) -> int:
    return max(1, int(math.ceil(GAUSSIAN_TRUNCATE * sigma_vox)))


def _gaussian_kernel(sigma_vox: float, *, dtype, device) -> torch.Tensor:
    r = _gauss_radius(sigma_vox)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _pad_axis(x: torch.Tensor, axis: int, before: int, after: int, **kw) -> torch.Tensor:
    pad = [0, 0, 0, 0, 0, 0]  # (W lo, W hi, H lo, H hi, D lo, D hi) as F.pad wants
    pad[2 * (2 - axis)], pad[2 * (2 - axis) + 1] = before, after
    return F.pad(x, pad, **kw)


def _filter_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """Correlate every channel of ``x`` ``(1, C, D, H, W)`` with an odd 1-D ``kernel`` along
    spatial ``axis`` (0, 1, 2), replicating the border.

    Implemented as a sum of shifted copies: on the CPU this is several times faster than a
    depthwise ``conv3d`` and it runs unchanged on CUDA.
    """
    r = (kernel.numel() - 1) // 2
    dim, length = 2 + axis, x.shape[2 + axis]
    padded = _pad_axis(x, axis, r, r, mode="replicate")
    weights = kernel.tolist()
    out = padded.narrow(dim, 0, length) * weights[0]
    for t in range(1, kernel.numel()):
        if weights[t] != 0.0:
            out.add_(padded.narrow(dim, t, length), alpha=weights[t])
    return out


def _max_filter_axis(x: torch.Tensor, radius: int, axis: int, fill: float) -> torch.Tensor:
    """Running maximum over ``[n - radius, n + radius]`` along spatial ``axis`` of
    ``(1, C, D, H, W)``, values outside the volume = ``fill``. Uses window doubling
    (O(log radius) elementwise maxima)."""
    if radius == 0:
        return x
    dim, length, width = 2 + axis, x.shape[2 + axis], 2 * radius + 1
    run = _pad_axis(x, axis, radius, radius, value=fill)  # run[n] = max over a window of `span` from n
    span = 1
    while 2 * span <= width:
        n = run.shape[dim] - span
        run = torch.maximum(run.narrow(dim, 0, n), run.narrow(dim, span, n))
        span *= 2
    rest = width - span  # 0 <= rest < span: cover the window with two overlapping runs
    return torch.maximum(run.narrow(dim, 0, length), run.narrow(dim, rest, length))


def gaussian_smooth(x: torch.Tensor, sigma_vox) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(1, C, D, H, W)`` with per-axis ``sigma_vox``."""
    for axis, s in enumerate(sigma_vox):
        x = _filter_axis(x, _gaussian_kernel(float(s), dtype=x.dtype, device=x.device), axis)
    return x


def gradient_mm(img: torch.Tensor, spacing_mm) -> torch.Tensor:
    """Central-difference gradient of ``(1, 1, D, H, W)`` -> ``(1, 3, D, H, W)`` [intensity/mm],
    channel ``c`` along array axis ``c``."""
    out = []
    for axis, h in enumerate(spacing_mm):
        k = torch.tensor([-0.5, 0.0, 0.5], dtype=img.dtype, device=img.device) / float(h)
        out.append(_filter_axis(img, k, axis))
    return torch.cat(out, dim=1)


def structure_tensor(grad: torch.Tensor, sigma_vox) -> torch.Tensor:
    """Smoothed structure tensor ``(1, 6, D, H, W)`` (xx, xy, xz, yy, yz, zz) of a gradient
    ``(1, 3, D, H, W)``."""
    gx, gy, gz = grad[:, 0], grad[:, 1], grad[:, 2]
    products = torch.stack([gx * gx, gx * gy, gx * gz, gy * gy, gy * gz, gz * gz], dim=1)
    return gaussian_smooth(products, sigma_vox)


def distinctiveness_from_tensor(T: torch.Tensor) -> torch.Tensor:
    """``D = det(T) / trace(adj(T)) = 1 / trace(T^-1)`` of ``(1, 6, D, H, W)`` -> ``(D, H, W)``.

    ``D`` is 0 where the tensor is (numerically) rank-deficient in two or more directions.
    """
    a, b, c, e, f, i = T[0].unbind(0)
    m_a = e * i - f * f  # cofactors on the diagonal of adj(T)
    m_e = a * i - c * c
    m_i = a * e - b * b
    det = a * m_a + b * (c * f - b * i) + c * (b * f - c * e)
    trace_adj = m_a + m_e + m_i
    tiny = torch.finfo(T.dtype).tiny
    return torch.where(trace_adj > tiny, det / trace_adj.clamp_min(tiny), torch.zeros_like(det)).clamp_min(0)


def distinctiveness(img: torch.Tensor, spacing_mm, sigma_mm: float) -> torch.Tensor:
    """Foerstner distinctiveness ``(D, H, W)`` of an image ``(D, H, W)`` with ``spacing_mm``.

    The image is scaled to unit robust range first (``D`` scales with intensity squared; the full range
    where the robust one is empty, e.g. a small object on a constant background), so ``D`` is in 1/mm^2 of
    normalised intensity. The computation runs in the image's dtype
    when that is float32 or wider (float64 stays float64), otherwise in float32.
    """
    x = img.to(torch.promote_types(img.dtype, torch.float32))
    q = torch.tensor(INTENSITY_RANGE_QUANTILES, dtype=x.dtype, device=x.device)
    lo, hi = torch.quantile(_subsample(x), q).tolist()
    x_min, x_max = (float(v) for v in torch.aminmax(x))
    floor = max(MIN_INTENSITY_RANGE * max(abs(x_min), abs(x_max)), torch.finfo(x.dtype).tiny)
    if hi - lo < floor:  # over 98 % of the voxels one value (an object on a flat background): the
        lo, hi = x_min, x_max  # full range, not the floor (1e6 x the values overflowed det)
    x = (x - lo) / max(hi - lo, floor)
    grad = gradient_mm(x[None, None], spacing_mm)
    sigma_vox = gaussian_scale_voxels(sigma_mm, spacing_mm)
    return distinctiveness_from_tensor(structure_tensor(grad, sigma_vox))


_QUANTILE_SAMPLES = 1_000_000
"""torch.quantile is limited to 16M elements; quantiles are estimated on a regular subsample."""


def _subsample(values: torch.Tensor) -> torch.Tensor:
    flat = values.reshape(-1)
    step = max(1, flat.numel() // _QUANTILE_SAMPLES)
    return flat[::step]


# ----------------------------------------------------------------------------- NMS
def box_max(x: torch.Tensor, radius_vox, fill: float) -> torch.Tensor:
    """Maximum of ``(D, H, W)`` over a box of half-width ``radius_vox`` per axis (separable)."""
    out = x[None, None]
    for axis, r in enumerate(radius_vox):
        out = _max_filter_axis(out, int(r), axis, fill)
    return out[0, 0]


def erode(mask: torch.Tensor, voxels: int) -> torch.Tensor:
    """Erode a boolean ``(D, H, W)`` mask with a ``(2v+1)^3`` box; outside the volume counts
    as background, so the volume border is eroded too."""
    if voxels <= 0:
        return mask
    return box_max((~mask).to(torch.uint8), (voxels,) * 3, fill=1) == 0


def local_maxima(dist: torch.Tensor, radius_vox) -> torch.Tensor:
    """Boolean ``(D, H, W)``: voxels equal to the maximum of their ``(2r+1)`` box (per-axis ``r``)."""
    return dist == box_max(dist, radius_vox, fill=-math.inf)


def greedy_box_nms(points_vox: np.ndarray, scores: np.ndarray, radius_vox) -> np.ndarray:
    """Indices of a greedy NMS (strongest first) with a box of half-width ``radius_vox``.

    Resolves plateaus (several voxels sharing the maximum of a box) left by
    :func:`local_maxima`. Returns indices sorted by decreasing score.
    """
    from scipy.spatial import cKDTree  # noqa: PLC0415

    order = np.argsort(-scores, kind="stable")
    r = np.maximum(np.asarray(radius_vox, dtype=np.float64), 1e-9)
    if points_vox.shape[0] == 0 or np.all(np.asarray(radius_vox) == 0):
        return order
    scaled = points_vox[order] / r  # a box of half-width r becomes the unit inf-norm ball
    tree = cKDTree(scaled)
    neighbours = tree.query_ball_point(scaled, r=1.0, p=np.inf)
    alive = np.ones(len(order), dtype=bool)
    keep = []
    for n in range(len(order)):
        if not alive[n]:
            continue
        keep.append(n)
        alive[neighbours[n]] = False
    return order[np.asarray(keep, dtype=np.int64)]


# ----------------------------------------------------------------------------- detector
@dataclass(frozen=True)
class Keypoints:
    """Detected keypoints.

    Attributes:
        voxels: ``(N, 3)`` int64 voxel indices ``(i, j, k)``, strongest first.
        scores: ``(N,)`` float32 distinctiveness ``D`` at the keypoints.
        reference: the distinctiveness reference the threshold was relative to.
        candidates: number of local maxima above the threshold before ``max_points``.
    """

    voxels: torch.Tensor
    scores: torch.Tensor
    reference: float
    candidates: int


def _bbox(mask: torch.Tensor, margin) -> tuple[slice, slice, slice]:
    idx = torch.nonzero(mask)
    lo = idx.min(0).values.tolist()
    hi = idx.max(0).values.tolist()
    return tuple(slice(max(0, l - m), min(n, h + m + 1)) for l, h, m, n in zip(lo, hi, margin, mask.shape))  # type: ignore[return-value]


def foerstner_keypoints(img: torch.Tensor, spacing_mm, mask: torch.Tensor | None = None,
                        config: FoerstnerConfig = FoerstnerConfig()) -> Keypoints:
    """Foerstner keypoints of ``img`` ``(D, H, W)`` inside ``mask`` ``(D, H, W)`` (bool).

    Args:
        img: image on any device (computations follow it), axes (i, j, k).
        spacing_mm: voxel size per array axis [mm].
        mask: where keypoints may lie (None: everywhere); eroded by
            ``config.mask_erosion_voxels``.
        config: detector parameters.
    Returns:
        :class:`Keypoints` with voxel indices on the CPU.
    Raises:
        ValueError: ``img`` is not 3-D or not finite real intensities, ``spacing_mm`` is not 3 sizes > 0,
            shapes differ, or the eroded mask is empty.
    """
    if img.ndim != 3:
        raise ValueError(f"img: expected a (D, H, W) volume, got shape {tuple(img.shape)}")
    if img.is_complex() or img.dtype == torch.bool:
        raise ValueError(f"img: expected real intensities, got {img.dtype}")
    if not torch.isfinite(img).all():
        raise ValueError("img: holds NaN or inf intensities")
    img = img.detach()  # a detector, not a differentiable op: an image with a graph gives the same keypoints
    try:
        spacing = [float(v) for v in spacing_mm]
    except (TypeError, ValueError):
        spacing = []
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"spacing_mm: expected 3 finite voxel sizes > 0 mm (one per array axis), got {spacing_mm!r}")
    given = mask is not None
    if mask is None:
        mask = torch.ones(img.shape, dtype=torch.bool, device=img.device)
    if tuple(mask.shape) != tuple(img.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from image shape {tuple(img.shape)}")
    mask = erode(mask.to(img.device, torch.bool), config.mask_erosion_voxels)
    if not bool(mask.any()):
        if not given:  # the erosion keeps keypoints off the border: nothing is left of a tiny volume
            raise ValueError(f"volume of shape {tuple(img.shape)} is too small: no voxel lies "
                             f"{config.mask_erosion_voxels + 1} or more voxels inside its border")
        raise ValueError("the mask is empty (after erosion)")

    for axis, (sigma_vox, n) in enumerate(zip(config.sigma_voxels(spacing_mm), img.shape)):
        if _gauss_radius(sigma_vox) >= n:  # refused before a kernel of that size is made (1e9 mm: 24 GB)
            raise ValueError(f"the Gaussian scale (--sigma {config.sigma_mm:g} mm) is too large for this volume: "
                             f"{GAUSSIAN_TRUNCATE:g} sigma is {_gauss_radius(sigma_vox)} voxels along axis {axis}, "
                             f"which has {n}")
    # Work on the bounding box of the mask plus everything a decision inside it looks at.
    box = _bbox(mask, config.support_voxels(spacing_mm))
    offset = torch.tensor([s.start for s in box], dtype=torch.int64)
    sub_mask = mask[box]
    dist = distinctiveness(img[box], spacing_mm, config.sigma_mm)

    # a box wider than the volume suppresses as much as one as wide: the same keypoints, without the
    # memory of a pooling window of the given size (--nms-radius 1e9 asked for terabytes)
    radius = tuple(min(r, n - 1) for r, n in zip(config.nms_radius_voxels(spacing_mm), dist.shape))
    inside = dist[sub_mask]
    reference = float(torch.quantile(_subsample(inside), config.reference_quantile)) if inside.numel() else 0.0
    cand = local_maxima(dist, radius) & sub_mask & (dist > 0) & (dist >= config.threshold * reference)
    vox = torch.nonzero(cand).cpu()
    scores = dist[cand].float().cpu()
    keep = torch.from_numpy(greedy_box_nms(vox.numpy().astype(np.float64), scores.numpy(), radius))
    n_candidates = int(keep.numel())
    if config.max_points is not None:
        keep = keep[: config.max_points]
    return Keypoints(voxels=vox[keep] + offset, scores=scores[keep], reference=reference, candidates=n_candidates)
