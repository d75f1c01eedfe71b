"""Landmark-free check of test-time augmentation on the synthetic breathing pairs.

``python benchmarks/tta_synthetic.py [P ...]`` (default ``0 2 4 8``)

Seeds 0-4 of :func:`cyclereg.clouds.synthetic.make_breathing_pair`, each registered by the
random network of the same seed with the pseudo-label stream's settings (10 LBP sweeps, TPS
smoothing 0.3, one re-centred pass) and ``P`` extra augmented passes
(:attr:`cyclereg.clouds.pipeline.CloudRegConfig.tta_passes`). Prints the mean error of the
densified field at the fixed keypoints against the known motion (mm) and the time per pair.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from cyclereg.clouds.api import load_cloud_model
from cyclereg.clouds.pipeline import register_clouds
from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair

SEEDS = range(5)


def main(passes: list[int]) -> None:
    torch.set_num_threads(1)
    errors: dict[int, list[float]] = {p: [] for p in passes}
    seconds: dict[int, list[float]] = {p: [] for p in passes}
    for seed in SEEDS:
        pair = make_breathing_pair(seed, BreathingConfig())
        net, cfg = load_cloud_model("random", seed=seed)
        cfg = replace(cfg, lbp=replace(cfg.lbp, iterations=10), tps=replace(cfg.tps, regularisation=0.3),
                      recentre_passes=1)
        for p in passes:
            t0 = time.perf_counter()
            reg = register_clouds(pair.fixed_mm, pair.moving_mm, net, replace(cfg, tta_passes=p))
            errors[p].append((reg.at(pair.fixed_mm) - pair.displacement_mm).norm(dim=1).mean().item())
            seconds[p].append(time.perf_counter() - t0)
        print(f"seed {seed}: " + ", ".join(f"P={p} {errors[p][-1]:.2f} mm" for p in passes), flush=True)
    for p in passes:
        print(f"P={p}: mean {sum(errors[p]) / len(errors[p]):.3f} mm ({' '.join(f'{e:.2f}' for e in errors[p])}), "
              f"{sum(seconds[p]) / len(seconds[p]):.1f} s per pair")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("passes", nargs="*", type=int, default=[0, 2, 4, 8], metavar="P",
                    help="extra augmented passes to compare (default: 0 2 4 8)")
    args = ap.parse_args()
    if any(p < 0 for p in args.passes):  # one line before any work
        ap.exit(1, f"error: P {min(args.passes)}: need 0 or more extra passes\n")
    main(args.passes)
