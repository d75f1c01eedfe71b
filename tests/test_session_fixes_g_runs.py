"""Contracts of the training-run checks mended in a session of small fixes (2026-12-07).

A run directory's ``run.json`` edited by hand into another valid configuration (another number of epochs, seed,
augmentation switch or network width) after some stages had finished was resumed by ``cyclereg cycle`` with the
edited settings quietly, although its saved stages were trained with the old ones (a network width change failed
later, naming the stage checkpoint). Every stage checkpoint now records the run's configuration
(``extra["run_config"]``), and a resumed run compares run.json with the checkpoint of its last finished stage (older
checkpoints: their registration settings and number of epochs): a difference is one line naming run.json and the
first differing setting (the checkpoint's value -> run.json's), and nothing is written. The settings a resumed run
may change stay free: the stage target (``cycle --stages``), the learning rate (lowered after a diverged stage, as
that error says), and a volume run's training precision.

``pretrain-random --jobs 2`` started worker processes (seconds each) where one fold was left to label, because the
folds whose stage-0 labels existed already were counted with it; those are now brought up to date in-process first
(as ``cycle`` does with its finished folds), and the fold left, alone, is labelled in-process too: the same labels.

Each test checks the exact message fragment naming the file, and that the run's files are as they were.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cyclereg_cli.main import app

from test_cycle_clouds import CHEAP_LABELS, _dataset

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_intraop_thread")
ARGS = ["--stages", "1", "--epochs", "1", "--train-points", "100,200", "--device", "cpu", *CHEAP_LABELS]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, one_intraop_thread):
    """``(dataset.json, run)``: fold 1 of a two-pair dataset trained for its 1 stage (never changed)."""
    d = tmp_path_factory.mktemp("runs_g")
    ds = _dataset(d, n=2)
    run = d / "run"
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *ARGS]).exit_code == 0
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"])
    assert res.exit_code == 0, res.output
    return ds, run


@pytest.fixture
def run_copy(stage1, tmp_path):
    ds, run = stage1
    shutil.copytree(run, tmp_path / "run")
    return ds, tmp_path / "run"


def _files(run):
    return {str(p.relative_to(run)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                      p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))}


def _edit(run, path: tuple[str, ...], value):
    meta = json.loads((run / "run.json").read_text())
    node = meta["config"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (run / "run.json").write_text(json.dumps(meta))


def _cycle(ds, run, stages="2"):
    return runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", stages])


EDITS = [(("epochs",), 2, "epochs: 1 -> 2"), (("augment",), False, "augment: True -> False"),
         (("seed",), 4, "seed: 0 -> 4"),
         (("reg", "net", "channels"), [16, 16, 32], "reg.net.channels: [32, 32, 64] -> [16, 16, 32]")]


@pytest.mark.parametrize("path, value, named", EDITS, ids=[e[2].split(":")[0] for e in EDITS])
def test_a_run_json_edited_after_a_finished_stage_is_refused_naming_the_setting(run_copy, path, value, named):
    ds, run = run_copy
    _edit(run, path, value)
    before = _files(run)
    res = _cycle(ds, run)
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output, said
    assert (f"cyclereg: error: {run / 'run.json'}: the run's finished stages were trained with another configuration "
            f"(fold1/stage1.pt's -> run.json's: {named}); put it back in run.json, or start a new run directory") \
        in said, said
    assert _files(run) == before  # run.json's stage target put back, nothing trained


def test_the_settings_a_resumed_run_may_change_are_still_taken(run_copy):
    """A lower lr (what a diverged stage's error asks for) and a larger --stages: the run goes on."""
    ds, run = run_copy
    _edit(run, ("lr",), 1e-4)
    res = _cycle(ds, run, "2")
    assert res.exit_code == 0, res.output
    ckpt = torch.load(run / "fold1" / "stage2.pt", weights_only=True)
    assert ckpt["extra"]["run_config"]["lr"] == 1e-4 and ckpt["extra"]["run_config"]["epochs"] == 1
    assert json.loads((run / "run.json").read_text())["config"]["stages"] == 2


@pytest.mark.parametrize("path, value, named", [
    (("epochs",), 2, "epochs: 1 -> 2"),
    (("reg", "net", "channels"), [16, 16, 32], "reg.net.channels: [32, 32, 64] -> [16, 16, 32]"),
    (("refine_lbp_iterations",), 3, "reg.lbp.iterations: 10 -> 3")])
def test_a_checkpoint_without_the_run_config_is_compared_by_what_it_records(run_copy, path, value, named):
    """Checkpoints before 2026-12-07: their registration settings and the stage's epochs."""
    ds, run = run_copy
    ckpt_path = run / "fold1" / "stage1.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["extra"]["run_config"]
    torch.save(ckpt, ckpt_path)
    _edit(run, path, value)
    before = _files(run)
    res = _cycle(ds, run)
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and f"(fold1/stage1.pt's -> run.json's: {named})" in said, said
    assert f"{run / 'run.json'}: the run's finished stages" in said and _files(run) == before


def test_the_carried_keypoint_runs_resume_with_their_own_run_json():
    """Runs trained before the record (and one extended to stage 7) pass the check as they are; an edit does not."""
    from cyclereg.errors import InputError
    from cyclereg.training.api import _read_meta, _require_trained_with, fold_dir
    from cyclereg.training.clouds import CloudCycleConfig, test_time_config

    for name in ("copd_lr1", "copd_lr1_t7", "copd_rel05"):
        run = REPO / "carried-runs" / name
        if not (run / "run.json").is_file():
            pytest.skip("carried runs not in this checkout")
        cfg = CloudCycleConfig.from_dict(_read_meta(run)["config"])
        for k in range(1, 6):
            _require_trained_with(run, fold_dir(run, k), cfg, replace(test_time_config(cfg), training_box=None),
                                  "keypoints")
    edited = replace(cfg, epochs=30)
    with pytest.raises(InputError, match=r"\(fold5/stage5\.pt's -> run\.json's: epochs: 60 -> 30\)"):
        _require_trained_with(run, fold_dir(run, 5), edited, replace(test_time_config(edited), training_box=None),
                              "keypoints")


def test_a_volume_run_json_edited_after_a_finished_stage_is_refused(tmp_path):
    """The same for a volume run: with the recorded configuration, and with a checkpoint before the record."""
    from test_cycle_dense import _dataset as volume_dataset

    ds = volume_dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--stages", "1", "--iterations", "1",
                               "--device", "cpu"]).exit_code == 0
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(run)]).exit_code == 0
    for old in (False, True):
        if old:
            ckpt = torch.load(run / "all" / "stage1.pt", weights_only=True)
            del ckpt["extra"]["run_config"]
            torch.save(ckpt, run / "all" / "stage1.pt")
        _edit(run, ("iterations",), 3)
        before = _files(run)
        res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--stages", "2", "--device", "cpu"])
        said = " ".join(res.output.split())
        assert res.exit_code == 2 and (f"{run / 'run.json'}: the run's finished stages were trained with another "
                                       "configuration (all/stage1.pt's -> run.json's: iterations: 1 -> 3)") in said, said
        assert _files(run) == before


# ----------------------------------------------------------------------------- pretrain-random --jobs
def test_pretrain_random_labels_the_one_fold_left_without_worker_processes(tmp_path, monkeypatch):
    """Folds 1 and 2 labelled already, then all three with --jobs 2 (and once more, none left): no worker process
    starts, and fold 3's labels are those of the run labelled at once with --jobs 1."""
    import cyclereg.training.parallel as parallel

    ds = _dataset(tmp_path, n=3)
    run, whole = tmp_path / "run", tmp_path / "whole"
    for k in ("1", "2"):
        assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", k, *ARGS]).exit_code == 0

    def no_workers(*args, **kwargs):
        raise AssertionError("worker processes started")

    monkeypatch.setattr(parallel, "run_parallel", no_workers)
    for _ in range(2):  # one fold left, then none
        res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *ARGS, "--jobs", "2"])
        assert res.exit_code == 0 and res.exception is None, (res.output, repr(res.exception))
    assert "(the stage-0 labels that were there already were kept)" in " ".join(res.output.split())
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(whole), *ARGS]).exit_code == 0
    for k in (1, 2, 3):
        got = torch.load(run / f"fold{k}" / "pseudo0.pt", weights_only=True)["labels"]
        want = torch.load(whole / f"fold{k}" / "pseudo0.pt", weights_only=True)["labels"]
        assert got.keys() == want.keys() and all(torch.equal(got[p], want[p]) for p in want)
