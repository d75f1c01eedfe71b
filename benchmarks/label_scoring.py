"""Dice of the same registrations under the label-scoring rules before and after 2026-12-05:
``python benchmarks/label_scoring.py DATASET_JSON --pairs 10 [--model random --seed 0] [--json R]``.

Before: a label was scored when present in the fixed and the *warped* moving map, and label
warps repeated the edge label outward (border padding). Now (:func:`cyclereg.metrics.scored_labels`,
:func:`cyclereg.warp.warp_labels`): scored when present in the fixed and the *unwarped* moving map
(a label the registration erases scores 0, as Learn2Reg), background outside the moving map.
Each pair is registered once (the dense path, the model's test-time settings); the four
combinations of the two rules are computed from that one field. Prints a row per pair and the means.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cyclereg.dense.api import load_model, register_pair
from cyclereg.dense.data import load_volume_dataset
from cyclereg.errors import MAX_MODEL_SEED, InputError, require_count, require_output_file, require_seed
from cyclereg.metrics import dice, scored_labels
from cyclereg.volumeio import read_nifti
from cyclereg.warp import warp, warp_labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--pairs", type=int, default=10, help="the first N registration_val pairs")
    ap.add_argument("--model", default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    try:  # a missing or unreadable dataset or model, a value out of range: one line
        require_count("--pairs", args.pairs, 1)
        require_seed(args.seed, largest=MAX_MODEL_SEED)
        if args.json is not None:
            require_output_file(args.json)
        ds = load_volume_dataset(args.dataset)
        net, cfg, _ = load_model(args.model, args.seed, "cpu")
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    rows = []
    for p in list(ds.pairs)[: args.pairs]:
        fv, mv = read_nifti(p.fixed), read_nifti(p.moving)
        fl, ml = read_nifti(p.fixed_labels, labels=True).data, read_nifti(p.moving_labels, labels=True).data
        t0 = time.perf_counter()
        disp = register_pair(fv, mv, net, cfg, modality=ds.modality).detach().cpu().float()
        border = warp(ml[None, None], disp, mode="nearest")[0, 0]  # the warp before 2026-12-05
        zeros = warp_labels(ml[None, None], disp)[0, 0]
        scored = scored_labels(fl, ml)
        row = {"pair": f"{p.fixed.name} <- {p.moving.name}", "seconds": time.perf_counter() - t0,
               "old_rule_border": float(np.mean(list(dice(fl, border).values()))),
               "old_rule_background": float(np.mean(list(dice(fl, zeros).values()))),
               "new_rule_border": float(np.mean(list(dice(fl, border, scored).values()))),
               "new_rule_background": float(np.mean(list(dice(fl, zeros, scored).values()))),
               "labels_erased": [lab for lab in scored if not bool((zeros == lab).any())]}
        rows.append(row)
        print(f"{row['pair']}: old {row['old_rule_border']:.4f} -> new {row['new_rule_background']:.4f} "
              f"(erased {row['labels_erased']}), {row['seconds']:.0f} s", flush=True)
    keys = ("old_rule_border", "old_rule_background", "new_rule_border", "new_rule_background")
    means = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    print("means: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    if args.json:
        args.json.write_text(json.dumps({"dataset": str(args.dataset), "model": args.model, "seed": args.seed,
                                         "means": means, "pairs": rows}, indent=2))


if __name__ == "__main__":
    main()
