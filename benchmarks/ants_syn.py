"""Peer baseline: ANTs SyN (antspyx, its default ``SyN`` settings) on the labelled
``registration_val`` pairs of a Learn2Reg dataset, scored exactly like ``cyclereg evaluate``.

antspyx is an optional dependency of this benchmark only (``pip install antspyx``).

    python benchmarks/ants_syn.py DATASET_JSON --json REPORT.json [--max-pairs N] [--threads N]

The report has the same top-level keys as ``cyclereg evaluate`` (``mean_dice``,
``initial_dice``, ``mean_hd95_mm``, ``mean_sdlogj``, ``mean_seconds``, ``pairs``) and is
written after every pair; re-running the command continues an unfinished report.

The dense field for SDlogJ is obtained by pushing the moving image's voxel-index
coordinates through ANTs' forward transform list with linear interpolation (exact for
these linear functions), so it is the composed affine + SyN map, fixed -> moving, in
voxels, the package convention.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _ants():
    try:
        import ants  # noqa: F401
    except ImportError:
        sys.exit("ants_syn.py: antspyx is not installed (pip install antspyx)")
    return ants


def index_displacement(ants, fixed, moving, transforms, margin: int = 48) -> torch.Tensor:
    """``(1, 3, D, H, W)`` voxel displacement of the fixed grid under ``transforms``.

    The coordinate images extend ``margin`` voxels beyond the moving domain (same linear
    values), so fixed voxels that map slightly outside it are not clipped to ANTs' default
    value (which would fake huge Jacobians at the border).
    """
    shape = moving.shape
    grids = np.meshgrid(*[np.arange(-margin, n + margin, dtype=np.float32) for n in shape], indexing="ij")
    direction = np.asarray(moving.direction, dtype=float)
    origin = np.asarray(moving.origin, dtype=float) - direction @ (np.asarray(moving.spacing, dtype=float) * margin)
    mapped = []
    for g in grids:
        img = ants.from_numpy(g, origin=tuple(origin), spacing=moving.spacing, direction=moving.direction)
        mapped.append(ants.apply_transforms(fixed=fixed, moving=img, transformlist=transforms,
                                            interpolator="linear").numpy())
    fixed_idx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in fixed.shape], indexing="ij")
    disp = np.stack([m - f for m, f in zip(mapped, fixed_idx)])
    return torch.from_numpy(disp)[None].float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--max-pairs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="ITK threads (default: all cores)")
    ap.add_argument("--transform", default="SyN", help="ANTs type_of_transform (default SyN)")
    args = ap.parse_args(argv)
    from cyclereg.dense.data import load_volume_dataset
    from cyclereg.errors import InputError, require_count, require_output_file

    try:  # bad input: one line before any work (and before antspyx is looked for)
        require_count("--max-pairs", args.max_pairs, 1)
        require_count("--threads", args.threads, 1)
        require_output_file(args.json)
        ds = load_volume_dataset(args.dataset)
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    if args.threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    ants = _ants()

    from cyclereg.dense.api import _mean, pair_scores, summarize_pairs
    from cyclereg.device import cpu_model

    pairs = list(ds.pairs)[: args.max_pairs] if args.max_pairs else list(ds.pairs)
    records = []
    if args.json.is_file():
        old = json.loads(args.json.read_text())
        if old.get("method", {}).get("transform") == args.transform and old.get("dataset") == str(args.dataset):
            records = [r for r in old.get("pairs", []) if r["id"] in {p.id for p in pairs}]
    done = {r["id"] for r in records}

    def write(complete: bool) -> None:
        result = {
            "dataset": str(args.dataset), "name": ds.name,
            "method": {"model": "ANTs", "transform": args.transform, "antspyx": getattr(ants, "__version__", "?"),
                       "threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "all")},
            **summarize_pairs(records),
            "machine": {"platform": platform.platform(), "cpu": cpu_model()},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": complete, "pairs": records,
        }
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)

    for n, p in enumerate(pairs, start=1):
        if p.id in done:
            continue
        fixed, moving = ants.image_read(str(p.fixed)), ants.image_read(str(p.moving))
        fl, ml = ants.image_read(str(p.fixed_labels)), ants.image_read(str(p.moving_labels))
        t0 = time.perf_counter()
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=args.transform)
        seconds = time.perf_counter() - t0
        warped = ants.apply_transforms(fixed=fixed, moving=ml, transformlist=reg["fwdtransforms"],
                                       interpolator="nearestNeighbor")
        disp = index_displacement(ants, fixed, moving, reg["fwdtransforms"])
        to_t = lambda im: torch.from_numpy(np.rint(im.numpy()).astype(np.int64))  # noqa: E731
        rec = {"id": p.id, "fixed": str(p.fixed), "moving": str(p.moving),
               **pair_scores(to_t(fl), to_t(ml), to_t(warped), disp, tuple(fixed.spacing)), "seconds": seconds}
        records.append(rec)
        write(False)
        print(f"[{n}/{len(pairs)}] {p.id}: Dice {rec['initial_dice']:.3f} -> {rec['dice']:.3f}, "
              f"HD95 {rec['hd95_mm']:.1f} mm, SDlogJ {rec['sdlogj']:.3f}, {seconds:.1f} s", flush=True)
    write(True)
    print(f"{len(records)} pairs: mean Dice {_mean(r['dice'] for r in records):.3f} "
          f"(initial {_mean(r['initial_dice'] for r in records):.3f}), "
          f"SDlogJ {_mean(r['sdlogj'] for r in records):.3f}, {_mean(r['seconds'] for r in records):.1f} s/pair")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
