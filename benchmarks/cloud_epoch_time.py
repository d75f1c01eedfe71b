"""Time one training epoch and one pseudo-label refresh of the keypoint-cloud cycle (CPU or CUDA).

``python benchmarks/cloud_epoch_time.py [DATASET_JSON] [--fold K] [--threads N] [--points F,M ...]
[--candidates K ...] [--learn-recentre-passes P] [--epochs E] [--device auto|cpu|cuda]``

For each ``--points`` setting and each ``--candidates`` K of the learning stream (``all`` = every
keypoint, or ``F,M`` random subsets per training sample) it builds fold ``K``'s training task with
the default :class:`cyclereg.training.clouds.CloudCycleConfig`, trains a fresh stage-1 network for
``E`` epochs (default 1; the time per epoch is their mean) on zero targets (the cost does not depend
on the targets) and refreshes the pseudo labels once. The kNN graphs that training keeps per pair
are built (and timed) first, once, as a run does. Never reads landmarks.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from cyclereg.datasets import load_keypoint_dataset, select_folds
from cyclereg.device import resolve_device, synchronize
from cyclereg.errors import InputError, require_count
from cyclereg.training.api import _cloud_task
from cyclereg.training.clouds import CloudCycleConfig


def _points(spec: str) -> tuple[int | None, int | None]:
    """A ``--points`` setting: ``all`` -> ``(None, None)``, ``F,M`` -> ``(F, M)``; :class:`InputError` otherwise."""
    if spec == "all":
        return None, None
    try:
        nf, nm = (int(v) for v in spec.split(","))
    except ValueError:
        nf = nm = 0
    if min(nf, nm) < 1:
        raise InputError(f"--points {spec}: expected 'all' or F,M (fixed and moving points, 1 or more each)")
    return nf, nm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", nargs="?", default="../shared/data/copd-keypoints/dataset.json")
    ap.add_argument("--fold", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--points", nargs="+", default=["1024,2048", "all"])
    ap.add_argument("--candidates", type=int, nargs="+", default=[CloudCycleConfig().reg.lbp.num_candidates],
                    help="LBP candidates K of the learning stream (the pseudo-label stream follows it)")
    ap.add_argument("--learn-recentre-passes", type=int, default=CloudCycleConfig().learn_recentre_passes,
                    help="re-centred passes of the learning stream (the shipped networks trained with 1)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs timed (their mean is reported)")
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    args = ap.parse_args()
    try:  # bad input: one line before any work
        require_count("--threads", args.threads, 1)
        require_count("--epochs", args.epochs, 1)
        require_count("--learn-recentre-passes", args.learn_recentre_passes, 0)
        for k in args.candidates:
            require_count("--candidates", k, 1)
        points = {spec: _points(spec) for spec in args.points}
        device = resolve_device(args.device)
        ds = load_keypoint_dataset(args.dataset)
        select_folds(ds, args.fold)
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    torch.set_num_threads(args.threads)
    for spec in args.points:
        nf, nm = points[spec]
        for k in args.candidates:
            base = CloudCycleConfig()
            cfg = replace(base, epochs=args.epochs, train_fixed_points=nf, train_moving_points=nm,
                          learn_recentre_passes=args.learn_recentre_passes,
                          reg=replace(base.reg, lbp=replace(base.reg.lbp, num_candidates=k)))
            task = _cloud_task(ds, args.fold, cfg, device)
            net = task.new_model(1)
            labels = {p.id: torch.zeros_like(p.fixed) for p in task.pairs}
            if device.type == "cuda":  # untimed warm-up: kernel loading, cuBLAS handles, allocator
                task.train_stage(net, labels, {}, 1)
            synchronize(device)
            tb = time.perf_counter()
            if hasattr(task, "pair_graphs"):  # kNN graphs kept per pair (since 2026-12-04): built once per run
                for pair in task.pairs:
                    task.pair_graphs(pair)
            synchronize(device)
            t0 = time.perf_counter()
            task.train_stage(net, labels, {}, 1)
            synchronize(device)
            t1 = time.perf_counter()
            task.make_pseudo_labels(net, 1)
            synchronize(device)
            t2 = time.perf_counter()
            epoch = (t1 - t0) / args.epochs
            per_stage = epoch * base.epochs + (t2 - t1)
            print(f"points {spec}, K {k}, learn-recentre {args.learn_recentre_passes}, {device}: "
                  f"graphs {t0 - tb:.1f} s (once), epoch {epoch:.1f} s (mean of {args.epochs}), pseudo-label refresh {t2 - t1:.1f} s, "
                  f"one {base.epochs}-epoch stage ~{per_stage:.0f} s ({args.threads} thread(s))", flush=True)


if __name__ == "__main__":
    main()
