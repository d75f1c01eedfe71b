"""Contracts of today's mends that a mutation audit (2026-12-07) found unpinned.

Audited: :func:`cyclereg.training.parallel.run_parallel`'s SIGTERM exit (installed only where SIGTERM has the
default handler, and the default put back afterwards, also after a SIGTERM; a CLI run, whose own handler
comes first, and a library caller's own handler are pinned in ``test_parallel.py`` and
``test_global_state_walk.py``), the finite-number checks of :func:`cyclereg.frames.half_width_voxels`,
:meth:`cyclereg.frames.UnitBox.around`, ``cyclereg.clouds.augment._check_draw`` and
:func:`cyclereg.dense.similarity.ncc_loss`'s ``eps`` (their bounds, and NumPy scalars taken as the Python
numbers they stand for), and ``cycle``'s two stage-0 label checks (folder first, then ``pseudo0.pt`` under the
fold lock: a fold being labelled now is named as busy), and ``scripts/run_model_set.py`` with an ``-o`` holding ``..``
(a successful export lands at the normalised place). Each test fails on a hand-made mutant that the earlier tests let pass.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from cyclereg.frames import UnitBox, half_width_voxels


class _Quiet:
    """Stands in for rich's Progress: accepts every call."""

    def __init__(self):
        self.console = self

    def __getattr__(self, name):
        return lambda *args, **kwargs: 0


@pytest.fixture
def forked_default_sigterm(monkeypatch):
    """Fork-started workers (the same parent code path, quick), with SIGTERM at its default for the test."""
    from cyclereg.training import parallel

    fork = parallel.mp.get_context("fork")
    monkeypatch.setattr(parallel.mp, "get_context", lambda method: fork)
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield parallel.run_parallel
    finally:
        signal.signal(signal.SIGTERM, old)


def test_run_parallel_puts_the_default_sigterm_back_after_a_clean_run(forked_default_sigterm):
    """A library caller with the default SIGTERM handler: run_parallel's exit is there only during the call."""
    import parallel_jobs as jobs

    seen = []
    forked_default_sigterm([(jobs.square, (3,), "fold 1")], 1, _Quiet(), 1, seen.append)
    assert seen == [9]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


_SIGTERM_UNDER_DEFAULT = """
import os, signal, sys, threading, time
import parallel_jobs as jobs
from cyclereg.training import parallel

fork = parallel.mp.get_context("fork")
parallel.mp.get_context = lambda method: fork
signal.signal(signal.SIGTERM, signal.SIG_DFL)
marker = sys.argv[1]

class Quiet:
    def __init__(self):
        self.console = self
    def __getattr__(self, name):
        return lambda *args, **kwargs: 0

def send_once_started():
    deadline = time.monotonic() + 30
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=send_once_started, daemon=True).start()
try:
    parallel.run_parallel([(jobs.sleeps, (marker,), "fold 1")], 1, Quiet(), 1, lambda r: None)
except SystemExit as exc:
    print("exit", exc.code, "default again:", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)
"""


def test_a_sigterm_under_the_default_handler_exits_143_and_the_default_comes_back(tmp_path):
    """Default handler, SIGTERM midway: run_parallel's exit runs (SystemExit 143, the worker stopped) and the
    caller has the default handler again afterwards (not SIG_IGN, not sigterm_exit). In a child process: were
    nothing installed, the default handler would end the process (here: the child, not pytest)."""
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    marker = tmp_path / "pid"
    done = subprocess.run([sys.executable, "-c", _SIGTERM_UNDER_DEFAULT, str(marker)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "exit 143 default again: True"
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)


def test_half_width_voxels_takes_radius_zero_and_numpy_radii():
    """radius 0 is the smallest valid radius (no neighbour); a NumPy radius counts as its Python value."""
    assert half_width_voxels(0, (1.0, 2.0, 3.0)) == (0, 0, 0)
    assert half_width_voxels(0.0, (1.0, 1.0, 1.0)) == (0, 0, 0)
    assert half_width_voxels(np.float32(3.0), (2.0, 1.0, 3.0)) == (2, 3, 1)  # 1.5 rounds up, 3, 1
    assert half_width_voxels(np.int64(4), (2.0, 2.0, 2.0)) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"radius_mm: expected a finite radius >= 0 mm, got -1e-09"):
        half_width_voxels(-1e-9, (1.0, 1.0, 1.0))


def test_unit_box_around_bounds_its_margin_at_minus_a_half_and_takes_numpy_margins():
    cloud = torch.tensor([[0.0, 0.0, 0.0], [10.0, 20.0, 40.0]])
    box = UnitBox.around(cloud, margin=np.float64(0.5))  # half the size per side: twice the size in all
    assert box.lo_mm == pytest.approx((-5.0, -10.0, -20.0))
    assert box.extent_mm == pytest.approx((20.0, 40.0, 80.0))
    UnitBox.around(cloud, margin=np.float32(-0.25))
    UnitBox.around(cloud, margin=-0.499)
    with pytest.raises(ValueError, match=r"margin: expected a finite fraction > -0.5 of the box size per side, got -0.5"):
        UnitBox.around(cloud, margin=-0.5)


def test_check_draw_takes_numpy_ranges_and_names_a_bad_one():
    from cyclereg.clouds.augment import _check_draw

    _check_draw(torch.float32, {"rotation_deg": np.float32(10.0), "scale": np.int64(0), "translation": 0.1})
    with pytest.raises(ValueError, match=r"scale: expected a finite number, got True"):
        _check_draw(torch.float32, {"rotation_deg": 1.0, "scale": True})
    with pytest.raises(ValueError, match=r"translation: expected a finite number, got nan"):
        _check_draw(torch.float64, {"translation": float("nan")})


def test_ncc_eps_is_refused_at_zero_and_taken_as_a_numpy_scalar():
    from cyclereg.dense.similarity import ncc_loss

    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 6, 6, 6, generator=g)
    assert float(ncc_loss(img, img, radius=1, eps=np.float32(1e-5))) == pytest.approx(float(ncc_loss(img, img, radius=1, eps=1e-5)), abs=1e-6)
    with pytest.raises(ValueError, match=r"eps: expected a finite constant > 0, got 0"):
        ncc_loss(img, img, radius=1, eps=0)


def test_cycle_names_a_fold_being_labelled_now_as_busy_not_as_unlabelled(tmp_path, one_intraop_thread):
    """cycle's first stage-0 check asks only for the fold's folder: a fold whose pretrain-random is running (its
    folder and lock there, no pseudo0.pt yet) is named as busy by the fold lock, not as a fold without labels."""
    from typer.testing import CliRunner

    from cyclereg.training.api import fold_locks
    from cyclereg_cli.main import app
    from test_session_mends_2_contracts import _tiny_labelled_run

    ds, run = _tiny_labelled_run(tmp_path)
    (run / "fold2").mkdir()
    with fold_locks(run, [2]):  # another command labelling fold 2 now
        res = CliRunner().invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "2", "--device", "cpu"])
    assert res.exit_code != 0
    assert "another cyclereg command (pretrain-random or cycle) is working on" in res.output, res.output
    assert "no stage-0 pseudo labels" not in res.output


def test_run_model_set_export_returns_files_that_exist_for_an_output_with_dotdot(tmp_path):
    from test_session_mends_4_contracts import _fake_run, load_script

    mod = load_script("scripts/run_model_set.py")
    run = _fake_run(tmp_path / "run")  # both folds sound: the export succeeds
    files = mod.export(run, tmp_path / "new" / "sub" / ".." / "set")
    assert (tmp_path / "new" / "set" / "model_set.json").is_file()
    assert len(files) == 2 and all(p.is_file() for p in files), files


def test_run_model_set_writes_a_set_for_an_output_with_dotdot_at_its_normalised_place(tmp_path, capsys):
    """-o new/sub/../set with new/ missing: the set lands in new/set (what the name means), and nothing else is
    made (no new/sub, no temporary folder left)."""
    from test_session_mends_4_contracts import _fake_run, load_script

    mod = load_script("scripts/run_model_set.py")
    run = _fake_run(tmp_path / "run")
    assert mod.main([str(run), "-o", str(tmp_path / "new" / "sub" / ".." / "set")]) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["set"]
    assert sorted(p.name for p in (tmp_path / "new" / "set").iterdir()) == ["fold1.pt", "fold2.pt", "model_set.json"]
    record = json.loads((tmp_path / "new" / "set" / "model_set.json").read_text())
    assert sorted(record["folds"]) == ["fold1", "fold2"]
