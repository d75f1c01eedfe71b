"""Automatic lung mask from a CT in Hounsfield units (scipy.ndimage, CPU).

Steps (parameters in :class:`LungMaskConfig`):

1. body: voxels above ``body_threshold_hu``, largest 3-D connected component, holes filled
   slice by slice along the axial axis (the lungs are enclosed by the body in every axial
   slice, so they become part of the filled body);
2. air inside the body: voxels below ``air_threshold_hu`` within the filled body, opened
   with a small element to cut thin bridges;
3. lungs: the largest 3-D connected components of that air (at most ``max_components``,
   each at least ``min_component_fraction`` of the largest and ``min_component_ml``);
4. holes (vessels, airway walls, nodules) filled slice by slice along every axis and the
   mask closed with a box of ``closing_mm``, so that vessel branchings -- where the
   keypoints are -- belong to the mask.

Shapes: ``(D, H, W)`` arrays with axes (i, j, k); the axial axis is found from the affine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from cyclereg.errors import whole_number
from cyclereg.frames import SINGULAR_AFFINE

DEFAULT_AIR_THRESHOLD_HU = -400.0
"""Lung parenchyma is about -900 to -500 HU; soft tissue is above -100 HU."""

DEFAULT_BODY_THRESHOLD_HU = -500.0
"""Body (skin, fat, muscle, bone) is above about -150 HU; outside air is -1000 HU."""


@dataclass(frozen=True)
class LungMaskConfig:
    """Parameters of :func:`lung_mask`.

    Attributes:
        air_threshold_hu: voxels below this [HU] inside the body are lung/airway candidates.
        body_threshold_hu: voxels above this [HU] belong to the body.
        max_components: keep at most this many connected air components (the two lungs;
            they may also be joined through the airways into one).
        min_component_fraction: drop components smaller than this fraction of the largest
            (dimensionless; removes bowel gas and small air pockets).
        min_component_ml: drop components smaller than this volume [ml = 1000 mm^3].
        opening_mm: half-width [mm] of the box that opens the air mask before labelling
            (breaks thin air bridges to the outside or to the bowel); 0 disables.
        closing_mm: half-width [mm] of the box that closes the lung mask at the end
            (includes vessels at the lung boundary); 0 disables.
    """

    air_threshold_hu: float = DEFAULT_AIR_THRESHOLD_HU
    body_threshold_hu: float = DEFAULT_BODY_THRESHOLD_HU
    max_components: int = 2
    min_component_fraction: float = 0.1
    min_component_ml: float = 50.0
    opening_mm: float = 1.0
    closing_mm: float = 2.0

    def __post_init__(self):
        if not whole_number(self.max_components) or self.max_components < 1:
            raise ValueError(f"max_components must be a whole number >= 1, got {self.max_components!r}")
        if not 0 <= self.min_component_fraction <= 1:
            raise ValueError(f"min_component_fraction must be in [0, 1], got {self.min_component_fraction}")
        for name in ("min_component_ml", "opening_mm", "closing_mm"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be >= 0, got {v}")


def axial_axis(affine: np.ndarray) -> int:
    """The array axis whose direction is closest to the world z (cranio-caudal) axis."""
    directions = np.abs(np.asarray(affine, dtype=np.float64)[:3, :3])
    directions = directions / np.maximum(directions.sum(0, keepdims=True), 1e-12)
    return int(np.argmax(directions[2]))


def _radii(radius_mm: float, spacing_mm) -> list[int]:
    """Half-widths [voxels per axis] of a box of half-width ``radius_mm``."""
    return [int(round(radius_mm / float(s))) for s in spacing_mm]


def _dilate(mask: np.ndarray, radii) -> np.ndarray:
    """Binary dilation with a box (separable running maxima); outside counts as background."""
    out = mask.view(np.uint8)
    for axis, r in enumerate(radii):
        if r > 0:
            out = ndi.maximum_filter1d(out, 2 * r + 1, axis=axis, mode="constant", cval=0)
    return out.astype(bool)


def _erode(mask: np.ndarray, radii) -> np.ndarray:
    """Binary erosion with a box (separable running minima); outside counts as foreground,
    so the volume border does not erode."""
    out = mask.view(np.uint8)
    for axis, r in enumerate(radii):
        if r > 0:
            out = ndi.minimum_filter1d(out, 2 * r + 1, axis=axis, mode="constant", cval=1)
    return out.astype(bool)


def fill_holes_slicewise(mask: np.ndarray, axis: int) -> np.ndarray:
    """2-D hole filling of every slice of ``mask`` orthogonal to ``axis``."""
    out = np.empty_like(mask)
    for n in range(mask.shape[axis]):
        index = [slice(None)] * 3
        index[axis] = n
        out[tuple(index)] = ndi.binary_fill_holes(mask[tuple(index)])
    return out


def _largest_components(mask: np.ndarray, keep: int, min_fraction: float, min_voxels: float) -> np.ndarray:
    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(-sizes)[:keep]
    chosen = [c + 1 for c in order if sizes[c] >= max(min_fraction * sizes[order[0]], min_voxels)]
    return np.isin(labels, chosen)


BODY_STRIDE = 2
"""The body mask is only a container for the lungs: it is computed on every second voxel
along the two in-plane axes and upsampled by repetition (four times fewer voxels)."""


def _check_scan(ct_hu, affine) -> tuple[np.ndarray, np.ndarray]:
    """``ct_hu`` and ``affine`` as arrays; :class:`ValueError` naming the argument unless the CT is a
    ``(D, H, W)`` volume and the affine a finite, invertible 4x4 voxel -> mm matrix."""
    ct = np.asarray(ct_hu)
    if ct.ndim != 3:
        raise ValueError(f"ct_hu: expected a (D, H, W) volume, got shape {ct.shape}")
    A = np.asarray(affine, dtype=np.float64)
    if A.shape != (4, 4) or not np.isfinite(A).all():
        raise ValueError(f"affine: expected a finite 4x4 voxel -> mm matrix, got shape {A.shape}"
                         + ("" if A.shape != (4, 4) else " holding NaN or inf"))
    if np.linalg.matrix_rank(A[:3, :3]) < 3:
        raise ValueError(SINGULAR_AFFINE)
    return ct, A


def body_mask(ct_hu: np.ndarray, affine: np.ndarray, config: LungMaskConfig = LungMaskConfig()) -> np.ndarray:
    """Filled body mask ``(D, H, W)`` bool of a CT in HU (see the module doc)."""
    ct_hu, affine = _check_scan(ct_hu, affine)
    axial = axial_axis(affine)
    step = [1 if a == axial else BODY_STRIDE for a in range(3)]
    coarse = np.asarray(ct_hu)[tuple(slice(None, None, s) for s in step)] > config.body_threshold_hu
    coarse = fill_holes_slicewise(_largest_components(coarse, 1, 0.0, 0), axial)
    body = coarse
    for axis, s in enumerate(step):
        body = np.repeat(body, s, axis=axis)
    return body[tuple(slice(0, n) for n in ct_hu.shape)]


def lung_mask(ct_hu: np.ndarray, affine: np.ndarray, config: LungMaskConfig = LungMaskConfig()) -> np.ndarray:
    """Lung mask ``(D, H, W)`` bool of a CT ``(D, H, W)`` in HU with its NIfTI ``affine``.

    Returns an all-false mask when no lung-like air is found (the caller decides how to
    report it). :class:`ValueError` naming ``ct_hu`` / ``affine`` for a CT that is no volume or an
    affine that is not finite and invertible.
    """
    ct_hu, affine = _check_scan(ct_hu, affine)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    out = np.zeros(ct_hu.shape, dtype=bool)
    body = body_mask(ct_hu, affine, config)
    if not body.any():
        return out
    box = ndi.find_objects(body.view(np.uint8))[0]  # the lungs are inside the body's box
    air = (ct_hu[box] < config.air_threshold_hu) & body[box]
    opening = _radii(config.opening_mm, spacing)
    air = _dilate(_erode(air, opening), opening)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0  # a sheared grid's voxel too (not the columns')
    lungs = _largest_components(air, config.max_components, config.min_component_fraction,
                                config.min_component_ml / voxel_ml)
    if not lungs.any():
        return out
    # Closing and hole filling on the lungs' own box, with room for the closing.
    closing = _radii(config.closing_mm, spacing)
    inner = ndi.find_objects(lungs.view(np.uint8))[0]
    inner = tuple(slice(max(0, s.start - r), min(n, s.stop + r)) for s, r, n in zip(inner, closing, lungs.shape))
    sub = np.pad(lungs[inner], [(r, r) for r in closing])
    sub = _erode(_dilate(sub, closing), closing)[tuple(slice(r, sub.shape[a] - r) for a, r in enumerate(closing))]
    for axis in range(3):
        sub = fill_holes_slicewise(sub, axis)
    lungs[inner] = sub
    out[box] = lungs
    return out
