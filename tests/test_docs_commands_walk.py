"""Every command line the documentation writes down still parses (documentation walk, 2026-12-07).

What was audited: README.md, docs/*.md, carried-runs/README.md, models/*/README.md and the module
docstrings of scripts/, examples/ and benchmarks/. Every ``cyclereg ...`` (also ``python -m cyclereg_cli``)
and every ``python {scripts,examples,benchmarks}/X.py ...`` they quote, in fenced or indented blocks (lines
continued with a trailing backslash joined, shell prompts, comments, ``VAR=value`` / ``env`` / ``time`` /
``nice`` prefixes, redirections and pipes stripped, ``&&`` / ``;`` chains split) and in inline code (spans
wrapped over several lines joined; ``[...]`` optional parts kept, each of ``A|B`` alternatives tried), is
parsed WITHOUT running anything: ``cyclereg`` lines by click's parser on the typer app
(``make_context`` of the subcommand), script lines by the ``argparse`` parser each script builds (caught at
``parse_args``; abbreviations of option names refused, so a doc must spell the real name). Placeholders
(``$D``, ``RUN``, ``DATASET_JSON``, ``N``, ``T+2``) stay as they are where a path fits and become a number or
the first choice where the parameter wants one. An inline span (prose naming a command, e.g. ``evaluate
--run RUN``) or a line with an elided ``...`` may leave out required parameters: they are filled with
dummies, so that only the option names and values it does write are checked; a block line gets no such
help. README's single-line ``cyclereg`` block lines are left to tests/test_readme_claims_walk.py.

Paths are not checked at parse time (no ``exists=True`` on any typer parameter, only ``Path``/``int``/
``float``/``str`` types in the scripts), so dummy paths are fine; :func:`test_paths_are_not_checked_at_parse_time`
pins that. String options the parsers take as any word and the code checks later (``--device``,
``--supervision``, ``--metric``, ``--ensemble-fusion``, ``--format``, ``--fold(s)``, device_check's
``--steps``; README's block lines included) are checked against the code's own sets. All 670-odd command
lines of 2026-12-07 parse: no documented command is stale. One kind of slip was pinned as a strict xfail
until the docs were mended: 13 inline commands that gave all their arguments but left out a required option
(``evaluate`` without ``--json``, ``register`` without ``-o``), so that they failed as written. The numbers and outputs the docs
quote next to the commands need the shared data and minutes to hours of training or
evaluation each; none is checked here.
"""

from __future__ import annotations

import argparse
import ast
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import typer.main

import cyclereg_cli.main as cli
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
GROUP = typer.main.get_command(cli.app)
COMMANDS = dict(GROUP.commands)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "carried-runs" / "README.md",
        *sorted((ROOT / "models").glob("*/README.md"))]
SCRIPTS = sorted(p for d in ("scripts", "examples", "benchmarks") for p in (ROOT / d).glob("*.py"))
SCRIPT = re.compile(r"^(scripts|examples|benchmarks)/\w+\.py$")
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*[+-]\d+$|^[A-Z][A-Z0-9_]*([./][\w./{}]*)?$|^\$\w+$")
SUBST = {"$D": "d.json", "$A4": "a4.json", "$A": "a.json", "$OUT": "out"}


# ----------------------------------------------------------------------------- extraction
def _texts():
    for path in DOCS:
        yield path, path.read_text(), "`"
    for path in SCRIPTS:
        body = ast.parse(path.read_text()).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            yield path, "\n" * (body[0].lineno - 1) + str(body[0].value.value), "``"


def _commands(segment: str) -> list[str]:
    """The cyclereg / ``python SCRIPT`` commands of one shell line (continuations already joined)."""
    out = []
    for part in re.split(r"&&|\|\||;|(?<![\w|])\|(?![\w|])", segment):
        part = re.sub(r"\s[12]?>>?&?\s*\S+", " ", " " + part)  # redirections
        words = re.sub(r"^\s*\$\s+", "", part).split()
        while words:
            if words[0] in ("time", "/usr/bin/time"):  # with its own options: /usr/bin/time -v (peak memory)
                words.pop(0)
                while words and words[0].startswith("-"):
                    words.pop(0)
            elif ENV.match(words[0]) or words[0] in ("env", "do", "then", "nohup", "exec"):
                words.pop(0)
            elif words[0] in ("nice", "timeout") and len(words) > 2:
                words = words[3:] if words[1] == "-n" else words[2:]
            else:
                break
        if len(words) >= 3 and words[0] in ("python", "python3") and words[1] == "-m" \
                and words[2] in ("cyclereg_cli", "cyclereg_cli.main"):
            words = ["cyclereg", *words[3:]]
        if words and words[0] == "cyclereg":
            out.append(" ".join(words))
        elif len(words) >= 2 and words[0] in ("python", "python3") and SCRIPT.match(words[1]):
            out.append(" ".join(words))
    return out


def extract(readme_block_lines: bool = False) -> list[tuple[str, int, str, str]]:
    """(file, line, 'block' | 'inline', command) for every command line of the docs (README's single-line
    ``cyclereg`` block lines only with ``readme_block_lines``: test_readme_claims_walk.py parses those)."""
    found = []
    for path, text, tick in _texts():
        rel, lines = str(path.relative_to(ROOT)), text.splitlines()
        in_fence, block, i = False, set(), 0
        while i < len(lines):
            line = lines[i]
            if line.lstrip().startswith("```"):
                in_fence = not in_fence
                block.add(i)
            elif in_fence or line.startswith(("    ", "\t")):
                start, joined = i, line
                block.add(i)
                while joined.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    block.add(i)
                    joined = joined.rstrip()[:-1] + " " + lines[i].strip()
                shell = re.sub(r"(^|\s)#.*$", "", re.sub(r"^\s*\$\s+", "", joined)).strip()
                quoted = re.findall(r'"((?:cyclereg|python3?) [^"]*)"', shell)  # run(command="python3 ...")
                skip = not readme_block_lines and rel == "README.md" and shell.startswith("cyclereg ") and start == i
                for piece in ([] if skip or not shell else [shell]) + quoted:
                    found += [(rel, start + 1, "block", c) for c in _commands(piece)]
            i += 1
        prose = "\n".join("" if k in block else text for k, text in enumerate(lines))
        span_re = re.compile(r"(?<!`)`(?!`)([^`]+?)(?<!`)`(?!`)") if tick == "`" else re.compile(r"``(.+?)``", re.S)
        for m in span_re.finditer(prose):
            span = " ".join(m.group(1).split()).replace("\\|", "|")
            if re.search(r"(^|\s)(cyclereg\s|python3?\s+(-m\s+cyclereg_cli|(scripts|examples|benchmarks)/))", span):
                lineno = prose.count("\n", 0, m.start()) + 1
                found += [(rel, lineno, "inline", c) for c in _commands(span)]
    return found


def variants(command: str) -> list[list[str]]:
    """The argvs of a documented command, one per alternative it offers: ``(--identity|--model M|--run RUN)``
    gives three, ``--device auto|cpu|cuda`` three (the n-th alternative of every ``A|B`` word together)."""
    command = command.replace("\\|", "|")
    group = re.search(r"\(([^()]*\|[^()]*)\)", command)
    if group:
        return [v for alt in group.group(1).split("|")
                for v in variants(command[:group.start()] + alt + command[group.end():])]
    width = max([len(w.split("|")) for w in command.split()] + [1])
    return [tokens(" ".join(w.split("|")[min(n, len(w.split("|")) - 1)] if "|" in w else w for w in command.split()))
            for n in range(width)]


def tokens(command: str) -> list[str]:
    """The argv of a documented command: ``(A|B C)`` -> ``A``, ``[--opt V]`` -> ``--opt V``,
    ``K256[_sT]`` -> ``K256_sT``, ``auto|cpu`` -> ``auto``; ``...`` dropped (a value after an option)."""
    command = re.sub(r"\(([^()|]*)\|[^()]*\)", r"\1", command.replace("\\|", "|"))
    command = re.sub(r"[\[\]()]", " ", re.sub(r"(?<=\S)\[([^\]\s]*)\]", r"\1", command))
    words = []
    for w in shlex.split(command):
        if w.endswith("..."):
            if words and words[-1].startswith("-"):
                words.append("X")
            continue
        w = w.split("|")[0] if "|" in w else w
        if w:
            words.append(SUBST.get(w, w))
    return words


# ----------------------------------------------------------------------------- parsing without running
class _Refused(Exception):
    pass


class _Parsed(Exception):
    pass


_PARSERS: dict[str, argparse.ArgumentParser] = {}


def _script_parser(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a script builds (in ``main`` or under ``__main__``), caught at ``parse_args``."""
    if script not in _PARSERS:
        def catch(self, *a, **k):
            raise _Parsed(self)

        with monkeypatch.context() as m:
            m.setattr(argparse.ArgumentParser, "parse_args", catch)
            m.setattr(sys, "argv", [script])
            with pytest.raises(_Parsed) as caught:
                runpy.run_path(str(ROOT / script), run_name="__main__")
        _PARSERS[script] = caught.value.args[0]
    return _PARSERS[script]


def _subparsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _subparsers(sub)


def _annotation(param):
    """int / float / other of a command parameter (typer >= 0.22 keeps its own click copy; older: click's)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        return descriptor.annotation
    return {"integer": int, "float": float}.get(getattr(param.type, "name", ""))


def _refuse(self, message):
    raise _Refused(message)


def _parse_once(words: list[str], monkeypatch):
    """None when ``words`` parse; else (message, what to do: a list of words to append for a missing
    parameter, ('subst', placeholder, value) for a placeholder in a typed slot, or None)."""
    if words[0] == "cyclereg":
        if len(words) > 1 and words[1].startswith("-"):
            unknown = [w for w in words[1:] if w.startswith("-") and w not in {o for p in GROUP.params for o in p.opts}]
            return (f"no such option {unknown}", None) if unknown else None
        if len(words) < 2:
            return None
        if words[1] not in COMMANDS:
            return f"no such command {words[1]!r}", None
        monkeypatch.setattr(cli, "_usage_error", lambda exc, ctx=None: (_ for _ in ()).throw(_Refused(exc)))
        try:
            COMMANDS[words[1]].make_context(words[1], words[2:], resilient_parsing=False)
        except _Refused as refused:
            exc = refused.args[0]
            message, param = exc.format_message(), getattr(exc, "param", None)
            if type(exc).__name__ == "MissingParameter":
                return message, ["X"] if param.param_type_name == "argument" else [param.opts[0], "X"]
            if param is not None:
                kind = _annotation(param)
                for k, w in enumerate(words[2:], 2):
                    if PLACEHOLDER.match(w) and (param.param_type_name == "argument" or words[k - 1] in param.opts):
                        choice = re.search(r"(?:one of|choose from) '?([\w.-]+)'?", message)
                        value = "1" if kind is int else "0.5" if kind is float else choice and choice.group(1)
                        return message, ("subst", w, value)
            return message, None
        return None
    if not (ROOT / words[1]).is_file():
        return f"no such script {words[1]}", None
    parser = _script_parser(words[1], monkeypatch)
    for p in _subparsers(parser):
        monkeypatch.setattr(p, "allow_abbrev", False)  # the doc must spell the option's real name
    monkeypatch.setattr(argparse.ArgumentParser, "error", _refuse)
    try:
        parser.parse_args(words[2:])
    except _Refused as refused:
        message = refused.args[0]
        bad = re.search(r"invalid (int|float|choice)[^']*'([^']*)'(?: \(choose from '?([^',)]+))?", message)
        if bad and PLACEHOLDER.match(bad.group(2)):
            return message, ("subst", bad.group(2), bad.group(3) or ("0.5" if bad.group(1) == "float" else "1"))
        missing = re.match(r"the following arguments are required: (.*)", message)
        if missing:
            fill = []
            for name in missing.group(1).split(", "):
                fill += [name.split("/")[0], "X"] if name.startswith("-") else ["X"]
            return message, fill
        return message, None
    return None


def parse(words: list[str], monkeypatch, fill_missing: bool) -> str | None:
    """None when the documented command parses (placeholders in typed slots replaced, and with
    ``fill_missing`` required parameters it leaves out added), else the parser's message."""
    for _ in range(12):
        with monkeypatch.context() as m:
            outcome = _parse_once(list(words), m)
        if outcome is None:
            return None
        message, action = outcome
        if isinstance(action, tuple) and action[2] is not None:
            words = [action[2] if w == action[1] else w for w in words]
        elif isinstance(action, list) and fill_missing:
            words = words + action
        else:
            return message
    return "did not settle"


# ----------------------------------------------------------------------------- tests
COMMAND_LINES = extract()


def test_extraction_sees_the_docs_commands():
    """The walk is not vacuous: hundreds of lines from every kind of source, and the hard cases (a
    backslash-continued block line, an inline span wrapped over two lines, a table cell's escaped ``\\|``
    alternatives, ``env``/``/usr/bin/time``/``PYTHONPATH=.`` prefixes, ``python -m cyclereg_cli``) read whole."""
    by_file = {f for f, *_ in COMMAND_LINES}
    assert len(COMMAND_LINES) >= 600
    assert {"README.md", "docs/benchmarks.md", "carried-runs/README.md", "models/copd/README.md",
            "scripts/run_model_set.py", "benchmarks/label_change.py", "examples/own_ct_pairs.py"} <= by_file
    commands = {c for *_, c in COMMAND_LINES}
    assert ("cyclereg register CHEST_CT /tmp/chest_e2e/moving.nii.gz -o /tmp/chest_e2e/one --via-keypoints "
            "--lung-mask --model models/copd/fold1.pt --device cpu --jacobian") in commands
    assert any(c.startswith("python benchmarks/label_change.py") and c.endswith("--json copd_label_change.json")
               and "carried-runs/copd_lr1_uniform_seed1" in c for c in commands)
    assert ("python benchmarks/downsample_l2r.py /work/data/abdomen_seed0/AbdomenCTCT_dataset.json "
            "/work/data/abd4mm --training-images 10") in commands  # wrapped inline span, after '&&'
    assert "cyclereg evaluate DATASET.json (--identity|--model M|--run RUN) --json R.json" in commands
    assert "cyclereg evaluate ../shared/data/copd-keypoints/dataset.json --run models/copd --json r.json --spread" \
        in commands  # /usr/bin/time prefix
    assert "cyclereg demo" in commands  # README: 'bash scripts/install.sh && cyclereg demo'
    assert any(c.startswith("cyclereg evaluate ../shared/data/copd-keypoints/dataset.json --run models/copd --json")
               and "r.json" in c for f, _, k, c in COMMAND_LINES if f == "docs/benchmarks.md" and k == "inline")
    assert any(c.startswith("python3 scripts/device_check.py run --steps copd-k256-run") for c in commands)
    assert [v[3] for v in variants("cyclereg evaluate D (--identity\\|--model M\\|--run RUN) --device cpu|cuda")] == \
        ["--identity", "--identity", "--model", "--model", "--run", "--run"]
    assert [v[-1] for v in variants("cyclereg evaluate D (--identity\\|--model M\\|--run RUN) --device cpu|cuda")] == \
        ["cpu", "cuda", "cpu", "cuda", "cpu", "cuda"]
    assert tokens("cyclereg evaluate $D --run K256[_sT] --device cpu --json ...") == \
        ["cyclereg", "evaluate", "d.json", "--run", "K256_sT", "--device", "cpu", "--json", "X"]


@pytest.mark.parametrize("source, line, kind, command", COMMAND_LINES,
                         ids=[f"{f}:{n}" for f, n, *_ in COMMAND_LINES])
def test_documented_command_parses(source, line, kind, command, monkeypatch):
    """Each documented command's options exist on its command / script and its values have the right
    type and choice (a renamed or removed option, a flag given a value, a number where a word is wanted
    fail here); a block line must also give every required parameter."""
    for argv in variants(command):
        error = parse(argv, monkeypatch, fill_missing=kind == "inline" or "..." in command)
        assert error is None, f"{source}:{line}: {' '.join(argv)}\n  -> {error}"


@pytest.mark.parametrize("command, fragment", [
    ("cyclereg evaluate d.json --run R --jsn r.json", "--jsn"),  # misspelt option
    ("cyclereg evaluate d.json --run R --json r.json --jobs 2", "--jobs"),  # an option of another command
    ("cyclereg cycle d.json --run R --stages five", "--stages"),  # a word where a number goes
    ("cyclereg evalute d.json", "evalute"),  # no such command
    ("cyclereg register f.csv m.csv", "--output"),  # a required option left out of a block line
    ("cyclereg --versions", "--versions"),
    ("python scripts/run_model_set.py RUN -o M --stage x", "--stage"),
    ("python scripts/run_model_set.py RUN -o M --stag 1", "--stag"),  # argparse's abbreviation refused
    ("python scripts/device_check.py bogus", "bogus"),  # a subcommand that is none
    ("python scripts/device_check.py run --budget 1 --nope", "--nope"),  # an unknown option of a subcommand
    ("python benchmarks/dense_pair_time.py 96 80 --repeats 3", "shape"),  # too few positionals
    ("python benchmarks/no_such_benchmark.py", "no such script"),
])
def test_the_check_refuses_a_stale_command(command, fragment, monkeypatch):
    """The parse check is real: each kind of staleness a doc could have is refused with a message
    naming the culprit."""
    error = parse(tokens(command), monkeypatch, fill_missing=False)
    assert error is not None and fragment in error, error


def _known_values() -> dict[str, object]:
    """Valid values of the string options the parsers take as any word and the code checks later."""
    from cyclereg.clouds.pipeline import ENSEMBLE_FUSIONS
    from cyclereg.compare import METRICS
    from cyclereg.device import resolve_device
    from cyclereg.errors import InputError
    from cyclereg.training.dense import SUPERVISIONS

    def device(value):
        try:
            resolve_device(value)
        except InputError as exc:  # a CUDA name is fine where this machine has no GPU
            return "CUDA is not available" in str(exc)
        return True

    formats = re.findall(r"(?:^|\| )(\w+) ", next(p.help for p in COMMANDS["keypoints"].params if p.name == "fmt"))
    steps = {name for name, _, _ in load_script("scripts/device_check.py").steps(60)}
    return {"--device": device, "--supervision": set(SUPERVISIONS), "--metric": set(METRICS),
            "--ensemble-fusion": set(ENSEMBLE_FUSIONS), "--fusion": set(ENSEMBLE_FUSIONS), "--format": set(formats),
            "--steps": steps, "--fold": lambda v: v == "all" or v.isdigit(),
            "--folds": lambda v: v == "all" or re.fullmatch(r"\d+(,\d+)*", v) is not None}


def test_documented_values_of_word_options_are_known(monkeypatch):
    """Options the parsers take as any word and the code checks later (``--device``, ``--supervision``,
    ``--metric``, ``--ensemble-fusion`` / ``--fusion``, ``--format``, ``--fold(s)``, device_check's
    ``--steps``): every value the docs give is one the code accepts (a step or choice renamed in the
    code, or misspelt in a doc, fails here)."""
    known, checked, wrong = _known_values(), 0, []
    assert {"cpu", "cuda", "auto"} <= {v for v in ("cpu", "cuda", "auto") if known["--device"](v)}
    assert not known["--device"]("gpu") and "copd-k256-run" in known["--steps"] and "l2r" in known["--format"]
    for source, line, argv in ((f, n, a) for f, n, _, c in extract(readme_block_lines=True) for a in variants(c)):
        words = [part for w in argv for part in (w.split("=", 1) if w.startswith("--") else [w])]
        for k, word in enumerate(words[:-1]):
            if word not in known:
                continue
            for value in words[k + 1:]:
                if value.startswith("-") or PLACEHOLDER.match(value):
                    break
                ok = known[word](value) if callable(known[word]) else value in known[word]
                checked += 1
                if not ok:
                    wrong.append(f"{source}:{line}: {word} {value} ({' '.join(argv)})")
                if word != "--steps":  # the only one of these taking several values
                    break
    assert checked >= 120
    assert wrong == []


def test_inline_commands_that_give_their_arguments_give_their_required_options(monkeypatch):
    """An inline span that writes a command with all its arguments reads as a command to copy (README:
    ``cyclereg evaluate $D --run RUN``, 'as a user would'); it must not leave out a required option.
    Bare mentions (``cyclereg keypoints``, ``evaluate --run RUN``: an argument missing) and spans with
    ``...`` are prose, not commands, and are not held to this."""
    short = []
    for source, line, kind, command in COMMAND_LINES:
        if kind == "inline" and "..." not in command and len(tokens(command)) > 2:  # not a bare 'cyclereg CMD'
            error = parse(tokens(command), monkeypatch, fill_missing=False)
            if error is not None and error.startswith("Missing option"):
                short.append(f"{source}:{line}: {command} -> {error}")
    assert short == []


def test_paths_are_not_checked_at_parse_time(monkeypatch, tmp_path):
    """Why dummy paths are fine above: no typer parameter asks click to check that a path exists, the
    scripts' arguments are plain ``Path``/``int``/``float``/``str`` (or choices), and a command naming
    files that do not exist parses."""
    for name, cmd in COMMANDS.items():
        for param in cmd.params:
            info = getattr(getattr(param, "type_descriptor", None), "parameter_info", None)  # typer >= 0.22
            assert not getattr(info if info is not None else param.type, "exists", False), (name, param.name)
    for script in sorted({c.split()[1] for *_, c in COMMAND_LINES if not c.startswith("cyclereg")}):
        for parser in _subparsers(_script_parser(script, monkeypatch)):
            for action in parser._actions:
                assert action.type in (None, Path, int, float, str), (script, action.dest, action.type)
    missing = tmp_path / "none"
    assert parse(["cyclereg", "evaluate", str(missing / "d.json"), "--run", str(missing / "run"), "--json",
                  str(missing / "r.json")], monkeypatch, fill_missing=False) is None
    assert parse(["python", "scripts/run_model_set.py", str(missing / "run"), "-o", str(missing / "out")],
                 monkeypatch, fill_missing=False) is None
