"""CLI option / config dataclass / resolved-record walk (2026-12-07): every option of every command
(keypoints, pretrain-random, cycle, status, register, evaluate, compare, ensemble, demo) was compared with
the dataclass default the library uses when it is not given, with what config.json / run.json / the
report records when it is given (value and unit), with its help text's range, and fed repeated
(``--seed 1 --seed 2``), ``--opt=value`` and negative values; the configurations were sent through JSON
and read back (no command takes a ``--config``; the library's ``config=`` does).

About 100 inputs were tried; all but two were handled: the help defaults are the dataclass defaults
(tests/test_readme_claims_walk.py pins them), the CLI defaults are the library's, options reach the
record in the field's unit, out-of-range values are refused by name before anything is written. The
tests below pin the cases no other file covered, and two real bugs (strict xfails until mended): ``evaluate --run``
on a keypoint dataset records one registration configuration (the first fold model's) as the report's
``config`` while each fold's pairs were registered with that fold's own (another ``training_box`` in every
run without a dataset volume box); and a training run (pretrain-random / cycle) records nowhere the
``--device`` it ran on, though that sets its precision (float16 AMP on CUDA, ``cpu_bf16`` on CPU).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from cyclereg.checkpoint import save_checkpoint, to_jsonable
from cyclereg.clouds.features import build_graph_net
from cyclereg.clouds.lbp import LBPConfig
from cyclereg.clouds.pipeline import CloudRegConfig
from cyclereg.dense.config import DensePipelineConfig
from cyclereg.frames import UnitBox
from cyclereg.pointio import read_points
from cyclereg.training.clouds import CloudCycleConfig
from cyclereg.training.dense import DenseCycleConfig
from cyclereg_cli.main import app

from conftest import write_two_pair_dataset

pytestmark = pytest.mark.usefixtures("one_intraop_thread")
runner = CliRunner()


def _register(d, out, *args):
    return runner.invoke(app, ["register", str(d / "f.csv"), str(d / "m.csv"), "-o", str(d / out), "--device", "cpu",
                               *args])


def _record(d, out) -> dict:
    return json.loads((d / out / "config.json").read_text())


def test_a_repeated_option_records_and_uses_the_last_value_and_equals_form_is_the_same(pair_files):
    """``--seed 1 --seed 2`` is ``--seed 2`` (click: the last wins), recorded as 2 and registering as 2;
    ``--seed=2`` is the same call: identical displacements."""
    d, _ = pair_files
    for out, args in (("last", ["--seed", "1", "--seed", "2"]), ("eq", ["--seed=2"]), ("one", ["--seed", "1"])):
        res = _register(d, out, *args)
        assert res.exit_code == 0, res.output
    assert _record(d, "last")["seed"] == _record(d, "eq")["seed"] == 2 and _record(d, "one")["seed"] == 1
    assert (d / "last" / "displacements.csv").read_text() == (d / "eq" / "displacements.csv").read_text()
    assert (d / "one" / "displacements.csv").read_text() != (d / "last" / "displacements.csv").read_text()


def test_spacing_is_recorded_in_mm_and_places_the_voxel_indices(pair_files):
    """``--spacing 2,2,2`` with headerless (voxel-index) files: recorded as ``spacing_mm`` [2, 2, 2], and the
    registration equals the one of the same points written in mm (index * 2)."""
    d, pair = pair_files
    for name, points in (("fv.csv", pair.fixed_mm), ("mv.csv", pair.moving_mm)):
        (d / name).write_text("".join(",".join(f"{float(v) / 2.0!r}" for v in row) + "\n" for row in points))
    res = runner.invoke(app, ["register", str(d / "fv.csv"), str(d / "mv.csv"), "-o", str(d / "vox"), "--spacing",
                              "2,2,2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert _record(d, "vox")["spacing_mm"] == [2.0, 2.0, 2.0]
    assert _register(d, "mm").exit_code == 0 and _record(d, "mm")["spacing_mm"] is None
    vox, mm = (np.loadtxt(d / o / "displacements.csv", delimiter=",", skiprows=1) for o in ("vox", "mm"))
    assert vox.shape == mm.shape == (len(pair.fixed_mm), 6)
    np.testing.assert_allclose(vox, mm, atol=1e-2, rtol=0)  # the same points in mm (float32 rounding)


@pytest.mark.parametrize("spacing", ["-2,2,2", "0,2,2", "2,2", "2", "nan,2,2", "inf,2,2"])
def test_a_spacing_the_help_calls_invalid_is_refused_by_name(pair_files, spacing):
    """The help says 'sx,sy,sz' in mm: three positive finite sizes; anything else names --spacing, writes nothing."""
    d, pair = pair_files
    for name, points in (("fv.csv", pair.fixed_mm), ("mv.csv", pair.moving_mm)):
        (d / name).write_text("".join(",".join(f"{float(v)!r}" for v in row) + "\n" for row in points))
    res = runner.invoke(app, ["register", str(d / "fv.csv"), str(d / "mv.csv"), "-o", str(d / "o"),
                              "--spacing", spacing])
    assert res.exit_code == 2 and f"--spacing '{spacing}'" in res.output and not (d / "o").exists(), res.output


NEGATIVE = [
    (["pretrain-random", "{ds}", "-o", "{o}", "--aug-relative", "-0.1"], "--aug-relative -0.1"),
    (["pretrain-random", "{ds}", "-o", "{o}", "--aug-relative", "1"], "--aug-relative 1.0"),
    (["pretrain-random", "{ds}", "-o", "{o}", "--epochs", "-3"], "--epochs -3"),
    (["pretrain-random", "{ds}", "-o", "{o}", "--val-pairs", "-1"], "--val-pairs -1"),
    (["pretrain-random", "{ds}", "-o", "{o}", "--jobs", "0"], "--jobs 0"),
    (["pretrain-random", "{ds}", "-o", "{o}", "--seed", "-1"], "--seed -1"),
    (["pretrain-random", "{ds}", "-o", "{o}", "--fold", "-1"], "--fold -1"),
    (["pretrain-random", "{ds}", "-o", "{o}", "--train-points", "-5,200"], "--train-points '-5,200'"),
    (["evaluate", "{ds}", "--json", "{o}", "--identity", "--max-pairs", "-1"], "--max-pairs -1"),
    (["evaluate", "{ds}", "--json", "{o}", "--identity", "--folds", "-1"], "--folds -1"),
    (["evaluate", "{ds}", "--json", "{o}", "--model", "random", "--tta-passes", "-1"], "--tta-passes -1"),
    (["evaluate", "{ds}", "--json", "{o}", "--model", "random", "--seed", "-2"], "--seed -2"),
    (["demo", "-o", "{o}", "--seed", "-1"], "--seed -1"),
]


@pytest.mark.parametrize("argv,named", NEGATIVE, ids=[" ".join(a[-2:]) for a, _ in NEGATIVE])
def test_a_negative_value_is_taken_as_the_value_and_refused_by_name(tmp_path, argv, named):
    """``--opt -1``: click takes ``-1`` as the option's value (not as an unknown option); a value outside
    the range the help gives is refused in one line that names the option and the value; nothing written."""
    ds = write_two_pair_dataset(tmp_path)
    out = tmp_path / "out"
    res = runner.invoke(app, [a.format(ds=ds, o=out) for a in argv])
    assert res.exit_code == 2 and named in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists()


def test_the_records_read_back_into_the_configurations_they_came_from():
    """run.json's ``config`` (cloud and dense self-training) and register's / a checkpoint's cloud
    ``config``, through JSON (tuples become lists, a UnitBox a dict): ``from_dict`` gives the equal
    configuration back, so a record fed to ``pretrain_random(config=...)`` or a checkpoint makes the same run."""
    box = UnitBox((1.0, 2.0, 3.0), (40.0, 50.0, 60.0))
    cloud = CloudCycleConfig(epochs=3, lr_milestones=(2, 3), train_fixed_points=100, train_moving_points=200,
                             aug_relative_std=0.0, reg=replace(CloudRegConfig(), training_box=box, recentre_passes=2))
    dense = DenseCycleConfig(max_train_pairs=3, supervision="ncc", directions="both",
                             pipeline=DensePipelineConfig(spacing_mm=(1.0, 2.0, 3.0), orientation=("R", "A", "S")))

    def through_json(config):
        return json.loads(json.dumps(to_jsonable(config)))

    assert CloudCycleConfig.from_dict(through_json(cloud)) == cloud
    assert DenseCycleConfig.from_dict(through_json(dense)) == dense
    assert CloudRegConfig.from_dict(through_json(cloud.reg)) == cloud.reg


def _fold_models_with_own_boxes(tmp_path, d):
    """A folder of exported fold models (fold1.pt, fold2.pt: random networks) whose unit frames differ,
    as every trained run's folds do when the dataset gives no volume box (each fold's training clouds)."""
    clouds = [read_points(d / "f.csv"), read_points(d / "m.csv")]
    run = tmp_path / "models"
    run.mkdir()
    boxes = {1: UnitBox.around(*clouds, margin=0.05), 2: UnitBox.around(*clouds, margin=0.3)}
    for fold, box in boxes.items():
        cfg = CloudRegConfig(lbp=LBPConfig(num_candidates=16), training_box=box)
        save_checkpoint(run / f"fold{fold}.pt", kind="cloud", config=cfg,
                        state_dict=build_graph_net(cfg.net, seed=fold).state_dict(), extra={"stage": 5})
    return run, boxes


def test_evaluate_run_records_the_configuration_each_fold_registered_with(tmp_path):
    """Pair c0 is registered with fold1.pt (its training_box), c1 with fold2.pt (another one): the report must
    record, per fold, the configuration used (e.g. ``checkpoints[k]['config']`` or a per-fold ``config``);
    it records one ``config``, fold 1's, so the frame of fold 2's pair is recorded wrong."""
    ds = write_two_pair_dataset(tmp_path)
    run, boxes = _fold_models_with_own_boxes(tmp_path, tmp_path)
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--json", str(report), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    assert {c["id"]: c["fold"] for c in rep["cases"]} == {"c0": 1, "c1": 2}
    assert rep["config"] is None  # the folds' configurations differ: none is the report's
    per_fold = {k: v.get("config") for k, v in rep["checkpoints"].items()}
    for fold, box in boxes.items():
        recorded = per_fold[str(fold)]
        assert recorded is not None, f"fold {fold}: no configuration recorded"
        assert recorded["training_box"] == {"lo_mm": list(box.lo_mm), "extent_mm": list(box.extent_mm)}, fold


def _device_values(obj):
    """Every value stored under a key ``device`` anywhere in a JSON object."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "device":
                yield value
            yield from _device_values(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _device_values(value)


def test_a_training_run_records_the_device_it_ran_on(tmp_path):
    """Every other command records its resolved ``--device`` (keypoints, register, evaluate: ``device``);
    a training run's numbers depend on it too (float16 AMP on CUDA, ``cpu_bf16`` only on CPU, other sums),
    so run.json or the fold's log must say where its stages ran."""
    ds = write_two_pair_dataset(tmp_path)
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", "--stages", "1", "--epochs",
                              "1", "--train-points", "100,200", "--tta-passes", "0", "--recentre-passes", "0",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    records = [json.loads((run / "run.json").read_text())]
    records += [json.loads(line) for line in (run / "fold1" / "log.jsonl").read_text().splitlines() if line.strip()]
    assert "cpu" in [v for r in records for v in _device_values(r)]
