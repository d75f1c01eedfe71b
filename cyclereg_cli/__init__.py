"""Thin Typer command-line interface over :mod:`cyclereg` (one library call per command)."""
