"""The ``cyclereg`` console script: imports the CLI inside a guard, so that Ctrl-C while Python is
still loading it (the first second or two) ends with one line and exit 130, as it does later,
instead of a ``KeyboardInterrupt`` traceback from the import machinery."""

from __future__ import annotations

import atexit
import sys

INTERRUPTED = "cyclereg: interrupted"
"""What an interrupt before any work prints (the commands' own handler says more once they run)."""


TERMINATED = "cyclereg: terminated"
"""What a kill (SIGTERM) before any work prints."""


def main() -> None:
    """Run the CLI (:data:`cyclereg_cli.main.app`); an interrupt outside the commands' own handling
    (while importing, while parsing the options) exits 130 with :data:`INTERRUPTED` on stderr, a kill
    there 143 with :data:`TERMINATED`. Once Python runs its exit callbacks, Ctrl-C and kill are ignored: the
    command's result is final, and a signal there would only print a traceback."""
    from cyclereg.interrupts import exit_on_sigterm, ignore_signals_from_now, raise_pending  # light: os, signal

    exit_on_sigterm()  # from the start: a kill while the CLI loads leaves like one a second later
    said = []
    try:
        from cyclereg_cli.main import INTERRUPT_SAID, app

        said = INTERRUPT_SAID
        said.clear()  # this command's lines only (main() called again in one process)
        raise_pending()  # a kill during the imports above
        app(prog_name="cyclereg")
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit as stop:
        # typer turns a Ctrl-C while it handles the options into a silent exit 130
        if stop.code in (130, 143) and not said:
            print(INTERRUPTED if stop.code == 130 else TERMINATED, file=sys.stderr)
        raise
    finally:
        # the first exit callback to run (they run last-registered first): the exit is quiet from there on, and
        # a test calling main() keeps its signals for the rest of its session
        atexit.register(ignore_signals_from_now)
