"""Register a volume to itself with the dense pipeline: how far from the identity each stage leaves it.

``python benchmarks/self_registration.py [--size 64 56 72] [--threads 2] [--volume SCAN.nii.gz]``

A scan registered to itself should give a zero field. Prints, per test-time setting (warps,
inverse consistency, Adam), the largest and the mean displacement length [image voxels] of a random
network's registration of one volume (random smooth noise of ``--size``, or ``--volume``) to itself,
and the two rounding-level inputs that Adam's instance optimisation sees: how far ``warp(m, 0)``
is from ``m``, and the first pass's coarse field without inverse consistency.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from cyclereg.dense.api import load_model, register_pair, require_volume_size
from cyclereg.dense import pipeline
from cyclereg.errors import InputError, require_count
from cyclereg.volumeio import Volume, read_nifti
from cyclereg.warp import warp

SMOOTHING = 2
"""Passes of a 3-voxel box filter over the random volume (a smooth, textured image)."""

SETTINGS = (("1 warp, IC, no Adam", dict(warps=1, use_ic=True, use_adam=False)),
            ("1 warp, no IC, no Adam", dict(warps=1, use_ic=False, use_adam=False)),
            ("2 warps, IC, no Adam", dict(warps=2, use_ic=True, use_adam=False)),
            ("1 warp, IC, Adam", dict(warps=1, use_ic=True, use_adam=True)),
            ("2 warps, IC, Adam (default)", dict(warps=2, use_ic=True, use_adam=True)))


def smooth_volume(size: tuple[int, int, int], seed: int = 0) -> Volume:
    """Random noise smoothed by :data:`SMOOTHING` box passes, on a 2 mm grid."""
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, *size, generator=g)
    for _ in range(SMOOTHING):
        x = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False)
    return Volume(data=x[0, 0] * 100, affine=np.diag([2.0, 2.0, 2.0, 1.0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=(64, 56, 72))
    ap.add_argument("--volume", help="a NIfTI scan instead of random noise")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:  # a missing or unreadable scan, a size or thread count out of range: one line
        require_count("--threads", args.threads, 1)
        net, cfg = load_model("random", 0, "cpu")[:2]
        need = pipeline.min_volume_size(cfg)
        if args.volume is None and min(args.size) < need:
            raise InputError(f"--size {' '.join(map(str, args.size))}: every axis needs at least {need} voxels")
        torch.set_num_threads(args.threads)
        vol = read_nifti(args.volume) if args.volume else smooth_volume(tuple(args.size))
        require_volume_size(cfg, vol)
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    print(f"volume {tuple(vol.shape)}, spacing {vol.spacing} mm, random network (seed 0)")
    with torch.no_grad():
        for name, change in SETTINGS:
            u = register_pair(vol, vol, net, replace(cfg, **change))
            length = u.norm(dim=1)
            print(f"{name:30s} max |u| {length.max().item():.2e}  mean |u| {length.mean().item():.2e} voxels")
        m = vol.data[None, None].float()
        print(f"warp(m, 0) - m: max {(warp(m, torch.zeros(1, 3, *m.shape[2:])) - m).abs().max().item():.2e} "
              f"(intensity range {(m.max() - m.min()).item():.1f})")
        f = pipeline.pad_to_multiple(m, cfg.pad_multiple)
        feat = net(f)
        coarse = pipeline.coarse_field(feat, net(f.clone()), cfg, ic=False)
        print(f"first pass coarse field without IC: max {coarse.abs().max().item():.2e} feature voxels")


if __name__ == "__main__":
    main()
