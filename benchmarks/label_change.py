"""How far each stage's refresh moved the pseudo labels, from a keypoint run's stored labels.

``python benchmarks/label_change.py RUN_DIR [RUN_DIR ...] [--stop-below MM ...] [--json R.json]``

``cyclereg cycle`` logs ``pseudo_label_change_mm`` for every stage it finishes (the mean distance
between stage ``t``'s and stage ``t - 1``'s labels, :func:`cyclereg.training.clouds.cloud_label_change_mm`);
runs trained before it did keep their labels (``foldK/pseudo{t}.pt``), and this script computes
the same figure from them, with the logged training loss and pseudo-label disagreement next to it,
averaged over the folds that have the stage. Landmark-free: it reads pseudo labels, checkpoints
(for the unit frame) and logs, never a landmark file.

``--stop-below MM`` (repeatable) also says, per fold, at which stage ``cycle --stop-below MM`` would
have stopped the run (:func:`cyclereg.training.scheduler.settled_stage`, the rule ``cycle`` applies),
or that it would not have by the run's last stage.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cyclereg.checkpoint import load_checkpoint
from cyclereg.clouds.pipeline import CloudRegConfig
from cyclereg.errors import InputError, finite_number, require_output_file
from cyclereg.training.clouds import cloud_label_change_mm
from cyclereg.training.scheduler import StageScheduler, settled_stage


def fold_dirs(run: Path) -> list[Path]:
    folds = sorted((d for d in run.glob("fold*") if d.name[4:].isdigit()), key=lambda d: int(d.name[4:]))
    return folds or [run / "all"]


def fold_curve(fold: Path) -> dict[int, dict]:
    """``{stage: {"pseudo_label_change_mm", "train_loss_mm", "pseudo_label_disagreement_mm"}}`` of one fold."""
    stages = sorted(int(p.stem[6:]) for p in fold.glob("pseudo*.pt") if p.stem[6:].isdigit())
    if len(stages) < 2:
        return {}
    ckpt = load_checkpoint(fold / f"stage{max(s for s in stages if s > 0)}.pt", kind="cloud")
    box = CloudRegConfig.from_dict(ckpt["config"]).training_box
    run = StageScheduler(None, fold)  # read only
    labels = {t: run.load_labels(t)[0] for t in stages}
    log = run.status(max(stages))["stage_log"]
    curve = {}
    for t in stages:
        row = {k: log.get(t, {}).get(k) for k in ("train_loss_mm", "pseudo_label_disagreement_mm")}
        if t - 1 in labels:
            row["pseudo_label_change_mm"] = cloud_label_change_mm(labels[t - 1], labels[t], box)
        curve[t] = row
    return curve


def run_curve(run: Path) -> dict[int, dict]:
    """Per stage the mean over folds of each quantity (folds lacking it left out), and the fold count."""
    per_fold = [fold_curve(f) for f in fold_dirs(run)]
    out = {}
    for t in sorted({t for c in per_fold for t in c}):
        row = {"folds": sum(1 for c in per_fold if t in c)}
        for key in ("pseudo_label_change_mm", "pseudo_label_disagreement_mm", "train_loss_mm"):
            vals = [c[t][key] for c in per_fold if t in c and isinstance(c[t].get(key), (int, float))]
            row[key] = sum(vals) / len(vals) if vals else None
        out[t] = row
    return out


def stop_stage(curve: dict[int, dict], stop_below_mm: float) -> int | None:
    """The stage at which ``cycle --stop-below stop_below_mm`` would have stopped a fold with this
    :func:`fold_curve` (the first whose refresh moved the labels less than that), ``None`` if none."""
    return next((t for t in sorted(curve) if settled_stage({t: curve[t]}, stop_below_mm)), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--stop-below", type=float, action="append", default=[], metavar="MM",
                    help="also the stage at which 'cycle --stop-below MM' would have stopped each fold")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    for run in args.runs:  # a typo or a model set would read as a run of no stages
        if not (run / "run.json").is_file():
            ap.exit(1, f"error: {run}: not a training run directory (no run.json)\n")
    for mm in args.stop_below:  # as cycle --stop-below takes it
        if not finite_number(mm) or mm < 0:
            ap.exit(1, f"error: --stop-below {mm:g}: expected a distance in mm >= 0\n")
    try:
        if args.json is not None:
            require_output_file(args.json)
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    result = {}
    for run in args.runs:
        curve = run_curve(run)
        result[str(run)] = curve
        print(run)
        print("  stage  folds  labels moved [mm]  label disagreement [mm]  train loss [mm]")
        for t, row in curve.items():
            cells = [f"{row[k]:.3f}" if row[k] is not None else "-"
                     for k in ("pseudo_label_change_mm", "pseudo_label_disagreement_mm", "train_loss_mm")]
            print(f"  {t:5d}  {row['folds']:5d}  {cells[0]:>17}  {cells[1]:>23}  {cells[2]:>15}")
        if args.stop_below:
            folds = {d.name: fold_curve(d) for d in fold_dirs(run)}
            stops = {f"{mm:g}": {name: stop_stage(c, mm) for name, c in folds.items()} for mm in args.stop_below}
            result[str(run) + " --stop-below"] = stops
            for mm, per_fold in stops.items():
                said = ", ".join(f"{name} {'-' if t is None else t}" for name, t in per_fold.items())
                print(f"  --stop-below {mm} stops at stage (-: not by stage {max(curve, default=0)}): {said}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
