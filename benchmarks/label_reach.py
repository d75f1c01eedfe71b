"""How many pseudo labels the learning stream's single LBP pass can reach (no landmarks read).

``python benchmarks/label_reach.py [MODEL_DIR] [--fold K] [--candidates K]``

For every training pair of the fold, the labels are the registration of ``MODEL_DIR/foldK.pt``
(its stored settings; default ``models/copd``). A fixed point's single-pass candidates are its
``K`` nearest moving keypoints, so a label longer than the distance ``r_K`` to the K-th nearest
moving point lies outside every candidate, and one longer than ``0.8 r_K`` lies at the edge of the
candidate ball, where the soft-argmin is pulled inwards. Prints, per pair, the mean label length,
the mean ``r_K`` and both fractions. Motivates ``CloudCycleConfig.learn_recentre_passes``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cyclereg.clouds.api import dataset_box, load_cloud_model
from cyclereg.clouds.pipeline import register_clouds
from cyclereg.datasets import load_keypoint_dataset, select_folds
from cyclereg.errors import InputError, require_count
from cyclereg.pointio import read_points

ROOT = Path(__file__).resolve().parents[1]
EDGE = 0.8
"""Fraction of ``r_K`` beyond which a label counts as at the edge of the candidate ball."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="?", default=ROOT / "models" / "copd")
    ap.add_argument("--dataset", type=Path, default=ROOT / ".." / "shared" / "data" / "copd-keypoints" / "dataset.json")
    ap.add_argument("--fold", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=64)
    args = ap.parse_args()
    try:  # bad input: one line before any work
        require_count("--candidates", args.candidates, 1)
        ds = load_keypoint_dataset(args.dataset)
        select_folds(ds, args.fold)
        box = dataset_box(ds)
        net, cfg = load_cloud_model(args.models / f"fold{args.fold}.pt")
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    print(f"fold {args.fold}, labels of {args.models}, K = {args.candidates}")
    print("pair   | N    | mean |u| [mm] | mean r_K [mm] | |u| > r_K | |u| > 0.8 r_K")
    for pid in ds.training_ids(args.fold):  # keypoints only: landmarks are not read
        pair = ds.pair(pid)
        f, m = read_points(pair.fixed_keypoints), read_points(pair.moving_keypoints)
        u = register_clouds(f, m, net, cfg, box=box).displacements_mm
        r = torch.cdist(f, m).topk(min(args.candidates, m.shape[0]), largest=False).values[:, -1]
        length = u.norm(dim=1)
        print(f"{pid} | {len(f):4d} | {length.mean():13.1f} | {r.mean():13.1f} | {(length > r).float().mean():8.1%} "
              f"| {(length > EDGE * r).float().mean():8.1%}")


if __name__ == "__main__":
    main()
