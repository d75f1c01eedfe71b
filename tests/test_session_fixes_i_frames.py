"""Contracts of the frame, warp and similarity checks mended in a session of small fixes (2026-12-07).

:func:`cyclereg.frames.voxel_to_world` (and every conversion through its affine check: ``world_to_voxel``,
``voxel_disp_to_mm``, ``mm_disp_to_voxel``, ``fixed_to_moving_voxels``) failed on ``meta`` tensors (shapes only):
the finite check of the affine read a value that a meta tensor has not. It now checks the affine's shape alone there
and answers a meta tensor of the right shape, as torch's own operations do.

:func:`cyclereg.frames.identity_grid` with an integer ``dtype`` answered float32 silently, and
:func:`cyclereg.frames.voxel_coordinates` answered integer coordinates that wrap in 8 bits (voxel 299 as 43 in uint8)
or failed inside torch (bool), and ``dtype=None`` gave int64 ones (``arange`` of ints). Voxel and grid coordinates are floats (the package docstring), so both now refuse a
``dtype`` that is no floating-point one by name; :func:`cyclereg.warp.warp` and
:func:`cyclereg.frames.fixed_to_moving_voxels` of an integer displacement build their coordinates in
:func:`cyclereg.frames.floating_dtype` of it (the same values as before).

:func:`cyclereg.frames.voxel_coordinates` of a shape with a size of 0 (or -1, or 2.5: ``arange`` takes it) answered an
empty or fractional grid where :func:`cyclereg.frames.identity_grid` refused the shape (of a negative size, or of
two or four sizes, both failed inside torch); both now refuse it in the same words (:func:`cyclereg.frames.check_shape`),
naming ``shape``.

:func:`cyclereg.warp.warp_between_grids` (and :func:`cyclereg.frames.fixed_to_moving_voxels`, which it calls, and
:func:`cyclereg.warp.warp_labels` given affines) named a moving or fixed affine of a wrong shape, holding NaN or
singular ``affine``, an argument none of them has; each now names its own argument (``moving_affine``,
``fixed_affine``, ``labels_affine``) in the same words (:func:`cyclereg.frames.check_affine`).

Each test checks the exact answer or the one-line error naming the argument, and the valid input beside it keeps its
exact answer.
"""

from __future__ import annotations

import pytest
import torch

from cyclereg import frames
from cyclereg.warp import warp, warp_between_grids, warp_labels


# ----------------------------------------------------------------------------- meta tensors
@pytest.mark.parametrize("convert", [frames.voxel_to_world, frames.world_to_voxel])
def test_point_conversions_of_meta_points_answer_a_meta_tensor_of_the_right_shape(convert):
    points = torch.empty(5, 2, 3, device="meta")
    out = convert(points, torch.eye(4, dtype=torch.float64))
    assert out.is_meta and out.shape == (5, 2, 3) and out.dtype == torch.float32
    assert convert(points.long(), torch.eye(4)).dtype == torch.get_default_dtype()  # integer indices are promoted
    with pytest.raises(ValueError, match=r"^affine: expected a 4x4 voxel -> mm matrix, got shape \(3, 3\)$"):
        convert(points, torch.eye(3))  # the shape is still checked


def test_field_conversions_of_meta_fields_answer_meta_tensors_of_the_right_shape():
    disp = torch.empty(1, 3, 2, 3, 4, device="meta")
    A = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    for out in (frames.voxel_disp_to_mm(disp, A), frames.mm_disp_to_voxel(disp, A)):
        assert out.is_meta and out.shape == (1, 3, 2, 3, 4)
    moved = frames.fixed_to_moving_voxels(disp, A, A)
    assert moved.is_meta and moved.shape == (1, 2, 3, 4, 3)


def test_point_conversions_of_real_points_keep_their_exact_answer_and_nan_check():
    A = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    A[:3, 3] = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    mm = frames.voxel_to_world(torch.tensor([[1.0, 2.0, 3.0]]), A)
    assert mm.tolist() == [[3.0, 5.0, 12.5]]
    assert frames.world_to_voxel(mm, A).tolist() == [[1.0, 2.0, 3.0]]
    A[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^affine: holds NaN or inf$"):
        frames.voxel_to_world(torch.zeros(1, 3), A)


# ----------------------------------------------------------------------------- coordinate dtypes
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.uint8, torch.bool, torch.complex64, "float32"])
@pytest.mark.parametrize("make", [frames.identity_grid, frames.voxel_coordinates])
def test_coordinate_grids_refuse_a_dtype_that_is_no_floating_point_one_by_name(make, dtype):
    with pytest.raises(ValueError, match=r"^dtype: expected a floating-point dtype \(coordinates are floats\), got "):
        make((2, 3, 4), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_coordinate_grids_of_floating_dtypes_keep_their_exact_values(dtype):
    coords = frames.voxel_coordinates((2, 3, 4), dtype=dtype)
    assert coords.dtype == dtype and coords[1, 2, 3].tolist() == [1.0, 2.0, 3.0]
    grid = frames.identity_grid((2, 3, 5), dtype=dtype)
    assert grid.dtype == dtype and grid[0, 1, 1, 2].tolist() == [0.0, 0.0, 1.0]  # (k, j, i) of voxel (1, 1, 2)
    assert frames.voxel_coordinates((2, 3, 4), dtype=None).dtype == torch.get_default_dtype()  # as torch.zeros's


def test_warps_of_an_integer_displacement_sample_as_its_float_copy():
    moving = torch.arange(60.0).reshape(1, 1, 3, 4, 5)
    disp = torch.zeros(1, 3, 3, 4, 5, dtype=torch.long)
    disp[:, 2] = 1  # one voxel along k: voxel (i, j, k) samples (i, j, k + 1), the last one its border
    expected = torch.cat([moving[..., 1:], moving[..., -1:]], dim=-1)
    assert torch.equal(warp(moving, disp), expected)
    assert torch.equal(warp_between_grids(moving, torch.eye(4), disp, torch.eye(4)), expected)
    moved = frames.fixed_to_moving_voxels(disp, torch.eye(4), torch.eye(4))
    assert moved.dtype == torch.get_default_dtype() and moved[0, 2, 3, 4].tolist() == [2.0, 3.0, 5.0]


# ----------------------------------------------------------------------------- shapes of voxel_coordinates
@pytest.mark.parametrize("shape", [(2, 0, 2), (0, 0, 0), (2, -1, 2), (2, 2.5, 2), (2, 3), (2, 3, 4, 5), (True, 2, 2)])
@pytest.mark.parametrize("make", [frames.identity_grid, frames.voxel_coordinates])
def test_coordinate_grids_refuse_a_shape_without_voxels_in_one_message_naming_shape(make, shape):
    with pytest.raises(ValueError, match=r"^shape: expected 3 spatial sizes \(D, H, W\), whole numbers >= 1, got "):
        make(shape)


def test_voxel_coordinates_of_a_one_voxel_thick_shape_keep_their_exact_values():
    coords = frames.voxel_coordinates((2, 1, 3))
    assert coords.shape == (2, 1, 3, 3) and coords[1, 0, 2].tolist() == [1.0, 0.0, 2.0]
    assert frames.voxel_coordinates(torch.Size([1, 1, 1])).tolist() == [[[[0.0, 0.0, 0.0]]]]


# ----------------------------------------------------------------------------- affines named as their arguments
_NAN = torch.eye(4).index_put((torch.tensor([1]), torch.tensor([3])), torch.tensor(float("nan")))
_BAD_AFFINES = [
    (torch.eye(3), r"expected a 4x4 voxel -> mm matrix, got shape \(3, 3\)"),
    (_NAN, r"holds NaN or inf"),
    (torch.diag(torch.tensor([1.0, 0.0, 1.0, 1.0])), r"singular \(its voxel axes do not span 3D\), it has no inverse"),
]


def _pair():
    moving = torch.arange(27.0).reshape(1, 1, 3, 3, 3)
    disp = torch.zeros(1, 3, 3, 3, 3)
    disp[:, 0] = 1.0
    return moving, disp


@pytest.mark.parametrize("bad, words", _BAD_AFFINES)
def test_warp_between_grids_names_a_bad_moving_affine_moving_affine(bad, words):
    moving, disp = _pair()
    with pytest.raises(ValueError, match=rf"^moving_affine: {words}$"):
        warp_between_grids(moving, bad, disp, torch.eye(4))
    with pytest.raises(ValueError, match=rf"^moving_affine: {words}$"):
        frames.fixed_to_moving_voxels(disp, torch.eye(4), bad)
    with pytest.raises(ValueError, match=rf"^labels_affine: {words}$"):
        warp_labels(moving.long(), disp, labels_affine=bad, fixed_affine=torch.eye(4))


@pytest.mark.parametrize("bad, words", _BAD_AFFINES[:2])
def test_warp_between_grids_names_a_bad_fixed_affine_fixed_affine(bad, words):
    moving, disp = _pair()
    with pytest.raises(ValueError, match=rf"^fixed_affine: {words}$"):
        warp_between_grids(moving, torch.eye(4), disp, bad)
    with pytest.raises(ValueError, match=rf"^fixed_affine: {words}$"):
        frames.fixed_to_moving_voxels(disp, bad, torch.eye(4))
    with pytest.raises(ValueError, match=rf"^fixed_affine: {words}$"):
        warp_labels(moving.long(), disp, labels_affine=torch.eye(4), fixed_affine=bad)


def test_warp_between_grids_of_good_affines_keeps_its_exact_answer():
    moving, disp = _pair()
    expected = torch.cat([moving[:, :, 1:], moving[:, :, -1:]], dim=2)  # voxel i samples i + 1, the last its border
    assert torch.equal(warp_between_grids(moving, torch.eye(4), disp, torch.eye(4)), expected)
    shifted = torch.eye(4, dtype=torch.float64)
    shifted[0, 3] = -1.0  # moving voxel i lies at mm i - 1: fixed voxel i + 1 (mm i + 1) is moving voxel i + 2
    assert torch.equal(warp_between_grids(moving, shifted.numpy(), disp, torch.eye(4))[:, :, 0], moving[:, :, 2])
    assert torch.equal(warp_labels(moving.long(), disp, labels_affine=torch.eye(4), fixed_affine=torch.eye(4)),
                       torch.cat([moving[:, :, 1:], torch.zeros_like(moving[:, :, :1])], dim=2).long())
    assert frames.SINGULAR_AFFINE == "affine: singular (its voxel axes do not span 3D), it has no inverse"
