"""Size and write time of a mid-stage training snapshot (`StageSnapshot`) for both networks.

    python benchmarks/snapshot_cost.py
"""
import tempfile
import time
from pathlib import Path

import torch

from cyclereg.training.scheduler import StageSnapshot
from cyclereg.clouds.features import build_graph_net
from cyclereg.dense.network import FeatureNet


def main() -> None:
    for name, net in [("graph CNN (clouds)", build_graph_net(seed=0)), ("3D CNN (volumes)", FeatureNet())]:
        opt = torch.optim.Adam(net.parameters())
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [40, 52], 0.1)
        g = torch.Generator().manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            s = StageSnapshot(Path(d) / "stage1.partial.pt", stage=1, every_s=1e-9)
            s.restore(1000, model=net, optimizer=opt, lr_schedule=sched, generator=g)
            t = []
            for i in range(5):
                t0 = time.perf_counter()
                s.offer(i + 1, model=net, optimizer=opt, lr_schedule=sched, generator=g, losses=[1.0] * 1000)
                t.append(time.perf_counter() - t0)
            size = s.path.stat().st_size
        n = sum(p.numel() for p in net.parameters())
        print(f"{name}: {n} parameters, snapshot {size/1e6:.2f} MB, write {min(t)*1e3:.1f}-{max(t)*1e3:.1f} ms")


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options: --help says what it does
    main()
