"""Contracts of the mended scripts that a mutation audit (2026-12-07) found unpinned.

Audited: ``scripts/run_model_set.py`` (the parent folders of ``-o`` it made go again after a failure: all of
them, deepest first, never one that existed), ``scripts/set_cloud_test_time.py`` (the run-checkpoint rule: a
folder that keeps a ``run.json`` beside its top-level ``foldK.pt`` -- what ``scripts/ensemble_stage.py`` and an
exported stage folder hold -- is still rewritten, while ``RUN/foldK/*.pt`` is refused before anything is
rewritten), ``scripts/ensemble_stage.py`` (the bounds of ``--jobs``, ``--folds``, ``--members`` and the
``--dataset`` / ``--learner`` path checks: the first and last valid value is accepted and starts exactly the
jobs it names, the first invalid one is one line), plus the ``exported`` status rows of
:func:`cyclereg.training.api.run_status` read by :func:`cyclereg.training.status.unfinished_folds`. Each test
fails on a hand-made mutant that the earlier tests let pass.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cyclereg.checkpoint import load_checkpoint, save_checkpoint, to_jsonable
from cyclereg.clouds.features import build_graph_net
from cyclereg.clouds.lbp import LBPConfig
from cyclereg.clouds.pipeline import CloudRegConfig
from cyclereg.training.clouds import CloudCycleConfig
from cyclereg_cli.main import app

from conftest import load_script
from test_scripts_walk import _outcome, _sums


def _refused(code, err: str, *named: str) -> None:
    """As test_scripts_walk's, but argparse's usage line may come first: the names are read in the last line."""
    assert code not in (0, None), code
    assert "Traceback" not in err, err
    last = err.splitlines()[-1] if err else err
    for name in named:
        assert name in last, (name, err)


def _cloud_ckpt(path: Path, seed: int) -> None:
    cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=16))
    save_checkpoint(path, kind="cloud", config=cfg, state_dict=build_graph_net(cfg.net, seed=seed).state_dict(),
                    extra={"stage": 1})


def _run_json(folder: Path, folds: int = 2) -> None:
    (folder / "run.json").write_text(json.dumps({"kind": "keypoints", "pairs": [f"c{k}" for k in range(folds)],
                                                 "folds": [[f"c{k}"] for k in range(folds)],
                                                 "config": to_jsonable(CloudCycleConfig())}))


def _fake_run(run: Path) -> Path:
    """A two-fold keypoint run (run.json, foldK/stage1.pt and final.pt) whose fold 2 final.pt is damaged."""
    run.mkdir(parents=True)
    _run_json(run)
    for k in (1, 2):
        (run / f"fold{k}").mkdir()
        _cloud_ckpt(run / f"fold{k}" / "stage1.pt", seed=k)
        (run / f"fold{k}" / "final.pt").write_bytes((run / f"fold{k}" / "stage1.pt").read_bytes())
    return run


# ----------------------------------------------------------------------------- scripts/run_model_set.py
def test_run_model_set_removes_every_parent_it_made_three_deep(tmp_path, capsys):
    """-o a/b/c/set with a/ missing and fold 2 damaged: a, a/b and a/b/c were made for it and all go again
    (a shallow-first cleanup stops at the non-empty a/b and leaves them)."""
    mod = load_script("scripts/run_model_set.py")
    run = _fake_run(tmp_path / "run")
    (run / "fold2" / "final.pt").write_bytes(b"damaged")
    code, err = _outcome(lambda: mod.main([str(run), "-o", str(tmp_path / "a" / "b" / "c" / "set")]), capsys)
    _refused(code, err, str(run / "fold2" / "final.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_run_model_set_keeps_an_empty_parent_that_existed(tmp_path, capsys):
    """-o keep/new/set where keep/ existed (empty): after the failure new/ goes, keep/ stays."""
    mod = load_script("scripts/run_model_set.py")
    run = _fake_run(tmp_path / "run")
    (run / "fold2" / "final.pt").write_bytes(b"damaged")
    (tmp_path / "keep").mkdir()
    code, err = _outcome(lambda: mod.main([str(run), "-o", str(tmp_path / "keep" / "new" / "set")]), capsys)
    _refused(code, err, str(run / "fold2" / "final.pt"))
    assert (tmp_path / "keep").is_dir() and list((tmp_path / "keep").iterdir()) == []


def test_run_model_set_removes_the_parents_it_made_for_an_output_with_dotdot(tmp_path, capsys):
    mod = load_script("scripts/run_model_set.py")
    run = _fake_run(tmp_path / "run")
    (run / "fold2" / "final.pt").write_bytes(b"damaged")
    code, err = _outcome(lambda: mod.main([str(run), "-o", str(tmp_path / "new" / "sub" / ".." / "set")]), capsys)
    _refused(code, err, str(run / "fold2" / "final.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ----------------------------------------------------------------------------- scripts/set_cloud_test_time.py
def _set_test_time(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["set_cloud_test_time.py", *argv])
    load_script("scripts/set_cloud_test_time.py").main()


@pytest.fixture
def stage_folder(tmp_path) -> Path:
    """A folder of exported fold1.pt / fold2.pt that keeps a keypoint run.json beside them (ensemble_stage.py's
    member folders, carried-runs/*_stage6)."""
    folder = tmp_path / "member0"
    folder.mkdir()
    _run_json(folder)
    for k in (1, 2):
        _cloud_ckpt(folder / f"fold{k}.pt", seed=10 + k)
    return folder


@pytest.mark.parametrize("as_folder", [True, False])
def test_set_cloud_test_time_rewrites_the_top_level_folds_beside_a_run_json(stage_folder, monkeypatch, capsys,
                                                                           as_folder):
    record = (stage_folder / "run.json").read_bytes()
    paths = [str(stage_folder)] if as_folder else [str(stage_folder / "fold1.pt"), str(stage_folder / "fold2.pt")]
    _set_test_time(monkeypatch, *paths, "--tta-passes", "3")
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    for k in (1, 2):
        assert load_checkpoint(stage_folder / f"fold{k}.pt", kind="cloud")["config"]["tta_passes"] == 3
    assert (stage_folder / "run.json").read_bytes() == record


def test_set_cloud_test_time_refuses_a_run_checkpoint_after_a_valid_set_and_rewrites_neither(
        stage_folder, tmp_path, monkeypatch, capsys):
    """The good folder comes first on the command line: the run's own stage1.pt still stops everything."""
    run = _fake_run(tmp_path / "run")
    before = _sums(tmp_path)
    bad = run / "fold2" / "stage1.pt"
    code, err = _outcome(lambda: _set_test_time(monkeypatch, str(stage_folder), str(bad), "--tta-passes", "3"),
                         capsys)
    _refused(code, err, str(bad), "export")
    assert _sums(tmp_path) == before


# ----------------------------------------------------------------------------- scripts/ensemble_stage.py
@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> Path:
    """``cyclereg ensemble`` of two keypoint runs: folds 1 and 2, members 0 and 1."""
    d = tmp_path_factory.mktemp("ens")
    _fake_run(d / "ra")
    _fake_run(d / "rb")
    for k in (1, 2):  # distinct networks, undamaged
        _cloud_ckpt(d / "rb" / f"fold{k}" / "final.pt", seed=100 + k)
    res = CliRunner().invoke(app, ["ensemble", str(d / "ra"), str(d / "rb"), "-o", str(d / "e")])
    assert res.exit_code == 0, res.output
    (d / "dataset.json").write_text("{}")
    return d / "e"


def _stage(ensemble, tmp_path, monkeypatch, capsys, *args):
    """(exit code, stderr, [(fold, member, learner) of each job], workers) with the jobs recorded, not run."""
    mod = load_script("scripts/ensemble_stage.py")
    seen = {}

    def record(jobs, workers, *a, **k):
        seen["jobs"] = [(args_[3], args_[4], args_[5]) for _, args_, _ in jobs]
        seen["workers"] = workers

    monkeypatch.setattr(mod, "run_parallel", record)
    monkeypatch.setattr(sys, "argv", ["ensemble_stage.py", str(ensemble), str(tmp_path / "out"),
                                      "--dataset", str(ensemble.parent / "dataset.json"), *args])
    code, err = _outcome(mod.main, capsys)
    return code, err, seen.get("jobs"), seen.get("workers")


def test_ensemble_stage_accepts_one_job_at_a_time(ensemble, tmp_path, monkeypatch, capsys):
    code, err, jobs, workers = _stage(ensemble, tmp_path, monkeypatch, capsys, "--jobs", "1")
    assert code in (0, None), err
    assert workers == 1 and sorted(jobs) == [(1, 0, None), (1, 1, None), (2, 0, None), (2, 1, None)]


@pytest.mark.parametrize("folds, want", [("2", [2]), ("1", [1]), ("1,2", [1, 2])])
def test_ensemble_stage_runs_exactly_the_named_folds(ensemble, tmp_path, monkeypatch, capsys, folds, want):
    code, err, jobs, _ = _stage(ensemble, tmp_path, monkeypatch, capsys, "--folds", folds)
    assert code in (0, None), err
    assert sorted(jobs) == sorted((k, i, None) for k in want for i in (0, 1))


@pytest.mark.parametrize("members, want", [("0", [0]), ("1", [1]), ("1,0", [0, 1])])
def test_ensemble_stage_runs_exactly_the_named_members(ensemble, tmp_path, monkeypatch, capsys, members, want):
    code, err, jobs, _ = _stage(ensemble, tmp_path, monkeypatch, capsys, "--members", members)
    assert code in (0, None), err
    assert sorted(jobs) == sorted((k, i, None) for k in (1, 2) for i in want)


@pytest.mark.parametrize("members", ["2", "-1", "0,2"])
def test_ensemble_stage_refuses_a_member_past_the_last(ensemble, tmp_path, monkeypatch, capsys, members):
    code, err, jobs, _ = _stage(ensemble, tmp_path, monkeypatch, capsys, "--members", members)
    _refused(code, err, "--members", "0..1")
    assert jobs is None and not (tmp_path / "out").exists()


def test_ensemble_stage_refuses_a_learner_folder_without_run_json(ensemble, tmp_path, monkeypatch, capsys):
    learner = tmp_path / "learner"
    learner.mkdir()
    code, err, jobs, _ = _stage(ensemble, tmp_path, monkeypatch, capsys, "--learner", str(learner))
    _refused(code, err, "--learner", str(learner), "run.json")
    assert jobs is None and not (tmp_path / "out").exists()


def test_ensemble_stage_runs_a_learner_with_run_json_on_every_fold(ensemble, tmp_path, monkeypatch, capsys):
    learner = tmp_path / "learner"
    learner.mkdir()
    _run_json(learner)
    code, err, jobs, _ = _stage(ensemble, tmp_path, monkeypatch, capsys, "--learner", str(learner))
    assert code in (0, None), err
    assert sorted(jobs) == [(1, None, learner), (2, None, learner)]


def test_ensemble_stage_refuses_a_dataset_that_is_a_folder(ensemble, tmp_path, monkeypatch, capsys):
    mod = load_script("scripts/ensemble_stage.py")
    monkeypatch.setattr(mod, "run_parallel", lambda *a, **k: pytest.fail("no job may start"))
    monkeypatch.setattr(sys, "argv", ["ensemble_stage.py", str(ensemble), str(tmp_path / "out"),
                                      "--dataset", str(tmp_path)])
    code, err = _outcome(mod.main, capsys)
    _refused(code, err, "--dataset", str(tmp_path))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- examples/
@pytest.mark.parametrize("example, first_work", [("examples/own_ct_pairs.py", "make_moving"),
                                                 ("examples/chest_ct_end_to_end.py", "random_field")])
@pytest.mark.parametrize("inside", ["e2e", "fold1/e2e"])
def test_examples_refuse_an_output_inside_a_run_before_any_work(tmp_path, monkeypatch, capsys, example, first_work,
                                                                inside):
    """--out in a run directory (or one of its fold folders): one line naming the run, the run unchanged; the
    first step of the work (patched to raise) is never reached."""
    import nibabel as nib
    import numpy as np

    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(ct))
    run = _fake_run(tmp_path / "run")
    before = _sums(run)
    mod = load_script(example)

    def started(*a, **k):
        raise RuntimeError("the work started")

    monkeypatch.setattr(mod, first_work, started)
    code, err = _outcome(lambda: mod.main(["--ct", str(ct), "--out", str(run / inside)]), capsys)
    _refused(code, err, "--out", str(run))
    assert _sums(run) == before


# ----------------------------------------------------------------------------- benchmarks/organ_table.py
def _organ_table(report: Path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["organ_table.py", str(report)])
    return _outcome(load_script("benchmarks/organ_table.py").main, capsys)


def test_organ_table_names_a_report_that_is_a_folder_in_one_line(tmp_path, monkeypatch, capsys):
    code, err = _organ_table(tmp_path, monkeypatch, capsys)
    _refused(code, err, str(tmp_path))
    assert len(err.splitlines()) == 1


def test_organ_table_names_a_report_that_is_not_json_in_one_line(tmp_path, monkeypatch, capsys):
    report = tmp_path / "report.json"
    report.write_text("not json")
    code, err = _organ_table(report, monkeypatch, capsys)
    _refused(code, err, str(report))
    assert len(err.splitlines()) == 1
