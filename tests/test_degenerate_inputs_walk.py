"""Valid-but-degenerate inputs to the keypoint-cloud path, the metrics and the Foerstner detector
(numerical-robustness walk, 2026-12-07).

Each test feeds an input that is legal but numerically awkward (a huge coordinate offset, a tiny
extent, duplicate or flat control points, a single-voxel label, an anisotropic grid, a volume that is
almost all one constant) and checks the analytic answer where one exists, or a one-line ValueError
naming the input. Four bugs the walk found (Foerstner on a mostly constant float32 volume, TPS on flat or
repeated centres, repeated fixed points under an interpolating spline, kNN far from the origin) were mended;
their tests fail without the mends.
"""

import dataclasses

import pytest
import torch

from cyclereg.clouds.features import GraphFeatureNet
from cyclereg.clouds.knn import knn_indices
from cyclereg.clouds.pipeline import CloudRegConfig, register_clouds
from cyclereg.clouds.tps import ThinPlateSpline, TPSConfig
from cyclereg.keypoints.foerstner import FoerstnerConfig, foerstner_keypoints
from cyclereg.metrics import dice, hd95, jacobian_determinant, jacobian_map, sdlogj

SHIFT = torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64)


def _cloud(n=40, extent=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=g, dtype=torch.float64) * extent


# ----------------------------------------------------------------------------- cloud registration
@pytest.mark.parametrize("offset, scale", [(1e5, 1.0), (1e6, 1.0), (0.0, 0.02)])
def test_a_translation_is_recovered_far_from_the_origin_and_on_a_small_cloud(offset, scale):
    """A pure translation (moving = fixed + t) far from the origin (1e5 / 1e6 mm, float64) or on a cloud
    of 1 mm extent (t scaled alike; the smallest box UnitBox.around makes): finite displacements equal to
    t at the points and, through the spline, at other points (an affine field is reproduced by the TPS)."""
    torch.manual_seed(0)
    config = CloudRegConfig()
    net = GraphFeatureNet(config.net).double()
    fixed = _cloud() * scale + offset
    shift = SHIFT * scale
    reg = register_clouds(fixed, fixed + shift, net, config)
    tol = 1e-6 * float(shift.abs().max())
    assert torch.isfinite(reg.displacements_mm).all()
    torch.testing.assert_close(reg.displacements_mm, shift.expand_as(fixed), atol=tol, rtol=0)
    torch.testing.assert_close(reg.at(fixed * 0.999 + 0.001 * offset), shift.expand_as(fixed), atol=tol, rtol=0)


@pytest.mark.parametrize("passes", [{}, {"recentre_passes": 2, "recentre_candidates": 64}, {"tta_passes": 2}])
def test_a_translation_of_a_cloud_of_the_minimum_size_is_recovered(passes):
    """A fixed cloud of exactly min_cloud_points (11: the LBP graph's 10 neighbours + itself), fewer points
    than the candidates asked for (64 in a re-centred pass), with re-centred or test-time-augmented passes:
    the displacements are the translation t."""
    torch.manual_seed(0)
    config = dataclasses.replace(CloudRegConfig(), **passes)
    net = GraphFeatureNet(config.net).double()
    fixed = _cloud(11)
    reg = register_clouds(fixed, fixed + SHIFT, net, config)
    torch.testing.assert_close(reg.displacements_mm, SHIFT.expand(11, 3), atol=1e-9, rtol=0)
    torch.testing.assert_close(reg.at(_cloud(5, seed=7)), SHIFT.expand(5, 3), atol=1e-9, rtol=0)


def test_duplicate_fixed_points_with_an_interpolating_spline_still_give_the_translation():
    """Three fixed points given twice, TPS regularisation 0 (the spline system has repeated rows): the
    duplicates carry the same displacement (the exact translation), so the field must stay that
    translation, or the cloud be refused by name (ValueError naming fixed_mm)."""
    torch.manual_seed(0)
    config = dataclasses.replace(CloudRegConfig(), tps=TPSConfig(regularisation=0.0))
    net = GraphFeatureNet(config.net).double()
    base = _cloud()
    fixed = torch.cat([base, base[:3]])
    try:
        reg = register_clouds(fixed, base + SHIFT, net, config)
    except ValueError as exc:  # a fix may refuse the repeats instead, by name
        assert str(exc).startswith("fixed_mm: ") and "\n" not in str(exc)
        return
    torch.testing.assert_close(reg.displacements_mm, SHIFT.expand_as(fixed), atol=1e-9, rtol=0)  # holds today
    query = _cloud(100, seed=1)
    torch.testing.assert_close(reg.at(query), SHIFT.expand(100, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make, message", [
    (lambda p: torch.stack([p[:, 0], p[:, 1], 0.3 * p[:, 0] + 0.2 * p[:, 1]], 1), "fixed_mm: all points lie on one plane"),
    (lambda p: torch.stack([p[:, 0], 2 * p[:, 0] + 1, -p[:, 0]], 1), "fixed_mm: all points lie on one plane or line"),
    (lambda p: torch.cat([p[:5]] * 8), "fixed_mm: only 5 distinct points among 40"),
])
def test_register_clouds_refuses_an_oblique_plane_a_line_and_repeats_by_name(make, message):
    """Fixed clouds whose spline system is singular in exact arithmetic but not in floating point (an
    oblique plane, a line not along an axis) or that hold too few distinct points: one ValueError
    naming fixed_mm, never a field from a near-singular solve."""
    fixed = make(_cloud())
    with pytest.raises(ValueError, match=message):
        register_clouds(fixed, _cloud(seed=2), None, CloudRegConfig())


# ----------------------------------------------------------------------------- thin-plate spline
@pytest.mark.parametrize("offset", [1e5, 1e6])
def test_tps_reproduces_a_translation_far_from_the_origin(offset):
    """An interpolating spline fitted in raw mm 1e5 / 1e6 mm from the origin reproduces a constant
    field exactly (its affine part), also between the control points."""
    centres = _cloud(30, 100.0) + offset
    spline = ThinPlateSpline.fit(centres, SHIFT.expand(30, 3).clone(), regularisation=0.0)
    torch.testing.assert_close(spline(centres[:10] + 0.5), SHIFT.expand(10, 3), atol=1e-8, rtol=0)


def test_tps_refuses_centres_on_an_oblique_plane():
    """Centres on the plane z = 0.3 x + 0.2 y (not along an axis): P has rank 3, the system is singular;
    fit() promises a ValueError ('needs at least 4 points that span 3D')."""
    p = _cloud(20, 1.0)
    p[:, 2] = 0.3 * p[:, 0] + 0.2 * p[:, 1]
    values = _cloud(20, 1.0, seed=3)
    with pytest.raises(ValueError, match=r"^centres: [^\n]+$"):
        ThinPlateSpline.fit(p, values, regularisation=0.1)


def test_tps_refuses_a_repeated_centre_without_regularisation():
    """Two equal float64 centres with different values and lambda = 0: no interpolant exists; fit()
    promises a ValueError ('with regularisation 0, no point twice')."""
    base = _cloud(40, 1.0)
    centres = torch.cat([base, base[:3]])
    values = torch.cat([_cloud(40, 1.0, seed=3), _cloud(3, 1.0, seed=4) + 0.5])
    with pytest.raises(ValueError, match=r"^centres: [^\n]+$"):
        ThinPlateSpline.fit(centres, values, regularisation=0.0)


# ----------------------------------------------------------------------------- kNN
def test_knn_nearest_neighbour_of_float32_points_far_from_the_origin():
    """30 points along x with strictly growing gaps 1, 2, ... mm, 1e4 mm from the origin (float32 holds
    them to 1e-3 mm): the nearest other point of point i >= 1 is i - 1, of point 0 it is 1."""
    gaps = torch.arange(1, 30, dtype=torch.float64)
    x = torch.cat([torch.zeros(1, dtype=torch.float64), gaps.cumsum(0)])
    pts = (torch.stack([x, 0.01 * x, torch.zeros_like(x)], 1) + 1e4).float()
    want = torch.cat([torch.tensor([1]), torch.arange(0, 29)])
    assert knn_indices(pts, pts, 1, exclude_self=True)[:, 0].tolist() == want.tolist()


# ----------------------------------------------------------------------------- metrics
def test_jacobian_and_sdlogj_of_a_translation_and_a_uniform_scaling():
    """u = t (a translation): J = 1 everywhere, SDlogJ 0, no folding; u = a x: J = (1 + a)^3 everywhere,
    SDlogJ 0 (constant J) on the smallest grid sdlogj accepts (5 voxels) and an anisotropic one."""
    t = torch.zeros(1, 3, 5, 6, 9, dtype=torch.float64)
    t[:, 0], t[:, 1], t[:, 2] = 1.5, -2.0, 0.25
    assert jacobian_map(t[:, :, :3, :3, :3]).unique().tolist() == [1.0]
    assert sdlogj(t) == {"sdlogj": 0.0, "std_logj": 0.0, "folding_fraction": 0.0}
    a = 0.1
    x = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in (5, 5, 7)], indexing="ij"))[None]
    J = jacobian_determinant(a * x)
    torch.testing.assert_close(J, torch.full_like(J, (1 + a) ** 3), atol=1e-12, rtol=0)
    s = sdlogj(a * x)
    assert s["sdlogj"] == pytest.approx(0.0, abs=1e-12) and s["folding_fraction"] == 0.0


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_dice_and_hd95_of_a_single_voxel_label_on_an_anisotropic_grid(dtype):
    """Label 7 in one voxel: identical maps give Dice 1 and HD95 0; the voxel moved by one along k at
    spacing (0.5, 0.5, 5) mm gives Dice 0 and HD95 5 mm (and 0.5 mm when moved along i instead)."""
    a = torch.zeros(6, 6, 6, dtype=dtype)
    a[2, 3, 4] = 7
    b, c = torch.zeros_like(a), torch.zeros_like(a)
    b[2, 3, 5] = 7
    c[3, 3, 4] = 7
    spacing = (0.5, 0.5, 5.0)
    assert dice(a, a) == {7: 1.0} and hd95(a, a, spacing=spacing) == {7: 0.0}
    assert dice(a, b) == {7: 0.0} and hd95(a, b, spacing=spacing) == {7: 5.0}
    assert hd95(a, c, spacing=spacing) == {7: 0.5}


# ----------------------------------------------------------------------------- Foerstner keypoints
CUBE_CORNERS = sorted([i, j, k] for i in (12, 16) for j in (12, 16) for k in (12, 16))


def _cube_phantom(dtype):
    """A 5^3 bright cube in a 30^3 zero volume: 0.46 % foreground, so the 1 %..99 % intensity
    quantiles are both 0 and the robust range falls back to its floor."""
    img = torch.zeros(30, 30, 30, dtype=dtype)
    img[12:17, 12:17, 12:17] = 100
    return img


def test_foerstner_keypoints_of_a_mostly_constant_float64_volume_are_the_cube_corners():
    """The corners of a bright cube on a constant background are its keypoints (float64 volume)."""
    k = foerstner_keypoints(_cube_phantom(torch.float64), (1, 1, 1), config=FoerstnerConfig(sigma_mm=1.0,
                                                                                            nms_radius_mm=2.0))
    assert sorted(k.voxels.tolist()) == CUBE_CORNERS and torch.isfinite(k.scores).all()


def test_foerstner_keypoints_of_a_mostly_constant_float32_volume_are_the_cube_corners():
    """The same phantom as float32 (the dtype volumes are read in): the same 8 corners, finite scores."""
    k = foerstner_keypoints(_cube_phantom(torch.float32), (1, 1, 1), config=FoerstnerConfig(sigma_mm=1.0,
                                                                                            nms_radius_mm=2.0))
    assert sorted(k.voxels.tolist()) == CUBE_CORNERS and torch.isfinite(k.scores).all()


def test_foerstner_keypoints_of_a_constant_volume_are_none():
    """A constant volume (float32 near its maximum, or int16 air) has no corner: an empty, finite result."""
    for img in (torch.full((12, 12, 12), 3e38), torch.full((12, 12, 12), -1000, dtype=torch.int16)):
        k = foerstner_keypoints(img, (0.5, 0.5, 5.0), config=FoerstnerConfig(sigma_mm=1.0, nms_radius_mm=2.0))
        assert k.voxels.shape == (0, 3) and k.candidates == 0


def test_foerstner_keypoints_of_a_box_on_an_anisotropic_grid_are_mirror_symmetric():
    """A bright box, symmetric about voxel (20, 20, 5.5), on a (0.5, 0.5, 5) mm grid (float32, the
    detector's scale converted per axis): 8 keypoints, one per corner, forming a set that the mirror
    maps i -> 40 - i, j -> 40 - j, k -> 11 - k leaves unchanged, on the box's first and last k planes."""
    img = torch.zeros(40, 40, 12)
    img[14:27, 14:27, 4:8] = 100
    img += 1.0 * torch.rand(img.shape, generator=torch.Generator().manual_seed(0))  # off the range-floor bug
    k = foerstner_keypoints(img, (0.5, 0.5, 5.0), config=FoerstnerConfig(sigma_mm=1.0, nms_radius_mm=2.0,
                                                                          threshold=0.1))
    pts = sorted(k.voxels.tolist())
    assert len(pts) == 8 and sorted([40 - i, 40 - j, 11 - kk] for i, j, kk in pts) == pts
    assert {kk for _, _, kk in pts} == {4, 7}


# ----------------------------------------------------------------------------- register (point files)
def _column_table(path):
    lines = path.read_text().splitlines()
    head = lines[0].split(",")
    rows = [[float(v) for v in line.split(",")] for line in lines[1:]]
    return {h: [r[n] for r in rows] for n, h in enumerate(head)}


@pytest.mark.parametrize("offset, shape, spacing", [(1e5, (100, 100, 10), (0.5, 0.5, 5.0)),
                                                    (0.0, (3, 3, 3), (20.0, 20.0, 20.0))])
def test_register_files_of_a_translation_on_an_anisotropic_far_grid_and_a_minimum_grid(tmp_path, offset, shape, spacing):
    """register on two point files related by t = (2, -1, 3) mm (multiples of float32's step, so exact after
    reading), with a reference grid of 0.5 x 0.5 x 5 mm whose origin lies 1e5 mm away, or of 3 voxels per
    axis (the smallest --jacobian takes): displacements.csv and query_displacements.csv hold t, the dense
    field t / spacing in voxels of each axis, the Jacobian map 1 everywhere; nothing non-finite."""
    import nibabel as nib
    import numpy as np

    from cyclereg.clouds.api import register_cloud_files
    from cyclereg.pointio import write_points
    from cyclereg.volumeio import write_nifti

    fixed = _cloud(extent=40.0) + 5 + offset
    write_points(tmp_path / "f.csv", fixed)
    write_points(tmp_path / "m.csv", fixed + SHIFT)
    write_points(tmp_path / "q.csv", fixed[:5] * 0.9 + 0.1 * (offset + 25))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = offset
    write_nifti(tmp_path / "ref.nii.gz", np.zeros(shape, np.float32), affine)
    register_cloud_files(tmp_path / "f.csv", tmp_path / "m.csv", tmp_path / "out", reference=tmp_path / "ref.nii.gz",
                         jacobian=True, query=tmp_path / "q.csv", device="cpu")
    for name, n in (("displacements.csv", 40), ("query_displacements.csv", 5)):
        table = _column_table(tmp_path / "out" / name)
        for axis, column in enumerate(("dx_mm", "dy_mm", "dz_mm")):
            assert table[column] == pytest.approx([float(SHIFT[axis])] * n, abs=1e-4)
    field = nib.load(tmp_path / "out" / "displacement.nii.gz").get_fdata()
    assert field.shape == (*shape, 3)
    np.testing.assert_allclose(field, np.broadcast_to(SHIFT.numpy() / np.array(spacing), field.shape), atol=1e-4)
    jac = nib.load(tmp_path / "out" / "jacobian.nii.gz").get_fdata()
    np.testing.assert_allclose(jac, 1.0, atol=1e-5)


def test_detect_keypoints_file_finds_the_corners_of_a_cube_on_a_constant_background(tmp_path):
    """A 30^3 int16 scan, 0 everywhere but a 5^3 cube of 100 (unit voxels at the origin): the keypoint
    file holds the cube's 8 corners in mm, not an InputError calling the image flat."""
    import numpy as np

    from cyclereg.keypoints.api import detect_keypoints_file
    from cyclereg.volumeio import write_nifti

    write_nifti(tmp_path / "ct.nii.gz", _cube_phantom(torch.int16).numpy(), np.eye(4))
    detect_keypoints_file(tmp_path / "ct.nii.gz", tmp_path / "k.csv", sigma_mm=1.0, nms_radius_mm=2.0)
    t = _column_table(tmp_path / "k.csv")
    assert sorted([x, y, z] for x, y, z in zip(t["x_mm"], t["y_mm"], t["z_mm"])) == CUBE_CORNERS
