"""Dense registration pipeline: network ``g`` + optimiser ``h`` (+ refinement).

Two entry points, matching the two streams of cyclical self-training:

* :func:`predict_displacement` - differentiable network + coupled convex optimiser
  (the training stream calls it with gradients);
* :func:`register` - the full pseudo-label / test-time pipeline without gradients:
  inverse consistency, optional second warp and Adam instance optimisation.

Inputs are preprocessed images ``(B, 1, D, H, W)`` on one grid (see
:mod:`cyclereg.dense.data` for preprocessing); outputs are fields ``(B, 3, D, H, W)`` in
voxels of that grid, fixed -> moving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cyclereg.dense.config import DensePipelineConfig
from cyclereg.dense.convex import (coupled_convex, correlate, inverse_consistency, standardize,
                                   upsample_field)
from cyclereg.dense.instance import adam_refine
from cyclereg.dense.network import FeatureNet
from cyclereg.errors import python_number, whole_number
from cyclereg.frames import require_tensor
from cyclereg.metrics import SDLOGJ_MIN_SIZE
from cyclereg.warp import compose, warp_unchecked


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad ``(B, C, D, H, W)`` at the far end of each axis to multiples of ``multiple``
    (voxel indices of the original voxels are unchanged)."""
    multiple = python_number(multiple)
    if not whole_number(multiple) or multiple < 1:
        raise ValueError(f"multiple: expected a whole number >= 1, got {multiple!r}")
    pads = []
    for s in reversed(x.shape[2:]):
        pads += [0, (-s) % multiple]
    if not any(pads):
        return x
    return F.pad(x, pads, mode="replicate")


def _crop(x: torch.Tensor, shape) -> torch.Tensor:
    return x[:, :, : shape[0], : shape[1], : shape[2]]


def min_volume_size(cfg: DensePipelineConfig) -> int:
    """Fewest voxels a volume needs along every axis for ``cfg``: one more than the network's
    downsampling, so that its coarsest feature grid has two voxels per axis (features are
    standardised over that grid), and at least :data:`cyclereg.metrics.SDLOGJ_MIN_SIZE`, so that
    the field's smoothness can be scored."""
    return max(cfg.net.downsampling + 1, SDLOGJ_MIN_SIZE)


def _check_pair(fixed: torch.Tensor, moving: torch.Tensor, cfg: DensePipelineConfig, net: FeatureNet) -> None:
    """:class:`ValueError` naming the argument unless both images are ``(B, C, D, H, W)`` on one grid, of the
    network's dtype and device (a float64 or integer image met the float32 convolution as a torch error)."""
    for name, image in (("fixed", fixed), ("moving", moving)):
        require_tensor(name, image)
        if image.ndim != 5:
            raise ValueError(f"{name}: expected (B, C, D, H, W), got {tuple(image.shape)}")
        if image.shape[0] == 0:
            raise ValueError(f"{name}: an empty batch {tuple(image.shape)}; give at least one image")
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must share one grid")
    weights = next(iter(net.parameters()), None)
    if weights is not None:
        for name, image in (("fixed", fixed), ("moving", moving)):
            if (image.dtype, image.device) != (weights.dtype, weights.device):
                raise ValueError(f"{name}: {image.dtype} on {image.device}, but the network is {weights.dtype} on "
                                 f"{weights.device}; give the images as the network's (e.g. {name}.to(weights))")
    need = min_volume_size(cfg)
    if min(fixed.shape[2:]) < need:  # a 1-voxel feature grid has no spread to standardise: NaN features
        raise ValueError(f"fixed: {tuple(fixed.shape[2:])} voxels, every axis needs at least {need} (the network "
                         f"downsamples by {cfg.net.downsampling})")


def coarse_field(feat_fix: torch.Tensor, feat_mov: torch.Tensor, cfg: DensePipelineConfig,
                 ic: bool = False) -> torch.Tensor:
    """Optimiser ``h`` on the feature grid: correlation + coupled convex (+ inverse
    consistency). Returns ``(B, 3, d, h, w)`` in feature voxels."""
    cc = cfg.convex
    if cc.normalize_features:
        feat_fix, feat_mov = standardize(feat_fix), standardize(feat_mov)
    field = coupled_convex(correlate(feat_fix, feat_mov, cc), cc)
    if ic:
        back = coupled_convex(correlate(feat_mov, feat_fix, cc), cc)
        field, _ = inverse_consistency(field, back, cc.ic_iterations)
    return field


def predict_displacement(net: FeatureNet, fixed: torch.Tensor, moving: torch.Tensor,
                         cfg: DensePipelineConfig, *, ic: bool = False,
                         feat_fix: torch.Tensor | None = None, stride: int = 1) -> torch.Tensor:
    """Differentiable ``h(g(F), g(M))`` upsampled to the image grid (or a strided grid).

    Args:
        net: feature network (its train/eval mode is left as the caller set it).
        fixed, moving: ``(B, 1, D, H, W)`` preprocessed images on one grid (any size;
            padded internally to ``cfg.pad_multiple``).
        ic: apply inverse consistency (not used in training by the reference).
        feat_fix: precomputed ``net`` features of the padded fixed image (optional).
        stride: output grid stride (1: the image grid; 2: every second image voxel, output
            voxel ``n`` at image voxel ``stride * n``, as the training loss uses). Must divide
            the network's downsampling.
    Returns:
        ``(B, 3, ceil(D/stride), ceil(H/stride), ceil(W/stride))`` displacement in voxels of
        the output grid.
    """
    _check_pair(fixed, moving, cfg, net)
    ds = cfg.net.downsampling
    if stride < 1 or ds % stride:
        raise ValueError(f"stride: must divide the network's downsampling {ds}, got {stride}")
    shape = tuple(-(-s // stride) for s in fixed.shape[2:])
    f = pad_to_multiple(fixed, cfg.pad_multiple)
    m = pad_to_multiple(moving, cfg.pad_multiple)
    if feat_fix is None:
        feat_fix = net(f)
    feat_mov = net(m)
    field = coarse_field(feat_fix, feat_mov, cfg, ic=ic)
    out = upsample_field(field, ds // stride, tuple(s // stride for s in f.shape[2:]), cfg.convex)
    return _crop(out, shape)


@torch.no_grad()
def register(fixed: torch.Tensor, moving: torch.Tensor, net: FeatureNet, cfg: DensePipelineConfig) -> torch.Tensor:
    """Full pipeline (pseudo labels / test time), no gradients.

    ``cfg.warps`` passes of :func:`predict_displacement` (the second on the moving image
    warped by the first, fields composed), inverse consistency if ``cfg.use_ic``, then
    Adam instance optimisation on the projected early features of the fixed and the
    original moving image if ``cfg.use_adam``.

    Args:
        fixed, moving: ``(1, 1, D, H, W)`` preprocessed images on one grid.
    Returns:
        ``(1, 3, D, H, W)`` displacement, image voxels, fixed -> moving.
    """
    cfg.validate()
    _check_pair(fixed, moving, cfg, net)
    if fixed.shape[0] != 1:
        return torch.cat([register(fixed[b:b + 1], moving[b:b + 1], net, cfg) for b in range(fixed.shape[0])])
    shape = tuple(fixed.shape[2:])
    f = pad_to_multiple(fixed, cfg.pad_multiple)
    m = pad_to_multiple(moving, cfg.pad_multiple)
    feat_fix, adam_fix = net.forward_with_adam_features(f)
    disp = predict_displacement(net, f, m, cfg, ic=cfg.use_ic, feat_fix=feat_fix)
    if cfg.warps == 2:
        warped = warp_unchecked(m, disp)
        second = predict_displacement(net, f, warped, cfg, ic=cfg.use_ic, feat_fix=feat_fix)
        # warped(x) = m(x + disp(x)); sampling it at x + second(x) -> apply second, then disp
        disp = compose(second, disp)
    if cfg.use_adam:
        adam_mov = net.adam_features(m)
        disp = adam_refine(adam_fix, adam_mov, disp, cfg.net.adam_downsampling, cfg.adam)
    return _crop(disp, shape)
