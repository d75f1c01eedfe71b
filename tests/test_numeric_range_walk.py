"""Extreme but legitimate magnitudes in float32 (numerical-range walk, 2026-12-07).

Audited: the kNN search (``cyclereg.clouds.knn``) against a float64 brute force for clouds in scanner
coordinates 1e3-1e4 mm from the origin; the thin-plate spline's affine reproduction at such offsets; the
``voxel_to_world`` / ``world_to_voxel`` and ``UnitBox`` round trips, ``fixed_to_moving_voxels`` and
``warp_between_grids`` with large-offset affines and 0.05 mm, 0.5 x 0.5 x 5 mm and 10 mm voxels; point files
(CSV, l2r, npy) written and read at 1e4 mm; Foerstner keypoints and the dense pipeline's MRI percentile
normalisation under intensity scales from 1e-9 to 1e6 and a CT-like affine intensity map; the Jacobian
metrics and ``compose`` with a shift of most of the volume and with a folding field.

Every expectation is derived by hand: a float32 value ``x`` is held only to ``ulp(x)`` (``np.spacing``), so
a world-coordinate round trip may be off by ``ulp(world) / spacing`` voxels (inherent, not a bug), while a
computation whose inputs and outputs are small (voxel indices, neighbour ranks, a normalised image) must not
lose more than the spacing of those values to an intermediate it chose to form at a large magnitude.

Bugs found, pinned as strict xfails and mended since (the tests pass now; the last one documented instead:
``mind_loss`` takes ``eps``, an absolute floor in intensity^2 units, and its test checks the documented scaling):

* ``knn_indices`` shifts a cloud to its mean only when the origin lies outside the cloud
  (``clouds/knn.py``: ``offset.abs().max() > (reference - offset).abs().max()``); one stray point at the
  origin (a missing landmark written as 0, 0, 0) beside a cluster 1e4 mm away defeats it, and
  ``torch.cdist``'s ``|x|^2 + |y|^2 - 2xy`` then ranks the cluster's neighbours wrongly (distances off by mm);
* ``warp_between_grids`` (via ``frames.fixed_to_moving_voxels``) goes through float32 world millimetres, so
  with one affine for both grids, 0.05 mm voxels and a 1e4 mm origin the identity warp is off by 0.02 voxels
  (its docstring: it "equals warp when the affines and shapes agree");
* ``dense.data.preprocess`` (``mri``) floors the percentile range at an absolute 1e-6 intensity units, so an
  MRI whose values are all below about 1e-6 (e.g. a map in SI units) is not mapped to [0, 1] as
  ``PreprocessConfig.mri_percentiles`` says;
* ``keypoints.foerstner.distinctiveness`` floors the intensity range at an absolute 1e-6 likewise: an image
  of range 1e-12 is not scaled to unit range as its docstring says, its structure tensor underflows in
  float32, and 10 mm voxels give no keypoints at all (the same image scaled by 1 gives 80);
* ``frames.UnitBox.around`` floors every side of a cloud pair's box at 1 mm (``clamp_min(1.0)``), so
  ``register_clouds`` without a training box is scale-invariant down to 5 mm clouds but not for a 0.5 mm
  specimen (ten 0.05 mm micro-CT voxels): another unit frame, other displacements;
* ``dense.similarity.ncc_loss`` takes local variances as ``E[x^2] - E[x]^2`` in float32: both images offset by
  1000 (raw MRI values) give a loss of 43 instead of 0.078 (0.072 at an offset of 100), though NCC is
  offset-invariant and float64 gets it right;
* ``dense.similarity.mind_loss`` floors the mean patch variance at ``mind_ssc``'s ``eps`` = 1e-6 intensity^2, an
  absolute unit its docstring does not mention: images of values about 1e-5 get a loss of 1e-5 instead of 0.014.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cyclereg.clouds.knn import knn_indices
from cyclereg.clouds.tps import ThinPlateSpline
from cyclereg.dense.config import PreprocessConfig
from cyclereg.dense.data import preprocess
from cyclereg.dense.similarity import mind_loss, ncc_loss
from cyclereg.frames import UnitBox, fixed_to_moving_voxels, voxel_coordinates, voxel_to_world, world_to_voxel
from cyclereg.keypoints.foerstner import FoerstnerConfig, foerstner_keypoints
from cyclereg.metrics import jacobian_determinant, sdlogj
from cyclereg.pointio import read_points, write_points
from cyclereg.warp import compose, warp, warp_between_grids

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _ulp(x: float) -> float:
    """The float32 spacing at magnitude ``x``."""
    return float(np.spacing(np.float32(abs(x))))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================================= kNN
def _neighbour_distance_excess(query: torch.Tensor, reference: torch.Tensor, k: int, exclude_self: bool) -> float:
    """Largest amount (mm) by which a found neighbour's float64 distance exceeds the true k-th-or-better one
    (the float64 brute force over the same float32 points): 0 when the sets agree (ties allowed)."""
    got = knn_indices(query, reference, k, exclude_self=exclude_self)
    d = torch.cdist(query.double(), reference.double(), compute_mode="donot_use_mm_for_euclid_dist")
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    want = d.topk(k, dim=1, largest=False).values
    return float((d.gather(1, got) - want).max())


@pytest.mark.parametrize("offset", [(-200.0, -150.0, -1200.0), (1e3, 1e3, 1e3), (1e4, -1e4, 3e3)])
def test_knn_of_a_cloud_in_scanner_coordinates_matches_a_float64_brute_force(offset):
    """400 float32 points in a 60 mm cube placed up to 1e4 mm from the origin (CT scanner coordinates): the
    10-NN graph and a query of other points find the true neighbours, each within 2 ulp(coordinate) of the
    true distance (the coordinates are held to ulp, so near ties may swap; nothing worse)."""
    g = _gen()
    off = torch.tensor(offset, dtype=torch.float64)
    ref = (torch.rand(400, 3, generator=g, dtype=torch.float64) * 60 + off).float()
    qry = (torch.rand(100, 3, generator=g, dtype=torch.float64) * 60 + off).float()
    tol = 2 * _ulp(float(off.abs().max()) + 60)
    assert _neighbour_distance_excess(ref, ref, 10, True) <= tol
    assert _neighbour_distance_excess(qry, ref, 10, False) <= tol


def test_knn_of_a_far_cluster_with_one_point_at_the_origin_matches_a_float64_brute_force():
    """A cluster of 300 float32 points in a 30 mm cube 1e4 mm from the origin plus one point at (0, 0, 0) (a
    missing landmark written as zeros): the neighbours within the cluster are as without that point, within
    2 ulp(1e4) = 0.002 mm of the true distances. Got: rows off by up to a few mm."""
    g = _gen(1)
    cluster = torch.rand(300, 3, generator=g, dtype=torch.float64) * 30 + 1e4
    cloud = torch.cat([cluster, torch.zeros(1, 3, dtype=torch.float64)]).float()
    assert _neighbour_distance_excess(cloud[:-1], cloud[:-1], 8, True) <= 2 * _ulp(1e4)  # without it: right
    assert _neighbour_distance_excess(cloud, cloud, 8, True) <= 2 * _ulp(1e4)


# ============================================================================= TPS
@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_tps_reproduces_an_affine_field_far_from_the_origin(offset, lam):
    """An affine displacement ``u(x) = (M - I)(x - o) + t`` at 50 control points in a 300 mm cube ``offset`` mm
    away: the fitted spline (float64) reproduces it at the control points and at other points to 1e-9 mm, with
    or without smoothing (the affine part lies in the null space of the bending energy)."""
    g = _gen(2)
    o = torch.full((3,), offset, dtype=torch.float64)
    M = torch.tensor([[1.01, 0.02, 0.0], [0.0, 0.99, 0.01], [0.03, 0.0, 1.0]], dtype=torch.float64)
    t = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)

    def field(x):
        return (x - o) @ (M - torch.eye(3, dtype=torch.float64)).T + t

    c = torch.rand(50, 3, generator=g, dtype=torch.float64) * 300 + o
    x = torch.rand(20, 3, generator=g, dtype=torch.float64) * 300 + o
    spline = ThinPlateSpline.fit(c, field(c), regularisation=lam)
    torch.testing.assert_close(spline(c), field(c), atol=1e-9, rtol=0)
    torch.testing.assert_close(spline(x), field(x), atol=1e-9, rtol=0)


# ============================================================================= frames
AFFINES = [  # (origin mm, voxel size mm (i, j, k))
    ((1e4, -7e3, 3.3e3), (0.05, 0.05, 0.05)),  # micro-CT far from the origin
    ((1e4, -7e3, 3.3e3), (0.5, 0.5, 5.0)),  # strongly anisotropic
    ((-250.0, -180.0, -1200.0), (0.7, 0.7, 10.0)),  # CT table coordinates, thick slices
]


def _affine(origin, spacing) -> np.ndarray:
    A = np.diag([*spacing, 1.0])
    A[:3, 3] = origin
    return A


@pytest.mark.parametrize("origin, spacing", AFFINES)
def test_voxel_world_round_trip_is_within_the_spacing_of_the_world_coordinates(origin, spacing):
    """float32 voxel points (0-500) -> world -> voxel: the world value is held to ulp(world), so the round
    trip may be off by ulp(world) / spacing voxels per axis (inherent), and by no more than twice that; the
    world points agree with float64 to ulp(world)."""
    A = torch.from_numpy(_affine(origin, spacing))
    v = torch.rand(500, 3, generator=_gen(3)) * 500
    w = voxel_to_world(v, A)
    world_ulp = _ulp(max(abs(o) for o in origin) + 500 * max(spacing))
    assert float((w.double() - voxel_to_world(v.double(), A)).abs().max()) <= world_ulp
    err = (world_to_voxel(w, A) - v).abs().max(0).values
    for axis in range(3):
        assert float(err[axis]) <= 2 * world_ulp / spacing[axis]


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_unit_box_round_trip_far_from_the_origin(offset):
    """``UnitBox`` of a 300 mm box ``offset`` mm away: mm -> unit -> mm of float32 points is off by at most
    2 ulp(offset + 300) (the points themselves are held to 1 ulp), and a displacement round trip (scale only)
    by at most 2 ulp of the displacement."""
    box = UnitBox((offset, -offset, offset), (300.0, 300.0, 300.0))
    p = torch.rand(200, 3, generator=_gen(4)) * 300 + torch.tensor([offset, -offset, offset])
    assert float((box.unit_to_mm(box.mm_to_unit(p)) - p).abs().max()) <= 2 * _ulp(offset + 300)
    d = torch.rand(200, 3, generator=_gen(5)) * 20 - 10
    assert float((box.disp_unit_to_mm(box.disp_mm_to_unit(d)) - d).abs().max()) <= 2 * _ulp(10)


@pytest.mark.parametrize("origin, spacing", AFFINES[1:])
def test_fixed_to_moving_voxels_with_one_affine_is_x_plus_u_at_clinical_spacings(origin, spacing):
    """One affine for both grids: where a fixed voxel lands in the moving grid is ``x + u`` (here 0.3 voxels),
    up to the world round trip's ulp(world) / spacing (inherent to the float32 world intermediate)."""
    A = _affine(origin, spacing)
    shape = (12, 12, 12)
    d = torch.full((1, 3, *shape), 0.3)
    got = fixed_to_moving_voxels(d, A, A)
    want = voxel_coordinates(shape).unsqueeze(0) + 0.3
    world_ulp = _ulp(max(abs(o) for o in origin) + 12 * max(spacing))
    assert float((got - want).abs().max()) <= 2 * world_ulp / min(spacing)


def test_warp_between_grids_with_one_far_micro_ct_affine_equals_warp():
    """``warp_between_grids`` with the same affine for both grids (0.05 mm voxels, origin 1e4 mm away) equals
    ``warp``: the sampling positions are ``x + u`` in voxels (values up to 40, ulp 4e-6), so they should agree
    to 1e-4 voxels, and the warped random image (values in [0, 1], neighbour differences up to 1) to 1e-4.
    Got: positions off by 0.019 voxels (ulp(1e4 mm) / 0.05 mm), intensities by 0.03."""
    A = _affine((1e4, -7e3, 3.3e3), (0.055, 0.045, 0.15))
    shape = (24, 24, 24)
    d = torch.full((1, 3, *shape), 0.3)
    want = voxel_coordinates(shape).unsqueeze(0) + 0.3
    moving = torch.rand(1, 1, *shape, generator=_gen(6))
    assert float((warp_between_grids(moving, A, d, A) - warp(moving, d)).abs().max()) <= 1e-4
    assert float((fixed_to_moving_voxels(d, A, A) - want).abs().max()) <= 1e-4


# ============================================================================= point files
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_point_files_round_trip_far_from_the_origin(tmp_path, offset):
    """float32 points ``offset`` mm from the origin: npy reads back bitwise; CSV (4 decimals, documented)
    within max(half a decimal 5e-5 mm, ulp/2 of the coordinate); l2r voxel indices (4 decimals of a voxel) on
    a 0.5 x 0.5 x 5 mm grid with that origin within 5e-5 voxels x 5 mm plus the world ulp."""
    p = (torch.rand(50, 3, generator=_gen(7), dtype=torch.float64) * 300 + offset).float()
    u = _ulp(offset + 300)
    write_points(tmp_path / "p.npy", p)
    assert torch.equal(read_points(tmp_path / "p.npy"), p)
    write_points(tmp_path / "p.csv", p)
    assert float((read_points(tmp_path / "p.csv").double() - p.double()).abs().max()) <= max(5e-5, u / 2) + 1e-9
    A = _affine((offset, offset, offset), (0.5, 0.5, 5.0))
    write_points(tmp_path / "v.csv", p, fmt="l2r", affine=A)
    back = read_points(tmp_path / "v.csv", affine=A)
    assert float((back.double() - p.double()).abs().max()) <= 5e-5 * 5.0 + 2 * u


# ============================================================================= intensity scales
def _smooth_image(n: int = 24) -> torch.Tensor:
    return F.avg_pool3d(torch.rand(1, 1, n, n, n, generator=_gen(8)), 3, 1, 1)[0, 0]


SPACINGS = [(1.0, 1.0, 1.0), (0.05, 0.05, 0.05), (10.0, 10.0, 10.0), (0.5, 0.5, 5.0)]


def _config(spacing) -> FoerstnerConfig:
    s = min(spacing)  # sigma and NMS radius in voxels of the finest axis, whatever the unit
    return FoerstnerConfig(sigma_mm=s, nms_radius_mm=2 * s)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("scale, shift", [(1e6, 0.0), (1e-6, 0.0), (1e-9, 0.0), (3e4, -1024.0)])
def test_foerstner_keypoints_do_not_depend_on_the_intensity_unit(spacing, scale, shift):
    """The detector scales the image to unit robust range and thresholds relative to a quantile, so
    ``scale * img + shift`` (MRI in any unit, CT up to 3e4 HU) gives the same keypoints as ``img`` (the scaled
    float32 values carry the same relative precision; an added offset that is not itself scaled would
    quantise the image to ulp(offset), which is inherent and not tested)."""
    img = _smooth_image()
    base = foerstner_keypoints(img, spacing, config=_config(spacing))
    got = foerstner_keypoints(img * scale + shift, spacing, config=_config(spacing))
    assert base.voxels.shape[0] > 10
    assert torch.equal(got.voxels, base.voxels)


def test_foerstner_keypoints_of_an_image_of_range_1e_minus_12():
    """A float32 image of values 1e-12 x (0.3-0.7) (all normal floats) on 10 mm voxels: the same keypoints as
    the image itself, as the docstring's "scaled to unit robust range first" implies. Got: none."""
    spacing = (10.0, 10.0, 10.0)
    img = _smooth_image()
    base = foerstner_keypoints(img, spacing, config=_config(spacing))
    got = foerstner_keypoints(img * 1e-12, spacing, config=_config(spacing))
    assert torch.equal(got.voxels, base.voxels)


@pytest.mark.parametrize("scale", [1e6, 1e3, 1e-3, 1e-6])
def test_mri_percentile_normalisation_does_not_depend_on_the_intensity_unit(scale):
    """``preprocess`` in ``mri`` mode maps the 1st and 99th percentiles to 0 and 1: an image in [10, 1010]
    scaled by 1e-6..1e6 gives the same normalised image to float32 rounding (a few ulp of 1)."""
    img = torch.rand(8, 8, 8, generator=_gen(9)) * 1000 + 10
    cfg = PreprocessConfig(mode="mri")
    torch.testing.assert_close(preprocess(img * scale, cfg), preprocess(img, cfg), atol=4e-7, rtol=0)


def test_mri_percentile_normalisation_of_a_map_in_si_units():
    """An MRI-like map of values 1e-11..1e-9 (e.g. a diffusion map in m^2/s): its 99th percentile maps to 1
    as ``PreprocessConfig.mri_percentiles`` says, the same image as the map in [10, 1010]. Got: max 0.099."""
    img = torch.rand(8, 8, 8, generator=_gen(9)) * 1000 + 10
    cfg = PreprocessConfig(mode="mri")
    torch.testing.assert_close(preprocess(img * 1e-12, cfg), preprocess(img, cfg), atol=1e-5, rtol=0)


# ============================================================================= large displacements
@pytest.mark.parametrize("shift", [5.0, 13.0, 1e4])
def test_jacobian_of_a_shift_of_most_of_the_volume_is_one(shift):
    """A constant float32 shift of 5, 13 (most of a 16-voxel grid) or 1e4 voxels: central differences of equal
    values are exactly 0, so J = 1 everywhere, no folding, and the standard deviations of the constant logs 0
    to float64 rounding of their mean (2e-16)."""
    d = torch.full((1, 3, 16, 16, 16), shift)
    assert torch.equal(jacobian_determinant(d), torch.ones(1, 14, 14, 14))
    stats = sdlogj(d)
    assert stats["sdlogj"] <= 1e-15 and stats["std_logj"] <= 1e-15 and stats["folding_fraction"] == 0.0


def test_a_field_that_folds_everywhere():
    """``u_i = -2 i`` (axis 0 mirrored: x -> -x): J = -1 at every voxel, folding fraction 1, Learn2Reg's
    log(J + 3) = log 2 everywhere so SDlogJ 0 (to float64 rounding), and no positive J for ``std_logj`` (NaN)."""
    d = torch.zeros(1, 3, 9, 9, 9)
    d[0, 0] = -2 * torch.arange(9.0)[:, None, None]
    assert torch.equal(jacobian_determinant(d), -torch.ones(1, 7, 7, 7))
    stats = sdlogj(d)
    assert stats["sdlogj"] <= 1e-15 and stats["folding_fraction"] == 1.0 and np.isnan(stats["std_logj"])


@pytest.mark.parametrize("shift", [6.0, 1e4])
def test_compose_of_a_large_shift_and_its_opposite_is_zero(shift):
    """``compose(a, -a)`` of a constant shift, even one that leaves the grid (border padding samples the
    constant field): ``a + (-a) = 0`` exactly."""
    a = torch.full((1, 3, 8, 8, 8), shift)
    assert torch.equal(compose(a, -a), torch.zeros_like(a))


# ============================================================================= cloud registration scale
def _scaled_registration(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The invariance walk's untrained float64 pair (60 points in a 50 mm cube, a 2 mm shift) registered
    as given and with every coordinate multiplied by ``scale``, the second divided by ``scale``."""
    from test_invariance_walk import CFG, _pair

    from cyclereg.clouds.features import build_graph_net
    from cyclereg.clouds.pipeline import register_clouds

    net = build_graph_net(CFG.net, seed=0).eval().double()
    fixed, moving = _pair()
    want = register_clouds(fixed, moving, net, CFG).displacements_mm
    got = register_clouds(fixed * scale, moving * scale, net, CFG).displacements_mm / scale
    return got, want


@pytest.mark.parametrize("scale", [100.0, 0.1])
def test_cloud_registration_without_a_box_scales_with_the_clouds(scale):
    """Without a training box the unit frame is the pair's own bounding box, so the features (normalised per
    cloud) and the optimiser see the same unit-frame clouds at any scale: a pair 100x larger (5 m) or 10x
    smaller (5 mm, a micro-CT specimen) gives the displacements scaled alike, to float64 rounding."""
    got, want = _scaled_registration(scale)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def test_cloud_registration_of_a_half_millimetre_specimen_scales_with_the_clouds():
    """The same pair 100x smaller (0.5 mm across: ten 0.05 mm micro-CT voxels): the displacements scaled by
    1/100, as at 10x smaller. Got: off by 7 mm in the pair's own scale (0.07 mm of a 0.02 mm shift)."""
    got, want = _scaled_registration(0.01)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


@pytest.mark.parametrize("shift", [6.0, 1e4])
def test_inverse_consistency_of_large_shifts(shift):
    """A constant shift ``s`` and ``-s`` are inverse already: the iteration keeps them exactly (border
    padding samples a constant field), and the composition error is 0. ``s`` and 0 meet halfway: one step
    gives ``s/2`` and ``-s/2``, a fixed point of the iteration."""
    from cyclereg.dense.convex import composition_error, inverse_consistency

    s = torch.full((1, 3, 6, 6, 6), shift)
    a, b = inverse_consistency(s, -s, 3)
    assert torch.equal(a, s) and torch.equal(b, -s)
    assert float(composition_error(a, b)) == 0.0
    a, b = inverse_consistency(s, torch.zeros_like(s), 3)
    assert torch.equal(a, s / 2) and torch.equal(b, -s / 2)


@pytest.mark.parametrize("origin, spacing", AFFINES[1:])
def test_warp_between_grids_finds_a_whole_voxel_world_offset_far_from_the_origin(origin, spacing):
    """The moving grid placed 3 voxels further along i than the fixed one (same spacing, origins up to 1e4 mm
    away): the identity warp samples moving voxel i - 3 (border-clamped below 0), up to the float32 world
    round trip's ulp(world) / spacing voxels times the largest neighbour difference of the image (<= 1)."""
    fixed_A = _affine(origin, spacing)
    moving_A = fixed_A.copy()
    moving_A[0, 3] += 3 * spacing[0]
    shape = (10, 6, 6)
    moving = torch.rand(1, 1, *shape, generator=_gen(10))
    got = warp_between_grids(moving, moving_A, torch.zeros(1, 3, *shape), fixed_A)
    want = moving[:, :, (torch.arange(10) - 3).clamp_min(0)]
    world_ulp = _ulp(max(abs(o) for o in origin) + 10 * max(spacing))
    assert float((got - want).abs().max()) <= 4 * world_ulp / min(spacing)


# ============================================================================= voxel sizes
@pytest.mark.parametrize("s", [0.05, 10.0])
def test_foerstner_distinctiveness_scales_with_the_voxel_size(s):
    """The same image on voxels of ``s`` mm with sigma and NMS radius scaled alike: the same keypoints, and
    ``D`` (1/mm^2 of normalised intensity) scaled by ``1 / s^2`` to float32 rounding."""
    img = _smooth_image()
    base = foerstner_keypoints(img, (1.0, 1.0, 1.0), config=_config((1.0, 1.0, 1.0)))
    got = foerstner_keypoints(img, (s, s, s), config=_config((s, s, s)))
    assert torch.equal(got.voxels, base.voxels)
    torch.testing.assert_close(got.scores * s * s, base.scores, rtol=1e-6, atol=0)
    assert got.reference * s * s == pytest.approx(base.reference, rel=1e-6)


@pytest.mark.parametrize("spacing, want", [((0.05, 0.05, 0.05), 0.1), ((0.5, 0.5, 5.0), 10.0),
                                           ((10.0, 10.0, 10.0), 20.0)])
def test_hd95_of_a_cube_shifted_along_k_is_the_shift_in_mm(spacing, want):
    """A 5-voxel cube and the same cube 2 voxels further along k: a quarter of the surface voxels (the
    k = 3 layer) lie 2 voxels from the other surface and none further, so the 95th percentile is 2 voxels
    along k: ``2 * spacing[2]`` mm, for micro-CT, thick-slice and 10 mm voxels alike."""
    from cyclereg.metrics import hd95

    a = torch.zeros(12, 12, 12, dtype=torch.long)
    a[3:8, 3:8, 3:8] = 1
    w = torch.zeros_like(a)
    w[3:8, 3:8, 5:10] = 1
    assert hd95(a, w, spacing) == {1: pytest.approx(want, rel=1e-12)}


# ============================================================================= similarity losses
def _similar_pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(11)
    f = torch.rand(1, 1, 10, 10, 10, generator=g)
    return f, 0.7 * f + 0.3 * torch.rand(1, 1, 10, 10, 10, generator=g)


@pytest.mark.parametrize("scale", [1e-3, 1e3, 3e4])
def test_ncc_loss_with_eps_scaled_as_documented_does_not_depend_on_the_intensity_unit(scale):
    """The docstring: scaling both images by ``s`` and ``eps`` by ``s^4`` leaves the loss unchanged (to float32
    rounding: 1e-5 of a loss of 0.08)."""
    f, w = _similar_pair()
    want = float(ncc_loss(f, w, radius=2))
    assert float(ncc_loss(f * scale, w * scale, radius=2, eps=1e-5 * scale ** 4)) == pytest.approx(want, abs=1e-5)


def test_ncc_loss_does_not_depend_on_an_intensity_offset():
    """NCC (and its ``eps``, added to the product of the variances) is invariant to adding a constant to both
    images: ``f + 1000``, ``w + 1000`` (float32 values held to 6e-5, local variances about 0.08) give the
    loss of ``f``, ``w`` to 1e-4 (float64 gives it to 1e-9). Got: 43.35 (0.072 at an offset of 100)."""
    f, w = _similar_pair()
    want = float(ncc_loss(f, w, radius=2))
    assert float(ncc_loss(f.double() + 1000, w.double() + 1000, radius=2)) == pytest.approx(want, abs=1e-6)
    assert float(ncc_loss(f + 1000, w + 1000, radius=2)) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("scale, shift", [(1e-3, 0.0), (1e3, 0.0), (1e8, 0.0), (3e4, -1024.0), (1.0, 1000.0)])
def test_mind_loss_does_not_depend_on_the_intensity_unit_or_an_offset(scale, shift):
    """MIND-SSC descriptors are ratios of patch distances to local variances (clamped to 1e-3..1e3 of their mean,
    the mean floored at ``eps`` = 1e-6 intensity^2, below these images' mean variance of about 0.1 x scale^2
    down to scale 1e-3), so scaled or offset images give the same loss to float32 rounding."""
    f, w = _similar_pair()
    want = float(mind_loss(f, w))
    assert float(mind_loss(f * scale + shift, w * scale + shift)) == pytest.approx(want, rel=1e-4)


def test_mind_loss_of_images_of_values_1e_minus_5():
    """The same pair scaled by ``s`` = 1e-5 (a map in SI units; preprocess mode 'none' passes it on), with
    ``eps`` scaled by ``s^2``: the loss of the unscaled pair to float32 rounding. ``mind_ssc``'s ``eps`` floors
    the mean patch variance in absolute intensity^2 units, as both docstrings say, so that a flat image gives
    defined descriptors; at the fixed default 1e-6 such a pair (mean variance about 0.1 s^2 = 1e-11) is floored
    and gets a flat, near-zero loss (1.3e-5 instead of 0.0143). Scale invariance at a fixed ``eps``, which this
    walk first expected, is not what MIND with an absolute floor promises; ``eps`` scaled as documented is."""
    f, w = _similar_pair()
    s = 1e-5
    assert float(mind_loss(f * s, w * s, eps=1e-6 * s ** 2)) == pytest.approx(float(mind_loss(f, w)), rel=1e-4)


@pytest.mark.parametrize("origin, spacing", AFFINES)
def test_keypoint_world_coordinates_far_from_the_origin_are_float64_exact(origin, spacing):
    """``detect_keypoints`` on a scan whose affine puts it up to 1e4 mm from the origin (0.05 mm, 0.5 x 0.5 x 5
    mm, 0.7 x 0.7 x 10 mm voxels): the world points are ``origin + index * spacing`` in float64 (no float32
    intermediate: 1e4 mm would hold them only to 1e-3 mm, 0.02 of a 0.05 mm voxel)."""
    from cyclereg.keypoints.api import detect_keypoints
    from cyclereg.volumeio import Volume

    A = _affine(origin, spacing)
    result = detect_keypoints(Volume(_smooth_image(), A), config=_config(spacing), device="cpu")
    assert result.points_mm.dtype == torch.float64 and result.points_mm.shape[0] > 10
    want = result.voxels.double() * torch.tensor(spacing, dtype=torch.float64) + torch.tensor(origin,
                                                                                              dtype=torch.float64)
    torch.testing.assert_close(result.points_mm, want, atol=1e-12 * 1e4, rtol=0)
