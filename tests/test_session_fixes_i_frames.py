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

:func:`cyclereg.dense.similarity.ncc_loss` promised that identical images scaled to [0, 1] score below 1e-3; a smooth
one scores several percent, since ``eps`` is added to the product of the local variances. Its computation is
unchanged; its docstring now states the value for identical images, ``1 - v / sqrt(v^2 + eps)`` per window of local
variance ``v``, and what follows from it, each checked here against a value worked out by hand.

:func:`cyclereg.dense.similarity.mind_ssc` / ``mind_loss`` with ``radius=None`` or ``dilation=None`` (and ``ncc_loss``
with ``radius=None``) failed with a bare :class:`TypeError` deep in the arithmetic; they now refuse it with the
one-line :class:`~cyclereg.errors.InputError` naming the argument that a radius of -1 or 1.5 gets.

Each test checks the exact answer or the one-line error naming the argument, and the valid input beside it keeps its
exact answer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cyclereg import frames
from cyclereg.dense.similarity import box_mean, mind_loss, mind_ssc, ncc_loss
from cyclereg.errors import InputError
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


# ----------------------------------------------------------------------------- ncc_loss of identical images
def _three_windows(scale: float = 1.0) -> torch.Tensor:
    """``(1, 1, 3, 1, 1)`` image ``[0, 1, 0] * scale``: with radius 1 and replicate padding its three windows hold
    ``(0, 0, 1)``, ``(0, 1, 0)`` and ``(1, 0, 0)`` (times 9 along the constant axes), each of local variance
    ``1/3 - 1/9 = 2/9`` times ``scale^2``."""
    return torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).view(1, 1, 3, 1, 1) * scale


def test_ncc_loss_docstring_states_the_value_of_identical_images_and_not_the_old_promise():
    doc = " ".join(ncc_loss.__doc__.split())
    assert "Two identical images give ``1 - v / sqrt(v^2 + eps)`` at a window of local variance ``v``" in doc
    assert "``v >= 22.34 sqrt(eps)`` (0.0707 for the default" in doc
    assert "score below 1e-3" not in doc


@pytest.mark.parametrize("scale, eps", [(1.0, 1e-5), (1.0, 1e-3), (0.01, 1e-5), (1.0, 1.0)])
def test_ncc_loss_of_identical_images_is_one_minus_v_over_the_root_of_v_squared_plus_eps(scale, eps):
    image = _three_windows(scale)
    v = 2 / 9 * scale ** 2
    assert ncc_loss(image, image, radius=1, eps=eps).item() == pytest.approx(1 - v / math.sqrt(v * v + eps),
                                                                              rel=1e-12)


def test_ncc_loss_of_identical_images_near_its_documented_limits():
    image, v = _three_windows(), 2 / 9
    assert ncc_loss(image, image, radius=1).item() == pytest.approx(1e-5 / (2 * v * v), rel=2e-4)  # eps / (2 v^2)
    flat = torch.full((1, 1, 4, 4, 4), 0.5, dtype=torch.float64)
    assert ncc_loss(flat, flat, radius=1).item() == 1.0  # no variance: 1, not 0
    # the 1e-3 threshold: eps at which v = 2/9 is exactly 22.34 sqrt(eps), i.e. (1 - d) / sqrt(2 d - d^2) with d = 1e-3
    d = 1e-3
    assert (1 - d) / math.sqrt(2 * d - d * d) == pytest.approx(22.34, abs=5e-3)
    at_threshold = v * v * (2 * d - d * d) / (1 - d) ** 2
    assert ncc_loss(image, image, radius=1, eps=at_threshold).item() == pytest.approx(d, rel=1e-9)
    assert ncc_loss(image, image, radius=1, eps=at_threshold * 1.01).item() > d
    assert 22.34 * math.sqrt(1e-5) == pytest.approx(0.0707, abs=1e-4)


def test_ncc_loss_is_unchanged_when_the_images_scale_by_s_and_eps_by_s_to_the_fourth():
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(1, 1, 6, 6, 6, generator=g, dtype=torch.float64)
    warped = fixed + 0.1 * torch.rand(1, 1, 6, 6, 6, generator=g, dtype=torch.float64)
    s = 0.01
    assert ncc_loss(fixed * s, warped * s, radius=1, eps=1e-5 * s ** 4).item() == pytest.approx(
        ncc_loss(fixed, warped, radius=1, eps=1e-5).item(), rel=1e-9)


def test_ncc_loss_of_a_smooth_ramp_scaled_to_0_1_is_far_above_1e_3():
    ramp = torch.linspace(0, 1, 32, dtype=torch.float64).view(1, 1, 32, 1, 1).expand(1, 1, 32, 32, 32)
    v = (9 ** 2 - 1) / 12 / 31 ** 2  # variance of 9 values 1/31 apart, the same in every inner window of radius 4
    assert round(v, 4) == 0.0069
    local = box_mean(ramp * ramp, 4) - box_mean(ramp, 4) ** 2
    assert local[0, 0, 4:-4].flatten().tolist() == pytest.approx([v] * (24 * 32 * 32), rel=1e-9)
    inner = 1 - v / math.sqrt(v * v + 1e-5)
    assert round(inner, 2) == 0.09
    assert ncc_loss(ramp, ramp, radius=4).item() >= inner  # edge windows repeat edge values: less variance


# ----------------------------------------------------------------------------- None as a window size
def _image() -> torch.Tensor:
    return torch.rand(1, 1, 5, 5, 5, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name, least", [("radius", 0), ("dilation", 1)])
def test_mind_refuses_a_radius_or_dilation_of_none_in_one_line_naming_it(name, least):
    image = _image()
    words = rf"^{name} None: need a whole number, {least} or more$"
    with pytest.raises(InputError, match=words):
        mind_ssc(image, **{name: None})
    with pytest.raises(InputError, match=words):
        mind_loss(image, image, **{name: None})
    with pytest.raises(InputError, match=rf"^{name} 1.5: need a whole number, {least} or more$"):
        mind_ssc(image, **{name: 1.5})  # the existing words, which None now gets too


def test_ncc_loss_refuses_a_radius_of_none_in_one_line_naming_it():
    image = _image()
    with pytest.raises(InputError, match=r"^radius None: need a whole number, 1 or more$"):
        ncc_loss(image, image, radius=None)


def test_similarity_terms_of_whole_window_sizes_keep_their_exact_answers():
    image = _image()
    assert mind_loss(image, image).item() == 0.0
    # a NumPy whole number works as its Python value
    assert torch.equal(mind_ssc(image, radius=np.int64(1), dilation=np.int64(2)), mind_ssc(image))
    assert torch.equal(ncc_loss(image, 1 - image, radius=np.int64(2)), ncc_loss(image, 1 - image, radius=2))
