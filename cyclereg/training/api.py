"""File-level entry points for ``cyclereg pretrain-random`` and ``cyclereg cycle``.

Run directory layout::

    RUN_DIR/run.json            dataset identity + resolved configuration (checked on resume)
    RUN_DIR/fold{K}/            one scheduler directory per cross-validation fold
        pseudo{t}.pt            pseudo labels after stage t (0 = random network)
        stage{t}.pt             checkpoint {config, state_dict, version} after stage t
        final.pt                the last finished stage's checkpoint (what evaluation uses)
        log.jsonl               one JSON line per stage
    RUN_DIR/all/                the same when the dataset has no folds

Landmarks are never read: only the keypoint files of the training pairs are loaded.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from cyclereg.checkpoint import to_jsonable, write_json
from cyclereg.datasets import dataset_kind, load_keypoint_dataset
from cyclereg.device import resolve_device
from cyclereg.errors import InputError
from cyclereg.frames import UnitBox
from cyclereg.pointio import read_points
from cyclereg.training.clouds import CloudCycleConfig, CloudCycleTask, CloudPairData
from cyclereg.training.scheduler import StageScheduler


def _folds(ds, fold: str | int | None) -> list[int | None]:
    if not ds.folds:
        if fold not in (None, "all"):
            raise InputError(f"--fold {fold}: the dataset defines no folds", ds.path)
        return [None]
    if fold in (None, "all"):
        return list(range(1, len(ds.folds) + 1))
    try:
        k = int(fold)
    except ValueError:
        k = 0
    if not 1 <= k <= len(ds.folds):
        raise InputError(f"--fold {fold}: expected 'all' or 1..{len(ds.folds)}", ds.path)
    return [k]


def fold_dir(run: Path, fold: int | None) -> Path:
    return Path(run) / ("all" if fold is None else f"fold{fold}")


def _identity(ds) -> dict:
    return {"dataset": ds.name, "kind": "keypoints", "pairs": [p.id for p in ds.pairs],
            "folds": [list(f) for f in ds.folds]}


def _box(ds, pairs) -> UnitBox:
    if ds.volume_shape_zyx and ds.spacing_zyx_mm:
        return UnitBox.from_volume(ds.volume_shape_zyx, ds.spacing_zyx_mm)
    return UnitBox.around(*[p.fixed for p in pairs], *[p.moving for p in pairs])


def _task(ds, fold, config, device) -> CloudCycleTask:
    ids = ds.training_ids(fold)
    raw = []
    for pid in ids:
        p = ds.pair(pid)
        raw.append((pid, read_points(p.fixed_keypoints), read_points(p.moving_keypoints)))
    box = _box(ds, [CloudPairData(i, f, m) for i, f, m in raw])
    pairs = [CloudPairData(i, box.mm_to_unit(f), box.mm_to_unit(m)) for i, f, m in raw]
    return CloudCycleTask(pairs, box, config, device)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn())


def _require_keypoints(dataset: Path) -> None:
    if dataset_kind(dataset) != "keypoints":
        raise InputError("self-training on volume datasets is not built yet (issue 6)", dataset)


def pretrain_random(dataset: Path, run: Path, *, seed: int = 0, fold: str | None = None, device: str = "auto",
                    config: CloudCycleConfig | None = None) -> Path:
    """Create ``run`` and write stage-0 pseudo labels (random network + LBP + refinement) per fold."""
    _require_keypoints(dataset)
    ds = load_keypoint_dataset(dataset)
    folds = _folds(ds, fold)
    config = replace(config or CloudCycleConfig(), seed=seed)
    dev = resolve_device(device)
    run = Path(run)
    meta = {**_identity(ds), "config": to_jsonable(config)}
    if (run / "run.json").exists():
        _check_run(run, ds, config)
    elif run.exists() and any(run.iterdir()):
        raise InputError("directory exists and is not a cyclereg run; choose a new run directory", run)
    tasks = {k: _task(ds, k, config, dev) for k in folds}  # reads and validates all inputs first
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / "run.json", meta)
    with _progress() as progress:
        for k, task in tasks.items():
            StageScheduler(task, fold_dir(run, k)).run_stage0(progress)
    return run


def _check_run(run: Path, ds, config: CloudCycleConfig | None) -> CloudCycleConfig:
    try:
        meta = json.loads((run / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise InputError("not a cyclereg run directory (run.json missing or unreadable)", run) from None
    ident = _identity(ds)
    for key in ("dataset", "pairs", "folds"):
        if meta.get(key) != ident[key]:
            raise InputError(f"run directory belongs to another dataset ({key} differs)", run)
    stored = CloudCycleConfig.from_dict(meta["config"])
    if config is not None and to_jsonable(replace(config, stages=stored.stages)) != to_jsonable(stored):
        raise InputError("run directory was made with another configuration", run)
    return stored


def run_cycle(dataset: Path, run: Path, *, stages: int | None = None, folds: str = "all",
              device: str = "auto") -> dict:
    """Run or resume cyclical self-training for the selected folds; returns ``{fold: last stage}``."""
    _require_keypoints(dataset)
    ds = load_keypoint_dataset(dataset)
    config = _check_run(Path(run), ds, None)
    stages = config.stages if stages is None else stages
    if stages < 1:
        raise InputError(f"--stages {stages}: need at least 1")
    dev = resolve_device(device)
    selected = _folds(ds, folds)
    for k in selected:
        if not (fold_dir(run, k) / "pseudo0.pt").is_file():
            raise InputError(f"fold {k}: no stage-0 pseudo labels; run 'cyclereg pretrain-random --fold {k}' first", run)
    result = {}
    with _progress() as progress:
        outer = progress.add_task("folds", total=len(selected))
        for k in selected:
            task = _task(ds, k, config, dev)
            result[k] = StageScheduler(task, fold_dir(run, k)).run(stages, progress)
            progress.advance(outer)
    return result
