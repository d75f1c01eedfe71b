"""Contracts of the frame, warp and similarity checks mended in a session of small fixes (2026-12-07).

:func:`cyclereg.frames.voxel_to_world` (and every conversion through its affine check: ``world_to_voxel``,
``voxel_disp_to_mm``, ``mm_disp_to_voxel``, ``fixed_to_moving_voxels``) failed on ``meta`` tensors (shapes only):
the finite check of the affine read a value that a meta tensor has not. It now checks the affine's shape alone there
and answers a meta tensor of the right shape, as torch's own operations do.

Each test checks the exact answer or the one-line error naming the argument, and the valid input beside it keeps its
exact answer.
"""

from __future__ import annotations

import pytest
import torch

from cyclereg import frames


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
