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
from cyclereg.errors import InputError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--tta-passes", type=int)
    ap.add_argument("--recentre-passes", type=int)
    ap.add_argument("--candidates", type=int, help="candidates of the first LBP pass (lbp.num_candidates)")
    ap.add_argument("--recentre-candidates", type=int, help="candidates of each re-centred pass (0 = as the first pass)")
    ap.add_argument("--training-box-of", type=Path, metavar="DATASET_JSON")
    args = ap.parse_args()
    try:
        _update(ap, args)
    except InputError as exc:  # a missing or unreadable checkpoint or dataset: one line, nothing rewritten
        ap.exit(1, f"error: {exc}\n")


def _update(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    changes = {k: v for k, v in (("tta_passes", args.tta_passes), ("recentre_passes", args.recentre_passes))
               if v is not None}
    if args.recentre_candidates is not None:
        changes["recentre_candidates"] = args.recentre_candidates or None
    if args.training_box_of is not None:
        box = dataset_box(load_keypoint_dataset(args.training_box_of))
        if box is None:
            ap.error(f"{args.training_box_of}: the dataset has no volume_shape_zyx / spacing_zyx_mm box")
        changes["training_box"] = box
    files = [f for p in args.paths for f in (sorted(p.glob("fold*.pt")) if p.is_dir() else [p])]
    if not files:
        ap.error("no checkpoints found")

    def updated(config: dict) -> CloudRegConfig:
        cfg = CloudRegConfig.from_dict(config)
        if args.candidates is not None:
            cfg = replace(cfg, lbp=replace(cfg.lbp, num_candidates=args.candidates))
        return replace(cfg, **changes)

    loaded = [(f, load_checkpoint(f, kind="cloud")) for f in files]  # all readable before any is written
    configs = [updated(ck["config"]) for _, ck in loaded]  # all valid first
    summaries = [(p / "ensemble.json", read_json(p / "ensemble.json"))
                 for p in args.paths if p.is_dir() and (p / "ensemble.json").is_file()]
    for (f, ck), config in zip(loaded, configs):
        save_checkpoint(f, kind="cloud", config=config, state_dict=ck["state_dict"], extra=ck.get("extra"))
        print(f"{f}: candidates={config.lbp.num_candidates} tta_passes={config.tta_passes} recentre_passes={config.recentre_passes} "
              f"recentre_candidates={config.recentre_candidates} training_box={config.training_box}")
    for path, info in summaries:
        info["config"] = updated(info["config"])
        write_json(path, info)
        print(f"{path}: config updated")


if __name__ == "__main__":
    main()
