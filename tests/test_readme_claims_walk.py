"""Documentation claims against behaviour (documentation walk, 2026-12-07).

What was audited: README.md in full, the package docstring (``cyclereg/__init__.py``), the ``--help`` of every
command and the docstrings of the configuration dataclasses (``CloudRegConfig``, ``CloudCycleConfig``,
``DenseCycleConfig``, ``cyclereg/dense/config.py``, ``FoerstnerConfig``, ``LBPConfig``, ``TPSConfig``). Every
checkable factual claim was listed and compared with the code: default values (README / help / docstring text
against the dataclass and the value the command actually resolves), units in keyword names, option names
quoted in README (each must exist on the command it is quoted with), output file names, paths and library
names the README points at, numbers quoted from docs/benchmarks.md, the paper's schedules (keypoints: T = 5
stages of 60 epochs, batch 4, Adam 1e-3 decayed x0.1 at epochs 40 and 52, sampling sigmoid arguments from +5
to -5; dense: T = 8 stages of 1000 iterations, batch 2, cosine 1e-3 -> 1e-5 restarted every stage), the
README's example dataset.json and the quick-start demo's quoted errors.

Each test reads the claim from the documentation text itself (README, help, docstring) and checks it against
what the code does, so that a later change of either side shows up here; nothing is a snapshot of printed
output. No claim was found that the code contradicts; the documentation slips are listed in the report.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import re
from pathlib import Path

import pytest
import typer.main

from cyclereg_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BENCHMARKS = (ROOT / "docs" / "benchmarks.md").read_text()
COMMANDS = dict(typer.main.get_command(app).commands)
FLAG = r"(?<![\w-])(--[a-z][\w-]*)"

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _options(command: str) -> set[str]:
    found = set()
    for param in COMMANDS[command].params:
        found.update(param.opts)
        found.update(param.secondary_opts)
    return found


def _help(command: str, option: str) -> str:
    return next(p.help for p in COMMANDS[command].params if option in p.opts)


def _readme_command_lines() -> list[str]:
    """Every ``cyclereg CMD ...`` of README's shell blocks and inline code, and every inline ``CMD --flag``
    span (e.g. ``evaluate --run RUN --stage 0``); ``&&`` chains split into their commands."""
    lines, in_block = [], False
    for line in README.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block and line.strip().startswith("cyclereg "):
            lines.append(line.split("#")[0].strip())
    lines += re.findall(r"`(cyclereg [^`]*)`", README)
    spans = re.findall(r"`((%s) [^`]*--[^`]*)`" % "|".join(map(re.escape, COMMANDS)), README)
    lines += ["cyclereg " + span for span, _ in spans]
    return [part.strip() for line in lines for part in line.split("&&")]


def test_every_option_readme_quotes_exists_on_its_command():
    """README's example commands and the ``CMD --flag`` spans of its prose use only options that command has
    (an option renamed in the CLI, or quoted with the wrong command, fails here)."""
    checked = 0
    for line in _readme_command_lines():
        words = line.split()
        if len(words) < 2 or words[0] != "cyclereg" or words[1].startswith("-"):
            assert set(re.findall(FLAG, line)) <= {"--version", "--help"}, line
            continue
        assert words[1] in COMMANDS, f"README names an unknown command: {line}"
        unknown = set(re.findall(FLAG, line)) - _options(words[1])
        assert not unknown, f"{line}: {sorted(unknown)} not options of '{words[1]}'"
        checked += 1
    assert checked >= 60  # the walk saw README's examples (about 70 lines), not an empty parse
    every = set().union(*(_options(c) for c in COMMANDS)) | {"--version", "--help", "--index-url"}  # pip's
    assert set(re.findall(FLAG, README)) <= every


def test_readme_example_commands_parse():
    """README's shell blocks (the walk-throughs, the COPD and abdomen benchmarks, your own dataset): every
    ``cyclereg`` line parses with its command's options and arguments (a required option left out, a
    missing argument or a flag given a value fails here), without running it."""
    import shlex

    parsed = 0
    in_block = False
    for line in README.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not (in_block and line.strip().startswith("cyclereg ")):
            continue
        for part in line.split("#")[0].split("&&"):
            words = shlex.split(part.replace("$D", "d.json").replace("$A", "a.json"))
            COMMANDS[words[1]].make_context(words[1], words[2:])  # a usage error exits (SystemExit): fails
            parsed += 1
    assert parsed >= 20


@pytest.mark.parametrize("command, option, options", [
    ("pretrain-random", "--recentre-passes", ("pretrain-random", "register", "evaluate")),
    ("pretrain-random", "--tta-passes", ("pretrain-random", "register", "evaluate")),
    ("register", "--ensemble-fusion", ("register", "evaluate")),
    ("cycle", "--val-pairs", ("pretrain-random", "cycle")),
    ("register", "--jacobian", ("register",)),
])
def test_options_readme_names_for_several_commands_exist_on_each(command, option, options):
    """README's "``--recentre-passes N`` on ``pretrain-random``, ``register``, ``evaluate``", "``--tta-passes N``
    on the same commands", "``--ensemble-fusion`` on ``register``/``evaluate``", "``--val-pairs N`` of
    ``pretrain-random`` / ``cycle``": the option is on each of them."""
    assert option in README
    for name in options:
        assert option in _options(name), (option, name)


def _help_default_numbers(text: str) -> list[float]:
    """The numbers of a help text's ``default ...`` clause, e.g. ``(default = paper: 5 for keypoints, 8 for
    volumes)`` -> [5, 8], ``(default 0.05, the authors' dense value; ...)`` -> [0.05]."""
    clause = re.search(r"[(;] ?default(?: = paper)?:?\s*([^;:)]*)", text)
    assert clause, text
    return [float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", clause.group(1))]


def _code_defaults():
    from cyclereg.clouds.api import load_cloud_model
    from cyclereg.dense.api import load_model
    from cyclereg.keypoints.foerstner import FoerstnerConfig, PairKeypointConfig
    from cyclereg.training.api import dense_cycle_config
    from cyclereg.training.clouds import cycle_config
    from cyclereg.training.scheduler import DEFAULT_SNAPSHOT_EVERY_S

    det, clouds, dense = FoerstnerConfig(), cycle_config(), dense_cycle_config()
    random_seed = {inspect.signature(f).parameters["seed"].default for f in (load_cloud_model, load_model)}
    assert len(random_seed) == 1
    return {
        ("keypoints", "--sigma"): [det.sigma_mm],
        ("keypoints", "--nms-radius"): [det.nms_radius_mm],
        ("keypoints", "--threshold"): [det.threshold],
        ("keypoints", "--max-points"): [det.max_points],
        ("keypoints", "--moving-nms-radius"): [PairKeypointConfig().moving.nms_radius_mm],
        ("pretrain-random", "--seed"): sorted({clouds.seed, dense.seed}),
        ("pretrain-random", "--stages"): [clouds.stages, dense.stages],
        ("pretrain-random", "--epochs"): [clouds.epochs],
        ("pretrain-random", "--iterations"): [dense.iterations],
        ("pretrain-random", "--batch-size"): [dense.batch_size],
        ("pretrain-random", "--recentre-passes"): [clouds.refine_recentre_passes],
        ("pretrain-random", "--tta-passes"): [clouds.refine_tta_passes],
        ("pretrain-random", "--candidates"): [clouds.reg.lbp.num_candidates],
        ("pretrain-random", "--learn-recentre-passes"): [clouds.learn_recentre_passes],
        ("pretrain-random", "--aug-relative"): [clouds.aug_relative_std],
        ("cycle", "--snapshot-every"): [DEFAULT_SNAPSHOT_EVERY_S],
        ("register", "--seed"): [*random_seed],
        ("evaluate", "--seed"): [*random_seed],
    }


def test_defaults_the_help_states_are_the_ones_the_commands_resolve():
    """Each ``(default N)`` of an option's help is the value the command uses when the option is not given:
    the detector's, the configuration ``pretrain-random`` builds with no option (keypoint and volume
    datasets), the snapshot interval of ``cycle`` and the random network's seed."""
    for (command, option), want in _code_defaults().items():
        got = _help_default_numbers(_help(command, option))
        assert got == pytest.approx(want), (command, option, _help(command, option))


def test_worded_defaults_the_help_states_are_the_code_defaults():
    """The defaults the help gives in words: ``--supervision`` pseudo, ``--train-images`` held-out,
    ``--directions`` one, the three ablation switches on (both paths), ``--cpu-bf16`` off; for a random dense
    network 2 warps with Adam and inverse consistency on."""
    from cyclereg.dense.config import DensePipelineConfig
    from cyclereg.training.api import dense_cycle_config
    from cyclereg.training.clouds import cycle_config

    clouds, dense, pipeline = cycle_config(), dense_cycle_config(), DensePipelineConfig()
    assert "pseudo (self-training, default)" in _help("pretrain-random", "--supervision")
    assert dense.supervision == "pseudo"
    assert "held-out (default" in _help("pretrain-random", "--train-images") and dense.train_images == "held-out"
    assert "one (pairs i<j, default)" in _help("pretrain-random", "--directions") and dense.directions == "one"
    for option, field in (("--augment", "augment"), ("--refine", "refine"),
                          ("--weighted-sampling", "weighted_sampling")):
        assert "(default on)" in _help("pretrain-random", option)
        assert getattr(clouds, field) is True and getattr(dense, field) is True
    assert "default off" in _help("pretrain-random", "--cpu-bf16") and dense.cpu_bf16 is False
    for command in ("register", "evaluate"):
        assert "2 for a random network" in _help(command, "--warps") and pipeline.warps == 2
        assert "on for a random network" in _help(command, "--adam") and pipeline.use_adam is True
        assert "on for a random network" in _help(command, "--ic") and pipeline.use_ic is True


def test_the_detector_threshold_is_relative_to_the_quantile_the_help_names():
    """``--threshold``: "distinctiveness >= T x its 99.9th percentile in the mask"."""
    from cyclereg.keypoints.foerstner import FoerstnerConfig

    percentile = float(re.search(r"its ([\d.]+)th percentile", _help("keypoints", "--threshold")).group(1))
    assert FoerstnerConfig().reference_quantile == pytest.approx(percentile / 100)


def test_defaults_readme_quotes_are_the_code_defaults():
    """README's figures for defaults: the snapshot interval, the TPS grid step, the test-time augmentation
    passes of new runs, the learning stream's re-centring and relative motion, K, the moving scans' NMS box,
    the ensemble fusion, the smallest clouds and the seed ranges."""
    from cyclereg.clouds.lbp import LBPConfig
    from cyclereg.clouds.tps import TPSConfig
    from cyclereg.errors import MAX_MODEL_SEED, MAX_SEED
    from cyclereg.keypoints.foerstner import MOVING_NMS_RADIUS_MM
    from cyclereg.training.clouds import CloudCycleConfig
    from cyclereg.training.scheduler import DEFAULT_SNAPSHOT_EVERY_S

    text = " ".join(README.split())
    cfg = CloudCycleConfig()

    def number(pattern: str) -> float:
        found = re.search(pattern, text)
        assert found, pattern
        return float(found.group(1))

    assert number(r"--snapshot-every` seconds, (\d+) by default") == DEFAULT_SNAPSHOT_EVERY_S
    assert number(r"every `tps\.grid_step` \((\d+)\) voxels") == TPSConfig().grid_step
    assert number(r"0 = off; default (\d+) for new runs") == cfg.refine_tta_passes
    assert number(r"training cost; default (\d+), the paper's single pass") == cfg.learn_recentre_passes
    assert number(r"and the target follows exactly \(default ([\d.]+) since") == cfg.aug_relative_std
    assert number(r"the default, on every device, is (\d+)") == cfg.reg.lbp.num_candidates
    assert number(r"moving scans with a (\d+) mm NMS box") == MOVING_NMS_RADIUS_MM
    fusion = next(p for p in COMMANDS["ensemble"].params if "--fusion" in p.opts)
    assert "By default (`--fusion joint`)" in text and fusion.default == "joint"
    fixed, moving = (int(n) for n in re.search(r"fewer than (\d+) fixed or (\d+) moving points", text).groups())
    assert (fixed, moving) == (LBPConfig().graph_k + 1, LBPConfig().graph_k)  # kNN graphs of 10 neighbours
    assert "seeds from 0 to 2^32 - 1" in text and MAX_SEED == 2**32 - 1
    assert "seed up to 1000 (2^32 - 1) + 1" in text and MAX_MODEL_SEED == 1000 * (2**32 - 1) + 1


def test_the_smallest_clouds_readme_names_are_the_ones_register_takes(tmp_path):
    """"a cloud too small for the kNN graphs (fewer than 11 fixed or 10 moving points) ... is refused": 10
    fixed or 9 moving points are refused naming the file, 11 fixed with 10 moving points register."""
    import cyclereg.api
    from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair
    from cyclereg.errors import InputError
    from cyclereg.pointio import write_points

    fixed, moving = (int(n) for n in re.search(r"fewer than (\d+) fixed or (\d+) moving", README).groups())
    pair = make_breathing_pair(0, BreathingConfig(n_fixed=100, n_moving=200, branches=10, steps=20))
    for n_f, n_m, ok in ((fixed - 1, 200, False), (100, moving - 1, False), (fixed, moving, True)):
        folder = tmp_path / f"{n_f}_{n_m}"
        write_points(folder / "f.csv", pair.fixed_mm[:n_f])
        write_points(folder / "m.csv", pair.moving_mm[:n_m])
        if ok:
            r = cyclereg.api.register(folder / "f.csv", folder / "m.csv", folder / "out", verbose=False)
            assert r.files == ("displacements.csv",) and (folder / "out" / "config.json").is_file()
        else:
            with pytest.raises(InputError, match=("f" if n_f < fixed else "m") + r"\.csv"):
                cyclereg.api.register(folder / "f.csv", folder / "m.csv", folder / "out", verbose=False)
            assert not (folder / "out").exists()


def test_the_paper_schedules_are_what_pretrain_random_builds_by_default():
    """The paper's settings (Sec. 2.3.1 / 3.1), as the brief lists them, are the defaults the commands use:
    keypoints T = 5 stages of 60 epochs, batch 4, Adam 1e-3 x0.1 at epochs 40 and 52, sampling weights
    sigmoid(+5) for the easiest pair to sigmoid(-5) for the hardest; volumes T = 8 stages of 1000
    iterations, batch 2, cosine from 1e-3 to 1e-5 (warm restart every stage)."""
    from cyclereg.training.api import dense_cycle_config
    from cyclereg.training.clouds import CloudCycleConfig, cycle_config
    from cyclereg.training.dense import DenseCycleConfig
    from cyclereg.training.scheduler import difficulty_weights

    clouds = cycle_config()  # what pretrain-random builds for a keypoint dataset when no option is given
    assert clouds == CloudCycleConfig()
    assert (clouds.stages, clouds.epochs, clouds.batch_size, clouds.lr) == (5, 60, 4, 1e-3)
    assert (clouds.lr_milestones, clouds.lr_gamma) == ((40, 52), 0.1)
    weights = difficulty_weights({"easy": 0.5, "mid": 1.0, "hard": 2.0}, logit_range=clouds.sampling_logit_range)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert [weights[k] for k in ("easy", "mid", "hard")] == pytest.approx([sigmoid(5), 0.5, sigmoid(-5)])
    dense = dense_cycle_config()
    assert dense == DenseCycleConfig()
    assert (dense.stages, dense.iterations, dense.batch_size, dense.lr, dense.lr_min) == (8, 1000, 2, 1e-3, 1e-5)
    assert dense.sampling_logit_range == clouds.sampling_logit_range
    for line in ("T=5 stages x 60 epochs per fold", "T=8 x 1000 iterations"):  # README's comments on the commands
        assert line in README


def _attribute_docs(cls) -> dict[str, str]:
    """``{attribute: its text}`` from the ``Attributes:`` section of a dataclass docstring."""
    body = inspect.getdoc(cls).split("Attributes:")[1]
    out, current = {}, []
    for line in body.splitlines():
        head = re.match(r"^    (\w+)(?:, (\w+))?: (.*)", line)
        if head:
            current = [n for n in head.groups()[:2] if n]
            out.update({n: head.group(3) for n in current})
        elif line.startswith("        "):
            for n in current:
                out[n] += " " + line.strip()
    return out


def _config_classes():
    from cyclereg.clouds.lbp import LBPConfig
    from cyclereg.clouds.pipeline import CloudRegConfig
    from cyclereg.clouds.tps import TPSConfig
    from cyclereg.dense import config as dense_config
    from cyclereg.keypoints.foerstner import FoerstnerConfig
    from cyclereg.training.clouds import CloudCycleConfig
    from cyclereg.training.dense import DenseCycleConfig

    return (CloudRegConfig, CloudCycleConfig, DenseCycleConfig, FoerstnerConfig, LBPConfig, TPSConfig,
            dense_config.FeatureNetConfig, dense_config.ConvexConfig, dense_config.AdamConfig,
            dense_config.PreprocessConfig, dense_config.DensePipelineConfig)


def test_configuration_docstrings_state_the_dataclass_defaults():
    """Every attribute a configuration docstring gives as "(paper: N)" or "Default N" has that default
    (the paper's numbers and the documented choices); the attributes documented are the dataclass fields."""
    stated = 0
    for cls in _config_classes():
        docs, default = _attribute_docs(cls), cls()
        assert set(docs) <= {f.name for f in dataclasses.fields(cls)}, cls.__name__
        for name, text in docs.items():
            for found in re.finditer(r"\(paper: ([\d.e-]+)\)|\bDefault ([\d.]+)\b", text):
                want = float(found.group(1) or found.group(2))
                assert getattr(default, name) == pytest.approx(want), (cls.__name__, name, text)
                stated += 1
    assert stated >= 8


def test_readme_paths_and_library_names_exist():
    """Files README points at (scripts, benchmarks, examples, C sources, model READMEs) exist, and every
    dotted library name of README and of the package docstring resolves (``cyclereg.api.register``, the
    ``:func:`` / ``:class:`` / ``:mod:`` references, ``native.reason`` / ``native.SWEEPS.reason``)."""
    import cyclereg
    from cyclereg.clouds import native as cloud_native
    from cyclereg.dense import native as dense_native

    paths = set(re.findall(r"(?<![\w./-])((?:scripts|benchmarks|examples|cyclereg|models|docs)/[\w./-]*\w)", README))
    paths = {p.replace("foldK", "fold1") for p in paths}
    assert len(paths) >= 20
    assert sorted(p for p in paths if not (ROOT / p).exists()) == []

    def resolve(name: str):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for part in parts[i:]:
                obj = getattr(obj, part)
            return obj
        raise ImportError(name)

    names = {n for n in re.findall(r"(?<![\w/.])(cyclereg(?:\.\w+)+)", README) if n != "cyclereg.lock"}  # a file
    names |= set(re.findall(r":(?:func|class|mod|attr|data|meth):`~?([\w.]+)`", cyclereg.__doc__))
    names |= {"cyclereg.training.api.run_cycle"}  # "`cyclereg.training.api.pretrain_random` / `run_cycle`"
    for name in sorted(names):
        resolve(name)
    assert callable(cloud_native.reason) and callable(cloud_native.SWEEPS.reason) and callable(dense_native.reason)


def test_the_readme_example_dataset_is_read_as_described(tmp_path):
    """README's dataset.json example, with small synthetic clouds at its paths: ``evaluate`` scores the pair
    that has landmarks and names the three without (``without_landmarks``), keeps the two folds, and the
    identity's TRE is the mean length of the landmark motion (computed here)."""
    import cyclereg.api
    from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair
    from cyclereg.pointio import write_points

    example = json.loads(re.search(r"```json\n(.*?)```", README, re.S).group(1))
    tiny = BreathingConfig(n_fixed=100, n_moving=200, branches=10, steps=20)
    motion = None
    for i, entry in enumerate(example["pairs"]):
        pair = make_breathing_pair(i, tiny)
        points = {"fixed_keypoints": pair.fixed_mm, "moving_keypoints": pair.moving_mm,
                  "fixed_landmarks": pair.fixed_mm[:10],
                  "moving_landmarks": pair.fixed_mm[:10] + pair.displacement_mm[:10]}
        for key, file in entry.items():
            if key != "id":
                write_points(tmp_path / file, points[key])
        if "fixed_landmarks" in entry:
            motion = pair.displacement_mm[:10].double().norm(dim=1).mean().item()
    (tmp_path / "dataset.json").write_text(json.dumps(example))
    report = cyclereg.api.evaluate(tmp_path / "dataset.json", tmp_path / "r.json", identity=True)
    assert report["without_landmarks"] == ["p02", "p03", "p04"] and report["num_pairs"] == 1
    assert report["mean_tre_mm"] == pytest.approx(motion, abs=1e-4)  # csv files keep 6 decimals
    assert report["mean_sdlogj"] == 0.0  # on the example's volume grid: the identity is exactly smooth
    assert json.loads((tmp_path / "r.json").read_text())["without_landmarks"] == ["p02", "p03", "p04"]


def test_the_stage_line_readme_quotes_is_the_one_a_finished_stage_prints():
    """README: "``fold 2: stage 3 finished in 0:21:04: train loss 2.03 mm, label disagreement 2.51 mm, labels
    moved 0.87 mm``": the line :func:`stage_summary` makes from the ``log.jsonl`` record with those figures
    (the ``fold 2:`` prefix is the worker's label)."""
    from cyclereg.training.scheduler import stage_summary

    quote = re.search(r"`(fold \d+: stage \d+ finished in [^`]*)`", " ".join(README.split())).group(1)
    fold, stage, h, m, s, loss, disagreement, moved = re.fullmatch(
        r"fold (\d+): stage (\d+) finished in (\d+):(\d+):(\d+): train loss ([\d.]+) mm, label disagreement "
        r"([\d.]+) mm, labels moved ([\d.]+) mm", quote).groups()
    record = {"stage": int(stage), "seconds": int(h) * 3600 + int(m) * 60 + int(s), "train_loss_mm": float(loss),
              "pseudo_label_disagreement_mm": float(disagreement), "pseudo_label_change_mm": float(moved)}
    assert f"fold {fold}: " + stage_summary(record) == quote


def test_the_demo_gives_the_errors_readme_and_the_benchmarks_quote(capsys):
    """Quick start: "13.9 mm -> 3.5 mm mean error at the fixed keypoints"; docs/benchmarks.md's row of the
    demo: "13.92 -> 3.48 mm". The demo (seed 0, CPU) gives both, to their digits."""
    from cyclereg.clouds.api import run_demo

    before, after = (float(x) for x in re.search(r"\(([\d.]+) mm -> ([\d.]+) mm mean error", README).groups())
    bench = re.search(r"quick-start demo[^|]*\| ([\d.]+) -> ([\d.]+) mm", BENCHMARKS).groups()
    result = run_demo(None, seed=0, device="cpu")
    capsys.readouterr()
    got = result["error_before_mm"]["mean"], result["error_after_mm"]["mean"]
    assert (round(got[0], 1), round(got[1], 1)) == (before, after)
    assert (f"{got[0]:.2f}", f"{got[1]:.2f}") == bench


@pytest.mark.parametrize("in_readme, in_benchmarks", [
    ("| 11.99 mm | `--identity` |", "| COPD, initial TRE | 11.99 mm"),
    ("| 5.98 mm | `--model random --seed 0` |", "| COPD, random network (stage 0, no training) | 5.98 mm"),
    ("**2.04 mm** (2.0422; SDlogJ 0.042), 43 s", "**2.04 mm** (2.0422), SDlogJ 0.042, **43 s**"),
    ("1.98 mm (1.9779; SDlogJ 0.043), 56 s", "**1.98 mm** (1.9779), SDlogJ 0.043"),
    ("2.00 / 1.98 / 2.12 / 2.02 / 2.04 mm", "2.00 / 1.98 / 2.12 / 2.02 / 2.04"),
    ("2.19 / 2.35 / 2.38 / 2.26 mm", "2.19 / 2.35 / 2.38 / 2.26"),
    ("2.26 / 2.34 / 2.45 / 2.35 mm", "2.26 / 2.34 / 2.45 / 2.35"),
    ("5.14 / 4.33 / 3.24 / 2.71 / 2.48 / 2.26 mm", "5.14 / 4.33 / 3.24 / 2.71 / 2.48 / 2.26 mm"),
    ("(`--no-refine`) 3.37 / 3.50 mm", "3.37 / 3.50"),
    ("(`--no-augment`)\n2.37 / 2.92 mm", "2.37 / 2.92"),
    ("(`--uniform-sampling`) 2.32 / 2.69 mm", "2.32 / 2.69"),
    ("5.0x faster, with Dice 0.386 against\n0.286", "Dice 0.286 vs **17.0 s/pair**, Dice 0.386 (**5.0x faster**"),
])
def test_figures_readme_quotes_from_the_benchmarks_are_there(in_readme, in_benchmarks):
    """The COPD results table, the ablations at the paper's schedule and the dense CPU comparison as README
    quotes them (``in_readme``) appear in docs/benchmarks.md with the same digits (``in_benchmarks``)."""
    assert in_readme in README
    assert in_benchmarks in BENCHMARKS

