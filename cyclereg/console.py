"""Printing result tables with rich without hiding digits."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: widest a table is measured at when the output is not a terminal [characters]
MAX_LOG_WIDTH = 400


def print_table(console: Console, table: Table) -> None:
    """Print ``table`` so that no cell ends in an ellipsis and no header loses text.

    Where the output is not a terminal (a log file, a pipe, CI), rich would assume 80 columns;
    the table is printed at its natural width instead (at most :data:`MAX_LOG_WIDTH`). In a
    terminal narrower than the table, a cell's text folds onto further lines. Header strings
    are taken literally (a unit such as "[mm]" is not rich markup).
    """
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
    the terminal, not rich, wraps; nothing with ``quiet``."""
    Console(stderr=True, quiet=quiet).print(f"note: {escape(text)}", highlight=False, soft_wrap=True)


def count(n: int, noun: str) -> str:
    """``"1 pair"``, ``"3 pairs"``: ``n`` and ``noun`` with an ``s`` unless ``n`` is 1."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
