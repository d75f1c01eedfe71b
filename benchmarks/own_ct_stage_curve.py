"""Stage curve on known motion: does every self-training stage help, and do the run's own
landmark-free signals (training loss, pseudo-label disagreement, how far each refresh moved the
labels) say so?

``python benchmarks/own_ct_stage_curve.py --out DIR [--ct CT] [--pairs N] [--held-out H]
[--stages T] [--epochs E] [--seed S] [--device cpu]``

The workflow of ``examples/own_ct_pairs.py`` with more pairs and stages: the chest CT (fixed) and
copies deformed by the example's smooth random fields (training: seeds 1..N; held out: seeds
100..100+H-1), keypoints of every scan with ``cyclereg keypoints --pairs ... --lung-mask``, then
``pretrain-random`` + ``cycle`` (the tool's defaults otherwise; one model on all N pairs, no
folds). No known field reaches training. Every stage's network (stage 0: the random network that
made the stage-0 labels, with stage 1's registration settings) registers each held-out pair's
keypoint clouds with ``register``'s library call; its error against the known field at the fixed
keypoints is printed per stage next to the stage's training loss, label disagreement and labels
moved from the run's log. Writes ``DIR/stage_curve.json``. Commands run through ``python -m cyclereg_cli.main``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from chest_ct_end_to_end import DEFAULT_CT, FieldConfig  # noqa: E402
from own_ct_pairs import cyclereg, error_at_keypoints, make_moving  # noqa: E402

from cyclereg.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from cyclereg.clouds.api import register_cloud_files  # noqa: E402
from cyclereg.datasets import read_json  # noqa: E402
from cyclereg.device import resolve_device  # noqa: E402
from cyclereg.errors import (InputError, refuse_output_in_run, require_count, require_output_dir,  # noqa: E402
                             require_seed)
from cyclereg.training.clouds import CloudCycleConfig, initial_network  # noqa: E402
from cyclereg.volumeio import read_nifti  # noqa: E402

HELD_OUT_SEED0 = 100
"""Field seed of the first held-out pair (``examples/own_ct_pairs.py``'s test seed)."""


def _pairs_csv(path: Path, ct: Path, seeds: list[int], prefix: str) -> None:
    rows = ["id,fixed,moving"] + [f"{prefix}{s},{ct.resolve()},moving_{s}.nii.gz" for s in seeds]
    path.write_text("\n".join(rows) + "\n")


def _stage0_checkpoint(run: Path, out: Path) -> Path:
    """The stage-0 network of ``run`` stored with stage 1's registration settings."""
    cfg = CloudCycleConfig.from_dict(json.loads((run / "run.json").read_text())["config"])
    ck = load_checkpoint(run / "all" / "stage1.pt", kind="cloud")
    save_checkpoint(out, kind="cloud", config=ck["config"], state_dict=initial_network(cfg, 0).state_dict(),
                    extra={"stage": 0})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", type=Path, default=DEFAULT_CT, help="fixed CT (NIfTI, HU)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (scans, keypoints, run, result)")
    ap.add_argument("--pairs", type=int, default=8, help="training pairs (field seeds 1..N)")
    ap.add_argument("--held-out", type=int, default=4, help="held-out pairs (field seeds 100..)")
    ap.add_argument("--stages", type=int, default=8, help="self-training stages T")
    ap.add_argument("--epochs", type=int, default=60, help="epochs per stage")
    ap.add_argument("--seed", type=int, default=0, help="seed of the run (pretrain-random --seed)")
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    args = ap.parse_args(argv)
    out = args.out
    try:  # bad input: one line before any work, nothing written
        for flag, value in (("--pairs", args.pairs), ("--held-out", args.held_out), ("--stages", args.stages),
                            ("--epochs", args.epochs)):
            require_count(flag, value, 1)
        require_seed(args.seed)
        resolve_device(args.device)
        fixed = read_nifti(args.ct)
        require_output_dir(out)
        refuse_output_in_run(out, "--out")
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_seeds = list(range(1, args.pairs + 1))
    test_seeds = list(range(HELD_OUT_SEED0, HELD_OUT_SEED0 + args.held_out))
    fields = {}
    for seed in train_seeds + test_seeds:
        u_c, factor = make_moving(fixed, FieldConfig(seed=seed), out / f"moving_{seed}.nii.gz")
        if seed in test_seeds:
            fields[seed] = (u_c, factor)
    _pairs_csv(out / "train.csv", args.ct, train_seeds, "pair")
    _pairs_csv(out / "test.csv", args.ct, test_seeds, "test")
    for name in ("train", "test"):
        cyclereg("keypoints", "--pairs", out / f"{name}.csv", "-o", out / name, "--lung-mask", "--device", args.device)
    t_data = time.perf_counter() - t0

    run, dataset = out / "run", out / "train" / "dataset.json"
    t0 = time.perf_counter()
    cyclereg("pretrain-random", dataset, "-o", run, "--stages", args.stages, "--epochs", args.epochs,
             "--seed", args.seed, "--device", args.device)
    cyclereg("cycle", dataset, "--run", run, "--device", args.device)
    t_train = time.perf_counter() - t0

    log = {int(r["stage"]): r for r in map(json.loads, (run / "all" / "log.jsonl").read_text().splitlines())}
    test_ds = read_json(out / "test" / "dataset.json")
    models = {0: _stage0_checkpoint(run, out / "stage0.pt")}
    models.update({t: run / "all" / f"stage{t}.pt" for t in range(1, args.stages + 1)})
    rows = []
    for stage, model in models.items():
        errors = []
        for seed, pair in zip(test_seeds, test_ds["pairs"]):
            reg = out / "registrations" / f"stage{stage}_{pair['id']}"
            register_cloud_files(out / "test" / pair["fixed_keypoints"], out / "test" / pair["moving_keypoints"], reg,
                                 model=str(model), device=args.device)
            errors.append(error_at_keypoints(reg, fixed, *fields[seed]))
        entry = log.get(stage, {})
        rows.append({"stage": stage, "held_out_mean_mm": float(np.mean([e["after_mean_mm"] for e in errors])),
                     "held_out_median_mm": float(np.mean([e["after_median_mm"] for e in errors])),
                     "per_pair_mean_mm": [e["after_mean_mm"] for e in errors],
                     "before_mean_mm": float(np.mean([e["before_mean_mm"] for e in errors])),
                     "train_loss_mm": entry.get("train_loss_mm"),
                     "label_disagreement_mm": entry.get("pseudo_label_disagreement_mm"),
                     "labels_moved_mm": entry.get("pseudo_label_change_mm")})
        r = rows[-1]
        print(f"stage {stage}: held-out error {r['held_out_mean_mm']:.3f} mm (before {r['before_mean_mm']:.2f}); "
              f"train loss {r['train_loss_mm'] if r['train_loss_mm'] is None else round(r['train_loss_mm'], 3)}, "
              f"label disagreement {round(r['label_disagreement_mm'], 3) if r['label_disagreement_mm'] else None}, "
              f"labels moved {round(r['labels_moved_mm'], 3) if r['labels_moved_mm'] else None}",
              flush=True)
    result = {"ct": str(args.ct), "training_pairs": args.pairs, "held_out_pairs": args.held_out,
              "stages": args.stages, "epochs": args.epochs, "seed": args.seed, "rows": rows,
              "timings_s": {"data_s": round(t_data, 1), "training_s": round(t_train, 1)}}
    (out / "stage_curve.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
