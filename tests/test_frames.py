import numpy as np
import torch

import pytest

from cyclereg.frames import (UnitBox, centred_affine, fixed_to_moving_voxels, grid_disp_to_voxel_disp, grid_to_voxel,
                             identity_grid, ijk_to_kji, mm_disp_to_voxel, voxel_coordinates, voxel_disp_to_grid_disp,
                             voxel_disp_to_mm, voxel_to_grid, voxel_to_world, world_map_to_voxel, world_to_voxel,
                             spacing_xyz, zyx_grid_affine)
from cyclereg.warp import warp, warp_between_grids


def test_voxel_grid_round_trip(device, dtype):
    shape = (5, 7, 9)
    p = torch.rand(20, 3, device=device, dtype=dtype) * torch.tensor([4, 6, 8], device=device, dtype=dtype)
    g = voxel_to_grid(p, shape)
    assert g.abs().max() <= 1 + 1e-6
    torch.testing.assert_close(grid_to_voxel(g, shape), p)
    corner = voxel_to_grid(torch.tensor([[4.0, 0.0, 8.0]], device=device, dtype=dtype), shape)
    torch.testing.assert_close(corner, torch.tensor([[1.0, -1.0, 1.0]], device=device, dtype=dtype))


def test_identity_grid_is_voxel_to_grid_of_every_voxel(device, dtype):
    """One conversion: the identity grid is the grid position of each voxel index, a size-1 axis included
    (-1 there, like voxel_to_grid), and its last axis is (k, j, i): x varies fastest along W."""
    for shape in ((4, 5, 6), (1, 3, 2), (3, 1, 1)):
        grid = identity_grid(shape, device=device, dtype=dtype)
        assert grid.shape == (1, *shape, 3) and grid.dtype == dtype and grid.device.type == torch.device(device).type
        torch.testing.assert_close(grid[0], voxel_to_grid(voxel_coordinates(shape, device=device, dtype=dtype), shape))
        # analytically: component c (x, y, z = k, j, i) runs evenly from -1 to 1 along its array axis 2 - c
        for c in range(3):
            axis, n = 2 - c, shape[2 - c]
            ramp = torch.linspace(-1.0, 1.0, n, dtype=dtype) if n > 1 else torch.full((1,), -1.0, dtype=dtype)
            view = [1, 1, 1]
            view[axis] = n
            torch.testing.assert_close(grid[0, ..., c].cpu(), ramp.view(view).expand(shape))
    grid = identity_grid((1, 3, 2), device=device, dtype=dtype)[0]
    torch.testing.assert_close(grid[0, 2, 1], torch.tensor([1.0, 1.0, -1.0], device=device, dtype=dtype))


def test_ijk_to_kji_reverses_the_components_and_checks_the_shape():
    t = torch.arange(12.0).reshape(4, 3)
    torch.testing.assert_close(ijk_to_kji(t), t[:, [2, 1, 0]])
    torch.testing.assert_close(ijk_to_kji(ijk_to_kji(t)), t)
    with pytest.raises(ValueError, match="t: expected"):
        ijk_to_kji(torch.zeros(4, 2))


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


def test_unit_box_around_clouds_adds_the_margin_on_each_side():
    """Points spanning [0, 10] x [0, 20] x [5, 5] mm with margin 0.05: each side grows by 5 % of its size
    (a flat side counts as 1 mm), so lo = -0.5, -1, 4.95 and the extent 11, 22, 1.1 mm."""
    box = UnitBox.around(torch.tensor([[0.0, 0.0, 5.0], [10.0, 20.0, 5.0]]), margin=0.05)
    np.testing.assert_allclose(box.lo_mm, (-0.5, -1.0, 4.95), rtol=0, atol=1e-12)
    np.testing.assert_allclose(box.extent_mm, (11.0, 22.0, 1.1), rtol=0, atol=1e-12)


def test_zyx_grid_affine_and_its_box():
    """Voxel (i, j, k) of a (z, y, x) grid lies at mm (k sx, j sy, i sz); the box of the volume is the
    world extent of that grid, x first."""
    A = zyx_grid_affine((192, 192, 208), (1.75, 1.0, 1.25))
    w = voxel_to_world(torch.tensor([[2.0, 3.0, 4.0]], dtype=torch.float64), A)
    torch.testing.assert_close(w, torch.tensor([[4 * 1.25, 3 * 1.0, 2 * 1.75]], dtype=torch.float64))
    far = voxel_to_world(torch.tensor([[192.0, 192.0, 208.0]], dtype=torch.float64), A)[0]
    assert UnitBox.from_volume((192, 192, 208), (1.75, 1.0, 1.25)).extent_mm == tuple(far.tolist())
    with pytest.raises(ValueError, match="shape_zyx, spacing_zyx_mm"):
        zyx_grid_affine((4, 5), (1.0, 1.0, 1.0))
    # a voxel index along x, y, z (Learn2Reg CSV) at that spacing is the grid's voxel with the axes reversed
    assert spacing_xyz((1.75, 1.0, 1.25)) == (1.25, 1.0, 1.75)
    torch.testing.assert_close(torch.tensor([[4.0, 3.0, 2.0]], dtype=torch.float64) * torch.tensor(
        spacing_xyz((1.75, 1.0, 1.25)), dtype=torch.float64), w)


def test_zyx_grid_affine_is_the_reversal_scaled_in_float64():
    """The dataset grid's affine reorders through ijk_to_kji and keeps every spacing digit (no float32
    round trip): voxel (i, j, k) at mm (k sx, j sy, i sz)."""
    from cyclereg.frames import spacing_xyz, zyx_grid_affine

    assert spacing_xyz((0.6, 0.7, 1 / 3)) == (1 / 3, 0.7, 0.6)
    A = zyx_grid_affine((4, 5, 6), (0.6, 0.7, 1 / 3))
    expected = torch.tensor([[0, 0, 1 / 3, 0], [0, 0.7, 0, 0], [0.6, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    assert A.dtype == torch.float64 and torch.equal(A, expected)


def test_a_crops_voxel_is_the_grids_voxel_plus_the_offset():
    from cyclereg.frames import crop_affine, voxel_to_world

    A = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -20.0], [0.0, 0.0, 1.0, 5.0], [0, 0, 0, 1.0]])
    v = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    off = torch.tensor([4.0, 0.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(voxel_to_world(v, torch.from_numpy(crop_affine(A, (4, 0, 7)))),
                               voxel_to_world(v + off, torch.from_numpy(A)), rtol=0, atol=0)


def test_unit_box_names_a_wrongly_shaped_argument():
    box = UnitBox((0.0, 0.0, 0.0), (10.0, 10.0, 10.0))
    for method, name in ((box.mm_to_unit, "points_mm"), (box.unit_to_mm, "points_unit"),
                         (box.disp_mm_to_unit, "disp_mm"), (box.disp_unit_to_mm, "disp_unit")):
        with pytest.raises(ValueError, match=f"{name}: expected"):
            method(torch.zeros(5, 1))


def test_voxel_grid_conversions_name_a_wrongly_shaped_argument():
    """An (N, 1) input was broadcast to (N, 3) by the arithmetic before any check, and (N, 2) raised torch's
    own error: both name the argument now."""
    from cyclereg.frames import grid_to_voxel, inside_grid, voxel_to_grid

    for fn, name in ((voxel_to_grid, "points_vox"), (grid_to_voxel, "points_grid"), (inside_grid, "points_vox")):
        for bad in (torch.zeros(5, 1), torch.zeros(5, 2)):
            with pytest.raises(ValueError, match=f"{name}: expected"):
                fn(bad, (4, 5, 6))


def test_inside_grid_is_the_voxels_half_open_extent(dtype):
    from cyclereg.frames import inside_grid

    pts = torch.tensor([[-0.5, 0, 0], [-0.51, 0, 0], [3.5, 4.5, 5.5], [3.5, 4.6, 0], [1.0, 2.0, 3.0]], dtype=dtype)
    assert inside_grid(pts, (4, 5, 6)).tolist() == [True, False, True, False, True]
    assert inside_grid(pts.reshape(5, 1, 3), (4, 5, 6)).shape == (5, 1)


def test_warp_identity_and_known_shift(device):
    img = torch.rand(1, 1, 6, 7, 8, device=device)
    zero = torch.zeros(1, 3, 6, 7, 8, device=device)
    torch.testing.assert_close(warp(img, zero), img)
    # displacement +1 voxel along axis 2 (k): warped(x) = moving(x + e_k)
    d = zero.clone()
    d[:, 2] = 1.0
    out = warp(img, d)
    torch.testing.assert_close(out[..., :-1], img[..., 1:])


# a fixed grid (2 mm, axis-aligned) and a moving grid of its own: axes permuted and flipped,
# anisotropic spacing, another origin, covering the fixed grid's world extent with margin
FIXED_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
MOVING_AFFINE = np.array([[0.0, 0.0, 1.0, -4.0],
                          [0.0, 0.75, 0.0, -4.0],
                          [-1.5, 0.0, 0.0, 20.0],
                          [0.0, 0.0, 0.0, 1.0]])
MOVING_SHAPE = (18, 32, 24)


def test_fixed_to_moving_voxels_through_world(dtype):
    g = torch.Generator().manual_seed(0)
    d = torch.rand(1, 3, 6, 7, 8, generator=g, dtype=dtype) * 2 - 1
    pts = fixed_to_moving_voxels(d, FIXED_AFFINE, MOVING_AFFINE)
    assert pts.shape == (1, 6, 7, 8, 3)
    # the moving voxel maps back to the world point of x + d(x) in the fixed grid
    x = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=dtype) for s in (6, 7, 8)), indexing="ij"), -1)
    expected = 2.0 * (x + d[0].permute(1, 2, 3, 0))
    torch.testing.assert_close(voxel_to_world(pts[0], MOVING_AFFINE), expected)


def test_warp_between_grids_samples_a_world_ramp_exactly():
    """A moving image that is linear in world mm is warped exactly (trilinear interpolation is
    exact for linear functions): warped(x) = ramp(world(x + u(x)))."""
    a, b = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64), 1.0
    vox = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in MOVING_SHAPE), indexing="ij"), -1)
    moving = (voxel_to_world(vox, MOVING_AFFINE) @ a + b)[None, None]
    g = torch.Generator().manual_seed(1)
    d = (torch.rand(1, 3, 6, 7, 8, generator=g, dtype=torch.float64) * 2 - 1)
    out = warp_between_grids(moving, MOVING_AFFINE, d, FIXED_AFFINE)
    x = torch.stack(torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in (6, 7, 8)), indexing="ij"), -1)
    expected = (2.0 * (x + d[0].permute(1, 2, 3, 0))) @ a + b
    assert out.shape == (1, 1, 6, 7, 8)
    torch.testing.assert_close(out[0, 0], expected, atol=1e-9, rtol=0)


def test_warp_between_grids_equals_warp_on_one_grid(device):
    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 1, 6, 7, 8, generator=g).to(device)
    d = (torch.rand(1, 3, 6, 7, 8, generator=g) * 3 - 1.5).to(device)
    affine = np.array([[0.0, 1.2, 0.0, 5.0], [0.9, 0.0, 0.0, -3.0], [0.0, 0.0, 2.5, 1.0], [0, 0, 0, 1.0]])
    torch.testing.assert_close(warp_between_grids(img, affine, d, affine), warp(img, d), atol=1e-5, rtol=0)


def test_warp_between_grids_in_slabs_equals_one_piece(monkeypatch):
    import cyclereg.warp as warp_mod

    g = torch.Generator().manual_seed(5)
    moving = torch.rand(1, 1, *MOVING_SHAPE, generator=g)
    d = torch.rand(1, 3, 6, 7, 8, generator=g) * 4 - 2
    whole = warp_between_grids(moving, MOVING_AFFINE, d, FIXED_AFFINE)
    monkeypatch.setattr(warp_mod, "SLAB_VOXELS", 7 * 8 * 4 + 1)  # two slabs along axis 0: 4 + 2 planes
    torch.testing.assert_close(warp_between_grids(moving, MOVING_AFFINE, d, FIXED_AFFINE), whole, atol=1e-6, rtol=0)


def test_centred_affine_puts_the_volume_centre_at_the_origin():
    A = centred_affine((5, 4, 7), (2.0, 0.5, 1.5))
    centre = torch.tensor([[2.0, 1.5, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(voxel_to_world(centre, A), torch.zeros(1, 3, dtype=torch.float64))
    torch.testing.assert_close(voxel_to_world(torch.tensor([[4.0, 3.0, 6.0]], dtype=torch.float64), A),
                               torch.tensor([[4.0, 0.75, 4.5]], dtype=torch.float64))


def test_world_map_to_voxel_is_the_map_seen_through_the_grid():
    """A rotation + scaling + shift in mm on an oblique, anisotropic, offset grid: the voxel-frame map
    sends every voxel where the world map sends its world point."""
    g = torch.Generator().manual_seed(0)
    affine = torch.tensor([[0.0, 0.0, -1.5, 40.0], [2.0, 0.0, 0.0, -12.5], [0.0, 0.8, 0.0, 7.0], [0, 0, 0, 1]],
                          dtype=torch.float64)
    A_mm = torch.eye(3, dtype=torch.float64) + 0.2 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    t_mm = torch.tensor([3.0, -4.0, 10.0], dtype=torch.float64)
    A_vox, b_vox = world_map_to_voxel(A_mm, t_mm, affine)
    v = torch.randn(50, 3, generator=g, dtype=torch.float64) * 20
    expected = world_to_voxel(voxel_to_world(v, affine) @ A_mm.T + t_mm, affine)
    torch.testing.assert_close(v @ A_vox.T + b_vox, expected)
    # the identity in mm is the identity in voxels; a pure mm shift is that shift in voxels
    I, zero = world_map_to_voxel(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), affine)
    torch.testing.assert_close(I, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(zero, torch.zeros(3, dtype=torch.float64))
    _, b = world_map_to_voxel(torch.eye(3, dtype=torch.float64), torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64),
                              affine)
    torch.testing.assert_close(b, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_unit_box_needs_positive_finite_sides():
    for lo, ext, message in (((0, 0, 0), (0, 1, 1), "every side must be > 0"), ((0, 0), (1, 1, 1), "3 values"),
                             ((0, float("nan"), 0), (1, 1, 1), "finite")):
        with pytest.raises(ValueError, match=message):
            UnitBox(lo, ext)
    with pytest.raises(ValueError, match="clouds_mm: need at least one point"):
        UnitBox.around(torch.zeros(0, 3))


def test_frame_conversions_and_warps_name_a_wrong_argument():
    """kornia-style: a wrong shape is a ValueError naming the argument (they were raw indexing,
    matmul, einsum or expand errors), and a float image warps in its own dtype."""
    from cyclereg.frames import mm_disp_to_voxel, voxel_disp_to_mm, voxel_to_world, world_to_voxel
    from cyclereg.warp import sample_at_points

    A = np.diag([2.0, 1.5, 1.0, 1.0])
    cases = [(lambda: voxel_to_world(torch.zeros(5, 3), np.eye(3)), "affine: expected a 4x4"),
             (lambda: voxel_to_world(torch.zeros(5, 2), A), "points_vox: expected"),
             (lambda: world_to_voxel(torch.zeros(5, 2), A), "points_mm: expected"),
             (lambda: voxel_disp_to_mm(torch.zeros(1, 3, 4, 4), A), "disp_vox: expected"),
             (lambda: mm_disp_to_voxel(torch.zeros(1, 2, 4, 4, 4), A), "disp_mm: expected"),
             (lambda: warp(torch.zeros(2, 1, 4, 4, 4), torch.zeros(3, 3, 4, 4, 4)), "moving: batch 2"),
             (lambda: warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4)), "disp_vox: expected"),
             (lambda: sample_at_points(torch.zeros(2, 3, 4, 4, 4), torch.zeros(5, 3)), "field: expected"),
             (lambda: sample_at_points(torch.zeros(1, 3, 4, 4, 4), torch.zeros(5, 2)), "points_vox: expected")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    img = torch.rand(1, 1, 4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = warp(img, torch.zeros(1, 3, 4, 5, 6))  # the float32 grid's rounding: ~1e-7 voxel
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)
