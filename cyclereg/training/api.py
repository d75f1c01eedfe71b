"""File-level entry points for ``cyclereg pretrain-random`` and ``cyclereg cycle``.

Run directory layout::

    RUN_DIR/run.json            dataset identity + resolved configuration (checked on resume)
    RUN_DIR/fold{K}/            one scheduler directory per cross-validation fold
        pseudo{t}.pt            pseudo labels after stage t (0 = random network)
        stage{t}.pt             checkpoint {kind, config, state_dict, version, extra} after stage t
        stage{t}.partial.pt     mid-stage training snapshot while stage t trains (then deleted)
        final.pt                the last finished stage's checkpoint (what evaluation uses)
        log.jsonl               one JSON line per stage
    RUN_DIR/all/                the same when the dataset has no folds (volume datasets, keypoint
                                datasets without "folds")

Training reads only the keypoint files of a fold's training pairs (keypoint datasets) or the
training images (volume datasets, Learn2Reg JSON). Landmarks and label maps are touched only by
the optional reporting hook (``val_pairs``, ``--val-pairs``: the landmarks of the fold's held-out
pairs, the labels of the first validation pairs), which scores a stage after it has finished
and never influences training; without it they are never read.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from cyclereg.checkpoint import atomic_leftover, atomic_write_bytes, data_fingerprint, to_jsonable, training_record, write_json
from cyclereg.clouds.api import dataset_box, exported_models, require_registrable
from cyclereg.console import make_console, print_note
from cyclereg.datasets import JSON_READ_ERRORS, dataset_kind, load_keypoint_dataset, select_folds
from cyclereg.device import resolve_device
from cyclereg import errors
from cyclereg.errors import (InputError, finite_number, refuse_empty_paths, require_count, require_output_dir,
                             require_seed, require_switches, whole_number)
from cyclereg.frames import UnitBox
from cyclereg.training.clouds import CloudCycleConfig, CloudCycleTask, CloudPairData, cycle_config, test_time_config
from cyclereg.training.dense import DenseCycleConfig, DenseCycleTask
from cyclereg.training.scheduler import DEFAULT_SNAPSHOT_EVERY_S, StageScheduler, sampling_note


RUN_LOCK = errors.RUN_LOCK
CYCLES_LOCK = errors.CYCLES_LOCK
"""Lock file of a fold directory (``RUN/foldK``, ``RUN/all``) and of the run directory. ``pretrain-random``
and ``cycle`` hold the lock of every fold they work on for as long as they work on it (a second command
on the same fold stops with an error instead of training it twice and writing the same files; other
folds of the run may be worked on by other processes at the same time), and the run's lock for the
moments they read and rewrite ``run.json``. A lock goes with its process, however that ends."""


@contextmanager
def _flocked(folder: Path, *, wait: bool, busy: str) -> Iterator[None]:
    """Hold the exclusive lock of ``folder / RUN_LOCK`` (made with the folder if needed): waiting for
    it with ``wait``, else :class:`InputError` ``busy`` at once when another process holds it. On a file
    system without ``flock`` (or without ``fcntl``: not POSIX) a note says the work goes on unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise InputError(busy, folder) from None
        except OSError as exc:  # e.g. a network file system mounted without flock support
            print_note(f"{folder}: cannot lock ({exc.strerror}); working on unlocked: do not run a second command on "
                       "the same run meanwhile")
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def fold_locks(run: Path, folds: list[int | None]) -> Iterator[None]:
    """Hold the locks of the fold directories ``folds`` of ``run`` (:data:`RUN_LOCK`; ``None``: the
    volume run's ``all``) for the block; :class:`InputError` naming the fold when another command holds one."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        for k in folds:
            stack.enter_context(_flocked(
                fold_dir(run, k), wait=False,
                busy=("another cyclereg command (pretrain-random or cycle) is working on this "
                      + ("run" if k is None else f"fold ({k})") + "; wait for it to finish or stop it, then run this "
                      "command again")))
        yield


@contextmanager
def run_file_lock(run: Path) -> Iterator[None]:
    """Hold the run directory's lock (waiting for it) while ``run.json`` is read and rewritten. Every
    ``run.json`` write holds it, so the temporary file of a write killed before its rename (``kill -9``) is
    removed here: in a run (a ``run.json`` there), or in a folder that holds nothing else yet (a first
    write's); in any other folder nothing is touched (it is not a run: :func:`_prepare_run` says so)."""
    run = Path(run)
    with _flocked(run, wait=True, busy=""):
        if (run / "run.json").is_file() or _nothing_written(run):
            for path in run.iterdir():
                if path.name not in (RUN_LOCK, CYCLES_LOCK) and _unwritten(path):
                    path.unlink(missing_ok=True)
        yield


def fold_dir(run: Path, fold: int | None) -> Path:
    return Path(run) / ("all" if fold is None else f"fold{fold}")


def _identity(ds) -> dict:
    """What ties a run directory to a keypoint dataset (``run.json``): name, pair ids, folds, and
    ``data``: the :func:`~cyclereg.checkpoint.data_fingerprint` of every pair's keypoint files, so
    that a run is not continued on keypoint files that changed since its pseudo labels were made."""
    return {"dataset": ds.name, "kind": "keypoints", "pairs": [p.id for p in ds.pairs],
            "folds": [list(f) for f in ds.folds], "data": {"pairs": _pair_fingerprints(ds, [p.id for p in ds.pairs])}}


def _pair_fingerprints(ds, ids: list[str]) -> dict[str, dict[str, str]]:
    """``{pair id: {"fixed": fp, "moving": fp}}``: the :func:`~cyclereg.checkpoint.data_fingerprint`
    of each listed pair's keypoint files."""
    return {pid: {"fixed": data_fingerprint(ds.pair(pid).fixed_keypoints),
                  "moving": data_fingerprint(ds.pair(pid).moving_keypoints)} for pid in ids}


CLOUD_OPTIONS = ("stages", "epochs", "train_points", "augment", "refine", "weighted_sampling", "recentre_passes",
                 "candidates", "tta_passes", "learn_recentre_passes", "aug_relative")
DENSE_OPTIONS = ("stages", "iterations", "augment", "refine", "weighted_sampling", "supervision", "train_images",
                 "directions", "max_train_pairs", "batch_size", "cpu_bf16")
SWITCH_FLAGS = {"augment": "--augment/--no-augment", "refine": "--refine/--no-refine",
                "weighted_sampling": "--weighted-sampling/--uniform-sampling", "cpu_bf16": "--cpu-bf16/--no-cpu-bf16"}
"""The on/off options (keyword -> the command's flags): ``True`` or ``False`` only (``augment="no"`` would count as on)."""


def _only(kind: str, allowed: tuple[str, ...], options: dict) -> dict:
    """Drop unset (``None``) options; an option set for the wrong kind of dataset is an error."""
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(k for k in given if k not in CLOUD_OPTIONS + DENSE_OPTIONS)
    if unknown:  # a misspelt keyword of the library call: not "an option of the other kind"
        raise InputError(f"unknown option(s) {', '.join(unknown)}; the options are "
                         f"{', '.join(sorted(set(CLOUD_OPTIONS + DENSE_OPTIONS)))}")
    wrong = sorted(k for k in given if k not in allowed)
    if wrong:
        names = ", ".join("--" + k.replace("_", "-") for k in wrong)
        from cyclereg.api import KIND_NAMES  # noqa: PLC0415 - the commands' names of the kinds

        raise InputError(f"{names}: not an option for {KIND_NAMES.get(kind, kind)} datasets")
    require_switches({flag: given.get(key) for key, flag in SWITCH_FLAGS.items()})
    return {k: v for k, v in options.items() if v is not None and k in allowed}


def _refuse_idle_options(options: dict, config) -> None:
    """:class:`InputError` naming a given option that ``config`` (the run's resolved configuration) would record
    and never use: the pseudo-label switches of a metric-supervised run (it makes no pseudo labels), an explicit
    ``--weighted-sampling`` with ``--no-refine`` (every pair's disagreement is 0: the weights are uniform), and
    a non-zero ``--aug-relative`` with ``--no-augment`` (the relative map is part of the augmentation)."""
    supervision = getattr(config, "supervision", "pseudo")
    if supervision != "pseudo":
        for key in ("refine", "weighted_sampling"):
            if options.get(key) is not None:
                raise InputError(f"{SWITCH_FLAGS[key]}: a run with --supervision {supervision} makes no pseudo labels "
                                 "(its loss compares the images), so this switch would change nothing; leave it out")
    elif options.get("weighted_sampling") is True and not config.refine:
        raise InputError("--weighted-sampling: with --no-refine the pseudo labels are the network's own output, so "
                         "every pair's disagreement is 0 and the weights are uniform; leave it out")
    if options.get("aug_relative") and not config.augment:  # --aug-relative 0 with --no-augment: both off, fine
        raise InputError(f"--aug-relative {options['aug_relative']}: the moving cloud's relative map is drawn by the "
                         "augmentation, which --no-augment turns off; leave one of them out")


def dense_cycle_config(base: DenseCycleConfig | None = None, **options) -> DenseCycleConfig:
    """Apply command-line overrides to the dense self-training configuration."""
    cfg = base or DenseCycleConfig()
    for key in ("stages", "iterations", "batch_size", "max_train_pairs"):
        require_count(f"--{key.replace('_', '-')}", options.get(key), 1)
    try:
        return replace(cfg, **options).validate()
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _box(ds, pairs, margin: float) -> UnitBox:
    """The unit frame of a fold's training: the dataset's volume box, else the bounding box of all
    its training clouds enlarged by ``margin`` (``CloudRegConfig.box_margin``, as for a pair
    registered on its own); stored with the checkpoints as ``CloudRegConfig.training_box``."""
    return dataset_box(ds) or UnitBox.around(*[p.fixed for p in pairs], *[p.moving for p in pairs], margin=margin)


def _cloud_task(ds, fold, config, device) -> CloudCycleTask:
    ids = ds.training_ids(fold)
    if not ids:
        raise InputError(f"fold {fold} holds out every pair of the dataset: nothing is left to train on"
                         if fold is not None else "the dataset lists no pairs to train on", ds.path)
    raw = []
    for pid in ids:
        p = ds.pair(pid)
        raw.append((pid, ds.read_points(p.fixed_keypoints), ds.read_points(p.moving_keypoints)))
        require_registrable(raw[-1][1], raw[-1][2], config.reg, (p.fixed_keypoints, p.moving_keypoints),
                            what=f"training pair {pid}: ", device=device)  # the memory of the device it trains on
    box = _box(ds, [CloudPairData(i, f, m) for i, f, m in raw], config.reg.box_margin)
    pairs = [CloudPairData(i, box.mm_to_unit(f), box.mm_to_unit(m)) for i, f, m in raw]
    return CloudCycleTask(pairs, box, config, device)


def _note_sampling(n_pairs: int, config) -> None:
    """Print :func:`~cyclereg.training.scheduler.sampling_note` for a training set of ``n_pairs`` (stderr).
    Without refinement (or with a metric-supervised dense baseline) every pair's disagreement is 0 and
    the weights are uniform: no note then."""
    weighted = (config.weighted_sampling and config.refine
                and getattr(config, "supervision", "pseudo") == "pseudo")
    note = sampling_note(n_pairs, enabled=weighted, logit_range=config.sampling_logit_range)
    if note is not None:
        print_note(note)


def _note_precision(config: DenseCycleConfig, dev: torch.device) -> None:
    """Say when a run's bfloat16 CPU training (``cpu_bf16``) meets a CPU without bfloat16 units."""
    from cyclereg.device import cpu_has_bf16_units

    if config.cpu_bf16 and dev.type == "cpu" and not cpu_has_bf16_units():
        print_note("this run trains in bfloat16 on CPU (cpu_bf16), but this CPU has no bfloat16 matrix units "
                   "(amx_bf16 / avx512_bf16): its training steps will be slower than in float32")


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = make_console()  # a pipe or log gets the lines per stage, not a bar's last frame
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, disable=not console.is_terminal)


def _prepare_run(run: Path, meta: dict, check, stages_given: bool = True, quiet: bool = False) -> dict:
    """Check ``run`` before ``pretrain-random`` writes ``meta`` there; returns the ``meta`` to write.

    ``check()`` validates an existing run (same dataset and configuration) and returns its stored
    configuration; a larger stored number of stages (a run extended by ``cycle --stages``,
    :func:`_record_stage_target`) is kept, so running ``pretrain-random`` again never shortens it,
    and without ``--stages`` (``stages_given`` false) the stored number is kept whatever it is. A folder
    holding only what a stopped command left (:func:`_unwritten`) counts as empty; those files are removed
    under the run's lock (:func:`run_file_lock`; without it they may be another command's, in use)."""
    require_output_dir(run)
    if (run / "run.json").exists():
        stored = check()
        rule = _read_meta(run).get(STOP_KEY)
        if rule is not None:  # a stopping rule set by 'cycle --stop-below' stays
            meta = {**meta, STOP_KEY: rule}
        if stages_given and stored.stages > meta["config"]["stages"] and not quiet:
            print_note(f"the run has {stored.stages} stages already; --stages {meta['config']['stages']} does not "
                       f"shorten it ('cycle --stages {meta['config']['stages']}' stops there)")
        if stored.stages > meta["config"]["stages"] or not stages_given:
            meta = {**meta, "config": {**meta["config"], "stages": stored.stages}}
    elif run.exists() and not _nothing_written(run):
        raise InputError("directory exists and is not a cyclereg run; choose a new run directory", run)
    return meta


def _nothing_written(run: Path) -> bool:
    """Whether ``run`` holds nothing but what commands that stopped before writing anything leave: lock
    files (its own, or a fold directory's alone) and temporary files of killed ``run.json`` writes."""
    return all(_unwritten(p) or (p.is_dir() and _only_lock(p)) for p in run.iterdir())


def _unwritten(path: Path) -> bool:
    """A lock file, or the temporary file of a ``run.json`` write killed before it could clean up:
    what a command leaves that stopped before its run directory held anything."""
    return path.name in (RUN_LOCK, CYCLES_LOCK) or (path.name.startswith(".run.json.") and atomic_leftover(path))


def _only_lock(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but a lock file (a fold directory of a command that stopped
    before writing anything)."""
    return all(p.name == RUN_LOCK for p in folder.iterdir())


def _record_stage_target(run: Path, stages: int) -> None:
    """Raise the number of stages recorded in ``run/run.json`` to ``stages`` when a ``cycle
    --stages`` goes past it (extending a run), so that ``cyclereg status`` counts towards the new
    target and a plain ``cycle`` re-run resumes it. A smaller ``--stages`` (stopping early) leaves
    the record alone; nothing else in the file changes (:func:`_targets_recorded` puts it back when
    the command then refuses)."""
    meta = _read_meta(run)
    if stages > int(meta["config"]["stages"]):
        meta["config"]["stages"] = stages
        write_json(run / "run.json", meta)


CHECKPOINT_KINDS = {"keypoints": CloudCycleTask.checkpoint_kind, "volumes": DenseCycleTask.checkpoint_kind}
"""The checkpoint kind of a run of each dataset kind (run.json's ``kind``)."""

STOP_KEY = "stop_below_mm"
"""Key of ``run.json`` that holds the stopping rule of ``cycle --stop-below`` [mm] (absent: none)."""


def _record_stop_rule(run: Path, stop_below_mm: float | None) -> float | None:
    """The stopping rule the run goes by: ``stop_below_mm`` when given (recorded in ``run.json``, so
    that a plain re-run keeps it; ``0`` removes it), else the recorded one (``None``: none)."""
    meta = _read_meta(run)
    if stop_below_mm is None:
        return meta.get(STOP_KEY)
    if meta.get(STOP_KEY) != (stop_below_mm or None):
        meta.pop(STOP_KEY, None)
        if stop_below_mm > 0:
            meta[STOP_KEY] = float(stop_below_mm)
        write_json(run / "run.json", meta)
    return stop_below_mm or None


@contextmanager
def _cycles_on_run(run: Path) -> Iterator[Callable[[], bool]]:
    """Hold a shared lock of ``run/CYCLES_LOCK`` for the block (every ``cycle`` on the run holds one while it
    works, whatever its folds); yields ``alone()``: whether no other ``cycle`` holds one now (an exclusive try,
    which gives up the shared lock when it fails; ``False`` where locks are not available)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield lambda: False
        return
    fd = os.open(run / CYCLES_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:  # a file system without flock (fold_locks has said so): never alone
            yield lambda: False
            return

        def alone() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            return True

        yield alone
    finally:
        os.close(fd)


def _finished_stages(run: Path) -> dict[str, int]:
    """The last finished stage of every fold folder of ``run`` (``foldK``, a volume run's ``all``)."""
    return {d.name: StageScheduler(None, d).last_finished_stage() for d in sorted(run.iterdir())
            if d.is_dir() and (d.name == "all" or re.fullmatch(r"fold\d+", d.name))}


@contextmanager
def _targets_recorded(run: Path, stages: int, stop_below_mm: float | None) -> Iterator[float | None]:
    """Record ``cycle``'s stage target (:func:`_record_stage_target`) and stopping rule
    (:func:`_record_stop_rule`) in ``run/run.json`` for the training in the ``with`` block; yields the rule.
    A refusal (:class:`InputError`) puts back what ``run.json`` held, so that a command that refuses writes
    nothing, unless another command may rely on what it recorded: another ``cycle`` on the run is working
    (:func:`_cycles_on_run`), a fold finished a stage meanwhile, or ``run.json`` was rewritten meanwhile."""
    with _cycles_on_run(run) as alone:
        with run_file_lock(run):
            before = (run / "run.json").read_bytes()
            _record_stage_target(run, stages)
            rule = _record_stop_rule(run, stop_below_mm)
            after = (run / "run.json").read_bytes()
        finished = _finished_stages(run)
        try:
            yield rule
        except InputError:
            if after != before and finished == _finished_stages(run) and alone():
                with run_file_lock(run):
                    if (run / "run.json").read_bytes() == after:
                        atomic_write_bytes(run / "run.json", lambda fh: fh.write(before))
            raise


def _require_threshold(stop_below_mm: float | None) -> None:
    if stop_below_mm is not None and (not finite_number(stop_below_mm) or stop_below_mm < 0):
        raise InputError(f"--stop-below {stop_below_mm!r}: expected a distance in mm >= 0 (0: never stop early)")


def _read_meta(run: Path, kind: str | None = None) -> dict:
    """``run/run.json``, checked to be what cyclereg writes there (a dataset kind, its folds and a
    configuration of its kind with its number of stages), so that no caller meets a foreign shape.
    ``kind`` (``"keypoints"`` / ``"volumes"``): what the caller reads it as; a run of the other kind is
    then not parsed further here (the caller refuses it as another dataset's)."""
    try:
        meta = json.loads((run / "run.json").read_text(encoding="utf-8-sig"))  # an editor's byte-order mark too
    except JSON_READ_ERRORS:
        raise InputError("not a cyclereg run directory (run.json missing or unreadable)", run) from None
    config_class = {"keypoints": CloudCycleConfig, "volumes": DenseCycleConfig}.get(
        meta.get("kind") if isinstance(meta, dict) else None)
    try:
        if config_class is None or not isinstance(meta.get("folds", []), list):
            raise TypeError("kind or folds")
        stages = meta["config"]["stages"]
        if not whole_number(stages) or stages < 1:
            raise ValueError("stages")
        rule = meta.get(STOP_KEY)
        if rule is not None and not (finite_number(rule) and rule > 0):
            raise ValueError(STOP_KEY)
        if kind is None or meta.get("kind") == kind:  # another kind's run: the caller names it another dataset's
            config_class.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"run.json is not a run record cyclereg wrote (its kind, folds or configuration: "
                         f"{type(exc).__name__} {exc}); restore it or start a new run directory", run / "run.json") from None
    return meta


def _check_identity(run: Path, meta: dict, ident: dict) -> None:
    """:class:`InputError` when ``run`` (its ``run.json``, ``meta``) was made for another dataset
    than ``ident`` describes, or from files whose content has changed since (runs made before the
    record of file contents are checked by name, ids and folds only)."""
    for key in ("kind", "dataset", "pairs", "folds"):
        if meta.get(key) != ident[key]:
            raise InputError(f"run directory belongs to another dataset ({key} differs)", run)
    stored = meta.get("data")
    if not isinstance(stored, dict):
        return
    for group, what in (("pairs", "keypoint files of pair(s)"), ("images", "training scan(s)")):
        before, now = stored.get(group), ident["data"].get(group)
        if isinstance(before, dict) and before != now:
            changed = sorted(k for k in set(before) | set(now or {}) if before.get(k) != (now or {}).get(k))
            raise InputError(f"the {what} {', '.join(changed)} changed (by content) since this run's pseudo labels "
                             "were made: its labels and checkpoints belong to the earlier files; start a new run "
                             "directory (or restore the files)", run)


def pretrain_random(dataset: Path, run: Path, *, seed: int | None = None, fold: str | int | None = None,
                    device: str = "auto", config: CloudCycleConfig | DenseCycleConfig | None = None, val_pairs: int = 0,
                    jobs: int = 1, folds: str | int | None = None, **options) -> Path:
    """Create ``run`` and write stage-0 pseudo labels (random network + optimiser + refinement).

    Keypoint datasets get one run per cross-validation fold; volume datasets one run on
    their training pairs. ``options`` are the command-line overrides (``stages``,
    ``epochs``, ``iterations``, ``augment``, ...); ``config`` replaces the defaults, its seed
    included unless ``seed`` is given (a run.json configuration fed back makes the same run). Into an
    existing run (e.g. to label another fold), options not given (and ``seed=None`` without ``config``)
    take the run's values; given ones must agree with them. A new run's ``seed`` defaults to 0.
    ``val_pairs`` (reporting only, never used for training): after every stage, log the
    landmark TRE of the first N held-out pairs of the fold (keypoint datasets) or the Dice
    of the first N ``registration_val`` pairs (volume datasets; each needs its two label maps).
    ``jobs``: keypoint datasets label up to this many folds at once in worker processes, as
    :func:`run_cycle` trains them (the labels of one at a time, thread counts alike). A fold whose stage-0 labels
    exist already is skipped, so the same command completes an interrupted run.
    ``folds``: the same as ``fold`` (the command takes ``--fold`` and ``--folds``, :func:`run_cycle` ``folds``).
    """
    refuse_empty_paths({"dataset": dataset, "run": run}, required=("dataset", "run"), lists=())
    if fold is not None and folds is not None:
        raise InputError("give fold or folds, not both (they are one option)")
    fold = fold if fold is not None else folds  # read by select_folds, as run_cycle's folds (2.0 is fold 2)
    kind = dataset_kind(dataset)
    wanted = CloudCycleConfig if kind == "keypoints" else DenseCycleConfig
    if config is not None and not isinstance(config, wanted):  # the other kind's was replaced by the defaults
        raise InputError(f"config: a {kind} dataset takes a {wanted.__name__}, got a {type(config).__name__}", dataset)
    require_count("--val-pairs", val_pairs, 0)
    require_count("--jobs", jobs, 1)
    if kind == "keypoints":
        return _made_meanwhile_once(lambda: _cloud_pretrain(
            dataset, Path(run), seed=seed, fold=fold, device=device, config=config,
            options=_only(kind, CLOUD_OPTIONS, options), val_pairs=val_pairs, jobs=jobs))
    if fold not in (None, "all"):
        raise InputError("--fold: volume datasets have no folds", dataset)
    if jobs != 1:
        raise InputError("--jobs: volume datasets have one training set (no folds to share out)", dataset)
    return _made_meanwhile_once(lambda: _dense_pretrain(
        dataset, Path(run), seed=seed, device=device, config=config, val_pairs=val_pairs,
        options=_only(kind, DENSE_OPTIONS, options)))


class _RunMadeMeanwhile(Exception):
    """Raised under the run lock by a ``pretrain-random`` that found no run.json when it started and finds
    one now (another command made the run meanwhile): it starts again, to take the run's values as a
    command started after the other one would."""


def _made_meanwhile_once(pretrain: Callable[[], Path]) -> Path:
    """``pretrain()``, started once more if it raised :class:`_RunMadeMeanwhile` (its locks are released
    by then; the second start finds the run.json, so it does not raise it again)."""
    try:
        return pretrain()
    except _RunMadeMeanwhile:
        return pretrain()


def _refuse_run_made_meanwhile(run: Path, stored) -> None:
    """:class:`_RunMadeMeanwhile` when the command started without a run (``stored`` None) and, under the
    run lock now, run.json exists."""
    if stored is None and (run / "run.json").exists():
        raise _RunMadeMeanwhile()


def stage0_labelled(run: Path) -> set[str]:
    """The folders of ``run`` (``foldK`` or ``all``) that hold stage-0 pseudo labels (read only)."""
    run = Path(run)
    if not run.is_dir():
        return set()
    return {d.name for d in run.iterdir() if d.is_dir() and StageScheduler(None, d).labels_path(0).is_file()}


def pretrain_random_summary(dataset: Path, run: Path, **kwargs) -> str:
    """:func:`pretrain_random` (``kwargs`` as it takes them), then the line the command prints: where the
    stage-0 labels are and, in a run that had some already, which folds were labelled now and which kept
    (a metric-supervised volume run, ``--supervision mind|ncc``: that its stage 0 holds no labels). When no
    labels were made, a note on stderr names the given ``val_pairs``, ``jobs`` and ``device``: they were not used."""
    before = stage0_labelled(run)
    out = pretrain_random(dataset, run, **kwargs)
    made = sorted(stage0_labelled(run) - before)
    unused = [f"{name} {value}" for name, value, default in (("--val-pairs", kwargs.get("val_pairs", 0), 0),
                                                             ("--jobs", kwargs.get("jobs", 1), 1),
                                                             ("--device", kwargs.get("device", "auto"), "auto"))
              if value != default]
    supervision = _read_meta(out)["config"].get("supervision", "pseudo")
    if before and not made and unused:  # they only shape the making of stage 0
        print_note(f"{', '.join(unused)} not used: "
                   + ("the stage-0 labels exist already" if supervision == "pseudo" else "stage 0 is recorded already"))
    if supervision != "pseudo":
        return (f"the run is ready in {out}: --supervision {supervision} needs no pseudo labels (its stage 0 holds "
                f"none{', recorded before' if before else ''}); 'cyclereg cycle' trains it")
    kept = ""
    if before:
        kept = (f" (made now: {', '.join(made)}; the stage-0 labels that were there already were kept: "
                f"{', '.join(sorted(before))})" if made else " (the stage-0 labels that were there already were kept)")
    return f"stage-0 pseudo labels are in {out}{kept}"


def run_status(run: Path, stages: int | None = None) -> dict:
    """Progress of a run directory, read only: dataset, kind, the number of stages (the run's
    configuration, or ``stages``) and per fold (``None``: a volume run) the
    :meth:`~cyclereg.training.scheduler.StageScheduler.status` of its directory."""
    refuse_empty_paths({"run": run}, required=("run",), lists=())
    run = Path(run)
    if exported_models(run):
        record = next((n for n in ("ensemble.json", "model_set.json") if (run / n).is_file()), None)
        raise InputError("a folder of exported per-fold models (foldK.pt), not a run directory: it has no training "
                         "progress to show" + (f" (its members' runs are listed in {record})" if record else "")
                         + "; 'cyclereg evaluate --run' uses it", run)
    meta = _read_meta(run)
    require_count("--stages", stages, 1)
    try:
        total = int(meta["config"]["stages"]) if stages is None else stages
        folds = list(range(1, len(meta["folds"]) + 1)) if meta["folds"] else [None]
    except (KeyError, TypeError, ValueError):
        raise InputError("run.json lacks the configuration or the folds", run / "run.json") from None
    rule = meta.get(STOP_KEY)
    rows = []
    for k in folds:
        row = {"fold": k, **StageScheduler(None, fold_dir(run, k)).status(
            total, stop_below_mm=rule, kind=CHECKPOINT_KINDS.get(meta.get("kind")))}
        exported = run / f"fold{k}.pt"
        if k is not None and not fold_dir(run, k).is_dir() and exported.is_file():
            # a folder of exported checkpoints (scripts/run_model_set.py, cyclereg ensemble): no stages here
            row["next"] = f"no training here: the exported checkpoint {exported.name}"
            row["exported"] = True
        rows.append(row)
    return {"run": str(run), "dataset": meta.get("dataset"), "kind": meta.get("kind"), "stages": total,
            STOP_KEY: rule, "folds": rows}


def fold_finished(row: dict) -> bool:
    """Whether a fold row of :func:`run_status` has finished its training (all its stages, or settled by the
    stopping rule): its 'next' reads "finished ..."."""
    return str(row["next"]).startswith("finished")


def nothing_left_to_train(run: Path, stages: int | None = None, folds: str | int | None = "all") -> bool:
    """Whether :func:`run_cycle` with these options has nothing left to do in ``run``: every fold of
    ``folds`` has finished towards ``stages`` (``None``: the run's), as ``status`` reads it (read only);
    ``False`` when that cannot be read (a damaged run, options that ``cycle`` refuses)."""
    try:
        rows = run_status(Path(run), stages)["folds"]
        if folds not in (None, "all"):
            rows = [row for row in rows if row["fold"] == int(folds)]
    except (InputError, OSError, ValueError, TypeError):
        return False
    return bool(rows) and all(fold_finished(row) for row in rows)


def run_cycle(dataset: Path, run: Path, *, stages: int | None = None, folds: str = "all",
              device: str = "auto", val_pairs: int = 0, snapshot_every_s: float | None = None,
              jobs: int = 1, stop_below_mm: float | None = None) -> dict:
    """Run or resume cyclical self-training; returns ``{fold: last stage}`` (fold ``None``
    for volume datasets).

    ``jobs``: keypoint datasets train up to this many folds at once in worker processes
    (:mod:`cyclereg.training.parallel`), sharing the intra-op threads between them; results
    are those of the sequential run when every process works with the same number of intra-op
    threads (floating-point sums depend on it). The folds worked on are locked meanwhile (:func:`fold_locks`).

    ``snapshot_every_s``: minimum time between mid-stage training snapshots [s] (``None``:
    :data:`~cyclereg.training.scheduler.DEFAULT_SNAPSHOT_EVERY_S`; ``0``: none). A stage killed
    halfway resumes at its last snapshot, with the same result as an uninterrupted stage.

    ``stop_below_mm``: a landmark-free early stop: a fold ends at the first stage whose pseudo-label
    refresh moves its labels less than this on average [mm] (``pseudo_label_change_mm``; ``stages`` is
    then the most it runs). Recorded in ``run.json``, so that the same command run again (with or
    without the option) does not go on past it; ``0`` removes the rule; ``None``: the recorded one."""
    refuse_empty_paths({"dataset": dataset, "run": run}, required=("dataset", "run"), lists=())
    require_count("--stages", stages, 1)
    _require_threshold(stop_below_mm)
    require_count("--val-pairs", val_pairs, 0)
    require_count("--jobs", jobs, 1)
    if snapshot_every_s is None:
        snapshot_every_s = DEFAULT_SNAPSHOT_EVERY_S
    elif not finite_number(snapshot_every_s) or snapshot_every_s < 0:
        raise InputError(f"--snapshot-every {snapshot_every_s!r}: expected a number of seconds >= 0")
    if dataset_kind(dataset) == "keypoints":
        return _cloud_cycle(dataset, Path(run), stages=stages, folds=folds, device=device, val_pairs=val_pairs,
                            snapshot_every_s=snapshot_every_s, jobs=jobs, stop_below_mm=stop_below_mm)
    if folds not in (None, "all"):
        raise InputError("--folds: volume datasets have no folds", dataset)
    if jobs != 1:
        raise InputError("--jobs: volume datasets train one model (no folds to share out)", dataset)
    return _dense_cycle(dataset, Path(run), stages=stages, device=device, val_pairs=val_pairs,
                        snapshot_every_s=snapshot_every_s, stop_below_mm=stop_below_mm)


# ----------------------------------------------------------------------------- keypoint clouds
def _cloud_val_hook(ds, fold: int | None, n: int):
    """Reporting hook: mean landmark TRE of the first ``n`` held-out pairs of ``fold``."""
    if n <= 0:
        return None
    from cyclereg.clouds.pipeline import register_clouds

    held = [ds.pair(pid) for pid in (ds.folds[fold - 1] if fold is not None else [])][:n]
    if not held:
        raise InputError("--val-pairs needs a fold with held-out pairs", ds.path)
    for p in held:
        if p.fixed_landmarks is None or p.moving_landmarks is None:
            raise InputError(f"--val-pairs: held-out pair {p.id} has no landmarks", ds.path)
    # read (and so checked) now, before any stage work: a bad file fails the command at its start
    clouds = []
    for p in held:
        lf, lm = ds.read_landmarks(p, f"--val-pairs: pair {p.id}")
        clouds.append((ds.read_points(p.fixed_keypoints), ds.read_points(p.moving_keypoints), lf, lm))

    def hook(stage, model, task):
        errors = []
        model.eval()
        for f, m, lf, lm in clouds:
            dev = task.device
            f, m, lf, lm = f.to(dev), m.to(dev), lf.to(dev), lm.to(dev)
            reg = register_clouds(f, m, model, task.model_config(), box=task.box)
            errors.append((lf + reg.at(lf) - lm).norm(dim=1).mean().item())
        return {"val_pairs": len(held), "val_tre_mm": sum(errors) / len(errors)}

    return hook


def _scheduler(task, directory, hook, **kw) -> StageScheduler:
    return StageScheduler(task, directory, hook=(lambda t, m: hook(t, m, task)) if hook else None, **kw)


def _seed(seed: int | None, stored, given=None) -> int:
    """The seed of ``pretrain-random``: the given one, else the given configuration's (``given``: a run.json
    configuration fed back keeps its seed), else the existing run's (``stored``: its configuration), else 0."""
    if seed is not None:
        return int(require_seed(seed))
    if given is not None:
        return int(require_seed(given.seed))
    return int(stored.seed) if stored is not None else 0


def _cloud_pretrain(dataset, run, *, seed, fold, device, config, options, val_pairs=0, jobs: int = 1) -> Path:
    ds = load_keypoint_dataset(dataset)
    folds = select_folds(ds, fold)
    ident = _identity(ds)  # hashes every keypoint file once
    stored = _check_cloud_run(run, ds, None, ident) if (run / "run.json").exists() else None
    given = config
    config = cycle_config(base=config if config is not None else stored, **options)
    config = replace(config, seed=_seed(seed, stored, given))
    _refuse_idle_options(options, config)
    dev = resolve_device(device)
    meta = {**ident, "config": to_jsonable(config)}
    meta = _prepare_run(run, meta, lambda: _check_cloud_run(run, ds, config, ident), stages_given="stages" in options)
    for k in folds:  # reads and validates all inputs before anything is written
        _cloud_task(ds, k, config, dev)
        _cloud_val_hook(ds, k, val_pairs)
    _note_sampling(min(len(ds.training_ids(k)) for k in folds), config)
    run.mkdir(parents=True, exist_ok=True)
    with fold_locks(run, folds):
        with run_file_lock(run):  # checked again under the lock: another command may have changed it meanwhile
            _refuse_run_made_meanwhile(run, stored)
            meta = _prepare_run(run, meta, lambda: _check_cloud_run(run, ds, config, ident),
                                stages_given="stages" in options, quiet=True)
            write_json(run / "run.json", meta)
        args = {k: (ds, config, run, k, dev, val_pairs) for k in folds}
        done = {k for k in folds if StageScheduler(None, fold_dir(run, k)).last_finished_stage() >= 0}  # labelled
        with _progress() as progress:
            _for_folds(_cloud_stage0_job, args, jobs, progress, on_result=lambda k: None, done=done)
    return run


def _for_folds(job, args: dict, jobs: int, progress, on_result, *, done: set = frozenset()) -> None:
    """``on_result(job(*args[k], progress=...))`` for every fold ``k`` of ``args``: in turn, or
    in up to ``jobs`` worker processes that share the intra-op threads (results in completion order;
    the last folds take over the threads of finished ones). The folds of ``done``, which only bring their
    record up to date, go first and in this process (starting a worker process costs seconds), so that
    one fold left to compute starts no worker either."""
    from cyclereg.training.parallel import LabelledProgress, run_parallel, share_threads

    label = {k: "all" if k is None else f"fold {k}" for k in args}
    rest = {k: a for k, a in args.items() if k not in done}
    in_turn = [k for k in args if k in done] + ([] if jobs > 1 and len(rest) > 1 else list(rest))
    for k in in_turn:
        on_result(job(*args[k], progress=LabelledProgress(progress, label[k])))
    if jobs > 1 and len(rest) > 1:
        total = torch.get_num_threads()
        threads = share_threads(total, min(jobs, len(rest)))
        run_parallel(((job, a, label[k]) for k, a in rest.items()), jobs, progress, threads,
                     on_result=on_result, total_threads=total)


def _cloud_stage0_job(ds, config, run, k, device, val_pairs, *, progress) -> int:
    """Stage-0 pseudo labels of fold ``k`` (skipped if present); returns ``k``. Module-level, with
    picklable arguments, so that worker processes can run it."""
    task = _cloud_task(ds, k, config, device)
    _scheduler(task, fold_dir(run, k), _cloud_val_hook(ds, k, val_pairs)).run_stage0(progress)
    return k


def _check_cloud_run(run: Path, ds, config: CloudCycleConfig | None, ident: dict | None = None) -> CloudCycleConfig:
    """The stored configuration of a keypoint run after checking that it belongs to ``ds``
    (``ident``: its :func:`_identity`, when computed already) and, with ``config``, that it was made
    with that configuration (the number of stages aside)."""
    meta = _read_meta(run, "keypoints")
    _check_identity(run, meta, ident if ident is not None else _identity(ds))
    stored = CloudCycleConfig.from_dict(meta["config"])
    if config is not None:
        _require_same_config(run, replace(config, stages=stored.stages), stored)
    return stored


def _config_differences(given, stored, prefix: str = "") -> list[str]:
    """``key: stored -> given`` for every (nested) configuration value that differs."""
    if isinstance(given, dict) and isinstance(stored, dict):
        out = []
        for key in sorted(set(given) | set(stored)):
            out += _config_differences(given.get(key), stored.get(key), f"{prefix}{key}.")
        return out
    return [] if given == stored else [f"{prefix[:-1]}: {stored} -> {given}"]


def _require_same_config(run: Path, config, stored) -> None:
    """:class:`InputError` naming what differs when ``config`` is not the run's stored configuration."""
    diff = _config_differences(to_jsonable(config), to_jsonable(stored))
    if diff:
        raise InputError("run directory was made with another configuration (run's -> given: "
                         + "; ".join(diff) + ")", run)


RESUME_FREE = ("stages", "lr", "amp", "cpu_bf16")
"""Settings of ``run.json`` that a resumed run may hold otherwise than its finished stages were trained with
(:func:`_require_trained_with`): the stage target (``cycle --stages`` raises it), the learning rate (lowered
after a diverged stage, as that error says) and a volume run's training precision (``amp`` on CUDA,
``cpu_bf16`` on CPU: where the next stage runs, as ``--device``; each stage's log line records its own)."""


def _require_trained_with(run: Path, directory: Path, config, model_config, kind: str) -> None:
    """:class:`InputError` naming ``run/run.json`` and the first setting (the checkpoint's value -> run.json's)
    in which ``config`` (the run's configuration now) differs from what the checkpoint of the last finished stage
    in ``directory`` records: the run's configuration it was trained with (``extra["run_config"]``, checkpoints
    since 2026-12-07; :data:`RESUME_FREE` aside), else (older checkpoints) its registration settings
    (``model_config``: the task's :meth:`model_config` now; a keypoint run's training box aside, which the
    dataset fixes) and its number of epochs / iterations. So a run.json edited after some stages finished is
    not resumed with settings its stages never had. Nothing to compare before stage 1; a checkpoint that cannot
    be read is left to the scheduler, which names it."""
    from cyclereg.checkpoint import load_checkpoint
    from cyclereg.clouds.pipeline import CloudRegConfig
    from cyclereg.dense.config import config_from_dict

    sched = StageScheduler(None, directory)
    done = sched.last_finished_stage()
    if done < 1:
        return
    path = sched.checkpoint_path(done)
    cycle_class = CloudCycleConfig if kind == "keypoints" else DenseCycleConfig
    try:
        ckpt = load_checkpoint(path, kind=CHECKPOINT_KINDS[kind])
        extra = ckpt.get("extra") or {}
        recorded = extra.get("run_config")
        if isinstance(recorded, dict):
            given = {k: v for k, v in to_jsonable(config).items() if k not in RESUME_FREE}
            stored = {k: v for k, v in to_jsonable(cycle_class.from_dict(recorded)).items() if k not in RESUME_FREE}
            diff = _config_differences(given, stored)
        else:
            prefix = "reg" if kind == "keypoints" else "pipeline"
            stored_model = (replace(CloudRegConfig.from_dict(ckpt["config"]), training_box=None)
                            if kind == "keypoints" else config_from_dict(ckpt["config"]))
            diff = _config_differences({prefix: to_jsonable(model_config)}, {prefix: to_jsonable(stored_model)})
            train = extra.get("train") if isinstance(extra.get("train"), dict) else {}
            for key in ("epochs", "iterations"):
                if key in train and hasattr(config, key) and train[key] != getattr(config, key):
                    diff.append(f"{key}: {train[key]} -> {getattr(config, key)}")
    except (InputError, KeyError, TypeError, ValueError, AttributeError):
        return  # the scheduler names a damaged checkpoint
    if diff:
        raise InputError(f"the run's finished stages were trained with another configuration "
                         f"({path.relative_to(run)}'s -> run.json's: {diff[0]}); put it back in run.json, or start "
                         "a new run directory", run / "run.json")


def _cloud_cycle(dataset, run, *, stages, folds, device, val_pairs=0,
                 snapshot_every_s: float = DEFAULT_SNAPSHOT_EVERY_S, jobs: int = 1,
                 stop_below_mm: float | None = None) -> dict:
    ds = load_keypoint_dataset(dataset)
    config = _check_cloud_run(run, ds, None)
    stages = config.stages if stages is None else stages
    dev = resolve_device(device)
    selected = select_folds(ds, folds, "--folds")
    def require_labels(k: int, *, folder_only: bool = False) -> None:
        found = fold_dir(run, k).is_dir() if folder_only else (fold_dir(run, k) / "pseudo0.pt").is_file()
        if not found:
            raise InputError(f"fold {k}: no stage-0 pseudo labels; run 'cyclereg pretrain-random {dataset} -o {run} "
                             f"--fold {k}' first (it takes the run's options)", run)

    for k in selected:
        require_labels(k, folder_only=True)  # no fold folder: no command is labelling it (its lock is there)
        _cloud_val_hook(ds, k, val_pairs)  # its files are read and checked before any training
    result = {}
    with fold_locks(run, selected):  # first: a pretrain-random labelling a fold now is named as busy
        for k in selected:
            require_labels(k)
            _require_trained_with(run, fold_dir(run, k), config, replace(test_time_config(config), training_box=None),
                                  "keypoints")
        with _targets_recorded(run, stages, stop_below_mm) as rule:
            args = {k: (ds, config, run, k, stages, dev, val_pairs, snapshot_every_s, rule) for k in selected}
            # folds that have all their stages already (or have settled) only bring their record up to date
            done = {k for k in selected if _fold_complete(StageScheduler(None, fold_dir(run, k)), stages, rule)}
            with _progress() as progress:
                outer = progress.add_task("folds", total=len(selected))

                def finished(k: int, final: int) -> None:
                    result[k] = final
                    progress.advance(outer)

                _for_folds(_cloud_fold_job, args, jobs, progress, on_result=lambda r: finished(*r), done=done)
    return {k: result[k] for k in selected}


def _fold_complete(sched: StageScheduler, stages: int, stop_below_mm: float | None) -> bool:
    """Whether a fold has nothing left to train: all ``stages`` finished, or its labels settled."""
    return sched.last_finished_stage() >= stages or sched.settled(stop_below_mm) is not None


def _cloud_training_record(ds, k) -> dict:
    """The :func:`~cyclereg.checkpoint.training_record` of fold ``k``: its training pairs' keypoint files."""
    return training_record(ds.name, k, pairs=_pair_fingerprints(ds, ds.training_ids(k)))


def _cloud_fold_job(ds, config, run, k, stages, device, val_pairs, snapshot_every_s, stop_below_mm=None, *,
                    progress) -> tuple[int, int]:
    """Train (or resume) fold ``k``; returns ``(k, last finished stage)``. Module-level, with
    picklable arguments, so that worker processes can run it."""
    task = _cloud_task(ds, k, config, device)
    final = _scheduler(task, fold_dir(run, k), _cloud_val_hook(ds, k, val_pairs), snapshot_every_s=snapshot_every_s,
                       training=_cloud_training_record(ds, k), run_config=to_jsonable(config)
                       ).run(stages, progress, stop_below_mm=stop_below_mm)
    return k, final


# ----------------------------------------------------------------------------- volumes
DENSE_KEEP_LABELS = 2
"""Dense pseudo labels are large (190 pairs x 3 x 96 x 80 x 128 float16 ~ 1.1 GB per
stage): only the newest two label files are kept (resuming needs only the newest)."""


def spread_pairs(n: int, count: int | None = None) -> list[tuple[int, int]]:
    """The first ``count`` (default: all ``n (n - 1) / 2``) pairs ``(i, j)``, ``i < j``, of ``n``
    images in an order whose every prefix spreads over the images: each next pair is the unused one
    whose images are in the fewest pairs so far (smallest larger count, then smallest sum; ties: the
    images nearest on a ring, then the smallest ``i``). The first ``N`` pairs put each image in
    ``2 N / n`` of them give or take two, and every image in one once ``N >= n / 2`` (e.g. a perfect
    matching first), where the plain order ``(0, 1), (0, 2), ...`` pairs image 0 with every other one
    first. Deterministic; ``count`` steps over all pairs each (vectorised: ~1 s for 1000 of 300 images)."""
    import numpy as np

    i, j = np.triu_indices(n, 1)
    ring = np.minimum(j - i, n - (j - i))
    counts = np.zeros(n, np.int64)
    free = np.ones(len(i), bool)
    order = []
    for _ in range(len(i) if count is None else min(count, len(i))):
        ci, cj = counts[i], counts[j]
        k = np.lexsort((i, ring, ci + cj, np.maximum(ci, cj), ~free))[0]  # the last key sorts first
        free[k] = False
        counts[i[k]] += 1
        counts[j[k]] += 1
        order.append((int(i[k]), int(j[k])))
    return order


def _dense_training_set(dataset: Path, config: DenseCycleConfig, run: Path | None = None):
    """Training image paths and ``(i, j)`` index pairs (no labels are read). ``run``: the run
    directory whose stored configuration ``config`` is (``cycle``), for the message."""
    from cyclereg.dense.data import training_images, training_pairs

    listed = training_pairs(dataset, held_out=config.train_images == "held-out")
    if listed is not None:  # a paired dataset: the pairs it lists, not every two of its scans
        return _listed_training_set(dataset, config, listed)
    images = training_images(dataset, held_out=config.train_images == "held-out")
    if len(images) < 2:
        hint = ""
        if config.train_images == "held-out" and run is None:
            hint = " (the others are in registration_val pairs; pretrain-random --train-images all trains on those too)"
        elif config.train_images == "held-out":
            hint = (f" (the others are in registration_val pairs, which the run {run} holds out: is this the "
                    "dataset it was made with?)")
        raise InputError(f"need at least 2 training images, found {len(images)}{hint}", dataset)
    if config.max_train_pairs is None:
        pairs = [(i, j) for i in range(len(images)) for j in range(i + 1, len(images))]
    else:  # enough pairs for the directions asked
        pairs = spread_pairs(len(images), config.max_train_pairs)
    if config.directions == "both":
        pairs = [q for i, j in pairs for q in ((i, j), (j, i))]
    if config.max_train_pairs is not None:
        pairs = pairs[: config.max_train_pairs]
    used = sorted({i for pair in pairs for i in pair})
    remap = {old: new for new, old in enumerate(used)}
    return [images[i] for i in used], [(remap[i], remap[j]) for i, j in pairs]


def _listed_training_set(dataset: Path, config: DenseCycleConfig, listed: list[tuple[Path, Path]]):
    """:func:`_dense_training_set` of a paired dataset: its listed ``(fixed, moving)`` pairs (both ways with
    ``directions`` both, the first ``max_train_pairs``), their scans in order of appearance."""
    if not listed:
        hint = (" (the others have a scan in registration_val pairs; --train-images all trains on those too)"
                if config.train_images == "held-out" else "")
        raise InputError(f"no training pair left in 'training_paired_images'{hint}", dataset)
    if config.directions == "both":  # each direction once, also where the list gives both already
        listed = list(dict.fromkeys(q for f, m in listed for q in ((f, m), (m, f))))
    if config.max_train_pairs is not None:
        listed = listed[: config.max_train_pairs]
    images = list(dict.fromkeys(scan for pair in listed for scan in pair))
    index = {scan: k for k, scan in enumerate(images)}
    return images, [(index[f], index[m]) for f, m in listed]


def _dense_identity(dataset: Path, images, pairs) -> dict:
    from cyclereg.dense.data import pair_ids, scan_ids, unique_ids
    from cyclereg.datasets import read_json

    name = str(read_json(dataset).get("name", Path(dataset).stem))
    ids = scan_ids(images)
    return {"dataset": name, "kind": "volumes",
            "pairs": pair_ids([(ids[i], ids[j]) for i, j in pairs]), "folds": [],
            # keyed by file name, made unique (scans of one name in per-subject folders: NAME~2, ...)
            "data": {"images": dict(zip(unique_ids([Path(p).name for p in images]), map(data_fingerprint, images)))}}


def _dense_task(dataset: Path, config: DenseCycleConfig, device, images, pairs):
    import numpy as np

    from cyclereg.datasets import read_json
    from cyclereg.dense.api import require_volume_size
    from cyclereg.dense.data import dataset_modality, preprocess, require_contrast, resolve_mode, scan_ids
    from cyclereg.training.dense import DenseCycleTask, VolumeImage
    from cyclereg.volumeio import GRID_TOLERANCE_MM, axis_codes, read_nifti, spacing_differs, spacing_text

    modality = dataset_modality(read_json(dataset), dataset)
    loaded, first, first_mode = [], None, None
    for path, scan in zip(images, scan_ids(images)):
        vol = read_nifti(path)
        if first is None:
            first = vol
        elif vol.shape != first.shape or spacing_differs(vol.spacing, first.spacing, config.pipeline.spacing_tolerance):
            raise InputError(f"training images need one shape and spacing: {vol.shape} / {spacing_text(vol.spacing)} "
                             f"mm here, {first.shape} / {spacing_text(first.spacing)} mm in {first.path}; resample "
                             "first", path)
        elif not np.allclose(vol.affine[:3, :3], first.affine[:3, :3], rtol=0.0, atol=GRID_TOLERANCE_MM):
            raise InputError(f"its voxel axes lie otherwise in the world than those of {first.path} (another "
                             "orientation): training registers the voxel arrays; resample onto one grid first", path)
        require_volume_size(config.pipeline, vol)  # as register: stage 0 registers the scans as they are
        require_contrast(vol)  # as register and evaluate: a constant scan carries nothing to learn from
        mode = resolve_mode(vol.data, config.pipeline.preprocess, modality)
        if first_mode is None:
            first_mode = mode
        elif mode != first_mode:
            raise InputError(f"intensity preprocessing '{mode}' here but '{first_mode}' for {first.path}; set the "
                             "dataset's 'modality' (CT or MRI) so that all training images are treated alike", path)
        loaded.append(VolumeImage(scan, preprocess(vol.data, config.pipeline.preprocess, mode)[None, None]))
    # the checkpoints record the mode the network was trained with, so that register/evaluate
    # preprocess as training did whatever their inputs look like
    pinned = replace(config.pipeline.preprocess, mode=first_mode)
    config = replace(config, pipeline=replace(config.pipeline, preprocess=pinned))
    return DenseCycleTask(loaded, pairs, first.spacing, config, device, orientation=axis_codes(first.affine))


def _dense_val_hook(dataset: Path, n: int, console=None):
    """Reporting hook: mean Dice of the first ``n`` labelled registration_val pairs."""
    if n <= 0:
        return None
    from cyclereg.dense.api import register_pair
    from cyclereg.dense.data import check_pair_grids, load_volume_dataset
    from cyclereg.metrics import dice, scored_labels
    from cyclereg.volumeio import read_nifti
    from cyclereg.warp import warp_labels

    ds = load_volume_dataset(dataset)
    pairs = list(ds.pairs)[:n]
    for p in pairs:
        for scan, labels in ((p.fixed, p.fixed_labels), (p.moving, p.moving_labels)):
            if labels is None:  # the scan without one is named
                raise InputError("--val-pairs needs label maps for the registration_val pairs (no label map found for "
                                 "this scan)", scan)
    cache = {}

    def vol(path, labels=False):
        if path not in cache:
            cache[path] = read_nifti(path, labels=labels)
        return cache[path]

    for p in pairs:  # read (and so checked) now, before any stage work: a bad file fails the command at its start
        check_pair_grids(vol(p.fixed), vol(p.moving), vol(p.fixed_labels, True), vol(p.moving_labels, True))

    def hook(stage, model, task):
        import numpy as np

        before, after = [], []
        for p in pairs:
            fl, ml = vol(p.fixed_labels, True), vol(p.moving_labels, True)
            disp = register_pair(vol(p.fixed), vol(p.moving), model.eval(), task.pipeline, modality=ds.modality)
            warped = warp_labels(ml.data[None, None].to(disp.device), disp)[0, 0].cpu()
            labels = scored_labels(fl.data, ml.data)
            before.append(np.mean(list(dice(fl.data, ml.data, labels).values())))
            after.append(np.mean(list(dice(fl.data, warped, labels).values())))
        return {"val_pairs": len(pairs), "val_initial_dice": float(np.mean(before)), "val_dice": float(np.mean(after))}

    return hook


def _dense_pretrain(dataset, run, *, seed, device, config, val_pairs, options) -> Path:
    stored = _dense_run_config(run, _read_meta(run, "volumes")) if (run / "run.json").exists() else None
    given = config
    config = dense_cycle_config(base=config if config is not None else stored, **options)
    config = replace(config, seed=_seed(seed, stored, given))
    _refuse_idle_options(options, config)
    dev = resolve_device(device)
    images, pairs = _dense_training_set(dataset, config)
    ident = _dense_identity(dataset, images, pairs)
    meta = {**ident, "config": to_jsonable(config)}
    meta = _prepare_run(run, meta, lambda: _check_dense_run(run, ident, config), stages_given="stages" in options)
    task = _dense_task(dataset, config, dev, images, pairs)  # reads and validates all inputs first
    _note_sampling(len(pairs), config)
    _note_precision(config, dev)
    hook = _dense_val_hook(dataset, val_pairs)
    run.mkdir(parents=True, exist_ok=True)
    with fold_locks(run, [None]):
        with run_file_lock(run):  # checked again under the lock: another command may have changed it meanwhile
            _refuse_run_made_meanwhile(run, stored)
            meta = _prepare_run(run, meta, lambda: _check_dense_run(run, ident, config),
                                stages_given="stages" in options, quiet=True)
            write_json(run / "run.json", meta)
        with _progress() as progress:
            _scheduler(task, fold_dir(run, None), hook, keep_labels=DENSE_KEEP_LABELS).run_stage0(progress)
    return run


def _dense_run_config(run: Path, meta: dict) -> DenseCycleConfig:
    """The stored configuration of a volume run (``meta``: its run.json); a run of a keypoint dataset is refused."""
    if meta.get("kind") != "volumes":
        raise InputError("run directory belongs to another dataset (kind differs)", run)
    return DenseCycleConfig.from_dict(meta["config"])


def _check_dense_run(run: Path, ident: dict, config: DenseCycleConfig) -> DenseCycleConfig:
    meta = _read_meta(run, "volumes")
    stored = _dense_run_config(run, meta)
    _check_identity(run, meta, ident)
    _require_same_config(run, replace(config, stages=stored.stages), stored)
    return stored


def _dense_cycle(dataset, run, *, stages, device, val_pairs,
                 snapshot_every_s: float = DEFAULT_SNAPSHOT_EVERY_S, stop_below_mm: float | None = None) -> dict:
    meta = _read_meta(run, "volumes")
    config = _dense_run_config(run, meta)
    if stop_below_mm and config.supervision != "pseudo":  # the rule reads how far a refresh moves the labels
        raise InputError(f"--stop-below: a run with --supervision {config.supervision} makes no pseudo labels, so "
                         "no refresh can settle them; leave it out", run)
    images, pairs = _dense_training_set(dataset, config, run)
    ident = _dense_identity(dataset, images, pairs)
    _check_identity(run, meta, ident)
    stages = config.stages if stages is None else stages
    dev = resolve_device(device)
    task = _dense_task(dataset, config, dev, images, pairs)
    _note_precision(config, dev)
    hook = _dense_val_hook(dataset, val_pairs)
    sched = _scheduler(task, fold_dir(run, None), hook, keep_labels=DENSE_KEEP_LABELS,
                       snapshot_every_s=snapshot_every_s, run_config=to_jsonable(config),
                       training=training_record(ident["dataset"], None, images=ident["data"]["images"]))
    no_labels = InputError("no stage-0 pseudo labels; run 'cyclereg pretrain-random' first", run)
    if not fold_dir(run, None).is_dir():  # no folder: no command is labelling it (its lock is there)
        raise no_labels
    with fold_locks(run, [None]):  # first: a pretrain-random labelling the run now is named as busy
        if sched.last_finished_stage() < 0:
            raise no_labels
        _require_trained_with(run, fold_dir(run, None), config, task.model_config(), "volumes")
        with _targets_recorded(run, stages, stop_below_mm) as rule, _progress() as progress:
            return {None: sched.run(stages, progress, stop_below_mm=rule)}
