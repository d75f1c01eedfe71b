"""Module-level jobs for tests/test_parallel.py (spawned workers import them by name)."""

from __future__ import annotations

import os
import signal
import time


def square(x: int, *, progress) -> int:
    task = progress.add_task("square", total=1)
    progress.advance(task)
    progress.console.print(f"squared {x}")
    return x * x


def killed(wait_for: str, *, progress) -> None:
    """Once ``wait_for`` exists, dies the way the OS kills a process that ran out of memory."""
    deadline = time.monotonic() + 30
    while not os.path.exists(wait_for) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def fails(*, progress) -> None:
    raise KeyError("no such fold")


def sleeps(path: str, *, progress) -> None:
    """Marks that it started, then outlives any test unless terminated."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)
    time.sleep(60)


def exits(*, progress) -> None:
    """Leaves the process normally without returning a result."""
    raise SystemExit(0)


def threads_now(*, progress) -> int:
    """Returns at once with the worker's intra-op thread count."""
    import torch

    progress.add_task("threads", total=1)
    return torch.get_num_threads()


def threads_until(wanted: int, *, progress) -> tuple[int, int]:
    """Keeps reporting progress until the worker runs ``wanted`` intra-op threads (or 30 s
    pass); returns the counts at the start and at the end."""
    import torch

    first = torch.get_num_threads()  # before the first progress call, which may already take over freed threads
    task = progress.add_task("wait", total=None)
    deadline = time.monotonic() + 30
    while torch.get_num_threads() != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
        progress.advance(task)
    return first, torch.get_num_threads()


def reports(path: str, *, progress) -> None:
    """Writes its pid to ``path``, then reports progress every 50 ms for up to 60 s."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)
    task = progress.add_task("reports", total=None)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
        progress.advance(task)


class _Silent:
    def __init__(self):
        self.console = self

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def remove_task(self, *a, **k):
        pass

    def print(self, *a, **k):
        pass


def drive(path: str, job: str = "reports") -> None:
    """Parent side for a test that kills the parent: one worker running :func:`reports` (or
    :func:`sleeps`, which makes no progress call)."""
    from cyclereg.training.parallel import run_parallel

    run_parallel([({"reports": reports, "sleeps": sleeps}[job], (path,), "fold 1")], 1, _Silent(), 1,
                 lambda r: None)


def chatty(lines: int, *, progress) -> int:
    """Prints ``lines`` lines at once, then returns."""
    for i in range(lines):
        progress.console.print(f"line {i}")
    return lines
