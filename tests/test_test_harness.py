"""The test suite's own hygiene: what a test changes in the pytest process does not outlive it."""

import signal

from typer.testing import CliRunner

from cyclereg_cli.main import app

_BEFORE = signal.getsignal(signal.SIGTERM)


def test_a_cli_run_installs_the_sigterm_handler_in_this_process(tmp_path):
    res = CliRunner().invoke(app, ["status", str(tmp_path / "no_run")])
    assert res.exit_code == 2
    assert getattr(signal.getsignal(signal.SIGTERM), "__name__", None) == "sigterm_exit"


def test_the_next_test_finds_the_pytest_process_handler_again():
    """(runs after the one above, in file order) conftest's autouse fixture put the handler back, so a
    ``kill`` of the pytest run stops it instead of failing one test and being ignored from then on."""
    assert signal.getsignal(signal.SIGTERM) == _BEFORE
