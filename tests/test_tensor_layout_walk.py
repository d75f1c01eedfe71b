"""Tensor layout, dtype and device walk over the public tensor functions (audited 2026-12-07).

What was audited: the functions and classes a user calls with tensors (``cyclereg.warp``,
``cyclereg.frames``, ``cyclereg.metrics``; the cloud path's ``knn``, ``graphs``, ``features``, ``lbp``
(with the C kernels of :mod:`cyclereg.clouds.native`), ``tps``, ``augment``, ``pipeline``; the dense
path's ``similarity``, ``convex``, ``instance`` (with the C kernel of :mod:`cyclereg.dense.native`),
``network``, ``pipeline``; ``keypoints.foerstner`` and ``keypoints.lungmask``) were fed non-contiguous
views (transposes, slices with a step, flips), ``expand()``-ed tensors, tensors with a storage offset,
channels-last 5-D tensors, float64 / float16 / bfloat16 / integer / bool tensors, mixed dtypes between
two arguments, ``requires_grad`` inputs, calls inside ``torch.inference_mode()``, NumPy arrays and
``meta`` tensors. Every C-kernel call was compared with the same call on contiguous float32 copies
or with the torch path it replaces.

The project's rule: device and dtype follow the inputs; a layout or dtype is either handled correctly
or refused in one line naming the argument, never answered silently wrong. The handled cases that no
other test covers are pinned first; the cases the code mishandles follow at the end as strict xfails
(each passes once its bug is mended).
"""

from __future__ import annotations

import pytest
import torch

from conftest import require_kernel
from cyclereg.clouds import lbp
from cyclereg.clouds import native as cloud_native
from cyclereg.clouds.augment import apply_affine, random_affine
from cyclereg.clouds.features import GraphNetConfig, build_graph_net
from cyclereg.clouds.knn import knn_indices, symmetric_edge_index
from cyclereg.clouds.pipeline import CloudRegConfig, register_clouds
from cyclereg.dense import instance
from cyclereg.dense import native as dense_native
from cyclereg.dense.config import AdamConfig, DensePipelineConfig, FeatureNetConfig
from cyclereg.dense.network import random_feature_net
from cyclereg.dense.pipeline import register
from cyclereg.dense.similarity import ncc_loss
from cyclereg.frames import voxel_to_world, world_to_voxel
from cyclereg.keypoints.foerstner import foerstner_keypoints
from cyclereg.metrics import dice, hd95, jacobian_determinant
from cyclereg.warp import warp


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _with_offset(t: torch.Tensor, pad: int = 7) -> torch.Tensor:
    """``t``'s values in a view whose storage starts ``pad`` elements in (storage_offset > 0)."""
    flat = torch.zeros(pad + t.numel(), dtype=t.dtype)
    flat[pad:] = t.reshape(-1)
    return flat[pad:].view(t.shape)


# ----------------------------------------------------------------------------- C kernel: LBP arg-min search
def _search_problem():
    g = _gen(0)
    e, ks, kd = 30, 16, 12
    return (torch.rand(e, ks, generator=g), torch.randn(e, ks, 3, generator=g) * 0.1,
            torch.randn(e, kd, 3, generator=g) * 0.1)


LAYOUTS_2D_3D = {
    "transposed": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
    "storage offset": _with_offset,
    "stepped slice": lambda t: torch.repeat_interleave(t, 2, dim=0)[::2],
    "expanded first row": lambda t: t[:1].expand(*t.shape),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS_2D_3D))
def test_min_convolution_c_search_reads_any_layout_like_contiguous_copies(layout):
    """The C arg-min search (:func:`cyclereg.clouds.native.search`, float32 on CPU) is handed
    ``.contiguous()`` copies: beliefs and candidates given as transposes, offset views, stepped slices or
    expanded rows give bitwise the messages of the same call on contiguous copies."""
    require_kernel(cloud_native)
    b, cs, cd = (LAYOUTS_2D_3D[layout](t) for t in _search_problem())
    assert cloud_native.usable(b)
    got = lbp.min_convolution(b, cs, cd, 10.0)
    want = lbp.min_convolution(b.contiguous(), cs.contiguous(), cd.contiguous(), 10.0)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_min_convolution_off_float32_takes_the_torch_path_in_the_inputs_dtype(dtype):
    """Other float dtypes never reach the float32 C search: the messages come back in the inputs' dtype
    and agree with the float32 ones to the dtype's rounding."""
    b, cs, cd = _search_problem()
    want = lbp.min_convolution(b, cs, cd, 10.0)
    got = lbp.min_convolution(b.to(dtype), cs.to(dtype), cd.to(dtype), 10.0)
    assert got.dtype == dtype
    tol = {torch.float64: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got.float(), want, rtol=0, atol=tol)


def _graph_problem(n=40, k=12):
    g = _gen(1)
    edge_index, reverse = symmetric_edge_index(torch.rand(n, 3, generator=g), 4)
    return torch.rand(n, k, generator=g), torch.randn(n, k, 3, generator=g) * 0.1, edge_index, reverse


def test_fused_min_sum_reads_views_and_int32_graphs_like_the_torch_loop():
    """The fused C sweeps (:func:`cyclereg.clouds.native.min_sum`) given a transposed view of the unary
    costs, a permuted view of the candidates and int32, non-contiguous edge tensors: bitwise the torch
    loop's beliefs, and its gradient to the unary costs to float rounding."""
    require_kernel(cloud_native)
    unary, cand, edge_index, reverse = _graph_problem()
    w = torch.randn(unary.shape, generator=_gen(2))
    cand_view = cand.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    edges_view = edge_index.t().contiguous().t().to(torch.int32)
    assert cloud_native.sweeps_usable(unary, cand_view)
    results = []
    for fused, c, e, r in ((True, cand_view, edges_view, reverse.to(torch.int32)), (False, cand, edge_index, reverse)):
        base = unary.t().contiguous().requires_grad_(True)
        belief = lbp.min_sum(base.t(), c, e, r, 3.0, 4, fused=fused)
        (grad,) = torch.autograd.grad((belief * w).sum(), base)
        results.append((belief.detach(), grad))
    (b_c, g_c), (b_t, g_t) = results
    assert torch.equal(b_c, b_t)
    torch.testing.assert_close(g_c, g_t, rtol=0, atol=1e-4 * float(g_t.abs().max()))


# ----------------------------------------------------------------------------- C kernel: Adam's data term
def _feature_pair():
    g = _gen(0)
    fix, mov = torch.randn(2, 1, 4, 5, 6, 7, generator=g)
    disp = torch.randn(1, 3, 5, 6, 7, generator=g) * 2.0
    return fix, mov, disp


LAYOUTS_5D = {
    "channels_last_3d": lambda t: t.contiguous(memory_format=torch.channels_last_3d),
    "transposed": lambda t: t.transpose(2, 4).contiguous().transpose(2, 4),
    "storage offset": _with_offset,
    "flipped": lambda t: t.flip(2).contiguous().flip(2),
    "stepped slice": lambda t: torch.repeat_interleave(t, 2, dim=2)[:, :, ::2],
    "expanded plane": lambda t: t[:, :, :1].expand(*t.shape),
}


def _value_and_grad(term, disp):
    d = disp.detach().requires_grad_(True)
    value = term(d)
    (grad,) = torch.autograd.grad(value, d)
    return value.detach(), grad


@pytest.mark.parametrize("layout", sorted(LAYOUTS_5D))
@pytest.mark.parametrize("which", ["features", "field"])
def test_warped_mse_c_kernel_reads_any_layout_like_the_torch_path(layout, which):
    """:class:`cyclereg.dense.instance.WarpedMSE` on its C path (float32 CPU features without gradient),
    with the features or the field given as channels-last, transposed, offset, flipped, stepped or
    expanded views: value and field gradient equal the torch path's on contiguous copies (to float32
    rounding of sums in another order)."""
    require_kernel(dense_native)
    fix, mov, disp = _feature_pair()
    if which == "features":
        fix, mov = LAYOUTS_5D[layout](fix), LAYOUTS_5D[layout](mov)
    else:
        disp = LAYOUTS_5D[layout](disp)
    term = instance.WarpedMSE(fix, mov)
    assert term.native
    got = _value_and_grad(term, disp)
    fix_c, mov_c = fix.contiguous(), mov.contiguous()
    want = _value_and_grad(lambda d: instance.warped_mse_torch(fix_c, mov_c, d), disp.contiguous())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize("cast", ["field", "features", "both"])
def test_warped_mse_off_float32_takes_the_torch_path(cast):
    """A float64 field or float64 features never reach the float32 kernel: the torch path answers, with
    a float64 gradient for a float64 field (the value follows the features: ``warp`` answers in the moving
    image's dtype), equal to the float32 answer to float32 rounding."""
    fix, mov, disp = _feature_pair()
    want = _value_and_grad(lambda d: instance.warped_mse_torch(fix, mov, d), disp)
    if cast in ("features", "both"):
        fix, mov = fix.double(), mov.double()
    if cast in ("field", "both"):
        disp = disp.double()
    value, grad = _value_and_grad(instance.WarpedMSE(fix, mov), disp)
    assert value.dtype == mov.dtype and grad.dtype == disp.dtype
    torch.testing.assert_close(value.double(), want[0].double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), want[1].double(), rtol=0, atol=1e-5 * float(want[1].abs().max()))


# ----------------------------------------------------------------------------- warp / frames / metrics
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "transposed"])
def test_warp_of_a_ramp_by_a_constant_shift_any_layout(dtype, layout):
    """Warping the ramp ``m(i, j, k) = i + 10 j + 100 k`` by the constant field ``(0.5, 1, -1)`` voxels
    samples ``m`` at ``x + u``: ``+0.5 + 10 - 100`` in the interior (border clamped), whatever the memory
    layout of image and field; the answer comes back in the image's dtype."""
    i, j, k = torch.meshgrid(*(torch.arange(n, dtype=dtype) for n in (5, 6, 7)), indexing="ij")
    image = (i + 10 * j + 100 * k)[None, None]
    field = torch.tensor([0.5, 1.0, -1.0], dtype=dtype).view(1, 3, 1, 1, 1).expand(1, 3, 5, 6, 7)
    if layout == "channels_last_3d":
        image, field = (t.contiguous(memory_format=torch.channels_last_3d) for t in (image, field))
    elif layout == "transposed":
        image, field = (t.transpose(2, 4).contiguous().transpose(2, 4) for t in (image, field))
    out = warp(image, field)
    assert out.dtype == dtype
    torch.testing.assert_close(out[0, 0, :-1, :-1, 1:], image[0, 0, :-1, :-1, 1:] + 0.5 + 10 - 100,
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype, want", [(torch.float64, torch.float64), (torch.float16, torch.float16),
                                         (torch.int64, torch.float32), (torch.int32, torch.float32)])
def test_voxel_world_round_trip_follows_the_dtype_and_promotes_integers(dtype, want):
    """Voxel indices ``(..., 3)`` of any float dtype stay in it through ``voxel_to_world`` and back;
    integer indices are computed in torch's default float dtype (package docstring), on an oblique
    affine and with an extra batch axis."""
    affine = torch.tensor([[0, 0, 1.5, 10], [0, 2.0, 0, -5], [2.5, 0, 0, 3], [0, 0, 0, 1]], dtype=torch.float64)
    vox = torch.tensor([[[1, 2, 3], [4, 0, 2]]]).to(dtype)  # (1, 2, 3)
    mm = voxel_to_world(vox, affine)
    assert mm.dtype == want and mm.shape == (1, 2, 3)
    torch.testing.assert_close(mm[0, 0].double(), torch.tensor([14.5, -1.0, 5.5], dtype=torch.float64),
                               rtol=0, atol=1e-2)
    back = world_to_voxel(mm, affine)
    assert back.dtype == want
    torch.testing.assert_close(back.double(), vox.double(), rtol=0, atol=1e-2)


@pytest.mark.parametrize("make", [lambda u: u.float(), lambda u: u, lambda u: u.half(),
                                  lambda u: u.contiguous(memory_format=torch.channels_last_3d),
                                  lambda u: u.round().long(), lambda u: u.expand(2, -1, -1, -1, -1)],
                         ids=["float32", "float64", "float16", "channels_last", "int64", "expanded batch"])
def test_jacobian_of_a_linear_field_any_dtype_and_layout(make):
    """``u = (0.5 i, 0, -0.25 k)`` has ``J = 1.5 * 0.75`` everywhere (``u = (2 i, 0, 0)`` as int64: ``J = 3``);
    the determinant comes back in the input's dtype (integers: the default float dtype)."""
    i, _, k = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (5, 6, 7)), indexing="ij")
    u = torch.stack([0.5 * i, torch.zeros_like(i), -0.25 * k])[None]
    field = make(u if make(u).dtype.is_floating_point else torch.stack([2 * i, 0 * i, 0 * i])[None])
    J = jacobian_determinant(field)
    assert J.dtype == (field.dtype if field.dtype.is_floating_point else torch.get_default_dtype())
    assert J.shape == (field.shape[0], 3, 4, 5)
    expected = 3.0 if not field.dtype.is_floating_point else 1.5 * 0.75
    torch.testing.assert_close(J.double(), torch.full(J.shape, expected, dtype=torch.float64), rtol=0, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.float32, torch.float16, torch.bfloat16])
def test_dice_of_known_overlap_any_label_dtype_and_layout(dtype):
    """Two 4x4x4 label maps (label 1: 8 voxels each, 4 shared) given in any label dtype and as
    transposed views: Dice 2*4/16 = 0.5."""
    a = torch.zeros(4, 4, 4, dtype=torch.int64)
    b = torch.zeros(4, 4, 4, dtype=torch.int64)
    a[:2, :2, :2] = 1
    b[1:3, :2, :2] = 1
    assert dice(a.to(dtype).transpose(0, 2), b.to(dtype).transpose(0, 2)) == {1: 0.5}


# ----------------------------------------------------------------------------- mixed dtypes are refused by name
def test_mixed_dtypes_are_refused_naming_the_argument():
    """float32 against float64 between two arguments: one-line ValueErrors naming them (kNN search,
    LBP features, cloud registration against a float32 network)."""
    g = _gen(0)
    q, r = torch.rand(10, 3, generator=g), torch.rand(12, 3, generator=g)
    with pytest.raises(ValueError, match="query: torch.float32, but reference: torch.float64"):
        knn_indices(q, r.double(), 3)
    with pytest.raises(ValueError, match=r"features\[0\]\[0\]: torch.float64"):
        lbp.lbp_displacements(q, r, torch.rand(10, 4, dtype=torch.float64), torch.rand(12, 4), lbp.LBPConfig(8, 4))
    net = build_graph_net(GraphNetConfig(channels=(8,), out_channels=8, k_fixed=4), seed=0)
    with pytest.raises(ValueError, match="fixed_mm: torch.float64 on cpu, but the network is torch.float32"):
        register_clouds(q.double() * 50, r.double() * 50, net, CloudRegConfig())


def test_cloud_registration_is_inference_only_for_views_grad_inputs_and_inference_mode():
    """``register_clouds`` of a pure translation given as strided row views, as points with
    ``requires_grad`` and inside ``torch.inference_mode()``: the same displacements each time, with no
    autograd graph attached."""
    g = _gen(0)
    fixed = torch.rand(40, 3, generator=g) * 50
    moving = fixed + torch.tensor([1.0, 2.0, 0.5])
    cfg = CloudRegConfig(net=GraphNetConfig(channels=(8, 8), out_channels=8, k_fixed=5),
                         lbp=lbp.LBPConfig(num_candidates=8, graph_k=4, iterations=2))
    net = build_graph_net(cfg.net, seed=0).eval()
    want = register_clouds(fixed, moving, net, cfg).displacements_mm
    rows = torch.zeros(120, 3)
    rows[::3] = fixed
    for f in (rows[::3], fixed.t().contiguous().t(), fixed.clone().requires_grad_(True)):
        got = register_clouds(f, moving, net, cfg).displacements_mm
        assert not got.requires_grad and torch.equal(got, want)
    with torch.inference_mode():
        assert torch.equal(register_clouds(fixed, moving, net, cfg).displacements_mm, want)
    assert not register_clouds(fixed.clone().requires_grad_(True), moving, net, cfg).fixed_mm.requires_grad


# ============================================================================= bugs found by the walk
def test_min_convolution_with_a_float64_src_ax2_is_right_or_refused():
    """``src_ax2`` (the caller's :func:`cyclereg.clouds.native.source_term`) given in float64 while the
    beliefs and candidates are float32: the messages must equal those with the float32 term (or the
    call must be refused naming ``src_ax2``); the C kernel reads the float64 bytes as float32 and the
    messages come out off by O(1)."""
    require_kernel(cloud_native)
    b, cs, cd = _search_problem()
    ax2 = cloud_native.source_term(cs, 10.0)
    want = lbp.min_convolution(b, cs, cd, 10.0, src_ax2=ax2)
    try:
        got = lbp.min_convolution(b, cs, cd, 10.0, src_ax2=ax2.double())
    except ValueError as err:
        assert "src_ax2" in str(err)
        return
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shrink", ["labels", "rows"])
def test_fused_min_sum_refuses_candidates_that_do_not_fit_the_unary_costs(shrink):
    """``cand`` with one label or one node fewer than ``unary``: the torch loop (``fused=False``) raises;
    the fused C sweeps must refuse it too (ValueError naming ``cand``) instead of reading memory past
    the tensor (beliefs with NaN or different values on every call)."""
    require_kernel(cloud_native)
    unary, cand, edge_index, reverse = _graph_problem()
    cand = (cand[:, :-1] if shrink == "labels" else cand[:-1]).contiguous()
    with pytest.raises(ValueError, match="cand"):
        lbp.min_sum(unary, cand, edge_index, reverse, 3.0, 4)


def test_apply_affine_of_integer_points_is_computed_in_floating_point():
    """Integer coordinates are computed in torch's default float dtype (package docstring), never in
    integers: ``apply_affine`` of int64 points must equal it on the same points as floats (or refuse them
    naming ``points``); it turns a 10-degree rotation with scale ~1 into an integer matrix."""
    A, t = random_affine(_gen(3), 10.0, 0.1, 0.1, torch.float64)
    pts = torch.tensor([[1, 2, 3], [10, -4, 7]])
    try:
        got = apply_affine(pts, A, t)
    except ValueError as err:
        assert "points" in str(err)
        return
    torch.testing.assert_close(got.double(), apply_affine(pts.double(), A, t), rtol=0, atol=1e-5)


def test_knn_of_integer_points_is_searched_in_float_or_refused_by_name():
    """Integer voxel-index clouds: the package computes integer coordinates in the default float dtype;
    ``knn_indices`` must give the float search's indices or a ValueError naming ``query``."""
    g = _gen(0)
    q, r = (torch.rand(20, 3, generator=g) * 100).long(), (torch.rand(30, 3, generator=g) * 100).long()
    try:
        got = knn_indices(q, r, 4)
    except ValueError as err:
        assert "query" in str(err)
        return
    dist = torch.cdist(q.double(), r.double())  # integer points tie often: compare the distances found
    assert torch.equal(dist.gather(1, got), dist.gather(1, knn_indices(q.double(), r.double(), 4)))


def test_ncc_of_integer_images_equals_ncc_of_the_same_images_as_floats():
    """``ncc_loss`` of int64 images (e.g. HU values) must equal it on the same images as float32 (or
    refuse them naming ``fixed``); box_mean's integer average pooling floors every local mean and the
    loss comes out about 0.05 off."""
    g = _gen(0)
    a, b = ((torch.rand(1, 1, 8, 9, 10, generator=g) * 100).long() for _ in range(2))
    try:
        got = ncc_loss(a, b)
    except ValueError as err:
        assert "fixed" in str(err)
        return
    torch.testing.assert_close(got.float(), ncc_loss(a.float(), b.float()), rtol=0, atol=1e-5)


_ADAM_NET = FeatureNetConfig(channels=(4, 4, 4), strides=(2, 1, 2), out_channels=4, adam_layer=1, adam_channels=4)
_ADAM_CFG = DensePipelineConfig(net=_ADAM_NET, pad_multiple=4, adam=AdamConfig(iterations=3))


def test_adam_refine_in_float16_gives_a_finite_field():
    """Adam instance optimisation of float16 features and field: a finite float16 field close to the
    float32 one (or a ValueError naming the argument); after one iteration every voxel is NaN, and a dense
    ``register`` of float16 images with ``use_adam`` returns an all-NaN field."""
    g = _gen(0)
    ff, fm = torch.randn(2, 1, 4, 6, 7, 7, generator=g)
    d0 = torch.rand(1, 3, 12, 13, 14, generator=g) * 0.5 + 0.2  # off the voxel centres (no kink in the data term)
    want = instance.adam_refine(ff, fm, d0, 2, _ADAM_CFG.adam)
    try:
        got = instance.adam_refine(ff.half(), fm.half(), d0.half(), 2, _ADAM_CFG.adam)
    except ValueError as err:
        assert "feat" in str(err) or "disp" in str(err)
        return
    assert got.dtype == torch.float16 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0.25)


def test_dense_register_runs_inside_inference_mode():
    """:func:`cyclereg.dense.pipeline.register` is inference-only (no gradients out); under
    ``torch.inference_mode()`` it must give the same field as outside (its Adam step enables grad
    internally on inference tensors and crashes)."""
    g = _gen(0)
    f = torch.rand(1, 1, 12, 13, 14, generator=g)
    m = torch.roll(f, 1, 2)
    net = random_feature_net(_ADAM_NET, 0)
    want = register(f, m, net, _ADAM_CFG)
    with torch.inference_mode():
        got = register(f, m, net, _ADAM_CFG)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_hd95_of_bfloat16_label_maps_equals_hd95_of_integer_maps():
    """Whole-number float label maps are label maps (``check_label_maps``); ``dice`` scores bfloat16 ones,
    ``hd95`` must too (the same distances as for the int64 maps)."""
    a = torch.zeros(6, 6, 6, dtype=torch.int64)
    b = torch.zeros(6, 6, 6, dtype=torch.int64)
    a[1:4, 1:4, 1:4] = 1
    b[2:5, 1:4, 1:4] = 1
    assert hd95(a.bfloat16(), b.bfloat16()) == hd95(a, b)


def test_foerstner_on_an_image_that_requires_grad_finds_the_same_keypoints():
    """The detector is inference-only: an image tensor with ``requires_grad=True`` (e.g. a network's
    output) must give the keypoints of its detached values."""
    i, j, k = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (20, 22, 24)), indexing="ij")
    img = sum(100 * torch.exp(-((i - a) ** 2 + (j - b) ** 2 + (k - c) ** 2) / 4)
              for a, b, c in ((7, 8, 9), (13, 14, 15)))
    img = img + torch.rand(img.shape, generator=_gen(0))
    want = foerstner_keypoints(img, (1.0, 1.0, 1.0))
    got = foerstner_keypoints(img.clone().requires_grad_(True), (1.0, 1.0, 1.0))
    assert torch.equal(got.voxels, want.voxels)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("damage, name", [
    (lambda u, c, e, r: (u, c, e.clone().index_fill_(1, torch.tensor([3]), 40), r), "edge_index"),
    (lambda u, c, e, r: (u, c, e.clone().index_fill_(1, torch.tensor([3]), -1), r), "edge_index"),
    (lambda u, c, e, r: (u, c, e, r.clone().index_fill_(0, torch.tensor([5]), r.numel())), "reverse"),
    (lambda u, c, e, r: (u, c, e, r[:-1]), "reverse"),
    (lambda u, c, e, r: (u, c, e.float(), r), "edge_index"),
    (lambda u, c, e, r: (u[0], c, e, r), "unary"),
])
def test_min_sum_refuses_a_graph_that_indexes_past_its_tensors(fused, damage, name):
    """A node index outside ``[0, N)`` (40 nodes: 40 or -1), an edge index outside ``[0, E)``, a ``reverse``
    one short, float edges or 1-D unary costs: refused naming the argument before any sweep, on the fused C
    path (which would read and write past its buffers) and on the torch loop alike."""
    unary, cand, edge_index, reverse = damage(*_graph_problem())
    with pytest.raises(ValueError, match=f"^{name}: "):
        lbp.min_sum(unary, cand, edge_index, reverse, 3.0, 2, fused=fused)


def test_minconv_kernel_refuses_tensors_that_are_not_float32():
    """The C search reads raw float32 memory: a float64 ``cand_dst`` given to it directly is refused
    naming the argument, not read as other numbers."""
    require_kernel(cloud_native)
    b, cs, cd = _search_problem()
    with pytest.raises(ValueError, match="^cand_dst: the C kernel reads float32 CPU tensors, got torch.float64"):
        cloud_native.search(b, cs, cd.double(), 10.0, 0)


@pytest.mark.parametrize("which", ["fixed", "moving"])
def test_dense_register_refuses_images_of_another_dtype_than_the_network(which):
    """A float64 (or integer) image with a float32 network: refused naming the image, as ``register_clouds``
    refuses points of another dtype than its network (it met the convolution as a torch dtype error)."""
    g = _gen(0)
    images = {"fixed": torch.rand(1, 1, 12, 13, 14, generator=g), "moving": torch.rand(1, 1, 12, 13, 14, generator=g)}
    net = random_feature_net(_ADAM_NET, 0)
    for bad in (torch.float64, torch.int64):
        args = {**images, which: (images[which] * 100).to(bad)}
        with pytest.raises(ValueError, match=f"^{which}: {bad} on cpu, but the network is torch.float32 on cpu"):
            register(args["fixed"], args["moving"], net, _ADAM_CFG)


def test_graph_network_refuses_points_of_another_dtype_than_its_weights():
    """float64 points into a float32 graph network: refused naming ``points`` (it met the matmul as a torch error)."""
    net = build_graph_net(GraphNetConfig(channels=(8,), out_channels=8, k_fixed=4), seed=0)
    pts = torch.rand(12, 3, generator=_gen(0))
    assert net(pts, 4).shape == (12, 8)
    with pytest.raises(ValueError, match="^points: torch.float64 on cpu, but the network is torch.float32 on cpu"):
        net(pts.double(), 4)
