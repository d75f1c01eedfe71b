"""Shared fixtures: the shared data folder (tests needing it skip when absent), devices."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def require_kernel(module):
    """The loaded C kernel of a ``native`` module (:mod:`cyclereg.clouds.native`,
    :mod:`cyclereg.dense.native`), or skip the test saying why there is none."""
    k = module.kernel()
    if k is None:
        pytest.skip(f"no native kernel here: {module.reason()}")
    return k


def load_script(relative: str):
    """The module of a repository script that is not part of the package (``scripts/``,
    ``benchmarks/``), e.g. ``load_script("scripts/device_check.py")``."""
    import importlib.util
    import sys

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses of the script look their module up by name
    spec.loader.exec_module(module)
    return module


def shared_path(*parts: str) -> Path:
    """Path inside ../shared/data; skips the calling test when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not available: {p}")
    return p


@pytest.fixture(scope="session", autouse=True)
def _children_temporary_folder(tmp_path_factory):
    """Child processes keep their temporary files under pytest's own base folder.

    A child that a test kills with SIGKILL cannot run its exit handlers, so the file PyG
    renders for ``EdgeConv`` (see ``cyclereg.clouds.features.pyg_template_files``) would
    stay in the system's temporary folder, one per test run. Under pytest's base folder it
    goes when pytest rotates its old base folders."""
    import os

    folder = tmp_path_factory.getbasetemp() / "children-tmp"
    folder.mkdir(exist_ok=True)
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    yield
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old


TEST_SEED = 0
"""The seed of torch's, NumPy's and Python's global generators at the start of every test."""


@pytest.fixture(autouse=True)
def _global_generators_seeded():
    """Every test starts from the same global random state, whatever ran before it: a test that draws from
    torch's global generator (a network's initial weights) otherwise saw another draw whenever tests were added
    or reordered (a tiny ReLU network left a unit without gradient under one such draw). Tests still seed what
    they depend on themselves; this only makes a forgotten seed fail always or never."""
    import random

    import numpy as np
    import torch

    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)
    yield


@pytest.fixture(autouse=True)
def _sigterm_handler_restored():
    """Put back the test process's SIGTERM handler after every test: a CLI test run through CliRunner runs the
    CLI's callback in this process, which installs :func:`cyclereg.interrupts.sigterm_exit`; left there, a
    ``kill`` of the pytest run would fail whichever test runs and then be ignored. The handler put back is the
    one the process had when this file was imported, not the one before the test: a module-scoped fixture that
    runs a command has installed its handler before the first test of its module starts."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    yield
    if main and _PROCESS_SIGTERM is not None and signal.getsignal(signal.SIGTERM) is not _PROCESS_SIGTERM:
        signal.signal(signal.SIGTERM, _PROCESS_SIGTERM)


def _process_sigterm():
    import signal
    import threading

    return signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None


_PROCESS_SIGTERM = _process_sigterm()
"""The pytest process's own SIGTERM handler (read when the test session imports this file)."""


SMALL_BREATHING = BreathingConfig(n_fixed=300, n_moving=600, branches=20)
"""A small synthetic lung pair (300 fixed / 600 moving points): quick to register on CPU."""


@pytest.fixture
def pair_files(tmp_path):
    """``(tmp_path, pair)``: the pair of :data:`SMALL_BREATHING` (seed 0) written as point files in
    ``tmp_path``: ``f.csv`` / ``m.csv`` (fixed / moving keypoints), ``q.csv`` (7 query points),
    ``l.csv`` / ``ml.csv`` (20 fixed landmarks and where they truly move)."""
    return tmp_path, write_pair_files(tmp_path)


def write_pair_files(folder: Path):
    """Write the point files of :func:`pair_files` into ``folder`` (for fixtures of a wider scope);
    returns the synthetic pair."""
    from cyclereg.pointio import write_points

    pair = make_breathing_pair(0, SMALL_BREATHING)
    write_points(folder / "f.csv", pair.fixed_mm)
    write_points(folder / "m.csv", pair.moving_mm)
    write_points(folder / "q.csv", pair.fixed_mm[:7])
    write_points(folder / "l.csv", pair.fixed_mm[:20])
    write_points(folder / "ml.csv", pair.fixed_mm[:20] + pair.displacement_mm[:20])
    return pair


def write_two_pair_dataset(folder: Path) -> Path:
    """:func:`write_pair_files` into ``folder`` and ``folder/dataset.json``: the same files as two pairs c0 and c1
    in two folds (one held out each), with landmarks; returns the dataset path."""
    write_pair_files(folder)
    entry = {"fixed_keypoints": "f.csv", "moving_keypoints": "m.csv", "fixed_landmarks": "l.csv",
             "moving_landmarks": "ml.csv"}
    path = folder / "dataset.json"
    path.write_text(json.dumps({"pairs": [{"id": "c0", **entry}, {"id": "c1", **entry}], "folds": [["c0"], ["c1"]]}))
    return path


def write_synthetic_pairs_dataset(folder: Path, config: BreathingConfig, *, landmarks: int | None = None,
                                  name: str = "tiny") -> Path:
    """Two distinct synthetic pairs of ``config``, ``c0`` (seed 0) and ``c1`` (seed 1), one per fold, as
    ``folder/cK/fk.csv`` / ``mk.csv`` and ``folder/dataset.json`` (named ``name``); with ``landmarks``, the
    first that many fixed keypoints (``fl.csv``) and where they truly move (``ml.csv``) are each pair's
    landmarks. Returns the dataset path."""
    from cyclereg.pointio import write_points

    pairs = []
    for i in range(2):
        pair = make_breathing_pair(i, config)
        write_points(folder / f"c{i}" / "fk.csv", pair.fixed_mm)
        write_points(folder / f"c{i}" / "mk.csv", pair.moving_mm)
        entry = {"id": f"c{i}", "fixed_keypoints": f"c{i}/fk.csv", "moving_keypoints": f"c{i}/mk.csv"}
        if landmarks is not None:
            write_points(folder / f"c{i}" / "fl.csv", pair.fixed_mm[:landmarks])
            write_points(folder / f"c{i}" / "ml.csv", pair.fixed_mm[:landmarks] + pair.displacement_mm[:landmarks])
            entry.update({"fixed_landmarks": f"c{i}/fl.csv", "moving_landmarks": f"c{i}/ml.csv"})
        pairs.append(entry)
    ds = folder / "dataset.json"
    ds.write_text(json.dumps({"name": name, "pairs": pairs, "folds": [["c0"], ["c1"]]}))
    return ds


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64])
def dtype(request) -> torch.dtype:
    return request.param


@contextlib.contextmanager
def intraop_threads(n: int):
    """torch's intra-op threads set to ``n`` inside the block, and back to what they were after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_intraop_thread():
    """Tiny volumes: one intra-op thread is faster (and fair to parallel test runs)."""
    with intraop_threads(1):
        yield


def assert_same_weights(path_a: str | Path, path_b: str | Path) -> None:
    """The checkpoints at ``path_a`` and ``path_b`` hold bitwise equal state dicts."""
    a = torch.load(path_a, map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(path_b, map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class LearningRateSpy:
    """A stage snapshot (``train_stage(..., snapshot=spy)``) that resumes nothing and records the learning
    rate after every step it is offered, in :attr:`lrs`."""

    def __init__(self):
        self.lrs: list[float] = []

    def restore(self, total, **kwargs):
        return 0, []

    def offer(self, step, *, lr_schedule, **kwargs):
        self.lrs.append(lr_schedule.get_last_lr()[0])


def command_parameters(function) -> list[tuple[str, object, type]]:
    """``[(name, typer info, type)]`` of a Typer command function's parameters in order: the info is the
    parameter's default (``typer.models.ArgumentInfo`` or ``OptionInfo``), the type its annotation with
    ``Optional[X]`` given as ``X``."""
    import inspect
    import typing

    hints = typing.get_type_hints(function)
    walked = []
    for name, param in inspect.signature(function).parameters.items():
        kind = hints[name]
        if typing.get_origin(kind) is typing.Union:  # Optional[X]: X
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        walked.append((name, param.default, kind))
    return walked
