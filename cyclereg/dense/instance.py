"""Adam instance optimisation of a dense field on CNN features with a diffusion regulariser."""

from __future__ import annotations

import torch

from cyclereg.dense import native
from cyclereg.dense.config import AdamConfig
from cyclereg.dense.convex import box_smooth, resample_disp, standardize
from cyclereg.frames import LOW_PRECISION
from cyclereg.warp import warp_unchecked


def warped_mse_torch(feat_fix: torch.Tensor, feat_mov: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """The data term of :func:`adam_refine` on the torch path: the mean over channels and voxels of
    ``(warp(feat_mov, disp) - feat_fix)^2`` (:func:`cyclereg.warp.warp_unchecked`, trilinear, border)."""
    return (warp_unchecked(feat_mov, disp) - feat_fix).pow(2).mean()


class WarpedMSE:
    """The data term of :func:`adam_refine` for one fixed/moving feature pair and many fields: the mean
    over channels and voxels of ``(warp(feat_mov, disp) - feat_fix)^2``, differentiable with
    respect to ``disp``. Through the C kernel of :mod:`cyclereg.dense.native` where it applies (float32
    CPU features that need no gradient; channels-last copies are made once, here), else the torch
    path (:func:`warped_mse_torch`); the two agree to float32 rounding, but for the gradient at whole-voxel
    sampling positions (the trilinear interpolation's kinks), where the kernel takes the slope of the cell above
    (0 on the borders) and the torch path the side its grid coordinates' float rounding lands on."""

    def __init__(self, feat_fix: torch.Tensor, feat_mov: torch.Tensor):
        self.feat_fix, self.feat_mov = feat_fix, feat_mov
        self.native = native.usable(feat_fix, feat_mov)
        if self.native:
            self.fix_cl, self.mov_cl = native.channels_last(feat_fix), native.channels_last(feat_mov)

    def __call__(self, disp: torch.Tensor) -> torch.Tensor:
        """Scalar data term of the field ``disp`` ``(1, 3, D, H, W)`` (voxels of the feature grid)."""
        if self.native and disp.device.type == "cpu" and disp.dtype == torch.float32:
            return native.warped_mse(self.fix_cl, self.mov_cl, disp)
        return warped_mse_torch(self.feat_fix, self.feat_mov, disp)


def diffusion_regularizer(disp: torch.Tensor) -> torch.Tensor:
    """Sum over the three axes of the mean squared forward difference of ``disp`` (voxels^2); an axis of one
    voxel has no difference and adds 0 (the mean of nothing was NaN)."""
    return sum((disp.diff(dim=a).pow(2).mean() for a in (2, 3, 4) if disp.shape[a] > 1), disp.new_zeros(()))


def adam_refine(feat_fix: torch.Tensor, feat_mov: torch.Tensor, disp: torch.Tensor, factor: int,
                cfg: AdamConfig) -> torch.Tensor:
    """Fine-tune a full-resolution field ``disp`` ``(1, 3, D, H, W)`` (image voxels).

    Args:
        feat_fix, feat_mov: ``(1, C, D/factor, H/factor, W/factor)`` features of the fixed
            and the original moving image (feature voxel ``n`` centred on image voxel
            ``factor * n``).
        disp: initial field in image voxels.
        factor: stride between the image grid and the feature grid (2 by default).
    Returns:
        The refined field ``(1, 3, D, H, W)`` in image voxels, of ``disp``'s dtype. Runs with
        gradients enabled internally (also when called under ``torch.inference_mode()``) but does
        not propagate them to its inputs. Half-precision inputs are optimised in float32 (Adam's
        ``eps`` of 1e-8 is 0 in float16, and its first step would divide 0 by 0).
    """
    dtype = disp.dtype
    if dtype in LOW_PRECISION:
        feat_fix, feat_mov, disp = feat_fix.float(), feat_mov.float(), disp.float()
    with torch.inference_mode(False):
        # inference tensors cannot be saved for the backward pass: plain copies are
        feat_fix, feat_mov, disp = (t.detach().clone() if t.is_inference() else t.detach()
                                    for t in (feat_fix, feat_mov, disp))
        return _adam_refine(feat_fix, feat_mov, disp, factor, cfg).to(dtype)


def _adam_refine(feat_fix: torch.Tensor, feat_mov: torch.Tensor, disp: torch.Tensor, factor: int,
                 cfg: AdamConfig) -> torch.Tensor:
    """:func:`adam_refine` on detached, non-inference inputs of one working dtype."""
    out_shape = tuple(disp.shape[2:])
    if cfg.normalize_features:
        feat_fix, feat_mov = standardize(feat_fix), standardize(feat_mov)
    low = resample_disp(disp, tuple(feat_fix.shape[2:]), float(factor))
    param = torch.nn.Parameter(low.clone())
    opt = torch.optim.Adam([param], lr=cfg.lr)
    data_term = WarpedMSE(feat_fix, feat_mov)
    with torch.enable_grad():
        for _ in range(cfg.iterations):
            opt.zero_grad(set_to_none=True)
            field = box_smooth(param, cfg.smooth_kernel, cfg.smooth_passes)
            data = data_term(field)
            loss = cfg.data_weight * data + cfg.reg_factor * cfg.reg_weight * diffusion_regularizer(field)
            loss.backward()
            opt.step()
    with torch.no_grad():
        field = box_smooth(param.detach(), cfg.smooth_kernel, cfg.smooth_passes)
        full = resample_disp(field, out_shape, 1.0 / factor)
        return box_smooth(full, cfg.smooth_kernel, cfg.final_smooth_passes)
