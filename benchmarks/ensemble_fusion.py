"""Ensemble fusion on synthetic pairs with known motion: averaged answers vs joint evidence.

``python benchmarks/ensemble_fusion.py [RUN_DIR] [--seeds 0 1 2 3 4] [--scales 1 2] [--threads 2]
[--recentre-candidates K ...]``

Every fold's ensemble checkpoint of ``RUN_DIR`` (default ``models/copd_ensemble``) registers the synthetic
breathing pairs of :mod:`cyclereg.clouds.synthetic` (each seed, with the motion scaled by each
``--scales`` factor) with its stored settings, in these ways:

* ``average``: each member registers on its own, displacements averaged
  (``ensemble_fusion = "average"``);
* ``joint``: one LBP per pass over the members' mean feature cost (``ensemble_fusion = "joint"``);
* each member alone;
* for each ``--recentre-candidates K``: joint, with K candidates in the re-centred passes
  (:attr:`cyclereg.clouds.pipeline.CloudRegConfig.recentre_candidates`).

"joint" and "average" use the re-centred passes' K of ``lbp.num_candidates`` whatever the
checkpoint stores.

Prints the mean error (mm) of the TPS field at the fixed keypoints against the known motion per
case and per scale, and the seconds of the two fusions. No landmark is read.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from cyclereg.clouds.api import exported_model_files, load_cloud_model
from cyclereg.clouds.pipeline import (CloudRegistration, fused_and_member_displacements, registration_box,
                                      test_time_displacements)
from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair
from cyclereg.errors import InputError, finite_number, require_count, require_seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default="models/copd_ensemble")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recentre-candidates", type=int, nargs="*", default=[])
    args = ap.parse_args()
    try:  # bad input: one line before any work
        require_count("--threads", args.threads, 1)
        for seed in args.seeds:
            require_seed(seed, "--seeds")
        for scale in args.scales:
            if not finite_number(scale):
                raise InputError(f"--scales {scale}: need a finite number")
        for k in args.recentre_candidates:
            require_count("--recentre-candidates", k, 1)
        folds = exported_model_files(args.run, "an ensemble's folder of fold*.pt checkpoints")
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    torch.set_num_threads(args.threads)
    for scale in args.scales:
        rows: dict[str, list[float]] = {}
        secs: dict[str, list[float]] = {"average": [], "joint": []}
        for path in folds:
            net, cfg = load_cloud_model(path)
            for seed in args.seeds:
                bc = BreathingConfig().scaled_motion(scale)
                pair = make_breathing_pair(seed, bc)
                box = registration_box(pair.fixed_mm, pair.moving_mm, cfg)[0]
                fu, mu = box.mm_to_unit(pair.fixed_mm), box.mm_to_unit(pair.moving_mm)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    averaged, each = fused_and_member_displacements(
                        net, fu, mu, replace(cfg, ensemble_fusion="average", recentre_candidates=None))
                    t1 = time.perf_counter()
                    joint = test_time_displacements(net, fu, mu, replace(cfg, ensemble_fusion="joint",
                                                                         recentre_candidates=None))
                    t2 = time.perf_counter()
                    wider = {}
                    for k in args.recentre_candidates:
                        t3 = time.perf_counter()
                        wider[f"joint K'={k}"] = test_time_displacements(
                            net, fu, mu, replace(cfg, ensemble_fusion="joint", recentre_candidates=k))
                        secs.setdefault(f"joint K'={k}", []).append(time.perf_counter() - t3)
                secs["average"].append(t1 - t0)
                secs["joint"].append(t2 - t1)
                fields = {"average": averaged, "joint": joint, **wider,
                          **{f"member{i + 1}": d for i, d in enumerate(each)}}
                errors = {}
                for name, d in fields.items():
                    reg = CloudRegistration(fixed_mm=pair.fixed_mm, displacements_mm=box.disp_unit_to_mm(d), box=box,
                                            tps=cfg.tps)
                    errors[name] = (reg.at(pair.fixed_mm) - pair.displacement_mm).norm(dim=1).mean().item()
                    rows.setdefault(name, []).append(errors[name])
                print(f"motion x{scale:g} {path.stem} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in errors.items())
                      + f"  ({t1 - t0:.1f} s / {t2 - t1:.1f} s)", flush=True)
        better = sum(j < a for j, a in zip(rows["joint"], rows["average"]))
        print(f"motion x{scale:g}, {len(rows['joint'])} cases: " + ", ".join(
            f"{k} {sum(v) / len(v):.3f} mm" for k, v in rows.items())
            + f"; joint better than average in {better}; seconds: "
            + ", ".join(f"{k} {sum(v) / len(v):.1f}" for k, v in secs.items())
            + " (average includes the members' own passes)", flush=True)


if __name__ == "__main__":
    main()
