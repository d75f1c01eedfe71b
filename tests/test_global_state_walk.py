"""Global-state walk over the public Python API (audited 2026-12-07).

What was audited: a notebook or long-running service calls ``cyclereg.api.keypoints`` / ``register`` /
``evaluate``, ``cyclereg.training.api.pretrain_random`` / ``run_cycle``, ``cyclereg.clouds.api.combine_cloud_models``
(ensemble), ``cyclereg.compare.compare_reports`` and ``cyclereg.training.status.show_run_status`` on keypoint and
volume datasets, each once successfully and once with a bad input or an exception raised midway. Before and after
each call the process-global state was compared: torch's intra-op and inter-op thread counts, default dtype, global
RNG state, grad mode, deterministic-algorithms switches, autocast, cuDNN/TF32 flags and matmul precision; NumPy's
and Python's global RNG; ``warnings.filters``; the root logger's handlers and level; ``sys.stdout``/``sys.stderr``
(objects and their ``errors``); SIGINT/SIGTERM/SIGPIPE handlers; the working directory, ``os.environ``, the umask
and ``sys.path``; open file descriptors, threads and child processes; cyclereg's temporary files and staging
folders in the temporary directory and beside the outputs; matplotlib's backend and open figures.

The project's rule: a library call leaves all of that as it found it (on success and on failure) unless its
docstring says otherwise. Found in scratch runs and left out of the tests as too slow for this file: ``jobs=2``
(fold workers) restores SIGINT/SIGTERM and leaves no worker or thread behind, also when interrupted by Ctrl-C
midway (the one process left is multiprocessing's own resource tracker, started once per process by design); a
live progress display (``FORCE_COLOR=1``) interrupted midway gives the streams back and leaves no thread.
Third-party import side effects (SciPy adds warning filters when first imported, torch_geometric writes its
generated ``propagate`` modules to the temporary directory) are not cyclereg's and are neutralised below by
importing first. The three cases the code mishandles (a volume evaluation switches the caller's matplotlib backend
to Agg; a figure whose drawing or saving fails stays open in pyplot; a SIGTERM while fold workers run bypasses the
caller's own SIGTERM handler and leaves SIGTERM ignored) were pinned at the end as strict xfails until they were mended.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import cyclereg.api as api

import scipy.stats  # noqa: E402,F401 - its import adds warning filters: not the library's doing

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fds() -> set[str]:
    gc.collect()
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            found.add(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
        except OSError:  # the listing's own descriptor, closed since
            pass
    return found


def _ours(folder: Path) -> list[str]:
    """cyclereg's leftovers in ``folder`` and below: staging folders and atomic writes' ``.NAME.*.tmp``."""
    return sorted(p.name for p in folder.rglob(".*") if p.name.startswith(".cyclereg-staging.")
                  or p.name.endswith(".tmp"))


def _state(out: Path) -> dict:
    return {
        "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
        "dtype": torch.get_default_dtype(), "torch_rng": torch.get_rng_state().tolist(),
        "grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "autocast": torch.is_autocast_enabled(), "anomaly": torch.is_anomaly_enabled(),
        "backends": (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                     torch.backends.cudnn.enabled, torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()),
        "np_rng": repr(np.random.get_state()), "py_rng": random.getstate(), "np_err": np.geterr(),
        "warnings": list(warnings.filters), "showwarning": warnings.showwarning,
        "logging": (list(logging.root.handlers), logging.root.level, logging.root.manager.disable),
        "streams": (sys.stdout, getattr(sys.stdout, "errors", None), sys.stderr, getattr(sys.stderr, "errors", None)),
        "signals": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)],
        "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(), "path": list(sys.path),
        "excepthook": sys.excepthook, "fds": _fds(), "threads_py": sorted(t.name for t in threading.enumerate()),
        "children": len(__import__("multiprocessing").active_children()),
        "tmp": sorted(n for n in os.listdir(tempfile.gettempdir()) if "cyclereg" in n),
        "out": _ours(out),
    }


def _same_state_around(call, out: Path, *, raises=None) -> None:
    """``call()`` (raising ``raises`` if given) leaves every item of :func:`_state` as it found it."""
    before = _state(out)
    if raises is None:
        call()
    else:
        with pytest.raises(raises):
            call()
    after = _state(out)
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not changed, changed


@pytest.fixture(scope="module")
def kp(tmp_path_factory):
    """A two-pair keypoint dataset, two cloud checkpoints, a tiny CT, fold 1 pretrained (1 stage, 1 epoch) and
    two reports; the lazy imports (torch_geometric, scipy, rich) warmed up by a first register."""
    import nibabel as nib

    from cyclereg.checkpoint import save_checkpoint
    from cyclereg.clouds.features import build_graph_net
    from cyclereg.clouds.pipeline import CloudRegConfig
    from cyclereg.training.api import pretrain_random

    from conftest import write_two_pair_dataset

    d = tmp_path_factory.mktemp("kpstate")
    write_two_pair_dataset(d)
    for name, seed in (("a.pt", 1), ("b.pt", 2)):
        save_checkpoint(d / name, kind="cloud", config=CloudRegConfig(),
                        state_dict=build_graph_net(CloudRegConfig().net, seed=seed).state_dict())
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32), np.eye(4)),
             str(d / "ct.nii.gz"))
    (d / "bad.csv").write_text("x,y\n1,2\n")
    api.register(d / "f.csv", d / "m.csv", d / "warm", device="cpu")
    pretrain_random(d / "dataset.json", d / "run", fold=1, stages=1, epochs=1, device="cpu")
    api.evaluate(d / "dataset.json", d / "id.json", identity=True, device="cpu")
    api.evaluate(d / "dataset.json", d / "rnd.json", model="random", max_pairs=1, device="cpu")
    return d


def _kp_calls():
    from cyclereg.clouds.api import combine_cloud_models
    from cyclereg.compare import compare_reports
    from cyclereg.errors import InputError
    from cyclereg.training.api import pretrain_random, run_cycle
    from cyclereg.training.status import show_run_status

    ds = "dataset.json"
    return {
        "register": (lambda d, o: api.register(d / "f.csv", d / "m.csv", o / "reg", device="cpu"), None),
        "register-bad-csv": (lambda d, o: api.register(d / "f.csv", d / "bad.csv", o / "reg", device="cpu"),
                             InputError),
        "evaluate-identity": (lambda d, o: api.evaluate(d / ds, o / "r.json", identity=True, device="cpu"), None),
        "evaluate-missing-model": (lambda d, o: api.evaluate(d / ds, o / "r.json", model=d / "no.pt", device="cpu"),
                                   InputError),
        "pretrain-bad-fold": (lambda d, o: pretrain_random(d / ds, o / "run", fold=7, stages=1, epochs=1,
                                                           device="cpu"), InputError),
        "cycle-no-run": (lambda d, o: run_cycle(d / ds, o / "none", device="cpu"), InputError),
        "status": (lambda d, o: show_run_status(d / "run"), None),
        "status-no-run": (lambda d, o: show_run_status(o / "none"), InputError),
        "compare": (lambda d, o: compare_reports([d / "id.json", d / "rnd.json"], o / "c.json", quiet=True), None),
        "compare-not-json": (lambda d, o: compare_reports([d / "id.json", d / "f.csv"], quiet=True), InputError),
        "ensemble": (lambda d, o: combine_cloud_models([d / "a.pt", d / "b.pt"], o / "e.pt"), None),
        "ensemble-not-checkpoint": (lambda d, o: combine_cloud_models([d / "a.pt", d / "f.csv"], o / "e.pt"),
                                    InputError),
        "keypoints": (lambda d, o: api.keypoints(d / "ct.nii.gz", o / "k.csv", device="cpu", verbose=False), None),
        "keypoints-not-nifti": (lambda d, o: api.keypoints(d / "f.csv", o / "k.csv", device="cpu", verbose=False),
                                InputError),
    }


KP_CASES = ["register", "register-bad-csv", "evaluate-identity", "evaluate-missing-model",
            "pretrain-bad-fold", "cycle-no-run", "status", "status-no-run", "compare", "compare-not-json",
            "ensemble", "ensemble-not-checkpoint", "keypoints", "keypoints-not-nifti"]


@pytest.mark.parametrize("case", KP_CASES)
def test_keypoint_api_calls_leave_process_state_alone(kp, tmp_path, case):
    call, raises = _kp_calls()[case]
    _same_state_around(lambda: call(kp, tmp_path), tmp_path, raises=raises)


@pytest.fixture
def callers_own_state():
    """The caller's own seeds and SIGTERM handler, put back afterwards."""
    def mine(*_):
        pass

    old = signal.signal(signal.SIGTERM, mine)
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    try:
        yield mine
    finally:
        signal.signal(signal.SIGTERM, old)


def test_pretrain_leaves_rng_threads_and_signals_alone(kp, tmp_path, callers_own_state):
    """pretrain-random seeds its own generators: the caller's global RNGs, thread counts and SIGTERM handler (a
    caller's own, here) are untouched; only the run directory is written."""
    from cyclereg.training.api import pretrain_random

    _same_state_around(lambda: pretrain_random(kp / "dataset.json", tmp_path / "run", fold=2, stages=1, epochs=1,
                                               seed=5, device="cpu"), tmp_path)
    assert signal.getsignal(signal.SIGTERM) is callers_own_state


def test_cycle_stage_leaves_rng_threads_and_signals_alone(kp, tmp_path, callers_own_state):
    """A training stage (fold 1 of the fixture's run, stage 1) likewise."""
    from cyclereg.training.api import run_cycle

    _same_state_around(lambda: run_cycle(kp / "dataset.json", kp / "run", folds="1", device="cpu"), tmp_path)
    assert (kp / "run" / "fold1" / "stage1.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) is callers_own_state


def test_exception_midway_through_an_evaluation_leaves_state_alone(kp, tmp_path, monkeypatch):
    """An error raised inside the pair loop (after the model is built and the progress display started):
    the state is as before, and neither a staging folder nor a temporary file is left beside the report."""
    import cyclereg.clouds.api as capi

    def boom(*args, **kwargs):
        raise RuntimeError("midway")

    monkeypatch.setattr(capi, "_evaluate_pair", boom)
    _same_state_around(lambda: api.evaluate(kp / "dataset.json", tmp_path / "r.json", model="random", max_pairs=1,
                                            device="cpu"), tmp_path, raises=RuntimeError)
    assert not (tmp_path / "r.json").exists()


# ---- volumes -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vol(tmp_path_factory):
    """The four tiny CT-like volumes of tests/test_cycle_dense.py, a run pretrained (1 stage, 1 iteration) and an
    identity report (its figures drawn once, so matplotlib's fonts are loaded)."""
    from cyclereg.training.api import pretrain_random

    from test_cycle_dense import _dataset

    d = tmp_path_factory.mktemp("volstate")
    ds = _dataset(d)
    pretrain_random(ds, d / "run", stages=1, iterations=1, device="cpu")
    api.evaluate(ds, d / "id.json", identity=True, max_pairs=1, device="cpu")
    return d


def _img(d: Path, k: int) -> Path:
    return d / "imagesTr" / f"Case_{k:04d}_0000.nii.gz"


def _vol_calls():
    from cyclereg.errors import InputError
    from cyclereg.training.api import pretrain_random, run_cycle
    from cyclereg.training.status import show_run_status

    ds = "Tiny_dataset.json"
    return {
        "register": (lambda d, o: api.register(_img(d, 1), _img(d, 2), o / "reg", warps=1, adam=False, device="cpu"),
                     None),
        "register-cloud-vs-volume": (lambda d, o: api.register(_img(d, 1), d / ds, o / "reg", warps=1, adam=False,
                                                               device="cpu"), InputError),
        "pretrain": (lambda d, o: pretrain_random(d / ds, o / "run", stages=1, iterations=1, device="cpu"), None),
        "evaluate-identity-no-figures-drawn-twice": (lambda d, o: api.evaluate(d / ds, o / "r.json", identity=True,
                                                                                max_pairs=1, device="cpu"), None),
        "evaluate-bad-stage": (lambda d, o: api.evaluate(d / ds, o / "r.json", run=d / "run", stage=9, device="cpu"),
                               InputError),
        "cycle-no-run": (lambda d, o: run_cycle(d / ds, o / "none", device="cpu"), InputError),
        "status": (lambda d, o: show_run_status(d / "run"), None),
    }


@pytest.mark.parametrize("case", ["register", "register-cloud-vs-volume", "pretrain",
                                  "evaluate-identity-no-figures-drawn-twice", "evaluate-bad-stage", "cycle-no-run",
                                  "status"])
def test_volume_api_calls_leave_process_state_alone(vol, tmp_path, case):
    call, raises = _vol_calls()[case]
    _same_state_around(lambda: call(vol, tmp_path), tmp_path, raises=raises)


def test_volume_evaluation_keeps_the_callers_matplotlib_backend(vol, tmp_path):
    """A notebook's backend (here ``svg``, standing for the inline one) is the caller's: the report's figures are
    drawn without switching it (e.g. ``Figure`` + ``FigureCanvasAgg`` directly), and the caller's open figure
    stays open."""
    import matplotlib
    import matplotlib.pyplot as plt

    original = matplotlib.get_backend()
    matplotlib.use("svg")
    mine = plt.figure()
    try:
        api.evaluate(vol / "Tiny_dataset.json", tmp_path / "r.json", identity=True, max_pairs=1, device="cpu")
        assert (tmp_path / "r_dice_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plt.get_fignums() == [mine.number]
        assert matplotlib.get_backend() == "svg"
    finally:
        plt.close(mine)
        matplotlib.use(original)


def test_failed_figure_is_not_left_open(vol, tmp_path, monkeypatch):
    """An error while a report figure is saved (here ``Figure.savefig`` raising) propagates, and no figure of the
    library's stays registered in pyplot (a long-running service would accumulate them)."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    def failing(self, *args, **kwargs):
        raise RuntimeError("savefig failed")

    before = plt.get_fignums()
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing)
    try:
        with pytest.raises(RuntimeError, match="savefig failed"):
            api.evaluate(vol / "Tiny_dataset.json", tmp_path / "r.json", identity=True, max_pairs=1, device="cpu")
        assert plt.get_fignums() == before
    finally:
        for number in set(plt.get_fignums()) - set(before):
            plt.close(number)


class _CallersStop(Exception):
    """What the caller's own SIGTERM handler raises (a service's orderly shutdown)."""


def test_sigterm_during_fold_workers_reaches_the_callers_handler(tmp_path, monkeypatch):
    """A service with its own SIGTERM handler runs folds in worker processes (``jobs=2`` goes through
    :func:`cyclereg.training.parallel.run_parallel`) and gets a SIGTERM midway: its handler runs (its exception
    propagates after the workers are stopped), and the handler is still installed after the call."""
    import parallel_jobs as jobs

    from cyclereg.training import parallel
    from cyclereg.training.parallel import run_parallel

    # forked rather than spawned workers: the same parent code path, without a second of imports per worker
    fork = parallel.mp.get_context("fork")
    monkeypatch.setattr(parallel.mp, "get_context", lambda method: fork)

    def callers(signum, frame):
        raise _CallersStop

    class Quiet:
        """Stands in for rich's Progress: accepts every call."""

        def __init__(self):
            self.console = self

        def __getattr__(self, name):
            return lambda *args, **kwargs: 0

    old = signal.signal(signal.SIGTERM, callers)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        try:
            run_parallel([(jobs.sleeps, (str(tmp_path / "started"),), "fold 1")], 1, Quiet(), 1, lambda r: None)
            raised = None
        except BaseException as exc:  # noqa: BLE001 - SystemExit is what goes wrong here
            raised = exc
        timer.join()
        assert isinstance(raised, _CallersStop), repr(raised)
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, old)
