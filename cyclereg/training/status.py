"""``cyclereg status``: a training run's progress as tables (read only; also while ``cycle`` runs).

:func:`show_run_status` prints what :func:`cyclereg.training.api.run_status` returns: per fold the
finished stage, what comes next, the time so far and an estimate of the time left; with
``history`` every finished stage's time, training loss, landmark-free pseudo-label disagreement,
how far the stage's refresh moved the labels, and any validation score the run logged (reporting only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HISTORY_COLUMNS = (("train_loss_mm", "train loss [mm]"), ("pseudo_label_disagreement_mm", "label disagreement [mm]"),
                   ("pseudo_label_change_mm", "labels moved [mm]"),
                   ("val_tre_mm", "val TRE [mm] (reporting)"), ("val_dice", "val Dice (reporting)"))
"""Log keys ``status --history`` shows (a column only where some stage logged it), with their headers."""


def show_run_status(run: Path | str, *, stages: int | None = None, history: bool = False,
                    json_out: Path | str | None = None, console=None) -> dict:
    """Print the progress table of the run directory ``run`` (and with ``history`` the table of its
    finished stages) on ``console`` (default: stdout); with ``json_out`` also write the status there
    as JSON. ``stages``: count progress towards this many stages instead of the run's. Returns the
    status (:func:`cyclereg.training.api.run_status`) as the JSON file holds it: stage numbers are text keys."""
    from rich.table import Table

    from cyclereg.checkpoint import json_text, write_json
    from cyclereg.console import count, make_console, print_note, print_table
    from cyclereg.errors import refuse_empty_paths, require_output_file, require_separate_output, require_switches
    from cyclereg.training.api import run_status

    refuse_empty_paths({"run": run, "json_out": json_out}, required=("run",), lists=())
    require_switches({"--history": history})
    if json_out is not None:
        require_output_file(json_out)
        require_separate_output(json_out, "--json", run_dirs={"the run directory": run})
    info = run_status(Path(run), stages=stages)
    rule = info.get("stop_below_mm")
    table = Table(title=f"{info['dataset']} ({info['kind']}), {count(info['stages'], 'stage')}"
                  + (f" at most (a fold stops once its labels move < {rule:g} mm)" if rule else ""))
    for column in ("fold", "finished stage", "next", "time so far", "time left (estimate)"):
        table.add_column(column)
    for row in info["folds"]:
        so_far = (sum(row["stage_seconds"].values()) + (row["current_stage_s"] or 0.0)
                  if row["stage_seconds"] or row["current_stage_s"] else None)
        table.add_row("all" if row["fold"] is None else str(row["fold"]),
                      "-" if row["finished"] < 0 else str(row["finished"]), row["next"], hms(so_far),
                      hms(row["remaining_s"]))
    console = console or make_console()
    console.print(f"{info['run']}:", soft_wrap=True, markup=False, highlight=False)  # whole: a path to copy
    print_table(console, table)
    for row in info["folds"]:
        missing = row["unlogged_stages"]
        if missing:
            where = "the run" if row["fold"] is None else f"fold {row['fold']}"
            stages_text = ("stages " if len(missing) > 1 else "stage ") + stage_list(missing)
            print_note(f"{where}: {stages_text} finished but without a readable line in log.jsonl (damaged or "
                       "removed lines): the time so far and the history leave them out")
    if history:
        print_table(console, history_table(info))
    info = json.loads(json_text(info))  # what the file holds (stage numbers as text keys), also returned
    if json_out is not None:
        write_json(json_out, info)
    return info


def unfinished_folds(run: Path | str, folds) -> dict:
    """``{fold: what comes next}`` for those of ``folds`` (``None``: a volume run's one model) that the
    training run directory ``run`` has not finished (``status``'s 'next' column): their ``final.pt``
    is an intermediate stage's model. ``{}`` for a folder of exported models (also one that keeps a
    ``run.json`` beside its ``foldK.pt``, as ``scripts/ensemble_stage.py`` writes) or one without a
    readable ``run.json`` (the caller's own checks name what is wrong there)."""
    from cyclereg.errors import InputError
    from cyclereg.training.api import fold_finished, run_status

    if not (Path(run) / "run.json").is_file():
        return {}
    try:
        rows = run_status(Path(run))["folds"]
    except InputError:
        return {}
    wanted = set(folds)
    return {row["fold"]: row["next"] for row in rows
            if row["fold"] in wanted and not row.get("exported") and not fold_finished(row)}


def unfinished_note(run: Path | str, fold: int | None, next_text: str, stage: int | None) -> str:
    """The note ``evaluate --run`` prints for a fold (``None``: a volume run's one model) that
    :func:`unfinished_folds` lists: its ``final.pt`` holds ``stage`` (``None``: not recorded)."""
    where = str(run) if fold is None else f"fold {fold} of {run}"
    return (f"note: {where} has not finished training (next: {next_text}): its final.pt is the model of stage "
            f"{'?' if stage is None else stage}, not the run's last stage")


def history_table(info: dict):
    """The table of every finished stage of the folds in ``info`` (a :func:`run_status` result)."""
    from rich.table import Table

    rows = [(fold["fold"], t, rec) for fold in info["folds"] for t, rec in sorted(fold["stage_log"].items())]
    other = sorted({k for *_, r in rows for k in r if k.startswith("train_loss_") and k != "train_loss_mm"})
    candidates = HISTORY_COLUMNS[:1] + tuple((k, f"train loss ({k[len('train_loss_'):]})") for k in other) \
        + HISTORY_COLUMNS[1:]  # a metric-supervised baseline logs its loss under its metric's name
    shown = [(key, head) for key, head in candidates if any(isinstance(r.get(key), (int, float)) for *_, r in rows)]
    table = Table(title="finished stages (from each fold's log.jsonl)")
    for column in ("fold", "stage", "time", *(head for _, head in shown)):
        table.add_column(column)
    for fold, t, rec in rows:
        values = [f"{rec[key]:.3f}" if isinstance(rec.get(key), (int, float)) else "-" for key, _ in shown]
        table.add_row("all" if fold is None else str(fold), str(t), hms(rec.get("seconds")), *values)
    return table


def stage_list(stages: list[int]) -> str:
    """``0, 2-5``: stage numbers with runs of consecutive ones as ranges."""
    parts, start = [], None
    for i, t in enumerate(stages):
        start = t if start is None else start
        if i + 1 == len(stages) or stages[i + 1] != t + 1:
            parts.append(str(t) if start == t else f"{start}-{t}")
            start = None
    return ", ".join(parts)


def hms(seconds: float | None) -> str:
    """``H:MM:SS`` of ``seconds`` (rounded), ``-`` for None."""
    if seconds is None or not math.isfinite(seconds):  # a log line written by hand may hold NaN
        return "-"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"
