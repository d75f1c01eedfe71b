"""The authors' keypoint test pipeline next to cyclereg's, same models, same CPU.

``python benchmarks/reference_cloud_cpu.py CHECKOUT DATASET_JSON [--pattern P] [--folds 1 2 ...] [--threads T] [--json R]``

``CHECKOUT`` holds ``main.py``, ``utils.py``, ``data.pth`` and ``models/`` of
multimodallearning/registration-da-mean-teacher (imported from there at run time, never copied
into cyclereg). Their code is CUDA-only; here ``.cuda()`` is a no-op and their module-level
device is the CPU. For every COPD fold their released landmark-supervised network
(``--pattern``, default ``models/4dct-to-copd_target-only_fold{}.pth``) registers the fold's
two test cases with their test code (``FeatNet`` features, then ``match``: K = 256 candidates,
``lbps_iter = 5`` LBP loop passes, soft-argmin read-out), and cyclereg registers the same clouds
(mm, from ``DATASET_JSON``) with the same weights converted by ``benchmarks/peer_checkpoints.py``
and their settings (:func:`peer_checkpoints.peer_config`: K = 256, 4 sweeps (their 5 loop passes
keep 4 message updates in the beliefs), moving graph k = 40, one pass) through
:func:`cyclereg.clouds.pipeline.register_clouds`. Timed: the displacements
at the fixed keypoints (features + candidate search + LBP), the part both share; neither
densification nor landmarks are involved. Reported per case: both times and the mean distance
between the two displacement sets (mm; their normalised displacements scaled by the half
extents of their crop, 130 / 96 / 168 mm along x / y / z).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cyclereg.clouds.features import GraphFeatureNet
from cyclereg.clouds.pipeline import register_clouds
from cyclereg.datasets import load_keypoint_dataset
from cyclereg.errors import InputError, require_count, require_file, require_output_file
from cyclereg.frames import UnitBox
from cyclereg.pointio import read_points

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_checkpoints import convert_state_dict, peer_config  # noqa: E402

#: mm per unit of their normalised coordinates along x, y, z (half extents of their 192x192x208 crop)
THEIR_HALF_EXTENT_MM = torch.tensor([130.0, 96.0, 168.0])
#: their test cases per fold (indices into data.pth's COPD lists = copd01..copd10)
FOLD_CASES = {1: (0, 1), 2: (2, 3), 3: (4, 5), 4: (6, 7), 5: (8, 9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path)
    ap.add_argument("dataset", type=Path, help="cyclereg's copd-keypoints/dataset.json (same clouds, mm)")
    ap.add_argument("--pattern", default="models/4dct-to-copd_target-only_fold{}.pth")
    ap.add_argument("--folds", type=int, nargs="+", default=sorted(FOLD_CASES), choices=sorted(FOLD_CASES),
                    help="only these folds' two test cases each (default: all five)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=4,
                    help="cyclereg's LBP sweeps (their code runs lbps_iter = 5 message updates but reads the "
                         "beliefs out of the messages of the first 4; runs before 2026-12-06 used 5)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    try:  # bad input: one line before their code is imported or anything runs
        require_count("--threads", args.threads, 1)
        require_count("--iterations", args.iterations, 1)
        if not ((args.checkout / "main.py").is_file() or (args.checkout / "main").is_dir()):
            raise InputError("not a checkout of registration-da-mean-teacher (no main.py)", args.checkout)
        require_file(args.checkout / "data.pth")
        for fold in args.folds:
            require_file(args.checkout / args.pattern.format(fold))
        load_keypoint_dataset(args.dataset)
        if args.json is not None:
            require_output_file(args.json)
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    torch.set_num_threads(args.threads)
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    sys.path.insert(0, str(args.checkout))
    import main as theirs  # noqa: PLC0415 - their module, from the checkout
    import utils as their_utils  # noqa: PLC0415

    theirs.device = "cpu"
    their_utils.lbp_graph.__defaults__ = ("cpu",)
    data = torch.load(args.checkout / "data.pth", map_location="cpu", weights_only=False)["copd"]
    ds = load_keypoint_dataset(args.dataset)
    box = UnitBox.from_volume(ds.volume_shape_zyx, ds.spacing_zyx_mm)
    config = peer_config(iterations=args.iterations)
    rows = []
    for fold in args.folds:
        cases = FOLD_CASES[fold]
        weights = torch.load(args.checkout / args.pattern.format(fold), map_location="cpu", weights_only=True)
        their_net = theirs.FeatNet()
        their_net.load_state_dict(weights)
        their_net.eval()
        our_net = GraphFeatureNet(config.net)
        our_net.load_state_dict(convert_state_dict(weights))
        our_net.eval()
        for case in cases:
            pair = ds.pairs[case]
            kf, km = data["kpts_fix"][case][None].float(), data["kpts_mov"][case][None].float()
            t0 = time.perf_counter()
            with torch.no_grad():
                ff, fm = their_net(kf, km, theirs.k)
                theirs_disp = theirs.match(kf, km, ff, fm, N_p=kf.shape[1])[0]
            their_s = time.perf_counter() - t0
            fixed_mm, moving_mm = read_points(pair.fixed_keypoints), read_points(pair.moving_keypoints)
            t0 = time.perf_counter()
            ours_disp = register_clouds(fixed_mm, moving_mm, our_net, config, box=box).displacements_mm
            our_s = time.perf_counter() - t0
            diff = (theirs_disp * THEIR_HALF_EXTENT_MM - ours_disp).norm(dim=1)
            rows.append({"case": pair.id, "fold": fold, "reference_seconds": their_s, "cyclereg_seconds": our_s,
                         "mean_displacement_difference_mm": float(diff.mean()),
                         "mean_displacement_mm": float(ours_disp.norm(dim=1).mean())})
            print(json.dumps(rows[-1]), flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("case", "fold")}
    print("mean", json.dumps(mean))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "mean": mean, "threads": args.threads,
                                         "iterations": args.iterations}, indent=2))


if __name__ == "__main__":
    main()
