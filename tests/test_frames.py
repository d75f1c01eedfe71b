import numpy as np
import torch

from cyclereg.frames import (UnitBox, grid_disp_to_voxel_disp, grid_to_voxel, mm_disp_to_voxel, voxel_disp_to_grid_disp,
                             voxel_disp_to_mm, voxel_to_grid, voxel_to_world, world_to_voxel)
from cyclereg.warp import warp


def test_voxel_grid_round_trip(device, dtype):
    shape = (5, 7, 9)
    p = torch.rand(20, 3, device=device, dtype=dtype) * torch.tensor([4, 6, 8], device=device, dtype=dtype)
    g = voxel_to_grid(p, shape)
    assert g.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(grid_to_voxel(g, shape), p)
    corner = voxel_to_grid(torch.tensor([[4.0, 0.0, 8.0]], device=device, dtype=dtype), shape)
    torch.testing.assert_close(corner, torch.tensor([[1.0, -1.0, 1.0]], device=device, dtype=dtype))


def test_disp_round_trip(device, dtype):
    d = torch.randn(2, 3, 4, 5, 6, device=device, dtype=dtype)
    torch.testing.assert_close(grid_disp_to_voxel_disp(voxel_disp_to_grid_disp(d)), d)


def test_world_voxel_affine(dtype):
    A = np.array([[0, 0, 1.25, 10], [0, 1.0, 0, -5], [1.75, 0, 0, 3], [0, 0, 0, 1]])
    p = torch.tensor([[1.0, 2.0, 3.0]], dtype=dtype)
    w = voxel_to_world(p, torch.tensor(A))
    torch.testing.assert_close(w, torch.tensor([[3 * 1.25 + 10, 2.0 - 5, 1.75 + 3]], dtype=dtype))
    torch.testing.assert_close(world_to_voxel(w, torch.tensor(A)), p)
    d = torch.randn(1, 3, 2, 2, 2, dtype=dtype)
    torch.testing.assert_close(mm_disp_to_voxel(voxel_disp_to_mm(d, A), A), d)


def test_unit_box_round_trip():
    box = UnitBox.from_volume((192, 192, 208), (1.75, 1.0, 1.25))
    assert box.extent_mm == (260.0, 192.0, 336.0)
    p = torch.tensor([[0.0, 0.0, 0.0], [260.0, 192.0, 336.0]])
    torch.testing.assert_close(box.mm_to_unit(p), torch.tensor([[-1.0, -1, -1], [1, 1, 1]]))
    torch.testing.assert_close(box.unit_to_mm(box.mm_to_unit(p)), p)


def test_warp_identity_and_known_shift(device):
    img = torch.rand(1, 1, 6, 7, 8, device=device)
    zero = torch.zeros(1, 3, 6, 7, 8, device=device)
    torch.testing.assert_close(warp(img, zero), img)
    # displacement +1 voxel along axis 2 (k): warped(x) = moving(x + e_k)
    d = zero.clone()
    d[:, 2] = 1.0
    out = warp(img, d)
    torch.testing.assert_close(out[..., :-1], img[..., 1:])
