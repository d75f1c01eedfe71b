"""Change the stored test-time registration settings of cloud checkpoints (state dicts unchanged).

``python scripts/set_cloud_test_time.py CKPT_OR_DIR ... [--tta-passes N] [--recentre-passes N]``

A directory stands for its ``fold*.pt`` files. Each checkpoint is rewritten atomically with the
same ``state_dict`` and ``extra`` and its ``config`` (a :class:`CloudRegConfig`) updated; this is how
a pre-registered test-time change reaches a committed model set such as ``models/copd``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from cyclereg.checkpoint import load_checkpoint, save_checkpoint
from cyclereg.clouds.pipeline import CloudRegConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--tta-passes", type=int)
    ap.add_argument("--recentre-passes", type=int)
    args = ap.parse_args()
    changes = {k: v for k, v in (("tta_passes", args.tta_passes), ("recentre_passes", args.recentre_passes))
               if v is not None}
    files = [f for p in args.paths for f in (sorted(p.glob("fold*.pt")) if p.is_dir() else [p])]
    if not files:
        ap.error("no checkpoints found")
    loaded = [(f, load_checkpoint(f, kind="cloud")) for f in files]  # all readable before any is written
    for f, ck in loaded:
        config = replace(CloudRegConfig.from_dict(ck["config"]), **changes)
        save_checkpoint(f, kind="cloud", config=config, state_dict=ck["state_dict"], extra=ck.get("extra"))
        print(f"{f}: tta_passes={config.tta_passes} recentre_passes={config.recentre_passes}")


if __name__ == "__main__":
    main()
