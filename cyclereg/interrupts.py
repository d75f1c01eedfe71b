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
    if _importing(frame):
        retry = threading.Timer(IMPORT_RETRY_S, os.kill, (os.getpid(), signum))
        retry.daemon = True
        retry.start()
        return
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def exit_on_sigterm():
    """Install :func:`sigterm_exit` for SIGTERM; returns the previous handler, or ``None`` off the
    main thread, where signal handlers cannot be set (nothing is installed then)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, sigterm_exit)
