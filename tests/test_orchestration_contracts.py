"""Contracts of the orchestration modules :mod:`cyclereg.dense.api` and :mod:`cyclereg.training.api`:
which option reaches which call, what a run directory is checked against, which pairs and images
a run trains on, and what the records say. Each test runs in seconds: the registration or the
training is replaced where only what reaches it matters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cyclereg.dense.api as dense_api
from cyclereg.device import resolve_device
from cyclereg.errors import InputError
from cyclereg.training.dense import DenseCycleConfig

from test_cycle_dense import _dataset as _volume_dataset

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _zero_registration(seen: list):
    """A ``register_pair`` stand-in that records its arguments and returns the zero field."""
    def register_pair(fixed, moving, net, cfg, **kw):
        seen.append({"fixed": fixed, "moving": moving, "net": net, "cfg": cfg, **kw})
        return torch.zeros(1, 3, *fixed.shape)
    return register_pair


def _scans(tmp_path: Path) -> tuple[Path, Path]:
    ds = _volume_dataset(tmp_path / "data", with_labels=True)
    images = sorted((ds.parent / "imagesTr").iterdir())
    return images[0], images[1]


# ----------------------------------------------------------------------------- register
@pytest.mark.parametrize("warps,adam,ic", [(1, True, False), (2, False, True)])
def test_register_options_set_the_pipeline_configuration_each_its_own(tmp_path, monkeypatch, warps, adam, ic):
    """``warps``, ``adam`` and ``ic`` reach the configuration the pair is registered with (and config.json
    records it), each its own field; left out (``None``) they keep the model's settings."""
    seen = []
    monkeypatch.setattr(dense_api, "register_pair", _zero_registration(seen))
    fixed, moving = _scans(tmp_path)
    labels = fixed.parent.parent / "labelsTr" / moving.name
    dense_api.register_volume_files(fixed, moving, tmp_path / "o", warps=warps, adam=adam, ic=ic, device="cpu",
                                    moving_labels=labels)
    cfg = seen[-1]["cfg"]
    assert (cfg.warps, cfg.use_adam, cfg.use_ic) == (warps, adam, ic)
    rec = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (rec["config"]["warps"], rec["config"]["use_adam"], rec["config"]["use_ic"]) == (warps, adam, ic)
    assert rec["device"] == "cpu" and rec["model"] == {"model": "random", "seed": 0}
    assert rec["inputs"] == {"fixed": str(fixed), "moving": str(moving), "moving_labels": str(labels),
                             "moving_resampled_onto_fixed_grid": False, "fixed_voxels_inside_moving": None}
    default = dense_api.load_model("random")[1]
    dense_api.register_volume_files(fixed, moving, tmp_path / "d", seed=5)  # device "auto": the one it resolved to
    rec = json.loads((tmp_path / "d" / "config.json").read_text())
    assert rec["device"] == str(resolve_device("auto")) and rec["model"] == {"model": "random", "seed": 5}
    assert seen[-1]["cfg"] == default


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_takes_exactly_one_method_and_a_stage_only_of_a_run(tmp_path):
    """evaluate: ``run`` with ``model`` (or ``identity``) is refused, not one of them silently dropped, and so
    is ``stage`` without ``run``; before anything is read or written."""
    ds = _volume_dataset(tmp_path / "data", with_labels=True)
    report = tmp_path / "r.json"
    for kwargs in ({"run": tmp_path / "run", "model": "random"}, {"run": tmp_path / "run", "identity": True}):
        with pytest.raises(InputError, match="give exactly one of identity, model or run"):
            dense_api.evaluate_volume_dataset(ds, report, device="cpu", **kwargs)
    for kwargs in ({"model": "random"}, {"identity": True}):
        with pytest.raises(InputError, match="--stage needs --run"):
            dense_api.evaluate_volume_dataset(ds, report, stage=1, device="cpu", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_evaluate_resumes_only_a_report_of_the_same_directions(tmp_path):
    """--resume keeps the pairs of a report made with the same ``both_directions``; a report of one
    direction is not continued as one of both (nor the other way round): refused, the report left as it was."""
    ds = _volume_dataset(tmp_path / "data", with_labels=True)
    report = tmp_path / "r.json"
    dense_api.evaluate_volume_dataset(ds, report, identity=True, figures=False)
    before = report.read_bytes()
    with pytest.raises(InputError, match="cannot resume"):
        dense_api.evaluate_volume_dataset(ds, report, identity=True, figures=False, both_directions=True, resume=True)
    assert report.read_bytes() == before


def test_evaluate_resume_continues_the_unfinished_report_beside_the_report(tmp_path):
    """--resume after an interruption: the pairs of ``r.partial.json`` (what a stopped evaluation leaves) are
    kept, not evaluated again (a kept Dice of 0 stays 0), the rest are evaluated, and the partial file goes
    once the report is written."""
    ds = _volume_dataset(tmp_path / "data", with_labels=True)
    report = tmp_path / "r.json"
    first = dense_api.evaluate_volume_dataset(ds, report, identity=True, figures=False, both_directions=True)
    assert first["num_pairs"] == 2
    partial = dense_api.unfinished_report_path(report)
    kept = {**first["pairs"][0], "dice": 0.0}
    partial.write_text(json.dumps({**json.loads(report.read_text()), "pairs": [kept], "complete": False}))
    report.unlink()
    done = dense_api.evaluate_volume_dataset(ds, report, identity=True, figures=False, both_directions=True,
                                             resume=True)
    assert [p["id"] for p in done["pairs"]] == [p["id"] for p in first["pairs"]]
    assert done["pairs"][0]["dice"] == 0.0 and done["pairs"][1]["dice"] == pytest.approx(first["pairs"][1]["dice"])
    assert json.loads(report.read_text())["complete"] is True and not partial.exists()


def test_evaluate_registers_each_pair_fixed_to_moving_with_the_datasets_modality(tmp_path, monkeypatch):
    """evaluate with a model registers each registration_val pair (fixed, moving) in that order, with the
    dataset's modality as the preprocessing hint (as training preprocessed it)."""
    from cyclereg.dense.data import load_volume_dataset

    seen = []
    monkeypatch.setattr(dense_api, "register_pair", _zero_registration(seen))
    ds = _volume_dataset(tmp_path / "data", with_labels=True)
    obj = json.loads(ds.read_text())
    ds.write_text(json.dumps({**obj, "modality": {"0": "MRI"}}))
    dense_api.evaluate_volume_dataset(ds, tmp_path / "r.json", model="random", figures=False, both_directions=True,
                                      device="cpu")
    pairs = load_volume_dataset(ds, both_directions=True).pairs
    assert [(c["fixed"].path, c["moving"].path) for c in seen] == [(p.fixed, p.moving) for p in pairs]
    assert len(seen) == 2 and all(c["modality"] == "MRI" for c in seen)


def test_evaluate_refuses_a_constant_scan_before_registering_or_writing(tmp_path, monkeypatch):
    """A constant scan (nothing to register) in any pair is refused while the inputs are checked, naming it:
    before the first registration and before the unfinished report is written."""
    import nibabel as nib
    import numpy as np

    seen = []
    monkeypatch.setattr(dense_api, "register_pair", _zero_registration(seen))
    ds = _volume_dataset(tmp_path / "data", with_labels=True)
    flat = ds.parent / "imagesTr" / "Case_0002_0000.nii.gz"
    img = nib.load(str(flat))
    nib.save(nib.Nifti1Image(np.full(img.shape, -1000.0, np.float32), img.affine), str(flat))
    with pytest.raises(InputError, match="constant") as err:
        dense_api.evaluate_volume_dataset(ds, tmp_path / "r.json", model="random", figures=False, device="cpu")
    assert err.value.path.name == flat.name
    assert seen == [] and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_the_overlay_figure_shows_the_first_pair_registered(tmp_path, monkeypatch):
    """evaluate's overlay figure is of the first pair this call registers (fixed scan, warped moving scan, their
    labels), not of a later one; the Dice figure covers every pair."""
    shown = {}

    def overlay(path, pair_id, fixed, warped, fixed_l, warped_l):
        shown["overlay"] = (pair_id, fixed.clone())
        Path(path).write_bytes(b"png")

    def cdf(path, records, info):
        shown["cdf"] = [r["id"] for r in records]
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(dense_api, "_plot_overlay", overlay)
    monkeypatch.setattr(dense_api, "_plot_dice_cdf", cdf)
    ds = _volume_dataset(tmp_path / "data", with_labels=True)
    result = dense_api.evaluate_volume_dataset(ds, tmp_path / "r.json", identity=True, both_directions=True)
    ids = [p["id"] for p in result["pairs"]]
    assert len(ids) == 2 and shown["overlay"][0] == ids[0] and shown["cdf"] == ids
    from cyclereg.volumeio import read_nifti

    assert torch.equal(shown["overlay"][1], read_nifti(result["pairs"][0]["fixed"]).data)
    assert (tmp_path / "r_overlay.png").read_bytes() == b"png"


def test_evaluate_refuses_scans_the_model_cannot_register_before_registering_or_writing(tmp_path, monkeypatch):
    """A model for 1 mm voxels and a dataset of 1.5 x 1.5 x 2 mm scans: evaluate refuses the scan while checking
    its inputs, naming the spacings, before the first registration and before any report file is written."""
    from cyclereg.dense.config import DensePipelineConfig
    from cyclereg.dense.network import random_feature_net

    seen = []
    monkeypatch.setattr(dense_api, "register_pair", _zero_registration(seen))
    ds = _volume_dataset(tmp_path / "data", with_labels=True)
    cfg = DensePipelineConfig(spacing_mm=(1.0, 1.0, 1.0))
    dense_api.save_model(tmp_path / "data" / "iso.pt", random_feature_net(cfg.net, 0), cfg)
    with pytest.raises(InputError, match=r"voxel spacing \(1.5, 1.5, 2\) mm differs from the model's \(1, 1, 1\) mm"):
        dense_api.evaluate_volume_dataset(ds, tmp_path / "r.json", model=str(tmp_path / "data" / "iso.pt"),
                                          figures=False, device="cpu")
    assert seen == [] and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# ----------------------------------------------------------------------------- training: run identity
@pytest.mark.parametrize("key", ["kind", "dataset", "pairs", "folds"])
def test_a_run_of_a_dataset_that_differs_in_one_identity_field_is_refused_naming_it(tmp_path, key):
    """The run's identity is its dataset's kind, name, pair ids and folds: a dataset that differs in any one
    (the same files regrouped into other folds, say: each fold would train on other pairs than its
    stage-0 labels cover) is another dataset's, and the error names the field."""
    from cyclereg.training.api import _check_identity

    meta = {"kind": "keypoints", "dataset": "d", "pairs": ["a", "b", "c"], "folds": [["a"], ["b"], ["c"]],
            "data": {"pairs": {}}}
    other = {"kind": "volumes", "dataset": "e", "pairs": ["a", "b"], "folds": [["a", "b"], ["c"]]}
    _check_identity(tmp_path, meta, dict(meta))  # the same identity passes
    with pytest.raises(InputError, match=rf"another dataset \({key} differs\)"):
        _check_identity(tmp_path, meta, {**meta, key: other[key]})


def test_the_smallest_registrable_volume_has_min_volume_size_voxels_per_axis():
    """``min_volume_size`` is the fewest voxels an axis may have: a volume of exactly that size is
    registrable, one voxel fewer along any axis is refused naming the file."""
    import numpy as np

    from cyclereg.dense.config import DensePipelineConfig
    from cyclereg.dense.pipeline import min_volume_size
    from cyclereg.volumeio import Volume

    cfg = DensePipelineConfig().validate()
    need = min_volume_size(cfg)
    dense_api.require_registrable_grid(Volume(torch.empty(need, need, need, device="meta"), np.eye(4)), cfg)
    for axis in range(3):
        shape = [need] * 3
        shape[axis] -= 1
        with pytest.raises(InputError, match="too small to register") as err:
            dense_api.require_registrable_grid(Volume(torch.empty(shape, device="meta"), np.eye(4), Path("v.nii")), cfg)
        assert err.value.path == Path("v.nii")


def test_a_pair_is_preprocessed_in_the_mode_of_its_fixed_scan(monkeypatch):
    """``auto`` preprocessing without a modality hint: the fixed scan's intensities choose the mode, and both
    scans of the pair get that one mode (a CT-like fixed scan, air below ``auto_ct_below_hu``, and a
    non-negative moving scan: both ``ct``; the other way round: both ``mri``)."""
    import numpy as np

    from cyclereg.dense.config import DensePipelineConfig
    from cyclereg.volumeio import Volume

    cfg = DensePipelineConfig().validate()
    assert cfg.preprocess.mode == "auto"
    modes = []
    real = dense_api.preprocess
    monkeypatch.setattr(dense_api, "preprocess", lambda image, pcfg, mode: modes.append(mode) or real(image, pcfg, mode))
    monkeypatch.setattr(dense_api, "register", lambda f, m, net, cfg: torch.zeros(1, 3, *f.shape[2:]))
    g = torch.Generator().manual_seed(0)
    ct = Volume(torch.rand(16, 16, 16, generator=g) * 1000 - 1000, np.eye(4))
    mri = Volume(torch.rand(16, 16, 16, generator=g) * 1000, np.eye(4))
    net = dense_api.load_model("random")[0]
    for fixed, moving, mode in ((ct, mri, "ct"), (mri, ct, "mri")):
        modes.clear()
        dense_api.register_pair(fixed, moving, net, cfg)
        assert modes == [mode, mode]


def test_the_training_frame_of_a_fold_is_its_clouds_box_enlarged_by_the_configured_margin():
    """Without a volume grid, a fold trains in the bounding box of its training clouds enlarged by the
    configuration's ``box_margin`` per side (as a pair registered on its own): lo = min - m * size,
    extent = (1 + 2 m) * size, for a margin m other than the default; with a volume grid, the volume's box."""
    from types import SimpleNamespace

    from cyclereg.training.api import _box

    a = torch.tensor([[0.0, 0.0, 0.0], [10.0, 20.0, 40.0]])
    b = torch.tensor([[5.0, -20.0, 10.0]])
    pairs = [SimpleNamespace(fixed=a, moving=b)]
    box = _box(SimpleNamespace(has_volume_grid=False), pairs, 0.25)
    size = torch.tensor([10.0, 40.0, 40.0])
    lo = torch.tensor([0.0, -20.0, 0.0]) - 0.25 * size
    assert torch.allclose(torch.tensor(box.lo_mm), lo.double().float())
    assert torch.allclose(torch.tensor(box.extent_mm), 1.5 * size)
    grid = SimpleNamespace(has_volume_grid=True, volume_shape_zyx=(10, 20, 30), spacing_zyx_mm=(2.0, 1.0, 1.0))
    from cyclereg.frames import UnitBox

    assert _box(grid, pairs, 0.25) == UnitBox.from_volume((10, 20, 30), (2.0, 1.0, 1.0))


def test_resample_moving_on_one_grid_resamples_nothing_and_records_so(tmp_path, monkeypatch):
    """``resample_moving`` with a moving scan already on the fixed grid: nothing is resampled, and the record
    says so (``moving_resampled_onto_fixed_grid`` false, no overlap measured), as without the option."""
    import cyclereg.dense.data as data_mod

    seen = []
    monkeypatch.setattr(dense_api, "register_pair", _zero_registration(seen))
    monkeypatch.setattr(dense_api, "resample_onto", lambda *a, **k: pytest.fail("resampled a scan on the fixed grid"))
    monkeypatch.setattr(data_mod, "resample_onto", lambda *a, **k: pytest.fail("resampled a scan on the fixed grid"))
    fixed, moving = _scans(tmp_path)
    dense_api.register_volume_files(fixed, moving, tmp_path / "o", resample_moving=True, device="cpu")
    inputs = json.loads((tmp_path / "o" / "config.json").read_text())["inputs"]
    assert inputs["moving_resampled_onto_fixed_grid"] is False and inputs["fixed_voxels_inside_moving"] is None


def test_pretrain_random_refuses_fold_and_folds_together_before_reading_anything(tmp_path):
    """``fold`` and ``folds`` are one option: both given is an error (even when they agree), said before the
    dataset is read and with no run directory made."""
    from cyclereg.training.api import pretrain_random

    for fold, folds in ((1, 2), ("1", "1")):
        with pytest.raises(InputError, match="give fold or folds, not both"):
            pretrain_random(tmp_path / "missing.json", tmp_path / "run", fold=fold, folds=folds, device="cpu")
    assert not (tmp_path / "run").exists()


def test_the_sampling_note_of_pretrain_random_is_for_the_smallest_training_set_of_its_folds(tmp_path, monkeypatch):
    """Labelling several folds whose training sets differ in size (2, 3 and 3 pairs), the note on
    difficulty-weighted sampling is about the smallest set, the one that weighting affects most."""
    from test_cycle_clouds import _dataset as _cloud_dataset

    import cyclereg.training.api as training_api

    ds = _cloud_dataset(tmp_path, n=4)
    obj = json.loads(ds.read_text())
    ds.write_text(json.dumps({**obj, "folds": [["c0", "c1"], ["c2"], ["c3"]]}))
    sizes = []
    monkeypatch.setattr(training_api, "sampling_note", lambda n, **kw: sizes.append(n) or None)
    monkeypatch.setattr(training_api, "_cloud_task", lambda *a, **k: None)  # no training task: only the note matters
    monkeypatch.setattr(training_api, "_for_folds", lambda *a, **k: None)  # no stage-0 labelling
    training_api.pretrain_random(ds, tmp_path / "run", device="cpu", stages=1)
    assert sizes == [2]


def test_cycle_checks_every_selected_folds_validation_files_before_training_any(tmp_path, recording_scheduler):
    """run_cycle with val_pairs: the landmark files of every selected fold's held-out pairs are read and checked
    before the first fold trains: a missing one in fold 2 stops the command before fold 1 is worked on."""
    from test_cycle_clouds import _dataset as _cloud_dataset

    from cyclereg.checkpoint import to_jsonable
    from cyclereg.datasets import load_keypoint_dataset
    from cyclereg.training.api import _identity, fold_dir, run_cycle
    from cyclereg.training.clouds import CloudCycleConfig

    ds = _cloud_dataset(tmp_path, n=2)
    run = tmp_path / "run"
    run.mkdir()
    meta = {**_identity(load_keypoint_dataset(ds)), "config": to_jsonable(CloudCycleConfig(stages=1))}
    (run / "run.json").write_text(json.dumps(meta))
    for k in (1, 2):  # stage-0 labels as pretrain-random leaves them (the stand-in scheduler reads none)
        fold_dir(run, k).mkdir()
        (fold_dir(run, k) / "pseudo0.pt").write_bytes(b"")
    (tmp_path / "c1" / "fl.csv").unlink()  # fold 2 holds out c1
    with pytest.raises(InputError, match="c1"):
        run_cycle(ds, run, device="cpu", val_pairs=1)
    assert recording_scheduler.made == [] and recording_scheduler.runs == []


# ----------------------------------------------------------------------------- training: volume runs
class _RecordingScheduler:
    """A stand-in for the stage scheduler of a volume run: records what it is made with and asked to do,
    trains nothing (its run has finished stage 0)."""

    made: list = []
    runs: list = []

    def __init__(self, task, directory, hook, **kw):
        self.made.append({"task": task, "directory": directory, "hook": hook, **kw})

    def last_finished_stage(self) -> int:
        return 0

    def run_stage0(self, progress) -> int:
        return 0

    def run(self, stages, progress, stop_below_mm=None) -> int:
        self.runs.append((stages, stop_below_mm))
        return stages


@pytest.fixture
def recording_scheduler(monkeypatch):
    import cyclereg.training.api as training_api

    monkeypatch.setattr(_RecordingScheduler, "made", [])
    monkeypatch.setattr(_RecordingScheduler, "runs", [])
    monkeypatch.setattr(training_api, "_scheduler", _RecordingScheduler)
    return _RecordingScheduler


def _run_json(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def test_a_volume_run_is_made_with_the_library_config_and_keeps_its_seed(tmp_path, recording_scheduler):
    """``pretrain_random(config=...)`` on a new volume run: the given configuration is the run's (not the
    defaults), with the given seed; the same command into the run without seed or config takes the
    run's values (seed 3), not the defaults (seed 0, which the run would refuse as another configuration)."""
    from cyclereg.training.api import pretrain_random

    ds = _volume_dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    cfg = DenseCycleConfig(augment=False, iterations=1, stages=1, max_train_pairs=1, batch_size=1)
    pretrain_random(ds, run, seed=3, device="cpu", config=cfg)
    rec = _run_json(run)["config"]
    assert (rec["augment"], rec["iterations"], rec["max_train_pairs"], rec["batch_size"], rec["seed"]) == (
        False, 1, 1, 1, 3)
    assert recording_scheduler.made[-1]["task"].config.seed == 3
    assert recording_scheduler.made[-1]["hook"] is None  # no val_pairs: no reporting hook (no label is read)
    pretrain_random(ds, run, device="cpu")
    assert _run_json(run)["config"] == rec
    assert recording_scheduler.made[-1]["task"].config.seed == 3 and not recording_scheduler.made[-1]["task"].config.augment


def test_volume_datasets_refuse_a_fold_and_jobs(tmp_path, recording_scheduler):
    """A volume dataset has one training set: pretrain_random with a fold number (``all`` is its one set) or
    several jobs, and run_cycle with a fold selection or several jobs, are refused before any work."""
    from cyclereg.training.api import pretrain_random, run_cycle

    ds = _volume_dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    for kwargs, message in (({"fold": "1"}, "--fold: volume datasets have no folds"),
                            ({"folds": 2}, "--fold: volume datasets have no folds"),
                            ({"jobs": 2}, "--jobs: volume datasets")):
        with pytest.raises(InputError, match=message):
            pretrain_random(ds, run, device="cpu", stages=1, **kwargs)
    assert not run.exists() and recording_scheduler.made == []
    pretrain_random(ds, run, fold="all", device="cpu", stages=1)
    for kwargs, message in (({"folds": "1"}, "--folds: volume datasets have no folds"),
                            ({"jobs": 2}, "--jobs: volume datasets")):
        with pytest.raises(InputError, match=message):
            run_cycle(ds, run, device="cpu", **kwargs)
    assert recording_scheduler.runs == []


def test_the_volume_reporting_hook_scores_the_first_n_validation_pairs_before_and_after(tmp_path, monkeypatch):
    """``val_pairs=N``: the hook scores the first N registration_val pairs only; ``val_initial_dice`` is the mean
    Dice of the unwarped label maps, ``val_dice`` that of the moving labels warped with the model's field (here
    a shift of one voxel along i, standing in for the registration)."""
    from types import SimpleNamespace

    from cyclereg.dense.config import DensePipelineConfig
    from cyclereg.metrics import dice, scored_labels
    from cyclereg.training.api import _dense_val_hook
    from cyclereg.volumeio import read_nifti
    from cyclereg.warp import warp_labels

    ds = _volume_dataset(tmp_path / "data", with_labels=True)
    obj = json.loads(ds.read_text())
    second = {"fixed": obj["training"][2]["image"], "moving": obj["training"][3]["image"]}
    ds.write_text(json.dumps({**obj, "registration_val": [*obj["registration_val"], second]}))
    assert _dense_val_hook(ds, 0) is None
    shift = torch.zeros(1, 3, 24, 24, 32)
    shift[:, 0] = 1.0
    seen = []
    monkeypatch.setattr(dense_api, "register_pair", lambda f, m, net, cfg, **kw: seen.append(f.path) or shift.clone())
    hook = _dense_val_hook(ds, 1)
    net = dense_api.load_model("random")[0]
    out = hook(1, net, SimpleNamespace(pipeline=DensePipelineConfig()))
    root = ds.parent
    fl = read_nifti(root / "labelsTr" / "Case_0001_0000.nii.gz", labels=True).data
    ml = read_nifti(root / "labelsTr" / "Case_0002_0000.nii.gz", labels=True).data
    labels = scored_labels(fl, ml)
    before = sum(dice(fl, ml, labels).values()) / len(labels)
    after = sum(dice(fl, warp_labels(ml[None, None], shift)[0, 0], labels).values()) / len(labels)
    assert before != pytest.approx(after)
    assert out == {"val_pairs": 1, "val_initial_dice": pytest.approx(before), "val_dice": pytest.approx(after)}
    assert [Path(p).name for p in seen] == ["Case_0001_0000.nii.gz"]


def test_pretrain_random_refuses_a_volume_run_of_another_dataset_or_changed_scans(tmp_path, recording_scheduler):
    """pretrain_random into an existing volume run checks the run's dataset as cycle does: another dataset name,
    or a training scan whose content changed since, is refused (naming what differs) and run.json stays as it was."""
    import nibabel as nib
    import numpy as np

    from cyclereg.training.api import pretrain_random

    ds = _volume_dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    pretrain_random(ds, run, device="cpu", stages=1)
    before = (run / "run.json").read_bytes()
    obj = json.loads(ds.read_text())
    ds.write_text(json.dumps({**obj, "name": "other"}))
    with pytest.raises(InputError, match=r"another dataset \(dataset differs\)"):
        pretrain_random(ds, run, device="cpu")
    ds.write_text(json.dumps(obj))
    scan = ds.parent / "imagesTr" / "Case_0004_0000.nii.gz"
    img = nib.load(str(scan))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1.0, img.affine), str(scan))
    with pytest.raises(InputError, match=r"training scan\(s\) Case_0004_0000.nii.gz changed"):
        pretrain_random(ds, run, device="cpu")
    assert (run / "run.json").read_bytes() == before and len(recording_scheduler.made) == 1


def test_a_keypoint_run_is_refused_as_another_datasets_by_volume_commands(tmp_path, recording_scheduler):
    """A run directory of a keypoint dataset (its run.json holds a keypoint configuration) given to
    pretrain_random or run_cycle with a volume dataset: an InputError naming the kind, not a TypeError from
    reading the keypoint configuration as a volume one."""
    from cyclereg.checkpoint import to_jsonable
    from cyclereg.training.api import pretrain_random, run_cycle
    from cyclereg.training.clouds import CloudCycleConfig

    ds = _volume_dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    run.mkdir()
    meta = {"dataset": "tiny", "kind": "keypoints", "pairs": ["c0", "c1"], "folds": [["c0"], ["c1"]],
            "config": to_jsonable(CloudCycleConfig(stages=1))}
    (run / "run.json").write_text(json.dumps(meta))
    for command in (lambda: pretrain_random(ds, run, device="cpu"), lambda: run_cycle(ds, run, device="cpu")):
        with pytest.raises(InputError, match=r"another dataset \(kind differs\)"):
            command()
    assert json.loads((run / "run.json").read_text()) == meta and recording_scheduler.made == []


def test_cycle_of_a_volume_run_without_stage0_labels_points_to_pretrain_random(tmp_path, monkeypatch):
    """A volume run whose stage-0 pseudo labels were never made (run.json only): run_cycle stops with an
    InputError naming pretrain-random, training nothing."""
    import cyclereg.training.api as training_api

    ds = _volume_dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    with monkeypatch.context() as patched:  # run.json as pretrain-random writes it, without its labels
        patched.setattr(training_api, "_scheduler", _RecordingScheduler)
        training_api.pretrain_random(ds, run, device="cpu", stages=1, iterations=1, max_train_pairs=1)
    with pytest.raises(InputError, match="no stage-0 pseudo labels; run 'cyclereg pretrain-random' first"):
        training_api.run_cycle(ds, run, device="cpu")
    assert sorted(p.name for p in (run / "all").iterdir() if p.name != training_api.RUN_LOCK) == []


@pytest.mark.parametrize("key", ["stages", "iterations", "batch_size", "max_train_pairs"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "2"])
def test_volume_counts_below_one_or_not_whole_are_refused_naming_the_option(tmp_path, key, value):
    """The counts of a volume run (stages, iterations, batch size, max train pairs) are whole numbers from 1:
    anything else is refused naming the command's option, before the run directory is made."""
    from cyclereg.training.api import pretrain_random

    ds = _volume_dataset(tmp_path / "data", with_labels=False)
    with pytest.raises(InputError, match="--" + key.replace("_", "-")):
        pretrain_random(ds, tmp_path / "run", device="cpu", **{key: value})
    assert not (tmp_path / "run").exists()


def test_cycle_of_a_volume_run_passes_its_settings_to_the_scheduler(tmp_path, recording_scheduler):
    """``run_cycle`` on a volume run: the scheduler gets the snapshot interval given, keeps the newest
    DENSE_KEEP_LABELS label files, records the run's training scans (those of run.json, by content), trains
    to the given number of stages (then the recorded target) under the stopping rule given, then the
    recorded one, and none once ``0`` removed it."""
    from cyclereg.training.api import DENSE_KEEP_LABELS, pretrain_random, run_cycle

    ds = _volume_dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    pretrain_random(ds, run, device="cpu", stages=2, iterations=1)
    assert run_cycle(ds, run, device="cpu", stages=3, snapshot_every_s=7.5, stop_below_mm=0.5) == {None: 3}
    made = recording_scheduler.made[-1]
    assert made["snapshot_every_s"] == 7.5 and made["keep_labels"] == DENSE_KEEP_LABELS
    assert made["directory"] == run / "all" and made["hook"] is None
    meta = _run_json(run)
    assert made["training"]["images"] == meta["data"]["images"] and len(meta["data"]["images"]) == 2
    assert recording_scheduler.runs[-1] == (3, 0.5)
    assert meta["config"]["stages"] == 3 and meta["stop_below_mm"] == 0.5
    run_cycle(ds, run, device="cpu")  # the recorded target and rule
    assert recording_scheduler.runs[-1] == (3, 0.5)
    run_cycle(ds, run, device="cpu", stages=1, stop_below_mm=0)
    assert recording_scheduler.runs[-1] == (1, None) and "stop_below_mm" not in _run_json(run)
    assert _run_json(run)["config"]["stages"] == 3  # a smaller --stages stops early, never shortens the run


def test_register_never_replaces_the_model_checkpoint_it_reads(tmp_path, monkeypatch):
    """The model checkpoint is an input as the scans are: one kept in the output folder under an output's
    name (config.json) stops register before anything is written, and stays as it was."""
    from cyclereg.dense.config import DensePipelineConfig
    from cyclereg.dense.network import random_feature_net

    monkeypatch.setattr(dense_api, "register_pair", _zero_registration([]))
    fixed, moving = _scans(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    model = out / "config.json"
    dense_api.save_model(model, random_feature_net(DensePipelineConfig().net, 0), DensePipelineConfig())
    before = model.read_bytes()
    with pytest.raises(InputError, match="would replace"):
        dense_api.register_volume_files(fixed, moving, out, model=str(model), device="cpu")
    assert model.read_bytes() == before and [p.name for p in out.iterdir()] == ["config.json"]


def test_a_volume_run_trains_on_exactly_the_images_its_pairs_use(tmp_path):
    """``max_train_pairs`` below what the training images make: the run's images are those its pairs name
    (the pair indices cover them all, none left over), so that run.json and the checkpoints record only
    scans the model learnt from. With the default held-out images, the registration_val scans are none of them."""
    from cyclereg.training.api import _dense_training_set

    ds = _volume_dataset(tmp_path / "data", with_labels=False)
    for max_pairs, directions in ((1, "one"), (1, "both"), (2, "both"), (3, "one")):
        images, pairs = _dense_training_set(ds, DenseCycleConfig(train_images="all", max_train_pairs=max_pairs,
                                                                 directions=directions))
        assert len(pairs) == max_pairs
        assert sorted({i for p in pairs for i in p}) == list(range(len(images)))
        named = [(Path(images[i]).name, Path(images[j]).name) for i, j in pairs]
        assert all(a != b for a, b in named) and len(set(named)) == len(named)
    images, pairs = _dense_training_set(ds, DenseCycleConfig())
    assert [Path(p).name for p in images] == ["Case_0003_0000.nii.gz", "Case_0004_0000.nii.gz"]


def test_training_images_of_another_spacing_are_refused_as_such(tmp_path):
    """Training images of one shape but another voxel spacing are refused naming the image and the spacings
    (resample first), before any training."""
    import nibabel as nib
    import numpy as np

    from cyclereg.training.api import _dense_task, _dense_training_set

    ds = _volume_dataset(tmp_path / "data", with_labels=False)
    odd = ds.parent / "imagesTr" / "Case_0004_0000.nii.gz"
    img = nib.load(str(odd))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([1.5, 1.5, 2.5, 1.0])), str(odd))
    cfg = DenseCycleConfig()
    images, pairs = _dense_training_set(ds, cfg)
    with pytest.raises(InputError, match=r"one shape and spacing: .*\(1.5, 1.5, 2.5\) mm here") as err:
        _dense_task(ds, cfg, torch.device("cpu"), images, pairs)
    assert err.value.path.name == odd.name


@pytest.mark.parametrize("modality", [{"0": "MRI"}, "MRI"])
def test_the_datasets_modality_chooses_the_preprocessing_the_run_records(tmp_path, modality):
    """A dataset whose ``modality`` says MRI (as Learn2Reg's ``{"0": "MRI"}`` or a plain string) is
    preprocessed as MRI whatever its intensities (here CT-like, which alone would read as CT), and the
    training task pins that mode in the configuration its checkpoints record."""
    from cyclereg.training.api import _dense_task, _dense_training_set

    ds = _volume_dataset(tmp_path / "data", with_labels=False)
    obj = json.loads(ds.read_text())
    ds.write_text(json.dumps({**obj, "modality": modality}))
    cfg = DenseCycleConfig()
    images, pairs = _dense_training_set(ds, cfg)
    task = _dense_task(ds, cfg, torch.device("cpu"), images, pairs)
    assert task.pipeline.preprocess.mode == "mri"
    del obj["modality"]
    ds.write_text(json.dumps(obj))
    assert _dense_task(ds, cfg, torch.device("cpu"), images, pairs).pipeline.preprocess.mode == "ct"


def test_resample_moving_warps_the_moving_labels_from_their_own_grid_once(tmp_path, monkeypatch):
    """--resample-moving with a label map: the warped labels are sampled (nearest neighbour) from the label
    map on its own grid, not from its copy on the fixed grid. A moving grid 0.5 mm along x from the fixed one
    and a field of 0.5 voxels along i: every fixed voxel lands on a moving voxel centre, so the warped labels
    are the moving labels exactly (two nearest-neighbour steps through the copy round the half voxels twice)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    labels = rng.integers(0, 6, (24, 24, 24)).astype(np.int16)
    nib.save(nib.Nifti1Image(rng.random((24, 24, 24)).astype(np.float32) * 100, np.eye(4)), str(tmp_path / "f.nii.gz"))
    nib.save(nib.Nifti1Image(rng.random((24, 24, 24)).astype(np.float32) * 100, shifted), str(tmp_path / "m.nii.gz"))
    nib.save(nib.Nifti1Image(labels, shifted), str(tmp_path / "ml.nii.gz"))
    monkeypatch.setattr(dense_api, "register_pair", lambda fv, mv, *a, **k: torch.stack(
        [torch.full(fv.shape, 0.5), torch.zeros(fv.shape), torch.zeros(fv.shape)])[None])
    dense_api.register_volume_files(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", tmp_path / "out",
                                    moving_labels=tmp_path / "ml.nii.gz", resample_moving=True, device="cpu")
    warped = np.asarray(nib.load(str(tmp_path / "out" / "warped_labels.nii.gz")).dataobj)
    np.testing.assert_array_equal(warped[:-1], labels[:-1])


def test_an_earlier_output_that_is_now_an_input_is_not_removed_as_stale(tmp_path, monkeypatch):
    """register removes the outputs an earlier register recorded in the folder and this one does not write,
    but never one of its own inputs: the warped_labels.nii.gz of a first run, registered as the moving scan
    of a second run without --moving-labels, stays as it was."""
    monkeypatch.setattr(dense_api, "register_pair", _zero_registration([]))
    fixed, moving = _scans(tmp_path)
    labels = fixed.parent.parent / "labelsTr" / moving.name
    out = tmp_path / "out"
    dense_api.register_volume_files(fixed, moving, out, moving_labels=labels, device="cpu")
    warped_labels = out / "warped_labels.nii.gz"
    before = warped_labels.read_bytes()
    dense_api.register_volume_files(fixed, warped_labels, out, device="cpu")
    assert warped_labels.read_bytes() == before
    assert json.loads((out / "config.json").read_text())["outputs"]["files"] == ["displacement.nii.gz", "warped.nii.gz"]


@pytest.mark.parametrize("kind", ["volumes", "keypoints"])
def test_a_configuration_of_the_other_dataset_kind_is_refused(tmp_path, recording_scheduler, kind):
    """``pretrain_random(config=...)``: a CloudCycleConfig for a volume dataset (or a DenseCycleConfig for a
    keypoint dataset) is not the run's configuration: refused with an InputError before anything is written
    (the volume path replaced it by the defaults, the keypoint path raised an AttributeError)."""
    from test_cli_plumbing import _keypoint_dataset

    from cyclereg.training.api import pretrain_random
    from cyclereg.training.clouds import CloudCycleConfig

    if kind == "volumes":
        ds, config, fold = _volume_dataset(tmp_path / "data", with_labels=False), CloudCycleConfig(stages=1), None
    else:
        (tmp_path / "kp").mkdir()
        ds, config, fold = _keypoint_dataset(tmp_path / "kp"), DenseCycleConfig(stages=1), "1"
    with pytest.raises(InputError, match="config"):
        pretrain_random(ds, tmp_path / "run", fold=fold, device="cpu", config=config)
    assert not (tmp_path / "run").exists()


def test_cycle_of_a_bf16_run_on_a_cpu_without_bf16_units_says_so(tmp_path, recording_scheduler, monkeypatch, capsys):
    """Each command that trains a ``cpu_bf16`` run on a CPU without bfloat16 units notes that its steps will
    be slower: ``cycle`` as ``pretrain-random``; on a CPU with them (or a run without the option), no note."""
    import cyclereg.device as device_mod
    from cyclereg.training.api import pretrain_random, run_cycle

    ds = _volume_dataset(tmp_path / "data", with_labels=False)
    for bf16 in (True, False):
        run = tmp_path / f"run{bf16}"
        pretrain_random(ds, run, device="cpu", stages=1, cpu_bf16=bf16)
        for units in (False, True):
            monkeypatch.setattr(device_mod, "cpu_has_bf16_units", lambda: units)
            capsys.readouterr()
            run_cycle(ds, run, device="cpu")
            said = " ".join(capsys.readouterr().err.split())
            assert ("no bfloat16 matrix units" in said) == (bf16 and not units), said
    # the option concerns CPU training only: a run on a GPU gets no note whatever the CPU has
    from cyclereg.training.api import _note_precision

    monkeypatch.setattr(device_mod, "cpu_has_bf16_units", lambda: False)
    capsys.readouterr()
    _note_precision(DenseCycleConfig(cpu_bf16=True), torch.device("cuda"))
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_loaded_model_is_on_the_device_asked_for():
    """load_model puts the network (random or from a checkpoint) on the resolved device."""
    net = dense_api.load_model("random", 0, "cuda")[0]
    assert {p.device.type for p in net.parameters()} == {"cuda"}
