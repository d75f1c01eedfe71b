"""Copy one stage of a keypoint-cloud training run into a model set (a directory of ``foldK.pt``).

``python scripts/run_model_set.py RUN_DIR -o OUT [--stage T]``

Without ``--stage`` every fold's ``final.pt`` (its last finished stage); with ``--stage T >= 1``
every fold's ``stageT.pt``; with ``--stage 0`` the run's stage-0 network, the random network
``pretrain-random`` labelled with (seeded from the run's ``run.json``), stored with the
registration settings of the fold's stage-1 checkpoint, so that every stage of the curve
registers with the same settings. ``OUT`` gets ``fold{K}.pt`` per fold and ``model_set.json``
(run, stage, source file and its SHA-256 per fold); it must not exist yet, and nothing is written
unless every fold has the checkpoint asked for.

A model set is what ``cyclereg evaluate DATASET --run OUT --json R.json`` and ``--model OUT/foldK.pt`` read, what
``scripts/set_cloud_test_time.py OUT`` rewrites, and the form of ``models/copd``. The run itself
is never changed (its checkpoints keep the settings it trained with).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cyclereg.checkpoint import file_sha256, load_checkpoint, save_checkpoint, write_json
from cyclereg.clouds.api import fold_checkpoint
from cyclereg.datasets import read_json
from cyclereg.errors import InputError, refuse_empty_paths, refuse_output_in_run, require_output_dir
from cyclereg.training.clouds import CloudCycleConfig, initial_network
from cyclereg.training.scheduler import initial_network_seed


def _run_meta(run: Path) -> dict:
    info = run / "run.json"
    if not info.is_file():
        raise InputError("not a training run (no run.json)", run)
    meta = read_json(info)
    if meta.get("kind") != "keypoints":
        raise InputError(f"a run of a {meta.get('kind')!r} dataset; model sets are made of keypoint runs", run)
    if not meta.get("folds"):
        raise InputError("run.json lists no folds", info)
    return meta


def export(run: str | Path, out: str | Path, stage: int | None = None) -> list[Path]:
    """Write ``out/fold{K}.pt`` for every fold of ``run`` (see the module docstring); returns them."""
    refuse_empty_paths({"RUN_DIR": run, "-o": out}, lists=())
    run, out = Path(run), Path(os.path.normpath(out))  # '..' resolved by name, as the folders are made
    if stage is not None and stage < 0:
        raise InputError(f"--stage {stage}: need 0 or more")
    if out.exists():
        raise InputError("already exists; choose a new directory", out)
    require_output_dir(out)  # before any work: not below a file, not named like a file, writable
    refuse_output_in_run(out, "-o")
    meta = _run_meta(run)
    folds = range(1, len(meta["folds"]) + 1)
    want = None if stage is None else max(stage, 1)  # stage 0 takes stage 1's settings
    name = "final.pt" if want is None else f"stage{want}.pt"
    sources, missing = {}, []
    for k in folds:  # the run's layout is fold_checkpoint's
        try:
            sources[k] = fold_checkpoint(run, k, want)
        except InputError:
            missing.append(str(run / f"fold{k}" / name))
    if missing:
        raise InputError(f"no {name} in {len(missing)} of {len(folds)} folds ({', '.join(missing)})", run)
    stage0 = None
    if stage == 0:
        cycle_cfg = CloudCycleConfig.from_dict(meta["config"])
        seed = initial_network_seed(cycle_cfg.seed, 0)
        stage0 = initial_network(cycle_cfg, 0).state_dict()
    parent = Path(os.path.abspath(out.parent))  # '..' resolved by name, as the folders are made
    made = [p for p in reversed(parent.parents) if not p.exists()]
    made += [parent] if not parent.exists() else []
    parent.mkdir(parents=True, exist_ok=True)  # the temporary folder beside OUT: one rename, same file system
    target = parent / out.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)  # a plain mkdir's permissions, not mkdtemp's private 0o700
    try:
        written, record = [], {}
        for k, src in sources.items():
            ck = load_checkpoint(src, kind="cloud")
            if stage0 is not None:
                state, extra = stage0, {"stage": 0, "seed": seed, "settings_from": str(src)}
            else:
                state, extra = ck["state_dict"], ck.get("extra")
            save_checkpoint(tmp / f"fold{k}.pt", kind="cloud", config=ck["config"], state_dict=state, extra=extra)
            record[f"fold{k}"] = {"source": str(src), "sha256": file_sha256(src)}
            written.append(target / f"fold{k}.pt")  # where it is: "new/sub/../set" names no file when new/sub is none
        write_json(tmp / "model_set.json", {"command": "run_model_set", "run": str(run),
                                            "stage": "final" if stage is None else stage, "folds": record,
                                            "training": {str(run): meta}})  # pairs and folds, for evaluate --run
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if not target.exists():  # failed: the folders made for it go again (deepest first; empty ones only)
            for folder in reversed(made):
                try:
                    folder.rmdir()
                except OSError:
                    break
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="training run directory (run.json, fold*/)")  # text: an empty one is refused
    ap.add_argument("-o", "--output", required=True, help="new model-set directory")
    ap.add_argument("--stage", type=int, help="stage T (0 = the stage-0 random network; default: final)")
    args = ap.parse_args(argv)
    try:
        files = export(args.run, args.output, args.stage)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(files)} checkpoints and model_set.json to {os.path.normpath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
