"""Dense path: analytic tests of warping, the convex optimiser, inverse consistency,
Jacobians, Dice/HD95 and the network/pipeline plumbing (small volumes, CPU, fast)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cyclereg.dense.config import AdamConfig, ConvexConfig, DensePipelineConfig, FeatureNetConfig, config_from_dict
from cyclereg.dense.convex import (composition_error, correlate, coupled_convex, displacement_set,
                                   inverse_consistency, resample_disp, upsample_field)
from cyclereg.dense.data import preprocess
from cyclereg.dense.config import PreprocessConfig
from cyclereg.dense.network import random_feature_net
from cyclereg.dense.pipeline import pad_to_multiple, predict_displacement, register
from cyclereg.frames import voxel_coordinates
from cyclereg.metrics import (determinant_stats, dice, hd95, jacobian_determinant, jacobian_map, scored_labels,
                              sdlogj)
from cyclereg.warp import warp

pytestmark = pytest.mark.usefixtures("one_intraop_thread")





def smooth_noise(shape, channels=1, seed=0, passes=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, *shape, generator=g)
    for _ in range(passes):
        x = F.avg_pool3d(F.pad(x, (1,) * 6, mode="replicate"), 3, stride=1)
    return x


def smooth_field(shape, amplitude, seed=0):
    x = smooth_noise(shape, 3, seed, passes=4)
    return amplitude * x / x.abs().max()


# ----------------------------------------------------------------------------- warping
def test_identity_field_leaves_image_unchanged():
    img = torch.rand(1, 2, 9, 10, 11)
    out = warp(img, torch.zeros(1, 3, 9, 10, 11))
    assert torch.allclose(out, img, atol=1e-5)
    lab = torch.randint(0, 5, (1, 1, 9, 10, 11))
    assert torch.equal(warp(lab, torch.zeros(1, 3, 9, 10, 11), mode="nearest"), lab)


def test_label_warp_shifts_exactly_and_is_background_outside():
    """A whole-voxel shift moves labels exactly; where x + u(x) leaves the map, background (0),
    not the edge label repeated (the label touches the face it is shifted away from)."""
    from cyclereg.warp import warp_labels

    lab = torch.zeros(1, 1, 6, 7, 8, dtype=torch.long)
    lab[..., 3:, 2:5, 1:4] = 4  # touches the far face of axis 0
    shift = torch.zeros(1, 3, 6, 7, 8)
    shift[:, 0] = 2.0  # sample two voxels further along axis 0
    out = warp_labels(lab, shift)
    assert torch.equal(out[..., :4, :, :], lab[..., 2:, :, :])
    assert not out[..., 4:, :, :].any()  # beyond the map: background
    assert warp(lab, shift, mode="nearest")[..., 4:, 2:5, 1:4].eq(4).all()  # border padding would repeat it
    # the same through the two-grid path, with identical grids
    aff = np.diag([1.5, 1.0, 2.0, 1.0])
    assert torch.equal(warp_labels(lab, shift, labels_affine=aff, fixed_affine=aff), out)
    # the half-voxel band beyond the outermost centres belongs to the edge voxel (documented); beyond it, 0
    column = torch.arange(1, 7).view(1, 1, 6, 1, 1).expand(1, 1, 6, 2, 2)
    for offset, expected in ((-0.3, [1, 2, 3, 4, 5, 6]), (-0.49, [1, 2, 3, 4, 5, 6]),
                             (-0.51, [0, 1, 2, 3, 4, 5]), (-0.8, [0, 1, 2, 3, 4, 5])):
        moved = torch.zeros(1, 3, 6, 2, 2)
        moved[:, 0] = offset
        assert warp_labels(column, moved)[0, 0, :, 0, 0].tolist() == expected, offset


def test_resample_disp_constant_field_scales_with_stride():
    low = torch.ones(1, 3, 4, 5, 6) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    high = resample_disp(low, (8, 10, 12), 0.5)
    assert torch.allclose(high, 2 * low[:, :, :1, :1, :1].expand_as(high), atol=1e-5)
    back = resample_disp(high, (4, 5, 6), 2.0)
    assert torch.allclose(back, low, atol=1e-5)


# ----------------------------------------------------------------------------- convex optimiser
@pytest.mark.parametrize("shift", [(1, -2, 1), (-1, 0, 2)])
def test_convex_optimiser_recovers_integer_shift(shift, device):
    big = smooth_noise((28, 28, 28), channels=16, seed=1, passes=1)
    s = torch.tensor(shift)
    lo = 6
    sl = lambda o: big[:, :, lo + o[0]: lo + o[0] + 16, lo + o[1]: lo + o[1] + 16, lo + o[2]: lo + o[2] + 16]  # noqa: E731
    fixed = sl([0, 0, 0])
    # moving(y) = G(y - s)  =>  fixed(x) = G(x) = moving(x + s): displacement s everywhere
    moving = sl((-s).tolist())
    fixed, moving = fixed.to(device), moving.to(device)
    cfg = ConvexConfig()
    from cyclereg.dense.convex import standardize
    field = coupled_convex(correlate(standardize(fixed), standardize(moving), cfg), cfg)
    inner = field[0, :, 3:-3, 3:-3, 3:-3].reshape(3, -1)
    err = (inner.cpu() - s.view(3, 1).float()).abs()
    assert err.max() < 0.5, f"max error {err.max():.3f}"


def test_correlation_cost_is_zero_at_true_shift():
    f = torch.randn(1, 4, 8, 8, 8)
    cost = correlate(f, f, ConvexConfig(patch_size=1))
    zero = (displacement_set(2) == 0).all(1).nonzero().item()
    assert torch.allclose(cost[:, zero], torch.zeros(1, 8, 8, 8))
    assert cost.shape == (1, 125, 8, 8, 8)


def test_inverse_consistency_reduces_composition_error(device):
    shape = (12, 12, 12)
    a = smooth_field(shape, 1.5, seed=2).to(device)
    b = -a + smooth_field(shape, 0.8, seed=3).to(device)  # a deliberately inconsistent backward field
    before = composition_error(a, b)
    a2, b2 = inverse_consistency(a, b, 15)
    after = composition_error(a2, b2)
    assert after < 0.5 * before
    assert composition_error(b2, a2) < 0.5 * composition_error(b, a)


def test_upsample_field_is_exact_for_translations():
    low = torch.zeros(1, 3, 3, 4, 5)
    low[:, 0] = 1.0
    cfg = ConvexConfig()
    up = upsample_field(low, 8, (24, 32, 40), cfg)
    assert up.shape == (1, 3, 24, 32, 40)
    assert torch.allclose(up[:, 0], torch.full((1, 24, 32, 40), 8.0), atol=1e-4)
    assert up[:, 1:].abs().max() < 1e-5


@pytest.mark.parametrize("kernel, passes", [(3, 1), (3, 3), (5, 2)])
def test_box_smooth_is_the_replicate_padded_cube_mean(kernel, passes):
    """Equal to ``passes`` replicate-padded ``avg_pool3d`` of width ``kernel`` (its definition), in value
    and gradient; a constant stays constant, a linear ramp is unchanged away from the border, and an
    impulse spreads to ``1 / kernel^3`` over its cube."""
    from cyclereg.dense.convex import box_smooth

    x = torch.randn(2, 3, 9, 7, 11, dtype=torch.float64, requires_grad=True)
    thin = torch.randn(1, 2, 1, 2, 5, dtype=torch.float64, requires_grad=True)  # axes shorter than the kernel
    assert torch.autograd.gradcheck(lambda t: box_smooth(t, kernel, passes), (thin,))
    p = kernel // 2
    ref = x
    for _ in range(passes):
        ref = F.avg_pool3d(F.pad(ref, (p,) * 6, mode="replicate"), kernel, stride=1)
    got = box_smooth(x, kernel, passes)
    torch.testing.assert_close(got, ref)
    w = torch.randn_like(ref)
    g_got, = torch.autograd.grad((got * w).sum(), x)
    g_ref, = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g_got, g_ref)
    assert torch.equal(box_smooth(torch.full((1, 1, 6, 6, 6), 2.5), kernel, passes), torch.full((1, 1, 6, 6, 6), 2.5))
    ramp = torch.arange(12.0).view(1, 1, 1, 1, 12).expand(1, 1, 12, 12, 12)
    inner = slice(p * passes, 12 - p * passes)
    torch.testing.assert_close(box_smooth(ramp, kernel, passes)[..., inner], ramp[..., inner])
    impulse = torch.zeros(1, 1, 9, 9, 9)
    impulse[0, 0, 4, 4, 4] = 1.0
    once = box_smooth(impulse, kernel, 1)
    cube = (slice(None), slice(None), *(slice(4 - p, 5 + p),) * 3)
    torch.testing.assert_close(once[cube], torch.full_like(once[cube], 1.0 / kernel ** 3))
    assert once.sum().item() == pytest.approx(1.0) and box_smooth(impulse, 1, 3) is impulse
    with pytest.raises(ValueError, match="kernel must be odd"):
        box_smooth(impulse, 4)


def test_upsample_smoothing_width_is_the_configured_one():
    """A unit impulse upsampled 2x with one box pass: width 1 leaves the trilinear result, width 3 spreads it
    to the 3x3x3 mean (the named setting is the one used)."""
    low = torch.zeros(1, 3, 4, 4, 4)
    low[0, 0, 2, 2, 2] = 1.0
    plain = upsample_field(low, 4, (16, 16, 16), ConvexConfig(upsample_smooth_passes=1, upsample_smooth_kernel=1))
    boxed = upsample_field(low, 4, (16, 16, 16), ConvexConfig(upsample_smooth_passes=1, upsample_smooth_kernel=3))
    coarse = resample_disp(low, (8, 8, 8), 0.5)
    expected = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(coarse, (1,) * 6, mode="replicate"), 3, stride=1)
    torch.testing.assert_close(plain, resample_disp(coarse, (16, 16, 16), 0.5))
    torch.testing.assert_close(boxed, resample_disp(expected, (16, 16, 16), 0.5))


# ----------------------------------------------------------------------------- Jacobian, Dice, HD95
def test_jacobian_of_affine_field_equals_det():
    A = torch.tensor([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.15], [0.05, 0.0, 1.2]], dtype=torch.float64)
    x = voxel_coordinates((8, 9, 10), dtype=torch.float64)  # (D, H, W, 3)
    u = (x @ (A - torch.eye(3, dtype=torch.float64)).T).permute(3, 0, 1, 2).unsqueeze(0)
    J = jacobian_determinant(u)
    assert torch.allclose(J, torch.full_like(J, torch.linalg.det(A).item()), atol=1e-9)
    s = sdlogj(u)
    assert s["folding_fraction"] == 0.0 and s["sdlogj"] < 1e-9


def test_jacobian_of_quadratic_field_matches_analytic_det_per_voxel():
    # central differences are exact for quadratics, so every interior voxel's determinant is
    # that of the analytic Jacobian I + du/dx at the voxel
    x = voxel_coordinates((7, 8, 9), dtype=torch.float64)  # (D, H, W, 3)
    i, j, k = x.unbind(-1)
    a = 0.01
    u = torch.stack([a * j * k, a * i * i - 0.02 * k, 0.03 * i * j + a * k * k]).unsqueeze(0)
    Ja = torch.zeros(*i.shape, 3, 3, dtype=torch.float64)
    Ja[..., 0, 1], Ja[..., 0, 2] = a * k, a * j
    Ja[..., 1, 0], Ja[..., 1, 2] = 2 * a * i, -0.02
    Ja[..., 2, 0], Ja[..., 2, 1], Ja[..., 2, 2] = 0.03 * j, 0.03 * i, 2 * a * k
    expected = torch.linalg.det(Ja + torch.eye(3, dtype=torch.float64))[1:-1, 1:-1, 1:-1]
    torch.testing.assert_close(jacobian_determinant(u)[0], expected, atol=1e-12, rtol=0)


def test_sdlogj_is_the_learn2reg_population_std_of_one_field_and_refuses_what_it_cannot_score():
    """A known field: log(J + 3) over the voxels two from the border, numpy's (population) std as in
    Learn2Reg's evaluation; a batch of fields, a grid too small for the border crop and a spacing
    (the determinant of a voxel field has none) are refused instead of pooled, NaN or ignored."""
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.avg_pool3d(torch.randn(1, 3, 9, 8, 7, generator=g, dtype=torch.float64), 3, 1, 1)
    J = jacobian_determinant(u)[0].numpy()
    expected = np.log(np.clip(J[1:-1, 1:-1, 1:-1] + 3, 1e-9, 1e9)).std()  # numpy: ddof 0
    assert sdlogj(u)["sdlogj"] == pytest.approx(float(expected), rel=1e-12)
    assert sdlogj(torch.zeros(1, 3, 5, 5, 5))["sdlogj"] == 0.0  # one voxel left: 0, not NaN
    for bad in (torch.zeros(2, 3, 8, 8, 8), torch.zeros(1, 3, 4, 8, 8)):
        with pytest.raises(ValueError, match=r"disp_vox: expected \(1, 3, D, H, W\) with D, H, W >= 5"):
            sdlogj(bad)
    with pytest.raises(ValueError, match="J: expected"):
        determinant_stats(torch.ones(2, 3, 3, 3))
    with pytest.raises(TypeError):
        jacobian_determinant(u, (2.0, 1.0, 1.0))


def test_label_scores_refuse_maps_that_are_not_whole_numbers_and_bad_spacings():
    a = torch.zeros(6, 6, 6)
    a[1:3, 1:3, 1:3] = 1.5
    for f in (dice, hd95):
        with pytest.raises(ValueError, match="fixed_labels: a label map holds whole numbers"):
            f(a, torch.zeros(6, 6, 6))
        with pytest.raises(ValueError, match="warped_labels: a label map holds whole numbers"):
            f(torch.zeros(6, 6, 6), a)
    whole = a.round()  # the same map as whole numbers (2.0) scores as label 2
    assert dice(whole, whole) == {2: 1.0} and hd95(whole, whole) == {2: 0.0}
    for spacing in ((0, 1, 1), (-2, 1, 1), (1, float("nan"), 1), (1, 1)):
        with pytest.raises(ValueError, match="spacing="):
            hd95(whole, whole, spacing=spacing)


def test_jacobian_map_is_the_determinant_everywhere_in_any_slabs():
    """An affine field's map is det(A) at every voxel, border included; a smooth random field's
    map is the same for any slab size and equals the interior determinant; bad shapes are refused."""
    A = torch.tensor([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.15], [0.05, 0.0, 1.2]], dtype=torch.float64)
    x = voxel_coordinates((8, 9, 10), dtype=torch.float64)
    u = (x @ (A - torch.eye(3, dtype=torch.float64)).T).permute(3, 0, 1, 2).unsqueeze(0)
    J = jacobian_map(u, slab=3)
    assert J.shape == (8, 9, 10) and J.dtype == torch.float32
    torch.testing.assert_close(J, torch.full_like(J, torch.linalg.det(A).item()), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.avg_pool3d(torch.randn(1, 3, 11, 7, 9, generator=g), 3, 1, 1)
    whole = jacobian_map(v, slab=100)
    for slab in (1, 2, 4):
        torch.testing.assert_close(jacobian_map(v, slab=slab), whole, atol=0, rtol=0)
        assert torch.equal(jacobian_determinant(v, slab=slab), jacobian_determinant(v, slab=100))
    with pytest.raises(ValueError, match="slab=0"):
        jacobian_determinant(v, slab=0)
    torch.testing.assert_close(whole[1:-1, 1:-1, 1:-1], jacobian_determinant(v)[0], atol=1e-6, rtol=0)
    assert torch.equal(whole[0], whole[1]) and torch.equal(whole[:, :, -1], whole[:, :, -2])
    assert determinant_stats(whole[None, 1:-1, 1:-1, 1:-1]) == sdlogj(v)  # the map's interior serves sdlogj
    with pytest.raises(ValueError, match="disp_vox"):
        jacobian_map(v[:, :, :2])


def sphere(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    x = voxel_coordinates(shape, dtype=torch.float64) * torch.tensor(spacing, dtype=torch.float64)
    c = torch.tensor(centre, dtype=torch.float64) * torch.tensor(spacing, dtype=torch.float64)
    return ((x - c).norm(dim=-1) <= radius).long()


def test_dice_on_spheres():
    shape = (48, 48, 48)
    a = sphere(shape, (24, 24, 24), 10.0)
    b = sphere(shape, (24, 24, 24), 12.0)
    d = dice(a, b)
    expected = 2 * 10 ** 3 / (10 ** 3 + 12 ** 3)
    assert set(d) == {1}
    assert abs(d[1] - expected) < 0.02
    assert dice(a, a)[1] == 1.0
    # labels absent from either map are excluded, not scored as 0
    b2 = b.clone()
    b2[0, 0, 0] = 7
    assert set(dice(a, b2)) == {1}


def test_a_label_the_registration_erases_scores_zero():
    """Learn2Reg decides the scored labels from the fixed and the *unwarped* moving map: a label
    present in both that the warp wipes out scores Dice 0 instead of vanishing from the mean."""
    shape = (32, 32, 32)
    fixed = sphere(shape, (10, 16, 16), 5.0) + 2 * sphere(shape, (22, 16, 16), 5.0)
    moving = fixed.clone()
    warped = sphere(shape, (10, 16, 16), 5.0)  # label 2 erased
    labels = scored_labels(fixed, moving)
    assert labels == [1, 2]
    assert dice(fixed, warped, labels) == {1: 1.0, 2: 0.0}
    assert dice(fixed, warped) == {1: 1.0}  # two maps alone cannot know label 2 was there before
    assert hd95(fixed, warped, labels=labels) == {1: 0.0}  # no surface to measure for label 2
    # a label only the moving map has is not scored, even when listed
    assert dice(fixed, 3 * sphere(shape, (16, 16, 16), 4.0), [3]) == {}


def test_pair_scores_counts_an_erased_label():
    from cyclereg.dense.api import pair_scores

    shape = (24, 24, 24)
    fixed = sphere(shape, (8, 12, 12), 4.0) + 2 * sphere(shape, (17, 12, 12), 4.0)
    warped = sphere(shape, (8, 12, 12), 4.0)
    r = pair_scores(fixed, fixed.clone(), warped, torch.zeros(1, 3, *shape), (1.0, 1.0, 1.0))
    assert r["initial_dice"] == 1.0 and r["dice"] == 0.5
    assert r["dice_per_label"] == {"1": 1.0, "2": 0.0}
    assert r["erased_labels"] == [2] and r["hd95_per_label_mm"] == {"1": 0.0}  # said, not silently dropped
    from cyclereg.dense.api import summarize_pairs

    assert summarize_pairs([{**r, "seconds": 1.0}, {**r, "seconds": 1.0, "erased_labels": []}])["erased_labels"] == 1


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.5, 1.0)])
def test_hd95_on_spheres_in_mm(spacing):
    shape = (40, 48, 56)
    centre = (20, 24, 28)
    a = sphere(shape, centre, 12.0, spacing)
    b = sphere(shape, centre, 16.0, spacing)
    h = hd95(a, b, spacing=spacing)[1]
    assert abs(h - 4.0) <= max(spacing) * 0.75, h  # concentric: every surface distance is 4 mm
    assert hd95(a, a, spacing=spacing)[1] == 0.0


def _blobs(shape, seed, values):
    """A label map of overlapping spheres of the given label values (later ones on top)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(shape, dtype=torch.long)
    for v in values:
        centre = tuple(float(torch.randint(3, s - 3, (1,), generator=g)) for s in shape)
        radius = float(torch.randint(2, 7, (1,), generator=g))
        out[sphere(shape, centre, radius).bool()] = v
    return out


def _label_definitions(fixed, warped, listed, spacing):
    """Dice 2|A n B| / (|A| + |B|) from the full masks and HD95 from distance transforms of the whole
    (padded) volume, label by label, for the listed labels the fixed map has."""
    import numpy as np
    from scipy import ndimage

    want_dice, want_hd = {}, {}
    for lab in listed:
        a, b = fixed == lab, warped == lab
        if not a.any():
            continue
        want_dice[lab] = 2.0 * (a & b).sum().item() / (a.sum().item() + b.sum().item())
        if b.any():
            sa, sb = (m.numpy() & ~ndimage.binary_erosion(m.numpy(), ndimage.generate_binary_structure(3, 1))
                      for m in (a, b))
            da = ndimage.distance_transform_edt(~np.pad(sa, 25), sampling=spacing)[25:-25, 25:-25, 25:-25]
            db = ndimage.distance_transform_edt(~np.pad(sb, 25), sampling=spacing)[25:-25, 25:-25, 25:-25]
            want_hd[lab] = float(max(np.percentile(db[sa], 95), np.percentile(da[sb], 95)))
    return want_dice, want_hd


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("path", ["counted", "negative", "too large"])
def test_dice_and_hd95_equal_their_label_by_label_definitions(seed, path, monkeypatch):
    """Dice counted for all labels at once and HD95 on bounding boxes from one find_objects pass give
    exactly the per-label definitions, with labels missing from one map or the other, a listed label
    neither has and large label values; maps with a negative label value, or one above the counted
    range, take the label-by-label path and must give the definitions too."""
    import cyclereg.metrics as metrics
    from cyclereg.metrics import erased_labels, label_counts

    negative = path == "negative"
    if path == "too large":
        monkeypatch.setattr(metrics, "MAX_COUNTED_LABEL", 999)  # label 1000 is above it

    shape, spacing = (20, 22, 24), (1.0, 2.0, 1.5)
    fixed = _blobs(shape, seed, [1, 2, 5, 1000, 7])
    warped = _blobs(shape, seed + 10, [1, 2, 5, 1000, 9])
    if negative:
        fixed[0, 0, :3] = -3
        warped[0, 0, 1:4] = -3
    listed = [1, 2, 5, 7, 9, 1000, 4242] + ([-3] if negative else [])
    assert (label_counts(fixed) is None) is (path != "counted")
    want_dice, want_hd = _label_definitions(fixed, warped, listed, spacing)
    assert 7 in want_dice and 7 not in want_hd  # a label the warped map lacks: Dice 0, no HD95
    assert dice(fixed, warped, listed) == want_dice
    got_hd = hd95(fixed, warped, spacing=spacing, labels=listed)
    assert got_hd.keys() == want_hd.keys()
    assert all(got_hd[k] == pytest.approx(want_hd[k], abs=1e-9) for k in want_hd)
    assert erased_labels(warped, listed) == [k for k in listed if not (warped == k).any()]
    both = set(fixed.unique().tolist()) & set(warped.unique().tolist())
    assert scored_labels(fixed, warped) == sorted(both - {0})
    assert (-3 in scored_labels(fixed, warped)) is negative


# ----------------------------------------------------------------------------- network & pipeline
def test_feature_net_shapes_and_seed():
    cfg = FeatureNetConfig()
    assert cfg.downsampling == 8 and cfg.adam_downsampling == 2
    net = random_feature_net(cfg, seed=3)
    x = torch.rand(1, 1, 16, 24, 32)
    f, a = net.forward_with_adam_features(x)
    assert f.shape == (1, 16, 2, 3, 4)
    assert a.shape == (1, 16, 8, 12, 16)
    assert torch.allclose(net(x), random_feature_net(cfg, seed=3)(x))
    assert not torch.allclose(net(x), random_feature_net(cfg, seed=4)(x))


def test_pipeline_handles_sizes_not_divisible_by_8():
    img = smooth_noise((19, 22, 25), seed=4)
    mov = smooth_noise((19, 22, 25), seed=5)
    net = random_feature_net(FeatureNetConfig(), 0)
    disp = register(img, mov, net, DensePipelineConfig(warps=2, use_adam=True))
    assert disp.shape == (1, 3, 19, 22, 25)
    assert torch.isfinite(disp).all()
    assert pad_to_multiple(img, 8).shape[2:] == (24, 24, 32)


def test_predict_displacement_is_differentiable():
    net = random_feature_net(FeatureNetConfig(), 0).train()
    f = smooth_noise((16, 16, 16), seed=6)
    m = smooth_noise((16, 16, 16), seed=7)
    disp = predict_displacement(net, f, m, DensePipelineConfig())
    disp.pow(2).mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("adam", [False, True])
def test_a_volume_registered_to_itself_with_one_warp_is_exactly_the_identity(adam):
    """Inverse consistency makes the first pass's field exactly zero for identical images, and Adam
    then sees a zero data gradient and stays there. (With a second warp, ``warp(m, 0)`` differs from
    ``m`` by float rounding; the 1e-10-voxel field that leaves is what Adam's step of ``lr`` voxels
    grows to a few tenths of a voxel: docs/benchmarks.md, "A scan registered to itself".)"""
    img = smooth_noise((16, 24, 32), seed=9, passes=2)
    net = random_feature_net(FeatureNetConfig(), 0)
    disp = register(img, img.clone(), net, DensePipelineConfig(warps=1, use_ic=True, use_adam=adam))
    assert torch.equal(disp, torch.zeros_like(disp))


def test_register_recovers_global_translation():
    # a smooth volume shifted by 6 image voxels along axis 1 (< the 16-voxel search range)
    big = smooth_noise((40, 56, 40), seed=8, passes=3)
    fixed = big[:, :, 4:36, 12:44, 4:36]
    moving = big[:, :, 4:36, 6:38, 4:36]  # moving(y) = fixed(y - 6 e_j) -> u = +6 e_j
    net = random_feature_net(FeatureNetConfig(), 0)
    disp = register(fixed, moving, net, DensePipelineConfig(warps=2, use_adam=True, use_ic=True))
    inner = disp[0, :, 8:-8, 8:-8, 8:-8].reshape(3, -1).mean(1)
    assert torch.allclose(inner, torch.tensor([0.0, 6.0, 0.0]), atol=1.0), inner


def test_preprocessing_modes():
    ct = torch.tensor([-1000.0, -200.0, 0.0, 300.0, 2000.0])
    assert torch.allclose(preprocess(ct, PreprocessConfig()), torch.tensor([-0.4, -0.4, 0.0, 0.6, 0.6]))
    mr = torch.linspace(0, 100, 1001)
    out = preprocess(mr, PreprocessConfig(mode="mri"))
    assert out.min() == 0.0 and out.max() == 1.0 and abs(out[500].item() - 0.5) < 1e-3


def test_config_roundtrip_through_json():
    from cyclereg.checkpoint import to_jsonable
    import json

    cfg = DensePipelineConfig(warps=1, spacing_mm=(2.0, 2.0, 2.0))
    back = config_from_dict(json.loads(json.dumps(to_jsonable(cfg))))
    assert back == cfg
    with pytest.raises(ValueError):
        DensePipelineConfig(warps=3).validate()
    # fields are upsampled in 2x steps: a stride of 3 would scale them by 4 (refused, not computed)
    with pytest.raises(ValueError, match="net.strides"):
        DensePipelineConfig(net=FeatureNetConfig(strides=(3, 1, 1, 1, 1, 1)), pad_multiple=3).validate()
    with pytest.raises(ValueError, match="cost_reduction"):  # was silently a sum
        DensePipelineConfig(convex=ConvexConfig(cost_reduction="max")).validate()
    # an even box filter would shift (and resize) the field: refused for every smoothing width
    for bad in (DensePipelineConfig(convex=ConvexConfig(smooth_kernel=2)),
                DensePipelineConfig(convex=ConvexConfig(upsample_smooth_kernel=4)),
                DensePipelineConfig(adam=AdamConfig(smooth_kernel=0)),
                DensePipelineConfig(convex=ConvexConfig(patch_size=2))):
        with pytest.raises(ValueError, match="(smooth_kernel|patch_size): expected an odd width"):
            bad.validate()
    # a configuration stored before the widths were settings reads back with the reference's 3
    old = json.loads(json.dumps(to_jsonable(cfg)))
    del old["convex"]["upsample_smooth_kernel"], old["adam"]["smooth_kernel"]
    assert config_from_dict(old) == cfg and cfg.adam.smooth_kernel == cfg.convex.upsample_smooth_kernel == 3
    # a stored setting this version does not know is refused, not dropped (it would register differently)
    stored = json.loads(json.dumps(to_jsonable(cfg)))
    stored["convex"]["new_setting"] = 1
    with pytest.raises(ValueError, match="unknown ConvexConfig setting\\(s\\) new_setting"):
        config_from_dict(stored)


def test_softmax_temperature_documented_scale():
    # unrelated standardised channels differ by E|a - b| = 2/sqrt(pi) per channel
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 16, 20, 20, 20, generator=g), torch.randn(1, 16, 20, 20, 20, generator=g)
    cost = correlate(a, b, ConvexConfig(patch_size=1))
    assert abs(cost.mean().item() - 2 / math.sqrt(math.pi)) < 0.02


@pytest.mark.parametrize("depth", [9, 16])  # with and without padding of the last slab
@pytest.mark.parametrize("mode, padding", [("bilinear", "border"), ("bilinear", "zeros"), ("nearest", "zeros")])
def test_slab_sampling_is_grid_sample_bitwise_with_several_threads(depth, mode, padding):
    """`sample_grid` cuts a single volume's grid into one slab per CPU thread (3 here); values and
    gradients with respect to the grid must be torch's `grid_sample`'s bit for bit, and a source that
    needs a gradient is sampled in one piece (its gradient sums over the slabs otherwise)."""
    import torch.nn.functional as F

    from cyclereg.frames import ALIGN_CORNERS
    from cyclereg.warp import sample_grid

    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, 4, 11, 7, 6, generator=g)
    grid = (torch.rand(1, depth, 5, 8, 3, generator=g) * 2.4 - 1.2).requires_grad_(True)
    n = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        got = sample_grid(src, grid, mode, padding)
        want = F.grid_sample(src, grid, mode=mode, padding_mode=padding, align_corners=ALIGN_CORNERS)
        assert torch.equal(got, want)
        if mode == "bilinear":
            w = torch.randn(want.shape, generator=g)
            assert torch.equal(torch.autograd.grad((got * w).sum(), grid)[0], torch.autograd.grad((want * w).sum(), grid)[0])
        learnt = src.clone().requires_grad_(True)
        out = sample_grid(learnt, grid.detach(), mode, padding)
        ref = F.grid_sample(learnt, grid.detach(), mode=mode, padding_mode=padding, align_corners=ALIGN_CORNERS)
        assert torch.equal(torch.autograd.grad(out.sum(), learnt)[0], torch.autograd.grad(ref.sum(), learnt)[0])
    finally:
        torch.set_num_threads(n)


def test_register_names_the_bad_image():
    net = random_feature_net(FeatureNetConfig(), seed=0)
    good = torch.zeros(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"moving: expected \(B, C, D, H, W\), got \(8, 8, 8\)"):
        register(good, torch.zeros(8, 8, 8), net, DensePipelineConfig())
    with pytest.raises(ValueError, match=r"fixed \(1, 1, 8, 8, 8\) and moving \(1, 1, 8, 8, 9\) must share one grid"):
        register(good, torch.zeros(1, 1, 8, 8, 9), net, DensePipelineConfig())


def test_volumes_too_small_for_the_network_are_refused_by_name():
    """With every axis at most the network's downsampling, the coarsest feature grid is one voxel:
    its features cannot be standardised and the field came back NaN without an error."""
    cfg = DensePipelineConfig().validate()
    net = random_feature_net(cfg.net, 0).eval()
    small = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"fixed: \(8, 8, 8\) voxels, every axis needs at least 9"):
        register(small, small, net, cfg)
    with pytest.raises(ValueError, match="fixed:"):
        predict_displacement(net, small, small, cfg)
    ok = torch.rand(1, 1, 9, 9, 9)
    assert torch.isfinite(register(ok, ok, net, cfg)).all()


def test_warp_labels_keeps_labels_beyond_float32_precision():
    """Nearest-neighbour warping gives back the labels themselves, also above 2^24 (float32 holds
    16777217 as 16777216): shifted by one voxel, background where the shift leaves the grid."""
    from cyclereg.warp import warp_labels

    lab = torch.full((1, 1, 4, 5, 6), 16_777_217)
    lab[0, 0, 1] = -5
    lab[0, 0, 2, 1, 1] = 2**40
    assert torch.equal(warp_labels(lab, torch.zeros(1, 3, 4, 5, 6)), lab)
    shift = torch.zeros(1, 3, 4, 5, 6)
    shift[:, 0] = 1.0  # x + u samples voxel i + 1
    expected = torch.cat([lab[:, :, 1:], torch.zeros_like(lab[:, :, :1])], dim=2)
    assert torch.equal(warp_labels(lab, shift), expected)


def test_hd95_takes_the_package_label_layout():
    lab = torch.zeros(12, 12, 12, dtype=torch.long)
    lab[3:8, 3:8, 3:8] = 1
    moved = torch.roll(lab, 3, dims=0)
    assert hd95(lab[None, None], moved[None, None], spacing=(2.0, 1.0, 1.0)) == hd95(lab, moved, spacing=(2.0, 1.0, 1.0))
    assert hd95(lab, moved, spacing=(2.0, 1.0, 1.0))[1] == pytest.approx(6.0)  # 3 voxels of 2 mm
    with pytest.raises(ValueError, match="fixed_labels: expected"):
        hd95(lab[None].expand(2, -1, -1, -1), moved[None].expand(2, -1, -1, -1))


# ----------------------------------------------------------------------------- tests from a mutation audit
def test_compose_applies_its_first_field_first():
    """compose(a, b)(x) = a(x) + b(x + a(x)): with a constant shift a = (1, 0, 0) and a ramp b_1 = 0.1 i,
    the composed channel 1 is 0.1 (i + 1) exactly (trilinear sampling of a linear ramp); the other order
    would give 0.1 i. A global translation, the only end-to-end check, cannot tell the orders apart."""
    from cyclereg.warp import compose

    shape = (7, 4, 5)
    a = torch.zeros(1, 3, *shape, dtype=torch.float64)
    a[:, 0] = 1.0
    b = torch.zeros(1, 3, *shape, dtype=torch.float64)
    i = torch.arange(shape[0], dtype=torch.float64).view(-1, 1, 1)
    b[:, 1] = 0.1 * i
    out = compose(a, b)
    inner = slice(0, shape[0] - 1)  # x + a(x) stays on the grid
    torch.testing.assert_close(out[0, 0, inner], torch.ones(shape[0] - 1, *shape[1:], dtype=torch.float64))
    torch.testing.assert_close(out[0, 1, inner], (0.1 * (i + 1)).expand(*shape)[inner])
    assert out[0, 2].abs().max() == 0


def _coupled_convex_by_definition(cost: np.ndarray, disps: np.ndarray, delta: float, coupling, kernel: int):
    """The paper's coupled convex optimisation written out with numpy loops (one voxel, one candidate at a
    time): v = soft-argmin of the cost; per coupling alpha, v = box(soft-argmin of cost + alpha |o - v|^2)."""
    K, D, H, W = cost.shape

    def soft_argmin(c):
        out = np.zeros((3, D, H, W))
        for x in np.ndindex(D, H, W):
            column = -delta * c[(slice(None),) + x]
            weights = np.exp(column - column.max())
            out[(slice(None),) + x] = (weights[:, None] * disps).sum(0) / weights.sum()
        return out

    def box(v):
        r = kernel // 2
        padded = np.pad(v, ((0, 0), (r, r), (r, r), (r, r)), mode="edge")
        out = np.zeros_like(v)
        for x in np.ndindex(D, H, W):
            out[(slice(None),) + x] = padded[:, x[0]:x[0] + kernel, x[1]:x[1] + kernel, x[2]:x[2] + kernel].mean((1, 2, 3))
        return out

    v = soft_argmin(cost)
    for alpha in coupling:
        dist = ((disps[:, :, None, None, None] - v[None]) ** 2).sum(1)
        v = box(soft_argmin(cost + alpha * dist))
    return v


def test_coupled_convex_equals_its_definition_on_a_random_cost():
    """The coupling term, the box smoothing after each step and the soft-argmin start are each needed: the
    integer-shift test, where the per-voxel arg-min is already right, cannot see any of them missing."""
    cfg = ConvexConfig(radius=1, softmax_temperature=3.0, coupling=(0.5, 2.0, 8.0), smooth_kernel=3)
    cost = torch.rand(1, 27, 4, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = coupled_convex(cost, cfg)[0].numpy()
    disps = displacement_set(1, dtype=torch.float64).numpy()
    want = _coupled_convex_by_definition(cost[0].numpy(), disps, cfg.softmax_temperature, cfg.coupling,
                                         cfg.smooth_kernel)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # and the steps matter at these values: without the coupling the result is another field
    plain = _coupled_convex_by_definition(cost[0].numpy(), disps, cfg.softmax_temperature, (0.0, 0.0, 0.0), 3)
    assert np.abs(plain - want).max() > 0.05


def test_a_collapsed_axis_counts_as_folding():
    """u_0 = -i collapses axis 0: J = 0 exactly at every voxel, which folding_fraction counts (J <= 0)."""
    u = torch.zeros(1, 3, 6, 6, 6, dtype=torch.float64)
    u[:, 0] = -torch.arange(6, dtype=torch.float64).view(-1, 1, 1)
    stats = sdlogj(u)
    assert jacobian_determinant(u).abs().max() == 0
    assert stats["folding_fraction"] == 1.0


def test_the_second_warp_composes_the_second_pass_after_the_first(monkeypatch):
    """register(warps=2): pass 2 registers the fixed image to the moving one warped by pass 1's field u1 and
    finds s; the result is u(x) = s(x) + u1(x + s(x)). With u1 a ramp (channel 1 = 0.1 i) and s = (1, 0, 0),
    channel 1 is 0.1 (i + 1) (the other order, or adding the fields, gives 0.1 i)."""
    import cyclereg.dense.pipeline as pipeline

    shape = (16, 16, 16)
    ramp = torch.zeros(1, 3, *shape)
    ramp[0, 1] = 0.1 * torch.arange(16.0).view(16, 1, 1)
    shift = torch.zeros(1, 3, *shape)
    shift[0, 0] = 1.0
    moving_seen = []

    def passes(net, fixed, moving, cfg, **kwargs):
        moving_seen.append(moving.clone())
        return (ramp if len(moving_seen) == 1 else shift).clone()

    monkeypatch.setattr(pipeline, "predict_displacement", passes)
    img = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    out = pipeline.register(img, img.clone(), random_feature_net(FeatureNetConfig(), 0),
                            DensePipelineConfig(warps=2, use_adam=False, use_ic=False))
    assert len(moving_seen) == 2 and torch.allclose(moving_seen[1], warp(img, ramp))
    torch.testing.assert_close(out[0, 0], torch.ones(shape))
    i = torch.arange(15.0).view(15, 1, 1).expand(15, 16, 16)
    torch.testing.assert_close(out[0, 1, :15], 0.1 * (i + 1), rtol=0, atol=1e-5)


def _plain_adam(**changes) -> AdamConfig:
    """Adam refinement without the smoothing of the field and the feature normalisation: one step of
    Adam is exactly ``lr * sign(gradient)`` per entry."""
    return replace(AdamConfig(), smooth_passes=0, final_smooth_passes=0, normalize_features=False, **changes)


def test_one_adam_step_moves_the_field_by_the_learning_rate_in_feature_voxels():
    """Features fixed(i) = i + 3, moving(i) = i (a ramp along axis 0): the data term pulls u_0 up everywhere.
    One step with lr 1 moves it one feature voxel = 2 image voxels at factor 2, only along axis 0 (away from
    the far border, where the moving ramp is clamped)."""
    from cyclereg.dense.instance import adam_refine

    i = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 1, 8, 8, 8).contiguous()
    out = adam_refine(i + 3.0, i.clone(), torch.zeros(1, 3, 16, 16, 16), 2,
                      _plain_adam(iterations=1, lr=1.0, reg_weight=0.0))
    torch.testing.assert_close(out[0, 0, 2:13], torch.full((11, 16, 16), 2.0), rtol=0, atol=1e-4)
    assert torch.equal(out[0, 1:], torch.zeros(2, 16, 16, 16))


def test_one_adam_step_of_the_regulariser_flattens_a_spike():
    """No data term; a spike of 3 feature voxels at one voxel of the field: one step of lr 1 lowers it by 1
    and raises its neighbours by 1 (sign of the gradient of the squared differences), 2 voxels away nothing."""
    from cyclereg.dense.instance import adam_refine

    features = torch.zeros(1, 1, 8, 8, 8)
    disp = torch.zeros(1, 3, 16, 16, 16)
    disp[0, 0, 8, 8, 8] = 6.0  # 3 feature voxels at feature voxel (4, 4, 4)
    out = adam_refine(features, features, disp, 2, _plain_adam(iterations=1, lr=1.0, data_weight=0.0, reg_weight=0.65))
    assert out[0, 0, 8, 8, 8].item() == pytest.approx(4.0, abs=1e-4)  # 2 * (3 - 1)
    assert out[0, 0, 10, 8, 8].item() == pytest.approx(2.0, abs=1e-4)  # 2 * (0 + 1)
    assert out[0, 0, 12, 8, 8].item() == pytest.approx(0.0, abs=1e-6)


def test_adam_refinement_ends_with_its_full_resolution_smoothing():
    """No steps, no smoothing inside the loop, one final box pass of width 3 at factor 1: a spike of 27
    voxels becomes 1 voxel on its 3 x 3 x 3 neighbourhood and 0 elsewhere (the box filter's mean)."""
    from cyclereg.dense.instance import adam_refine

    features = torch.zeros(1, 1, 16, 16, 16)
    disp = torch.zeros(1, 3, 16, 16, 16)
    disp[0, 1, 8, 8, 8] = 27.0
    cfg = replace(_plain_adam(iterations=0), final_smooth_passes=1)
    out = adam_refine(features, features, disp, 1, cfg)
    want = torch.zeros_like(disp)
    want[0, 1, 7:10, 7:10, 7:10] = 1.0
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_the_regulariser_factor_scales_the_regulariser():
    """The spike of the step test with reg_factor 0 (and no data term): nothing pulls, the spike stays."""
    from cyclereg.dense.instance import adam_refine

    features = torch.zeros(1, 1, 8, 8, 8)
    disp = torch.zeros(1, 3, 16, 16, 16)
    disp[0, 0, 8, 8, 8] = 6.0
    out = adam_refine(features, features, disp, 2, _plain_adam(iterations=1, lr=1.0, data_weight=0.0,
                                                                reg_weight=0.65, reg_factor=0.0))
    assert out[0, 0, 8, 8, 8].item() == pytest.approx(6.0, abs=1e-4)
    assert out[0, 0, 9, 8, 8].item() == pytest.approx(3.0, abs=1e-4)  # halfway to the next feature voxel
    assert out[0, 0, 10, 8, 8].item() == pytest.approx(0.0, abs=1e-6)


def test_report_means_leave_out_missing_and_non_finite_values():
    from cyclereg.dense.api import _mean

    assert _mean([1.0, float("nan"), 3.0, None, float("inf")]) == 2.0
    assert math.isnan(_mean([None, float("nan")]))
