"""``cyclereg`` command line. Each command parses options and makes one library call.

Errors from bad input (:class:`cyclereg.errors.InputError`) are printed as one line on
stderr and exit with code 2; nothing is written in that case. ``kill`` (SIGTERM) stops a command
like Ctrl-C does (exit 143): no half-written file is left, and training resumes from its last
snapshot when the same command runs again.
"""

from __future__ import annotations

import functools
import re
import signal
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from cyclereg.api import require_inputs, require_run_dir
from cyclereg.console import point_at_null, tolerate_unencodable
from cyclereg.errors import InputError, ResultError, WorkerError
from cyclereg.interrupts import exit_on_sigterm, raise_pending


UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
"""click's usage error (typer >= 0.22 carries its own copy of click, older versions use click's)."""


def _usage_error(exc: Exception, ctx=None) -> NoReturn:
    """A usage error (an option value of the wrong type, an unknown option or command, a missing argument)
    as one line on stderr, exit 2, like every other error; click's framed box with the usage took six.
    A command given without arguments (click's ``NoArgsIsHelpError``) prints its help on stdout, exit 2.
    ``ctx``: the command's context, for an error click raised without one (an option given without its
    value), so that the line points at that command's help."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help, on stdout (click would print it on stderr)
        typer.echo(exc.ctx.get_help())
        raise typer.Exit(2)
    ctx = getattr(exc, "ctx", None) or ctx
    path = ctx.command_path if ctx is not None else "cyclereg"
    typer.echo(f"cyclereg: error: {exc.format_message()} (see '{path} --help')", err=True)
    raise typer.Exit(2)


class _Command(TyperCommand):
    """Every command: an empty value (``-o ""``, ``--json=``, an empty argument; typically an unset
    shell variable) is a usage error naming the option, before any work. Otherwise it would become
    the path ``.``: ``register -o "$OUT"`` with ``OUT`` unset would write into the current folder.
    Usage errors are one line (:func:`_usage_error`)."""

    def parse_args(self, ctx, args):
        try:
            values, _, _ = self.make_parser(ctx).parse_args(args=list(args))  # the raw strings, per parameter
            for param in self.params:
                given = values.get(param.name)
                if "" in (given if isinstance(given, (list, tuple)) else [given]):
                    raise typer.BadParameter("an empty value (an unset shell variable?); write '.' to mean the "
                                             "current folder", ctx=ctx, param=param)
            return super().parse_args(ctx, args)
        except UsageError as exc:
            _usage_error(exc, ctx)


class _Group(TyperGroup):
    """The ``cyclereg`` group: an unknown command or group option is one line too (:func:`_usage_error`)."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except UsageError as exc:
            _usage_error(exc, ctx)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except UsageError as exc:
            _usage_error(exc, ctx)


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: it wraps where rich's panels cut option names ("--weighted-sampli…" at 80 columns)
)
command = functools.partial(app.command, cls=_Command)
"""``@command()``: ``app.command()`` with the empty-value check of :class:`_Command`."""


def _versions() -> str:
    """``cyclereg X (torch Y, torch-geometric Z, Python W)``, read from package metadata so that
    ``--version`` does not import torch."""
    import platform
    from importlib import metadata

    from cyclereg import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"cyclereg {__version__} (torch {installed('torch')}, torch-geometric {installed('torch-geometric')}, "
            f"Python {platform.python_version()})")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(_versions())
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the versions of cyclereg, torch, torch-geometric and Python, and exit."),
) -> None:
    """Unsupervised 3D registration by optimisation-guided cyclical self-training."""
    exit_on_sigterm()  # `kill` leaves like Ctrl-C: no half-written file, workers stopped
    tolerate_unencodable()  # an ASCII locale prints a non-ASCII path escaped, not a UnicodeEncodeError


def _say(text: str) -> None:
    """Print a command's closing line on stdout. Its work is done by then: when the reader of stdout is gone
    (``cyclereg register ... | head -0``), the line is dropped and the command still succeeds (it was an
    error, exit 2, as if the input had been bad, after every output had been written)."""
    try:
        typer.echo(text)
    except BrokenPipeError:
        point_at_null(sys.stdout)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"cyclereg: error: {message}", err=True)
    raise typer.Exit(code)


INTERRUPT_SAID: list[str] = []
"""The interruption lines a command printed (:func:`cyclereg_cli.entry.main` prints one where none was)."""


def _say_interrupted(line: str) -> None:
    typer.echo(line, err=True)
    INTERRUPT_SAID.append(line)


def _caused_by_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` was raised from (or while handling) a KeyboardInterrupt, anywhere down its chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


OUT_OF_MEMORY_MARKS = ("can't allocate memory", "out of memory")
"""Texts of torch's allocation failures (its CPU allocator raises a RuntimeError, not a MemoryError)."""


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed: a :class:`MemoryError`, or torch's RuntimeError
    (``torch.OutOfMemoryError`` on CUDA)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and
                                            any(mark in str(exc) for mark in OUT_OF_MEMORY_MARKS))


def out_of_memory_line(exc: BaseException) -> str:
    """One line for an allocation that failed: how much was asked for where torch says it, and what to do."""
    asked = re.search(r"allocate (\d+) bytes", str(exc))
    size = f" (an allocation of {int(asked.group(1)) / 1e9:.1f} GB failed)" if asked else ""
    return (f"out of memory{size}: the inputs are too large for this machine's memory "
            "(use smaller inputs: fewer points, e.g. keypoints --max-points, or a cropped or coarser volume)")


def cli_errors(fn):
    """Turn :class:`InputError` and operating-system errors (unwritable outputs) into a one-line
    error, exit 2; a worker process that died (:class:`WorkerError`), a non-finite result
    (:class:`ResultError`) or an allocation that failed (:func:`out_of_memory`) into one line, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            raise_pending()  # a kill whose re-sends all landed in imports: kept, not lost to a quick finish
            return result
        except InputError as exc:
            _fail(str(exc))
        except OSError as exc:  # an output that cannot be written (a file where a folder must go, disk full, ...)
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}")
        except (WorkerError, ResultError) as exc:
            _fail(str(exc), code=1)
        except KeyboardInterrupt:
            _say_interrupted(f"cyclereg: interrupted{resume_hint(kwargs)}")
            raise typer.Exit(130) from None
        except SystemExit as exc:
            if exc.code == 128 + signal.SIGTERM:  # kill: cyclereg.interrupts.sigterm_exit
                _say_interrupted(f"cyclereg: terminated{resume_hint(kwargs)}")
            raise
        except Exception as exc:  # noqa: BLE001 - only one an interrupt caused, or torch's out of memory, is taken here
            if not _caused_by_interrupt(exc):
                if out_of_memory(exc):
                    _fail(out_of_memory_line(exc), code=1)
                raise
            # e.g. a C extension whose initialisation Ctrl-C cut short: 'ImportError: initialization failed'
            _say_interrupted(f"cyclereg: interrupted{resume_hint(kwargs)}")
            raise typer.Exit(130) from None

    def resume_hint(kwargs: dict) -> str:
        """What the interruption line adds: that the same command resumes, unless it is a cycle whose folds had
        all finished (nothing is left for it to do)."""
        if fn.__name__ not in RESUMABLE_COMMANDS:
            return ""
        training = sys.modules.get("cyclereg.training.api")  # not imported yet: not worth seconds of an exit
        if fn.__name__ == "cycle" and kwargs.get("run") is not None and training is not None:
            try:
                if training.nothing_left_to_train(kwargs["run"], kwargs.get("stages"), kwargs.get("folds", "all")):
                    return "; every stage it was to train had finished: nothing is left to do"
            except (Exception, KeyboardInterrupt):  # noqa: BLE001 - a second Ctrl-C while reading: the usual line
                pass
        return "; run the same command again to resume where it stopped"

    return wrapper


RESUMABLE_COMMANDS = ("pretrain_random", "cycle")
"""Commands whose interrupted work the same command continues (their interruption message says so)."""


DEVICE_HELP = "auto | cpu | cuda"
MODEL_HELP = "checkpoint file, or 'random' for an untrained (randomly initialised) network"
FUSION_HELP = ("how the members of an ensemble model are combined, overriding its setting: joint (one LBP per "
               "pass over their mean feature cost) or average (mean of their own displacements)")


@command()
@cli_errors
def keypoints(
    ct: Optional[Path] = typer.Argument(None, help="CT volume (NIfTI); or give --pairs instead"),
    output: Path = typer.Option(..., "-o", "--output", help="output point file (with --pairs: output directory)"),
    mask: Optional[Path] = typer.Option(None, "--mask", help="restrict keypoints to this mask (NIfTI)"),
    lung_mask: bool = typer.Option(False, "--lung-mask", help="compute an automatic lung mask and restrict keypoints to it"),
    save_mask: Optional[Path] = typer.Option(None, "--save-mask", help="write the automatic lung mask here (NIfTI)"),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="Gaussian scale of the structure tensor, mm (default 1.5)"),
    nms_radius: Optional[float] = typer.Option(None, "--nms-radius", help="non-maximum suppression half-width, mm (default 4; with --pairs: of the fixed scans)"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="keep maxima with distinctiveness >= T x its 99.9th percentile in the mask (default 0.01)"),
    max_points: Optional[int] = typer.Option(None, "--max-points", help="keep at most this many strongest points (default 3000; 0: no limit)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="csv (world mm) | l2r (headerless voxel-index CSV) | ply | pcd | npy (default: from the suffix of -o: .csv/.txt, .npy, .ply, .pcd)"),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="CSV with columns id,fixed,moving[,fixed_landmarks,moving_landmarks] (paths relative to it): keypoints of every scan and a dataset.json in --output, ready for pretrain-random/cycle/evaluate"),
    moving_nms_radius: Optional[float] = typer.Option(None, "--moving-nms-radius", help="with --pairs: NMS half-width of the moving scans, mm (default 3: a denser moving cloud, 1.3x the fixed points on the shipped chest CT; the paper's moving clouds have about 2x)"),
    folds: Optional[int] = typer.Option(None, "--folds", help="with --pairs: split the pairs into this many cross-validation folds (consecutive rows)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Foerstner keypoints (with non-maximum suppression) from a CT volume.

    Writes OUTPUT and the resolved configuration OUTPUT.config.json. With --pairs: the keypoints of
    every listed scan pair and a keypoint dataset (OUTPUT/dataset.json) over them.
    """
    from cyclereg.api import keypoints as run_keypoints

    summary = run_keypoints(ct, output, pairs=pairs, mask=mask, lung_mask=lung_mask, save_mask=save_mask,
                            sigma_mm=sigma, nms_radius_mm=nms_radius, moving_nms_radius_mm=moving_nms_radius,
                            threshold=threshold, max_points=max_points, fmt=fmt, folds=folds, device=device)
    if summary is not None:
        _say(summary)


@command("pretrain-random")
@cli_errors
def pretrain_random(
    dataset: Path = typer.Argument(..., help="dataset JSON (keypoint dataset.json or Learn2Reg *_dataset.json)"),
    run: Path = typer.Option(..., "-o", "--output", "--run", help="run directory to create"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the networks, sampling and augmentation (default 0; into an existing run: the run's)"),
    fold: Optional[str] = typer.Option(None, "--fold", "--folds", help="keypoints: 'all' (default) or one fold number; into an existing run, options not given take the run's values"),
    stages: Optional[int] = typer.Option(None, "--stages", help="default number of stages T for 'cycle' (default = paper: 5 for keypoints, 8 for volumes)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="keypoints: epochs per stage (default = paper: 60; the LR milestones scale along)"),
    train_points: Optional[str] = typer.Option(None, "--train-points", help="keypoints: 'F,M' random fixed/moving subsets per training sample"),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="volumes: optimiser steps per stage (default = paper: 1000)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="volumes: pairs per step (default = paper: 2)"),
    supervision: Optional[str] = typer.Option(None, "--supervision", help="volumes: pseudo (self-training, default) | mind | ncc (metric-supervised baselines)"),
    train_images: Optional[str] = typer.Option(None, "--train-images", help="volumes: held-out (default: images in no registration_val pair) | all"),
    directions: Optional[str] = typer.Option(None, "--directions", help="volumes: one (pairs i<j, default) | both"),
    max_train_pairs: Optional[int] = typer.Option(None, "--max-train-pairs", help="volumes: use only N training pairs, spread over the images (each in about 2N/images of them)"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="input augmentation of the learning stream (default on)"),
    refine: Optional[bool] = typer.Option(None, "--refine/--no-refine", help="pseudo-label refinement (default on)"),
    weighted: Optional[bool] = typer.Option(None, "--weighted-sampling/--uniform-sampling", help="difficulty-weighted pair sampling (default on)"),
    cpu_bf16: Optional[bool] = typer.Option(None, "--cpu-bf16/--no-cpu-bf16", help="volumes: train in bfloat16 autocast on CPU (1.8x faster steps and the same Dice at 4 mm on a Xeon with AMX; slow on CPUs without bfloat16 units; default off = float32; CUDA uses float16 AMP either way)"),
    recentre_passes: Optional[int] = typer.Option(None, "--recentre-passes", help="keypoints: re-centred LBP passes of the pseudo-label stream and of the trained model at test time (default 1; 0 = single pass)"),
    tta_passes: Optional[int] = typer.Option(None, "--tta-passes", help="keypoints: extra registrations of randomly rotated/scaled/shifted copies, averaged, in the pseudo-label stream and at test time (default 4; 0 = off)"),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="keypoints: LBP candidates per fixed point, K (default 64; the authors' GPU code: 256; cost grows as K^2)"),
    learn_recentre_passes: Optional[int] = typer.Option(None, "--learn-recentre-passes", help="keypoints: gradient-free LBP passes that re-centre the learning stream's candidate search, as at test time (default 0 = the paper's single pass; 1 costs ~1.6x per training sample)"),
    aug_relative: Optional[float] = typer.Option(None, "--aug-relative", help="keypoints: a further random affine map of the moving cloud alone in the learning stream, y -> (I + s N) y + s n (entries of N and n standard normal, n in the unit frame; default 0.05, the authors' dense value; 0 = off: both clouds share one similarity transform, as runs before 2026-12-06)"),
    val_pairs: int = typer.Option(0, "--val-pairs", help="reporting only: log the TRE of the fold's first N held-out pairs (keypoints) or the Dice of the first N registration_val pairs (volumes; they need label maps) after each stage"),
    jobs: int = typer.Option(1, "--jobs", help="keypoint datasets: label this many folds at once in worker processes (they share the CPU threads; the labels of --jobs 1 when every process gets the same thread count, e.g. OMP_NUM_THREADS=1)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Stage-0 pseudo labels from a randomly initialised feature network (creates RUN_DIR)."""
    require_inputs(dataset)
    from cyclereg.training.api import pretrain_random_summary

    _say(pretrain_random_summary(
        dataset, run, seed=seed, fold=fold, device=device, val_pairs=val_pairs, jobs=jobs, stages=stages,
        epochs=epochs, train_points=train_points, iterations=iterations, batch_size=batch_size,
        supervision=supervision, train_images=train_images, directions=directions,
        max_train_pairs=max_train_pairs, augment=augment, refine=refine, weighted_sampling=weighted,
        recentre_passes=recentre_passes, candidates=candidates, tta_passes=tta_passes,
        learn_recentre_passes=learn_recentre_passes, aug_relative=aug_relative, cpu_bf16=cpu_bf16))


@command()
@cli_errors
def cycle(
    dataset: Path = typer.Argument(..., help="dataset JSON"),
    run: Path = typer.Option(..., "--run", help="run directory made by pretrain-random"),
    stages: Optional[int] = typer.Option(None, "--stages", help="number of self-training stages T (default: the run's; more than the run's extends it, and the new T is recorded in run.json)"),
    folds: str = typer.Option("all", "--folds", "--fold", help="'all' or a fold number (keypoint datasets)"),
    val_pairs: int = typer.Option(0, "--val-pairs", help="reporting only: log the TRE of the fold's first N held-out pairs (keypoints) or the Dice of the first N registration_val pairs (volumes; they need label maps) after each stage"),
    snapshot_every: Optional[float] = typer.Option(None, "--snapshot-every", help="seconds between mid-stage training snapshots, so that a killed stage resumes where it stopped (0 = none; default 60)"),
    jobs: int = typer.Option(1, "--jobs", help="keypoint datasets: train this many folds at once in worker processes (they share the CPU threads; the results of --jobs 1 when every process gets the same thread count, e.g. OMP_NUM_THREADS=1)"),
    stop_below: Optional[float] = typer.Option(None, "--stop-below", metavar="MM", help="landmark-free early stop: a fold ends at the first stage whose refresh moves its pseudo labels less than MM mm on average ('labels moved'; --stages is then the most); recorded in run.json, 0 removes it"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Cyclical self-training: train on pseudo labels, refresh them, repeat (resumable)."""
    require_inputs(dataset)
    require_run_dir(run)
    from cyclereg.training.api import run_cycle

    done = run_cycle(dataset, run, stages=stages, folds=folds, device=device, val_pairs=val_pairs,
                     snapshot_every_s=snapshot_every, jobs=jobs, stop_below_mm=stop_below)
    _say("finished stages: " + ", ".join(("all" if k is None else f"fold {k}") + f": {t}" for k, t in done.items()))


@command()
@cli_errors
def status(
    run: Path = typer.Argument(..., help="run directory made by pretrain-random"),
    stages: Optional[int] = typer.Option(None, "--stages", help="count progress towards T stages (default: the run's)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the status as JSON here"),
    history: bool = typer.Option(False, "--history", help="also list every finished stage: time, training loss, "
                                 "pseudo-label disagreement, how far its refresh moved the labels (both "
                                 "landmark-free) and any validation score the run logged"),
) -> None:
    """Progress of a training run (read only; also while cycle runs): stages per fold, what comes next, time."""
    require_run_dir(run)
    from cyclereg.training.status import show_run_status

    show_run_status(run, stages=stages, history=history, json_out=json_out)


@command()
@cli_errors
def register(
    fixed: Path = typer.Argument(..., help="fixed point cloud (csv/npy/ply/pcd) or volume (NIfTI)"),
    moving: Path = typer.Argument(..., help="moving point cloud or volume"),
    out_dir: Path = typer.Option(..., "-o", "--output", help="output directory"),
    model: str = typer.Option("random", "--model", help=MODEL_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the random network (with --model random; default 0)"),
    query: Optional[Path] = typer.Option(None, "--query", help="clouds (and --via-keypoints): also write displacements at these points (a point file as the clouds: mm; a headerless CSV holds voxel indices, placed as --spacing / --reference say, with --via-keypoints on the fixed scan's grid)"),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="clouds: voxel spacing 'sx,sy,sz' in mm for headerless Learn2Reg CSVs (not with --reference: then they are read on the reference's grid)"),
    recentre_passes: Optional[int] = typer.Option(None, "--recentre-passes", help="clouds: override the model's re-centred LBP passes (0 = single pass)"),
    tta_passes: Optional[int] = typer.Option(None, "--tta-passes", help="clouds: override the model's test-time augmentation passes (0 = off)"),
    ensemble_fusion: Optional[str] = typer.Option(None, "--ensemble-fusion", help="clouds: " + FUSION_HELP),
    reference: Optional[Path] = typer.Option(None, "--reference", help="clouds: fixed scan (NIfTI, same world frame as the points); also write displacement.nii.gz on its grid"),
    moving_image: Optional[Path] = typer.Option(None, "--moving-image", help="clouds: moving scan (NIfTI, any grid); also write warped.nii.gz on the --reference grid"),
    moving_labels: Optional[Path] = typer.Option(None, "--moving-labels", help="volumes, clouds with --reference: label map of the moving scan to warp (nearest neighbour)"),
    warps: Optional[int] = typer.Option(None, "--warps", help="volumes: 1 or 2 warps (default: the model's setting; 2 for a random network)"),
    adam: Optional[bool] = typer.Option(None, "--adam/--no-adam", help="volumes: Adam instance optimisation (default: the model's setting; on for a random network)"),
    ic: Optional[bool] = typer.Option(None, "--ic/--no-ic", help="volumes: inverse consistency (default: the model's setting; on for a random network)"),
    disp_mm: bool = typer.Option(False, "--disp-mm", help="volumes, clouds with --reference: write the displacement in world mm instead of voxels"),
    spread: bool = typer.Option(False, "--spread", help="clouds, volumes with --via-keypoints, an ensemble model: also register with each member on its own (about 2x the time) and write spread_mm, how far the members' displacements lie apart (mm), next to every displacement"),
    spread_map: bool = typer.Option(False, "--spread-map", help="clouds with --reference and an ensemble model: also write spread.nii.gz, the members' disagreement (mm) on that grid (implies --spread)"),
    l2r_name: bool = typer.Option(False, "--l2r-name", help="volumes: also write disp_FFFF_MMMM.nii.gz (Learn2Reg's name and unit: voxels, also with --disp-mm)"),
    jacobian: bool = typer.Option(False, "--jacobian", help="volumes, clouds with --reference: also write jacobian.nii.gz, the Jacobian determinant of x -> x + u(x) on the fixed grid (> 1: locally larger in the moving scan; <= 0: folding)"),
    resample_moving: bool = typer.Option(False, "--resample-moving", help="volumes: a moving scan (and --moving-labels) on another grid is first resampled onto the fixed grid through world mm"),
    via_keypoints: bool = typer.Option(False, "--via-keypoints", help="volumes: register through the keypoint-cloud path (Foerstner keypoints of both scans, a cloud model); writes the keypoints, the dense field on the fixed grid and the warped moving scan"),
    lung_mask: bool = typer.Option(False, "--lung-mask", help="volumes with --via-keypoints: keypoints only inside automatic lung masks (chest CT in HU)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Register one fixed/moving pair with a trained (or random) model."""
    from cyclereg.api import register as run_register

    _say(run_register(
        fixed, moving, out_dir, model=model, seed=seed, device=device, query=query, spacing=spacing,
        reference=reference, moving_image=moving_image, moving_labels=moving_labels,
        recentre_passes=recentre_passes, tta_passes=tta_passes, ensemble_fusion=ensemble_fusion, warps=warps,
        adam=adam, ic=ic, disp_mm=disp_mm, spread=spread, spread_map=spread_map, l2r_name=l2r_name,
        jacobian=jacobian, resample_moving=resample_moving, via_keypoints=via_keypoints, lung_mask=lung_mask).summary)


@command()
@cli_errors
def evaluate(
    dataset: Path = typer.Argument(..., help="dataset JSON (keypoint dataset.json or Learn2Reg *_dataset.json)"),
    report: Path = typer.Option(..., "--json", help="write the report here"),
    identity: bool = typer.Option(False, "--identity", help="evaluate the identity (no registration)"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    run: Optional[Path] = typer.Option(None, "--run", help="run directory: each case with the checkpoint of the fold that held it out"),
    stage: Optional[int] = typer.Option(None, "--stage", help="with --run: use this stage's checkpoints instead of the final ones"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the random network (with --model random; default 0)"),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", help="evaluate only the first N pairs (volumes with --both-directions: the first N registrations, each pair's reverse right after it, so 2N covers N pairs both ways)"),
    folds: Optional[str] = typer.Option(None, "--folds", "--fold", help="keypoint datasets: 'all' (default) or one fold number: only the pairs of that fold (e.g. a run with that fold trained)"),
    recentre_passes: Optional[int] = typer.Option(None, "--recentre-passes", help="keypoint datasets: override the model's re-centred LBP passes (0 = single pass)"),
    tta_passes: Optional[int] = typer.Option(None, "--tta-passes", help="keypoint datasets: override the model's test-time augmentation passes (0 = off)"),
    ensemble_fusion: Optional[str] = typer.Option(None, "--ensemble-fusion", help="keypoint datasets: " + FUSION_HELP),
    errors_csv: Optional[Path] = typer.Option(None, "--errors-csv", help="keypoint datasets: also write every landmark's error before/after (mm) to this CSV"),
    spread: bool = typer.Option(False, "--spread", help="keypoint datasets, ensemble models: also register every pair with each member on its own (about 2x the time) and report how far the members' displacements lie apart (mm) and how that ranks the errors"),
    warps: Optional[int] = typer.Option(None, "--warps", help="volumes: 1 or 2 warps (default: the model's setting; 2 for a random network)"),
    adam: Optional[bool] = typer.Option(None, "--adam/--no-adam", help="volumes: Adam instance optimisation (default: the model's setting; on for a random network)"),
    ic: Optional[bool] = typer.Option(None, "--ic/--no-ic", help="volumes: inverse consistency (default: the model's setting; on for a random network)"),
    both_directions: bool = typer.Option(False, "--both-directions", help="volumes: also evaluate every registration_val pair in the reverse direction (pairs listed both ways are not duplicated)"),
    resume: bool = typer.Option(False, "--resume", help="volumes: keep the pairs finished by an interrupted run (REPORT.partial.json beside --json, else the report at --json) and register only the rest"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """TRE (keypoint datasets) or Dice/HD95 (labelled volume datasets), with SDlogJ and run time."""
    from cyclereg.api import evaluate as run_evaluate

    run_evaluate(dataset, report, identity=identity, model=model, run=run, stage=stage, seed=seed,
                 max_pairs=max_pairs, device=device, recentre_passes=recentre_passes, tta_passes=tta_passes,
                 ensemble_fusion=ensemble_fusion, errors_csv=errors_csv, spread=spread, warps=warps, adam=adam,
                 ic=ic, both_directions=both_directions, resume=resume, folds=folds)


@command()
@cli_errors
def compare(
    reports: list[Path] = typer.Argument(..., help="two or more evaluate reports (JSON) of the same kind; each after the first is compared with the first"),
    metric: Optional[str] = typer.Option(None, "--metric", help="tre (keypoint reports, the default there), dice (volume reports, the default there), hd95 or sdlogj"),
    label: Optional[str] = typer.Option(None, "--label", help="volume reports: one label's Dice or HD95, by number or name (e.g. liver)"),
    output: Optional[Path] = typer.Option(None, "--json", help="also write the comparison (statistics and per-pair values) here"),
) -> None:
    """Paired comparison of evaluate reports: per-pair differences, better/worse counts, CI and tests."""
    from cyclereg.compare import compare_reports

    compare_reports(reports, output, metric=metric, label=label)


@command()
@cli_errors
def ensemble(
    sources: list[Path] = typer.Argument(..., help="run directories with the same folds (foldK.pt or foldK/final.pt), or cloud checkpoint files"),
    output: Path = typer.Option(..., "-o", "--output", help="output run directory (for run directories) or checkpoint file"),
    recentre_passes: Optional[int] = typer.Option(None, "--recentre-passes", help="re-centred LBP passes of every member (needed when the members differ)"),
    tta_passes: Optional[int] = typer.Option(None, "--tta-passes", help="test-time augmentation passes of every member (needed when the members differ)"),
    fusion: str = typer.Option("joint", "--fusion", help="how the members are combined: joint = one LBP per pass over their mean feature cost (they vote per candidate); average = each registers on its own, displacements averaged"),
) -> None:
    """Combine independently trained keypoint-cloud models into one ensemble per fold."""
    require_inputs(*sources, folders=True)  # before torch is imported (seconds): a missing source fails at once
    from cyclereg.clouds.api import combine_cloud_models

    _say(combine_cloud_models(sources, output, recentre_passes=recentre_passes, tta_passes=tta_passes,
                                    fusion=fusion))


@command()
@cli_errors
def demo(
    out_dir: Optional[Path] = typer.Option(None, "-o", "--output", help="also write clouds, displacements and report here"),
    seed: int = typer.Option(0, "--seed", help="seed of the synthetic pair and of the random network"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Embedded default job: register synthetic lung keypoint clouds with known motion."""
    from cyclereg.clouds.api import run_demo

    run_demo(out_dir, seed=seed, device=device)


if __name__ == "__main__":  # pragma: no cover - the console script is cyclereg_cli.entry:main
    from cyclereg_cli.entry import main

    main()
