"""The ``cyclereg`` console script: imports the CLI inside a guard, so that Ctrl-C while Python is
still loading it (the first second or two) ends with one line and exit 130, as it does later,
instead of a ``KeyboardInterrupt`` traceback from the import machinery."""

from __future__ import annotations

import sys

INTERRUPTED = "cyclereg: interrupted"
"""What an interrupt before any work prints (the commands' own handler says more once they run)."""


def main() -> None:
    """Run the CLI (:data:`cyclereg_cli.main.app`); an interrupt outside the commands' own handling
    (while importing, while parsing the options) exits 130 with :data:`INTERRUPTED` on stderr."""
    try:
        from cyclereg_cli.main import app

        app(prog_name="cyclereg")
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130) from None
