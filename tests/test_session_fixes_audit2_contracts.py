"""Contracts of today's later mends, found by a second mutation audit of commits 55399d4..4659a90 (2026-12-07).

Audited: ``cycle``'s run.json put back on a refusal (:func:`cyclereg.training.api._targets_recorded`: the shared
cycles lock and ``alone()``, ``_finished_stages`` of a volume run's ``all`` folder), the check of an edited
run.json against the last finished stage (``_require_trained_with``, :data:`RESUME_FREE`), the checkpoint's
``run_config``, ``pretrain-random``'s in-process labelling and note, the atomic writers' byte-cut names
(``_name_head``), dangling and looping output links, the keypoint report's smoothness means and ``errors_csv``,
``exported_model_files``, case-distinct pair ids, the volume evaluate's NaN ResultError, and the value / dtype
mends (knn, pointio, volumeio, Foerstner / LBP / lung-mask counts, mind_ssc, warp, convex, erased_labels).
Lines these commits added or changed were mutated one at a time and run against ``tests/test_session_fixes_*.py``
and the docstring walk; the tests here kill the survivors that matter to a user. Each checks a hand-derived
answer (a kept or restored stage target, a named setting, a byte count, a file's place), never a snapshot.
"""

from __future__ import annotations

import json
import os

import pytest

from cyclereg.errors import InputError


# ----------------------------------------------------------------------------- cycle's run.json on a refusal
def _tiny_run_json(run, kind="keypoints", folds=("fold0", "fold1")):
    from cyclereg.checkpoint import to_jsonable
    from cyclereg.training.clouds import CloudCycleConfig
    from cyclereg.training.dense import DenseCycleConfig

    cfg = CloudCycleConfig(stages=1) if kind == "keypoints" else DenseCycleConfig(stages=1)
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": kind, "folds": [], "config": to_jsonable(cfg)}))
    for name in folds:
        (run / name).mkdir()


def test_a_refusal_while_another_cycle_still_works_keeps_the_target(tmp_path):
    """Cycle A records target 3 and cycle B (another fold) starts working towards it; A then refuses while B still
    works: the target stays 3 (B relies on it). Once B is done and A is alone, a refusal puts it back."""
    from cyclereg.training.api import _targets_recorded

    run = tmp_path / "run"
    _tiny_run_json(run)
    with pytest.raises(InputError):
        with _targets_recorded(run, 3, None):  # cycle A
            other = _targets_recorded(run, 3, None)  # cycle B, still working when A refuses
            other.__enter__()
            try:
                raise InputError("fold 0: unreadable pseudo labels", run)
            finally:
                assert json.loads((run / "run.json").read_text())["config"]["stages"] == 3
    try:
        assert json.loads((run / "run.json").read_text())["config"]["stages"] == 3
    finally:
        other.__exit__(None, None, None)
    with pytest.raises(InputError):  # alone now: put back (run.json said 3 before, so it stays 3)
        with _targets_recorded(run, 5, None):
            raise InputError("fold 0: unreadable pseudo labels", run)
    assert json.loads((run / "run.json").read_text())["config"]["stages"] == 3
    assert (run / ".cyclereg-cycles.lock").is_file()  # the shared lock's file is a run file (RUN_DIR_NAMES)


def test_a_volume_run_refusal_after_its_stage_finished_keeps_the_target(tmp_path):
    """A volume run's fold folder is ``all``: a stage finished there within the command keeps the new target."""
    from cyclereg.training.api import _finished_stages, _targets_recorded
    from cyclereg.training.scheduler import StageScheduler

    run = tmp_path / "run"
    _tiny_run_json(run, "volumes", folds=("all",))
    sched = StageScheduler(None, run / "all")
    sched.labels_path(0).write_bytes(b"")
    assert _finished_stages(run) == {"all": 0}
    with pytest.raises(InputError):
        with _targets_recorded(run, 3, None):
            sched.checkpoint_path(1).write_bytes(b"")
            sched.labels_path(1).write_bytes(b"")  # stage 1 finished
            raise InputError("stage 2: unreadable", run)
    assert json.loads((run / "run.json").read_text())["config"]["stages"] == 3
    assert _finished_stages(run) == {"all": 1}


def _volume_stage1(run, **recorded):
    """A volume run whose ``all`` folder finished stage 1, its checkpoint recording the run config ``recorded``."""
    from dataclasses import replace

    from cyclereg.checkpoint import save_checkpoint, to_jsonable
    from cyclereg.training.dense import DenseCycleConfig, DenseCycleTask

    _tiny_run_json(run, "volumes", folds=("all",))
    cfg = replace(DenseCycleConfig(stages=1), **recorded)
    for name in ("pseudo0.pt", "pseudo1.pt"):
        (run / "all" / name).write_bytes(b"")
    save_checkpoint(run / "all" / "stage1.pt", kind=DenseCycleTask.checkpoint_kind, config={}, state_dict={},
                    extra={"stage": 1, "train": {}, "run_config": to_jsonable(cfg)})
    return cfg


@pytest.mark.parametrize("key", ["amp", "cpu_bf16", "lr", "stages"])
def test_a_resumed_volume_run_may_change_its_precision_lr_and_stage_target(tmp_path, key):
    """RESUME_FREE: a volume run trained with amp / cpu_bf16 off resumes with them on (where the next stage runs),
    a lower lr, a larger target; another setting (iterations) is still refused naming it."""
    from dataclasses import replace

    from cyclereg.training.api import _require_trained_with

    run = tmp_path / "run"
    cfg = _volume_stage1(run, amp=False, cpu_bf16=False, lr=1e-3, stages=1)
    changed = {"amp": True, "cpu_bf16": True, "lr": 1e-4, "stages": 4}[key]
    _require_trained_with(run, run / "all", replace(cfg, **{key: changed}), None, "volumes")
    with pytest.raises(InputError, match=r"\(all/stage1\.pt's -> run\.json's: iterations: "
                                         + str(cfg.iterations) + " -> " + str(cfg.iterations + 1) + r"\)"):
        _require_trained_with(run, run / "all", replace(cfg, **{key: changed}, iterations=cfg.iterations + 1),
                              None, "volumes")


# ----------------------------------------------------------------------------- byte-cut names, run files
def test_name_head_keeps_the_longest_prefix_of_at_most_the_kept_bytes():
    """One ASCII letter then 2-byte letters (301 bytes): the longest prefix of at most TEMP_NAME_KEEP bytes ends
    at a character boundary one byte short of it (199 bytes: 'a' and 99 'é'); a short name is kept whole."""
    from cyclereg.checkpoint import TEMP_NAME_KEEP, _name_head

    name = "a" + "é" * 150
    head = _name_head(name)
    assert name.startswith(head) and len(os.fsencode(head)) <= TEMP_NAME_KEEP
    assert len(os.fsencode(name[:len(head) + 1])) > TEMP_NAME_KEEP  # the longest such prefix
    assert head == "a" + "é" * ((TEMP_NAME_KEEP - 1) // 2)
    assert _name_head("report.json") == "report.json"


def test_an_output_named_as_the_runs_cycles_lock_is_refused(tmp_path):
    """``--json RUN/.cyclereg-cycles.lock`` would replace the file every working cycle locks: a run file."""
    from cyclereg.errors import CYCLES_LOCK, require_output_file

    run = tmp_path / "run"
    _tiny_run_json(run)
    with pytest.raises(InputError, match="would be one of the own files of the run directory"):
        require_output_file(run / CYCLES_LOCK)
    assert require_output_file(run / "report.json") == run / "report.json"  # a report beside the run's files


# ----------------------------------------------------------------------------- exported_model_files
def test_exported_model_files_names_a_damaged_checkpoint_that_is_not_the_first(tmp_path):
    """fold1.pt good, fold2.pt damaged: the check names fold2.pt before any registration (each is loaded)."""
    from cyclereg.checkpoint import save_checkpoint
    from cyclereg.clouds.api import exported_model_files
    from cyclereg.clouds.pipeline import CloudRegConfig
    from cyclereg.clouds.features import build_graph_net

    cfg = CloudRegConfig()
    save_checkpoint(tmp_path / "fold1.pt", kind="cloud", config=cfg,
                    state_dict=build_graph_net(cfg.net, seed=0).state_dict())
    assert exported_model_files(tmp_path) == [tmp_path / "fold1.pt"]
    (tmp_path / "fold2.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError) as err:
        exported_model_files(tmp_path)
    assert "fold2.pt" in str(err.value)


# ----------------------------------------------------------------------------- value / dtype mends
def test_lbp_config_refuses_source_labels_zero_by_name():
    """``source_labels`` is a whole number >= 1 (None = all): 0 searches no source label."""
    from cyclereg.clouds.lbp import LBPConfig

    with pytest.raises(ValueError, match=r"source_labels=0: need a whole number, at least 1"):
        LBPConfig(source_labels=0)
    assert LBPConfig(source_labels=1).source_labels == 1


def test_foerstner_config_takes_no_mask_erosion():
    """``mask_erosion_voxels`` is a whole number >= 0: 0 (no erosion) is taken, -1 refused by name."""
    from cyclereg.keypoints.foerstner import FoerstnerConfig

    assert FoerstnerConfig(mask_erosion_voxels=0).mask_erosion_voxels == 0
    with pytest.raises(ValueError, match=r"mask_erosion_voxels must be a whole number >= 0, got -1"):
        FoerstnerConfig(mask_erosion_voxels=-1)


def test_parse_points_csv_of_one_point_is_that_point():
    """The header and one point line: (1, 3) holding the point (only the header alone is the empty cloud)."""
    from cyclereg.pointio import parse_points_csv, points_csv

    one = torch_tensor([[1.5, -2.0, 3.25]])
    got = parse_points_csv(points_csv(one))
    assert got.shape == (1, 3) and got.tolist() == [[1.5, -2.0, 3.25]]
    assert parse_points_csv(points_csv(one[:0])).shape == (0, 3)


def torch_tensor(rows):
    import torch

    return torch.tensor(rows, dtype=torch.float32)


def test_write_nifti_of_a_numpy_half_array_and_a_bool_mask(tmp_path):
    """A NumPy float16 array is written as float32 (exact), a bool mask as uint8 0 / 1, as the docstring says."""
    import nibabel as nib
    import numpy as np

    from cyclereg.volumeio import write_nifti

    half = np.array([[[0.5, -1.25], [3.0, 0.0]]], dtype=np.float16)
    write_nifti(tmp_path / "h.nii", half, np.eye(4))
    img = nib.load(tmp_path / "h.nii")
    assert img.get_data_dtype() == np.float32 and np.array_equal(np.asarray(img.dataobj), half.astype(np.float32))
    mask = np.array([[[True, False], [False, True]]])
    write_nifti(tmp_path / "m.nii.gz", mask, np.eye(4))
    img = nib.load(tmp_path / "m.nii.gz")
    assert img.get_data_dtype() == np.uint8 and np.asarray(img.dataobj).tolist() == [[[1, 0], [0, 1]]]


def test_mind_ssc_of_a_bfloat16_image_is_computed_in_float32():
    """bfloat16 in, bfloat16 out: the float32 descriptors rounded once (not computed in bfloat16)."""
    import torch

    from cyclereg.dense.similarity import mind_ssc

    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 6, 7, 5, generator=g).to(torch.bfloat16)
    got = mind_ssc(img)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, mind_ssc(img.float()).to(torch.bfloat16))


# ----------------------------------------------------------------------------- scripts/ensemble_stage.py
def test_ensemble_stage_names_a_member_whose_training_record_has_no_config():
    """``training[run]`` present but without its ``config`` (no run.json record to train with) is a member
    without training, as a missing record is; members with a config pass (None)."""
    from conftest import load_script

    mod = load_script("scripts/ensemble_stage.py")
    members = {"fold1": [{"run": "runA", "source": "runA/fold1/final.pt"},
                         {"run": "runB", "source": "runB/fold1/final.pt"}]}
    ok = {"members": members, "training": {"runA": {"config": {}}, "runB": {"config": {"seed": 1}}}}
    assert mod._member_without_training(ok, [1], None) is None
    bad = {"members": members, "training": {"runA": {"config": {}}, "runB": {"kind": "keypoints"}}}
    assert mod._member_without_training(bad, [1], None) == (1, "runB")
    assert mod._member_without_training(bad, [1], [0]) is None  # only member 0 trained


# ----------------------------------------------------------------------------- the cycles lock file
def test_the_cycles_lock_survives_run_json_writes_and_counts_as_nothing_written(tmp_path):
    """run_file_lock's clean-up of killed writes leaves the cycles lock a working cycle holds (the same file, so
    a later cycle shares it); a folder holding only lock files is one where nothing was written."""
    from cyclereg.training.api import CYCLES_LOCK, RUN_LOCK, _cycles_on_run, _nothing_written, run_file_lock

    run = tmp_path / "run"
    _tiny_run_json(run, folds=())
    with _cycles_on_run(run) as alone:
        inode = (run / CYCLES_LOCK).stat().st_ino
        with run_file_lock(run):
            pass
        assert (run / CYCLES_LOCK).stat().st_ino == inode
        with _cycles_on_run(run):  # a second cycle shares the file: the first is not alone
            assert not alone()  # (one try only: a failed try gives up the shared lock, as documented)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / CYCLES_LOCK).write_bytes(b"")
    (empty / RUN_LOCK).write_bytes(b"")
    assert _nothing_written(empty)
    (empty / "notes.txt").write_text("mine")
    assert not _nothing_written(empty)
