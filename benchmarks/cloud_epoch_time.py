"""Time one training epoch and one pseudo-label refresh of the keypoint-cloud cycle (CPU).

``python benchmarks/cloud_epoch_time.py [DATASET_JSON] [--fold K] [--threads N] [--points F,M ...]``

For each ``--points`` setting (``all`` = every keypoint, or ``F,M`` random subsets per
training sample) it builds fold ``K``'s training task with the default
:class:`cyclereg.training.clouds.CloudCycleConfig`, trains a fresh stage-1 network for one
epoch on zero targets (the cost does not depend on the targets) and refreshes the pseudo
labels once. Never reads landmarks.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from cyclereg.datasets import load_keypoint_dataset
from cyclereg.training.api import _cloud_task
from cyclereg.training.clouds import CloudCycleConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", nargs="?", default="../shared/data/copd-keypoints/dataset.json")
    ap.add_argument("--fold", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--points", nargs="+", default=["1024,2048", "all"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_keypoint_dataset(args.dataset)
    for spec in args.points:
        nf, nm = (None, None) if spec == "all" else (int(v) for v in spec.split(","))
        cfg = replace(CloudCycleConfig(), epochs=1, train_fixed_points=nf, train_moving_points=nm)
        task = _cloud_task(ds, args.fold, cfg, torch.device("cpu"))
        net = task.new_model(1)
        labels = {p.id: torch.zeros_like(p.fixed) for p in task.pairs}
        t0 = time.perf_counter()
        task.train_stage(net, labels, {}, 1)
        t1 = time.perf_counter()
        task.make_pseudo_labels(net, 1)
        t2 = time.perf_counter()
        per_stage = (t1 - t0) * CloudCycleConfig().epochs + (t2 - t1)
        print(f"points {spec}: epoch {t1 - t0:.1f} s, pseudo-label refresh {t2 - t1:.1f} s, "
              f"one {CloudCycleConfig().epochs}-epoch stage ~{per_stage:.0f} s ({args.threads} thread(s))", flush=True)


if __name__ == "__main__":
    main()
