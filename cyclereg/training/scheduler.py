"""The stage scheduler of cyclical self-training, independent of the data modality.

Stage 0 makes pseudo labels with a randomly initialised network. Stage ``t >= 1`` trains
the network on the pseudo labels of stage ``t - 1`` (stage 1 from a fresh random
initialisation, later stages from the previous weights, each with a warm restart of the
learning rate) and then refreshes the pseudo labels with the trained network.

Everything a stage produces is written atomically into one directory per training run
(``stage{t}.pt`` checkpoint, ``pseudo{t}.pt`` labels, one JSON line in ``log.jsonl``), so
a killed run resumes after its last finished stage. Inside a stage, the training loop leaves a
:class:`StageSnapshot` (``stage{t}.partial.pt``) every ``snapshot_every_s`` seconds, so a
stage killed halfway resumes at its last snapshot, and a stage whose training finished but
whose pseudo-label refresh was killed is not trained again. The refresh itself keeps each pair's
label as it is made (:class:`LabelParts`, ``pseudo{t}.parts/``), so a killed refresh resumes at the
first pair without one (at the paper's 256 candidates on a CPU, one pair takes minutes).

A run may stop before its last stage on a landmark-free rule: once a refresh moves the pseudo
labels less than ``stop_below_mm`` on average (``pseudo_label_change_mm``, :meth:`StageTask.label_change_mm`),
the labels have settled and the run ends there (:func:`settled_stage`); the same command run again
does not go on, a smaller threshold or ``0`` (never stop) does.
"""

from __future__ import annotations

import datetime
import filecmp
import functools
import hashlib
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from rich.markup import escape
from torch import nn

from cyclereg import __version__
from cyclereg.checkpoint import (atomic_leftover, atomic_write_bytes, atomic_write_text, json_text, load_checkpoint,
                                 nonfinite_weights, save_checkpoint)
from cyclereg.errors import InputError, ResultError


class StageTask(Protocol):
    """What a modality provides to the scheduler."""

    checkpoint_kind: str

    def new_model(self, stage: int) -> nn.Module:
        """A freshly initialised feature network (seeded from the run seed and ``stage``)."""

    def model_config(self) -> Any:
        """Configuration stored in every checkpoint (enough to rebuild the model)."""

    def make_pseudo_labels(self, model: nn.Module, stage: int, progress, parts: "LabelParts | None" = None
                           ) -> tuple[dict, dict]:
        """Refined pseudo labels ``{pair_id: tensor}`` and per-pair sampling weights + stats.

        With ``parts``, a pair found there (:meth:`LabelParts.get`) is taken as it is, and every
        pair labelled here is put there (:meth:`LabelParts.put`) before the next one starts."""

    def train_stage(self, model: nn.Module, labels: dict, weights: dict, stage: int, progress,
                    snapshot: "StageSnapshot | None" = None) -> dict:
        """Train ``model`` in place on ``labels``; returns statistics (e.g. final loss).

        With a ``snapshot``, the loop first restores it (:meth:`StageSnapshot.restore`) and
        offers one at every step boundary (:meth:`StageSnapshot.offer`)."""

    def ran_on(self, stage: int) -> dict:
        """Where stage ``stage`` computes, for its ``log.jsonl`` line: ``{"device": "cpu" | "cuda:0" | ...,
        "training_precision": ...}`` (results depend on both; a run resumed elsewhere logs each stage's
        own). Optional: the scheduler logs nothing of it where a task lacks it."""

    def label_change_mm(self, old: dict, new: dict) -> float | None:
        """Mean distance [mm] between the pseudo labels ``old`` (stage ``t - 1``) and ``new``
        (stage ``t``) over the pairs both hold (per pair the mean over its points or voxels,
        then the mean over pairs); ``None`` where there is nothing to compare. Optional: the
        scheduler logs it as ``pseudo_label_change_mm`` where a task has it (landmark-free: how
        far a refresh moved the labels, a sign of how far the cycle is from a fixed point)."""


class StageSnapshot:
    """Mid-stage training state of one stage, so that a killed stage resumes where it stopped.

    The file (``stage{t}.partial.pt`` in the run directory) holds the network weights, the
    optimiser, learning-rate schedule and AMP-scaler states, the state of the sampling
    generator and of torch's global CPU generator, the number of finished steps (epochs for
    clouds, iterations for volumes), the loss history and the training seconds spent on the stage
    so far (over all its resumed runs; for ``cyclereg status``). It is written atomically at a step
    boundary when ``every_s`` seconds have passed since the last one, and deleted once the
    stage's checkpoint exists. A stage resumed from it ends where an uninterrupted one ends:
    bitwise on CPU with the same number of threads (CUDA's atomic adds are not bitwise
    reproducible even without an interruption).
    """

    FORMAT = 1

    def __init__(self, path: str | Path, *, stage: int, every_s: float):
        """
        Args:
            path: the snapshot file.
            stage: the stage being trained (checked on restore).
            every_s: minimum wall-clock time between two snapshots [s]; ``<= 0`` writes none
                (an existing one is still restored).
        """
        self.path = Path(path)
        self.stage = stage
        self.total_steps: int | None = None
        self.every_s = every_s
        self._elapsed_before = 0.0

    def restore(self, total_steps: int, *, model: nn.Module, optimizer, lr_schedule, generator: torch.Generator,
                scaler=None, progress=None, unit: str = "step") -> tuple[int, list[float]]:
        """Start of the training loop: ``total_steps`` is the length of the stage; loads the
        snapshot (if any) into the given objects and returns ``(finished_steps, losses)``,
        ``(0, [])`` when there is none. A resumed stage is announced on ``progress``'s console,
        counting in ``unit`` (e.g. ``"epoch"``)."""
        self.total_steps = total_steps
        self._last = self._start = time.monotonic()
        self._elapsed_before = 0.0
        if not self.path.is_file():
            return 0, []
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - atomic writes make this a foreign or damaged file
            raise InputError(f"unreadable training snapshot ({type(exc).__name__}); delete it to redo the stage",
                             self.path) from None
        if not isinstance(state, dict) or state.get("format") != self.FORMAT:
            raise InputError("not a cyclereg training snapshot; delete it to redo the stage", self.path)
        if state["stage"] != self.stage or state["total_steps"] != self.total_steps:
            raise InputError(f"training snapshot of stage {state['stage']} with {state['total_steps']} steps, "
                             f"expected stage {self.stage} with {self.total_steps}; delete it to redo the stage",
                             self.path)
        try:  # a snapshot of this format that is not whole (edited, or of another network) is named, not a traceback
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            lr_schedule.load_state_dict(state["lr_schedule"])
            generator.set_state(state["generator"])
            torch.random.set_rng_state(state["global_rng"])  # inside StageScheduler's fork: the caller's stays
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            step = int(state["step"])
            losses = [float(v) for v in state["losses"]]
            self._elapsed_before = float(state.get("elapsed_s", 0.0))  # absent in snapshots before 2026-12-03
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"training snapshot that does not fit this stage ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]}); delete it to redo the stage", self.path) from None
        if progress is not None:
            progress.console.print(f"stage {self.stage}: training resumes after {unit} {step}/{total_steps} "
                                   f"({escape(str(self.path))})", soft_wrap=True)
        return step, losses

    def offer(self, step: int, *, model: nn.Module, optimizer, lr_schedule, generator: torch.Generator,
              losses: list[float], scaler=None) -> bool:
        """Write a snapshot after ``step`` finished steps if ``every_s`` has passed; returns
        whether one was written. Call at step boundaries only."""
        if self.total_steps is None:
            raise RuntimeError("StageSnapshot.offer before restore")
        if self.every_s <= 0 or step >= self.total_steps or time.monotonic() - self._last < self.every_s:
            return False
        state = {
            "format": self.FORMAT, "version": __version__, "stage": self.stage, "total_steps": self.total_steps,
            "step": step,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
            "generator": generator.get_state(), "global_rng": torch.random.get_rng_state(),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
            "losses": list(losses),
            "elapsed_s": self._elapsed_before + time.monotonic() - self._start,
        }
        atomic_write_bytes(self.path, lambda fh: torch.save(state, fh))
        self._last = time.monotonic()
        return True

    @property
    def resumed_s(self) -> float:
        """Training seconds the stage had before this run (the restored snapshot's; 0 without one)."""
        return self._elapsed_before

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


PART_NAME_KEEP = 200
"""Characters of a pair id (all ASCII once made safe) that a pseudo-label part's file name keeps before the hash
that tells cut ids apart: with ``-HASH.pt`` the name stays under the usual 255-byte limit."""


class LabelParts:
    """The pseudo labels of one stage while they are being made, one file per pair, so that a
    killed refresh resumes at the first pair without a label.

    ``pseudo{t}.parts/{pair_id}.pt`` holds what the task computed for the pair (its label and
    per-pair statistics) and a fingerprint of the network that labelled it; a part made by
    another network (e.g. a stage retrained after its checkpoint was deleted) or unreadable is
    made again. Labelling is deterministic per pair (no generator runs across pairs), so a
    resumed refresh gives the labels of an uninterrupted one. The directory goes once the
    stage's ``pseudo{t}.pt`` is written.
    """

    FORMAT = 1

    def __init__(self, path: str | Path, model: nn.Module):
        self.path = Path(path)
        self.fingerprint = model_fingerprint(model)

    def _file(self, pair_id: str) -> Path:
        """``{pair_id}.pt``; an id with characters unfit for a file name gets them replaced and a
        short hash of the id appended (so that ``a/b`` and ``a_b`` stay apart), and one too long for a
        file name is cut to :data:`PART_NAME_KEEP` characters before the hash."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", pair_id)
        if safe != pair_id or safe.startswith(".") or len(safe) > PART_NAME_KEEP:
            safe = f"{safe[:PART_NAME_KEEP]}-{hashlib.sha256(pair_id.encode()).hexdigest()[:10]}"
        return self.path / f"{safe}.pt"

    def get(self, pair_id: str) -> dict | None:
        """The stored part of ``pair_id`` (a dict of tensors and numbers), or ``None``."""
        file = self._file(pair_id)
        if not file.is_file():
            return None
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - atomic writes make this a foreign or damaged file: redo the pair
            return None
        if (not isinstance(state, dict) or state.get("format") != self.FORMAT
                or state.get("fingerprint") != self.fingerprint):
            return None
        return state["part"]

    def put(self, pair_id: str, part: dict) -> None:
        state = {"format": self.FORMAT, "version": __version__, "fingerprint": self.fingerprint, "part": part}
        atomic_write_bytes(self._file(pair_id), lambda fh: torch.save(state, fh))

    @staticmethod
    def get_or_make(parts: "LabelParts | None", pair_id: str, make: Callable[[], dict]) -> dict:
        """The part of ``pair_id`` stored in ``parts``, else ``make()``, stored there before it is
        returned (``parts`` may be ``None``: then always ``make()``, nothing stored)."""
        part = parts.get(pair_id) if parts is not None else None
        if part is None:
            part = make()
            if parts is not None:
                parts.put(pair_id, part)
        return part

    @staticmethod
    def count_in(path: str | Path) -> int:
        """Pairs stored so far in the parts directory ``path`` (whatever network made them)."""
        path = Path(path)
        return len(list(path.glob("*.pt"))) if path.is_dir() else 0

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a network's state (names, dtypes, shapes and values), to tell its pseudo
    labels from another network's."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


DEFAULT_SNAPSHOT_EVERY_S = 60.0
"""Default minimum time between two mid-stage training snapshots [s]."""


StageHook = Callable[[int, nn.Module], dict]
"""``hook(stage, model) -> dict`` called after each finished stage; its result joins the log
line (used for reporting-only validation scores; it must not influence training)."""


def stage_summary(record: dict) -> str:
    """One line for a finished stage from its ``log.jsonl`` record: the stage, its seconds, and
    the training loss, pseudo-label disagreement, how far the refresh moved the labels and
    (reporting-only) validation TRE or Dice where the record has them, e.g. ``stage 3 finished in
    0:21:04: train loss 2.03 mm, label disagreement 2.51 mm, labels moved 0.87 mm``. Printed on the
    progress console, so that a run whose output goes to a log file (where no progress bar is drawn)
    still says how far it has come."""
    parts = []
    for key, value in record.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key == "train_loss_mm":
            parts.append(f"train loss {value:.2f} mm")
        elif key.startswith("train_loss_"):  # a metric-supervised ablation's loss, unitless
            parts.append(f"train loss ({key[len('train_loss_'):]}) {value:.4g}")
        elif key == "pseudo_label_disagreement_mm":
            parts.append(f"label disagreement {value:.2f} mm")
        elif key == "pseudo_label_change_mm":
            parts.append(f"labels moved {value:.2f} mm")
        elif key == "val_tre_mm":
            parts.append(f"validation TRE {value:.2f} mm")
        elif key == "val_dice":  # volumes: mean Dice of the held-out pairs (reporting only)
            parts.append(f"validation Dice {value:.3f}")
    took = str(datetime.timedelta(seconds=round(float(record.get("seconds", 0.0)))))
    return f"stage {record['stage']} finished in {took}" + (": " + ", ".join(parts) if parts else "")


def mean_label_change(old: dict, new: dict, distance: Callable[[torch.Tensor, torch.Tensor], float]
                      ) -> float | None:
    """:meth:`StageTask.label_change_mm` of two stages' labels ``{pair id: tensor}``: the mean over the
    pairs both hold with the same shape of ``distance(old, new)`` (a pair's mean distance in mm, in
    the task's own frame); ``None`` where no pair is in both."""
    common = [pid for pid in new if pid in old and old[pid].shape == new[pid].shape]
    if not common:
        return None
    return sum(distance(old[pid], new[pid]) for pid in common) / len(common)


def settled_stage(records: dict[int, dict], stop_below_mm: float | None) -> tuple[int, float] | None:
    """``(t, change)`` when the last logged stage ``t >= 1`` of ``records`` (``{stage: log.jsonl
    record}``) moved the pseudo labels by ``change < stop_below_mm`` mm (``pseudo_label_change_mm``):
    the labels have settled and the run stops there. ``None`` otherwise: no threshold (``None`` or
    ``<= 0``), no stage past 0, or a last stage without the measure (a task that has none)."""
    if not stop_below_mm or stop_below_mm <= 0 or not records:
        return None
    last = max(records)
    change = records[last].get("pseudo_label_change_mm")
    if last < 1 or not isinstance(change, (int, float)) or not change < stop_below_mm:
        return None
    return last, float(change)


def settled_note(stage: int, change: float, stop_below_mm: float) -> str:
    """The line saying that a run stopped at ``stage`` because its labels settled."""
    return (f"stage {stage}'s refresh moved the pseudo labels {change:.3f} mm < {stop_below_mm:g} mm "
            f"(--stop-below): the labels have settled; stopping at stage {stage}")


def initial_network_seed(seed: int, stage: int) -> int:
    """Seed of the random initialisation a stage starts from when it has no previous weights
    (both paths): stage 0 (the network of ``pretrain-random``'s labels) and stage 1, which starts
    from another random initialisation than stage 0 (paper Sec. 2.2). ``seed``: the run's seed."""
    return seed * 1000 + min(stage, 1)


def training_generator(seed: int, stage: int) -> torch.Generator:
    """The CPU generator of a stage's training draws (pair sampling, augmentation, point subsets),
    from the run's ``seed``; a resumed stage restores its state from the snapshot."""
    return torch.Generator().manual_seed(seed * 7919 + stage)


SAMPLING_LOGIT_RANGE = 5.0
"""Difficulty-weighted sampling: the sigmoid arguments of the ranked pairs run from +5 (easiest) to -5
(hardest), the paper's setting (Sec. 2.3.1); the default of both paths' ``sampling_logit_range``."""


def difficulty_weights(disagreement: dict[str, float], *, enabled: bool = True,
                       logit_range: float = SAMPLING_LOGIT_RANGE) -> dict[str, float]:
    """Sampling weights of training pairs from their difficulty (paper Sec. 2.3.1).

    Pairs are ranked by ``disagreement`` (network output vs refined pseudo label); the
    easiest gets ``sigmoid(+logit_range)``, the hardest ``sigmoid(-logit_range)``, linearly
    in between. Pairs with the same disagreement share one weight, that of the mean of their
    positions' arguments (average ranks), so the order in which pairs are listed never weighs them:
    when every disagreement is equal (e.g. 0 without refinement, where the pseudo labels are the
    network's own output) the weights are uniform. ``enabled=False`` (or a single pair) gives
    uniform weights. A NaN disagreement (a pair the network cannot register at all) ranks as the hardest,
    NaN pairs tied among themselves.
    """
    def rank(key: str) -> tuple[bool, float]:
        value = disagreement[key]
        return (math.isnan(value), 0.0 if math.isnan(value) else value)

    ids = sorted(disagreement, key=rank)
    if not enabled or len(ids) == 1:
        return {key: 1.0 for key in ids}
    args = torch.linspace(logit_range, -logit_range, len(ids), dtype=torch.float64)
    weights: dict[str, float] = {}
    start = 0
    while start < len(ids):  # runs of equal disagreement (ids is sorted by it; NaN equals NaN here)
        stop = start + 1
        while stop < len(ids) and rank(ids[stop]) == rank(ids[start]):
            stop += 1
        w = torch.sigmoid(args[start:stop].mean()).item()
        weights.update({key: w for key in ids[start:stop]})
        start = stop
    return weights


FEW_PAIRS_NOTE = 3
"""Training sets of at most this many pairs get a note when difficulty-weighted sampling is on: the
ranked sigmoid weights then give the hardest pair almost no draws (2 pairs: 0.7 % of them)."""


def sampling_note(n_pairs: int, *, enabled: bool, logit_range: float) -> str | None:
    """One line for the user when difficulty weighting all but leaves out part of a tiny training set
    (at most :data:`FEW_PAIRS_NOTE` pairs): the hardest pair's share of the draws; else None."""
    if not enabled or not 2 <= n_pairs <= FEW_PAIRS_NOTE:
        return None
    weights = difficulty_weights({str(i): float(i) for i in range(n_pairs)}, logit_range=logit_range)
    share = weights[str(n_pairs - 1)] / sum(weights.values())
    return (f"difficulty-weighted sampling over {n_pairs} training pairs gives the hardest {100 * share:.1f} % of "
            f"the draws (uniform: {100 / n_pairs:.0f} %); --uniform-sampling trains on every pair alike")


def _own_global_rng(method):
    """``method`` run on a fork of torch's global CPU generator: whatever a stage draws from it, or sets it
    to (a resumed stage restores the killed run's state, :meth:`StageSnapshot.restore`), the caller's
    generator is as it was afterwards, as after an uninterrupted run."""
    @functools.wraps(method)
    def forked(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return method(*args, **kwargs)
    return forked


class StageScheduler:
    """Runs stages ``0..stages`` of a :class:`StageTask` in ``run_dir`` (resumable)."""

    def __init__(self, task: StageTask, run_dir: str | Path, *, keep_labels: int | None = None,
                 hook: StageHook | None = None, snapshot_every_s: float = DEFAULT_SNAPSHOT_EVERY_S,
                 training: dict | None = None, run_config: dict | None = None):
        """
        Args:
            task: the modality (``None`` for the read-only :meth:`status`).
            run_dir: directory of this training run (one fold).
            keep_labels: keep only the newest this many ``pseudo{t}.pt`` files (dense pseudo
                labels are large; resuming needs only the newest). ``None`` keeps all.
            hook: optional reporting hook, see :data:`StageHook`.
            snapshot_every_s: minimum time between mid-stage training snapshots [s]
                (:class:`StageSnapshot`); ``<= 0`` writes none.
            training: what every checkpoint records of the data it learnt from (``extra["training"]``,
                :func:`~cyclereg.checkpoint.training_record`: dataset name, fold, a fingerprint of each
                training file; never landmarks or labels), so that evaluation can tell training pairs
                from held-out ones.
            run_config: the run's configuration (``run.json``'s ``config``) that every checkpoint records
                (``extra["run_config"]``), so that a resumed run can tell a ``run.json`` edited since its
                stages were trained (:func:`cyclereg.training.api._require_trained_with`).
        """
        if keep_labels is not None and keep_labels < 1:
            raise ValueError(f"keep_labels: need at least 1, got {keep_labels}")
        self.task = task
        self.dir = Path(run_dir)
        self.keep_labels = keep_labels
        self.hook = hook
        self.snapshot_every_s = snapshot_every_s
        self.training = training
        self.run_config = run_config

    # ------------------------------------------------------------------ files
    def checkpoint_path(self, stage: int) -> Path:
        return self.dir / f"stage{stage}.pt"

    def labels_path(self, stage: int) -> Path:
        return self.dir / f"pseudo{stage}.pt"

    def parts_path(self, stage: int) -> Path:
        return self.dir / f"pseudo{stage}.parts"

    def snapshot_path(self, stage: int) -> Path:
        return self.dir / f"stage{stage}.partial.pt"

    def last_finished_stage(self) -> int:
        """Highest ``t`` whose pseudo labels exist (and, for ``t >= 1``, its checkpoint);
        -1 when not even stage 0 ran."""
        found = [int(p.stem[len("pseudo"):]) for p in self.dir.glob("pseudo*.pt") if p.stem[len("pseudo"):].isdigit()]
        for t in sorted(found, reverse=True):
            if t == 0 or self.checkpoint_path(t).is_file():
                return t
        return -1

    def _trained_checkpoint(self, stage: int) -> dict | None:
        """The checkpoint of ``stage`` if its training finished (its pseudo labels need not
        exist); ``None`` otherwise, or when it predates the stored training statistics."""
        path = self.checkpoint_path(stage)
        if not path.is_file():
            return None
        ckpt = load_checkpoint(path, kind=None if self.task is None else self.task.checkpoint_kind)
        extra = ckpt.get("extra") or {}
        if extra.get("stage") != stage or not isinstance(extra.get("train"), dict):
            return None
        return ckpt

    def _prune_labels(self, newest: int) -> None:
        if self.keep_labels is None:
            return
        for t in range(0, newest - self.keep_labels + 1):
            self.labels_path(t).unlink(missing_ok=True)

    def _save_labels(self, stage: int, labels: dict, weights: dict, record: dict) -> None:
        """The labels that finish ``stage``, with the stage's log ``record`` (see :meth:`_complete_log`)."""
        payload = {"version": __version__, "stage": stage, "labels": {k: v.detach().cpu() for k, v in labels.items()},
                   "weights": weights, "record": record}
        atomic_write_bytes(self.labels_path(stage), lambda fh: torch.save(payload, fh))

    def _stage_log(self) -> dict[int, dict]:
        """Each finished stage's line of ``log.jsonl`` (a stage logged twice: its last line); lines
        that are not a stage record with its seconds (a note someone added) are passed over."""
        return self._read_log()[0]

    def _read_log(self) -> tuple[dict[int, dict], int | None]:
        """:meth:`_stage_log`'s records, and the stage of the log's last non-blank line when that line is
        such a record (``None`` otherwise: no log, or a last line damaged or foreign)."""
        records, last = {}, None
        log = self.dir / "log.jsonl"
        if log.is_file():
            for line in log.read_text(encoding="utf-8", errors="replace").splitlines():  # a damaged line: passed over
                if not line.strip():
                    continue
                last = None
                try:
                    record = json.loads(line)
                    float(record["seconds"])
                    records[int(record["stage"])] = record
                    last = int(record["stage"])
                except (ValueError, KeyError, TypeError):
                    continue  # a foreign line does not stop the report
        return records, last

    def _complete_log(self, progress=None) -> None:
        """Write the log line of the last finished stage if a run was killed after saving the stage's
        labels and before logging it: the record saved with the labels (labels older than that
        copy carry none, and their stages were logged before they counted as finished)."""
        stage = self.last_finished_stage()
        if stage < 0 or stage in self._stage_log():
            return
        payload = self._load_label_file(stage)
        record = payload.get("record") if isinstance(payload, dict) else None
        if record is not None:
            self._finish(record, progress)

    def check_labels(self, stage: int) -> None:
        """:class:`InputError` naming the file when the pseudo labels of ``stage`` cannot be read (e.g. a
        truncated copy), without reading their tensors (memory-mapped: volume labels reach a gigabyte)."""
        self._read_labels(stage, mmap=True)

    @staticmethod
    def _load_weights(model: nn.Module, state_dict: dict, path: Path) -> None:
        """``model.load_state_dict(state_dict)``; :class:`InputError` naming the checkpoint ``path`` when its
        network is not the one the run's configuration builds (run.json edited, or another run's file)."""
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise InputError(f"its network does not match the one the run's configuration (run.json) builds "
                             f"({first.rstrip(':')}); was run.json edited, or is this another run's file?",
                             path) from None

    def load_labels(self, stage: int) -> tuple[dict, dict]:
        """The labels and sampling weights of ``stage``; :class:`InputError` naming the file when they do not
        fit the task's training pairs (:meth:`label_problem`): a damaged or foreign file is named before any
        training, not met as a KeyError mid-stage or trained on as NaN."""
        payload = self._read_labels(stage)
        problem = self.label_problem(payload["labels"])
        if problem:
            raise InputError(f"pseudo labels that do not fit this fold's training pairs ({problem}); delete it to "
                             "make them again", self.labels_path(stage))
        return payload["labels"], payload["weights"]

    def label_problem(self, labels: dict) -> str | None:
        """What is wrong with ``labels`` for the task (``None``: nothing, or a task that states no
        :meth:`label_shapes`): other pair ids, a label of another shape, or values that are not finite."""
        shapes = getattr(self.task, "label_shapes", None)
        expected = shapes() if shapes is not None else None
        if expected is None:
            return None
        if set(labels) != set(expected):
            missing, foreign = sorted(set(expected) - set(labels)), sorted(set(labels) - set(expected))
            return (f"{len(missing)} pair(s) missing, e.g. {missing[0]}" if missing else
                    f"{len(foreign)} unknown pair(s), e.g. {foreign[0]}")
        for pid, shape in expected.items():
            label = labels[pid]
            if not isinstance(label, torch.Tensor) or tuple(label.shape) != tuple(shape):
                got = tuple(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__
                return f"pair {pid}: shape {got}, expected {tuple(shape)}"
            if not bool(torch.isfinite(label).all()):
                return f"pair {pid}: NaN or inf values"
        return None

    def _load_label_file(self, stage: int, mmap: bool = False):
        """Whatever the label file of ``stage`` holds (``torch.load``, tensors memory-mapped with ``mmap``);
        :class:`InputError` naming it when it cannot be read."""
        path = self.labels_path(stage)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"unreadable pseudo labels ({type(exc).__name__}); delete it to make them again",
                             path) from None

    def _read_labels(self, stage: int, mmap: bool = False) -> dict:
        """The label file of ``stage`` as saved (``labels``, ``weights``, ...); :class:`InputError` naming it
        when it is unreadable or not what a stage saves."""
        path = self.labels_path(stage)
        payload = self._load_label_file(stage, mmap)
        if not (isinstance(payload, dict) and isinstance(payload.get("labels"), dict)
                and isinstance(payload.get("weights"), dict)):
            raise InputError("not the pseudo labels of a cyclereg stage (no labels and weights); delete it to make "
                             "them again", path)
        return payload

    def _label_change(self, stage: int, old: dict | None, new: dict) -> float | None:
        """:meth:`StageTask.label_change_mm` from stage ``stage - 1``'s labels (``old``, read
        from the run directory when ``None``) to ``new``; ``None`` where the task has no such
        measure or the older labels are gone."""
        measure = getattr(self.task, "label_change_mm", None)
        if measure is None or not new:
            return None
        if old is None:
            if not self.labels_path(stage - 1).is_file():
                return None
            old, _ = self.load_labels(stage - 1)
        change = measure(old, new)
        return None if change is None else float(change)

    def _ran_on(self, stage: int) -> dict:
        """The task's :meth:`StageTask.ran_on` of ``stage`` (``{}`` where it has none)."""
        ran_on = getattr(self.task, "ran_on", None)
        return ran_on(stage) if ran_on is not None else {}

    def _log(self, record: dict) -> None:
        path = self.dir / "log.jsonl"
        old = path.read_text() if path.exists() else ""
        if old and not old.endswith("\n"):  # a line cut short or added by hand: the record goes on a line of its own
            old += "\n"
        atomic_write_text(path, old + json_text(record) + "\n")

    def _diverged(self, stage: int, what: str) -> ResultError:
        """The one-line error of a stage whose training diverged (nothing of it was written)."""
        lr = getattr(getattr(self.task, "config", None), "lr", None)
        setting = f"lr {lr:g} in run.json" if isinstance(lr, (int, float)) else "the learning rate"
        return ResultError(f"{self.dir}: stage {stage} diverged: {what}; nothing of the stage was kept (the earlier "
                           f"stages' files are as they were): lower {setting} and run the same command again")

    def _publish_final(self, stage: int) -> None:
        """``final.pt`` := the checkpoint of ``stage`` (the last finished one), read and checked first,
        so that a damaged checkpoint is named instead of copied over a good ``final.pt``."""
        src = self.checkpoint_path(stage)
        load_checkpoint(src, kind=self.task.checkpoint_kind)
        data = src.read_bytes()
        atomic_write_bytes(self.dir / "final.pt", lambda fh: fh.write(data))

    def _finish(self, record: dict, progress) -> None:
        """Log a finished stage's ``record`` and announce it on ``progress``'s console."""
        self._log(record)
        if progress is not None:
            progress.console.print(escape(stage_summary(record)), soft_wrap=True)  # one line in a log file too

    def status(self, stages: int, stop_below_mm: float | None = None, kind: str | None = None) -> dict:
        """What this directory holds, read without changing anything (``task`` may be ``None``; ``kind``: the
        checkpoint kind of the run, ``"cloud"`` or ``"dense"``, to name a stage checkpoint of the other kind).

        Returns ``{"finished": t, "next": text, "stage_seconds": {t: s}, "current_stage_s": s,
        "remaining_s": s, "stage_log": {t: record}}``: the last finished stage (-1: none), where the same ``cycle`` command
        would go on (a stage whose training is saved and whose labels are not, or a mid-stage
        snapshot's step), the logged seconds of each finished stage (its training over all runs,
        since 2026-12-03, plus the pseudo-label refresh of its last run; before, only its last
        run), the training seconds the stage in progress has had so far (from its
        snapshot, or from its checkpoint once trained; ``None`` without either), and an estimate of the time left: at the pace of the
        latest finished stage >= 1 (the code and the machine of the stages to come are more like
        its than the first ones'), or before the first one, at the snapshot's training pace or, once
        its training is saved and its labels are being refreshed, at that training's seconds
        (training only, the pseudo-label refreshes not counted); ``None`` when none of these exists or the
        run cannot go on (trimmed to a ``final.pt`` of fewer stages than ``stages``).
        ``stage_log``: each finished stage's line of ``log.jsonl`` (training loss, pseudo-label
        disagreement and, where a run reports them, validation scores; a stage logged twice: its
        last line). ``unlogged_stages``: finished stages without a readable line in ``log.jsonl`` (lines
        damaged or removed: their times and history are missing from the figures). With
        ``stop_below_mm``, a run whose last refresh moved its labels less than that
        (:func:`settled_stage`) is finished, with nothing left to do. A directory trimmed to its ``final.pt``
        (the stage files removed to save space) has finished the stage that ``final.pt`` holds."""
        done = self.last_finished_stage() if self.dir.is_dir() else -1
        records, last_logged = self._read_log()
        settled = self.settled(stop_below_mm)
        seconds = {t: float(record["seconds"]) for t, record in records.items()}
        nxt = done + 1
        current = early_pace = None  # early_pace: a whole stage's training seconds, before any stage >= 1 is logged
        labelled = ""
        if done < stages and settled is None:
            have = LabelParts.count_in(self.parts_path(nxt))
            labelled = f", {have} pair{'' if have == 1 else 's'} labelled" if have else ""
        # killed between a stage's labels (which make it finished) and its log line or final.pt: the same
        # cycle command completes them first; until then evaluate --run would read the stage before
        log_missing = done >= 0 and done not in records and last_logged == (done - 1 if done >= 1 else None)
        final_missing = done >= 1 and not self._final_is(done)  # absent or an earlier stage's
        pending = log_missing or final_missing
        kept = self._kept_final_stage() if done < 0 and not labelled else None
        if kept is not None:  # a finished run trimmed to its final.pt (and log), as carried-runs/abd4 is kept
            done = kept
            text = (f"{'finished' if kept >= stages else 'cannot go on'}: only final.pt (stage {kept}) is kept, "
                    f"the stage files were removed")
        elif done < 0:
            text = f"stage 0 labels (pretrain-random){labelled}"
        elif final_missing and (damage := self._damaged_checkpoint(done, kind)):
            text = (f"stage {done}: its checkpoint {self.checkpoint_path(done).name} is damaged ({damage}); delete "
                    "it and the same cycle command trains the stage again")
        elif pending:
            missing = " and ".join(name for name, gone in (("its log line", log_missing), ("final.pt", final_missing))
                                   if gone)
            # status takes no lock, so it cannot tell a cycle writing them this moment from one that stopped
            it = "them" if log_missing and final_missing else "it"
            text = (f"stage {done}: its labels are saved, {missing} not yet (a cycle command working on the fold "
                    f"writes {it} next; if none is, the same cycle command writes {it})")
        elif done >= stages:
            text = "finished"
        elif settled is not None:
            text = f"finished: labels settled at stage {settled[0]} (moved {settled[1]:.3f} mm < {stop_below_mm:g} mm)"
        elif self.checkpoint_path(nxt).is_file():
            text = f"stage {nxt}: its pseudo labels (trained){labelled}"
            try:  # the training is done: its seconds are in the stage's checkpoint
                trained = self._trained_checkpoint(nxt)
            except InputError:  # reported, not raised: cycle itself names the file
                trained = None
            if trained is not None:  # older checkpoints lack the seconds
                current = trained["extra"]["train"].get("train_seconds")
                if current is not None:
                    early_pace = float(current)  # a whole stage's training
        elif self.snapshot_path(nxt).is_file():
            try:
                snap = torch.load(self.snapshot_path(nxt), map_location="cpu", weights_only=True)
                step, total = int(snap["step"]), int(snap["total_steps"])
                text = f"stage {nxt}: training after step {step}/{total}"
                if snap.get("elapsed_s") is not None:
                    current = float(snap["elapsed_s"])
                    if step > 0:
                        early_pace = current / step * total
            except Exception:  # noqa: BLE001 - reported, not raised: cycle itself names the file
                text = f"stage {nxt}: unreadable training snapshot {self.snapshot_path(nxt).name}"
        else:
            text = f"stage {nxt}: training from step 0"
        paced = [t for t in seconds if 1 <= t <= done]
        per_stage = seconds[max(paced)] if paced else early_pace
        remaining = None
        if settled is not None:
            remaining = 0.0
        elif kept is not None and kept < stages:  # cannot go on: no time is left to estimate
            remaining = None
        elif per_stage is not None:
            remaining = max(0.0, per_stage * max(0, stages - max(done, 0)) - (current or 0.0))
        return {"finished": done, "next": text, "stage_seconds": seconds, "current_stage_s": current,
                "remaining_s": remaining, "stage_log": records,
                "unlogged_stages": [t for t in range(done + 1) if t not in records and not (pending and t == done)]}

    def _damaged_checkpoint(self, stage: int, kind: str | None = None) -> str | None:
        """Why the checkpoint of ``stage`` cannot be read as one of ``kind`` (``None``: it can, or there is
        none): ``status`` names it rather than promising a ``final.pt`` that ``cycle`` cannot copy from it."""
        path = self.checkpoint_path(stage)
        if not path.is_file():
            return None
        try:
            load_checkpoint(path, kind=kind)
        except InputError as exc:
            return exc.message
        return None

    def _kept_final_stage(self) -> int | None:
        """The stage of ``final.pt`` in a directory that holds no stage files (no pseudo labels, stage
        checkpoints or label parts: they were removed to save space); ``None`` otherwise or when unreadable."""
        if not (self.dir / "final.pt").is_file() or any(any(self.dir.glob(p)) for p in ("pseudo*", "stage*.pt")):
            return None
        try:
            stage = torch.load(self.dir / "final.pt", map_location="cpu", weights_only=True)["extra"]["stage"]
        except Exception:  # noqa: BLE001 - reported, not raised: evaluate names an unreadable checkpoint itself
            return None
        return int(stage) if isinstance(stage, int) and stage >= 0 else None

    def _final_is(self, stage: int) -> bool:
        """Whether ``final.pt`` is the checkpoint of ``stage`` (a byte copy, as :meth:`_publish_final` writes it)."""
        final, own = self.dir / "final.pt", self.checkpoint_path(stage)
        return final.is_file() and own.is_file() and filecmp.cmp(final, own, shallow=False)

    def _remove_leftovers(self) -> None:
        """What a killed run left here that nothing reads again: temporary files of interrupted atomic
        writes, and the pseudo-label parts of a stage whose labels were saved before they were cleared
        (a dense run's can take gigabytes). The fold's lock is held, so none is in use."""
        for path in self.dir.glob(".*.tmp"):
            if atomic_leftover(path):
                path.unlink(missing_ok=True)
        for path in self.dir.glob("pseudo*.parts"):
            stage = path.name[len("pseudo"):-len(".parts")]
            if stage.isdigit() and self.labels_path(int(stage)).is_file():
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ stages
    @_own_global_rng
    def run_stage0(self, progress=None) -> None:
        """Pseudo labels from a randomly initialised network (skipped if already present)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        if self.last_finished_stage() >= 0:
            self.check_labels(self.last_finished_stage())
            self._complete_log(progress)
            return
        t0 = time.perf_counter()
        model = self.task.new_model(0)
        parts = LabelParts(self.parts_path(0), model)
        labels, info = self.task.make_pseudo_labels(model, 0, progress, parts=parts)
        seconds = time.perf_counter() - t0
        report = self.hook(0, model) if self.hook is not None else {}
        record = {"stage": 0, "seconds": seconds, **self._ran_on(0), **info["stats"], **report}
        self._save_labels(0, labels, info["weights"], record)
        parts.clear()
        self._finish(record, progress)

    def settled(self, stop_below_mm: float | None) -> tuple[int, float] | None:
        """:func:`settled_stage` of this directory's last finished stage."""
        done = self.last_finished_stage()
        return settled_stage({t: r for t, r in self._stage_log().items() if t <= done}, stop_below_mm)

    @_own_global_rng
    def run(self, stages: int, progress=None, stop_below_mm: float | None = None) -> int:
        """Run (or resume) up to ``stages``; returns the last finished stage. With ``stop_below_mm``
        [mm], stop after the first stage whose refresh moves the pseudo labels less than that on
        average (:func:`settled_stage`; a run stopped so is not resumed by the same call)."""
        if self.last_finished_stage() < 0:
            raise InputError("no stage-0 pseudo labels here: run 'cyclereg pretrain-random' first", self.dir)
        self._remove_leftovers()
        self._complete_log(progress)
        done = self.last_finished_stage()
        self._prune_labels(done)  # killed between a stage's labels and their pruning: the last stage prunes no more
        published = None  # the stage whose checkpoint this call made final.pt
        if done >= 1 and not self._final_is(done):
            # killed between a stage's labels and final.pt: bring final.pt up to date before training on,
            # so that evaluate --run reads the last finished stage while the next one trains
            self._publish_final(done)
            published = done
        if self.settled(stop_below_mm) is not None:
            done = stages  # nothing more to train
        for stage in range(done + 1, stages + 1):
            t0 = time.perf_counter()
            model = self.task.new_model(stage)
            trained = self._trained_checkpoint(stage)
            labels = None
            if trained is not None:  # killed while refreshing the labels: training is done
                self._load_weights(model, trained["state_dict"], self.checkpoint_path(stage))
                train_stats = trained["extra"]["train"]
                self.snapshot_path(stage).unlink(missing_ok=True)  # killed before it was cleared
            else:
                labels, weights = self.load_labels(stage - 1)
                if stage > 1:
                    ckpt = load_checkpoint(self.checkpoint_path(stage - 1), kind=self.task.checkpoint_kind)
                    self._load_weights(model, ckpt["state_dict"], self.checkpoint_path(stage - 1))
                snapshot = StageSnapshot(self.snapshot_path(stage), stage=stage, every_s=self.snapshot_every_s)
                train_stats = self.task.train_stage(model, labels, weights, stage, progress, snapshot=snapshot)
                bad = nonfinite_weights(model.state_dict())
                if bad is not None:  # diverged: nothing of the stage is kept, so that a lower lr can redo it
                    snapshot.clear()
                    raise self._diverged(stage, f"its trained weights hold NaN or inf ({bad})")
                # over all runs of the stage: a resumed one adds the snapshot's training seconds
                train_stats = {**train_stats, "train_seconds": snapshot.resumed_s + time.perf_counter() - t0}
                save_checkpoint(self.checkpoint_path(stage), kind=self.task.checkpoint_kind,
                                config=self.task.model_config(), state_dict=model.state_dict(),
                                extra={"stage": stage, "train": train_stats,
                                       **({"training": self.training} if self.training is not None else {}),
                                       **({"run_config": self.run_config} if self.run_config is not None else {})})
                snapshot.clear()
            parts = LabelParts(self.parts_path(stage), model)
            t_labels = time.perf_counter()
            new_labels, info = self.task.make_pseudo_labels(model, stage, progress, parts=parts)
            broken = next((k for k, v in new_labels.items() if not bool(torch.isfinite(v).all())), None)
            if broken is not None:  # finite weights, yet labels that no later stage may train on
                parts.clear()
                self.checkpoint_path(stage).unlink(missing_ok=True)
                raise self._diverged(stage, f"its refreshed pseudo labels hold NaN or inf (pair {broken})")
            now = time.perf_counter()
            # training (all runs; this run's when older checkpoints lack it) + this run's refresh
            seconds = train_stats.get("train_seconds", t_labels - t0) + now - t_labels
            report = self.hook(stage, model) if self.hook is not None else {}
            change = self._label_change(stage, labels, new_labels)
            record = {"stage": stage, "seconds": seconds, "seconds_this_run": now - t0, **self._ran_on(stage), **train_stats,
                      **info["stats"], **({"pseudo_label_change_mm": change} if change is not None else {}),
                      **report}
            self._save_labels(stage, new_labels, info["weights"], record)
            parts.clear()
            self._finish(record, progress)
            self._publish_final(stage)  # at every stage: a run stopped in the next one keeps it current
            published = stage
            self._prune_labels(stage)
            settled = settled_stage({stage: record}, stop_below_mm)
            if settled is not None:
                if progress is not None:
                    progress.console.print(escape(settled_note(*settled, stop_below_mm)), soft_wrap=True)
                break
        final = self.last_finished_stage()
        if final >= 1 and final != published:  # no stage ran here (e.g. a run stopped before this was done per stage)
            self._publish_final(final)
        return final
