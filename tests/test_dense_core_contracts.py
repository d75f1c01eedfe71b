"""Contracts of the dense optimiser, instance optimisation, image similarities and feature network that a
mutation audit found open (2026-12-07, second audit of cyclereg/dense/convex.py, instance.py,
similarity.py, network.py): each test checks an analytic value or an invariant on a tiny volume and fails
on a specific mutation of the library that the earlier suite let through."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cyclereg.dense.config import AdamConfig, ConvexConfig, FeatureNetConfig
from cyclereg.dense.convex import (composition_error, correlate, coupled_convex, displacement_set, resample_disp,
                                   upsample_field)
from cyclereg.dense.instance import adam_refine
from cyclereg.dense.network import FeatureNet, init_random, random_feature_net
from cyclereg.dense.similarity import box_mean, mind_loss, mind_ssc, ncc_loss

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _smooth(shape, channels=1, seed=0, passes=2, dtype=torch.float32):
    x = torch.randn(1, channels, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    for _ in range(passes):
        x = F.avg_pool3d(F.pad(x, (1,) * 6, mode="replicate"), 3, stride=1)
    return x


def _ramp(shape, channel=0, axis=0, dtype=torch.float64):
    """A field whose channel ``channel`` is the voxel index along ``axis`` (the others 0)."""
    u = torch.zeros(1, 3, *shape, dtype=dtype)
    view = [1, 1, 1]
    view[axis] = shape[axis]
    u[0, channel] = torch.arange(shape[axis], dtype=dtype).view(*view).expand(*shape)
    return u


# ----------------------------------------------------------------------------- convex optimiser h
def test_displacement_set_is_in_i_j_k_order_with_i_slowest():
    """The documented order: candidate n = (n // 9 - 1, n // 3 % 3 - 1, n % 3 - 1) at radius 1 (training
    targets and cost channels are indexed by it)."""
    got = displacement_set(1).long().tolist()
    want = [[n // 9 - 1, n // 3 % 3 - 1, n % 3 - 1] for n in range(27)]
    assert got == want


def test_correlate_scales_both_feature_volumes_by_the_feature_scale():
    """cost = mean_c |s f - s m|: with the mean reduction, scaling both by s scales the cost by s
    (scaling only one side would give an unrelated cost)."""
    g = torch.Generator().manual_seed(3)
    f = torch.randn(1, 2, 4, 4, 5, generator=g, dtype=torch.float64)
    m = torch.randn(1, 2, 4, 4, 5, generator=g, dtype=torch.float64)
    one = correlate(f, m, ConvexConfig(radius=1, feature_scale=1.0))
    torch.testing.assert_close(correlate(f, m, ConvexConfig(radius=1, feature_scale=2.5)), 2.5 * one)


def test_coupled_convex_smooths_with_its_smooth_kernel_not_the_patch_size():
    """smooth_kernel=1 (no smoothing) with patch_size=3: one coupled step is exactly the soft argmin of
    cost + alpha |o - v0|^2, v0 the soft argmin of the cost."""
    cfg = ConvexConfig(radius=1, softmax_temperature=3.0, coupling=(0.7,), smooth_kernel=1, patch_size=3)
    cost = torch.rand(1, 27, 4, 3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    disps = displacement_set(1, dtype=torch.float64)

    def soft_argmin(c):
        return torch.einsum("bkdhw,kc->bcdhw", torch.softmax(-cfg.softmax_temperature * c, dim=1), disps)

    v0 = soft_argmin(cost)
    dist = ((disps.view(1, 27, 3, 1, 1, 1) - v0.unsqueeze(1)) ** 2).sum(2)
    want = soft_argmin(cost + 0.7 * dist)
    torch.testing.assert_close(coupled_convex(cost, cfg), want, rtol=0, atol=1e-12)


def test_composition_error_is_the_mean_euclidean_norm():
    """a = (3, 4, 0) everywhere, b = 0: |a + b(x + a)| = 5 at every voxel (the norm, not a sum of abs)."""
    a = torch.tensor([3.0, 4.0, 0.0]).view(1, 3, 1, 1, 1).expand(1, 3, 4, 5, 6).contiguous()
    assert composition_error(a, torch.zeros_like(a)).item() == pytest.approx(5.0)


@pytest.mark.parametrize("src, out, ratio", [((5, 4, 4), (9, 7, 7), 0.5), ((9, 7, 7), (5, 4, 4), 2.0)])
def test_resample_disp_of_a_linear_field_is_exact(src, out, ratio):
    """Output voxel x sits at source voxel x * ratio (corner-aligned, not centre-shifted): the field
    u_0 = i (source voxels) becomes u_0 = x (output voxels) exactly."""
    got = resample_disp(_ramp(src), out, ratio)
    torch.testing.assert_close(got, _ramp(out), rtol=0, atol=1e-12)


def test_upsample_field_of_a_linear_field_to_an_odd_shape_is_exact():
    """factor 4 to 17 voxels (coarse 5 = ceil(17 / 4)): the intermediate 2x grid must have ceil(17 / 2) = 9
    voxels or the last fine voxels are clamped; without smoothing u_0 = i_coarse becomes u_0 = i_fine."""
    cfg = replace(ConvexConfig(), upsample_smooth_passes=0)
    got = upsample_field(_ramp((5, 5, 5)), 4, (17, 17, 17), cfg)
    torch.testing.assert_close(got, _ramp((17, 17, 17)), rtol=0, atol=1e-9)


def test_upsample_field_by_one_gives_the_requested_shape_or_refuses():
    """factor 1 to another shape: a (4, 4, 4) field came back for out_shape (5, 5, 5); the mismatch is named
    now, and factor 1 to the field's own shape is the field itself."""
    disp = torch.ones(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match=r"out_shape \(5, 5, 5\): factor 1 keeps disp's grid \(4, 4, 4\)"):
        upsample_field(disp, 1, (5, 5, 5), ConvexConfig())
    assert torch.equal(upsample_field(disp, 1, (4, 4, 4), ConvexConfig()), disp)


# ----------------------------------------------------------------------------- Adam instance optimisation
def _plain_adam(**changes) -> AdamConfig:
    return replace(AdamConfig(), smooth_passes=0, final_smooth_passes=0, normalize_features=False, **changes)


def _ramp_features():
    i = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 1, 8, 8, 8).contiguous()
    return i + 3.0, i.clone()


def test_adam_refinement_ignores_the_scale_and_offset_of_each_volumes_features():
    """normalize_features standardises *both* feature volumes: an affine change of either leaves the
    refined field unchanged."""
    ff, fm = _smooth((6, 6, 6), 3, seed=1, dtype=torch.float64), _smooth((6, 6, 6), 3, seed=2, dtype=torch.float64)
    disp = torch.zeros(1, 3, 12, 12, 12, dtype=torch.float64)
    cfg = replace(AdamConfig(), iterations=3)
    a = adam_refine(ff, fm, disp, 2, cfg)
    b = adam_refine(2.0 * ff + 1.0, 0.5 * fm - 2.0, disp, 2, cfg)
    assert a.abs().max() > 0.1  # it moves
    torch.testing.assert_close(a, b, rtol=0, atol=1e-2)  # standardize's eps: 1e-3 voxels


def test_a_zero_data_weight_switches_the_data_term_off():
    """The ramp features pull u_0 up (one Adam step = 2 image voxels); with data_weight 0 and a flat field
    nothing pulls and the field stays 0."""
    ff, fm = _ramp_features()
    out = adam_refine(ff, fm, torch.zeros(1, 3, 16, 16, 16), 2, _plain_adam(iterations=1, data_weight=0.0))
    assert torch.equal(out, torch.zeros_like(out))


def test_a_zero_regulariser_weight_switches_the_regulariser_off():
    """A spike of 3 feature voxels and no data term: reg_weight 0 (reg_factor 1) leaves it where it is."""
    features = torch.zeros(1, 1, 8, 8, 8)
    disp = torch.zeros(1, 3, 16, 16, 16)
    disp[0, 0, 8, 8, 8] = 6.0
    out = adam_refine(features, features, disp, 2, _plain_adam(iterations=1, data_weight=0.0, reg_weight=0.0))
    assert out[0, 0, 8, 8, 8].item() == pytest.approx(6.0, abs=1e-5)


def test_two_adam_steps_follow_adams_moments_of_the_per_step_gradients():
    """Ramp features fixed(i) = i + 3, moving(i) = i: at each interior voxel the data term is (u_0 - 3)^2 / N
    (N = 512 voxels), an independent scalar problem; two steps must equal torch's Adam on that scalar (the
    gradients are not accumulated across steps)."""
    ff, fm = _ramp_features()
    out = adam_refine(ff, fm, torch.zeros(1, 3, 16, 16, 16), 2, _plain_adam(iterations=2, lr=1.0, reg_weight=0.0))
    p = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=1.0)
    for _ in range(2):
        opt.zero_grad()
        ((p - 3.0) ** 2 / 512).backward()
        opt.step()
    want = 2.0 * p.item()  # feature voxels -> image voxels
    torch.testing.assert_close(out[0, 0, 2:11], torch.full((9, 16, 16), want), rtol=0, atol=1e-4)


def test_adam_refinement_does_not_propagate_gradients_to_its_inputs():
    ff, fm = _ramp_features()
    ff.requires_grad_(True)
    fm.requires_grad_(True)
    disp = torch.zeros(1, 3, 16, 16, 16, requires_grad=True)
    out = adam_refine(ff, fm, disp, 2, _plain_adam(iterations=2))
    assert ff.grad is None and fm.grad is None and disp.grad is None
    assert not out.requires_grad


def test_the_returned_field_is_the_smoothed_parametrisation():
    """No steps, one smoothing pass of the parameters, no final passes, factor 1: a spike of 27 voxels comes
    back as the box filter of the parameters (1 on its 3^3 cube), not as the raw parameters."""
    disp = torch.zeros(1, 3, 9, 9, 9)
    disp[0, 2, 4, 4, 4] = 27.0
    features = torch.zeros(1, 1, 9, 9, 9)
    out = adam_refine(features, features, disp, 1, replace(_plain_adam(iterations=0), smooth_passes=1))
    want = torch.zeros_like(disp)
    want[0, 2, 3:6, 3:6, 3:6] = 1.0
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_each_step_optimises_the_parameters_through_their_smoothing():
    """A spike under the regulariser with one smoothing pass per step: the smoothed field differs from the
    spike within 2 voxels, so its gradient reaches parameters 3 voxels away through the filter's adjoint,
    and one step changes the result 4 voxels from the spike (unsmoothed steps would stop at 2)."""
    disp = torch.zeros(1, 3, 11, 11, 11)
    disp[0, 0, 5, 5, 5] = 27.0
    features = torch.zeros(1, 1, 11, 11, 11)
    cfg = replace(_plain_adam(iterations=1, data_weight=0.0), smooth_passes=1)
    moved = adam_refine(features, features, disp, 1, cfg) - adam_refine(features, features, disp, 1,
                                                                       replace(cfg, iterations=0))
    assert moved[0, 0, 1, 5, 5].abs() > 1e-3 and moved[0, 0, 5, 5, 9].abs() > 1e-3


# ----------------------------------------------------------------------------- similarity
def test_box_mean_is_the_replicate_padded_cube_mean():
    impulse = torch.zeros(1, 1, 7, 7, 7, dtype=torch.float64)
    impulse[0, 0, 3, 3, 3] = 27.0
    want = torch.zeros_like(impulse)
    want[0, 0, 2:5, 2:5, 2:5] = 1.0
    torch.testing.assert_close(box_mean(impulse, 1), want)
    ones = torch.ones(1, 1, 5, 6, 7)
    torch.testing.assert_close(box_mean(ones, 2), ones)  # no shrinking at the border


def test_mind_dilation_is_the_distance_of_the_neighbourhood_offsets():
    """I = (-1)^i: with dilation 2 every offset pair compares equal values (all 12 SSC distances 0, the
    descriptor 1); with dilation 1 the 8 pairs with one offset along axis 0 differ (descriptor < 1 there)."""
    i = torch.arange(12.0).view(1, 1, 12, 1, 1).expand(1, 1, 12, 12, 12)
    img = (-1.0) ** i
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    two = mind_ssc(img, radius=1, dilation=2)[inner]
    assert torch.equal(two, torch.ones_like(two))
    one = mind_ssc(img, radius=1, dilation=1)[inner]
    assert int((one < 0.5).all(dim=(2, 3, 4)).sum()) == 8


def test_mind_is_scale_invariant_per_volume_of_a_batch():
    """Each volume's variance clamp is relative to its own mean variance: a batch of I and 1e-3 I gives the
    same descriptor twice (one clamp over the batch would clamp all of the faint volume)."""
    img = _smooth((8, 9, 10), seed=4, passes=1, dtype=torch.float64)
    desc = mind_ssc(torch.cat([img, 1e-3 * img]))
    torch.testing.assert_close(desc[1], desc[0], rtol=0, atol=1e-9)


def test_mind_leaves_a_region_of_hundredfold_lower_variance_unclamped():
    """Variances within VARIANCE_RANGE (1e3) of the volume's mean are not clamped: a copy of a pattern at a
    tenth of the contrast (1 % of the variance) next to a full-contrast region has the descriptor of the
    pattern alone, away from the seam and the border."""
    loud = _smooth((8, 10, 10), seed=5, passes=1, dtype=torch.float64)
    quiet = _smooth((12, 10, 10), seed=6, passes=1, dtype=torch.float64)
    joint = mind_ssc(torch.cat([loud, 0.1 * quiet], dim=2))
    alone = mind_ssc(quiet)
    torch.testing.assert_close(joint[:, :, 8 + 3:-3, 3:-3, 3:-3], alone[:, :, 3:-3, 3:-3, 3:-3], rtol=0, atol=1e-9)


def test_mind_clamps_a_variance_above_a_thousand_times_the_volume_mean():
    """A unit impulse in a 24^3 volume, radius 0, dilation 1: only the 6 voxels next to it have a variance
    (4 of the 12 SSC distances are 1: 1/3); the volume mean is 6 / 3 / 24^3, so 1/3 is clamped to 1e3 times
    that, and the 4 channels there are exp(-24^3 / 2000) (exp(-3) unclamped)."""
    img = torch.zeros(1, 1, 24, 24, 24, dtype=torch.float64)
    img[0, 0, 12, 12, 12] = 1.0
    desc = mind_ssc(img, radius=0, dilation=1)
    beside = desc[0, :, 11, 12, 12]
    assert int((beside < 1).sum()) == 4
    assert beside.min().item() == pytest.approx(math.exp(-24 ** 3 / 2000), rel=1e-9)


def test_mind_loss_is_the_mean_squared_descriptor_difference_with_the_default_patch():
    a = _smooth((8, 8, 9), seed=7, passes=1)
    b = _smooth((8, 8, 9), seed=8, passes=1)
    want = (mind_ssc(a, radius=1, dilation=2) - mind_ssc(b, radius=1, dilation=2)).pow(2).mean()
    torch.testing.assert_close(mind_loss(a, b), want)


def test_ncc_loss_closed_forms():
    """0 for a positive affine copy, 2 for a negated one (not 0: the sign counts), the 9^3 window by
    default, and dominated by eps for intensities of 0.01 as documented."""
    img = torch.rand(1, 1, 10, 11, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert abs(ncc_loss(img, img).item()) < 1e-3
    assert abs(ncc_loss(img, 3.0 * img + 5.0).item()) < 1e-3
    assert ncc_loss(img, -img).item() > 1.999
    other = torch.rand(1, 1, 10, 11, 12, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    assert ncc_loss(img, other).item() == pytest.approx(ncc_loss(img, other, radius=4).item(), abs=0)
    assert ncc_loss(img, other).item() != pytest.approx(ncc_loss(img, other, radius=3).item(), abs=1e-6)
    assert ncc_loss(0.01 * img, 0.01 * img).item() > 0.9  # variances ~1e-5: sqrt(vf vw + eps) ~ sqrt(eps)


@pytest.mark.parametrize("loss", [mind_loss, ncc_loss])
def test_image_losses_refuse_images_of_several_channels(loss):
    two = torch.rand(1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match=r"fixed: expected \(B, 1, D, H, W\)"):
        loss(two, two)


# ----------------------------------------------------------------------------- feature network g
def test_random_features_are_positively_homogeneous_but_not_linear():
    """Kaiming init (zero biases) in eval mode (BatchNorm the identity): g(2x) = 2 g(x) exactly up to
    rounding, and the ReLUs make g(-x) != -g(x)."""
    net = random_feature_net(FeatureNetConfig(), seed=0)
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) - 0.5
    with torch.no_grad():
        y = net(x)
        torch.testing.assert_close(net(2.0 * x), 2.0 * y, rtol=1e-4, atol=1e-5)
        assert (net(-x) + y).abs().max() > 0.1 * y.abs().max()


def test_in_training_mode_batchnorm_makes_the_features_ignore_the_intensity_scale():
    net = init_random(FeatureNet(FeatureNetConfig()), 0).train()
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(10.0 * x), net(x), rtol=1e-3, atol=1e-3)


def test_adam_features_come_from_the_adam_layer_for_any_channel_widths():
    cfg = FeatureNetConfig(channels=(4, 6, 8, 8, 8, 8), adam_channels=3)
    net = random_feature_net(cfg, seed=1)
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        final, early = net.forward_with_adam_features(x)
        assert final.shape == (1, 16, 2, 2, 2) and early.shape == (1, 3, 8, 8, 8)
        torch.testing.assert_close(net.adam_features(x), early)
        torch.testing.assert_close(net(x), final)


def test_convolutions_have_the_configured_kernel_strides_and_padding():
    """The first convolution of each pair is strided (as the reference); 'same' padding for any odd kernel."""
    cfg = FeatureNetConfig(kernel_size=5, channels=(2, 2, 2, 2, 2, 2))
    net = FeatureNet(cfg)
    assert [blk[0].stride for blk in net.blocks] == [(s,) * 3 for s in cfg.strides]
    assert net(torch.zeros(1, 1, 16, 24, 8)).shape == (1, 16, 2, 3, 1)


def test_torch_random_init_is_pytorchs_uniform_fan_in_default():
    """random_init="torch" from the configuration: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    net = random_feature_net(FeatureNetConfig(random_init="torch"), seed=0)
    conv = net.blocks[3][0]  # 128 x 64 x 27 weights
    bound = 1.0 / math.sqrt(conv.weight[0].numel())
    w = conv.weight.detach()
    assert w.abs().max() <= bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.02)
    assert abs(w.mean().item()) < 0.02 * bound
    for layer in (conv, net.head):
        assert 0 < layer.bias.abs().min() and layer.bias.abs().max() <= 1.0 / math.sqrt(layer.weight[0].numel())


def test_init_random_resets_batchnorm_statistics_of_a_used_network():
    """Re-initialising a network whose BatchNorm has running statistics gives the fresh random network."""
    cfg = FeatureNetConfig()
    net = FeatureNet(cfg).train()
    with torch.no_grad():
        net(torch.rand(1, 1, 16, 16, 16) * 7.0 + 3.0)
    x = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(init_random(net, 5).eval()(x), random_feature_net(cfg, seed=5)(x))


def test_init_random_refuses_an_unknown_scheme():
    with pytest.raises(ValueError, match="random_init: expected 'kaiming' or 'torch'"):
        init_random(FeatureNet(FeatureNetConfig(channels=(2,) * 6)), 0, "xavier")
