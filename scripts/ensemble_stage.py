"""One more self-training stage for every member of a cloud ensemble, on the ensemble's pseudo labels.

``python scripts/ensemble_stage.py ENSEMBLE_DIR OUT_DIR [--dataset D] [--jobs N] [--folds 1,2] [--learner RUN_DIR]
[--members 0,2] [--learn-recentre-passes N] [--joint I]``

``ENSEMBLE_DIR`` is a per-fold ensemble made by ``cyclereg ensemble`` (``foldK.pt`` plus
``ensemble.json``, whose ``training`` entry holds every member run's ``run.json``). For each
fold and member: the pseudo labels of the fold's training pairs are the ensemble's registration
(its stored settings), smoothed by the TPS of the member's pseudo-label stream; the sampling
weights come from the disagreement between the member's own learning-stream output and those
labels; the member then trains one stage of its own configuration from its current weights
(warm restart). Landmarks are never read. Writes ``OUT_DIR/<member run name>/foldK.pt``
(stage ``last + 1``), ``foldK.log.json`` and the member's ``run.json``; finished (fold, member)
jobs are skipped when the command is run again, so it resumes. Each written checkpoint records
its training data like those of ``cyclereg cycle`` (:func:`~cyclereg.checkpoint.training_record`):
the fold's training pairs of ``--dataset`` together with whatever the network's previous checkpoint
records (a previous checkpoint without a record adds nothing it could name).

``--learner RUN_DIR`` trains that run's per-fold checkpoints instead (a network that is not a
member, e.g. an independently trained run to be added to the ensemble), with the same labels
and its own training configuration (``RUN_DIR/run.json``). ``--members`` trains only the members
with those 0-based indices; ``--learn-recentre-passes N`` sets
``CloudCycleConfig.learn_recentre_passes`` for the trained networks (and their written ``run.json``).

``--joint I`` trains all members of a fold together, as one job: the learning stream registers
every sample the way the ensemble registers with ``ensemble_fusion = "joint"`` (one LBP per pass
over the members' mean feature cost) and the loss reaches every member through it. The training
configuration (augmentation, training subsets, schedule, seed) is member ``I``'s; each member is
written to ``OUT_DIR/<member run name>/foldK.pt`` as in the default mode, so ``cyclereg ensemble``
assembles the result the same way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NoReturn

import torch
from rich.progress import Progress, TimeElapsedColumn

from cyclereg.datasets import read_json
from cyclereg.errors import InputError, refuse_empty_paths
from cyclereg.training.parallel import run_parallel

DEFAULT_DATASET = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "copd-keypoints" / "dataset.json"


def _member_run(source: dict) -> str:
    """The run directory of one member entry of ``ensemble.json``."""
    return source.get("run", str(Path(source["source"]).parent))


def _member_without_training(info: dict, folds: list[int], members: list[int] | None) -> tuple[int, str] | None:
    """``(index, run folder)`` of the first member of ``folds`` (only ``members``, if given) whose training
    configuration ``ensemble.json`` does not keep (``training[run]``, a run's ``run.json`` with its ``config``):
    a member from a model set (``scripts/run_model_set.py``, ``models/copd``), whose record is kept under its
    source run's name, or an ensemble written without ``training``; ``None`` when every one has it."""
    training = info.get("training")
    for k in folds:
        for i, source in enumerate(info["members"][f"fold{k}"]):
            if members is not None and i not in members:
                continue
            run = _member_run(source)
            meta = training.get(run) if isinstance(training, dict) else None
            if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
                return i, run
    return None


def _training(training: dict, learn_recentre_passes: int | None):
    """A run's ``run.json`` content and its :class:`~cyclereg.training.clouds.CloudCycleConfig`,
    both with ``learn_recentre_passes`` set if it is given."""
    from dataclasses import replace

    from cyclereg.checkpoint import to_jsonable
    from cyclereg.training.clouds import CloudCycleConfig

    config = CloudCycleConfig.from_dict(training["config"])
    if learn_recentre_passes is None:
        return training, config
    config = replace(config, learn_recentre_passes=learn_recentre_passes)
    return {**training, "config": to_jsonable(config)}, config


def _stage_record(ds, fold: int, previous: list[dict]) -> dict:
    """The training record of a network after this stage: the keypoint files of fold ``fold``'s
    training pairs of ``ds`` together with the records of its ``previous`` checkpoints (entries
    ``{"source": path[, "sha256": digest]}`` as ``ensemble.json`` lists members; one whose file is
    gone, has changed since or keeps no record adds nothing)."""
    from cyclereg.checkpoint import file_sha256, load_checkpoint, training_data
    from cyclereg.clouds.api import _union_training
    from cyclereg.training.api import _cloud_training_record

    earlier = []
    for entry in previous:
        path = Path(entry["source"])
        if path.is_file() and entry.get("sha256") in (None, file_sha256(path)):
            earlier.append(training_data(load_checkpoint(path)))
    return _union_training([r for r in earlier if r is not None] + [_cloud_training_record(ds, fold)], fold)


def run_job(ensemble_dir: Path, out_dir: Path, dataset: Path, fold: int, member_index: int | None,
            learner: Path | None = None, learn_recentre_passes: int | None = None, *, progress) -> str:
    """One (fold, member) job in a worker process (one intra-op thread); returns its log line.
    With ``learner`` (a run directory), that run's fold checkpoint trains instead of a member.
    ``learn_recentre_passes`` (if given) overrides the member's
    :attr:`~cyclereg.training.clouds.CloudCycleConfig.learn_recentre_passes`."""
    from cyclereg.checkpoint import atomic_write_text, json_text, load_checkpoint, save_checkpoint
    from cyclereg.clouds.api import _model_from_checkpoint, fold_checkpoint, load_cloud_model
    from cyclereg.datasets import load_keypoint_dataset
    from cyclereg.training.api import _cloud_task
    from cyclereg.training.scheduler import DEFAULT_SNAPSHOT_EVERY_S, StageSnapshot

    if learner is None:
        info = json.loads((ensemble_dir / "ensemble.json").read_text())
        source = info["members"][f"fold{fold}"][member_index]
        run = _member_run(source)
        training = info["training"][run]
    else:
        source = {"source": str(fold_checkpoint(learner, fold))}
        run = str(learner)
        training = json.loads((learner / "run.json").read_text())
    run_name = Path(run).name
    target = out_dir / run_name / f"fold{fold}.pt"
    if target.is_file():
        return f"fold {fold} {run_name}: done before"
    training, config = _training(training, learn_recentre_passes)
    ensemble, ens_cfg = load_cloud_model(ensemble_dir / f"fold{fold}.pt")
    if learner is None:
        member = ensemble.members[member_index]
    else:
        original = load_checkpoint(source["source"], kind="cloud")
        member = _model_from_checkpoint(original, source["source"])[0].eval()
        source["stage"] = original["extra"]["stage"]
    ds = load_keypoint_dataset(dataset)
    task = _cloud_task(ds, fold, config, torch.device("cpu"))
    stage = int(source.get("stage", 0)) + 1
    t0 = time.perf_counter()
    labels, info_labels = task.make_pseudo_labels(member, stage, labeller=(ensemble, ens_cfg))
    t1 = time.perf_counter()
    # a killed job resumes its training at the last snapshot (the labels are made again: deterministic)
    snapshot = StageSnapshot(out_dir / run_name / f"fold{fold}.partial.pt", stage=stage,
                             every_s=DEFAULT_SNAPSHOT_EVERY_S)
    stats = task.train_stage(member, labels, info_labels["weights"], stage, snapshot=snapshot)
    t2 = time.perf_counter()
    # the registration settings its training configuration stores (as `cycle` writes them): the
    # member's own checkpoint is not needed, only the ensemble (which holds its weights)
    save_checkpoint(target, kind="cloud", config=task.model_config(), state_dict=member.state_dict(),
                    extra={"stage": stage, "pseudo_labels": f"ensemble {ensemble_dir}/fold{fold}.pt",
                           "training": _stage_record(ds, fold, [source])})
    snapshot.clear()
    line = {"fold": fold, "member": run_name, "stage": stage, "label_seconds": t1 - t0, "train_seconds": t2 - t1,
            **task.ran_on(stage),  # device and training precision, as cycle's log.jsonl lines
            "pseudo_label_disagreement_mm": info_labels["stats"]["pseudo_label_disagreement_mm"], **stats}
    atomic_write_text(out_dir / run_name / f"fold{fold}.log.json", json_text(line) + "\n")  # strict JSON, as cycle's
    # the member's training configuration, so that the new checkpoints ensemble (and train) again
    atomic_write_text(out_dir / run_name / "run.json", json_text(training, indent=2) + "\n")
    return json_text(line)


def run_joint_job(ensemble_dir: Path, out_dir: Path, dataset: Path, fold: int, config_member: int,
                  learn_recentre_passes: int | None = None, *, progress) -> str:
    """All members of fold ``fold`` trained together through the joint learning stream (one
    worker process, one intra-op thread) with member ``config_member``'s training configuration;
    returns the job's log line. See the module docstring (``--joint``)."""
    from cyclereg.checkpoint import atomic_write_text, json_text, save_checkpoint
    from cyclereg.clouds.api import load_cloud_model
    from cyclereg.datasets import load_keypoint_dataset
    from cyclereg.training.api import _cloud_task
    from cyclereg.training.scheduler import DEFAULT_SNAPSHOT_EVERY_S, StageSnapshot

    info = json.loads((ensemble_dir / "ensemble.json").read_text())
    sources = info["members"][f"fold{fold}"]
    runs = [_member_run(source) for source in sources]
    names = [Path(run).name for run in runs]
    targets = [out_dir / name / f"fold{fold}.pt" for name in names]
    if all(t.is_file() for t in targets):
        return f"fold {fold} joint: done before"
    trainings, configs = zip(*(_training(info["training"][run], learn_recentre_passes) for run in runs))
    ensemble, ens_cfg = load_cloud_model(ensemble_dir / f"fold{fold}.pt")
    ds = load_keypoint_dataset(dataset)
    task = _cloud_task(ds, fold, configs[config_member], torch.device("cpu"))
    stage = max(int(source.get("stage", 0)) for source in sources) + 1
    t0 = time.perf_counter()
    labels, info_labels = task.make_pseudo_labels(ensemble, stage, labeller=(ensemble, ens_cfg))
    t1 = time.perf_counter()
    snapshot = StageSnapshot(out_dir / f"joint_fold{fold}.partial.pt", stage=stage, every_s=DEFAULT_SNAPSHOT_EVERY_S)
    stats = task.train_stage(ensemble, labels, info_labels["weights"], stage, snapshot=snapshot)
    t2 = time.perf_counter()
    provenance = f"ensemble {ensemble_dir}/fold{fold}.pt, trained jointly (configuration of {names[config_member]})"
    for member, config, target, source in zip(ensemble.members, configs, targets, sources):
        # each member with the registration settings its own training configuration stores
        member_task = _cloud_task(ds, fold, config, torch.device("cpu"))
        save_checkpoint(target, kind="cloud", config=member_task.model_config(), state_dict=member.state_dict(),
                        extra={"stage": stage, "pseudo_labels": provenance,
                               "training": _stage_record(ds, fold, [source])})
    snapshot.clear()
    line = {"fold": fold, "members": names, "joint_configuration": names[config_member], "stage": stage,
            "label_seconds": t1 - t0, "train_seconds": t2 - t1, **task.ran_on(stage),
            "pseudo_label_disagreement_mm": info_labels["stats"]["pseudo_label_disagreement_mm"], **stats}
    for name, training in zip(names, trainings):
        atomic_write_text(out_dir / name / f"fold{fold}.log.json", json_text(line) + "\n")
        atomic_write_text(out_dir / name / "run.json", json_text(training, indent=2) + "\n")
    return json_text(line)


def _refuse_member_without_training(ap: argparse.ArgumentParser, ensemble: Path, info: dict, folds: list[int],
                                    members: list[int] | None) -> None:
    """One error line, before any job starts, naming a member whose training configuration the jobs would
    not find (:func:`_member_without_training`)."""
    missing = _member_without_training(info, folds, members)
    if missing is not None:
        i, run = missing
        ap.exit(1, f"error: {run}: member {i} of {ensemble / 'ensemble.json'} has no training configuration there "
                   "('training' keeps the run.json of each member's run directory; a model set or exported folder "
                   "keeps none under its own name): make the ensemble of the run directories, or train this "
                   "member's run with --learner RUN_DIR\n")


def _refuse(ap: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit 1 with the one line ``error: message``, as the script's other refusals (no usage text)."""
    ap.exit(1, f"error: {message}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the paths as text: an empty one is refused (Path("") is the current folder)
    ap.add_argument("ensemble", help="folder of 'cyclereg ensemble' (ensemble.json, foldK.pt)")
    ap.add_argument("out", help="folder for the new stage: one run-like folder per member")
    ap.add_argument("--dataset", default=DEFAULT_DATASET, help="keypoint dataset.json the members trained on")
    ap.add_argument("--jobs", type=int, default=2, help="(fold, member) jobs at once, each in its own process")
    ap.add_argument("--folds", default=None, metavar="K,L", help="only these folds (default: every fold of the ensemble)")
    ap.add_argument("--learner", default=None, metavar="RUN_DIR",
                    help="train this run's fold checkpoints (not members of the ensemble) on the ensemble's labels")
    ap.add_argument("--members", default=None, metavar="I,J",
                    help="train only these members (0-based indices in the ensemble; default all)")
    ap.add_argument("--learn-recentre-passes", type=int, default=None, metavar="N",
                    help="re-centred LBP passes in the learning stream (overrides the members' own setting)")
    ap.add_argument("--joint", type=int, default=None, metavar="I",
                    help="train each fold's members together through the joint learning stream, with member I's "
                         "training configuration (0-based)")
    args = ap.parse_args()
    try:
        refuse_empty_paths({"ensemble": args.ensemble, "out": args.out, "--dataset": args.dataset,
                            "--learner": args.learner})
    except InputError as exc:
        _refuse(ap, str(exc))
    args.ensemble, args.out, args.dataset = Path(args.ensemble), Path(args.out), Path(args.dataset)
    args.learner = None if args.learner is None else Path(args.learner)
    if args.learn_recentre_passes is not None and args.learn_recentre_passes < 0:
        _refuse(ap, f"--learn-recentre-passes {args.learn_recentre_passes}: need 0 or more")
    if args.jobs < 1:
        _refuse(ap, f"--jobs {args.jobs}: need 1 or more")
    for flag, path in (("--dataset", args.dataset), ("--learner", args.learner)):  # read in the jobs: checked here
        if path is not None and not (path / "run.json" if flag == "--learner" else path).is_file():
            _refuse(ap, f"{flag} {path}: " + ("no run directory there (no run.json)" if flag == "--learner"
                                                  else "no such file"))
    try:
        info = read_json(args.ensemble / "ensemble.json")
        learner = None if args.learner is None else read_json(args.learner / "run.json")
    except InputError as exc:  # no ensemble there, or not JSON: one line
        ap.exit(1, f"error: {exc}\n")
    if learner is not None and not (isinstance(learner, dict) and isinstance(learner.get("config"), dict)):
        ap.exit(1, f"error: {args.learner / 'run.json'}: no training configuration ('config') in it\n")
    if not isinstance(info.get("members"), dict) or not info["members"]:
        ap.exit(1, f"error: {args.ensemble / 'ensemble.json'}: lists no members (not an ensemble of 'cyclereg "
                   "ensemble'?)\n")
    have = sorted(int(k[4:]) for k in info["members"])
    try:
        folds = have if args.folds is None else [int(v) for v in args.folds.split(",")]
    except ValueError:
        _refuse(ap, f"--folds {args.folds}: expected fold numbers such as 1,3")
    if not set(folds) <= set(have):
        _refuse(ap, f"--folds {args.folds}: the ensemble has folds {','.join(map(str, have))}")
    if args.joint is not None:
        count = len(info["members"]["fold" + str(folds[0])])
        if args.learner is not None or args.members is not None:
            _refuse(ap, "--joint trains all members of the ensemble: not with --learner or --members")
        if not 0 <= args.joint < count:
            _refuse(ap, f"--joint {args.joint}: the ensemble has members 0..{count - 1}")
        _refuse_member_without_training(ap, args.ensemble, info, folds, None)
        jobs = [(run_joint_job, (args.ensemble, args.out, args.dataset, k, args.joint, args.learn_recentre_passes),
                 f"fold {k} joint") for k in folds]
    elif args.learner is not None:
        jobs = [(run_job, (args.ensemble, args.out, args.dataset, k, None, args.learner, args.learn_recentre_passes),
                 f"fold {k} {args.learner.name}") for k in folds]
    else:
        count = len(info["members"]["fold" + str(folds[0])])
        try:
            members = None if args.members is None else [int(v) for v in args.members.split(",")]
        except ValueError:
            _refuse(ap, f"--members {args.members}: expected member indices such as 0,2")
        if members is not None and not all(0 <= i < count for i in members):
            _refuse(ap, f"--members {args.members}: the ensemble has members 0..{count - 1}")
        _refuse_member_without_training(ap, args.ensemble, info, folds, members)
        jobs = [(run_job, (args.ensemble, args.out, args.dataset, k, i, None, args.learn_recentre_passes),
                 f"fold {k} member {i}")
                for i in range(count) if members is None or i in members
                for k in folds]
    with Progress(*Progress.get_default_columns(), TimeElapsedColumn()) as progress:
        overall = progress.add_task("(fold, member) jobs", total=len(jobs))

        def finished(line: str) -> None:
            progress.console.print(line)
            progress.advance(overall)

        # a worker killed by the OS ends the run with an error naming its job (WorkerError)
        run_parallel(jobs, args.jobs, progress, threads=1, on_result=finished)


if __name__ == "__main__":
    main()
