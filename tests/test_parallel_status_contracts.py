"""Contracts of ``cycle --jobs N`` (:mod:`cyclereg.training.parallel`) and of ``cyclereg status``
(:mod:`cyclereg.training.status`) that the other tests leave open or pin only through slow
end-to-end runs (found by a mutation audit, 2026-12-07).

``run_parallel`` is driven here in this process: a stand-in for the ``spawn`` context runs each
"worker" in a thread (its ``_init_worker`` recorded, not run), so that the scheduling, the thread
budget, the error and dead-worker paths and the signal handling of the parent are checked in
milliseconds; tests/test_parallel.py runs the same function with real spawned processes. The
status tests feed :func:`show_run_status` a hand-made :func:`run_status` result. Each test runs
well under a second.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import signal
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import cyclereg.training.api  # noqa: F401 - imported here, not inside the first status test's time
from cyclereg.errors import InputError, WorkerError
from cyclereg.training import parallel
from cyclereg.training.parallel import LabelledProgress, QueueProgress, run_parallel, share_threads


class Recorder:
    """Stands in for rich's Progress: records every call it gets, with its keywords."""

    def __init__(self):
        self.calls, self.printed = [], []
        self.console = self
        self._next = 100

    def add_task(self, description, **kw):
        self._next += 1
        self.calls.append(("add", self._next, description, kw))
        return self._next

    def update(self, task, **kw):
        self.calls.append(("update", task, kw))

    def advance(self, task, advance=1):
        self.calls.append(("advance", task, advance))

    def remove_task(self, task):
        self.calls.append(("remove", task))

    def print(self, *objects, **kw):
        self.printed.append((objects, kw))


# ----------------------------------------------------------------------------- a spawn context in threads
class _ThreadProcess:
    """A "worker process" that runs ``target`` in a thread of this process; ``SystemExit(code)``
    from the job sets ``exitcode`` as a process's exit would (``-9``: killed by SIGKILL)."""

    def __init__(self, ctx, target, args, name, daemon):
        self.ctx, self.target, self.args, self.name = ctx, target, list(args), name
        self.exitcode = None
        self.terminated = False
        self._thread = None

    def start(self):
        ctx = self.ctx
        ctx.sigint_at_start.append(signal.getsignal(signal.SIGINT))
        ctx.parents.append(self.args[-1])  # the parent pid run_parallel hands the worker
        args = self.args[:-1] + [os.getppid()]  # a thread's "parent" is this process's parent
        ctx.live_at_start.append(sum(p.exitcode is None for p in ctx.started))
        ctx.started.append(self)

        def body():
            code = 0
            try:
                self.target(*args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            self.exitcode = code

        self._thread = threading.Thread(target=body, daemon=True)
        self._thread.start()

    def is_alive(self):
        return self.exitcode is None

    def terminate(self):
        self.terminated = True
        self.ctx.stop.set()

    def join(self, timeout=None):
        self._thread.join(5.0 if timeout is None else timeout)


class _LateQueue(queue.Queue):
    """A results queue whose items arrive ``delay_s`` after they were put (a result still in the pipe)."""

    def __init__(self, delay_s):
        super().__init__()
        self.delay_s = delay_s

    def put(self, item, *a, **k):
        timer = threading.Timer(self.delay_s, super().put, (item,))
        timer.daemon = True
        timer.start()


class _ThreadContext:
    def __init__(self, result_delay_s=None):
        self.started, self.parents, self.sigint_at_start, self.live_at_start = [], [], [], []
        self.methods, self.values = [], []
        self.stop = threading.Event()  # set by terminate(): blocking jobs leave
        self._queues = 0
        self.result_delay_s = result_delay_s

    def Queue(self):  # noqa: N802 - as multiprocessing names it
        self._queues += 1  # run_parallel makes the progress queue first, then the results queue
        late = self._queues == 2 and self.result_delay_s is not None
        return _LateQueue(self.result_delay_s) if late else queue.Queue()

    def Process(self, target, args, name, daemon):  # noqa: N802
        return _ThreadProcess(self, target, args, name, daemon)

    def Value(self, typecode, value, lock=True):  # noqa: N802
        shared = SimpleNamespace(value=value, typecode=typecode)
        self.values.append(shared)
        return shared


@pytest.fixture
def threaded(monkeypatch):
    """run_parallel's workers as threads of this process; ``ctx.inits`` records each worker's
    ``_init_worker(threads, parent)``; torch's thread count is put back afterwards."""
    ctx = _ThreadContext()
    ctx.inits = []

    def get_context(method):
        ctx.methods.append(method)
        return ctx

    monkeypatch.setattr(parallel, "mp", SimpleNamespace(get_context=get_context))
    monkeypatch.setattr(parallel, "_init_worker", lambda threads, parent: ctx.inits.append((threads, parent)))
    before = torch.get_num_threads()
    main = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main else None
    yield ctx
    ctx.stop.set()
    for p in ctx.started:
        p.join()
    torch.set_num_threads(before)
    if main:
        signal.signal(signal.SIGINT, sigint)  # whatever run_parallel left there


def _returns(value, delay_s=0.0):
    def job(*, progress):
        time.sleep(delay_s)
        return value

    return job


def _waits(event: threading.Event, value, ctx):
    """Returns ``value`` once ``event`` is set (or leaves when the worker is terminated)."""

    def job(*, progress):
        deadline = time.monotonic() + 5
        while not event.is_set() and not ctx.stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        return value

    return job


def test_workers_are_spawned_with_the_given_threads_and_this_process_as_parent(threaded):
    """Spawned (never forked: torch's threads do not survive a fork), each worker initialised with the
    ``threads`` given and with the pid of the process that started it (its orphan check compares with it)."""
    got = []
    run_parallel([(_returns(k), (), f"fold {k}") for k in (1, 2, 3)], 2, Recorder(), 3, got.append)
    assert threaded.methods == ["spawn"]
    assert threaded.inits == [(3, os.getppid())] * 3  # our stand-in hands the thread its real parent
    assert threaded.parents == [os.getpid()] * 3
    assert sorted(got) == [1, 2, 3]


def test_at_most_workers_jobs_run_at_once_and_jobs_start_in_the_order_given(threaded):
    got = []
    jobs = [(_returns(k, delay_s=0.05), (), f"fold {k}") for k in range(1, 6)]
    run_parallel(jobs, 2, Recorder(), 1, got.append)
    assert max(threaded.live_at_start) + 1 == 2  # two at once, never three
    assert [p.name for p in threaded.started] == [f"cyclereg fold {k}" for k in range(1, 6)]
    assert sorted(got) == [1, 2, 3, 4, 5]


def test_one_worker_runs_the_jobs_in_turn_and_hands_results_in_their_order(threaded):
    got = []
    run_parallel([(_returns(k), (), f"fold {k}") for k in (3, 1, 2)], 1, Recorder(), 1, got.append)
    assert got == [3, 1, 2] and max(threaded.live_at_start) == 0


def test_results_arrive_in_completion_order(threaded):
    """``on_result`` gets each result as it arrives: the quick second job before the slow first one."""
    got = []
    slow = threading.Event()
    run_parallel([(_waits(slow, "slow", threaded), (), "fold 1"), (_returns("quick"), (), "fold 2")], 2,
                 Recorder(), 1, lambda r: (got.append(r), slow.set()))
    assert got == ["quick", "slow"]


def test_the_thread_budget_goes_to_running_workers_only_once_no_job_is_left(threaded):
    """Three jobs on two workers, 1 thread each out of a budget of 2: when the first ends, the third is
    still to start, so the running one keeps 1 thread; when the third ends (nothing left to start,
    one worker running) that worker is given the whole budget of 2."""
    seen = {}
    release_b, release_c = threading.Event(), threading.Event()

    def on_result(r):
        seen[r] = threaded.values[0].value  # published before on_result is called
        (release_c if r == "a" else release_b).set()

    run_parallel([(_returns("a"), (), "fold 1"), (_waits(release_b, "b", threaded), (), "fold 2"),
                  (_waits(release_c, "c", threaded), (), "fold 3")], 2, Recorder(), 1, on_result, total_threads=2)
    assert threaded.values[0].typecode == "i"
    assert seen == {"a": 1, "c": 2, "b": 2}


def test_the_thread_budget_never_gives_a_worker_fewer_threads_than_it_started_with(threaded):
    """2 threads per worker, a budget of 3 and two workers left: 3 // 2 = 1 would be fewer than the
    worker has, so it keeps 2 (the docstring's "never below ``threads``")."""
    seen = {}
    go = threading.Event()

    def on_result(r):
        seen[r] = threaded.values[0].value
        go.set()

    def first(*, progress):
        seen["start"] = threaded.values[0].value  # what a worker adopts at its first progress call
        return "a"

    run_parallel([(first, (), "fold 1"), (_waits(go, "b", threaded), (), "fold 2"),
                  (_waits(go, "c", threaded), (), "fold 3")], 3, Recorder(), 2, on_result, total_threads=3)
    assert seen["start"] == 2 and seen["a"] == 2
    assert threaded.values[0].value == 3  # then one worker left: the whole budget


def test_without_a_budget_no_thread_count_is_shared(threaded):
    run_parallel([(_returns(k), (), f"fold {k}") for k in (1, 2)], 2, Recorder(), 1, lambda r: None)
    assert threaded.values == []


def test_a_job_error_is_re_raised_and_the_other_workers_are_terminated(threaded):
    got = []
    never = threading.Event()

    def fails(*, progress):
        time.sleep(0.02)
        raise KeyError("fold 2 broke")

    with pytest.raises(KeyError, match="fold 2 broke"):
        run_parallel([(_waits(never, "slow", threaded), (), "fold 1"), (fails, (), "fold 2"),
                      (_returns("third"), (), "fold 3")], 2, Recorder(), 1, got.append)
    first = threaded.started[0]
    assert first.terminated and got == [] and len(threaded.started) == 2  # fold 3 never started


@pytest.mark.parametrize("code,how", [(-9, "killed by SIGKILL, perhaps out of memory"), (-15, "killed by SIGTERM"),
                                      (3, "exit code 3")])
def test_a_worker_that_dies_is_reported_at_once_naming_its_fold(threaded, monkeypatch, code, how):
    """A worker that ended with a non-zero status (killed by a signal: a negative one) will never send a
    result: reported at the next poll, not after the grace meant for a result still in the pipe."""
    monkeypatch.setattr(parallel, "RESULT_GRACE_S", 4.0)

    def dies(*, progress):
        raise SystemExit(code)

    never = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as exc:  # fold 1, still running, neither hides it nor outlives it
        run_parallel([(_waits(never, "slow", threaded), (), "fold 1"), (dies, (), "fold 4")], 2, Recorder(), 1,
                     lambda r: None, poll_s=0.02)
    assert time.monotonic() - t0 < 3.5 and threaded.started[0].terminated
    assert str(exc.value) == (f"fold 4: the worker process ended ({how}) without a result; run the same command "
                              "again to resume from its last snapshot")


def test_a_result_still_in_the_pipe_after_a_normal_exit_is_waited_for(monkeypatch):
    """A worker puts its result before it exits: seen gone with exit code 0 and no result yet, it gets
    ``RESULT_GRACE_S`` for the result to come through, and the run ends normally."""
    ctx = _ThreadContext(result_delay_s=0.3)
    ctx.inits = []
    monkeypatch.setattr(parallel, "mp", SimpleNamespace(get_context=lambda method: ctx))
    monkeypatch.setattr(parallel, "_init_worker", lambda threads, parent: None)
    got = []
    run_parallel([(_returns("late"), (), "fold 1")], 1, Recorder(), 1, got.append, poll_s=0.02)
    assert got == ["late"]


def test_a_worker_that_exits_normally_without_a_result_is_reported_after_the_grace(threaded, monkeypatch):
    monkeypatch.setattr(parallel, "RESULT_GRACE_S", 0.3)

    def leaves(*, progress):
        raise SystemExit(0)

    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"^fold 5: the worker process ended \(it exited normally\) without"):
        run_parallel([(leaves, (), "fold 5")], 1, Recorder(), 1, lambda r: None, poll_s=0.02)
    assert 0.3 <= time.monotonic() - t0 < 5


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread")
def test_ctrl_c_is_ignored_only_while_a_worker_starts(threaded):
    """The worker inherits an ignored Ctrl-C (no traceback from a half-imported worker); the parent's own
    Ctrl-C handler is back right after, and after the run."""
    seen = []

    def handler(signum, frame):  # the parent's own handler (the fixture puts back the one before)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    run_parallel([(_returns(k), (), f"fold {k}") for k in (1, 2)], 1, Recorder(), 1,
                 lambda r: seen.append(signal.getsignal(signal.SIGINT)))
    assert threaded.sigint_at_start == [signal.SIG_IGN, signal.SIG_IGN]
    assert seen == [handler, handler] and signal.getsignal(signal.SIGINT) is handler


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread")
def test_the_sigterm_handler_is_put_back_after_a_normal_run(threaded):
    from cyclereg.interrupts import sigterm_exit

    seen = []

    def job(*, progress):
        return 1

    before = signal.getsignal(signal.SIGTERM)
    run_parallel([(job, (), "fold 1")], 1, Recorder(), 1,
                 lambda r: seen.append(signal.getsignal(signal.SIGTERM)))
    assert seen == [sigterm_exit]  # during the run: SIGTERM leaves through the cleanup
    assert signal.getsignal(signal.SIGTERM) is before


def test_worker_progress_reaches_the_parent_display_with_the_fold_label(threaded):
    """A worker's progress calls, through the queue, on the parent's display: prefixed with the fold,
    each fold's task ids kept apart."""

    def job(*, progress):
        t = progress.add_task("stage 1: training", total=4, completed=1)
        progress.update(t, advance=2, description="stage 1: training (loss 3.00 mm)")
        progress.advance(t, 1)
        progress.console.print("stage 1 done")
        progress.remove_task(t)
        return 0

    display = Recorder()
    run_parallel([(job, (), "fold 7")], 1, display, 1, lambda r: None)
    assert display.calls == [("add", 101, "fold 7: stage 1: training", {"total": 4, "completed": 1}),
                             ("update", 101, {"advance": 2, "description": "fold 7: stage 1: training (loss 3.00 mm)"}),
                             ("update", 101, {"advance": 1}),
                             ("remove", 101)]
    assert display.printed == [(("fold 7: stage 1 done",), {"soft_wrap": False})]


# ----------------------------------------------------------------------------- the worker side
def test_queue_progress_sends_each_call_keyed_by_process_and_task():
    q = queue.Queue()
    p = QueueProgress(q, parent=os.getppid())
    assert p.add_task("a", total=5) == 1 and p.add_task("b", completed=2) == 2
    p.update(1, advance=0.5, description="a2", completed=3)
    p.advance(2, 4)
    p.remove_task(1)
    p.console.print("x", 3, soft_wrap=True)
    pid = os.getpid()
    assert [q.get_nowait() for _ in range(6)] == [
        ("add", (pid, 1), "a", 5, 0), ("add", (pid, 2), "b", None, 2), ("update", (pid, 1), 0.5, "a2", 3),
        ("update", (pid, 2), 4, None, None), ("remove", (pid, 1)), ("print", "x 3", True)]


def test_a_worker_adopts_the_published_thread_count_at_its_next_progress_call():
    before = torch.get_num_threads()
    shared = SimpleNamespace(value=before + 1)
    try:
        p = QueueProgress(queue.Queue(), threads=shared, parent=os.getppid())
        assert torch.get_num_threads() == before  # not before a progress call
        p.add_task("t")
        assert torch.get_num_threads() == before + 1
        shared.value = 0  # nothing published: left as it is
        p.update(1, advance=1)
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_labelled_progress_prefixes_descriptions_and_lines_only():
    shown = Recorder()
    lp = LabelledProgress(shown, "fold 3")
    t = lp.add_task("stage 2: training", total=10, completed=4)
    lp.update(t, advance=1)
    lp.update(t, description="stage 2: training (loss 1.00 mm)", completed=5)
    lp.advance(t, 2)
    lp.remove_task(t)
    lp.console.print("labels saved", soft_wrap=True)
    assert shown.calls == [("add", 101, "fold 3: stage 2: training", {"total": 10, "completed": 4}),
                           ("update", 101, {"advance": 1}),
                           ("update", 101, {"completed": 5, "description": "fold 3: stage 2: training (loss 1.00 mm)"}),
                           ("advance", 101, 2), ("remove", 101)]
    assert shown.printed == [(("fold 3:", "labels saved"), {"soft_wrap": True})]


def test_the_drain_applies_every_queued_call_before_it_stops():
    """After ``stop`` the calls still queued are shown; calls for a task it never saw added are dropped
    without stopping the display; two workers' task 1 stay two tasks."""
    q = queue.Queue()
    for msg in [("add", (11, 1), "fold 1: a", 3, 0), ("add", (12, 1), "fold 2: a", None, 1),
                ("update", (99, 1), 1, None, None), ("remove", (99, 1)),
                ("update", (12, 1), None, "fold 2: b", None), ("update", (11, 1), 2, None, 3),
                ("remove", (11, 1)), ("print", "fold 2: done", True), ("update", (11, 1), 1, None, None)]:
        q.put(msg)
    stop = threading.Event()
    stop.set()
    shown = Recorder()
    parallel._drain(q, shown, stop)
    assert shown.calls == [("add", 101, "fold 1: a", {"total": 3, "completed": 0}),
                           ("add", 102, "fold 2: a", {"total": None, "completed": 1}),
                           ("update", 102, {"description": "fold 2: b"}),
                           ("update", 101, {"advance": 2, "completed": 3}),
                           ("remove", 101)]
    assert shown.printed == [(("fold 2: done",), {"soft_wrap": True})]


def test_the_drain_leaves_when_the_queue_is_gone():
    class Gone:
        def empty(self):
            return False

        def get(self, timeout=None):
            raise EOFError

    done = threading.Event()
    t = threading.Thread(target=lambda: (parallel._drain(Gone(), Recorder(), threading.Event()), done.set()),
                         daemon=True)
    t.start()
    assert done.wait(2.0)


def test_a_worker_runs_its_job_and_puts_index_and_outcome(monkeypatch):
    inits = []
    monkeypatch.setattr(parallel, "_init_worker", lambda threads, parent: inits.append((threads, parent)))
    results = queue.Queue()

    def ok(x, *, progress):
        assert isinstance(progress, LabelledProgress)
        return x + 1

    def bad(*, progress):
        raise ValueError("no landmarks")

    def leaves(*, progress):
        raise SystemExit(143)  # SIGTERM from the parent: not a result

    parallel._worker(queue.Queue(), results, 2, 5, ok, (41,), "fold 1", None, os.getppid())
    parallel._worker(queue.Queue(), results, 2, 6, bad, (), "fold 2")
    with pytest.raises(SystemExit):
        parallel._worker(queue.Queue(), results, 2, 7, leaves, (), "fold 3", None, os.getppid())
    assert inits == [(2, os.getppid())] * 3  # parent defaults to the process's parent
    assert results.get_nowait() == (5, True, 42)
    index, ok_flag, err = results.get_nowait()
    assert (index, ok_flag, type(err), str(err)) == (6, False, ValueError, "no landmarks")
    assert results.empty()


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle")


def test_an_error_crosses_to_the_parent_as_itself_or_as_its_type_and_message():
    err = KeyError("fold 9")
    assert parallel._portable(err) is err
    out = parallel._portable(_Unpicklable("fold exploded"))
    assert type(out) is RuntimeError and str(out) == "_Unpicklable: fold exploded"
    pickle.dumps(out)


@pytest.mark.parametrize("code,how", [(-9, "killed by SIGKILL, perhaps out of memory"), (-15, "killed by SIGTERM"),
                                      (-1, "killed by SIGHUP"),
                                      (-200, "killed by signal 200"), (0, "it exited normally"),
                                      (1, "exit code 1"), (129, "exit code 129")])
def test_a_dead_worker_is_named_with_how_it_ended(code, how):
    err = parallel._death("fold 2", code)
    assert isinstance(err, WorkerError)
    assert str(err) == (f"fold 2: the worker process ended ({how}) without a result; run the same command again "
                        "to resume from its last snapshot")


@pytest.mark.parametrize("total,active,floor,want", [(8, 3, 1, 2), (8, 4, 1, 2), (8, 0, 1, 8), (1, 4, 1, 1),
                                                     (3, 2, 2, 2), (9, 1, 1, 9)])
def test_threads_are_split_evenly_and_never_below_the_floor(total, active, floor, want):
    assert share_threads(total, active, floor=floor) == want


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_asks_the_kernel_for_sigterm_when_its_parent_dies(monkeypatch):
    """``prctl(PR_SET_PDEATHSIG, SIGTERM)``: option 1 of <linux/prctl.h>, signal 15; and a worker whose
    parent is already gone leaves with the orphan's exit status."""
    import ctypes

    calls = []

    class Libc:
        def prctl(self, *args):
            calls.append(args)
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: Libc())
    parallel._die_with_parent(os.getppid())
    assert calls == [(1, int(signal.SIGTERM), 0, 0, 0)]
    with pytest.raises(SystemExit) as exc:
        parallel._die_with_parent(os.getppid() + 10_000_000)
    assert exc.value.code == parallel.ORPHAN_EXIT_CODE == 129


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals: main thread")
def test_a_worker_leaves_on_sigterm_through_python_and_ignores_ctrl_c(monkeypatch):
    from cyclereg.interrupts import sigterm_exit

    seen = {}
    monkeypatch.setattr(parallel, "_die_with_parent", lambda parent: seen.setdefault("parent", parent))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.setdefault("threads", n))
    term, intr = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        parallel._init_worker(3, 4242)
        assert signal.getsignal(signal.SIGTERM) is sigterm_exit
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGINT, intr)
    assert seen == {"parent": 4242, "threads": 3}


# ----------------------------------------------------------------------------- cyclereg status
def _fold(fold, **kw):
    row = {"fold": fold, "finished": 1, "next": "stage 2: training from step 0", "stage_seconds": {},
           "current_stage_s": None, "remaining_s": None, "unlogged_stages": [], "stage_log": {}}
    row.update(kw)
    return row


def _fake_status(monkeypatch, folds, rule=None, calls=None):
    import cyclereg.training.api as training_api

    def run_status(run, stages=None):
        if calls is not None:
            calls.append((run, stages))
        return {"run": str(run), "dataset": "d.json", "kind": "keypoints", "stages": 3 if stages is None else stages,
                "stop_below_mm": rule, "folds": folds}

    monkeypatch.setattr(training_api, "run_status", run_status)


def _rows(text):
    lines = (line.replace("┃", "│") for line in text.splitlines())
    return [[c.strip() for c in line.split("│")[1:-1]] for line in lines if line.startswith("│")]


def _show(tmp_path, **kw):
    from rich.console import Console

    from cyclereg.training.status import show_run_status

    console = Console(record=True, width=250)
    info = show_run_status(tmp_path / "r", console=console, **kw)
    return info, console.export_text()


def test_status_title_names_the_stop_rule_only_where_the_run_has_one(monkeypatch, tmp_path):
    calls = []
    _fake_status(monkeypatch, [_fold(None)], rule=0.25, calls=calls)
    _, text = _show(tmp_path, stages=5)
    said = " ".join(text.split())
    assert calls == [(tmp_path / "r", 5)]
    assert f"{tmp_path / 'r'}: d.json (keypoints), 5 stages at most (a fold stops once its labels move < 0.25 mm)" \
        in said
    assert _rows(text)[1][:3] == ["all", "1", "stage 2: training from step 0"]  # a volume run's one model
    for rule in (None, 0.0):
        _fake_status(monkeypatch, [_fold(1)], rule=rule)
        _, text = _show(tmp_path)
        said = " ".join(text.split())
        assert "at most" not in said and f"{tmp_path / 'r'}: d.json (keypoints), 3 stages" in said


def test_status_names_each_folds_unlogged_stages_as_ranges(monkeypatch, tmp_path, capsys):
    _fake_status(monkeypatch, [_fold(1, unlogged_stages=[1, 2, 3, 5]), _fold(2), _fold(3, unlogged_stages=[4]),
                               _fold(None, unlogged_stages=[0])])
    _show(tmp_path)
    err = [" ".join(line.split()) for line in capsys.readouterr().err.split("note: ")[1:]]
    tail = ("finished but without a readable line in log.jsonl (damaged or removed lines): the time so far and the "
            "history leave them out")
    assert err == [f"fold 1: stages 1-3, 5 {tail}", f"fold 3: stage 4 {tail}", f"the run: stage 0 {tail}"]


def test_status_history_only_with_history_and_json_with_json(monkeypatch, tmp_path):
    folds = [_fold(1, stage_seconds={0: 5.0, 1: 65.0},
                   stage_log={1: {"seconds": 65.0, "train_loss_mm": 1.23456}, 0: {"seconds": 5.0}})]
    _fake_status(monkeypatch, folds)
    _, text = _show(tmp_path)
    assert "finished stages" not in text
    out = tmp_path / "s.json"
    info, text = _show(tmp_path, history=True, json_out=out)
    assert "finished stages (from each fold's log.jsonl)" in text
    assert json.loads(out.read_text()) == json.loads(json.dumps(info))
    assert json.loads(out.read_text())["folds"][0]["stage_seconds"] == {"0": 5.0, "1": 65.0}


def test_status_refuses_a_json_file_inside_the_run_before_reading_it(monkeypatch, tmp_path):
    calls = []
    _fake_status(monkeypatch, [_fold(1)], calls=calls)
    (tmp_path / "r").mkdir()
    with pytest.raises(InputError, match="--json: this would be one of the files of the run directory"):
        _show(tmp_path, json_out=tmp_path / "r" / "run.json")
    assert calls == [] and not (tmp_path / "r" / "run.json").exists()


def test_history_shows_a_column_only_where_a_stage_logged_it_and_stages_in_order():
    from rich.console import Console

    from cyclereg.training.status import history_table

    info = {"folds": [
        _fold(2, stage_log={1: {"seconds": 61.4, "train_loss_mm": 2.0, "pseudo_label_change_mm": 0.5},
                            0: {"seconds": 3.0, "pseudo_label_disagreement_mm": 4.25}}),
        _fold(None, stage_log={0: {"seconds": None, "train_loss_ncc": -0.5, "val_dice": 0.75}})]}
    from cyclereg.console import print_table

    console = Console(record=True, width=250)
    print_table(console, history_table(info))  # as status prints it: "[mm]" is text, not markup
    rows = _rows(console.export_text())
    assert rows[0] == ["fold", "stage", "time", "train loss [mm]", "train loss (ncc)", "label disagreement [mm]",
                       "labels moved [mm]", "val Dice (reporting)"]
    assert rows[1:] == [["2", "0", "0:00:03", "-", "-", "4.250", "-", "-"],
                        ["2", "1", "0:01:01", "2.000", "-", "-", "0.500", "-"],
                        ["all", "0", "-", "-", "-0.500", "-", "-", "0.750"]]


def test_unfinished_folds_lists_the_wanted_folds_not_finished(monkeypatch, tmp_path):
    from cyclereg.training.status import unfinished_folds

    assert unfinished_folds(tmp_path, [1]) == {}  # no run.json: not read at all
    (tmp_path / "run.json").write_text("{}")
    _fake_status(monkeypatch, [_fold(1, next="finished"), _fold(2), _fold(3, next="stage 1: its pseudo labels"),
                               _fold(4, next="finished: labels settled at stage 2 (moved 0.010 mm < 0.1 mm)")])
    assert unfinished_folds(tmp_path, [1, 2, 4]) == {2: "stage 2: training from step 0"}
    assert unfinished_folds(tmp_path, []) == {}

    import cyclereg.training.api as training_api

    def broken(run, stages=None):
        raise InputError("run.json lacks the configuration or the folds", run / "run.json")

    monkeypatch.setattr(training_api, "run_status", broken)
    assert unfinished_folds(tmp_path, [1, 2]) == {}


def test_the_unfinished_note_names_the_fold_the_next_step_and_the_stage(tmp_path):
    from cyclereg.training.status import unfinished_note

    assert unfinished_note("runs/a", 2, "stage 3: training from step 0", 2) == (
        "note: fold 2 of runs/a has not finished training (next: stage 3: training from step 0): its final.pt is "
        "the model of stage 2, not the run's last stage")
    assert unfinished_note("runs/v", None, "stage 1: training after step 5/9", None) == (
        "note: runs/v has not finished training (next: stage 1: training after step 5/9): its final.pt is the "
        "model of stage ?, not the run's last stage")


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_run_parallel_refuses_a_worker_count_below_one_before_starting_anything(workers):
    """workers=0 started nothing and waited forever (the CLI only calls it with --jobs > 1, the library
    function is public): refused at once, naming the argument."""
    from cyclereg.training.parallel import run_parallel

    with pytest.raises(ValueError, match=r"workers: expected a whole number of at least 1"):
        run_parallel([(print, (), "job")], workers, None, 1, lambda r: None)
