"""Error types. :class:`InputError` is what bad user input raises; the CLI turns it into
one line on stderr and exit code 2."""

from __future__ import annotations

import os
from pathlib import Path


class InputError(ValueError):
    """Bad user input (missing/unreadable file, wrong shape, NaN, empty cloud, ...).

    ``str(err)`` is a single line that names the offending file when there is one.
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.message = message
        self.path = None if path is None else Path(path)
        text = message if path is None else f"{path}: {message}"
        super().__init__(" ".join(text.split()))


class WorkerError(RuntimeError):
    """A worker process ended without a result (killed by the OS, a crash in native code).
    ``str(err)`` is a single line naming the job; the CLI exits with code 1."""


def require_file(path: str | Path) -> Path:
    """Return ``path`` as a :class:`Path`, raising :class:`InputError` if it is not a file."""
    p = Path(path)
    if not p.exists():
        raise InputError("file does not exist", p)
    if not p.is_file():
        raise InputError("is not a regular file", p)
    return p


def require_checkpoint_file(path: str | Path) -> Path:
    """:func:`require_file` for a model checkpoint; a missing bare word (no folder, no suffix, e.g. a
    mistyped ``random``) is told how to ask for an untrained network."""
    p = Path(path)
    if not p.exists() and not p.suffix and len(p.parts) == 1:
        raise InputError("no such checkpoint file (for an untrained network, give the model as 'random')", p)
    return require_file(p)


def _require_makeable(folder: Path, output: Path, what: str) -> None:
    """:class:`InputError` naming ``output`` unless ``folder`` exists or can be made (its nearest
    existing ancestor is a folder this process may write in); nothing is created."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot make {what} ({existing} is a file)", output)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write there ({existing}: permission denied)", output)


def require_output_file(path: str | Path) -> Path:
    """Check before any work that ``path`` can be written as a file: not a folder, and its parent
    folder exists or can be made; :class:`InputError` naming it otherwise. Nothing is created here
    (the writers make missing folders), so a later input error leaves no empty folder behind."""
    p = Path(path)
    if p.is_dir():
        raise InputError("is a folder; an output file is needed here", p)
    _require_makeable(p.parent, p, "its folder")
    return p


def require_output_dir(path: str | Path) -> Path:
    """Check before any work that ``path`` can be an output folder: an existing folder, or one that can
    be made (not made here); :class:`InputError` naming it otherwise."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError("exists and is not a folder; an output folder is needed here", p)
    _require_makeable(p, p, "this folder")
    return p


def require_count(flag: str, value: int | None, minimum: int) -> int | None:
    """Return ``value`` (``None`` = not given), raising :class:`InputError` naming ``flag``
    if it is below ``minimum``."""
    if value is not None and value < minimum:
        raise InputError(f"{flag} {value}: need {minimum} or more")
    return value
