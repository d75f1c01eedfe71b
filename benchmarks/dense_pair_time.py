"""Time one dense test-time registration (seconds per pair) on random smooth volumes.

``python benchmarks/dense_pair_time.py 192 160 256 [--repeats 3] [--threads N] [--device auto|cpu|cuda]``

Registers a pair of random, smoothed ``(D, H, W)`` volumes with a random network and the
default :class:`cyclereg.dense.config.DensePipelineConfig` in three settings: one warp without
Adam, two warps with inverse consistency without Adam, and the full pipeline (two warps,
inverse consistency, Adam instance optimisation; the tool's default). The time of a pair does
not depend on the image content (fixed iteration counts), so no data set is needed; compare
with the reference implementation's 0.10 s (no Adam) and 0.31 s (with Adam) per pair on an
H100. Prints the median of ``--repeats`` timed runs after one untimed warm-up, and the peak
GPU memory on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from cyclereg.dense.config import DensePipelineConfig
from cyclereg.dense.network import random_feature_net
from cyclereg.dense.pipeline import min_volume_size, register
from cyclereg.device import resolve_device, synchronize
from cyclereg.errors import InputError, require_count

SMOOTHING = 5
"""Box-filter width (voxels) applied twice to the white noise, so the images have structure."""


def random_volume(shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """``(1, 1, D, H, W)`` smoothed white noise scaled to [0, 1]."""
    x = torch.rand(1, 1, *shape, generator=generator)
    for _ in range(2):
        x = F.avg_pool3d(x, SMOOTHING, stride=1, padding=SMOOTHING // 2, count_include_pad=False)
    return (x - x.min()) / (x.max() - x.min())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", type=int, nargs=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    base = DensePipelineConfig().validate()
    need = max(min_volume_size(base), SMOOTHING)
    try:  # bad input: one line before any work
        if min(args.shape) < need:
            raise InputError(f"shape {' '.join(map(str, args.shape))}: every axis needs at least {need} voxels")
        require_count("--repeats", args.repeats, 1)
        require_count("--threads", args.threads, 1)
        dev = resolve_device(args.device)
        g = torch.Generator().manual_seed(0)
        fixed, moving = (random_volume(tuple(args.shape), g).to(dev) for _ in range(2))
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    except (RuntimeError, MemoryError) as exc:  # torch's allocation failure (CPU or CUDA): one line
        ap.exit(1, f"error: shape {' '.join(map(str, args.shape))}: cannot make the two volumes "
                   f"({' '.join(str(exc).split())[:200]})\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    net = random_feature_net(base.net, 0).to(dev)
    settings = {"1 warp, no Adam": replace(base, warps=1, use_ic=False, use_adam=False),
                "2 warps + IC, no Adam": replace(base, use_adam=False),
                "2 warps + IC + Adam (default)": base}
    for name, cfg in settings.items():
        with torch.no_grad():
            register(fixed, moving, net, cfg)  # untimed warm-up
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        secs = []
        for _ in range(args.repeats):
            synchronize(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                register(fixed, moving, net, cfg)
            synchronize(dev)
            secs.append(time.perf_counter() - t0)
        extra = f", peak {torch.cuda.max_memory_allocated(dev) / 1e9:.2f} GB" if dev.type == "cuda" else ""
        print(f"{tuple(args.shape)} on {dev} ({torch.get_num_threads()} threads), {name}: "
              f"{statistics.median(secs):.2f} s per pair (median of {args.repeats}){extra}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
