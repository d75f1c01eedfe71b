"""Several cross-validation folds at once, in worker processes (``cyclereg cycle --jobs N``).

Each worker trains whole folds with the ordinary :class:`~cyclereg.training.scheduler.StageScheduler`;
its progress-bar calls travel through a queue to the parent, which shows them on its own rich
display (prefixed with the fold), so a parallel run looks like a sequential one. Workers are
spawned (not forked) and each gets ``threads`` intra-op threads. Ctrl-C or an error in one fold
stops all workers; their mid-stage snapshots make the same command resume every fold.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
from typing import Any, Callable, Iterable

_QUEUE = None  # the worker's end of the progress queue (set by _init_worker)


class QueueProgress:
    """Stand-in for :class:`rich.progress.Progress` inside a worker: forwards the calls the
    training code makes (``add_task``, ``update``, ``advance``, ``remove_task``,
    ``console.print``) to the parent through ``q``; task ids are unique per worker process."""

    def __init__(self, q, label: str):
        self._q = q
        self._label = label
        self._next = 0
        self.console = _QueueConsole(q, label)

    def _key(self, task: int) -> tuple[int, int]:
        return (os.getpid(), task)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_kw) -> int:
        self._next += 1
        self._q.put(("add", self._key(self._next), f"{self._label}: {description}", total, completed))
        return self._next

    def update(self, task: int, *, advance: float | None = None, description: str | None = None,
               completed: float | None = None, **_kw) -> None:
        text = None if description is None else f"{self._label}: {description}"
        self._q.put(("update", self._key(task), advance, text, completed))

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def remove_task(self, task: int) -> None:
        self._q.put(("remove", self._key(task)))


class _QueueConsole:
    def __init__(self, q, label: str):
        self._q = q
        self._label = label

    def print(self, *objects: Any, **_kw) -> None:
        self._q.put(("print", f"{self._label}: " + " ".join(str(o) for o in objects)))


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
            progress.console.print(rest[0])


def _init_worker(q, threads: int) -> None:
    global _QUEUE
    import torch

    _QUEUE = q
    torch.set_num_threads(threads)
    # terminate() sends SIGTERM: leave through Python so that atomic writes remove their temp files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent, which terminates us


def _call(job: tuple[Callable, tuple, str]):
    fn, args, label = job
    return fn(*args, progress=QueueProgress(_QUEUE, label))


def run_parallel(jobs: Iterable[tuple[Callable, tuple, str]], workers: int, progress, threads: int,
                 on_result: Callable[[Any], None]) -> None:
    """Run ``fn(*args, progress=...)`` for every ``(fn, args, label)`` in ``workers`` spawned
    processes with ``threads`` intra-op threads each; ``on_result`` gets each job's result as
    it arrives (in completion order).

    ``fn`` and ``args`` are pickled (``fn`` must be module-level). The first exception raised by
    a job (or Ctrl-C) terminates all workers and is re-raised here."""
    jobs = list(jobs)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    stop = threading.Event()
    drainer = threading.Thread(target=_drain, args=(q, progress, stop), daemon=True)
    drainer.start()
    pool = ctx.Pool(processes=min(workers, len(jobs)), initializer=_init_worker, initargs=(q, threads))
    try:
        for result in pool.imap_unordered(_call, jobs):
            on_result(result)
        pool.close()
        pool.join()
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    finally:
        stop.set()
        drainer.join(timeout=5)
