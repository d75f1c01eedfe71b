"""Contracts of today's output and input mends (2026-12-07).

Mended: ``--json -`` (``evaluate``, ``status``, ``compare``; any output file checked by
:func:`cyclereg.errors.require_output_file`) wrote a file named ``-``; it is refused with one line, since
the commands print their tables on stdout and write their reports through staged files. A path holding a NUL
character passed every path check and failed at the write with a bare ``ValueError`` (the command line's
own parser already refused it with one line): :func:`cyclereg.errors.refuse_empty_paths` refuses it.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import write_two_pair_dataset
from cyclereg.api import evaluate
from cyclereg.errors import InputError, require_file, require_output_dir, require_output_file
from cyclereg_cli.main import app


# ----------------------------------------------------------------------------- 1. --json - (standard output)
def test_dash_output_is_refused_not_written(tmp_path, monkeypatch):
    """``-`` is refused naming it; a file named ``-`` given by its full path is still an output."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"^-: standard output is not an output here"):
        require_output_file("-")
    assert require_output_file(tmp_path / "-") == tmp_path / "-"
    ds = write_two_pair_dataset(tmp_path / "ds")
    (tmp_path / "run").mkdir()
    for args in (["evaluate", str(ds), "--identity", "--json", "-"], ["status", str(tmp_path / "run"), "--json", "-"],
                 ["compare", "a.json", "b.json", "--json", "-"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "cyclereg: error: -: standard output is not an output here" in res.output
        assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "run"]


# ----------------------------------------------------------------------------- 2. a NUL character in a path
def test_nul_in_a_path_is_one_line_naming_it(tmp_path):
    for check, name in ((require_output_file, "output file"), (require_file, "input file"),
                        (require_output_dir, "output folder")):
        with pytest.raises(InputError) as err:
            check(tmp_path / "out\0.json")
        assert str(err.value).startswith(f"{name} '{tmp_path}/out\\x00.json': holds a NUL character")
    ds = write_two_pair_dataset(tmp_path / "ds")
    with pytest.raises(InputError, match=r"^report '.*out\\x00\.json': holds a NUL character"):
        evaluate(ds, tmp_path / "out\0.json", identity=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
