"""Several cross-validation folds at once, in worker processes (``cyclereg cycle --jobs N``,
``cyclereg pretrain-random --jobs N``).

Each worker trains whole folds with the ordinary :class:`~cyclereg.training.scheduler.StageScheduler`;
its progress-bar calls travel through a queue to the parent, which shows them on its own rich
display (prefixed with the fold), so a parallel run looks like a sequential one. Workers are
spawned (not forked), one per fold, and each gets ``threads`` intra-op threads. Given a thread
budget (``total_threads``), the workers still running take over the threads of those that have
finished once no job is left to start (the last fold of a 5-fold run on 2 workers trains on both
cores instead of one); a worker picks up its new count at its next progress call. Ctrl-C, SIGTERM
to the parent, an error in one fold, or a worker that dies (e.g. killed by the OS for memory) stops
all workers; a worker whose parent is gone (``kill -9`` of the command) gets SIGTERM from the
kernel at once on Linux (``PR_SET_PDEATHSIG``), elsewhere stops at its next progress call, instead of
training on as an orphan. Their mid-stage snapshots make the same command resume every fold.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable

from cyclereg.errors import WorkerError, whole_number
from cyclereg.interrupts import exit_on_sigterm, sigterm_exit

ORPHAN_EXIT_CODE = 129
"""Exit status of a worker that noticed its parent had died."""

PR_SET_PDEATHSIG = 1
"""Linux ``prctl`` option: the signal a process gets when its parent dies."""

RESULT_GRACE_S = 10.0
"""How long a worker that exited normally may take to deliver its result through the queue
before it counts as having died without one (e.g. an unpicklable result)."""

DRAIN_GRACE_S = 5.0
"""After a failure (a job's error, a dead worker, Ctrl-C), how long the parent goes on showing
the progress calls still queued (a killed worker may have left half a message). After a normal
end every queued call is shown, however long the display takes."""


class LabelledProgress:
    """``progress`` seen through ``label``: task descriptions and console lines get ``"{label}: "``
    in front, so that folds are told apart on the display and in a log file alike, whether they
    run in turn (around the real display) or in workers (around a :class:`QueueProgress`).
    Offers the calls the training code makes (``add_task``, ``update``, ``advance``,
    ``remove_task``, ``console.print``)."""

    def __init__(self, progress, label: str):
        self._progress = progress
        self._label = label
        self.console = self

    def add_task(self, description: str, *args, **kw) -> int:
        return self._progress.add_task(f"{self._label}: {description}", *args, **kw)

    def update(self, task: int, *, description: str | None = None, **kw) -> None:
        if description is not None:
            kw["description"] = f"{self._label}: {description}"
        self._progress.update(task, **kw)

    def advance(self, task: int, advance: float = 1) -> None:
        self._progress.advance(task, advance)

    def remove_task(self, task: int) -> None:
        self._progress.remove_task(task)

    def print(self, *objects, **kw) -> None:
        self._progress.console.print(f"{self._label}:", *objects, **kw)


class QueueProgress:
    """Stand-in for :class:`rich.progress.Progress` inside a worker: forwards the calls the
    training code makes (``add_task``, ``update``, ``advance``, ``remove_task``,
    ``console.print``) to the parent through ``q``; task ids are unique per worker process.
    The worker's label is put on by a :class:`LabelledProgress` around it."""

    def __init__(self, q, threads=None, parent: int | None = None):
        self._q = q
        self._next = 0
        self._threads = threads  # shared int: this worker's intra-op threads (None: fixed)
        # the parent's pid as the parent gave it: one read here could already be init's, had the
        # parent died while this worker was still importing
        self._parent = os.getppid() if parent is None else parent
        self.console = _QueueConsole(q)

    def _follow_parent(self) -> None:
        """Between two steps of the job: leave if the parent is gone (an orphan would train on,
        unseen, and race a re-run of the command for the same files), else adopt the thread
        count the parent last published (no parallel region is running here)."""
        if os.getppid() != self._parent:
            sys.exit(ORPHAN_EXIT_CODE)
        if self._threads is None:
            return
        import torch

        wanted = self._threads.value
        if wanted > 0 and wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)

    def _key(self, task: int) -> tuple[int, int]:
        return (os.getpid(), task)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_kw) -> int:
        self._follow_parent()
        self._next += 1
        self._q.put(("add", self._key(self._next), description, total, completed))
        return self._next

    def update(self, task: int, *, advance: float | None = None, description: str | None = None,
               completed: float | None = None, **_kw) -> None:
        self._follow_parent()
        self._q.put(("update", self._key(task), advance, description, completed))

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def remove_task(self, task: int) -> None:
        self._follow_parent()  # e.g. at the end of a stage, before its checkpoint is written
        self._q.put(("remove", self._key(task)))


class _QueueConsole:
    def __init__(self, q):
        self._q = q

    def print(self, *objects: Any, soft_wrap: bool = False, **_kw) -> None:
        self._q.put(("print", " ".join(str(o) for o in objects), soft_wrap))


def _drain(q, progress, stop: threading.Event) -> None:
    """Parent side: apply the workers' progress calls to the real display until ``stop``."""
    ids: dict = {}
    while not (stop.is_set() and q.empty()):
        try:
            msg = q.get(timeout=0.1)
        except queue.Empty:
            continue
        except (EOFError, OSError):  # the queue went away with a terminated worker
            return
        kind, rest = msg[0], msg[1:]
        if kind == "add":
            key, description, total, completed = rest
            ids[key] = progress.add_task(description, total=total, completed=completed)
        elif kind == "update" and rest[0] in ids:
            key, advance, description, completed = rest
            kw = {k: v for k, v in (("advance", advance), ("description", description), ("completed", completed))
                  if v is not None}
            progress.update(ids[key], **kw)
        elif kind == "remove" and rest[0] in ids:
            progress.remove_task(ids.pop(rest[0]))
        elif kind == "print":
            text, soft_wrap = rest
            progress.console.print(text, soft_wrap=soft_wrap)


def _init_worker(threads: int, parent: int) -> None:
    # terminate() sends SIGTERM: leave through Python so that atomic writes remove their temp files
    signal.signal(signal.SIGTERM, sigterm_exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent, which terminates us
    _die_with_parent(parent)
    import torch

    torch.set_num_threads(threads)


def _die_with_parent(parent: int) -> None:
    """SIGTERM to this process when ``parent`` dies (Linux; elsewhere :class:`QueueProgress` notices
    at the next progress call); exits at once if it has died already."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no libc to call: the progress calls still check
            pass
    if os.getppid() != parent:  # died before the request above took effect
        sys.exit(ORPHAN_EXIT_CODE)


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling (to be re-raised as itself in the parent), else a
    :class:`RuntimeError` carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _worker(q, results, threads: int, index: int, fn: Callable, args: tuple, label: str,
            shared_threads=None, parent: int | None = None) -> None:
    """Body of one worker process (``parent``: the pid of the process that started it): run one
    job and put ``(index, ok, result or exception)``."""
    parent = os.getppid() if parent is None else parent
    _init_worker(threads, parent)
    try:
        out = fn(*args, progress=LabelledProgress(QueueProgress(q, shared_threads, parent), label))
    except Exception as exc:  # SystemExit (SIGTERM from the parent) is not a result
        results.put((index, False, _portable(exc)))
    else:
        results.put((index, True, out))


def _death(label: str, exitcode: int | None) -> WorkerError:
    if exitcode is not None and exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"killed by signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            how += ", perhaps out of memory"
    elif exitcode == 0:
        how = "it exited normally"
    else:
        how = f"exit code {exitcode}"
    return WorkerError(f"{label}: the worker process ended ({how}) without a result; "
                       "run the same command again to resume from its last snapshot")


def share_threads(total_threads: int, active: int, floor: int = 1) -> int:
    """Intra-op threads per worker when ``active`` workers share ``total_threads``: an even
    split, at least ``floor``."""
    return max(floor, total_threads // max(1, active))


def run_parallel(jobs: Iterable[tuple[Callable, tuple, str]], workers: int, progress, threads: int,
                 on_result: Callable[[Any], None], *, total_threads: int | None = None,
                 poll_s: float = 0.2) -> None:
    """Run ``fn(*args, progress=...)`` for every ``(fn, args, label)``, at most ``workers`` at
    once, each in its own spawned process with ``threads`` intra-op threads; ``on_result`` gets
    each job's result as it arrives (in completion order).

    With ``total_threads``, once no job is left to start the remaining workers split that
    budget among themselves (:func:`share_threads`, never below ``threads``); each applies its
    new count at its next progress call. Without it every worker keeps ``threads``.

    ``fn`` and ``args`` are pickled (``fn`` must be module-level). The first exception raised by
    a job is re-raised here; a worker that dies without a result (killed by the OS, a crash in
    native code) raises :class:`~cyclereg.errors.WorkerError` naming its label. Either, or
    Ctrl-C, first terminates all other workers."""
    if not whole_number(workers) or workers < 1:
        raise ValueError(f"workers: expected a whole number of at least 1, got {workers!r}")  # 0 waited forever
    pending = list(enumerate(jobs))
    ctx = mp.get_context("spawn")
    q, results = ctx.Queue(), ctx.Queue()
    shared = None if total_threads is None else ctx.Value("i", threads, lock=False)
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(q, progress, stop), daemon=True)
    drainer.start()
    running: dict[int, tuple[Any, str]] = {}
    exited: dict[int, float] = {}  # job -> when its worker was first seen gone (exit code 0)
    # SIGTERM to the parent runs the cleanup below: where nobody handles it yet (a library caller's own
    # handler, or the CLI's sigterm_exit, is left in place and runs instead)
    on_main = threading.current_thread() is threading.main_thread()
    old_term = exit_on_sigterm() if on_main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else None
    finished = False
    try:
        while pending or running:
            while pending and len(running) < workers:
                index, (fn, args, label) = pending.pop(0)
                proc = ctx.Process(target=_worker, args=(q, results, threads, index, fn, args, label, shared,
                                                         os.getpid()),
                                   name=f"cyclereg {label}", daemon=True)
                # the worker starts with Ctrl-C ignored (inherited through exec), so that a Ctrl-C while it is
                # still importing does not print its traceback; the parent handles Ctrl-C and stops it
                main = threading.current_thread() is threading.main_thread()  # signal.signal works there only
                previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
                try:
                    proc.start()
                finally:
                    if main:
                        signal.signal(signal.SIGINT, previous)
                running[index] = (proc, label)
            try:
                index, ok, payload = results.get(timeout=poll_s)
            except queue.Empty:
                now = time.monotonic()
                for i, (proc, label) in running.items():
                    # a worker that returned normally has put its result before exiting (it may
                    # still be in the pipe); one that ended otherwise never will
                    if proc.exitcode is None:
                        continue
                    if proc.exitcode != 0 or now - exited.setdefault(i, now) > RESULT_GRACE_S:
                        raise _death(label, proc.exitcode) from None
                continue
            proc, _ = running.pop(index)
            proc.join()
            if not ok:
                raise payload
            if shared is not None and not pending and running:
                shared.value = share_threads(total_threads, len(running), floor=threads)
            on_result(payload)
        finished = True  # every worker exited normally: its queued calls are whole messages
    finally:
        for proc, _ in running.values():
            if proc.is_alive():
                proc.terminate()
        for proc, _ in running.values():
            proc.join()
        stop.set()
        drainer.join(timeout=None if finished else DRAIN_GRACE_S)
        if old_term is not None:  # the default again, as the caller had it (also after a SIGTERM)
            signal.signal(signal.SIGTERM, old_term)

