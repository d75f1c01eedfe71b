"""Walk over scripts/, examples/ and benchmarks/ as a user runs them (audited 2026-12-07).

Every script was run with ``--help`` (all work), with the tiniest valid input (a keypoint run faked from
random networks in the layout ``pretrain-random`` + ``cycle`` write, a two-member ensemble of random
networks, a model set exported from the run) and with bad input: a missing file, a run directory of the
wrong kind (a dense run, a model set), an output inside the run directory, an existing output, a stage
that does not exist, a damaged checkpoint midway, option values out of range. The project's rule
(README: bad input gives one line naming the file or option, a non-zero exit, no traceback, no partial
output) is applied to the scripts too, and the scripts that write must never change their inputs.

Handled cases no other test covered are pinned as compact tests; the cases handled badly were strict
xfails whose reason started with ``BUG:`` until they were mended. Scripts that need the GPU machine
(``device_check.py run``), ANTs (``benchmarks/ants_syn.py``), the shared COPD data or minutes of
training (``ensemble_stage.py`` jobs themselves, ``examples/*`` end to end, most ``benchmarks/``) were
only run with ``--help`` and missing inputs here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cyclereg.checkpoint import load_checkpoint, save_checkpoint, to_jsonable
from cyclereg.clouds.features import build_graph_net
from cyclereg.clouds.lbp import LBPConfig
from cyclereg.clouds.pipeline import CloudRegConfig
from cyclereg.training.clouds import CloudCycleConfig
from cyclereg_cli.main import app

from conftest import load_script

runner = CliRunner()


def _sums(folder: Path) -> dict[str, str | None]:
    """Every path under ``folder`` with the SHA-256 of its bytes (``None`` for a folder)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _outcome(call, capsys) -> tuple[object, str]:
    """(exit code, stderr) of a script's ``main``; any exception but SystemExit propagates (a traceback)."""
    try:
        code = call()
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


def _refused(code, err: str, *named: str) -> None:
    assert code not in (0, None), code
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for name in named:
        assert name in err, (name, err)


def _fake_cloud_run(run: Path, stages=(1,), folds=2, seed=0) -> Path:
    """A keypoint run directory in the layout ``pretrain-random`` + ``cycle`` leave: ``run.json`` (kind, folds,
    config) and per fold ``stageT.pt`` and ``final.pt`` (the last stage), random networks of distinct seeds."""
    run.mkdir(parents=True)
    cycle = CloudCycleConfig()
    (run / "run.json").write_text(json.dumps({"kind": "keypoints", "pairs": [f"c{k}" for k in range(folds)],
                                              "folds": [[f"c{k}"] for k in range(folds)],
                                              "config": to_jsonable(cycle)}))
    cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=16))
    for k in range(1, folds + 1):
        (run / f"fold{k}").mkdir()
        for t in stages:
            save_checkpoint(run / f"fold{k}" / f"stage{t}.pt", kind="cloud", config=cfg,
                            state_dict=build_graph_net(cfg.net, seed=seed + 10 * k + t).state_dict(), extra={"stage": t})
        (run / f"fold{k}" / "final.pt").write_bytes((run / f"fold{k}" / f"stage{max(stages)}.pt").read_bytes())
    return run


@pytest.fixture(scope="module")
def run_model_set():
    return load_script("scripts/run_model_set.py")


# ----------------------------------------------------------------------------- scripts/run_model_set.py
@pytest.mark.parametrize("stage", [None, 1, 2])
def test_run_model_set_copies_the_chosen_stage_byte_for_byte(tmp_path, run_model_set, capsys, stage):
    """A model set holds, per fold, a file byte-identical to the run's checkpoint of that stage, and
    model_set.json records that source with its SHA-256; the run is left as it was."""
    run = _fake_cloud_run(tmp_path / "run", stages=(1, 2))
    before = _sums(run)
    out = tmp_path / "set"
    argv = [str(run), "-o", str(out)] + ([] if stage is None else ["--stage", str(stage)])
    assert run_model_set.main(argv) == 0
    assert capsys.readouterr().out.strip() == f"wrote 2 checkpoints and model_set.json to {out}"
    assert sorted(p.name for p in out.iterdir()) == ["fold1.pt", "fold2.pt", "model_set.json"]
    info = json.loads((out / "model_set.json").read_text())
    assert info["stage"] == ("final" if stage is None else stage) and info["run"] == str(run)
    for k in (1, 2):
        src = run / f"fold{k}" / ("final.pt" if stage is None else f"stage{stage}.pt")
        assert (out / f"fold{k}.pt").read_bytes() == src.read_bytes()
        assert info["folds"][f"fold{k}"] == {"source": str(src), "sha256": hashlib.sha256(src.read_bytes()).hexdigest()}
    assert _sums(run) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _damage_fold2(run: Path) -> str:
    (run / "fold2" / "final.pt").write_bytes(b"not a checkpoint")
    return str(run / "fold2" / "final.pt")


def _dense_final(run: Path) -> str:
    save_checkpoint(run / "fold1" / "final.pt", kind="dense", config={}, state_dict={})
    return str(run / "fold1" / "final.pt")


@pytest.mark.parametrize("case", ["missing_run", "model_set_as_run", "run_json_as_run", "stage_in_one_fold_only",
                                  "damaged_second_fold", "dense_checkpoint", "existing_output", "output_named_pt"])
def test_run_model_set_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, run_model_set, capsys, case):
    # stage_in_one_fold_only: final.pt is stage 2's, so fold 2 keeps no stage 1 (a final.pt that is stage 1's
    # would stand in for it: cyclereg.api.stage_checkpoint)
    run = _fake_cloud_run(tmp_path / "run", stages=(1, 2) if case == "stage_in_one_fold_only" else (1,))
    out = tmp_path / "set"
    args, named = [str(run), "-o", str(out)], [str(run)]
    if case == "missing_run":
        args[0] = named[0] = str(tmp_path / "nope")
    elif case == "model_set_as_run":
        assert run_model_set.main([str(run), "-o", str(tmp_path / "made")]) == 0
        capsys.readouterr()
        args[0] = named[0] = str(tmp_path / "made")
    elif case == "run_json_as_run":
        args[0] = named[0] = str(run / "run.json")
    elif case == "stage_in_one_fold_only":
        (run / "fold2" / "stage1.pt").rename(run / "fold2" / "kept.pt")
        args += ["--stage", "1"]
        named = [str(run / "fold2" / "stage1.pt"), "1 of 2 folds"]
    elif case == "damaged_second_fold":  # fold1 is written to the temporary folder before fold2 fails
        named = [_damage_fold2(run)]
    elif case == "dense_checkpoint":
        named = [_dense_final(run), "dense"]
    elif case == "existing_output":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
        named = [str(out), "already exists"]
    elif case == "output_named_pt":
        out = tmp_path / "set.pt"
        args[2] = named[0] = str(out)
    before = _sums(tmp_path)
    code, err = _outcome(lambda: run_model_set.main(args), capsys)
    _refused(code, err, *named)
    assert _sums(tmp_path) == before  # no output, no temporary folder left, the run unchanged


def test_run_model_set_leaves_no_parent_folder_after_a_failure(tmp_path, run_model_set, capsys):
    run = _fake_cloud_run(tmp_path / "run")
    damaged = _damage_fold2(run)
    code, err = _outcome(lambda: run_model_set.main([str(run), "-o", str(tmp_path / "new" / "sets" / "final")]), capsys)
    _refused(code, err, damaged)
    assert not (tmp_path / "new").exists()


def test_run_model_set_names_a_negative_stage_in_one_line(tmp_path, run_model_set, capsys):
    run = _fake_cloud_run(tmp_path / "run")
    code, err = _outcome(lambda: run_model_set.main([str(run), "-o", str(tmp_path / "set"), "--stage", "-1"]), capsys)
    _refused(code, err, "stage")
    assert not (tmp_path / "set").exists()


@pytest.mark.parametrize("inside", ["set", "fold1/set"])
def test_run_model_set_refuses_an_output_inside_the_run(tmp_path, run_model_set, capsys, inside):
    run = _fake_cloud_run(tmp_path / "run")
    before = _sums(run)
    code, err = _outcome(lambda: run_model_set.main([str(run), "-o", str(run / inside)]), capsys)
    assert _sums(run) == before
    _refused(code, err, str(run / inside))


def test_run_model_set_refuses_a_dense_run_at_stage_0_in_one_line(tmp_path, run_model_set, capsys):
    from cyclereg.training.dense import DenseCycleConfig

    run = tmp_path / "run"
    (run / "fold1").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"kind": "volumes", "folds": [["a"]],
                                              "config": to_jsonable(DenseCycleConfig())}))
    save_checkpoint(run / "fold1" / "stage1.pt", kind="dense", config={}, state_dict={}, extra={"stage": 1})
    code, err = _outcome(lambda: run_model_set.main([str(run), "-o", str(tmp_path / "set"), "--stage", "0"]), capsys)
    _refused(code, err, str(run))
    assert not (tmp_path / "set").exists()


# ----------------------------------------------------------------------------- scripts/set_cloud_test_time.py
@pytest.fixture
def model_set(tmp_path, run_model_set, capsys) -> Path:
    run = _fake_cloud_run(tmp_path / "run")
    assert run_model_set.main([str(run), "-o", str(tmp_path / "set")]) == 0
    capsys.readouterr()
    return tmp_path / "set"


def _set_test_time(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["set_cloud_test_time.py", *argv])
    load_script("scripts/set_cloud_test_time.py").main()


def test_set_cloud_test_time_changes_only_the_named_field(model_set, monkeypatch, capsys):
    """``--tta-passes 3`` on a model set: each checkpoint's config differs from before in tta_passes only,
    its state_dict and extra are bitwise the same, model_set.json is untouched; run again without options
    the files stay byte for byte as they are."""
    before = {k: load_checkpoint(model_set / f"fold{k}.pt", kind="cloud") for k in (1, 2)}
    record = (model_set / "model_set.json").read_bytes()
    assert all(ck["config"]["tta_passes"] != 3 for ck in before.values())
    _set_test_time(monkeypatch, str(model_set), "--tta-passes", "3")
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    for k, old in before.items():
        new = load_checkpoint(model_set / f"fold{k}.pt", kind="cloud")
        assert {n for n in old["config"] if old["config"][n] != new["config"][n]} == {"tta_passes"}
        assert new["config"]["tta_passes"] == 3 and new["extra"] == old["extra"]
        assert all(torch.equal(new["state_dict"][n], t) for n, t in old["state_dict"].items())
    assert (model_set / "model_set.json").read_bytes() == record
    sums = _sums(model_set)
    _set_test_time(monkeypatch, str(model_set))
    assert _sums(model_set) == sums


def test_set_cloud_test_time_stores_the_volume_box_of_a_dataset(model_set, tmp_path, monkeypatch, capsys):
    """``--training-box-of`` a dataset of a 10 x 20 x 30 (z, y, x) voxel grid at 1 x 2 x 3 mm: the box from the
    origin with world extent x 30 * 3, y 20 * 2, z 10 * 1 mm, and nothing else of the config changes."""
    from conftest import write_two_pair_dataset

    (tmp_path / "data").mkdir()
    ds = write_two_pair_dataset(tmp_path / "data")
    record = json.loads(ds.read_text())
    ds.write_text(json.dumps({**record, "volume_shape_zyx": [10, 20, 30], "spacing_zyx_mm": [1.0, 2.0, 3.0]}))
    before = load_checkpoint(model_set / "fold1.pt", kind="cloud")["config"]
    _set_test_time(monkeypatch, str(model_set), "--training-box-of", str(ds))
    after = load_checkpoint(model_set / "fold1.pt", kind="cloud")["config"]
    assert {n for n in before if before[n] != after[n]} == {"training_box"}
    box = CloudRegConfig.from_dict(after).training_box
    assert tuple(box.lo_mm) == (0.0, 0.0, 0.0) and tuple(box.extent_mm) == (90.0, 40.0, 10.0)


def test_set_cloud_test_time_refuses_a_dense_checkpoint_before_rewriting_any(model_set, tmp_path, monkeypatch, capsys):
    dense = tmp_path / "dense.pt"
    save_checkpoint(dense, kind="dense", config={}, state_dict={})
    before = _sums(tmp_path)
    code, err = _outcome(lambda: _set_test_time(monkeypatch, str(model_set), str(dense), "--tta-passes", "1"), capsys)
    _refused(code, err, str(dense), "dense")
    assert _sums(tmp_path) == before


@pytest.mark.parametrize("option, value", [("--tta-passes", "-1"), ("--recentre-passes", "-1"), ("--candidates", "0")])
def test_set_cloud_test_time_names_an_out_of_range_value_in_one_line(model_set, monkeypatch, capsys, option, value):
    before = _sums(model_set)
    code, err = _outcome(lambda: _set_test_time(monkeypatch, str(model_set), option, value), capsys)
    assert _sums(model_set) == before
    _refused(code, err, option.lstrip("-").replace("-", "_"))


def test_set_cloud_test_time_checks_ensemble_json_before_rewriting(model_set, monkeypatch, capsys):
    (model_set / "ensemble.json").write_text(json.dumps({"members": {}, "config": None}))
    before = _sums(model_set)
    code, err = _outcome(lambda: _set_test_time(monkeypatch, str(model_set), "--tta-passes", "2"), capsys)
    assert _sums(model_set) == before
    _refused(code, err, str(model_set / "ensemble.json"))


def test_set_cloud_test_time_refuses_a_checkpoint_of_a_run(tmp_path, monkeypatch, capsys):
    run = _fake_cloud_run(tmp_path / "run")
    before = _sums(run)
    final = run / "fold1" / "final.pt"
    code, err = _outcome(lambda: _set_test_time(monkeypatch, str(final), "--tta-passes", "2"), capsys)
    assert _sums(run) == before
    _refused(code, err, str(final))


# ----------------------------------------------------------------------------- scripts/ensemble_stage.py
@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> Path:
    """``cyclereg ensemble`` of two keypoint runs of random networks (folds 1 and 2; ``training`` holds their
    run.json)."""
    d = tmp_path_factory.mktemp("ens")
    _fake_cloud_run(d / "ra")
    _fake_cloud_run(d / "rb", seed=100)
    res = runner.invoke(app, ["ensemble", str(d / "ra"), str(d / "rb"), "-o", str(d / "e")])
    assert res.exit_code == 0, res.output
    return d / "e"


@pytest.mark.parametrize("args, option", [(["--folds", "9"], "--folds"), (["--folds", "x"], "--folds"),
                                          (["--members", "x"], "--members"), (["--joint", "0", "--folds", "9"], "--folds"),
                                          (["--jobs", "0"], "--jobs")])
def test_ensemble_stage_names_a_bad_option_in_one_line(ensemble, tmp_path, monkeypatch, capsys, args, option):
    mod = load_script("scripts/ensemble_stage.py")
    monkeypatch.setattr(mod, "run_parallel", lambda *a, **k: pytest.fail("no job may start"))
    if option == "--jobs":  # what run_parallel does with 0 workers, before it starts any
        from cyclereg.training.parallel import run_parallel

        monkeypatch.setattr(mod, "run_parallel", lambda jobs, workers, *a, **k: run_parallel([], workers, *a, **k))
    monkeypatch.setattr(sys, "argv", ["ensemble_stage.py", str(ensemble), str(tmp_path / "out"), *args])
    code, err = _outcome(mod.main, capsys)
    _refused(code, err.splitlines()[-1] if err else err, option)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--dataset", "--learner"])
def test_ensemble_stage_checks_its_input_paths_before_the_jobs(ensemble, tmp_path, monkeypatch, capsys, option):
    mod = load_script("scripts/ensemble_stage.py")

    def serial(jobs, workers, progress, threads=1, on_result=None):  # run_parallel re-raises a job's exception
        for fn, args, _ in jobs:
            on_result(fn(*args, progress=progress))

    monkeypatch.setattr(mod, "run_parallel", serial)
    missing = tmp_path / "nope"
    args = ["--dataset", str(missing)] if option == "--dataset" else ["--learner", str(missing)]
    if option == "--learner":
        args += ["--dataset", str(tmp_path / "dataset.json")]
        (tmp_path / "dataset.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["ensemble_stage.py", str(ensemble), str(tmp_path / "out"), *args])
    code, err = _outcome(mod.main, capsys)
    _refused(code, err.splitlines()[-1] if err else err, str(missing))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- benchmarks/label_change.py
@pytest.mark.parametrize("what", ["missing", "model_set"])
def test_label_change_refuses_what_is_not_a_run(model_set, tmp_path, capsys, what):
    mod = load_script("benchmarks/label_change.py")
    path = tmp_path / "nope" if what == "missing" else model_set
    code, err = _outcome(lambda: mod.main([str(path)]), capsys)
    _refused(code, err, str(path))


@pytest.mark.parametrize("script, argv", [("benchmarks/organ_table.py", ["{missing}"]),
                                          ("benchmarks/label_scoring.py", ["{missing}"]),
                                          ("benchmarks/self_registration.py", ["--volume", "{missing}"])])
def test_benchmarks_name_a_missing_input_in_one_line(tmp_path, monkeypatch, capsys, script, argv):
    missing = str(tmp_path / "nope.json")
    monkeypatch.setattr(sys, "argv", [script, *(a.format(missing=missing) for a in argv)])
    code, err = _outcome(load_script(script).main, capsys)
    _refused(code, err, missing)


# ----------------------------------------------------------------------------- --help of scripts/ and examples/
class _Parsed(Exception):
    pass


def _parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The argument parser a script's ``main`` builds (caught at ``parse_args``; nothing runs)."""
    def catch(self, *a, **k):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(sys, "argv", [script])
    mod = load_script(script)
    with pytest.raises(_Parsed) as caught:
        mod.main() if script.endswith(("set_cloud_test_time.py", "ensemble_stage.py")) else mod.main([])
    return caught.value.args[0]


@pytest.mark.parametrize("script", ["scripts/run_model_set.py", "scripts/set_cloud_test_time.py",
                                    "scripts/ensemble_stage.py", "examples/chest_ct_end_to_end.py",
                                    "examples/own_ct_pairs.py"])
def test_every_option_of_a_script_has_help(script, monkeypatch):
    parser = _parser_of(script, monkeypatch)
    bare = [a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert bare == []


# ----------------------------------------------------------------------------- examples/
@pytest.fixture
def tiny_ct(tmp_path) -> Path:
    import nibabel as nib
    import numpy as np

    path = tmp_path / "ct.nii.gz"
    data = np.random.default_rng(0).normal(-500, 200, (24, 24, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


@pytest.mark.parametrize("example", ["examples/chest_ct_end_to_end.py", "examples/own_ct_pairs.py"])
@pytest.mark.parametrize("below", [False, True], ids=["file", "below_file"])
def test_examples_name_an_output_that_is_a_file_in_one_line(tiny_ct, tmp_path, capsys, example, below):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub" if below else tmp_path / "afile"
    mod = load_script(example)
    code, err = _outcome(lambda: mod.main(["--ct", str(tiny_ct), "--out", str(out)]), capsys)
    _refused(code, err, str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == "x"


def test_chest_example_refuses_an_output_inside_a_run_before_writing(tiny_ct, tmp_path, capsys):
    run = _fake_cloud_run(tmp_path / "run")
    before = _sums(run)
    mod = load_script("examples/chest_ct_end_to_end.py")
    code, err = _outcome(lambda: mod.main(["--ct", str(tiny_ct), "--out", str(run / "e2e")]), capsys)
    assert _sums(run) == before
    _refused(code, err, str(run))
