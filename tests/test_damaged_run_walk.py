"""Damaged or edited training run directories (keypoint-cloud runs), audited 2026-12-07.

A tiny finished run (two pairs, fold 1 trained for 2 stages of 1 epoch) is copied per test, one of its
files is damaged, and `cycle` (resume), `status`, `evaluate --run`, `ensemble` and `register --model
RUN/fold1/final.pt` are run on it. The rules checked: a damaged file is named in one line with a non-zero
exit and no traceback, never trained or evaluated on silently; a resumed run gives the uninterrupted run's
result; the read-only commands (status, evaluate) leave every file of the run as it was.
Seven bugs the walk found (a run.json edited by hand, a stage checkpoint of another network, pseudo labels
that do not fit, a log line that is not UTF-8, a damaged last stage in status, torch's pickle warning, a
byte-order mark) were mended; their tests fail without the mends.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
import torch
from typer.testing import CliRunner

from cyclereg_cli.main import app

from test_cycle_clouds import CHEAP_LABELS, _dataset

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_intraop_thread")
ARGS = ["--stages", "2", "--epochs", "1", "--train-points", "100,200", "--device", "cpu", *CHEAP_LABELS]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_intraop_thread):
    """``(dataset.json, run)``: fold 1 of a two-pair dataset trained for its 2 stages (never changed)."""
    d = tmp_path_factory.mktemp("damaged_walk")
    ds = _dataset(d, n=2)
    run = d / "run"
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *ARGS]).exit_code == 0
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"])
    assert res.exit_code == 0, res.output
    return ds, run


@pytest.fixture
def run_copy(finished, tmp_path):
    """``(dataset.json, a fresh copy of the finished run)``."""
    ds, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return ds, copy


def _files(run):
    """Every path of the run with its content hash (folders: "dir") and modification time."""
    return {str(p.relative_to(run)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                      p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))}


def _said(res) -> str:
    return " ".join(res.output.split())


def _one_line_error(res, name: str) -> None:
    """Exit 2, no traceback, and an error line that names ``name``."""
    said = _said(res)
    assert res.exit_code == 2, said
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "cyclereg: error:" in said and name in said, said


def _evaluate(ds, run, out, *extra):
    return runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--folds", "1", "--json", str(out),
                               "--device", "cpu", *extra])


def _dense_checkpoint(path):
    from cyclereg.dense.api import save_model
    from cyclereg.dense.config import DensePipelineConfig
    from cyclereg.dense.network import random_feature_net

    cfg = DensePipelineConfig()
    save_model(path, random_feature_net(cfg.net, seed=0), cfg)


def _damage(path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "zero bytes":
        path.write_bytes(b"")
    elif how == "a pickled dict":
        torch.save({"weights": 1}, path)
    elif how == "a dense checkpoint":
        _dense_checkpoint(path)
    else:
        raise AssertionError(how)


DAMAGES = ["truncated", "zero bytes", "a pickled dict", "a dense checkpoint"]


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_final_pt_is_named_by_evaluate_and_register_and_cycle_restores_it(run_copy, tmp_path, how):
    """final.pt is a copy of the last stage's checkpoint: evaluate --run and register --model name it (exit 2,
    no report, no output folder), status leaves the run alone, and the same cycle command writes it again as
    the byte copy of stage2.pt, after which evaluate --run scores the run."""
    ds, run = run_copy
    final = run / "fold1" / "final.pt"
    _damage(final, how)
    before = _files(run)
    _one_line_error(_evaluate(ds, run, tmp_path / "r.json"), "final.pt")
    assert not (tmp_path / "r.json").exists()
    res = runner.invoke(app, ["register", str(ds.parent / "c0" / "fk.csv"), str(ds.parent / "c0" / "mk.csv"),
                              "-o", str(tmp_path / "reg"), "--model", str(final), "--device", "cpu"])
    _one_line_error(res, "final.pt")
    assert not (tmp_path / "reg").exists()
    assert runner.invoke(app, ["status", str(run)]).exit_code == 0
    assert _files(run) == before  # neither evaluate nor status wrote anything
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"])
    assert res.exit_code == 0, res.output
    assert final.read_bytes() == (run / "fold1" / "stage2.pt").read_bytes()
    assert _evaluate(ds, run, tmp_path / "r.json").exit_code == 0 and (tmp_path / "r.json").is_file()


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_last_stage_checkpoint_stops_cycle_and_leaves_final_pt(run_copy, tmp_path, how):
    """stage2.pt damaged (the checkpoint cycle reads to keep final.pt current, and to start stage 3 from):
    cycle and cycle --stages 3 name it and train nothing; final.pt stays as it was, and evaluate --run,
    which reads final.pt, still scores the run."""
    ds, run = run_copy
    _damage(run / "fold1" / "stage2.pt", how)
    final = (run / "fold1" / "final.pt").read_bytes()
    for extra in ([], ["--stages", "3"]):
        res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", *extra])
        _one_line_error(res, "stage2.pt")
    assert (run / "fold1" / "final.pt").read_bytes() == final
    assert not (run / "fold1" / "stage3.pt").exists() and not (run / "fold1" / "pseudo3.pt").exists()
    assert _evaluate(ds, run, tmp_path / "r.json").exit_code == 0


@pytest.mark.parametrize("how", ["truncated", "a dense checkpoint"])
def test_evaluate_at_a_stage_names_that_stages_damaged_checkpoint(run_copy, tmp_path, how):
    """evaluate --run --stage 1 reads stage1.pt: a damaged one is named; the final model is unaffected."""
    ds, run = run_copy
    _damage(run / "fold1" / "stage1.pt", how)
    _one_line_error(_evaluate(ds, run, tmp_path / "r.json", "--stage", "1"), "stage1.pt")
    assert not (tmp_path / "r.json").exists()
    assert _evaluate(ds, run, tmp_path / "r.json").exit_code == 0


def test_a_stage_checkpoint_missing_between_two_present_ones_is_trained_again_as_before(finished, tmp_path):
    """stage2.pt removed while stage1.pt and pseudo2.pt remain: stage 2 does not count as finished, so
    cycle --stages 3 trains stage 2 again (from pseudo1.pt) and then stage 3; with one thread the result is
    bitwise the uninterrupted run's (the same command on an intact copy)."""
    ds, run = finished
    for name in ("intact", "gap"):
        shutil.copytree(run, tmp_path / name)
    (tmp_path / "gap" / "fold1" / "stage2.pt").unlink()
    res = runner.invoke(app, ["status", str(tmp_path / "gap"), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0 and json.loads((tmp_path / "s.json").read_text())["folds"][0]["finished"] == 1
    for name in ("intact", "gap"):
        res = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / name), "--folds", "1", "--stages", "3"])
        assert res.exit_code == 0 and "fold 1: 3" in _said(res), res.output
    for file in ("stage2.pt", "stage3.pt", "final.pt"):
        a = torch.load(tmp_path / "intact" / "fold1" / file, weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "gap" / "fold1" / file, weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    logged = [json.loads(line)["stage"] for line in (tmp_path / "gap" / "fold1" / "log.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 2, 3]  # stage 2 trained again is logged again (status reads its last line)


# ----------------------------------------------------------------------------- run.json, pseudo labels, log, locks
@pytest.mark.parametrize("text", ['{"dataset": "tiny", ', "", '"a string"'])
def test_a_run_json_that_is_not_a_json_object_is_one_line_for_every_command(run_copy, tmp_path, text):
    """run.json cut short, emptied or not an object: cycle and status name run.json (or the run directory
    whose run.json it is) in one line; evaluate --run names run.json; nothing in the run changes."""
    ds, run = run_copy
    (run / "run.json").write_text(text)
    before = _files(run)
    for args in (["cycle", str(ds), "--run", str(run), "--folds", "1"], ["status", str(run)]):
        _one_line_error(runner.invoke(app, args), str(run))
    _one_line_error(_evaluate(ds, run, tmp_path / "r.json"), "run.json")
    assert _files(run) == before and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("how", ["truncated", "zero bytes"])
def test_damaged_pseudo_labels_of_the_last_stage_stop_the_next_stage(run_copy, how):
    """pseudo2.pt (what stage 3 trains on) damaged: cycle --stages 3 names it and trains nothing;
    status still reads the run as finished at stage 2 and changes nothing."""
    ds, run = run_copy
    _damage(run / "fold1" / "pseudo2.pt", how)
    before = _files(run)
    res = runner.invoke(app, ["status", str(run), "--json", str(run.parent / "s.json")])
    assert res.exit_code == 0 and json.loads((run.parent / "s.json").read_text())["folds"][0]["finished"] == 2
    assert _files(run) == before
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "3"])
    _one_line_error(res, "pseudo2.pt")
    assert "unreadable pseudo labels" in _said(res)
    assert not (run / "fold1" / "stage3.pt").exists()


def test_a_log_cut_short_at_its_end_gets_the_stage_line_back_on_resume(run_copy):
    """The last line of log.jsonl cut mid-record (no newline): status leaves it alone; the next cycle writes
    stage 2's line again from the record saved with its labels, on a line of its own."""
    ds, run = run_copy
    log = run / "fold1" / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:30])
    before = _files(run)
    assert runner.invoke(app, ["status", str(run)]).exit_code == 0 and _files(run) == before
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"])
    assert res.exit_code == 0 and "fold 1: stage 2 finished" in _said(res), res.output
    now = log.read_text().splitlines()
    assert now[:3] == [lines[0], lines[1], lines[2][:30]] and json.loads(now[3]) == json.loads(lines[2])


@pytest.mark.parametrize("lock", [".cyclereg.lock", "fold1/.cyclereg.lock"])
def test_a_lock_path_that_is_a_folder_is_named_by_cycle_and_ignored_by_readers(run_copy, tmp_path, lock):
    ds, run = run_copy
    (run / lock).unlink()
    (run / lock).mkdir()
    before = _files(run)
    assert runner.invoke(app, ["status", str(run)]).exit_code == 0
    assert _evaluate(ds, run, tmp_path / "r.json").exit_code == 0
    assert _files(run) == before
    _one_line_error(runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "3"]),
                    lock)


def test_a_fold_folder_replaced_by_a_file(run_copy, tmp_path):
    """fold1 a file: evaluate --run and cycle say that fold 1 has no checkpoint / no stage-0 labels."""
    ds, run = run_copy
    shutil.rmtree(run / "fold1")
    (run / "fold1").write_text("x")
    _one_line_error(_evaluate(ds, run, tmp_path / "r.json"), "no checkpoint for fold 1")
    _one_line_error(runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"]),
                    "fold 1: no stage-0 pseudo labels")
    assert (run / "fold1").read_text() == "x"


def _immutable(paths, on: bool) -> None:
    for p in paths:
        subprocess.run(["chattr", "+i" if on else "-i", str(p)], check=True, capture_output=True)


@pytest.mark.parametrize("target", ["run", "fold1/final.pt", "run.json"])
def test_read_only_runs_are_read_by_status_and_evaluate_and_named_by_cycle(run_copy, tmp_path, target):
    """Files that cannot be written (immutable: root ignores the mode bits): status and evaluate --run work
    and change nothing; cycle --stages 3 ends in one line naming a file it could not write."""
    ds, run = run_copy
    paths = [*run.rglob("*"), run] if target == "run" else [run / target]
    try:
        _immutable(paths[:1], True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("chattr +i is not available here")
    try:
        _immutable(paths, True)
        before = _files(run)
        assert runner.invoke(app, ["status", str(run)]).exit_code == 0
        assert _evaluate(ds, run, tmp_path / "r.json").exit_code == 0
        assert _files(run) == before
        res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "3"])
        _one_line_error(res, "Operation not permitted")
    finally:
        _immutable(paths, False)


# ----------------------------------------------------------------------------- bugs found by this walk
def _edit_config(run, key, value):
    meta = json.loads((run / "run.json").read_text())
    meta["config"][key] = value
    (run / "run.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("key, value", [("lr", "0.01"), ("epochs", "1"), ("epochs", 1.5), ("epochs", -1),
                                        ("lr", float("nan")), ("train_fixed_points", 0), ("augment", "no"),
                                        ("lr_milestones", "1,1")])
def test_a_training_setting_of_run_json_that_no_command_line_gives_is_one_line(run_copy, key, value):
    """What the command line refuses (--epochs -1: 'need 1 or more'; switches: true or false only) is refused
    in an edited run.json too, naming it, before any training."""
    ds, run = run_copy
    _edit_config(run, key, value)
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "3"])
    _one_line_error(res, "run.json")
    assert not (run / "fold1" / "stage3.pt").exists()


def _other_network_stage2(run):
    from cyclereg.checkpoint import load_checkpoint, save_checkpoint
    from cyclereg.clouds.features import GraphNetConfig, build_graph_net
    from cyclereg.clouds.pipeline import CloudRegConfig

    old = load_checkpoint(run / "fold1" / "stage2.pt")
    cfg = CloudRegConfig(net=GraphNetConfig(channels=(16, 16, 32)))
    save_checkpoint(run / "fold1" / "stage2.pt", kind="cloud", config=cfg,
                    state_dict=build_graph_net(cfg.net, seed=0).state_dict(), extra=old["extra"])
    shutil.copyfile(run / "fold1" / "stage2.pt", run / "fold1" / "final.pt")


@pytest.mark.parametrize("edit", ["channels in run.json", "stage2.pt of another network"])
def test_a_network_that_does_not_match_the_previous_stages_checkpoint_is_one_line(run_copy, edit):
    ds, run = run_copy
    if edit == "channels in run.json":
        meta = json.loads((run / "run.json").read_text())
        meta["config"]["reg"]["net"]["channels"] = [16, 16, 32]
        (run / "run.json").write_text(json.dumps(meta))
    else:
        _other_network_stage2(run)
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "3"])
    said = _said(res)
    assert res.exit_code == 2 and "Traceback" not in res.output, (said, repr(res.exception))
    assert "stage2.pt" in said or "run.json" in said, said


def _edit_labels(run, fn):
    path = run / "fold1" / "pseudo2.pt"
    payload = torch.load(path, weights_only=True)
    payload["labels"] = fn(payload["labels"])
    torch.save(payload, path)


@pytest.mark.parametrize("damage", ["other pair ids", "fewer points", "NaN"])
def test_pseudo_labels_that_do_not_fit_the_folds_pairs_are_named_before_training(run_copy, damage):
    ds, run = run_copy
    _edit_labels(run, {"other pair ids": lambda lab: {k + "x": v for k, v in lab.items()},
                       "fewer points": lambda lab: {k: v[:5] for k, v in lab.items()},
                       "NaN": lambda lab: {k: v * float("nan") for k, v in lab.items()}}[damage])
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "3"])
    _one_line_error(res, "pseudo2.pt")
    assert not (run / "fold1" / "stage3.pt").exists()


@pytest.mark.parametrize("command", ["status", "evaluate", "cycle"])
def test_a_log_line_that_is_not_utf8_is_passed_over_or_named(run_copy, tmp_path, command):
    ds, run = run_copy
    log = run / "fold1" / "log.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + b"\xff\xfe garbled\n" + b"".join(lines[1:]))
    args = {"status": ["status", str(run)],
            "evaluate": ["evaluate", str(ds), "--run", str(run), "--folds", "1", "--json", str(tmp_path / "r.json")],
            "cycle": ["cycle", str(ds), "--run", str(run), "--folds", "1"]}[command]
    res = runner.invoke(app, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 0 or (res.exit_code == 2 and "log.jsonl" in _said(res)), _said(res)


@pytest.mark.parametrize("how", ["truncated", "a dense checkpoint"])
def test_status_names_a_damaged_last_stage_checkpoint(run_copy, tmp_path, how):
    ds, run = run_copy
    _damage(run / "fold1" / "stage2.pt", how)
    res = runner.invoke(app, ["status", str(run), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    fold = json.loads((tmp_path / "s.json").read_text())["folds"][0]
    assert "stage2.pt" in fold["next"], fold["next"]


def test_a_plain_pickle_in_place_of_final_pt_is_one_line_without_torchs_warning(run_copy, tmp_path):
    import pickle
    import warnings

    ds, run = run_copy
    (run / "fold1" / "final.pt").write_bytes(pickle.dumps({"config": 1, "state_dict": {}}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _evaluate(ds, run, tmp_path / "r.json")
    _one_line_error(res, "final.pt")
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []


@pytest.mark.parametrize("command", ["status", "cycle"])
def test_a_run_json_with_a_byte_order_mark_reads_as_without(run_copy, command):
    ds, run = run_copy
    (run / "run.json").write_bytes(b"\xef\xbb\xbf" + (run / "run.json").read_bytes())
    args = {"status": ["status", str(run)], "cycle": ["cycle", str(ds), "--run", str(run), "--folds", "1"]}[command]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, _said(res)
