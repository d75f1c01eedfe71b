"""Change the stored test-time registration settings of cloud checkpoints (state dicts unchanged).

``python scripts/set_cloud_test_time.py CKPT_OR_DIR ... [--tta-passes N] [--recentre-passes N]
[--candidates K] [--recentre-candidates K] [--training-box-of DATASET_JSON]``

``--candidates`` sets the first pass's search size (``lbp.num_candidates``), e.g. to register
networks trained at the authors' K = 256 with the CPU's K = 64.

``--training-box-of`` stores the volume box of a keypoint dataset as the frame the networks were
trained in (:attr:`CloudRegConfig.training_box`), for checkpoints written before it was stored.

A directory stands for its ``fold*.pt`` files (and the ``config`` of its ``ensemble.json``, if
it has one, is updated the same way). Each checkpoint is rewritten atomically with the
same ``state_dict`` and ``extra`` and its ``config`` (a :class:`CloudRegConfig`) updated; this is how
a pre-registered test-time change reaches a committed model set such as ``models/copd``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from cyclereg.checkpoint import load_checkpoint, save_checkpoint, write_json
from cyclereg.clouds.api import dataset_box
from cyclereg.clouds.pipeline import CloudRegConfig
from cyclereg.datasets import load_keypoint_dataset, read_json
from cyclereg.errors import InputError, refuse_empty_paths, run_dir_holding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+",  # text: an empty one is refused (Path("") is the current folder)
                    help="cloud checkpoints, or folders of fold*.pt (a model set)")
    ap.add_argument("--tta-passes", type=int, help="test-time augmentation passes (0 = off)")
    ap.add_argument("--recentre-passes", type=int, help="re-centred LBP passes after the first (0 = single pass)")
    ap.add_argument("--candidates", type=int, help="candidates of the first LBP pass (lbp.num_candidates)")
    ap.add_argument("--recentre-candidates", type=int, help="candidates of each re-centred pass (0 = as the first pass)")
    ap.add_argument("--training-box-of", metavar="DATASET_JSON",
                    help="store this keypoint dataset's volume box as the frame the networks were trained in")
    args = ap.parse_args()
    try:
        _update(args)
    except ValueError as exc:  # InputError: a missing or unreadable checkpoint or dataset; else a value out of
        ap.exit(1, f"error: {exc}\n")  # range for its field: one line, nothing rewritten


def _update(args: argparse.Namespace) -> None:
    refuse_empty_paths({"paths": args.paths, "--training-box-of": args.training_box_of})
    paths = [Path(p) for p in args.paths]
    changes = {k: v for k, v in (("tta_passes", args.tta_passes), ("recentre_passes", args.recentre_passes))
               if v is not None}
    if args.recentre_candidates is not None:
        changes["recentre_candidates"] = args.recentre_candidates or None
    if args.training_box_of is not None:
        box = dataset_box(load_keypoint_dataset(args.training_box_of))
        if box is None:
            raise InputError("the dataset has no volume_shape_zyx / spacing_zyx_mm box", args.training_box_of)
        changes["training_box"] = box
    files = [f for p in paths for f in (sorted(p.glob("fold*.pt")) if p.is_dir() else [p])]
    if not files:
        raise InputError(f"{' '.join(map(str, paths))}: no checkpoints found (a folder stands for its fold*.pt files)")
    for f in files:  # a training run's own checkpoints (RUN/foldK/*.pt): cycle writes them, status reads them
        run = run_dir_holding(f.parent)
        if run is not None and Path(f.parent).resolve() != run:
            raise InputError(f"a checkpoint of the training run {run}, which cycle writes and status reads; export "
                             "the stage first (python scripts/run_model_set.py RUN -o SET) and change the set", f)

    def updated(config: dict) -> CloudRegConfig:
        cfg = CloudRegConfig.from_dict(config)
        if args.candidates is not None:
            cfg = replace(cfg, lbp=replace(cfg.lbp, num_candidates=args.candidates))
        return replace(cfg, **changes)

    loaded = [(f, load_checkpoint(f, kind="cloud")) for f in files]  # all readable before any is written
    configs = [updated(ck["config"]) for _, ck in loaded]  # all valid first
    summaries = []
    for p in paths:
        if p.is_dir() and (p / "ensemble.json").is_file():
            info = read_json(p / "ensemble.json")
            try:  # its configuration too, before any file is rewritten
                info["config"] = updated(info["config"]) if isinstance(info, dict) else None
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise InputError(f"its config cannot be read ({type(exc).__name__}: {exc})", p / "ensemble.json") \
                    from None
            summaries.append((p / "ensemble.json", info))
    for (f, ck), config in zip(loaded, configs):
        save_checkpoint(f, kind="cloud", config=config, state_dict=ck["state_dict"], extra=ck.get("extra"))
        print(f"{f}: candidates={config.lbp.num_candidates} tta_passes={config.tta_passes} recentre_passes={config.recentre_passes} "
              f"recentre_candidates={config.recentre_candidates} training_box={config.training_box}")
    for path, info in summaries:
        write_json(path, info)
        print(f"{path}: config updated")


if __name__ == "__main__":
    main()
