"""The console script: an interrupt before the commands' own handling (while Python loads the CLI,
or parses the options) is one line and exit 130, never a traceback."""

from __future__ import annotations

import sys

import pytest

from cyclereg_cli import entry


class _InterruptingImport:
    """A meta-path finder that raises KeyboardInterrupt when ``name`` is imported (Ctrl-C mid-import)."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_the_cli_is_imported_is_one_line_and_130(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "cyclereg_cli.main", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptingImport("cyclereg_cli.main"), *sys.meta_path])
    with pytest.raises(SystemExit) as stop:
        entry.main()
    assert stop.value.code == 130
    assert capsys.readouterr().err == entry.INTERRUPTED + "\n"


def test_ctrl_c_while_parsing_is_one_line_and_130(monkeypatch, capsys):
    import cyclereg_cli.main as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "app", interrupted)
    with pytest.raises(SystemExit) as stop:
        entry.main()
    assert stop.value.code == 130 and capsys.readouterr().err == entry.INTERRUPTED + "\n"


def test_the_console_script_runs_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cyclereg", "--version"])
    with pytest.raises(SystemExit) as stop:
        entry.main()
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("cyclereg ")


def test_sigterm_exits_once_and_then_ignores_repeats():
    """The first SIGTERM raises SystemExit(143); later ones (a worker gets one per dying thread of a parent
    killed with kill -9) are ignored, so they cannot interrupt the exit's cleanup with a traceback."""
    import signal

    from cyclereg.interrupts import exit_on_sigterm

    previous = exit_on_sigterm()
    try:
        with pytest.raises(SystemExit) as exc:
            signal.raise_signal(signal.SIGTERM)
        assert exc.value.code == 143
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        signal.raise_signal(signal.SIGTERM)  # ignored: no second SystemExit
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("args, said", [
    (["register", "f.csv", "m.csv", "-o", "o", "--warps", "abc"], "Invalid value for '--warps'"),
    (["register"], "Missing argument 'fixed'"),
    (["register", "f.csv", "m.csv", "-o", "o", "extra"], "unexpected extra argument"),
    (["register", "f.csv", "m.csv", "-o", "o", "--nope"], "No such option: --nope"),
    (["evaluate", "d.json", "--json", ""], "Invalid value for '--json': an empty value"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["--bogus"], "No such option: --bogus"),
])
def test_usage_errors_are_one_line_and_exit_2(monkeypatch, capsys, args, said):
    """A value of the wrong type, an unknown option or command, a missing or extra argument: one line on
    stderr naming the problem and where the options are listed, exit 2, like every other error (click's
    framed box with the usage took five or six lines)."""
    monkeypatch.setattr(sys, "argv", ["cyclereg", *args])
    with pytest.raises(SystemExit) as stop:
        entry.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    command = "cyclereg" if args[0].startswith("-") or args[0] == "frobnicate" else f"cyclereg {args[0]}"
    assert err.startswith("cyclereg: error: ") and said in err and f"(see '{command} --help')" in err


def test_a_command_without_arguments_still_shows_its_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["cyclereg"])
    with pytest.raises(SystemExit):
        entry.main()
    assert "Usage: cyclereg" in capsys.readouterr().out


def test_a_sigterm_during_an_import_is_delivered_once_the_import_is_over(tmp_path):
    """A kill that lands while a module is being imported (a command loads its library lazily, after the
    handler is installed) is not raised inside the import, where third-party import code can lose it (a
    stress test saw tracebacks and a kill ignored), but once the import is over: the module loads whole,
    then the process exits 143. Checked in a fresh interpreter with a module that is killed mid-import."""
    import os
    import subprocess
    from pathlib import Path

    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.3)  # still importing when the signal arrives\n"
        "print('module loaded whole', flush=True)\n")
    script = ("import sys, time\n"
              "from cyclereg.interrupts import exit_on_sigterm\n"
              "exit_on_sigterm()\n"
              "import slow_module\n"
              "print('after the import', flush=True)\n"
              "time.sleep(30)\n"
              "print('not killed', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parents[1]}"})
    assert done.returncode == 143, (done.returncode, done.stdout, done.stderr)
    assert done.stdout.splitlines()[0] == "module loaded whole", done.stdout
    assert "not killed" not in done.stdout and "Traceback" not in done.stderr, (done.stdout, done.stderr)


def test_python_dash_m_runs_the_same_cli(tmp_path):
    """``python -m cyclereg_cli`` is the ``cyclereg`` command (for an environment whose scripts folder is not on
    PATH): the same version line, and an error as one line with exit 2."""
    import os
    import subprocess
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    version = subprocess.run([sys.executable, "-m", "cyclereg_cli", "--version"], capture_output=True, text=True,
                             timeout=120, env=env, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("cyclereg "), (version.stdout, version.stderr)
    missing = subprocess.run([sys.executable, "-m", "cyclereg_cli", "status", str(tmp_path / "no_run")],
                             capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("cyclereg: error: "), missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
