"""Landmark-free diagnostics of the LBP candidate search range (keypoint clouds).

Never reads landmarks. Two modes:

``python benchmarks/candidate_range.py copd MODEL.pt copd04,copd08 64,128,64+1``
    For each pair of ``../shared/data/copd-keypoints`` and each variant ``K`` or ``K+P``
    (``P`` re-centred passes): run time, mean |u|, the soft-argmin mass on the outer quarter
    of the last pass's candidate list (a truncated search range puts mass there) and the
    mean distance of the warped fixed keypoints to the moving cloud.

``python benchmarks/candidate_range.py synthetic``
    Synthetic breathing pairs (seeds 0-4, random features, the refined stream's 10 sweeps
    and TPS 0.3) at the default and at twice the motion: mean error of the densified field
    at the fixed keypoints against the known motion, per variant.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from cyclereg.clouds.api import dataset_box, load_cloud_model
from cyclereg.clouds.lbp import lbp_beliefs
from cyclereg.clouds.pipeline import register_clouds
from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair
from cyclereg.datasets import load_keypoint_dataset
from cyclereg.errors import InputError
from cyclereg.pointio import read_points

DATASET = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "copd-keypoints" / "dataset.json"
OUTER = 0.75
"""Candidates ranked beyond this fraction of the list count as the outer part of the range."""


def parse_variants(text: str) -> list[tuple[int, int]]:
    """``K`` or ``K+P`` items, comma-separated; :class:`InputError` naming ``text`` unless K >= 1 and P >= 0."""
    out = []
    for v in text.split(","):
        k, _, p = v.partition("+")
        try:
            out.append((int(k), int(p or 0)))
        except ValueError:
            out.append((0, 0))
        if out[-1][0] < 1 or out[-1][1] < 0:
            raise InputError(f"variants {text}: expected K or K+P items such as 64,128,64+1 (K candidates, 1 or more; "
                             "P re-centred passes, 0 or more)")
    return out


def check_copd(model: str, ids: list[str]) -> None:
    """:class:`InputError` for a missing dataset or model, or a pair id the dataset does not have."""
    ds = load_keypoint_dataset(DATASET)
    load_cloud_model(model)
    have = {p.id for p in ds.pairs}
    unknown = [pid for pid in ids if pid not in have]
    if unknown:
        raise InputError(f"pairs {','.join(ids)}: no pair {unknown[0]!r} in the dataset", DATASET)


def copd(model: str, ids: list[str], variants: list[tuple[int, int]]) -> None:
    ds = load_keypoint_dataset(DATASET)
    box = dataset_box(ds)
    net, cfg = load_cloud_model(model)
    for pid in ids:
        p = ds.pair(pid)
        f, m = read_points(p.fixed_keypoints), read_points(p.moving_keypoints)
        for k, passes in variants:
            c = replace(cfg, lbp=replace(cfg.lbp, num_candidates=k), recentre_passes=passes)
            t0 = time.perf_counter()
            reg = register_clouds(f, m, net, c, box=box)
            u = reg.at(f)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                fu, mu = box.mm_to_unit(f), box.mm_to_unit(m)
                ff, fm = net.pair(fu, mu)
                if passes:  # the last pass searched around the smoothed previous estimate
                    prev = register_clouds(f, m, net, replace(c, recentre_passes=passes - 1), box=box)
                    centres = fu + box.disp_mm_to_unit(prev.at(f))
                else:
                    centres = None
                cand, bel = lbp_beliefs(fu, mu, ff, fm, c.lbp, centres=centres)
                w = torch.softmax(-c.lbp.softmax_beta * bel, dim=1)
                outer = w[:, int(OUTER * cand.shape[1]):].sum(1).mean().item()
            nn = torch.cdist(f + u, m).min(1).values.mean().item()
            print(f"{pid} K={k}+{passes}: {seconds:.1f} s, mean |u| {u.norm(dim=1).mean():.2f} mm, "
                  f"outer-quarter mass {100 * outer:.1f} %, warped-to-moving {nn:.2f} mm", flush=True)


def synthetic(variants: list[tuple[int, int]]) -> None:
    for scale in (1.0, 2.0):
        res: dict[tuple[int, int], list[tuple[float, float]]] = {}
        for seed in range(5):
            bc = BreathingConfig().scaled_motion(scale)
            pair = make_breathing_pair(seed, bc)
            net, cfg = load_cloud_model("random", seed=seed)
            cfg = replace(cfg, lbp=replace(cfg.lbp, iterations=10), tps=replace(cfg.tps, regularisation=0.3))
            for k, passes in variants:
                c = replace(cfg, lbp=replace(cfg.lbp, num_candidates=k), recentre_passes=passes)
                t0 = time.perf_counter()
                reg = register_clouds(pair.fixed_mm, pair.moving_mm, net, c)
                err = (reg.at(pair.fixed_mm) - pair.displacement_mm).norm(dim=1).mean().item()
                res.setdefault((k, passes), []).append((err, time.perf_counter() - t0))
        print(f"motion x{scale:g}")
        for (k, passes), v in res.items():
            errs = " ".join(f"{e:.2f}" for e, _ in v)
            print(f"  K={k}+{passes}: {errs}  mean {sum(e for e, _ in v) / len(v):.2f} mm, "
                  f"{sum(t for _, t in v) / len(v):.1f} s per pair", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = ap.add_subparsers(dest="mode", required=True)
    on_copd = modes.add_parser("copd", help="COPD pairs registered by a trained model")
    on_copd.add_argument("model", help="cloud checkpoint (e.g. models/copd/fold2.pt)")
    on_copd.add_argument("pairs", help="comma-separated pair ids, e.g. copd04,copd08")
    on_copd.add_argument("variants", help="comma-separated K or K+P (P re-centred passes), e.g. 64,128,64+1")
    on_synthetic = modes.add_parser("synthetic", help="synthetic breathing pairs with known motion")
    on_synthetic.add_argument("variants", nargs="?", default="64,128,64+1,128+1", help="as for copd")
    args = ap.parse_args()
    try:  # bad input: one line before any work
        variants = parse_variants(args.variants)
        if args.mode == "copd":
            check_copd(args.model, args.pairs.split(","))
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    torch.set_num_threads(1)
    if args.mode == "copd":
        copd(args.model, args.pairs.split(","), variants)
    else:
        synthetic(variants)
