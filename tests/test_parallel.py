"""run_parallel (``cycle --jobs N``): results, errors and dead workers, in real spawned processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import parallel_jobs as jobs
import pytest
import typer

from cyclereg.errors import WorkerError
from cyclereg.training import parallel
from cyclereg.training.parallel import run_parallel
from cyclereg_cli.main import cli_errors


class Recorder:
    """Stands in for rich's Progress in the parent: records what the workers sent."""

    def __init__(self):
        self.tasks, self.printed = {}, []
        self.console = self

    def add_task(self, description, total=None, completed=0):
        self.tasks[len(self.tasks)] = [description, completed]
        return len(self.tasks) - 1

    def update(self, task, advance=None, description=None, completed=None):
        self.tasks[task][1] += advance or 0

    def remove_task(self, task):
        del self.tasks[task]

    def print(self, text, soft_wrap=False):  # rich's Console.print keyword the workers forward
        self.printed.append(text)


def test_every_result_arrives_with_more_jobs_than_workers():
    got, progress = [], Recorder()
    run_parallel(((jobs.square, (x,), f"job {x}") for x in range(3)), 2, progress, 1, got.append)
    assert sorted(got) == [0, 1, 4]
    assert sorted(progress.printed) == [f"job {x}: squared {x}" for x in range(3)]
    assert sorted(d for d, _ in progress.tasks.values()) == [f"job {x}: square" for x in range(3)]
    assert all(done == 1 for _, done in progress.tasks.values())


class SlowRecorder(Recorder):
    """A display that takes ``delay_s`` per printed line (a loaded machine, a slow terminal)."""

    def __init__(self, delay_s):
        super().__init__()
        self.delay_s = delay_s

    def print(self, text, soft_wrap=False):
        time.sleep(self.delay_s)
        super().print(text, soft_wrap)


def test_a_slow_display_still_shows_every_line_after_a_normal_end(monkeypatch):
    """The workers are done long before the parent has shown their lines: after a normal end
    the parent shows all of them, not only what fits into the grace meant for failures."""
    monkeypatch.setattr(parallel, "DRAIN_GRACE_S", 0.2)
    progress = SlowRecorder(0.1)
    run_parallel([(jobs.chatty, (30,), "fold 1")], 1, progress, 1, lambda r: None)
    assert progress.printed == [f"fold 1: line {i}" for i in range(30)]


def test_the_last_worker_takes_over_the_threads_of_finished_ones():
    """Two workers share a budget of 4 threads (2 each); when the quick job is done and no job
    is left to start, the remaining worker moves to all 4 at its next progress call."""
    got = []
    run_parallel([(jobs.threads_until, (4,), "fold 1"), (jobs.threads_now, (), "fold 2")], 2, Recorder(), 2,
                 got.append, total_threads=4)
    assert 2 in got  # the quick job ran with its share
    assert (2, 4) in got


def test_without_a_budget_every_worker_keeps_its_threads():
    got = []
    run_parallel([(jobs.threads_now, (), f"fold {k}") for k in range(3)], 2, Recorder(), 1, got.append)
    assert got == [1, 1, 1]


def test_a_job_error_is_re_raised_as_itself():
    with pytest.raises(KeyError, match="no such fold"):
        run_parallel([(jobs.fails, (), "fold 1")], 1, Recorder(), 1, lambda r: None)


def test_a_killed_worker_is_reported_and_stops_the_others(tmp_path):
    """A worker killed by the OS (no result ever comes) must not leave the parent waiting, and
    the other workers are terminated."""
    marker = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"fold 2: the worker process ended \(killed by SIGKILL"):
        run_parallel([(jobs.sleeps, (str(marker),), "fold 1"), (jobs.killed, (str(marker),), "fold 2")], 2,
                     Recorder(), 1, lambda r: None)
    assert time.monotonic() - t0 < 50
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_cli_turns_a_dead_worker_into_one_line_and_exit_1(capsys):
    @cli_errors
    def command():
        raise WorkerError("fold 2: the worker process ended (killed by SIGKILL, perhaps out of memory) without a result")

    with pytest.raises(typer.Exit) as exit_info:
        command()
    assert exit_info.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fold 2: the worker process ended" in err


def test_a_worker_that_exits_without_a_result_is_reported(monkeypatch):
    monkeypatch.setattr(parallel, "RESULT_GRACE_S", 0.5)
    with pytest.raises(WorkerError, match=r"fold 3: the worker process ended \(it exited normally\) without a result"):
        run_parallel([(jobs.exits, (), "fold 3")], 1, Recorder(), 1, lambda r: None)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for an init that reaps late counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@pytest.mark.parametrize("sig,job", [(signal.SIGTERM, "reports"), (signal.SIGKILL, "reports"),
                                     pytest.param(signal.SIGKILL, "sleeps", marks=pytest.mark.skipif(
                                         not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's"))],
                         ids=["SIGTERM", "SIGKILL", "SIGKILL-no-progress-calls"])
def test_no_worker_outlives_a_killed_parent(tmp_path, sig, job):
    """`kill` of `cycle --jobs N` terminates its workers (SIGTERM leaves through the cleanup);
    after `kill -9` each worker stops instead of training on as an orphan that a re-run would race:
    on Linux the kernel sends it SIGTERM at once, even in the middle of a long step without
    progress calls (``sleeps``)."""
    marker = tmp_path / "pid"
    here = Path(__file__).parent
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import sys; sys.path.insert(0, {str(here)!r}); import parallel_jobs; "
                               f"parallel_jobs.drive({str(marker)!r}, {job!r})"])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = int(marker.read_text())
        assert _alive(worker)
        parent.send_signal(sig)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker)
    finally:
        parent.kill()


def test_a_worker_whose_parent_died_while_it_started_stops_at_its_first_progress_call():
    """The parent's pid comes from the parent: a worker that started after its parent died (its
    ppid already init's) does not take init for its parent and train on."""
    import queue as queue_mod

    from cyclereg.training.parallel import ORPHAN_EXIT_CODE, QueueProgress

    gone = QueueProgress(queue_mod.Queue(), parent=os.getppid() + 10_000_000)  # no such process is our parent
    for call in (lambda: gone.add_task("x"), lambda: gone.update(1, advance=1), lambda: gone.remove_task(1)):
        with pytest.raises(SystemExit) as exc:
            call()
        assert exc.value.code == ORPHAN_EXIT_CODE
    alive = QueueProgress(queue_mod.Queue(), parent=os.getppid())
    assert alive.add_task("x") == 1


def test_a_sigterm_during_parallel_folds_stays_ignored_for_the_rest_of_the_exit(tmp_path):
    """The first SIGTERM while folds run in parallel leaves through run_parallel's cleanup (SystemExit 143,
    workers stopped), and SIGTERM stays ignored afterwards, as sigterm_exit promises: run_parallel must not put
    the handler back, or a repeat (one per dying thread of a parent killed with kill -9) interrupts the exit."""
    import threading

    from cyclereg.interrupts import exit_on_sigterm

    marker = tmp_path / "pid"

    def send_sigterm_once_started():
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = exit_on_sigterm()  # as the CLI does
    try:
        threading.Thread(target=send_sigterm_once_started, daemon=True).start()
        with pytest.raises(SystemExit) as exc:
            run_parallel([(jobs.sleeps, (str(marker),), "fold 1")], 1, Recorder(), 1, lambda r: None)
        assert exc.value.code == 143
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        signal.raise_signal(signal.SIGTERM)  # ignored: no second SystemExit
        with pytest.raises(ProcessLookupError):
            os.kill(int(marker.read_text()), 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
