"""Python API with inputs of the wrong kind (audited 2026-12-07).

What was audited: the public tensor and file functions (``cyclereg.frames``, ``cyclereg.warp``,
``cyclereg.metrics``, ``cyclereg.pointio``, the cloud path's ``knn``, ``lbp``, ``tps``, ``augment`` and graph
network, the dense path's ``convex``, ``similarity``, ``pipeline`` and ``instance``, and
``keypoints.foerstner``) were fed inputs of the wrong kind: float16 / bfloat16 / integer / bool / complex
tensors, NumPy arrays and Python lists where tensors are expected, ``meta`` tensors, non-contiguous,
channels-last and expanded (stride-0) tensors, zero-size batches, 0-dim tensors, NumPy scalars for counts
and ratios, zero / negative / NaN / inf sizes, spacings, radii and other parameters, a ``str`` against a
``pathlib.Path`` and int32 against int64 ``edge_index`` tensors (the layout and dtype cases of
``test_tensor_layout_walk.py`` and the entry-point cases of ``test_python_api_walk.py`` are not repeated).

The project's rule (kornia style): a wrong input is refused in one line naming the argument and the
problem, or handled and then gives the well-formed input's answer; never a silently wrong answer. The
handled cases no other test covers are pinned first; the mishandled ones follow as strict xfails (each
passes once its bug is mended).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cyclereg.clouds.augment import apply_affine, displacements_back, random_affine, random_relative_affine
from cyclereg.clouds.features import GraphNetConfig, build_graph_net
from cyclereg.clouds.knn import knn_edge_index, knn_indices
from cyclereg.clouds.lbp import LBPConfig, lbp_displacements
from cyclereg.clouds.tps import ThinPlateSpline
from cyclereg.dense.convex import box_smooth, displacement_set, resample_disp, upsample_field
from cyclereg.dense.config import ConvexConfig
from cyclereg.dense.config import DensePipelineConfig, FeatureNetConfig
from cyclereg.dense.network import random_feature_net
from cyclereg.dense.pipeline import pad_to_multiple, register
from cyclereg.dense.similarity import mind_loss, ncc_loss
from cyclereg.errors import InputError
from cyclereg.frames import (UnitBox, centred_affine, grid_to_voxel, half_width_voxels, inside_grid, voxel_to_grid,
                             voxel_to_world, world_map_to_voxel)
from cyclereg.metrics import dice, hd95, jacobian_determinant, spearman, tre_stats
from cyclereg.pointio import points_csv, read_points, write_points
from cyclereg.warp import sample_at_points, warp


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images():
    g = _gen(0)
    return torch.rand(1, 1, 8, 9, 10, generator=g), torch.rand(1, 1, 8, 9, 10, generator=g)


def _lbp_problem():
    g = _gen(1)
    fixed = torch.rand(20, 3, generator=g) * 2 - 1
    moving = fixed + 0.05 * torch.randn(20, 3, generator=g)
    ff = torch.randn(20, 4, generator=g)
    return fixed, moving, ff, ff + 0.1 * torch.randn(20, 4, generator=g)


_DENSE_NET = FeatureNetConfig(channels=(4, 4, 4), strides=(2, 1, 2), out_channels=4, adam_layer=1, adam_channels=4)
_DENSE_CFG = DensePipelineConfig(net=_DENSE_NET, pad_multiple=4, use_adam=False)


# ============================================================================= handled well
def test_box_smooth_and_ncc_give_the_contiguous_answer_for_channels_last_and_expanded_tensors():
    """Channels-last 5-D tensors and stride-0 (``expand``-ed) ones give the answer of their contiguous copies."""
    x = torch.rand(1, 3, 6, 7, 8, generator=_gen(2))
    want = box_smooth(x, 3)
    torch.testing.assert_close(box_smooth(x.to(memory_format=torch.channels_last_3d), 3), want, rtol=0, atol=1e-6)
    plane = x[:, :1]
    assert torch.equal(box_smooth(plane.expand(1, 3, 6, 7, 8), 3), box_smooth(plane.repeat(1, 3, 1, 1, 1), 3))
    a, b = _images()
    torch.testing.assert_close(ncc_loss(a.to(memory_format=torch.channels_last_3d), b), ncc_loss(a, b), rtol=0,
                               atol=1e-6)
    row = a[:, :, :1]
    torch.testing.assert_close(ncc_loss(row.expand(1, 1, 8, 9, 10), b), ncc_loss(row.repeat(1, 1, 8, 1, 1), b),
                               rtol=0, atol=1e-6)


def test_lbp_and_the_graph_network_read_views_like_contiguous_copies():
    """A transposed view of the fixed cloud and a stride-0 moving cloud: LBP and the graph network give the
    contiguous copies' answers exactly."""
    fixed, moving, ff, fm = _lbp_problem()
    want = lbp_displacements(fixed, moving, ff, fm)
    assert torch.equal(lbp_displacements(fixed.t().contiguous().t(), moving, ff, fm), want)
    one = moving[:1]
    assert torch.equal(lbp_displacements(fixed, one.expand(20, 3), ff, fm),
                       lbp_displacements(fixed, one.repeat(20, 1), ff, fm))
    net = build_graph_net(GraphNetConfig(channels=(8,), out_channels=8, k_fixed=4), seed=0)
    assert torch.equal(net(fixed.t().contiguous().t(), 4), net(fixed, 4))


def test_numpy_integer_counts_work_like_python_ints_where_taken():
    """``k`` given as ``np.int64`` gives the Python int's answer (knn, graph network, box filter width)."""
    fixed = _lbp_problem()[0]
    assert torch.equal(knn_indices(fixed, fixed, np.int64(3)), knn_indices(fixed, fixed, 3))
    assert torch.equal(knn_edge_index(fixed, np.int64(3)), knn_edge_index(fixed, 3))
    net = build_graph_net(GraphNetConfig(channels=(8,), out_channels=8, k_fixed=4), seed=0)
    assert torch.equal(net(fixed, np.int64(4)), net(fixed, 4))
    x = torch.rand(1, 3, 6, 7, 8, generator=_gen(3))
    assert torch.equal(box_smooth(x, np.int64(3)), box_smooth(x, 3))


def test_int32_edges_are_refused_by_name_and_int64_edges_give_the_knn_graph_answer():
    """The network's ``edge_index`` is int64 (PyG); an int32 (or float) graph is refused naming it."""
    pts = _lbp_problem()[0]
    net = build_graph_net(GraphNetConfig(channels=(8,), out_channels=8, k_fixed=4), seed=0)
    edges = knn_edge_index(pts, 4)
    assert torch.equal(net(pts, 4, edges), net(pts, 4))
    for bad in (edges.int(), edges.float()):
        with pytest.raises(ValueError, match=r"^edge_index \(2, 80\) \(torch\.(int32|float32)\): expected \(2, E\) int64"):
            net(pts, 4, bad)


@pytest.mark.parametrize("call, name", [
    (lambda t: voxel_to_world(t, np.eye(4)), "points_vox"),
    (lambda t: tre_stats(t), "errors_mm"),
    (lambda t: UnitBox((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).unit_to_mm(t), "points_unit"),
])
def test_a_0_dim_tensor_is_refused_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=f"^{name}: expected "):
        call(torch.tensor(1.0))


def test_point_files_round_trip_alike_for_str_and_path(tmp_path):
    """``write_points`` / ``read_points`` take a ``str`` and a ``pathlib.Path`` alike."""
    pts = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]])
    write_points(str(tmp_path / "s.csv"), pts)
    write_points(tmp_path / "p.csv", pts)
    assert (tmp_path / "s.csv").read_text() == (tmp_path / "p.csv").read_text()
    assert torch.equal(read_points(str(tmp_path / "s.csv")), pts)
    assert torch.equal(read_points(tmp_path / "p.csv"), pts)


def test_warp_of_an_empty_batch_is_an_empty_batch():
    mov = torch.rand(1, 2, 5, 6, 7, generator=_gen(4))
    out = warp(mov, torch.zeros(0, 3, 5, 6, 7))
    assert out.shape == (0, 2, 5, 6, 7)



def test_the_registration_entry_points_refuse_complex_inputs_naming_them():
    """``register_clouds`` and the dense ``register`` refuse complex coordinates / images by name (the helpers
    below them do not: see the complex xfail)."""
    from cyclereg.clouds.pipeline import CloudRegConfig, register_clouds
    f = torch.rand(40, 3, generator=_gen(10)) * 50
    with pytest.raises(ValueError, match="^fixed_mm: torch.complex64 coordinates"):
        register_clouds(f.to(torch.complex64), (f + 1).to(torch.complex64), None, CloudRegConfig())
    a, b = _images()
    with pytest.raises(ValueError, match="^fixed: torch.complex64 values; complex numbers are no"):
        register(a.to(torch.complex64), b.to(torch.complex64), random_feature_net(_DENSE_NET, 0), _DENSE_CFG)

# ============================================================================= bugs found by the walk
@pytest.mark.parametrize("make", [lambda d: random_affine(_gen(1), 10.0, 0.1, 0.1, d),
                                  lambda d: random_relative_affine(_gen(1), 0.1, d)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_random_affine_refuses_a_dtype_that_is_not_floating(make, dtype):
    with pytest.raises((ValueError, TypeError), match="dtype"):
        make(dtype)


@pytest.mark.parametrize("args, name", [((math.nan, 0.1, 0.1), "rotation_deg"), ((10.0, 0.1, math.inf), "translation"),
                                        ((10.0, 1.5, 0.1), "scale"), ((10.0, math.nan, 0.1), "scale")])
def test_random_affine_refuses_non_finite_or_degenerate_ranges_naming_them(args, name):
    with pytest.raises(ValueError, match=name):
        random_affine(_gen(5), *args)


@pytest.mark.parametrize("loss", [ncc_loss, mind_loss])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_similarity_losses_of_half_precision_images_match_float32_or_are_refused(loss, dtype):
    a, b = _images()
    want = loss(a, b)
    try:
        got = loss(a.to(dtype), b.to(dtype))
    except ValueError as err:
        assert str(err).startswith("fixed: ")
        return
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2)


@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16, torch.int64])
def test_displacements_back_of_low_precision_or_integer_displacements(cast):
    A, _ = random_affine(_gen(1), 10.0, 0.1, 0.1, torch.float64)
    disp = torch.tensor([[1.0, -2.0, 3.0], [0.0, 4.0, -1.0]])
    want = displacements_back(disp, A)
    try:
        got = displacements_back(disp.to(cast), A)
    except ValueError as err:
        assert str(err).startswith("disp: ")
        return
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2)


@pytest.mark.parametrize("case", ["sample_at_points", "resample_disp", "warp bool nearest"])
def test_integer_and_bool_fields_are_sampled_as_numbers_or_refused_by_name(case):
    g = _gen(6)
    field = (torch.randn(1, 3, 4, 5, 6, generator=g) * 3).round()
    if case == "sample_at_points":
        pts = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.5, 2.5]])
        want, call, name = sample_at_points(field, pts), lambda: sample_at_points(field.long(), pts), "field"
    elif case == "resample_disp":
        want, call, name = resample_disp(field, (8, 10, 12), 0.5), lambda: resample_disp(field.long(), (8, 10, 12), 0.5), "disp"
    else:
        mask = torch.rand(1, 1, 4, 5, 6, generator=g) > 0.5
        want = warp(mask.to(torch.uint8), field, mode="nearest").bool()
        call, name = lambda: warp(mask, field, mode="nearest"), "moving"
    try:
        got = call()
    except ValueError as err:
        assert str(err).startswith(f"{name}: ")
        return
    torch.testing.assert_close(got.to(want.dtype), want, rtol=0, atol=1e-5)


def test_lbp_names_centres_of_another_dtype():
    fixed, moving, ff, fm = _lbp_problem()
    with pytest.raises(ValueError, match="^centres: "):
        lbp_displacements(fixed, moving, ff, fm, LBPConfig(), centres=fixed.double())


@pytest.mark.parametrize("call, name", [
    (lambda f, m, ff, fm, net: net(f.numpy(), 4), "points"),
    (lambda f, m, ff, fm, net: lbp_displacements(f.numpy(), m, ff, fm), "fixed"),
    (lambda f, m, ff, fm, net: lbp_displacements(f, m, ff, fm, centres=f.numpy()), "centres"),
    (lambda f, m, ff, fm, net: knn_indices(f.numpy(), m.numpy(), 3), "query"),
    (lambda f, m, ff, fm, net: voxel_to_world(f.numpy(), np.eye(4)), "points_vox"),
    (lambda f, m, ff, fm, net: tre_stats(f[:, 0].numpy()), "errors_mm"),
    (lambda f, m, ff, fm, net: ncc_loss(*(t.numpy() for t in _images())), "fixed"),
    (lambda f, m, ff, fm, net: register(*(t.numpy() for t in _images()), random_feature_net(_DENSE_NET, 0), _DENSE_CFG),
     "fixed"),
])
def test_a_numpy_array_for_a_tensor_is_refused_naming_the_argument_and_the_type(call, name):
    fixed, moving, ff, fm = _lbp_problem()
    net = build_graph_net(GraphNetConfig(channels=(8,), out_channels=8, k_fixed=4), seed=0)
    with pytest.raises((ValueError, TypeError), match=f"^{name}: .*(numpy|ndarray)"):
        call(fixed, moving, ff, fm, net)


@pytest.mark.parametrize("call, name", [
    (lambda z: voxel_to_world(z, np.eye(4)), "points_vox"),
    (lambda z: apply_affine(z, torch.eye(3), torch.zeros(3)), "points"),
    (lambda z: knn_indices(z, z, 2), "query"),
    (lambda z: tre_stats(z[:, 0]), "errors_mm"),
    (lambda z: jacobian_determinant(z.reshape(1, 3, 1, 1, 4).expand(1, 3, 3, 3, 4)), "disp_vox"),
    (lambda z: ThinPlateSpline.fit(z, z.real), "centres"),
    (lambda z: warp(z.reshape(1, 1, 1, 3, 4).expand(1, 1, 2, 3, 4), torch.zeros(1, 3, 2, 3, 4)), "moving"),
])
def test_complex_tensors_are_refused_naming_the_argument(call, name):
    g = _gen(7)
    z = torch.complex(torch.rand(4, 3, generator=g) * 2, torch.rand(4, 3, generator=g) + 1)
    z[3] = z[3] + 3  # four points spanning a volume
    z[1, 0] += 2
    z[2, 1] += 2
    with pytest.raises(ValueError, match=f"^{name}: .*complex"):
        call(z)


@pytest.mark.parametrize("shape", [(2, 4), (2, 2), (3,), ()])
def test_write_points_refuses_points_that_are_not_n_by_3(tmp_path, shape):
    pts = torch.ones(shape)
    with pytest.raises(ValueError, match="points_mm"):
        write_points(tmp_path / "p.csv", pts)
    with pytest.raises(ValueError, match="points_mm"):
        points_csv(pts)


@pytest.mark.parametrize("path", ["", "  ", b"p.csv"])
def test_write_points_refuses_an_empty_or_non_text_path_naming_it(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "  " is written as a file of that name in the current folder
    with pytest.raises(InputError, match="path"):
        write_points(path, torch.ones(2, 3))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("spacing", [(1.0, 0.0, 1.0), (1.0, -1.0, 1.0), (1.0, math.nan, 1.0), (1.0, math.inf, 1.0)])
def test_read_points_refuses_a_spacing_that_is_no_voxel_size_naming_it(tmp_path, spacing):
    (tmp_path / "v.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="spacing_mm"):
        read_points(tmp_path / "v.csv", spacing_mm=spacing)


@pytest.mark.parametrize("call, name", [
    (lambda: centred_affine((4, 5, 6), (1.0, 0.0, 1.0)), "spacing_mm"),
    (lambda: centred_affine((4, 5, 6), (1.0, math.nan, 1.0)), "spacing_mm"),
    (lambda: half_width_voxels(3.0, (1.0, 0.0, 1.0)), "spacing_mm"),
    (lambda: half_width_voxels(3.0, (1.0, math.nan, 1.0)), "spacing_mm"),
    (lambda: half_width_voxels(-3.0, (1.0, 1.0, 1.0)), "radius_mm"),
    (lambda: voxel_to_grid(torch.ones(2, 3), (0, 6, 7)), "shape"),
    (lambda: voxel_to_grid(torch.ones(2, 3), (-3, 6, 7)), "shape"),
    (lambda: grid_to_voxel(torch.ones(2, 3), (5.5, 6, 7)), "shape"),
    (lambda: inside_grid(torch.ones(2, 3), (5.5, 6, 7)), "shape"),
])
def test_frame_helpers_refuse_sizes_that_are_no_sizes_naming_them(call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call()


@pytest.mark.parametrize("call, name", [
    (lambda a, b: ncc_loss(a, a, radius=0), "radius"),
    (lambda a, b: ncc_loss(a, b, radius=-1), "radius"),
    (lambda a, b: ncc_loss(a, b, eps=-1.0), "eps"),
    (lambda a, b: ncc_loss(a, b, eps=math.nan), "eps"),
    (lambda a, b: mind_loss(a, b, dilation=0), "dilation"),
    (lambda a, b: mind_loss(a, b, dilation=-2), "dilation"),
    (lambda a, b: mind_loss(a, b, radius=-1), "radius"),
])
def test_similarity_losses_refuse_windows_that_are_no_windows(call, name):
    a, b = _images()
    with pytest.raises(ValueError, match=f"^{name}"):
        call(a, b)


@pytest.mark.parametrize("call, name", [
    (lambda x: box_smooth(x, -3), "kernel"),
    (lambda x: box_smooth(x, 3.0), "kernel"),
    (lambda x: box_smooth(x, 3, -1), "passes"),
    (lambda x: displacement_set(1.5), "radius"),
    (lambda x: displacement_set(-1), "radius"),
])
def test_dense_filter_parameters_are_whole_numbers_or_refused_by_name(call, name):
    x = torch.rand(1, 3, 6, 7, 8, generator=_gen(3))
    with pytest.raises(ValueError, match=name):
        call(x)


@pytest.mark.parametrize("case", ["upsample_field", "resample_disp", "pad_to_multiple"])
def test_numpy_scalars_work_like_python_numbers_or_are_told_the_way_out(case):
    d = torch.randn(1, 3, 4, 5, 6, generator=_gen(8))
    if case == "upsample_field":
        want, call = upsample_field(d, 2, (8, 10, 12), ConvexConfig()), lambda: upsample_field(d, np.int64(2), (8, 10, 12), ConvexConfig())
    elif case == "resample_disp":
        want, call = resample_disp(d, (4, 5, 6), 1.0), lambda: resample_disp(d, (4, 5, 6), np.float32(1.0))
    else:
        want, call = pad_to_multiple(d, 4), lambda: pad_to_multiple(d, np.int64(4))
    try:
        got = call()
    except ValueError as err:
        assert "Python" in str(err)  # errors._int_hint: "(a Python int: give int(value) ...)"
        return
    assert torch.equal(got, want)


def test_spearman_of_a_sample_with_nan_is_nan_or_refused():
    a, b = torch.tensor([1.0, math.nan, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    try:
        got = spearman(a, b)
    except ValueError as err:
        assert str(err).startswith("a")
        return
    assert math.isnan(got)


def test_tps_refuses_a_bool_regularisation():
    c = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="^regularisation"):
        ThinPlateSpline.fit(c, c, regularisation=True)


@pytest.mark.parametrize("margin", [math.nan, -0.6])
def test_unit_box_around_names_a_bad_margin(margin):
    with pytest.raises(ValueError, match="^margin"):
        UnitBox.around(torch.rand(5, 3, generator=_gen(9)), margin=margin)


def test_world_map_to_voxel_names_a_singular_affine():
    with pytest.raises(ValueError, match="^affine: singular"):
        world_map_to_voxel(torch.eye(3), torch.zeros(3), np.zeros((4, 4)))


@pytest.mark.parametrize("metric", [dice, hd95])
@pytest.mark.parametrize("label", [1.5, True])
def test_label_metrics_refuse_labels_that_are_no_whole_numbers(metric, label):
    a = torch.zeros(6, 6, 6, dtype=torch.int64)
    b = torch.zeros(6, 6, 6, dtype=torch.int64)
    a[1:4, 1:4, 1:4] = 1
    b[2:5, 1:4, 1:4] = 1
    with pytest.raises(ValueError, match="labels"):
        metric(a, b, labels=[label])


def _ct_with_a_body():
    ct = np.full((20, 20, 20), -1000.0, dtype=np.float32)
    ct[3:17, 3:17, 3:17] = 40.0
    return ct


@pytest.mark.parametrize("args, name", [
    (lambda: (_ct_with_a_body(), np.zeros((4, 4))), "affine"),
    (lambda: (_ct_with_a_body(), np.eye(4) * np.nan), "affine"),
    (lambda: (_ct_with_a_body()[0], np.eye(4)), "ct_hu"),
])
def test_lung_mask_names_a_bad_affine_or_ct(args, name):
    from cyclereg.keypoints.lungmask import lung_mask
    with pytest.raises(ValueError, match=f"^{name}"):
        lung_mask(*args())


def test_dense_register_of_an_empty_batch_is_empty_or_refused_by_name():
    f, m = _images()
    try:
        out = register(f[:0], m[:0], random_feature_net(_DENSE_NET, 0), _DENSE_CFG)
    except ValueError as err:
        assert str(err).startswith("fixed: ")
        return
    assert out.shape == (0, 3, 8, 9, 10)
