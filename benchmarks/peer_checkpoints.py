"""Convert the per-fold graph-CNN weights released with registration-da-mean-teacher (Bigalke et
al., MICCAI 2022; the architecture of Hansen & Heinrich, IPMI 2021) into cyclereg cloud
checkpoints, so that ``cyclereg evaluate --run OUT`` scores them as a peer.

``python benchmarks/peer_checkpoints.py PATTERN OUT [--candidates K] [--iterations N] [--tps L]
[--recentre-passes P] [--moving-k K]``

``PATTERN`` names the five fold files with ``{}`` for the fold number, e.g.
``MIRROR/models/4dct-to-copd_target-only_fold{}.pth`` (``MIRROR``: a checkout of
multimodallearning/registration-da-mean-teacher). Only tensors are read (``weights_only``).
The defaults reproduce the released test settings: K = 256 candidates, 4 LBP sweeps, TPS
smoothing 0.1, a moving-cloud graph of 40 neighbours, a single pass. (Their ``match`` loops
``lbps_iter = 5`` times but reads the beliefs out of the messages made before its last update:
4 sweeps in cyclereg's terms. With 4, cyclereg's displacements match theirs to 0.001-0.005 mm on
fold 1; with 5 they were 0.16 / 0.60 mm apart, docs/benchmarks.md. Conversions before 2026-12-06
used 5: pass ``--iterations 5`` to repeat them.)

Layer mapping (same layer sizes, 1x1 convolutions = linear layers, instance norm over all
edges = :class:`cyclereg.clouds.features.CloudNorm`): ``convN.conv.{0,3,6}`` ->
``convs.{N-1}.nn.{0,3,6}``, ``conv4.{0,2}`` -> ``head.{0,2}``. Their edge input is
``[x_j - x_i, x_i]``, PyG's EdgeConv feeds ``[x_i, x_j - x_i]``: the first layer's two column
blocks are swapped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cyclereg.checkpoint import save_checkpoint
from cyclereg.clouds.features import GraphFeatureNet, GraphNetConfig
from cyclereg.clouds.lbp import LBPConfig
from cyclereg.clouds.pipeline import CloudRegConfig
from cyclereg.clouds.tps import TPSConfig
from cyclereg.errors import InputError, finite_number, require_count, require_file, require_output_dir

FOLDS = range(1, 6)


def convert_state_dict(theirs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their ``FeatNet`` state dict -> :class:`GraphFeatureNet` state dict."""
    ours = {}
    for i in range(3):
        for j in (0, 3, 6):
            w = theirs[f"conv{i + 1}.conv.{j}.weight"][:, :, 0, 0]
            if j == 0:
                half = w.shape[1] // 2
                w = torch.cat([w[:, half:], w[:, :half]], dim=1)
            ours[f"convs.{i}.nn.{j}.weight"] = w.clone()
    ours["head.0.weight"] = theirs["conv4.0.weight"][:, :, 0].clone()
    ours["head.2.weight"] = theirs["conv4.2.weight"][:, :, 0].clone()
    ours["head.2.bias"] = theirs["conv4.2.bias"].clone()
    return ours


def peer_config(candidates: int = 256, iterations: int = 4, tps: float = 0.1, recentre_passes: int = 0,
                moving_k: int = 40) -> CloudRegConfig:
    """cyclereg's registration settings for their test pipeline (defaults: their released test
    settings, see the module docstring)."""
    return CloudRegConfig(net=GraphNetConfig(k_moving=moving_k),
                          lbp=LBPConfig(num_candidates=candidates, iterations=iterations),
                          tps=TPSConfig(regularisation=tps), recentre_passes=recentre_passes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pattern")
    ap.add_argument("out", type=Path)
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--iterations", type=int, default=4, help="LBP sweeps (4: theirs, see the module doc)")
    ap.add_argument("--tps", type=float, default=0.1)
    ap.add_argument("--recentre-passes", type=int, default=0)
    ap.add_argument("--moving-k", type=int, default=40)
    args = ap.parse_args()
    try:  # bad input: one line, nothing written
        for flag, value, least in (("--candidates", args.candidates, 1), ("--iterations", args.iterations, 1),
                                   ("--recentre-passes", args.recentre_passes, 0), ("--moving-k", args.moving_k, 1)):
            require_count(flag, value, least)
        if not finite_number(args.tps) or args.tps < 0:
            raise InputError(f"--tps {args.tps}: need a finite number >= 0")
        require_output_dir(args.out)
        config = peer_config(args.candidates, args.iterations, args.tps, args.recentre_passes, args.moving_k)
        converted = {}
        for k in FOLDS:  # everything converted and checked before anything is written
            path = require_file(args.pattern.format(k))
            try:
                state = convert_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                GraphFeatureNet(config.net).load_state_dict(state)
            except Exception as exc:  # not their FeatNet checkpoint (not a torch file, other layers or shapes)
                raise InputError(f"not a checkpoint of their FeatNet ({type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:200]})", path) from None
            converted[k] = state
    except InputError as exc:
        ap.exit(1, f"error: {exc}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    for k, state in converted.items():
        save_checkpoint(args.out / f"fold{k}.pt", kind="cloud", config=config, state_dict=state,
                        extra={"source": args.pattern.format(k)})
    print(f"wrote {len(converted)} checkpoints to {args.out}")


if __name__ == "__main__":
    main()
