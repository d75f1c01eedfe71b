"""Dense (volume) path behaviour pinned by analytic values and invariants: the correlation and its patch mean,
inverse consistency, MIND, training targets, augmentation, difficulty-weighted sampling, pseudo-label
disagreement, metric-supervised baselines, random initialisation, determinant statistics, configuration
checks and intensity normalisation (each test fails on a specific mutation of the library; 2026-12-07 audit)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from cyclereg.dense.config import ConvexConfig, DensePipelineConfig, FeatureNetConfig, config_from_dict
from cyclereg.dense.convex import correlate, displacement_set, inverse_consistency, standardize
from cyclereg.dense.pipeline import pad_to_multiple
from cyclereg.metrics import determinant_stats


# ----------------------------------------------------------------------------- convex optimiser h
def test_pad_to_multiple_pads_only_at_the_far_end_of_each_axis():
    """The pipeline crops its field to [:D, :H, :W]: the original voxels must keep their indices."""
    x = torch.rand(1, 2, 9, 10, 17, generator=torch.Generator().manual_seed(0))
    p = pad_to_multiple(x, 8)
    assert p.shape[2:] == (16, 16, 24)
    assert torch.equal(p[:, :, :9, :10, :17], x)
    assert torch.equal(p[:, :, 9:, :10, :17], x[:, :, -1:].expand(1, 2, 7, 10, 17))  # replicated edge


def test_standardize_gives_each_channel_of_each_volume_zero_mean_unit_std():
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 3, 5, 6, 7, generator=g) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1, 1)
    feat = feat + torch.tensor([[10.0], [-3.0]]).view(2, 1, 1, 1, 1)  # per-volume offsets
    s = standardize(feat)
    torch.testing.assert_close(s.mean((2, 3, 4)), torch.zeros(2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.std((2, 3, 4)), torch.ones(2, 3), atol=1e-4, rtol=0)


def test_correlate_equals_its_definition_with_the_patch_mean():
    """cost[n, x] = mean over the 3^3 patch around x (replicate padding) of mean_c |f(x') - m(x' + o_n)|,
    m replicated outside the volume."""
    g = torch.Generator().manual_seed(1)
    f = torch.randn(1, 2, 4, 5, 6, generator=g, dtype=torch.float64)
    m = torch.randn(1, 2, 4, 5, 6, generator=g, dtype=torch.float64)
    cfg = ConvexConfig(radius=1, patch_size=3)
    got = correlate(f, m, cfg)[0].numpy()
    fn, mn = f[0].numpy(), m[0].numpy()
    D, H, W = fn.shape[1:]
    clamp = lambda v, n: min(max(v, 0), n - 1)  # noqa: E731
    raw = np.zeros((27, D, H, W))
    for n, o in enumerate(displacement_set(1).long().tolist()):
        for x in np.ndindex(D, H, W):
            y = (clamp(x[0] + o[0], D), clamp(x[1] + o[1], H), clamp(x[2] + o[2], W))
            raw[(n,) + x] = np.abs(fn[(slice(None),) + x] - mn[(slice(None),) + y]).mean()
    want = np.zeros_like(raw)
    for x in np.ndindex(D, H, W):
        acc = 0.0
        for d in np.ndindex(3, 3, 3):
            acc = acc + raw[:, clamp(x[0] + d[0] - 1, D), clamp(x[1] + d[1] - 1, H), clamp(x[2] + d[2] - 1, W)]
        want[(slice(None),) + x] = acc / 27
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_inverse_consistency_updates_both_fields_from_the_previous_iterate():
    """Constant fields: warp(b, a) = b, so one iteration gives a' = (a - b) / 2 and b' = (b - a) / 2 (Jacobi
    update as documented; a Gauss-Seidel update b' = (b - a') / 2 would give (3b - a) / 4)."""
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, 5, 6, 7).contiguous()
    b = torch.tensor([0.2, 1.0, -1.5], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, 5, 6, 7).contiguous()
    a1, b1 = inverse_consistency(a, b, 1)
    torch.testing.assert_close(a1, (a - b) / 2)
    torch.testing.assert_close(b1, (b - a) / 2)


def test_inverse_consistency_gets_the_field_of_the_swapped_pair_as_its_backward_field(monkeypatch):
    """coarse_field(ic=True) pairs the forward field with the one of the *reverse* registration
    (moving features -> fixed features), not with a copy of the forward one."""
    import cyclereg.dense.pipeline as pipeline

    g = torch.Generator().manual_seed(2)
    ff, fm = torch.randn(1, 4, 6, 6, 6, generator=g), torch.randn(1, 4, 6, 6, 6, generator=g)
    cfg = DensePipelineConfig(convex=ConvexConfig(radius=1))
    seen = []
    monkeypatch.setattr(pipeline, "inverse_consistency", lambda a, b, n: seen.append((a, b)) or (a, b))
    pipeline.coarse_field(ff, fm, cfg, ic=True)
    forward = pipeline.coarse_field(ff, fm, cfg, ic=False)
    backward = pipeline.coarse_field(fm, ff, cfg, ic=False)
    torch.testing.assert_close(seen[0][0], forward)
    torch.testing.assert_close(seen[0][1], backward)


# ----------------------------------------------------------------------------- similarity (metric baselines)
def test_mind_of_a_linear_ramp_is_its_analytic_descriptor():
    """I = i + 2 j: away from the border the 12 SSC distances are d^2 (6 channels), 4 d^2 (4) and 9 d^2 (2),
    their mean 10/3 d^2 is the variance, and the max-normalised descriptor is exp(-(dist - d^2) / var):
    1, exp(-0.9), exp(-2.4)."""
    from cyclereg.dense.similarity import mind_ssc

    i, j, _ = torch.meshgrid(*(torch.arange(12.0),) * 3, indexing="ij")
    desc = mind_ssc((i + 2 * j)[None, None].double(), radius=1, dilation=2)
    inner = desc[0, :, 3:-3, 3:-3, 3:-3].reshape(12, -1)
    values = sorted(inner[:, 0].tolist())
    want = sorted([1.0] * 6 + [math.exp(-0.9)] * 4 + [math.exp(-2.4)] * 2)
    assert values == pytest.approx(want, abs=1e-9)
    assert (inner - inner[:, :1]).abs().max() < 1e-9  # the same descriptor at every interior voxel


def test_mind_of_an_image_with_flat_regions_is_finite():
    """Preprocessed CT is clipped: whole regions are flat (zero local variance). The variance clamp keeps
    their descriptor finite (1 everywhere there) instead of 0 / 0."""
    from cyclereg.dense.similarity import mind_loss, mind_ssc

    img = torch.zeros(1, 1, 16, 16, 16)
    img[..., 8:, :, :] = torch.rand(1, 1, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    desc = mind_ssc(img)
    assert torch.isfinite(desc).all()
    assert torch.equal(desc[0, :, :3], torch.ones(12, 3, 16, 16))
    assert torch.isfinite(mind_loss(img, img.roll(1, dims=3)))


# ----------------------------------------------------------------------------- training of the volume path
def _task(n_images=2, pairs=((0, 1),), **changes):
    from cyclereg.training.dense import DenseCycleConfig, DenseCycleTask, VolumeImage

    g = torch.Generator().manual_seed(0)
    images = [VolumeImage(f"c{k}", torch.rand(1, 1, 16, 16, 16, generator=g)) for k in range(n_images)]
    return DenseCycleTask(images, list(pairs), (1.0, 1.0, 1.0),
                          replace(DenseCycleConfig(), augment=False, **changes), torch.device("cpu"))


def test_transform_target_of_a_linear_field_on_the_label_grid():
    """u(y) = B y + c (label voxels, linear: trilinear sampling is exact). In label-grid coordinates the
    augmentations are T_f y = A_f y + b_f / s and T_m y = A_m y + b_m / s, and the target is
    T_m^-1(T_f y + u(T_f y)) - y. (A constant u cannot tell whether u is sampled at T_f y or at y.)"""
    from cyclereg.training.dense import transform_target

    s, shape = 2, (12, 12, 12)
    A_f = torch.eye(3, dtype=torch.float64) + 0.04 * torch.tensor([[1.0, -1, 0.5], [0.3, -0.5, 1], [0, 0.4, 1]],
                                                                   dtype=torch.float64)
    b_f = torch.tensor([0.6, -0.4, 0.2], dtype=torch.float64)
    a = math.radians(8)
    A_m = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=torch.float64)
    b_m = torch.tensor([0.5, 1.0, -0.6], dtype=torch.float64)
    B = 0.05 * torch.tensor([[1.0, 0.5, 0], [-0.5, 0.2, 1], [0.3, 0, -1]], dtype=torch.float64)
    c = torch.tensor([0.3, -0.2, 0.4], dtype=torch.float64)
    y = torch.stack(torch.meshgrid(*(torch.arange(float(n), dtype=torch.float64) for n in shape), indexing="ij"), -1)
    u = (y @ B.T + c).permute(3, 0, 1, 2).unsqueeze(0)
    got = transform_target(u.float(), (A_f, b_f), (A_m, b_m), stride=s)[0].permute(1, 2, 3, 0).double()
    z = y @ A_f.T + b_f / s
    want = (z + z @ B.T + c - b_m / s) @ torch.linalg.inv(A_m).T - y
    inner = (slice(2, -2),) * 3  # T_f y stays inside the grid
    torch.testing.assert_close(got[inner], want[inner], atol=1e-4, rtol=0)


def test_random_pair_affines_move_the_pair_relative_to_each_other_and_scale_the_translation():
    """A_mov = R A_fix with R = I + N(0, aug_relative_std^2); the fixed translation is a fraction
    aug_translation_std of the half extent (10 mm here, 1 mm voxels: 0.75 voxels)."""
    from cyclereg.training.dense import DenseCycleConfig, random_pair_affines

    cfg, g = DenseCycleConfig(), torch.Generator().manual_seed(0)
    rel, lin, shift = [], [], []
    centre = torch.full((3,), 10.0, dtype=torch.float64)
    for _ in range(300):
        (A_f, b_f), (A_m, _) = random_pair_affines(g, cfg, (21, 21, 21), (1.0, 1.0, 1.0))
        rel.append(A_m @ torch.linalg.inv(A_f) - torch.eye(3, dtype=torch.float64))
        lin.append(A_f - torch.eye(3, dtype=torch.float64))
        shift.append(A_f @ centre + b_f - centre)
    assert torch.stack(rel).std().item() == pytest.approx(cfg.aug_relative_std, rel=0.15)
    assert torch.stack(lin).std().item() == pytest.approx(cfg.aug_linear_std, rel=0.15)
    assert torch.stack(shift).std().item() == pytest.approx(cfg.aug_translation_std * 10.0, rel=0.15)


def test_strided_keeps_a_constant_image_constant_at_the_border():
    from cyclereg.training.dense import strided

    out = strided(torch.full((1, 1, 9, 8, 7), 3.0), 2)
    assert out.shape[2:] == (5, 4, 4) and torch.allclose(out, torch.full_like(out, 3.0))


def test_training_draws_pairs_by_their_sampling_weights(monkeypatch):
    """A pair of weight 0 is never drawn (difficulty-weighted sampling reaches torch.multinomial)."""
    task = _task(3, ((0, 1), (1, 2)), iterations=6, batch_size=2)
    drawn = []

    def batch(idx, labels, g):
        drawn.extend(idx)
        return torch.zeros(2, 1, 16, 16, 16), torch.zeros(2, 1, 16, 16, 16), torch.zeros(2, 3, 8, 8, 8)

    monkeypatch.setattr(task, "_batch", batch)
    monkeypatch.setattr(task, "_loss", lambda model, *a: sum(p.pow(2).sum() for p in model.parameters()))
    labels = {task.pair_id(k): torch.zeros(1, 3, 8, 8, 8) for k in range(2)}
    task.train_stage(task.new_model(1), labels, {task.pair_id(0): 0.0, task.pair_id(1): 1.0}, 1)
    assert drawn == [1] * 12


def test_dense_pseudo_label_disagreement_and_label_grid_resampling(monkeypatch):
    """Network output raw = 0.5 + 0.2 k label voxels along i; refined image-grid field = 0.1 i image voxels along i,
    i.e. 0.1 y label voxels at label voxel y (image voxel 2 y). The disagreement is |label - raw| in mm over
    the interior (not the label's length), and it drives the sampling weights."""
    import cyclereg.training.dense as dense

    task = _task(3, ((0, 1), (1, 2)), loss_border=1)
    amp = {task.images[0].image.data_ptr(): 1.0, task.images[1].image.data_ptr(): 10.0}

    def raw(model, f, m, cfg, stride=1, **k):
        out = torch.zeros(1, 3, 8, 8, 8)
        out[:, 0] = 0.5 + 0.2 * torch.arange(8.0)  # varies along k: the interior crop of every axis counts
        return out

    def full(f, m, model, cfg):
        out = torch.zeros(1, 3, 16, 16, 16)
        out[:, 0] = amp[f.data_ptr()] * 0.1 * torch.arange(16.0).view(16, 1, 1)
        return out

    monkeypatch.setattr(dense, "predict_displacement", raw)
    monkeypatch.setattr(dense, "register", full)
    model = torch.nn.Identity()
    r, label = task.pseudo_label(model, 0)
    y = torch.arange(8.0).view(8, 1, 1).expand(8, 8, 8)
    torch.testing.assert_close(label[0, 0], 0.1 * y, atol=1e-5, rtol=0)
    part = task._label_part(model, 0)
    diff = 0.1 * y - 0.5 - 0.2 * torch.arange(8.0)
    want = diff[1:-1, 1:-1, 1:-1].abs().mean().item() * 2.0  # interior (loss_border 1); label voxel = 2 mm
    assert part["disagreement"] == pytest.approx(want, rel=1e-4)
    _, info = task.make_pseudo_labels(model, 1)
    w = info["weights"]
    assert w[task.pair_id(0)] > w[task.pair_id(1)]  # pair 1 disagrees more: drawn less


@pytest.mark.parametrize("metric", ["ncc", "mind"])
def test_metric_supervised_loss_prefers_the_true_shift_and_adds_the_weighted_regulariser(monkeypatch, metric):
    """moving(y) = fixed(y - 2 e_j) (image voxels) -> the true field is +1 label voxel along j. The loss of
    that field is below those of 0 and -1; the regulariser enters with metric_reg_weight."""
    import torch.nn.functional as F

    import cyclereg.training.dense as dense
    from cyclereg.dense.instance import diffusion_regularizer

    g = torch.Generator().manual_seed(0)
    big = torch.randn(1, 1, 24, 28, 24, generator=g)
    for _ in range(3):
        big = F.avg_pool3d(F.pad(big, (1,) * 6, mode="replicate"), 3, stride=1)
    fixed, moving = big[:, :, 4:20, 6:22, 4:20], big[:, :, 4:20, 4:20, 4:20]
    fields = {}
    for v in (-1.0, 0.0, 1.0):
        fields[v] = torch.zeros(1, 3, 8, 8, 8)
        fields[v][:, 1] = v
    task = _task(supervision=metric)
    losses = {}
    for v, fld in fields.items():
        monkeypatch.setattr(dense, "predict_displacement", lambda *a, fld=fld, **k: fld)
        losses[v] = task._loss(None, fixed, moving, None).item()
    assert losses[1.0] < min(losses[0.0], losses[-1.0])
    wavy = 0.3 * torch.sin(torch.arange(8.0)).view(1, 1, 8, 1, 1).expand(1, 3, 8, 8, 8).contiguous()
    monkeypatch.setattr(dense, "predict_displacement", lambda *a, **k: wavy)
    one = task._loss(None, fixed, moving, None)
    task.config = replace(task.config, metric_reg_weight=3.0)
    three = task._loss(None, fixed, moving, None)
    assert (three - one).item() == pytest.approx(2.0 * diffusion_regularizer(wavy).item(), rel=1e-5)


def test_kaiming_random_init_has_he_normal_weights_and_zero_biases():
    from cyclereg.dense.network import random_feature_net

    net = random_feature_net(FeatureNetConfig(), seed=0)
    assert not net.training  # eval: BatchNorm uses its fresh statistics (the identity), not the batch's
    conv = net.blocks[3][0]  # 128 x 64 x 27 weights
    fan_in = conv.weight[0].numel()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.02)
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))


# ----------------------------------------------------------------------------- scores
def test_determinant_stats_count_folds_over_every_determinant_and_leave_zero_out_of_the_log():
    """determinant_stats(J): folding_fraction over all given determinants (J <= 0), std_logj the sample std
    of log J over J > 0 only (a J of exactly 0 would make it -inf / NaN)."""
    J = torch.ones(1, 4, 4, 4, dtype=torch.float64)
    J[0, 0, 0, 0] = -0.5  # a fold on the outer layer of the determinants
    J[0, 0, 0, 1] = 0.0  # a collapse
    J[0, 2, 2, 2] = math.e
    s = determinant_stats(J)
    assert s["folding_fraction"] == pytest.approx(2 / 64)
    pos = torch.log(J[J > 0])
    assert s["std_logj"] == pytest.approx(pos.std().item(), rel=1e-12) and math.isfinite(s["std_logj"])


# ----------------------------------------------------------------------------- configuration
def test_config_validation_refuses_an_inconsistent_padding_and_label_stride():
    from cyclereg.training.dense import DenseCycleConfig

    with pytest.raises(ValueError, match="pad_multiple"):
        DensePipelineConfig(pad_multiple=12).validate()
    with pytest.raises(ValueError, match="label_stride"):
        DenseCycleConfig(label_stride=3).validate()
    with pytest.raises(ValueError, match="warps"):  # a stored configuration is validated when read
        config_from_dict({"warps": 3})


def test_preprocessing_mode_from_the_modality_hint_and_the_intensities():
    from cyclereg.dense.config import PreprocessConfig
    from cyclereg.dense.data import preprocess, resolve_mode

    cfg, ct, mr = PreprocessConfig(), torch.tensor([-1000.0, 50.0]), torch.tensor([0.0, 800.0])
    assert resolve_mode(ct, cfg) == "ct" and resolve_mode(mr, cfg) == "mri"
    assert resolve_mode(mr, cfg, "CT") == "ct" and resolve_mode(ct, cfg, "MRI") == "mri"
    assert resolve_mode(ct, cfg, "T1w") == "mri"
    # percentiles of a volume above the subsampling size come from a regular subsample of all of it
    big = torch.linspace(0.0, 1.0, 2_500_001)
    out = preprocess(big, PreprocessConfig(mode="mri"))
    assert out[1_250_000].item() == pytest.approx(0.5, abs=1e-3)


def test_register_records_the_learn2reg_sdlogj_and_folding_of_its_field(tmp_path, monkeypatch):
    """register's config.json reports sdlogj() of the field it wrote (the Jacobian map's replicated border is
    not part of it)."""
    import json

    import nibabel as nib
    import torch.nn.functional as F

    import cyclereg.dense.api as api
    from cyclereg.metrics import sdlogj

    shape = (12, 12, 12)
    g = torch.Generator().manual_seed(0)
    for name in ("f.nii.gz", "m.nii.gz"):
        nib.save(nib.Nifti1Image((torch.rand(*shape, generator=g) * 1000).numpy(), np.eye(4)), str(tmp_path / name))
    u = 3.0 * F.avg_pool3d(torch.randn(1, 3, *shape, generator=g), 3, 1, 1)  # folds here and there
    monkeypatch.setattr(api, "register_pair", lambda *a, **k: u.clone())
    api.register_volume_files(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", tmp_path / "out", device="cpu")
    rec = json.loads((tmp_path / "out" / "config.json").read_text())
    want = sdlogj(u)
    assert 0 < want["folding_fraction"] < 1
    assert rec["sdlogj"] == pytest.approx(want["sdlogj"], rel=1e-5)
    assert rec["folding_fraction"] == pytest.approx(want["folding_fraction"], rel=1e-9)


def test_coarse_field_ignores_the_scale_and_offset_of_each_volumes_features():
    """normalize_features: the optimiser sees standardised features, so a per-volume, per-channel affine
    change of the features (what a random or retrained network's scale does) leaves the field unchanged."""
    from cyclereg.dense.pipeline import coarse_field

    g = torch.Generator().manual_seed(3)
    ff = torch.randn(1, 4, 6, 6, 6, generator=g, dtype=torch.float64)
    fm = ff.roll(1, dims=2) + 0.3 * torch.randn(1, 4, 6, 6, 6, generator=g, dtype=torch.float64)
    scale = torch.tensor([3.0, 0.5, 10.0, 1.0], dtype=torch.float64).view(1, 4, 1, 1, 1)
    cfg = DensePipelineConfig()
    for ic in (False, True):
        plain = coarse_field(ff, fm, cfg, ic=ic)
        changed = coarse_field(ff * scale + 2.0, fm * scale.flip(1) - 5.0, cfg, ic=ic)
        assert plain.abs().max() > 0.1
        torch.testing.assert_close(changed, plain, atol=1e-4, rtol=0)  # eps of the std: ~1e-6


def test_composition_error_samples_the_backward_field_at_the_forward_target():
    """a = (1, 0, 0), b_0 = -0.5 i: a(x) + b(x + a(x)) = 1 - 0.5 (i + 1) (the last plane clamps to D - 1);
    adding the fields at x instead gives 1 - 0.5 i."""
    from cyclereg.dense.convex import composition_error

    D = 6
    a = torch.zeros(1, 3, D, 4, 5, dtype=torch.float64)
    a[:, 0] = 1.0
    b = torch.zeros_like(a)
    b[:, 0] = -0.5 * torch.arange(float(D), dtype=torch.float64).view(D, 1, 1)
    want = torch.tensor([abs(1 - 0.5 * min(i + 1, D - 1)) for i in range(D)], dtype=torch.float64).mean()
    assert composition_error(a, b).item() == pytest.approx(want.item(), abs=1e-9)


def test_a_strided_prediction_covers_every_image_voxel_of_an_odd_sized_volume():
    """Output voxel n of stride s is image voxel s n: an axis of 17 voxels has 9 of them (0, 2, ..., 16), the
    label grid of the training (ceil(D / s)), whatever the parity; the stride-1 field is the full grid."""
    import torch.nn.functional as F

    from cyclereg.dense.network import random_feature_net
    from cyclereg.dense.pipeline import predict_displacement

    g = torch.Generator().manual_seed(0)
    f, m = (F.avg_pool3d(torch.randn(1, 1, 17, 18, 19, generator=g), 3, 1, 1) for _ in range(2))
    net, cfg = random_feature_net(FeatureNetConfig(), 0), DensePipelineConfig()
    with torch.no_grad():
        assert predict_displacement(net, f, m, cfg, stride=2).shape == (1, 3, 9, 9, 10)
        assert predict_displacement(net, f, m, cfg).shape == (1, 3, 17, 18, 19)
