"""The authors' public dense test pipeline next to cyclereg's, on the same pairs and CPU.

``python benchmarks/reference_dense_cpu.py MIRROR DATASET_JSON [--pairs N] [--threads T] [--json R]``

``MIRROR`` is a checkout of multimodallearning/reg-cyclical-self-train (its files are imported
from there at run time, never copied into cyclereg). Their code is CUDA-only and fixed to
192x160x256 volumes (the Learn2Reg abdomen grid, e.g. ``make_abdomen_ct.py`` data). To run it
on the CPU this script makes ``.cuda()`` a no-op and CUDA autocast a plain context (so their
pipeline computes in float32), and feeds their ``update_fields`` one ``registration_val``
pair at a time with their test settings: 2 warps, inverse consistency, Adam instance
optimisation with their test regularisation (``reg_fac = 10``); a second call without Adam
gives their network + optimiser time alone. Their feature network is a randomly initialised
``Conv3d``/``BatchNorm3d``/``ReLU`` stack of the layer sizes of their ``train.py`` (seeded;
BatchNorm in eval mode). Their images are read as they read them (``HU / 500``).

cyclereg registers the same pairs with ``--model random`` (its defaults: 2 warps, IC, Adam; and
once more without Adam), timed as ``evaluate`` times a pair (registration only). Dice is the mean over the labels
present in both scans for both (their ``update_fields`` Dice restricted by its own
"present in both" mask; cyclereg's :func:`cyclereg.metrics.dice`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from cyclereg.dense.api import load_model, pair_scores, register_pair
from cyclereg.dense.data import load_volume_dataset
from cyclereg.errors import MAX_MODEL_SEED, InputError, require_count, require_output_file, require_seed
from cyclereg.volumeio import read_nifti
from cyclereg.warp import warp

#: (in, out, stride) of the convolutions of their feature network; a 1x1 head to 16 channels follows
THEIR_LAYERS = ((1, 32, 2), (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 128, 2))
THEIR_GRID = (192, 160, 256)


def their_random_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for cin, cout, stride in THEIR_LAYERS:
        mods += [nn.Conv3d(cin, cout, 3, padding=1, stride=stride), nn.BatchNorm3d(cout), nn.ReLU()]
    return nn.Sequential(*mods, nn.Conv3d(THEIR_LAYERS[-1][1], 16, 1)).eval()


def cuda_free() -> None:
    """Let CUDA-only code run on the CPU: ``.cuda()`` returns its object, autocast does nothing."""
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.amp.autocast = lambda *a, **k: contextlib.nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mirror", type=Path, help="checkout of multimodallearning/reg-cyclical-self-train")
    ap.add_argument("dataset", type=Path, help="Learn2Reg *_dataset.json on the 192x160x256 grid")
    ap.add_argument("--pairs", type=int, default=3, help="the first N registration_val pairs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    try:  # bad input: one line before their code is imported or anything runs
        require_count("--pairs", args.pairs, 1)
        require_count("--threads", args.threads, 1)
        require_seed(args.seed, largest=MAX_MODEL_SEED)
        if not ((args.mirror / "registration_pipeline.py").is_file() or (args.mirror / "registration_pipeline").is_dir()):
            raise InputError("not a checkout of reg-cyclical-self-train (no registration_pipeline.py)", args.mirror)
        load_volume_dataset(args.dataset)
        if args.json is not None:
            require_output_file(args.json)
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    torch.set_num_threads(args.threads)
    cuda_free()
    sys.path.insert(0, str(args.mirror))
    from registration_pipeline import update_fields  # noqa: PLC0415 - their module, from the mirror

    ds = load_volume_dataset(args.dataset)
    ours, cfg, _ = load_model("random", args.seed, "cpu")
    theirs = their_random_net(args.seed)
    rows = []
    for p in ds.pairs[:args.pairs]:
        fv, mv = read_nifti(p.fixed), read_nifti(p.moving)
        fl, ml = read_nifti(p.fixed_labels, labels=True), read_nifti(p.moving_labels, labels=True)
        if fv.shape != THEIR_GRID:
            raise SystemExit(f"{p.fixed}: their code needs {THEIR_GRID}, got {fv.shape}")
        data = {"images": torch.stack([fv.data, mv.data])[:, None] / 500.0,
                "segmentations": torch.stack([fl.data, ml.data]), "pairs": torch.tensor([[0, 1]])}
        row = {"pair": p.id}
        for name, adam in (("reference_no_adam", False), ("reference", True)):
            t0 = time.perf_counter()
            with torch.no_grad():
                _, d_net, d0, d_adam, d_ident = update_fields(data, theirs, adam, num_warps=2, ice=True, reg_fac=10.0)
            row[name + "_seconds"] = time.perf_counter() - t0
            present = d_ident[0] > 0.1
            row[name + "_dice"] = float((d_adam if adam else d_net)[0][present].mean())
            row["initial_dice_reference"] = float(d0[0][present].mean())
        for name, config in (("cyclereg_no_adam", replace(cfg, use_adam=False)), ("cyclereg", cfg)):
            t0 = time.perf_counter()
            disp = register_pair(fv, mv, ours, config).detach().float()
            row[name + "_seconds"] = time.perf_counter() - t0
            warped = warp(ml.data[None, None], disp, mode="nearest")[0, 0]
            scores = pair_scores(fl.data, ml.data, warped, disp, fv.spacing)
            row[name + "_dice"], row["initial_dice"] = scores["dice"], scores["initial_dice"]
            row[name + "_sdlogj"] = scores["sdlogj"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "pair"}
    print("mean", json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "mean": summary, "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
