"""Time dense self-training iterations (network + convex optimiser + loss + backward) on
random volumes of a given shape: ``python benchmarks/dense_train_step.py 160 192 224
--iterations 2 --threads 1 [--device cuda] [--cpu-bf16]``. Prints seconds per iteration (and peak
GPU memory on CUDA). ``--cpu-bf16``: bfloat16 autocast on CPU (``DenseCycleConfig.cpu_bf16``)."""

from __future__ import annotations

import argparse
import time

import torch

from cyclereg.dense.pipeline import min_volume_size
from cyclereg.device import resolve_device, synchronize
from cyclereg.errors import InputError, require_count
from cyclereg.training.dense import DenseCycleConfig, DenseCycleTask, VolumeImage


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", type=int, nargs=3)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cpu-bf16", action="store_true", help="bfloat16 autocast on CPU")
    args = ap.parse_args(argv)
    try:  # bad input: one line before any work
        need = min_volume_size(DenseCycleConfig().pipeline)
        if min(args.shape) < need:
            raise InputError(f"shape {' '.join(map(str, args.shape))}: every axis needs at least {need} voxels")
        require_count("--iterations", args.iterations, 1)
        require_count("--batch-size", args.batch_size, 1)
        require_count("--threads", args.threads, 1)
        dev = resolve_device(args.device)
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    images = [VolumeImage(str(k), torch.rand(1, 1, *args.shape, generator=g)) for k in range(2)]
    cfg = DenseCycleConfig(iterations=args.iterations, batch_size=args.batch_size, cpu_bf16=args.cpu_bf16)
    task = DenseCycleTask(images, [(0, 1), (1, 0)], (1.0, 1.0, 1.0), cfg, dev)
    net = task.new_model(1)
    labels = {task.pair_id(k): torch.zeros(1, 3, *task.label_shape, dtype=torch.float16) for k in range(2)}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    task.train_stage(net, labels, {}, 1)
    synchronize(dev)
    sec = (time.perf_counter() - t0) / args.iterations
    extra = f", peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB" if dev.type == "cuda" else ""
    precision = " bfloat16 autocast" if args.cpu_bf16 and dev.type == "cpu" else ""
    print(f"{tuple(args.shape)} batch {args.batch_size} on {dev}{precision} ({torch.get_num_threads()} threads): "
          f"{sec:.2f} s per iteration{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
