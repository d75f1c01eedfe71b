"""Long-running-process walk over the Python API (audited 2026-12-07).

What was audited: a service that calls ``cyclereg.api.register`` / ``evaluate`` / ``keypoints``,
``cyclereg.clouds.pipeline.register_clouds`` and ``cyclereg.dense.pipeline.register`` many times in one process.
On tiny inputs (the two-pair keypoint dataset of tests/conftest.py, a 24x28x32 volume pair as in
tests/test_dense_cli.py, a 24^3 CT) each call is repeated in a loop after a few warm-up calls, and the loop must
not grow: resident memory (``VmRSS`` after ``gc.collect()``), open file descriptors, threads, atexit callbacks,
SIGINT/SIGTERM/SIGPIPE handlers, ``warnings.filters`` and the modules' ``__warningregistry__`` entries,
files in the temporary directory, cyclereg's own caches (the C kernels of ``cyclereg.native`` load once) and
the time per call (no slow-down: the last calls take about as long as the first after the warm-up). Each call's
outputs must equal the first call's bit for bit, also after a call that failed midway (a bad input file, or an
exception injected into the registration by monkeypatch): no state is carried from one call to the next.

Tolerances: RSS may rise by at most 24 MB over a loop after warm-up (allocator noise of glibc/torch on these
sizes was under 1 MB in scratch runs of 40 calls; a leak of one tiny input's tensors per call, ~30 KB for the
cloud pair, a 100 KB volume for the dense pair, would show only over hundreds of calls, so the loop is checked
for flatness and the per-call leak bound is loose but finite: 24 MB / 30 calls = 0.8 MB per call, far below a
leaked network or volume copy). Time: the median of the last third of the calls at most 1.6x the median of
the first third plus 20 ms (medians: the machine is shared) (a quadratic slow-down over 30 calls would double it).
"""

from __future__ import annotations

import atexit
import gc
import gzip
import json
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import cyclereg.api as api
from cyclereg.errors import InputError

# slow: loops of 30 calls whose memory and time checks want an otherwise idle machine (kept out of the default run)
pytestmark = [pytest.mark.usefixtures("one_intraop_thread"), pytest.mark.slow]

LOOP = 30
RSS_SLACK_KB = 24 * 1024


def _rss_kb() -> int:
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _warning_registry_size() -> int:
    total = 0
    for module in list(sys.modules.values()):
        registry = module.__dict__.get("__warningregistry__") if hasattr(module, "__dict__") else None
        total += len(registry) if isinstance(registry, dict) else 0
    return total


def _state() -> dict:
    gc.collect()
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": sorted(t.name for t in threading.enumerate()),
            "atexit": atexit._ncallbacks(),
            "signals": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)],
            "filters": len(warnings.filters), "registry": _warning_registry_size(),
            "tmp": sorted(os.listdir(tempfile.gettempdir())), "modules": len(sys.modules),
            "libraries": _mapped_libraries(), "garbage": len(gc.garbage),
            "figures": sys.modules["matplotlib.pyplot"].get_fignums() if "matplotlib.pyplot" in sys.modules else []}


def _mapped_libraries() -> list[str]:
    """Shared objects mapped into the process (a C kernel rebuilt or reloaded per call would add one)."""
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if ".so" in line.rsplit("/", 1)[-1]})


@pytest.fixture(autouse=True)
def own_tempdir(tmp_path, monkeypatch):
    """A private temporary folder (the shared /tmp sees other processes' files come and go)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every file the call wrote, with ``config.json``'s timing/provenance fields left out (they differ by design)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith(".gz"):  # the gzip header holds the write time: compare the content
                data = gzip.decompress(data)
            if p.suffix == ".json":  # the record names the call's own output folder
                record = json.loads(data.replace(str(folder).encode(), b"OUT"))
                data = json.dumps(_strip(record), sort_keys=True).encode()
            out[str(p.relative_to(folder))] = data
    return out


VOLATILE = ("time", "timing", "seconds", "date", "created", "elapsed", "provenance", "host", "version", "started", "finished")


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if not any(w in k.lower() for w in VOLATILE)}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _loop(call, same, n: int = LOOP, warmup: int = 3):
    """Run ``call(i)`` ``warmup`` + ``n`` times; returns (state before, state after, RSS rise kb, times, and
    ``same(result)`` of each looped call: only these booleans are kept, so that the loop holds no results and any
    growth of the Python heap is the library's)."""
    for i in range(warmup):
        assert same(call(i))
    before, rss0, objects0 = _state(), _rss_kb(), len(gc.get_objects())
    times, agreed = [], []
    for i in range(n):
        t = time.perf_counter()
        result = call(warmup + i)
        times.append(time.perf_counter() - t)
        agreed.append(same(result))
        del result
    after, rss1, objects1 = _state(), _rss_kb(), len(gc.get_objects())
    assert objects1 - objects0 < n, f"{objects1 - objects0} more Python objects after {n} calls"
    return before, after, rss1 - rss0, times, agreed


def _assert_flat(before, after, rise_kb, times):
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, changed
    assert rise_kb < RSS_SLACK_KB, f"RSS rose by {rise_kb} kB over {len(times)} calls"
    third = len(times) // 3
    first, last = np.median(times[:third]), np.median(times[-third:])  # medians: other processes' load
    assert last <= 1.6 * first + 0.02, (first, last)


@pytest.fixture(scope="module")
def kp(tmp_path_factory):
    import nibabel as nib

    from conftest import write_two_pair_dataset

    d = tmp_path_factory.mktemp("longkp")
    write_two_pair_dataset(d)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32), np.eye(4)),
             str(d / "ct.nii.gz"))
    (d / "bad.csv").write_text("x,y\n1,2\n")
    return d


@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    from test_dense_cli import _blob_image, _save

    d = tmp_path_factory.mktemp("longvol")
    for n, shift in enumerate([(0, 0, 0), (0, 2, 1)], start=1):
        img, lab = _blob_image(shift, seed=0)
        _save(d / f"i{n}.nii.gz", img)
        _save(d / f"l{n}.nii.gz", lab)
    return d


def _api_calls():
    return {
        "register-clouds": lambda d, o, i: api.register(d / "f.csv", d / "m.csv", o / f"r{i}", device="cpu",
                                                         query=d / "q.csv", verbose=False),
        "register-volumes": lambda d, o, i: api.register(d / "i1.nii.gz", d / "i2.nii.gz", o / f"r{i}", warps=1,
                                                          adam=False, moving_labels=d / "l2.nii.gz", device="cpu",
                                                          verbose=False),
        "evaluate-random": lambda d, o, i: api.evaluate(d / "dataset.json", o / f"r{i}" / "report.json",
                                                        model="random", max_pairs=1, device="cpu"),
        "keypoints": lambda d, o, i: api.keypoints(d / "ct.nii.gz", o / f"r{i}" / "k.csv", device="cpu",
                                                   verbose=False),
    }


@pytest.mark.parametrize("case", ["register-clouds", "register-volumes", "evaluate-random", "keypoints"])
def test_repeated_api_calls_do_not_grow_and_give_the_same_files(kp, vol, tmp_path, case, capsys):
    d = vol if case == "register-volumes" else kp
    call = _api_calls()[case]

    def once(i):
        call(d, tmp_path, i)
        return _outputs(tmp_path / f"r{i}")

    first = once("first")
    assert first, "the call wrote nothing"
    before, after, rise, times, agreed = _loop(once, lambda r: r == first)
    capsys.readouterr()
    _assert_flat(before, after, rise, times)
    assert all(agreed)


def _midway(monkeypatch, module, name):
    """``module.name`` runs and then raises: the call fails after part of its work (a device error, say)."""
    real = getattr(module, name)

    def boom(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("injected midway")

    monkeypatch.setattr(module, name, boom)


def test_cloud_register_after_failed_calls_equals_the_first(kp, tmp_path, monkeypatch):
    """A bad input file, then an exception raised after the network ran, between calls: each later call writes the
    same files as the first, and the failed calls leave nothing in their output folders but what a caller made."""
    import cyclereg.clouds.pipeline as pipeline

    def call(i):
        api.register(kp / "f.csv", kp / "m.csv", tmp_path / f"r{i}", device="cpu", query=kp / "q.csv", verbose=False)
        return _outputs(tmp_path / f"r{i}")

    first = call(0)
    with pytest.raises(InputError, match="bad.csv"):
        api.register(kp / "f.csv", kp / "bad.csv", tmp_path / "bad", device="cpu", verbose=False)
    assert call(1) == first
    with monkeypatch.context() as m:
        _midway(m, pipeline, "test_time_displacements")
        with pytest.raises(RuntimeError, match="injected midway"):
            api.register(kp / "f.csv", kp / "m.csv", tmp_path / "boom", device="cpu", verbose=False)
    assert not (tmp_path / "boom").exists() or not any((tmp_path / "boom").iterdir())
    assert call(2) == first


def test_volume_register_after_failed_calls_equals_the_first(vol, tmp_path, monkeypatch):
    import cyclereg.dense.pipeline as pipeline

    def call(i):
        api.register(vol / "i1.nii.gz", vol / "i2.nii.gz", tmp_path / f"r{i}", warps=2, adam=True, ic=True,
                     moving_labels=vol / "l2.nii.gz", device="cpu", verbose=False)
        return _outputs(tmp_path / f"r{i}")

    first = call(0)
    (tmp_path / "half.nii.gz").write_bytes((vol / "i2.nii.gz").read_bytes()[:200])
    with pytest.raises(InputError, match="half.nii.gz"):
        api.register(vol / "i1.nii.gz", tmp_path / "half.nii.gz", tmp_path / "bad", device="cpu", verbose=False)
    assert call(1) == first
    for name in ("predict_displacement", "adam_refine"):
        with monkeypatch.context() as m:
            _midway(m, pipeline, name)
            with pytest.raises(RuntimeError, match="injected midway"):
                call(f"boom-{name}")
        assert not (tmp_path / f"rboom-{name}").exists() or not any((tmp_path / f"rboom-{name}").iterdir())
    assert call(2) == first


def test_register_clouds_in_a_loop_is_flat_and_bitwise_the_same(tmp_path):
    """:func:`cyclereg.clouds.pipeline.register_clouds` on tensors, one network, 30 calls (and one that fails on
    NaN coordinates and one with an exception injected after the network ran, in between): the same displacements
    bit for bit, the network's weights untouched, the process's resources flat."""
    import cyclereg.clouds.pipeline as pipeline
    from cyclereg.clouds.features import build_graph_net
    from cyclereg.clouds.pipeline import CloudRegConfig, register_clouds

    from conftest import SMALL_BREATHING
    from cyclereg.clouds.synthetic import make_breathing_pair

    pair = make_breathing_pair(0, SMALL_BREATHING)
    fixed, moving = torch.as_tensor(pair.fixed_mm).float(), torch.as_tensor(pair.moving_mm).float()
    config = CloudRegConfig()
    net = build_graph_net(config.net, seed=0).float()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    mode = net.training
    first = register_clouds(fixed, moving, net, config).displacements_mm.clone()
    bad = fixed.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="fixed_mm: holds NaN"):
        register_clouds(bad, moving, net, config)
    with pytest.MonkeyPatch.context() as m:
        _midway(m, pipeline, "test_time_displacements")
        with pytest.raises(RuntimeError, match="injected midway"):
            register_clouds(fixed, moving, net, config)

    def once(_):
        return register_clouds(fixed, moving, net, config).displacements_mm

    before, after, rise, times, agreed = _loop(once, lambda r: torch.equal(r, first))
    _assert_flat(before, after, rise, times)
    assert all(agreed)
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())
    assert net.training is mode


def test_dense_register_in_a_loop_is_flat_and_bitwise_the_same(vol):
    """:func:`cyclereg.dense.pipeline.register` on one tiny pair, one network, two warps with Adam and inverse
    consistency, 12 calls after one that failed midway (inside Adam): the same field bit for bit, the network's
    weights and the config untouched, the process's resources flat."""
    import dataclasses

    import nibabel as nib

    import cyclereg.dense.pipeline as pipeline
    from cyclereg.dense.config import DensePipelineConfig
    from cyclereg.dense.network import random_feature_net

    cfg = DensePipelineConfig(warps=2, use_ic=True, use_adam=True)
    frozen = dataclasses.asdict(cfg)
    net = random_feature_net(cfg.net, seed=0)
    weights = {k: v.clone() for k, v in net.state_dict().items()}

    def image(name):
        a = torch.from_numpy(np.asarray(nib.load(str(vol / name)).dataobj, dtype=np.float32))
        return (a / a.max())[None, None]

    fixed, moving = image("i1.nii.gz"), image("i2.nii.gz")
    first = pipeline.register(fixed, moving, net, cfg).clone()
    with pytest.MonkeyPatch.context() as m:
        _midway(m, pipeline, "adam_refine")
        with pytest.raises(RuntimeError, match="injected midway"):
            pipeline.register(fixed, moving, net, cfg)

    before, after, rise, times, agreed = _loop(lambda _: pipeline.register(fixed, moving, net, cfg),
                                               lambda r: torch.equal(r, first), n=12)
    _assert_flat(before, after, rise, times)
    assert all(agreed)
    assert all(torch.equal(v, weights[k]) for k, v in net.state_dict().items())
    assert dataclasses.asdict(cfg) == frozen
