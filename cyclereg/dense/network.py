"""Feature network ``g``: six 3x3x3 conv+BatchNorm+ReLU blocks and a 1x1x1 head.

A second 1x1x1 projection (no bias) maps the features after ``adam_layer`` blocks to
``adam_channels`` channels for Adam instance optimisation. Checkpoints store both, so a
"random" projection is reproducible.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cyclereg.dense.config import FeatureNetConfig


class FeatureNet(nn.Module):
    """``g``: ``(B, in_channels, D, H, W)`` -> ``(B, out_channels, D/8, H/8, W/8)``.

    Spatial sizes must be multiples of the total stride (the pipeline pads to that).
    """

    def __init__(self, cfg: FeatureNetConfig | None = None):
        super().__init__()
        self.cfg = cfg or FeatureNetConfig()
        blocks = []
        c_in = self.cfg.in_channels
        pad = self.cfg.kernel_size // 2
        for c_out, stride in zip(self.cfg.channels, self.cfg.strides):
            blocks.append(nn.Sequential(
                nn.Conv3d(c_in, c_out, self.cfg.kernel_size, stride=stride, padding=pad),
                nn.BatchNorm3d(c_out),
                nn.ReLU(inplace=True),
            ))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv3d(c_in, self.cfg.out_channels, 1)
        self.adam_proj = nn.Conv3d(self.cfg.channels[self.cfg.adam_layer - 1], self.cfg.adam_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)

    def forward_with_adam_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final features and the projected features after ``adam_layer`` blocks."""
        early = None
        for n, blk in enumerate(self.blocks, start=1):
            x = blk(x)
            if n == self.cfg.adam_layer:
                early = self.adam_proj(x)
        return self.head(x), early

    def adam_features(self, x: torch.Tensor) -> torch.Tensor:
        """Only the projected features after ``adam_layer`` blocks (cheap)."""
        for blk in self.blocks[: self.cfg.adam_layer]:
            x = blk(x)
        return self.adam_proj(x)


def init_random(net: FeatureNet, seed: int, scheme: str | None = None) -> FeatureNet:
    """Re-initialise ``net`` deterministically from ``seed`` (stage-0 "random" network).

    ``scheme`` defaults to ``net.cfg.random_init`` (see :class:`FeatureNetConfig`).
    BatchNorm keeps its fresh statistics (mean 0, variance 1), so in eval mode it is the
    identity, as in the reference's stage 0.
    """
    scheme = scheme or net.cfg.random_init
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv3d):
                fan_in = m.weight[0].numel()
                if scheme == "kaiming":
                    std = (2.0 / fan_in) ** 0.5
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * std)
                    if m.bias is not None:
                        m.bias.zero_()
                elif scheme == "torch":
                    # PyTorch's default: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                    bound = 1.0 / fan_in ** 0.5
                    m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) * bound)
                    if m.bias is not None:
                        m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1) * bound)
                else:
                    raise ValueError(f"random_init: expected 'kaiming' or 'torch', got {scheme!r}")
            elif isinstance(m, nn.BatchNorm3d):
                m.reset_parameters()
    return net


def random_feature_net(cfg: FeatureNetConfig | None = None, seed: int = 0) -> FeatureNet:
    """A freshly initialised network in eval mode."""
    return init_random(FeatureNet(cfg), seed).eval()
