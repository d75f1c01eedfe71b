"""Contracts of the scripts mended on 2026-12-07 (session fixes B): bad input to ``benchmarks/`` and ``scripts/``
is one line naming the argument or file, a non-zero exit and no traceback, before any heavy work.

Mended: ``benchmarks/resample_moving.py``, ``dense_pair_time.py``, ``ensemble_fusion.py`` and
``label_reach.py`` (a missing input, an absurd size or number was a traceback); ``benchmarks/label_scoring.py``
(a missing ``--model`` file was a traceback, ``--pairs 0`` printed NaN means and exit 0);
``scripts/run_model_set.py`` (``-o ""`` was taken as the current folder, "already exists"; an ``-o`` with ``..``
was printed as given, not as the folder written, an existing folder it named through a missing one was
replaced, and one ending in ``..`` was a traceback); ``scripts/set_cloud_test_time.py`` (a dataset without a box or
a folder without checkpoints printed argparse's usage besides the error: two lines for no syntax error);
``scripts/ensemble_stage.py`` (an ensemble of model sets, whose ``ensemble.json`` keeps no member's training
configuration under the member's folder, or one without ``training``, or a ``--learner`` whose run.json has no
``config``, failed inside the jobs with a KeyError; its log lines were ``json.dumps`` text, NaN as a bare ``NaN``
that strict JSON readers refuse, and without the device and training precision that cycle's log.jsonl lines hold).
Walk of the other scripts (a missing input, 0 / -1 / nan for a numeric option): ``benchmarks/self_registration.py``,
``cloud_epoch_time.py`` and ``dense_train_step.py`` gave tracebacks (``--fold 0`` timed every pair);
``tps_smoothing.py`` (tracebacks; a missing folder printed "0 cases" with exit 0), ``tta_synthetic.py``,
``candidate_range.py``, ``label_change.py`` (``--json`` a folder: a traceback after the work; ``--stop-below nan``
was taken), ``downsample_l2r.py`` (a missing dataset: a traceback; ``--factor 0``: usage and error) and
``lbp_revision_ab.py`` (tracebacks; ``--repeats 0`` compared nothing with exit 0), ``peer_checkpoints.py``,
``reference_cloud_cpu.py`` and ``reference_dense_cpu.py`` (a folder that is no checkout of the reference code: a
ModuleNotFoundError); ``examples/chest_ct_end_to_end.py`` and ``examples/own_ct_pairs.py`` (a negative seed or a
count of 0 was a traceback after the CT was deformed, NaN options and a missing --model were found only minutes
later, --rms-mm nan as "the automatic lung mask is empty"), and ``benchmarks/own_ct_stage_curve.py`` (a missing
--ct was a traceback after --out was made; counts of 0 and a negative seed started the work);
``scripts/device_check.py run`` (``--budget 0`` skipped every step, ``--copd-run -1`` planned a step of -1 s);
``benchmarks/ants_syn.py`` (its inputs were read only once antspyx was found; ``--max-pairs 0`` took every pair).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import load_script, write_two_pair_dataset
from test_scripts_walk import _fake_cloud_run, _outcome, _refused, _sums, app, runner


def _run(script: str, argv: list[str], monkeypatch, capsys):
    """(exit code, stderr) of ``script``'s ``main`` run as ``python script *argv``."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    mod = load_script(script)
    return _outcome(mod.main, capsys)


def _no_work(mod, monkeypatch, *names: str) -> None:
    """Make each function ``names`` of the script fail the test: the refusal must come before it."""
    for name in names:
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail(f"{name} ran"))


# ----------------------------------------------------------------------------- benchmarks/resample_moving.py
def _l2r(folder: Path) -> Path:
    """A Learn2Reg-shaped folder with case 0001 only (empty files: the refusals come before any read)."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "X_0001_0000.nii.gz").write_bytes(b"")
    return folder


@pytest.mark.parametrize("case", ["missing_folder", "missing_case", "missing_labels", "spacing_0", "spacing_nan",
                                  "angle_inf", "threads_0", "json_folder"])
def test_resample_moving_names_bad_input_in_one_line(tmp_path, monkeypatch, capsys, case):
    data = _l2r(tmp_path / "l2r")
    args, named = [str(data), "--fixed", "0001", "--moving", "0001"], []
    if case == "missing_folder":
        args[0] = named = str(tmp_path / "nope")
    elif case == "missing_case":
        args[4], named = "0002", [str(data / "imagesTr"), "0002"]
    elif case == "missing_labels":
        (data / "labelsTr" / "X_0001_0000.nii.gz").unlink()
        named = [str(data / "labelsTr" / "X_0001_0000.nii.gz")]
    elif case == "spacing_0":
        args, named = args + ["--spacing", "0"], ["--spacing 0"]
    elif case == "spacing_nan":
        args, named = args + ["--spacing", "nan"], ["--spacing nan"]
    elif case == "angle_inf":
        args, named = args + ["--angle", "inf"], ["--angle inf"]
    elif case == "threads_0":
        args, named = args + ["--threads", "0"], ["--threads 0"]
    elif case == "json_folder":
        args, named = args + ["--json", str(tmp_path)], [str(tmp_path), "folder"]
    code, err = _run("benchmarks/resample_moving.py", args, monkeypatch, capsys)
    _refused(code, err, *([named] if isinstance(named, str) else named))


def test_resample_moving_refuses_a_grid_too_large_for_the_spacing(tmp_path, monkeypatch, capsys):
    """--spacing 0.001 on a 4^3 scan of 100 mm voxels: about 400000 voxels a side, refused before regridding."""
    import nibabel as nib
    import numpy as np

    data = _l2r(tmp_path / "l2r")
    for sub in ("imagesTr", "labelsTr"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([100.0, 100.0, 100.0, 1.0])),
                 str(data / sub / "X_0001_0000.nii.gz"))
    code, err = _run("benchmarks/resample_moving.py", [str(data), "--fixed", "0001", "--moving", "0001",
                                                       "--spacing", "0.001"], monkeypatch, capsys)
    _refused(code, err, "--spacing 0.001", "larger spacing")


# ----------------------------------------------------------------------------- benchmarks/dense_pair_time.py
@pytest.mark.parametrize("argv, named", [(["0", "4", "4"], "shape 0 4 4"), (["16", "-1", "16"], "shape 16 -1 16"),
                                         (["8", "16", "16"], "at least 9"),
                                         (["16", "16", "16", "--repeats", "0"], "--repeats 0"),
                                         (["16", "16", "16", "--threads", "-1"], "--threads -1"),
                                         (["16", "16", "16", "--device", "gpu"], "--device gpu")])
def test_dense_pair_time_names_an_absurd_value_in_one_line(monkeypatch, capsys, argv, named):
    mod = load_script("benchmarks/dense_pair_time.py")
    _no_work(mod, monkeypatch, "register", "random_volume")
    code, err = _outcome(lambda: mod.main(argv), capsys)
    _refused(code, err, named)


def test_dense_pair_time_names_a_shape_it_cannot_allocate_in_one_line(monkeypatch, capsys):
    mod = load_script("benchmarks/dense_pair_time.py")

    def no_memory(shape, generator):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate\n4e12 bytes")

    monkeypatch.setattr(mod, "random_volume", no_memory)
    _no_work(mod, monkeypatch, "register")
    code, err = _outcome(lambda: mod.main(["10000", "10000", "10000"]), capsys)
    _refused(code, err, "shape 10000 10000 10000", "can't allocate memory")


# ----------------------------------------------------------------------------- benchmarks/ensemble_fusion.py
@pytest.mark.parametrize("case", ["missing", "no_folds", "damaged", "threads", "seed", "scale", "candidates"])
def test_ensemble_fusion_names_bad_input_in_one_line(tmp_path, monkeypatch, capsys, case):
    run = tmp_path / "ens"
    run.mkdir()
    (run / "fold1.pt").write_bytes(b"not a checkpoint")
    args, named = [str(run)], [str(run / "fold1.pt")]
    if case == "missing":
        args, named = [str(tmp_path / "nope")], [str(tmp_path / "nope")]
    elif case == "no_folds":
        (run / "fold1.pt").unlink()
        named = [str(run), "fold*.pt"]
    elif case != "damaged":
        args += {"threads": ["--threads", "0"], "seed": ["--seeds", "0", "-1"], "scale": ["--scales", "nan"],
                 "candidates": ["--recentre-candidates", "0"]}[case]
        named = [args[-2] + " " + args[-1] if case != "seed" else "--seeds -1"]
    mod = load_script("benchmarks/ensemble_fusion.py")
    _no_work(mod, monkeypatch, "make_breathing_pair", "fused_and_member_displacements")
    monkeypatch.setattr(sys, "argv", ["ensemble_fusion.py", *args])
    code, err = _outcome(mod.main, capsys)
    _refused(code, err, *named)


# ----------------------------------------------------------------------------- benchmarks/label_reach.py
@pytest.mark.parametrize("case", ["missing_model", "missing_dataset", "fold_9", "fold_0", "candidates_0"])
def test_label_reach_names_bad_input_in_one_line(tmp_path, monkeypatch, capsys, case):
    ds = write_two_pair_dataset(tmp_path)  # two folds
    models = tmp_path / "models"
    args = [str(models), "--dataset", str(ds)]
    named = {"missing_model": [str(models / "fold1.pt")], "missing_dataset": [str(tmp_path / "nope.json")],
             "fold_9": ["--fold 9", str(ds)], "fold_0": ["--fold 0"], "candidates_0": ["--candidates 0"]}[case]
    if case == "missing_dataset":
        args[2] = str(tmp_path / "nope.json")
    elif case.startswith("fold"):
        args += ["--fold", case[-1]]
    elif case == "candidates_0":
        args += ["--candidates", "0"]
    mod = load_script("benchmarks/label_reach.py")
    _no_work(mod, monkeypatch, "register_clouds")
    monkeypatch.setattr(sys, "argv", ["label_reach.py", *args])
    code, err = _outcome(mod.main, capsys)
    _refused(code, err, *named)


# ----------------------------------------------------------------------------- benchmarks/label_scoring.py
@pytest.mark.parametrize("case", ["missing_model", "mistyped_random", "pairs_0", "seed_-1", "json_folder"])
def test_label_scoring_names_bad_input_in_one_line(tmp_path, monkeypatch, capsys, case):
    ds = tmp_path / "ds.json"
    args, named = {"missing_model": (["--model", str(tmp_path / "nope.pt")], [str(tmp_path / "nope.pt"), "does not exist"]),
                   "mistyped_random": (["--model", "randm"], ["randm", "'random'"]),
                   "pairs_0": (["--pairs", "0"], ["--pairs 0"]),
                   "seed_-1": (["--seed", "-1"], ["--seed -1"]),
                   "json_folder": (["--json", str(tmp_path)], [str(tmp_path), "folder"])}[case]
    mod = load_script("benchmarks/label_scoring.py")
    monkeypatch.setattr(mod, "load_volume_dataset", lambda path: object())  # a dataset that loads
    _no_work(mod, monkeypatch, "register_pair", "read_nifti")
    monkeypatch.setattr(sys, "argv", ["label_scoring.py", str(ds), *args])
    code, err = _outcome(mod.main, capsys)
    _refused(code, err, *named)


# ----------------------------------------------------------------------------- scripts/run_model_set.py
@pytest.mark.parametrize("which", ["-o", "RUN_DIR"])
def test_run_model_set_says_an_empty_path_is_empty(tmp_path, monkeypatch, capsys, which):
    run = _fake_cloud_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    before = _sums(tmp_path)
    argv = [str(run), "-o", ""] if which == "-o" else ["", "-o", str(tmp_path / "set")]
    code, err = _outcome(lambda: load_script("scripts/run_model_set.py").main(argv), capsys)
    _refused(code, err, f"{which}: an empty path")
    assert _sums(tmp_path) == before


def test_run_model_set_prints_the_folder_it_wrote_for_an_output_with_dotdot(tmp_path, capsys):
    """-o new/sub/../set (new/sub never made): the files are in new/set, which is what is printed."""
    run = _fake_cloud_run(tmp_path / "run")
    assert load_script("scripts/run_model_set.py").main([str(run), "-o", str(tmp_path / "new/sub/../set")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 2 checkpoints and model_set.json to {tmp_path / 'new' / 'set'}"
    assert sorted(p.name for p in (tmp_path / "new" / "set").iterdir()) == ["fold1.pt", "fold2.pt", "model_set.json"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["set"]


@pytest.mark.parametrize("output, place", [("new/sub/../kept", "new/kept"), ("foo/..", "."), ("x/../..", "..")])
def test_run_model_set_refuses_an_existing_folder_named_through_dotdot(tmp_path, monkeypatch, capsys, output, place):
    """An -o that resolves by name to an existing folder is "already exists" naming that folder, and nothing
    is made or replaced (the empty new/kept was silently replaced; foo/.. and x/../.. were a rename traceback)."""
    run = _fake_cloud_run(tmp_path / "w" / "run")
    (tmp_path / "w" / "new" / "kept").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "w")
    before = _sums(tmp_path)
    code, err = _outcome(lambda: load_script("scripts/run_model_set.py").main([str(run), "-o", output]), capsys)
    _refused(code, err, f"{place}: already exists")
    assert _sums(tmp_path) == before


# ----------------------------------------------------------------------------- scripts/set_cloud_test_time.py
@pytest.mark.parametrize("case", ["dataset_without_box", "folder_without_checkpoints"])
def test_set_cloud_test_time_refuses_in_one_line_without_usage(tmp_path, monkeypatch, capsys, case):
    run = _fake_cloud_run(tmp_path / "run")
    assert load_script("scripts/run_model_set.py").main([str(run), "-o", str(tmp_path / "set")]) == 0
    capsys.readouterr()
    if case == "dataset_without_box":
        (tmp_path / "d").mkdir()
        ds = write_two_pair_dataset(tmp_path / "d")  # no volume_shape_zyx / spacing_zyx_mm
        argv, named = [str(tmp_path / "set"), "--training-box-of", str(ds)], [str(ds), "box"]
    else:
        (tmp_path / "empty").mkdir()
        argv, named = [str(tmp_path / "empty"), "--tta-passes", "1"], [str(tmp_path / "empty"), "no checkpoints"]
    before = _sums(tmp_path)
    code, err = _run("scripts/set_cloud_test_time.py", argv, monkeypatch, capsys)
    _refused(code, err, *named)
    assert "usage" not in err and _sums(tmp_path) == before


# ----------------------------------------------------------------------------- scripts/ensemble_stage.py
@pytest.fixture(scope="module")
def set_ensemble(tmp_path_factory) -> Path:
    """``cyclereg ensemble`` of two model sets (run_model_set.py of two keypoint runs of random networks):
    its ``training`` keeps the runs' run.json under the runs' names, its members name the sets."""
    d = tmp_path_factory.mktemp("sets")
    export = load_script("scripts/run_model_set.py").export
    export(_fake_cloud_run(d / "ra"), d / "A")
    export(_fake_cloud_run(d / "rb", seed=100), d / "B")
    res = runner.invoke(app, ["ensemble", str(d / "A"), str(d / "B"), "-o", str(d / "E")])
    assert res.exit_code == 0, res.output
    return d / "E"


def _stage(argv: list[str], monkeypatch, capsys):
    mod = load_script("scripts/ensemble_stage.py")
    monkeypatch.setattr(mod, "run_parallel", lambda *a, **k: pytest.fail("no job may start"))
    monkeypatch.setattr(sys, "argv", ["ensemble_stage.py", *argv])
    return _outcome(mod.main, capsys)


@pytest.mark.parametrize("args, member", [([], "A"), (["--members", "1"], "B"), (["--joint", "0"], "A"),
                                          (["--folds", "2", "--members", "1"], "B")])
def test_ensemble_stage_refuses_members_from_model_sets_before_any_job(set_ensemble, tmp_path, monkeypatch, capsys,
                                                                       args, member):
    data = tmp_path / "data"
    data.mkdir()
    ds = write_two_pair_dataset(data)
    code, err = _stage([str(set_ensemble), str(tmp_path / "out"), "--dataset", str(ds), *args], monkeypatch, capsys)
    _refused(code, err, str(set_ensemble.parent / member), "no training configuration", "ensemble.json")
    assert "usage" not in err and not (tmp_path / "out").exists()


def test_ensemble_stage_refuses_an_ensemble_without_training(set_ensemble, tmp_path, monkeypatch, capsys):
    """An ensemble.json without 'training' (a KeyError 'training' in every job)."""
    ens = tmp_path / "E"
    ens.mkdir()
    info = json.loads((set_ensemble / "ensemble.json").read_text())
    info["members"] = {k: [{"source": str(tmp_path / "r" / f"{k}.pt"), "run": str(tmp_path / "r")}]
                       for k in info["members"]}
    (ens / "ensemble.json").write_text(json.dumps({k: v for k, v in info.items() if k != "training"}))
    (tmp_path / "ds.json").write_text("{}")
    code, err = _stage([str(ens), str(tmp_path / "out"), "--dataset", str(tmp_path / "ds.json")], monkeypatch, capsys)
    _refused(code, err, str(tmp_path / "r"), "no training configuration")


def test_ensemble_stage_refuses_a_learner_without_a_training_configuration(set_ensemble, tmp_path, monkeypatch,
                                                                           capsys):
    learner = tmp_path / "run"
    learner.mkdir()
    (learner / "run.json").write_text(json.dumps({"kind": "keypoints"}))
    (tmp_path / "ds.json").write_text("{}")
    code, err = _stage([str(set_ensemble), str(tmp_path / "out"), "--dataset", str(tmp_path / "ds.json"),
                        "--learner", str(learner)], monkeypatch, capsys)
    _refused(code, err, str(learner / "run.json"), "'config'")


@pytest.fixture(scope="module")
def run_ensemble(tmp_path_factory) -> Path:
    """``cyclereg ensemble`` of two keypoint runs of random networks (their run.json kept in ``training``)."""
    d = tmp_path_factory.mktemp("runs")
    _fake_cloud_run(d / "ra")
    _fake_cloud_run(d / "rb", seed=100)
    res = runner.invoke(app, ["ensemble", str(d / "ra"), str(d / "rb"), "-o", str(d / "E")])
    assert res.exit_code == 0, res.output
    return d / "E"


def _no_nan(text: str):
    def refuse(name):
        raise AssertionError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("joint", [False, True])
def test_ensemble_stage_log_line_is_strict_json_with_device_and_precision(run_ensemble, tmp_path, monkeypatch, joint):
    """The labels and the training are stubbed (a NaN loss and disagreement); the line written, and returned,
    is cycle's kind: strict JSON (NaN as null) with the task's device and training precision."""
    import cyclereg.training.api as training_api

    real = training_api._cloud_task

    def task_without_work(*args, **kwargs):
        task = real(*args, **kwargs)
        task.make_pseudo_labels = lambda *a, **k: ({}, {"weights": {}, "stats": {"pseudo_label_disagreement_mm":
                                                                               float("nan")}})
        task.train_stage = lambda *a, **k: {"train_loss_mm": float("nan"), "epochs": 0}
        return task

    monkeypatch.setattr(training_api, "_cloud_task", task_without_work)
    data = tmp_path / "data"
    data.mkdir()
    ds = write_two_pair_dataset(data)
    mod = load_script("scripts/ensemble_stage.py")
    out = tmp_path / "out"
    text = (mod.run_joint_job(run_ensemble, out, ds, 1, 0, progress=None) if joint
            else mod.run_job(run_ensemble, out, ds, 1, 0, progress=None))
    line = _no_nan(text)
    assert _no_nan((out / "ra" / "fold1.log.json").read_text()) == line
    assert line["device"] == "cpu" and line["training_precision"] == "float32" and line["stage"] == 2
    assert line["train_loss_mm"] is None and line["pseudo_label_disagreement_mm"] is None
    assert _no_nan((out / "ra" / "run.json").read_text())["kind"] == "keypoints"


# ----------------------------------------------------------------------------- the walk: option values out of range
@pytest.mark.parametrize("argv, named", [(["--size", "0", "4", "4"], "--size 0 4 4"), (["--size", "8", "9", "9"], "at least 9"),
                                         (["--threads", "0"], "--threads 0"),
                                         (["--volume", "{tmp}/nope.nii.gz"], "{tmp}/nope.nii.gz")])
def test_self_registration_names_a_bad_value_in_one_line(tmp_path, monkeypatch, capsys, argv, named):
    mod = load_script("benchmarks/self_registration.py")
    _no_work(mod, monkeypatch, "register_pair")
    monkeypatch.setattr(sys, "argv", ["self_registration.py", *(a.format(tmp=tmp_path) for a in argv)])
    code, err = _outcome(mod.main, capsys)
    _refused(code, err, named.format(tmp=tmp_path))


@pytest.mark.parametrize("argv, named", [(["{tmp}/nope.json"], "{tmp}/nope.json"), (["{ds}", "--fold", "0"], "--fold 0"),
                                         (["{ds}", "--fold", "3"], "--fold 3"), (["{ds}", "--threads", "0"], "--threads 0"),
                                         (["{ds}", "--epochs", "0"], "--epochs 0"),
                                         (["{ds}", "--candidates", "64", "0"], "--candidates 0"),
                                         (["{ds}", "--points", "0"], "--points 0"),
                                         (["{ds}", "--points", "all", "8,x"], "--points 8,x"),
                                         (["{ds}", "--learn-recentre-passes", "-1"], "--learn-recentre-passes -1"),
                                         (["{ds}", "--device", "gpu"], "--device gpu")])
def test_cloud_epoch_time_names_a_bad_value_in_one_line(tmp_path, monkeypatch, capsys, argv, named):
    ds = write_two_pair_dataset(tmp_path)  # two folds
    mod = load_script("benchmarks/cloud_epoch_time.py")
    _no_work(mod, monkeypatch, "_cloud_task")
    monkeypatch.setattr(sys, "argv", ["cloud_epoch_time.py", *(a.format(tmp=tmp_path, ds=ds) for a in argv)])
    code, err = _outcome(mod.main, capsys)
    _refused(code, err, named.format(tmp=tmp_path))


@pytest.mark.parametrize("argv, named", [(["0", "16", "16"], "shape 0 16 16"), (["16", "8", "16"], "at least 9"),
                                         (["16", "16", "16", "--iterations", "0"], "--iterations 0"),
                                         (["16", "16", "16", "--batch-size", "0"], "--batch-size 0"),
                                         (["16", "16", "16", "--threads", "-1"], "--threads -1"),
                                         (["16", "16", "16", "--device", "gpu"], "--device gpu")])
def test_dense_train_step_names_a_bad_value_in_one_line(monkeypatch, capsys, argv, named):
    mod = load_script("benchmarks/dense_train_step.py")
    _no_work(mod, monkeypatch, "DenseCycleTask")
    code, err = _outcome(lambda: mod.main(argv), capsys)
    _refused(code, err, named)


@pytest.mark.parametrize("case", ["missing", "no_folds", "damaged", "threads", "seed", "scale", "lambda_nan",
                                  "lambda_negative"])
def test_tps_smoothing_names_bad_input_in_one_line(tmp_path, monkeypatch, capsys, case):
    run = tmp_path / "set"
    run.mkdir()
    (run / "fold1.pt").write_bytes(b"not a checkpoint")
    args, named = [str(run)], [str(run / "fold1.pt")]
    if case == "missing":
        args, named = [str(tmp_path / "nope")], [str(tmp_path / "nope")]
    elif case == "no_folds":
        (run / "fold1.pt").unlink()
        named = [str(run), "fold*.pt"]
    elif case != "damaged":
        extra = {"threads": ["--threads", "0"], "seed": ["--seeds", "-1"], "scale": ["--scales", "nan"],
                 "lambda_nan": ["--lambdas", "nan"], "lambda_negative": ["--lambdas", "0.1", "-1"]}[case]
        args += extra
        named = [{"lambda_negative": "--lambdas -1.0"}.get(case, " ".join(extra))]
    mod = load_script("benchmarks/tps_smoothing.py")
    _no_work(mod, monkeypatch, "make_breathing_pair", "register_clouds")
    monkeypatch.setattr(sys, "argv", ["tps_smoothing.py", *args])
    code, err = _outcome(mod.main, capsys)
    _refused(code, err, *named)


def test_tta_synthetic_names_a_negative_pass_count_in_one_line(monkeypatch, capsys):
    code, err = _as_main("benchmarks/tta_synthetic.py", ["2", "-1"], monkeypatch, capsys)
    _refused(code, err, "P -1")


def _as_main(script: str, argv: list[str], monkeypatch, capsys):
    """(exit code, stderr) of ``python script *argv`` for a script whose options are read under ``__main__``."""
    import runpy

    from conftest import REPO

    monkeypatch.setattr(sys, "argv", [script, *argv])
    return _outcome(lambda: runpy.run_path(str(REPO / script), run_name="__main__"), capsys)


@pytest.mark.parametrize("variants", ["0", "x", "64,128+-1", "64,,128"])
def test_candidate_range_names_bad_variants_in_one_line(monkeypatch, capsys, variants):
    code, err = _as_main("benchmarks/candidate_range.py", ["synthetic", variants], monkeypatch, capsys)
    _refused(code, err, f"variants {variants}")


def test_candidate_range_names_a_missing_model_in_one_line(tmp_path, monkeypatch, capsys):
    from conftest import shared_path

    shared_path("copd-keypoints", "dataset.json")  # the mode reads the shared COPD dataset; skips without it
    code, err = _as_main("benchmarks/candidate_range.py", ["copd", str(tmp_path / "nope.pt"), "copd04", "64"],
                         monkeypatch, capsys)
    _refused(code, err, str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("argv, named", [(["--stop-below", "nan"], "--stop-below nan"),
                                         (["--stop-below", "-1"], "--stop-below -1"),
                                         (["--json", "{tmp}"], "{tmp}: is a folder")])
def test_label_change_names_a_bad_option_in_one_line_before_reading(tmp_path, monkeypatch, capsys, argv, named):
    run = _fake_cloud_run(tmp_path / "run")
    mod = load_script("benchmarks/label_change.py")
    _no_work(mod, monkeypatch, "run_curve")
    code, err = _outcome(lambda: mod.main([str(run), *(a.format(tmp=tmp_path) for a in argv)]), capsys)
    _refused(code, err, named.format(tmp=tmp_path))


@pytest.mark.parametrize("case", ["missing", "not_l2r", "factor_0", "training_images_-1", "out_a_file"])
def test_downsample_l2r_names_bad_input_in_one_line(tmp_path, capsys, case):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"training": [], "registration_val": []}))
    args, named = [str(ds), str(tmp_path / "out")], []
    if case == "missing":
        args[0] = named = str(tmp_path / "nope.json")
    elif case == "not_l2r":
        ds.write_text("{}")
        named = [str(ds), "'training'"]
    elif case == "factor_0":
        args, named = args + ["--factor", "0"], ["--factor 0"]
    elif case == "training_images_-1":
        args, named = args + ["--training-images", "-1"], ["--training-images -1"]
    elif case == "out_a_file":
        (tmp_path / "out").write_text("x")
        named = [str(tmp_path / "out"), "not a folder"]
    mod = load_script("benchmarks/downsample_l2r.py")
    code, err = _outcome(lambda: mod.main(args), capsys)
    _refused(code, err, *([named] if isinstance(named, str) else named))
    assert "usage" not in err


@pytest.mark.parametrize("case", ["missing_dataset", "missing_model", "candidates_0", "repeats_0", "threads_0",
                                  "unknown_rev", "unknown_pair"])
def test_lbp_revision_ab_names_bad_input_in_one_line(tmp_path, monkeypatch, capsys, case):
    ds = write_two_pair_dataset(tmp_path)
    args = ["HEAD", str(ds), "random"]
    named = {"missing_dataset": [str(tmp_path / "nope.json")], "missing_model": [str(tmp_path / "nope.pt")],
             "candidates_0": ["--candidates 0"], "repeats_0": ["--repeats 0"], "threads_0": ["--threads 0"],
             "unknown_rev": ["rev no-such-rev-xyz"], "unknown_pair": [str(ds), "'c9'"]}[case]
    if case == "missing_dataset":
        args[1] = str(tmp_path / "nope.json")
    elif case == "missing_model":
        args[2] = str(tmp_path / "nope.pt")
    elif case == "unknown_rev":
        args[0] = "no-such-rev-xyz"
    elif case == "unknown_pair":
        args += ["--pair", "c9"]
    else:
        args += ["--" + case.split("_")[0], "0"]
    mod = load_script("benchmarks/lbp_revision_ab.py")
    _no_work(mod, monkeypatch, "ensemble_members")
    monkeypatch.setattr(sys, "argv", ["lbp_revision_ab.py", *args])
    code, err = _outcome(mod.main, capsys)
    _refused(code, err, *named)


@pytest.mark.parametrize("case", ["missing", "not_torch", "candidates_0", "iterations_0", "recentre_-1", "moving_k_0",
                                  "tps_nan", "out_a_file"])
def test_peer_checkpoints_names_bad_input_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    pattern, out = str(tmp_path / "theirs{}.pth"), tmp_path / "out"
    for k in range(1, 6):
        (tmp_path / f"theirs{k}.pth").write_bytes(b"not a torch file")
    args, named = [pattern, str(out)], [str(tmp_path / "theirs1.pth"), "not a checkpoint"]
    if case == "missing":
        args[0], named = str(tmp_path / "nope{}.pth"), [str(tmp_path / "nope1.pth"), "does not exist"]
    elif case == "out_a_file":
        out.write_text("x")
        named = [str(out), "not a folder"]
    elif case != "not_torch":
        flag, value = {"candidates_0": ("--candidates", "0"), "iterations_0": ("--iterations", "0"),
                       "recentre_-1": ("--recentre-passes", "-1"), "moving_k_0": ("--moving-k", "0"),
                       "tps_nan": ("--tps", "nan")}[case]
        args, named = args + [flag, value], [f"{flag} {value}"]
    before = _sums(tmp_path)
    code, err = _run("benchmarks/peer_checkpoints.py", args, monkeypatch, capsys)
    _refused(code, err, *named)
    assert _sums(tmp_path) == before


@pytest.mark.parametrize("script, argv, named", [
    ("benchmarks/reference_cloud_cpu.py", ["{tmp}/nope", "{ds}"], ["{tmp}/nope", "main.py"]),
    ("benchmarks/reference_cloud_cpu.py", ["{tmp}", "{ds}", "--threads", "0"], ["--threads 0"]),
    ("benchmarks/reference_cloud_cpu.py", ["{tmp}", "{ds}", "--iterations", "0"], ["--iterations 0"]),
    ("benchmarks/reference_cloud_cpu.py", ["{tmp}", "{ds}"], ["{tmp}/data.pth"]),
    ("benchmarks/reference_dense_cpu.py", ["{tmp}/nope", "{ds}"], ["{tmp}/nope", "registration_pipeline"]),
    ("benchmarks/reference_dense_cpu.py", ["{tmp}", "{ds}", "--pairs", "0"], ["--pairs 0"]),
    ("benchmarks/reference_dense_cpu.py", ["{tmp}", "{ds}", "--seed", "-1"], ["--seed -1"]),
    ("benchmarks/reference_dense_cpu.py", ["{tmp}", "{ds}", "--threads", "0"], ["--threads 0"])])
def test_reference_benchmarks_refuse_a_folder_that_is_no_checkout_in_one_line(tmp_path, monkeypatch, capsys, script,
                                                                            argv, named):
    (tmp_path / "main.py").write_text("raise SystemExit('their code must not run')\n")
    (tmp_path / "registration_pipeline.py").write_text("raise SystemExit('their code must not run')\n")
    fill = {"tmp": tmp_path, "ds": tmp_path / "ds.json"}
    code, err = _run(script, [a.format(**fill) for a in argv], monkeypatch, capsys)
    _refused(code, err, *(n.format(**fill) for n in named))


@pytest.mark.parametrize("example, argv, named", [
    ("examples/chest_ct_end_to_end.py", ["--rms-mm", "nan"], "--rms-mm nan"),
    ("examples/chest_ct_end_to_end.py", ["--rms-mm", "-1"], "--rms-mm -1"),
    ("examples/chest_ct_end_to_end.py", ["--smoothness-mm", "inf"], "--smoothness-mm inf"),
    ("examples/chest_ct_end_to_end.py", ["--moving-nms-radius", "nan"], "--moving-nms-radius nan"),
    ("examples/chest_ct_end_to_end.py", ["--seed", "-1"], "--seed -1"),
    ("examples/chest_ct_end_to_end.py", ["--model", "{tmp}/nope.pt"], "{tmp}/nope.pt"),
    ("examples/chest_ct_end_to_end.py", ["--device", "gpu"], "--device gpu"),
    ("examples/own_ct_pairs.py", ["--pairs", "0"], "--pairs 0"),
    ("examples/own_ct_pairs.py", ["--stages", "0"], "--stages 0"),
    ("examples/own_ct_pairs.py", ["--epochs", "0"], "--epochs 0"),
    ("examples/own_ct_pairs.py", ["--test-seed", "-1"], "--test-seed -1"),
    ("examples/own_ct_pairs.py", ["--device", "gpu"], "--device gpu")])
def test_examples_name_a_bad_option_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, example, argv, named):
    mod = load_script(example)
    _no_work(mod, monkeypatch, "run")
    argv = ["--ct", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "out"), *(a.format(tmp=tmp_path) for a in argv)]
    code, err = _outcome(lambda: mod.main(argv), capsys)
    _refused(code, err, named.format(tmp=tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, named", [(["--ct", "{tmp}/nope.nii.gz"], "{tmp}/nope.nii.gz"),
                                         (["--pairs", "0"], "--pairs 0"), (["--held-out", "0"], "--held-out 0"),
                                         (["--stages", "0"], "--stages 0"), (["--epochs", "0"], "--epochs 0"),
                                         (["--seed", "-1"], "--seed -1"), (["--device", "gpu"], "--device gpu")])
def test_own_ct_stage_curve_names_bad_input_in_one_line_and_makes_no_folder(tmp_path, monkeypatch, capsys, argv,
                                                                           named):
    mod = load_script("benchmarks/own_ct_stage_curve.py")
    _no_work(mod, monkeypatch, "make_moving", "cyclereg")
    argv = ["--ct", str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "out"),
            *(a.format(tmp=tmp_path) for a in argv)]
    code, err = _outcome(lambda: mod.main(argv), capsys)
    _refused(code, err, named.format(tmp=tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, named", [(["--budget", "0"], "--budget 0"), (["--budget", "-1"], "--budget -1"),
                                         (["--copd-run", "-1"], "--copd-run -1"), (["--copd-run", "0"], "--copd-run 0")])
def test_device_check_names_seconds_below_one_in_one_line(tmp_path, capsys, argv, named):
    mod = load_script("scripts/device_check.py")
    code, err = _outcome(lambda: mod.main(["run", "--out", str(tmp_path / "out"), *argv, "--dry-run"]), capsys)
    _refused(code, err, named)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, named", [(["{tmp}/nope.json", "--json", "{tmp}/r.json"], "{tmp}/nope.json"),
                                         (["{tmp}/nope.json", "--json", "{tmp}"], "{tmp}: is a folder"),
                                         (["{tmp}/nope.json", "--json", "{tmp}/r.json", "--max-pairs", "0"], "--max-pairs 0"),
                                         (["{tmp}/nope.json", "--json", "{tmp}/r.json", "--threads", "0"], "--threads 0")])
def test_ants_syn_checks_its_input_before_antspyx(tmp_path, monkeypatch, capsys, argv, named):
    mod = load_script("benchmarks/ants_syn.py")
    _no_work(mod, monkeypatch, "_ants")
    code, err = _outcome(lambda: mod.main([a.format(tmp=tmp_path) for a in argv]), capsys)
    _refused(code, err, named.format(tmp=tmp_path))
