"""SIGTERM as an orderly exit: ``kill`` of a command (or ``Process.terminate`` of a worker) leaves
through Python like Ctrl-C, so ``finally`` blocks run (atomic writes remove their temporary file,
parallel folds stop their workers) instead of the process ending on the spot."""

from __future__ import annotations

import signal
import threading


def sigterm_exit(signum, _frame) -> None:
    """Signal handler: raise ``SystemExit(128 + signum)`` (143 for SIGTERM, the shell's status), once:
    further SIGTERMs are ignored from then on, so that a repeat (a fold worker gets one per dying thread
    of a parent killed with ``kill -9``) cannot interrupt the exit's cleanup with a traceback."""
    signal.signal(signum, signal.SIG_IGN)
    raise SystemExit(128 + signum)


def exit_on_sigterm():
    """Install :func:`sigterm_exit` for SIGTERM; returns the previous handler, or ``None`` off the
    main thread, where signal handlers cannot be set (nothing is installed then)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, sigterm_exit)
