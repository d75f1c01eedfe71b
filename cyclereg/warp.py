"""Warping with dense displacement fields (voxel units, fixed grid, fixed -> moving)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cyclereg.frames import (ALIGN_CORNERS, LOW_PRECISION, check_affine, check_displacement, crop_affine,
                             fixed_to_moving_voxels, floating_dtype, identity_grid, require_finite, require_tensor,
                             voxel_disp_to_grid_disp, voxel_to_grid, working_dtype)


SLAB_VOXELS = 1 << 23
"""Fixed-grid voxels per slab in :func:`warp_between_grids` (memory: ~100 bytes each)."""


def _check(name: str, t: torch.Tensor, ndim: int) -> None:
    require_tensor(name, t)
    if t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim}-D tensor, got shape {tuple(t.shape)}")


def _check_batch(moving: torch.Tensor, disp_vox: torch.Tensor) -> None:
    """:class:`ValueError` naming the argument unless ``moving`` is 5-D, ``disp_vox`` ``(B, 3, D, H, W)``
    and ``moving``'s batch 1 or B."""
    _check("moving", moving, 5)
    check_displacement("disp_vox", disp_vox)
    if moving.shape[0] not in (1, disp_vox.shape[0]):
        raise ValueError(f"moving: batch {moving.shape[0]}, but disp_vox has {disp_vox.shape[0]} (give 1 or as many)")


def _check_warp(moving: torch.Tensor, disp_vox: torch.Tensor) -> None:
    """:func:`_check_batch`, and :class:`ValueError` unless ``moving`` and ``disp_vox`` share their grid."""
    _check_batch(moving, disp_vox)
    if moving.shape[2:] != disp_vox.shape[2:]:
        raise ValueError(f"moving {tuple(moving.shape[2:])} and disp_vox {tuple(disp_vox.shape[2:])} grids differ")


def warp(moving: torch.Tensor, disp_vox: torch.Tensor, *, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Sample ``moving`` ``(B, C, D', H', W')`` at ``x + disp(x)`` for every fixed voxel ``x``.

    Args:
        moving: moving image; its grid must equal the fixed grid (same shape).
        disp_vox: ``(B, 3, D, H, W)`` displacement in voxels (channel c along axis c).
        mode: ``"bilinear"`` (trilinear) or ``"nearest"`` (labels).
    Returns:
        ``(B, C, D, H, W)`` warped moving image.
    Raises:
        ValueError: naming the argument for a wrong shape, or a ``disp_vox`` holding NaN or inf
            (``grid_sample`` would sample such a voxel quietly at an ordinary-looking value).
    """
    _check_warp(moving, disp_vox)
    require_finite("disp_vox", disp_vox)
    return warp_unchecked(moving, disp_vox, mode=mode, padding_mode=padding_mode)


def warp_unchecked(moving: torch.Tensor, disp_vox: torch.Tensor, *, mode: str = "bilinear",
                   padding_mode: str = "border") -> torch.Tensor:
    """:func:`warp` without its pass over ``disp_vox`` for NaN or inf (shapes are still checked), for
    fields already checked or computed from checked inputs in the package's inner loops (inverse
    consistency, :func:`compose`, Adam steps, training steps, where a NaN prediction must not stop training:
    its loss is NaN and the gradient scaler skips the step). A non-finite displacement is sampled quietly
    here: call :func:`warp` on fields from outside."""
    _check_warp(moving, disp_vox)
    work = working_dtype(disp_vox, moving)
    grid = identity_grid(tuple(disp_vox.shape[2:]), device=disp_vox.device, dtype=work)
    return _sample(moving, grid + voxel_disp_to_grid_disp(disp_vox.to(work)), mode, padding_mode)


def warp_labels(labels: torch.Tensor, disp_vox: torch.Tensor, *, labels_affine=None, fixed_affine=None) -> torch.Tensor:
    """Warp an integer label map ``(B, C, D', H', W')`` like :func:`warp` (or, given both affines, like
    :func:`warp_between_grids`): nearest neighbour, and background (0) where ``x + disp(x)`` leaves
    the label map's voxels, so that no edge label is smeared outward. A voxel is the cube around its
    centre: a point less than half a voxel beyond the outermost centres takes the edge voxel's label
    (``grid_sample``'s nearest rounding); Learn2Reg's evaluation (``map_coordinates(order=0)``,
    constant mode) gives 0 to every point outside the outermost centres, so the two differ in that
    half-voxel band alone. A bad affine is named as the argument (``labels_affine``, ``fixed_affine``)."""
    if (labels_affine is None) != (fixed_affine is None):
        raise ValueError("warp_labels: give both labels_affine and fixed_affine, or neither")
    if labels_affine is not None:  # warp_between_grids would name labels_affine moving_affine
        check_affine("labels_affine", labels_affine, invertible=True)
        check_affine("fixed_affine", fixed_affine)
    if labels.dtype == torch.bool:  # a mask: warped as 0/1 labels and returned as a mask
        return warp_labels(labels.to(torch.uint8), disp_vox, labels_affine=labels_affine,
                           fixed_affine=fixed_affine).bool()
    if labels_affine is None:
        return warp(labels, disp_vox, mode="nearest", padding_mode="zeros")
    return warp_between_grids(labels, labels_affine, disp_vox, fixed_affine, mode="nearest", padding_mode="zeros")


def sample_grid(src: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear",
                padding_mode: str = "border") -> torch.Tensor:
    """``grid_sample`` of a float volume ``src`` ``(B or 1, C, D', H', W')`` at ``grid`` ``(B, D, H, W, 3)``
    (grid frame, :data:`~cyclereg.frames.ALIGN_CORNERS`) -> ``(B, C, D, H, W)``; the one call of it in
    the package for 5-D volumes.

    PyTorch's CPU ``grid_sample`` of 5-D inputs works one volume per thread, so a single volume uses
    one core; here its grid is cut into slabs along the first axis that form a batch, one per intra-op
    thread, when ``src`` needs no gradient. Each output voxel (and its gradient with respect to the grid)
    is computed by the same code either way: the same values, bitwise.

    With ``padding_mode="zeros"`` a size-1 axis of ``src`` (a single slice) fades to 0 outside its one
    voxel as any other axis does (:func:`_single_slice_weight`); ``grid_sample`` alone would sample the
    slice at every coordinate along it (``align_corners=True`` maps them all to its centre)."""
    out = _sample_slabs(src, grid, mode, padding_mode)
    if padding_mode == "zeros" and 1 in src.shape[2:]:
        out = out * _single_slice_weight(tuple(src.shape[2:]), grid, mode).to(out.dtype)
    return out


def _single_slice_weight(shape: tuple[int, int, int], grid: torch.Tensor, mode: str) -> torch.Tensor:
    """``(B, 1, D, H, W)``: how much of a source of ``shape`` (spatial) a zero-padded sample at ``grid``
    ``(B, D, H, W, 3)`` takes along its size-1 axes, at voxel offset ``v`` from the one voxel centre:
    ``max(0, 1 - |v|)`` (``bilinear``) or ``|v| <= 0.5`` (``nearest``), as ``grid_sample`` weighs the
    edge voxels of a longer axis; 1 along the other axes."""
    weight = torch.ones_like(grid[..., 0])
    for axis, size in enumerate(shape):
        if size == 1:
            v = (grid[..., 2 - axis] + 1.0) * 0.5  # voxel index along the axis (frames.voxel_to_grid of a size-1 axis)
            weight = weight * ((1.0 - v.abs()).clamp(min=0.0) if mode == "bilinear" else (v.abs() <= 0.5).to(v.dtype))
    return weight.unsqueeze(1)


def _sample_slabs(src: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """:func:`sample_grid`'s ``grid_sample``, in slabs on the CPU."""
    if src.shape[0] != grid.shape[0]:
        src = src.expand(grid.shape[0], *src.shape[1:])
    parts = torch.get_num_threads() if grid.device.type == "cpu" and not src.requires_grad else 1
    depth = grid.shape[1]
    if parts <= 1 or grid.shape[0] != 1 or depth < 2 * parts:
        return F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=ALIGN_CORNERS)
    slab = -(-depth // parts)
    pad = slab * parts - depth
    if pad:
        grid = torch.cat([grid, grid[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    grid = grid.reshape(parts, slab, *grid.shape[2:])
    out = F.grid_sample(src.expand(parts, -1, -1, -1, -1), grid, mode=mode, padding_mode=padding_mode,
                        align_corners=ALIGN_CORNERS)
    out = out.permute(1, 0, 2, 3, 4).reshape(1, src.shape[1], slab * parts, *out.shape[3:])
    return out[:, :, :depth]


def _sample(moving: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """:func:`sample_grid` of ``moving`` ``(B or 1, C, ...)`` at ``grid`` ``(B, D, H, W, 3)``; integer
    images (labels) are sampled as floats and rounded back; a half-precision image
    (:data:`~cyclereg.frames.LOW_PRECISION`) is sampled in the grid's dtype (at least float32) and answered in its
    own. Nearest-neighbour sampling of labels
    beyond what the grid's float type holds exactly (2^24 for float32) samples the index of each
    label among the map's values instead, so every label comes back unchanged."""
    if not moving.dtype.is_floating_point and moving.dtype != torch.bool and mode == "nearest" and moving.numel():
        exact = int(2 / torch.finfo(grid.dtype).eps)  # every integer below it is a float of this type
        if int(moving.abs().max()) >= exact:
            values, index = torch.unique(torch.cat([moving.reshape(-1), moving.new_zeros(1)]), return_inverse=True)
            zero = int(index[-1])  # padding samples 0: index 0 stands for the label 0
            shifted = (index[:-1] - zero).reshape(moving.shape).to(grid.dtype)
            out = sample_grid(shifted, grid, mode, padding_mode).round().long() + zero
            return values[out]
    if moving.dtype in LOW_PRECISION:  # at the grid's positions (working_dtype: at least float32)
        return sample_grid(moving.to(grid.dtype), grid, mode, padding_mode).to(moving.dtype)
    if moving.dtype.is_floating_point and moving.dtype != grid.dtype:
        grid = grid.to(moving.dtype)  # a float image is sampled, and answered, in its own dtype
    src = moving if moving.dtype.is_floating_point else moving.to(grid.dtype)
    out = sample_grid(src, grid, mode, padding_mode)
    return out if moving.dtype.is_floating_point else out.round().to(moving.dtype)


def warp_between_grids(moving: torch.Tensor, moving_affine, disp_vox: torch.Tensor, fixed_affine, *,
                       mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """:func:`warp` for a moving image on a grid of its own: sample ``moving`` ``(B, C, D', H', W')``
    (grid ``moving_affine``) at the world point of ``x + disp(x)`` for every voxel ``x`` of the
    fixed grid (``disp_vox`` ``(B, 3, D, H, W)`` in its voxels, ``fixed_affine``).

    Returns ``(B, C, D, H, W)`` on the fixed grid. Equals :func:`warp` when the affines and
    shapes agree. Works in slabs along the first axis of at most :data:`SLAB_VOXELS` voxels, so
    the sampling coordinates of a large CT never exist all at once. :class:`ValueError` naming the
    argument for a wrong shape, or a ``disp_vox`` holding NaN or inf, as :func:`warp`, and ``moving_affine`` or
    ``fixed_affine`` when it is no finite 4x4 matrix (``moving_affine`` also when singular: it is inverted).
    """
    _check_batch(moving, disp_vox)
    require_finite("disp_vox", disp_vox)
    fixed_affine = np.asarray(fixed_affine, dtype=np.float64)
    if fixed_affine.shape != (4, 4):
        raise ValueError(f"fixed_affine: expected a 4x4 voxel -> mm matrix, got shape {fixed_affine.shape}")
    work = working_dtype(disp_vox, moving)  # the positions of a half-precision field in float32
    depth, plane = disp_vox.shape[2], disp_vox.shape[3] * disp_vox.shape[4]
    step = max(1, SLAB_VOXELS // max(plane, 1))
    slabs = []
    for start in range(0, depth, step):  # the slab's voxel 0 is the fixed grid's voxel (start, 0, 0)
        points = fixed_to_moving_voxels(disp_vox[:, :, start:start + step].to(work),
                                        crop_affine(fixed_affine, (start, 0, 0)), moving_affine)
        slabs.append(_sample(moving, voxel_to_grid(points, tuple(moving.shape[2:])), mode, padding_mode))
    return torch.cat(slabs, dim=2)


def compose(disp_a: torch.Tensor, disp_b: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> x + a(x) + b(x + a(x))`` (apply ``a`` first, then ``b``), voxels; both
    ``(B, 3, D, H, W)`` on one grid (:class:`ValueError` naming ``disp_a`` / ``disp_b`` otherwise)."""
    check_displacement("disp_a", disp_a)
    check_displacement("disp_b", disp_b)
    if disp_a.shape[2:] != disp_b.shape[2:]:
        raise ValueError(f"disp_b: grid {tuple(disp_b.shape[2:])} differs from disp_a's {tuple(disp_a.shape[2:])}")
    disp_b = disp_b.to(floating_dtype(disp_b))  # an integer field is sampled as numbers, not rounded as labels
    return disp_a + warp_unchecked(disp_b, disp_a, mode="bilinear", padding_mode="border")


def sample_at_points(field: torch.Tensor, points_vox: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``field`` ``(1, C, D, H, W)`` at voxel points ``(N, 3)`` -> ``(N, C)``."""
    require_tensor("field", field)
    require_tensor("points_vox", points_vox)
    if field.ndim != 5 or field.shape[0] != 1:
        raise ValueError(f"field: expected (1, C, D, H, W), got {tuple(field.shape)}")
    field = field.to(floating_dtype(field))  # an integer field is sampled as numbers
    if points_vox.ndim != 2 or points_vox.shape[1] != 3:
        raise ValueError(f"points_vox: expected (N, 3), got {tuple(points_vox.shape)}")
    work = working_dtype(field)  # a half-precision field: sampled at float32 points, answered in its dtype
    g = voxel_to_grid(points_vox.to(work), tuple(field.shape[2:])).view(1, -1, 1, 1, 3)
    return sample_grid(field.to(work), g, "bilinear", "border").reshape(field.shape[1], -1).T.to(field.dtype)
