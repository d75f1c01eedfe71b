"""The consoles the commands print with: result tables without hidden digits, and output that survives
the terminal it goes to.

Every rich console of the package comes from :func:`make_console`: when the reader of its stream is gone
(``cyclereg evaluate ... | head -1``), it goes quiet and the command goes on to write its files (rich's
own handler exits 1 at once, dropping a result computed for minutes). The CLI also makes its standard
streams replace characters they cannot encode (:func:`tolerate_unencodable`): a non-ASCII path under an
ASCII locale is printed as ``\\xfc``, not a UnicodeEncodeError after the work is done.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.table import Table


class _GoesQuietOnBrokenPipe(Console):
    def on_broken_pipe(self) -> None:
        """The stream's reader is gone: print nothing more and let the command finish its files. The
        stream's descriptor is pointed at the null device, so that what is still buffered for it (and
        any later writer to it) does not raise again."""
        self.quiet = True
        point_at_null(self.file)


def point_at_null(stream) -> None:
    """Point ``stream``'s descriptor at the null device (its reader is gone): what is still buffered for it,
    and any later write, goes nowhere instead of raising BrokenPipeError again (also at exit). A stream
    without a descriptor (a test's captured output) is left as it is."""
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def make_console(**kwargs) -> Console:
    """A rich :class:`~rich.console.Console` (``kwargs`` as it takes them) that goes quiet instead of
    exiting when its reader is gone (see the module docstring)."""
    return _GoesQuietOnBrokenPipe(**kwargs)


def tolerate_unencodable() -> None:
    """Let ``sys.stdout`` and ``sys.stderr`` write characters their encoding lacks as backslash escapes
    (``PYTHONIOENCODING=ascii``, or the C locale without Python's UTF-8 mode): called by the CLI, whose
    process owns the streams; a library caller keeps its own."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        # strict, or the C locale's surrogateescape (which escapes only undecodable bytes): both raise on "ü"
        if reconfigure is not None and getattr(stream, "errors", None) in ("strict", "surrogateescape"):
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # e.g. a stream already closed: nothing to print to anyway
                pass

#: widest a table is measured at when the output is not a terminal [characters]
MAX_LOG_WIDTH = 400


def print_table(console: Console, table: Table) -> None:
    """Print ``table`` so that no cell ends in an ellipsis and no header loses text.

    Where the output is not a terminal (a log file, a pipe, CI), rich would assume 80 columns;
    the table is printed at its natural width instead (at most :data:`MAX_LOG_WIDTH`). In a
    terminal narrower than the table, a cell's text folds onto further lines. Header strings
    and the title are taken literally (a unit such as "[mm]", a path with brackets, is not rich markup).
    """
    if isinstance(table.title, str):  # a dataset name, a report's or run's path: never markup
        table.title = escape(table.title)
    for column in table.columns:
        column.overflow = "fold"
        if isinstance(column.header, str):
            column.header = escape(column.header)
    if console.is_terminal:
        console.print(table)
        return
    natural = console.measure(table, options=console.options.update_width(MAX_LOG_WIDTH)).maximum
    width = console.width
    console.width = max(width, min(natural, MAX_LOG_WIDTH))  # print(width=...) cannot exceed it
    try:
        console.print(table)
    finally:
        console.width = width


def print_note(text: str, *, quiet: bool = False) -> None:
    """Print ``note: {text}`` on stderr (a remark beside a command's result, never its output),
    taken literally (a path or unit in square brackets is not rich markup) and as one line that
    the terminal, not rich, wraps; nothing with ``quiet``. Where stderr is closed (the stream object, or its
    descriptor) or missing, the note is dropped, as where its reader is gone: a note never stops a command."""
    if sys.stderr is None or getattr(sys.stderr, "closed", False):
        return
    try:
        make_console(stderr=True, quiet=quiet).print(f"note: {escape(text)}", highlight=False, soft_wrap=True)
    except (ValueError, OSError):  # closed meanwhile ("I/O operation on closed file"), or a bad descriptor
        pass


def count(n: int, noun: str) -> str:
    """``"1 pair"``, ``"3 pairs"``: ``n`` and ``noun`` with an ``s`` unless ``n`` is 1."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class Steps:
    """Runs named steps with a rich spinner and prints the time of each (to stderr: stdout holds the
    command's result line only); ``verbose=False``: silent, the times kept in :attr:`timings` (seconds).
    Used where a step can take minutes (a scan's keypoints, a dense registration, a field on a large grid),
    so that the user sees what is going on and what it took."""

    def __init__(self, verbose: bool):
        self.timings: dict[str, float] = {}
        self.console = None
        if verbose:
            self.console = make_console(stderr=True)

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        if self.console is None:
            yield
        else:
            with self.console.status(f"{name} ..."):
                yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        if self.console is not None:
            self.console.print(f"[green]done[/green] {name} [dim]{self.timings[name]:.2f} s[/dim]", soft_wrap=True)
