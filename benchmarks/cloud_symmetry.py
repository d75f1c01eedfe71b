"""Forward-backward (inverse-consistent) estimate for keypoint clouds on synthetic pairs.

``python benchmarks/cloud_symmetry.py``

Synthetic breathing pairs with known motion (seeds 0-4, at the default and at twice the
motion), random graph CNN (seed = pair seed), the refined stream's settings (10 sweeps,
TPS 0.3, one re-centred pass). Per pair it registers

* forward: fixed -> moving (the tool's registration), error of its TPS at the fixed points;
* backward: moving -> fixed with the same features (roles swapped: the moving cloud carries
  the graph, the fixed cloud the candidates); error of ``-v(f + u(f))``, ``v`` its TPS;
* symmetric: ``(u - v(f + u(f))) / 2`` at the fixed points, TPS-smoothed;

and prints the mean error (mm) against the known displacements and the seconds per pass.
No landmark is read.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from cyclereg.clouds.api import load_cloud_model
from cyclereg.clouds.pipeline import recentred_displacements
from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair
from cyclereg.clouds.tps import ThinPlateSpline
from cyclereg.frames import UnitBox

SEEDS = range(5)
MOTION_SCALES = (1.0, 2.0)


def one_pair(seed: int, scale: float) -> tuple[float, float, float, float, float]:
    """Errors (forward, backward, symmetric; mm) and seconds (forward, backward) of one pair."""
    bc = BreathingConfig().scaled_motion(scale)
    pair = make_breathing_pair(seed, bc)
    net, cfg = load_cloud_model("random", seed=seed)
    cfg = replace(cfg, lbp=replace(cfg.lbp, iterations=10), tps=replace(cfg.tps, regularisation=0.3),
                  recentre_passes=1)
    box = UnitBox.around(pair.fixed_mm, pair.moving_mm, margin=cfg.box_margin)
    fu, mu = box.mm_to_unit(pair.fixed_mm), box.mm_to_unit(pair.moving_mm)
    lam = cfg.tps.regularisation
    with torch.no_grad():
        feat_f, feat_m = net.pair(fu, mu)
        t0 = time.perf_counter()
        u = recentred_displacements(fu, mu, feat_f, feat_m, cfg)
        t1 = time.perf_counter()
        v = recentred_displacements(mu, fu, feat_m, feat_f, cfg)
        t2 = time.perf_counter()
        u_smooth = ThinPlateSpline.fit(fu, u, regularisation=lam)(fu)
        back = ThinPlateSpline.fit(mu, v, regularisation=lam)(fu + u_smooth)
        sym = ThinPlateSpline.fit(fu, (u - back) / 2, regularisation=lam)(fu)

    def err(d: torch.Tensor) -> float:
        return (box.disp_unit_to_mm(d) - pair.displacement_mm).norm(dim=1).mean().item()

    return err(u_smooth), err(-back), err(sym), t1 - t0, t2 - t1


def main() -> None:
    torch.set_num_threads(1)
    for scale in MOTION_SCALES:
        rows = [one_pair(seed, scale) for seed in SEEDS]
        mean = [sum(r[i] for r in rows) / len(rows) for i in range(5)]
        print(f"motion x{scale:g}: forward {mean[0]:.2f} mm, backward {mean[1]:.2f} mm, symmetric {mean[2]:.2f} mm; "
              f"{mean[3]:.1f} s forward, {mean[4]:.1f} s backward per pair", flush=True)
        for seed, r in zip(SEEDS, rows):
            print(f"  seed {seed}: {r[0]:.2f} / {r[1]:.2f} / {r[2]:.2f}")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options: --help says what it does
    main()
