"""SIGTERM as an orderly exit: ``kill`` of a command (or ``Process.terminate`` of a worker) leaves
through Python like Ctrl-C, so ``finally`` blocks run (atomic writes remove their temporary file,
parallel folds stop their workers) instead of the process ending on the spot."""

from __future__ import annotations

import os
import signal
import threading


IMPORT_RETRY_S = 0.05
"""How long :func:`sigterm_exit` waits to deliver a SIGTERM again that came while a module was being imported [s]."""


def _importing(frame) -> bool:
    """Whether ``frame`` (a signal handler's) runs inside an ``import``: one of its callers is
    importlib's bootstrap, which runs the imported module's code."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def sigterm_exit(signum, frame) -> None:
    """Signal handler: raise ``SystemExit(128 + signum)`` (143 for SIGTERM, the shell's status), once:
    further SIGTERMs are ignored from then on, so that a repeat (a fold worker gets one per dying thread
    of a parent killed with ``kill -9``) cannot interrupt the exit's cleanup with a traceback.

    Not in the middle of an import (a command loads its library lazily, after the handler is installed):
    an exception raised there can be lost in third-party import code (a kill stress test saw exit 1 with
    a ``RecursionError`` from numpy's half-imported modules, and a kill ignored). The signal is sent again
    :data:`IMPORT_RETRY_S` later, until it arrives outside any import."""
    global _PENDING
    if _importing(frame):
        # kept as well: should every re-send land in an import too, raise_pending() stops the command before
        # it writes a result
        _PENDING = signum
        retry = threading.Timer(IMPORT_RETRY_S, os.kill, (os.getpid(), signum))
        retry.daemon = True
        retry.start()
        return
    _stop(signum)


_PENDING: int | None = None
"""A signal :func:`sigterm_exit` deferred because it came during an import, until it is raised."""


def _stop(signum: int):
    global _PENDING
    _PENDING = None
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def raise_pending() -> None:
    """Raise the exit of a SIGTERM that came during an import and has not been raised yet (its re-sends kept
    landing in imports, as in a command that loads its libraries lazily); nothing otherwise. Called before a
    command writes a result (:func:`cyclereg.checkpoint.atomic_write_bytes`) and when it ends, so that a kill
    is never lost to a run that finishes within the re-send interval."""
    global _PENDING
    if _PENDING is None:
        return
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(_PENDING) is not sigterm_exit:
        _PENDING = None  # the handler was replaced since (a caller's own, e.g. a test's): not ours to act on
        return
    _stop(_PENDING)


def ignore_signals_from_now() -> None:
    """Ignore SIGINT and SIGTERM from here on (the main thread only): the command's result is final, and a
    Ctrl-C or kill while Python runs its exit callbacks would only print an 'Exception ignored' traceback."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def exit_on_sigterm():
    """Install :func:`sigterm_exit` for SIGTERM; returns the previous handler, or ``None`` off the
    main thread, where signal handlers cannot be set (nothing is installed then)."""
    global _PENDING
    if threading.current_thread() is not threading.main_thread():
        return None
    _PENDING = None  # a fresh start: nothing deferred from an earlier installation
    return signal.signal(signal.SIGTERM, sigterm_exit)
