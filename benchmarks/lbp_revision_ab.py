"""Time one sparse-LBP forward + backward of this checkout against ``cyclereg/clouds/lbp.py`` of an
older git revision, on one pair of a keypoint dataset, and check that both give bitwise the same
displacements and network gradients.

``python benchmarks/lbp_revision_ab.py REV DATASET_JSON MODEL [--pair ID] [--candidates K] [--repeats R]``

``MODEL``: a cloud checkpoint (for an ensemble its first member is used); its LBP settings apply
with ``--candidates`` overriding K. The two versions run alternately, ``--repeats`` times each,
in one process (the same machine state for both). No landmarks are read.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from cyclereg.clouds import lbp as current
from cyclereg.clouds.api import dataset_box, load_cloud_model
from cyclereg.clouds.features import ensemble_members
from cyclereg.datasets import load_keypoint_dataset
from cyclereg.errors import InputError, require_count
from cyclereg.pointio import read_points

REPO = Path(__file__).resolve().parents[1]


def module_at(rev: str):
    """``cyclereg/clouds/lbp.py`` as it was at ``rev``, imported as a module of its own."""
    done = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:cyclereg/clouds/lbp.py"], capture_output=True,
                          text=True)
    if done.returncode:  # an unknown revision, or no git checkout: git's own first line
        said = (done.stderr.strip().splitlines() or ["git failed"])[0]
        raise InputError(f"rev {rev}: no cyclereg/clouds/lbp.py there ({said})")
    text = done.stdout
    path = Path(tempfile.mkdtemp()) / "lbp_at_rev.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("lbp_at_rev", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="git revision whose lbp.py is the baseline")
    ap.add_argument("dataset", type=Path)
    ap.add_argument("model")
    ap.add_argument("--pair", default=None, help="pair id (default: the first)")
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:  # bad input: one line before any work
        for flag, value in (("--candidates", args.candidates), ("--repeats", args.repeats), ("--threads", args.threads)):
            require_count(flag, value, 1)
        ds = load_keypoint_dataset(args.dataset)
        pair = next((p for p in ds.pairs if args.pair in (None, p.id)), None)
        if pair is None:
            raise InputError(f"--pair: no pair {args.pair!r}", args.dataset)
        net, cfg = load_cloud_model(args.model)
        baseline = module_at(args.rev)
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    torch.set_num_threads(args.threads)
    member = ensemble_members(net)[0]
    box = dataset_box(ds)
    fixed, moving = (box.mm_to_unit(read_points(p)) for p in (pair.fixed_keypoints, pair.moving_keypoints))
    lbp = replace(cfg.lbp, num_candidates=args.candidates)

    def run(mod):
        member.zero_grad()
        feat_f, feat_m = member.pair(fixed, moving)
        t0 = time.perf_counter()
        disp = mod.lbp_displacements(fixed, moving, feat_f, feat_m, lbp)
        disp.norm(dim=1).mean().backward()
        seconds = time.perf_counter() - t0
        return seconds, disp.detach(), [q.grad.clone() for q in member.parameters() if q.grad is not None]

    versions = {args.rev: baseline, "this checkout": current}
    print(f"{pair.id}, K = {args.candidates}, {lbp.iterations} sweeps, {fixed.shape[0]} fixed / "
          f"{moving.shape[0]} moving points, {args.threads} thread(s)")
    for rep in range(args.repeats):
        results = {name: run(mod) for name, mod in versions.items()}
        (t_old, d_old, g_old), (t_new, d_new, g_new) = results.values()
        same = torch.equal(d_old, d_new) and all(torch.equal(a, b) for a, b in zip(g_old, g_new))
        print(f"repeat {rep + 1}: {args.rev} {t_old:.2f} s, this checkout {t_new:.2f} s; "
              f"displacements and gradients bitwise equal: {same}", flush=True)


if __name__ == "__main__":
    main()
