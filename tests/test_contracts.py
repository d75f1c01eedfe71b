"""Contracts of the public library functions (package docstring): dtypes follow the inputs (integer
coordinates are computed as floats, never truncated), and bad arguments raise a ValueError that names
the argument instead of a torch error from deep inside. Each case here failed before: a wrong value
(truncated integers, a wrong scale) or an error naming no argument."""

import numpy as np
import pytest
import torch

from cyclereg.clouds.features import build_graph_net
from cyclereg.clouds.knn import knn_indices
from cyclereg.clouds.lbp import LBPConfig, lbp_beliefs
from cyclereg.clouds.pipeline import CloudRegConfig, register_clouds
from cyclereg.clouds.tps import ThinPlateSpline
from cyclereg.dense.config import ConvexConfig
from cyclereg.dense.convex import upsample_field
from cyclereg.dense.similarity import mind_loss, ncc_loss
from cyclereg.frames import (UnitBox, mm_disp_to_voxel, voxel_disp_to_mm, voxel_to_world, world_to_voxel)
from cyclereg.keypoints.foerstner import foerstner_keypoints
from cyclereg.metrics import jacobian_determinant, tre_stats
from cyclereg.warp import compose, warp, warp_between_grids, warp_labels

AFFINE = np.array([[0.7, 0, 0, -100.4], [0, 1.3, 0, 20.6], [0, 0, 2.5, 5.5], [0, 0, 0, 1.0]])


def test_frame_conversions_compute_integer_inputs_as_floats():
    vox = torch.tensor([[1, 2, 3], [0, 4, 7]])
    world = voxel_to_world(vox, AFFINE)
    assert world.dtype == torch.get_default_dtype()
    torch.testing.assert_close(world, torch.tensor([[-99.7, 23.2, 13.0], [-100.4, 25.8, 23.0]]))
    back = world_to_voxel(torch.tensor([[-99, 23, 13]]), AFFINE)  # integer mm
    torch.testing.assert_close(back, torch.tensor([[1.4 / 0.7, 2.4 / 1.3, 7.5 / 2.5]]))
    ones = torch.ones(1, 3, 2, 2, 2, dtype=torch.long)
    torch.testing.assert_close(voxel_disp_to_mm(ones, AFFINE)[0, :, 0, 0, 0], torch.tensor([0.7, 1.3, 2.5]))
    torch.testing.assert_close(mm_disp_to_voxel(ones, AFFINE)[0, :, 0, 0, 0],
                               torch.tensor([1 / 0.7, 1 / 1.3, 1 / 2.5]))
    box = UnitBox((0.4, 0.4, 0.4), (3.0, 3.0, 3.0))
    torch.testing.assert_close(box.mm_to_unit(torch.tensor([[2, 2, 2]])), torch.full((1, 3), 1.6 / 1.5 - 1))
    # floating inputs keep their dtype
    assert voxel_to_world(vox.double(), AFFINE).dtype == torch.float64
    assert box.mm_to_unit(torch.zeros(1, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("bad, message", [(np.diag([1.0, 0.0, 1.0, 1.0]), "affine: singular"),
                                          (np.diag([1.0, np.nan, 1.0, 1.0]), "affine: holds NaN")])
def test_frame_conversions_name_a_bad_affine(bad, message):
    with pytest.raises(ValueError, match=message):
        world_to_voxel(torch.zeros(1, 3), bad)
    with pytest.raises(ValueError, match=message):
        mm_disp_to_voxel(torch.zeros(1, 3, 2, 2, 2), bad)


def test_unit_box_around_names_a_cloud_that_is_not_points():
    with pytest.raises(ValueError, match=r"clouds_mm\[1\]: expected \(\.\.\., 3\)"):
        UnitBox.around(torch.zeros(4, 3), torch.zeros(4, 2))


def test_register_clouds_refuses_integer_points_and_a_network_of_another_dtype():
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(300, 3, generator=g) * 100
    net = build_graph_net(seed=0)
    with pytest.raises(ValueError, match="fixed_mm: torch.int64 coordinates"):
        register_clouds(fixed.long(), fixed.long() + 1, net, CloudRegConfig())
    with pytest.raises(ValueError, match="fixed_mm: torch.float64 .* but the network is torch.float32"):
        register_clouds(fixed.double(), fixed.double() + 1, net, CloudRegConfig())


def test_upsample_field_refuses_a_factor_its_2x_steps_cannot_reach():
    coarse = torch.ones(1, 3, 2, 2, 2)
    for factor in (1, 2, 4):  # a constant field of 1 coarse voxel is `factor` fine voxels
        out = upsample_field(coarse, factor, (2 * factor,) * 3, ConvexConfig())
        torch.testing.assert_close(out, torch.full_like(out, float(factor)))
    for factor in (3, 6, 0, 2.0):
        with pytest.raises(ValueError, match="factor: expected a power of 2"):
            upsample_field(coarse, factor, (6, 6, 6), ConvexConfig())


@pytest.mark.parametrize("errors", [torch.rand(4, 3), torch.zeros(0), torch.tensor([1.0, float("nan")])])
def test_tre_stats_refuses_what_is_not_a_list_of_distances(errors):
    with pytest.raises(ValueError, match="errors_mm"):
        tre_stats(errors)


def test_tre_stats_of_known_distances():
    stats = tre_stats(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert stats == {"mean": 3.0, "std": pytest.approx(2.5 ** 0.5), "p25": 2.0, "p50": 3.0, "p75": 4.0}


def test_tps_names_a_singular_system_and_evaluates_integer_points_as_floats():
    flat = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [2, 1, 0]])  # all in the plane z = 0
    with pytest.raises(ValueError, match="centres: the spline's system is singular for these 5 points"):
        ThinPlateSpline.fit(flat, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="centres, values: hold NaN"):
        ThinPlateSpline.fit(flat + torch.tensor([0, 0, 1.0]) * torch.arange(5.0)[:, None],
                            torch.full((5, 3), float("nan")))
    centres = torch.rand(20, 3, generator=torch.Generator().manual_seed(1)) * 4
    A = torch.tensor([[0.1, 0.2, 0.0], [0.0, -0.3, 0.5], [0.2, 0.0, 0.1]])
    spline = ThinPlateSpline.fit(centres, centres @ A.T + 0.5)
    grid = torch.tensor([[1, 2, 3], [0, 0, 0]])
    out = spline(grid)  # an affine field is reproduced exactly, also at integer points
    assert out.dtype == torch.get_default_dtype()
    torch.testing.assert_close(out, grid.float() @ A.T + 0.5, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lam", [-0.5, float("nan"), float("inf"), "per point"])
def test_tps_refuses_a_negative_or_non_finite_regularisation(lam):
    """lambda smooths (0 interpolates): a negative one would pull the spline away from its points (and can make
    the system singular), NaN/inf poison every value; refused by name, per point as for all points."""
    centres = torch.rand(12, 3, generator=torch.Generator().manual_seed(3))
    if lam == "per point":
        lam = torch.full((12,), 0.5)
        lam[4] = -1.0
    with pytest.raises(ValueError, match="regularisation: expected"):
        ThinPlateSpline.fit(centres, torch.zeros(12, 3), regularisation=lam)
    ThinPlateSpline.fit(centres, torch.zeros(12, 3), regularisation=torch.zeros(12))  # 0 is fine


def test_knn_checks_its_arguments_and_answers_an_empty_query():
    ref = torch.rand(10, 3, generator=torch.Generator().manual_seed(2))
    assert knn_indices(ref[:0], ref, 3).shape == (0, 3)
    assert torch.equal(knn_indices(ref, ref, np.int64(2)), knn_indices(ref, ref, 2))
    with pytest.raises(ValueError, match="k: expected a whole number >= 0, got -1"):
        knn_indices(ref, ref, -1)
    with pytest.raises(ValueError, match="k: expected a whole number >= 0, got 2.0"):
        knn_indices(ref, ref, 2.0)
    with pytest.raises(ValueError, match="query: torch.float64, but reference: torch.float32"):
        knn_indices(ref.double(), ref, 2)
    for query in (ref[:5], torch.cat([ref, ref[:1]])):  # exclusion by index needs the same points
        with pytest.raises(ValueError, match="exclude_self: the query must be the reference itself"):
            knn_indices(query, ref, 2, exclude_self=True)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 1.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -1.0, 1.0),
                                     (1.0, float("nan"), 1.0), "abc"])
def test_foerstner_names_a_bad_spacing(spacing):
    with pytest.raises(ValueError, match="spacing_mm: expected 3 finite voxel sizes > 0 mm"):
        foerstner_keypoints(torch.rand(20, 20, 20), spacing)


def test_foerstner_refuses_nan_intensities():
    img = torch.rand(20, 20, 20)
    img[3, 4, 5] = float("nan")
    with pytest.raises(ValueError, match="img: holds NaN or inf"):
        foerstner_keypoints(img, (1.0, 1.0, 1.0))


@pytest.mark.parametrize("loss", [mind_loss, ncc_loss])
def test_image_losses_refuse_images_of_two_shapes(loss):
    fixed = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"warped: shape \(2, 1, 8, 8, 8\) differs from fixed's"):
        loss(fixed, torch.rand(2, 1, 8, 8, 8))


def test_jacobian_of_an_integer_field_is_not_truncated():
    """u = (x_i / 2, 0, 0) stretches axis i by 1.5 everywhere, whatever the field's dtype."""
    i = torch.arange(6).view(1, 6, 1, 1).expand(1, 6, 5, 5)
    field = torch.cat([i * 1, torch.zeros(2, 6, 5, 5, dtype=torch.long)])[None]  # u_i = x_i: J = 2
    det = jacobian_determinant(field)
    assert det.dtype == torch.get_default_dtype()
    torch.testing.assert_close(det, torch.full_like(det, 2.0))
    half = jacobian_determinant(field.double() / 2)
    torch.testing.assert_close(half, torch.full_like(half, 1.5))


def test_warp_labels_of_a_mask_and_the_checks_of_warp_between_grids_and_compose():
    mask = torch.zeros(1, 1, 6, 6, 6, dtype=torch.bool)
    mask[0, 0, 2:4, 2:4, 2:4] = True
    shift = torch.zeros(1, 3, 6, 6, 6)
    shift[:, 0] = 1.0  # sample one voxel further along axis 0
    out = warp_labels(mask, shift)
    assert out.dtype == torch.bool and torch.equal(out[0, 0, 1:3], mask[0, 0, 2:4])
    assert torch.equal(out, warp_labels(mask.to(torch.uint8), shift).bool())
    with pytest.raises(ValueError, match="moving: batch 3, but disp_vox has 2"):
        warp_between_grids(torch.rand(3, 1, 6, 6, 6), np.eye(4), torch.zeros(2, 3, 6, 6, 6), np.eye(4))
    with pytest.raises(ValueError, match="fixed_affine: expected a 4x4"):
        warp_between_grids(torch.rand(1, 1, 6, 6, 6), np.eye(4), torch.zeros(1, 3, 6, 6, 6), np.eye(3))
    with pytest.raises(ValueError, match=r"disp_b: grid \(4, 4, 4\) differs from disp_a's \(6, 6, 6\)"):
        compose(shift, torch.zeros(1, 3, 4, 4, 4))
    torch.testing.assert_close(compose(shift, shift), 2 * shift)  # two constant shifts add up
    torch.testing.assert_close(warp(torch.rand(1, 1, 6, 6, 6), torch.zeros(1, 3, 6, 6, 6)).shape,
                               torch.Size([1, 1, 6, 6, 6]))


def test_lbp_names_features_that_do_not_fit_their_points():
    g = torch.Generator().manual_seed(3)
    fixed, moving = torch.rand(30, 3, generator=g), torch.rand(40, 3, generator=g)
    ff, fm = torch.rand(30, 8, generator=g), torch.rand(40, 8, generator=g)
    cfg = LBPConfig(num_candidates=8, graph_k=4, iterations=2)
    lbp_beliefs(fixed, moving, ff, fm, cfg)  # fits
    for args, message in (((ff, fm[:39]), r"features\[0\]\[1\]: expected \(40, C\)"),
                          ((ff, fm[:, :4]), r"features\[0\]: 8 fixed against 4 moving channels"),
                          ((ff.double(), fm), r"features\[0\]\[0\]: torch.float64"),):
        with pytest.raises(ValueError, match=message):
            lbp_beliefs(fixed, moving, *args, cfg)
    with pytest.raises(ValueError, match=r"moving: expected \(N, 3\)"):
        lbp_beliefs(fixed, moving[:, :2], ff, fm, cfg)


@pytest.mark.parametrize("field, value", [("iterations", -1), ("num_candidates", 2.5), ("graph_k", 0),
                                          ("softmax_beta", float("nan"))])
def test_lbp_config_refuses_values_it_cannot_use(field, value):
    with pytest.raises(ValueError, match=field):
        LBPConfig(**{field: value})


def test_dense_building_blocks_name_their_bad_arguments():
    from cyclereg.dense.convex import box_smooth, correlate, coupled_convex, resample_disp
    from cyclereg.dense.pipeline import pad_to_multiple
    from cyclereg.frames import centred_affine

    with pytest.raises(ValueError, match=r"x: expected \(B, C, D, H, W\)"):
        box_smooth(torch.zeros(3, 4, 4, 4))
    with pytest.raises(ValueError, match=r"feat_fix: expected \(B, C, D, H, W\)"):
        correlate(torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4), ConvexConfig())
    with pytest.raises(ValueError, match=r"cost: expected \(B, 27, d, h, w\) for radius 1"):
        coupled_convex(torch.zeros(1, 26, 4, 4, 4), ConvexConfig(radius=1))
    for ratio in (0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="ratio: expected a voxel size ratio > 0"):
            resample_disp(torch.zeros(1, 3, 4, 4, 4), (2, 2, 2), ratio)
    with pytest.raises(ValueError, match="multiple: expected a whole number >= 1"):
        pad_to_multiple(torch.zeros(1, 1, 5, 5, 5), 0)
    with pytest.raises(ValueError, match="shape, spacing_mm: expected 3 values each"):
        centred_affine((4, 4, 4), (1.0, 1.0))
    # what they do with good arguments: a constant field resampled 2x finer doubles in voxels
    torch.testing.assert_close(resample_disp(torch.ones(1, 3, 4, 4, 4), (8, 8, 8), 0.5), torch.full((1, 3, 8, 8, 8), 2.0))
    assert pad_to_multiple(torch.zeros(1, 1, 5, 6, 7), 4).shape[2:] == (8, 8, 8)


def test_dense_field_of_a_cloud_registration_names_a_bad_grid_shape():
    g = torch.Generator().manual_seed(4)
    fixed = torch.rand(200, 3, generator=g) * 50
    reg = register_clouds(fixed, fixed + 1.0, None, CloudRegConfig())
    with pytest.raises(ValueError, match=r"shape: expected 3 voxel counts >= 1"):
        reg.dense(np.eye(4), (4, 4))
    assert reg.dense(np.eye(4), (4, 5, 6)).shape == (1, 3, 4, 5, 6)
