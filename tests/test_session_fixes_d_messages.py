"""Messages and records mended in a session (2026-12-07), each one that said or wrote something other than what
happened.

``status --stages T`` of a run trimmed to a ``final.pt`` of fewer stages ('cannot go on') showed a time-left
estimate: none now. ``cycle --stages T --stop-below MM`` that refused (e.g. unreadable stage-0 labels) had raised
the run's stage target and recorded the rule in run.json first: run.json is left as it was now.
``pretrain-random --supervision mind|ncc`` said 'stage-0 pseudo labels are in RUN' though such a run has none:
it says so now. ``pretrain-random`` into a run whose stage-0 labels all exist took ``--val-pairs``, ``--jobs`` and
``--device`` without a word (they only shape the making of labels, and none were made): a note on stderr names
them now (not a refusal: they are not part of the run's configuration, and the same command completes an
interrupted run). ``register`` named a missing file (``--reference X``, the clouds) before saying that options
do not go together (``--spacing`` with ``--reference``, ``--seed`` with a checkpoint, an option of another path):
the options are checked first now. A ``cycle`` killed (SIGTERM) or stopped (Ctrl-C) when every fold it was given had
finished said 'run the same command again to resume': it says that nothing is left to do now.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cyclereg.clouds.synthetic import BreathingConfig
from cyclereg.training.scheduler import StageScheduler
from cyclereg_cli.main import app

from conftest import intraop_threads, write_synthetic_pairs_dataset
from test_cycle_dense import _dataset, _ToyTask

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = ["--stages", "1", "--epochs", "1", "--train-points", "100,200", "--tta-passes", "0", "--recentre-passes", "0"]


@pytest.fixture
def one_thread():
    with intraop_threads(1):
        yield


def _tiny_run(tmp_path: Path, *options: str) -> tuple[Path, Path]:
    """A keypoint dataset of two tiny pairs and a run with fold 1's stage-0 labels: (dataset, run)."""
    ds = write_synthetic_pairs_dataset(tmp_path, BreathingConfig(n_fixed=150, n_moving=300, branches=10, steps=20),
                                       landmarks=5)
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST, *options])
    assert res.exit_code == 0, res.output
    return ds, run


def test_status_of_a_trimmed_run_that_cannot_go_on_estimates_no_time_left(tmp_path):
    """Trimmed to its final.pt (stage 2): towards 2 stages it is finished (0 s left); towards 3 it cannot go on,
    and no time is left to estimate (it said the pace of a stage)."""
    s = StageScheduler(_ToyTask(), tmp_path, keep_labels=2)
    s.run_stage0()
    assert s.run(2) == 2
    for path in [*tmp_path.glob("pseudo*"), *tmp_path.glob("stage*.pt")]:
        path.unlink()
    assert s.status(2)["remaining_s"] == 0.0
    longer = s.status(3)
    assert longer["next"].startswith("cannot go on") and longer["remaining_s"] is None


def test_status_command_of_the_trimmed_abd4_towards_more_stages_shows_no_estimate(tmp_path):
    run = tmp_path / "abd4"
    shutil.copytree(REPO / "carried-runs" / "abd4", run)
    res = runner.invoke(app, ["status", str(run), "--stages", "5", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "s.json").read_text())["folds"][0]
    assert row["next"].startswith("cannot go on") and row["remaining_s"] is None
    assert "0:10:03" not in res.output


def test_cycle_that_refuses_leaves_run_json_as_it_was(tmp_path, one_thread):
    ds, run = _tiny_run(tmp_path)
    (run / "fold1" / "pseudo0.pt").write_bytes(b"not labels")
    before = (run / "run.json").read_bytes()
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "3",
                              "--stop-below", "0.5"])
    assert res.exit_code == 2 and "pseudo0.pt: unreadable pseudo labels" in res.output, res.output
    assert (run / "run.json").read_bytes() == before  # stages 1, no stopping rule: as before the command


@pytest.mark.parametrize("metric", ["mind", "ncc"])
def test_pretrain_random_of_a_metric_supervised_run_says_it_made_no_labels(tmp_path, one_thread, metric):
    ds = _dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    args = ["pretrain-random", str(ds), "-o", str(run), "--supervision", metric, "--stages", "1",
            "--iterations", "2", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    line = res.stdout.splitlines()[-1]
    assert line == (f"the run is ready in {run}: --supervision {metric} needs no pseudo labels (its stage 0 holds "
                    "none); 'cyclereg cycle' trains it")
    res = runner.invoke(app, args)  # again: stage 0 is there already
    assert res.exit_code == 0, res.output
    assert "(its stage 0 holds none, recorded before)" in " ".join(res.stdout.split())
    assert "pseudo labels are in" not in res.output


def test_pretrain_random_into_labelled_folds_notes_the_options_it_did_not_use(tmp_path, one_thread):
    ds, run = _tiny_run(tmp_path)
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", "--val-pairs", "1",
                              "--jobs", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.stderr == "note: --val-pairs 1, --jobs 2, --device cpu not used: the stage-0 labels exist already\n"
    assert res.stdout.splitlines()[-1].endswith("(the stage-0 labels that were there already were kept)")
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1"])
    assert res.exit_code == 0 and res.stderr == "", res.output  # none given: nothing to note
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--device", "cpu"])
    assert res.exit_code == 0 and "not used" not in res.stderr, res.output  # fold 2 labelled now: used
    assert "made now: fold2" in " ".join(res.stdout.split())


@pytest.mark.parametrize(("inputs", "options", "said"), [
    (["f.csv", "m.csv"], ["--reference", "missing.nii.gz", "--spacing", "1,1,1"], "--spacing: not used with --reference"),
    (["gone.csv", "m.csv"], ["--model", "missing.pt", "--seed", "1"], "--seed is an option for"),
    (["gone.nii.gz", "m.nii.gz"], ["--reference", "missing.nii.gz"], "--reference is an option for point-cloud files"),
    (["gone.csv", "m.csv"], ["--warps", "1"], "--warps is an option for volumes, not point clouds"),
])
def test_register_names_options_that_do_not_go_together_before_missing_files(pair_files, inputs, options, said):
    d, _ = pair_files
    res = runner.invoke(app, ["register", *(str(d / name) for name in inputs), "-o", str(d / "out"),
                              *(str(d / o) if o.endswith((".gz", ".pt")) else o for o in options)])
    assert res.exit_code == 2 and said in res.output and "does not exist" not in res.output, res.output
    assert not (d / "out").exists()


@pytest.mark.parametrize(("interrupt", "line"), [
    (lambda: SystemExit(128 + signal.SIGTERM), "cyclereg: terminated"),  # what cyclereg.interrupts.sigterm_exit raises
    (KeyboardInterrupt, "cyclereg: interrupted"),
], ids=["SIGTERM", "SIGINT"])
def test_cycle_stopped_with_nothing_left_to_do_does_not_say_run_again(tmp_path, one_thread, monkeypatch, interrupt,
                                                                      line):
    import cyclereg.training.api as training

    ds, run = _tiny_run(tmp_path)
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"]).exit_code == 0

    def stopped():
        raise interrupt()

    monkeypatch.setattr(training, "_progress", stopped)  # the kill lands once the folds are locked and checked
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"])
    assert res.exit_code in (130, 143)
    assert res.stderr == f"{line}; every stage it was to train had finished: nothing is left to do\n"
    resume = f"{line}; run the same command again to resume where it stopped\n"
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "2"])
    assert res.exit_code in (130, 143) and res.stderr == resume  # stage 2 is left to train
