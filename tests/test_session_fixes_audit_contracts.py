"""Contracts of today's mends, found by a mutation audit of commits cfc454d..55399d4 (2026-12-07).

Audited: the output path checks (:mod:`cyclereg.errors`: a NUL character, ``-``, symbolic links followed,
dangling or looping links, names too long for the file system) and the set writers' aside names
(:mod:`cyclereg.checkpoint`), ``print_note`` on a closed stderr, the CSV parse error, keypoint step timings on
stderr, knn / tre_stats / sdlogj / hd95 / spacing value checks, ``inverse_consistency``'s count, the dense
config's counts and switches, ``warp`` vs ``warp_unchecked``, ``register``'s option checks before file checks,
``stage_checkpoint`` / ``final_stage``, the keypoint report's ``errors_csv``, ``cycle``'s run.json put back on a
refusal (``_targets_recorded``), ``nothing_left_to_train``, ``pretrain_random_summary``'s note and the status
estimate of a run that cannot go on. The lines the commits added or changed were mutated one at a time (93
hand-written mutants) and run against ``tests/test_session_fixes_*.py``; the tests here kill the survivors that
matter to a user (the name-length boundary, a link judged by its target in ``require_separate_output``, cut aside
names that must differ, a damaged final.pt taken for stage 0, run.json put back after a fold finished a stage or
over another command's record, ``keypoints(verbose=False)``, NaN fields in the inner loops, an output linked to
another file system, ``cycle``'s interruption hint for its own ``--stages``, ...). The real bugs it found were
pinned as strict xfails and are mended (the tests now pass): non-ASCII output names near the 255-byte limit (names
cut by bytes), the run.json restore undoing a target another cycle relied on (a shared lock every working cycle
holds; the scenario test was split into the working and the finished other command), and pretrain-random's note
claiming stage-0 labels for a metric-supervised run.
"""

from __future__ import annotations

import json
import os

import pytest

from cyclereg.errors import InputError, require_output_file, require_separate_output


# ----------------------------------------------------------------------------- names near the file system's limit
def test_an_output_name_of_exactly_the_limit_is_taken_and_one_byte_more_is_refused(tmp_path):
    """255 bytes (the usual ``PC_NAME_MAX``) is a legal name: taken; 256 bytes is refused naming the size."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    ok = tmp_path / ("a" * (limit - 5) + ".json")
    assert require_output_file(ok) == ok
    with pytest.raises(InputError, match=rf"a name in it is too long for the file system \({limit + 1} bytes, "
                                         rf"at most {limit}\)"):
        require_output_file(tmp_path / ("a" * (limit - 4) + ".json"))
    # bytes, not characters: 2-byte characters reach the limit at half the count
    with pytest.raises(InputError, match=rf"\({2 * (limit // 2 + 1)} bytes, at most {limit}\)"):
        require_output_file(tmp_path / ("é" * (limit // 2 + 1)))


# ----------------------------------------------------------------------------- a link into a run, judged by its target
def test_require_separate_output_judges_a_link_into_the_read_run_by_its_target(tmp_path):
    """``evaluate --run RUN --json LINK`` / ``status RUN --json LINK``: LINK pointing at ``RUN/stage1.pt`` would
    overwrite the run's checkpoint; the check follows the link (the run here has no run.json, so only
    ``run_dirs`` can name it)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "stage1.pt").write_bytes(b"weights")
    link = tmp_path / "report.json"
    link.symlink_to(run / "stage1.pt")
    with pytest.raises(InputError, match=r"report\.json: --json: this would be one of the files of the run "
                                         r"directory \(.*run\), which the command only reads"):
        require_separate_output(link, "--json", run_dirs={"the run directory": run})
    plain = tmp_path / "plain.json"  # beside the run, not in it: fine
    require_separate_output(plain, "--json", run_dirs={"the run directory": run})


_NEAR_LIMIT = "é" * 122 + ".json"  # 249 bytes (legal), 127 characters: below TEMP_NAME_KEEP's 200 characters


def test_an_output_whose_non_ascii_name_is_near_the_limit_is_replaced_as_a_set(tmp_path):
    from cyclereg.checkpoint import atomic_write_text, staged_file_set

    target = tmp_path / _NEAR_LIMIT
    assert len(os.fsencode(target.name)) <= os.pathconf(tmp_path, "PC_NAME_MAX")
    require_output_file(target)
    target.write_text("old")
    with staged_file_set() as files:
        atomic_write_text(files(target), "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [_NEAR_LIMIT]


def test_an_output_whose_non_ascii_name_is_near_the_limit_is_written_atomically(tmp_path):
    from cyclereg.checkpoint import atomic_write_text

    target = tmp_path / _NEAR_LIMIT
    require_output_file(target)
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


# ----------------------------------------------------------------------------- cycle's run.json put back on a refusal
def _tiny_run_json(run):
    from cyclereg.checkpoint import to_jsonable
    from cyclereg.training.api import CloudCycleConfig

    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "keypoints", "folds": [],
                                              "config": to_jsonable(CloudCycleConfig(stages=1))}))
    for k in (0, 1):
        (run / f"fold{k}").mkdir()


def test_a_refusal_puts_back_the_stage_target_and_the_rule_it_recorded(tmp_path):
    """``cycle --stages 3 --stop-below 0.5`` that refuses inside the training: run.json as before (stages 1, no
    rule); one that succeeds keeps both."""
    from cyclereg.training.api import _targets_recorded

    run = tmp_path / "run"
    _tiny_run_json(run)
    before = (run / "run.json").read_bytes()
    with pytest.raises(InputError, match="refuses"):
        with _targets_recorded(run, 3, 0.5) as rule:
            assert rule == 0.5 and json.loads((run / "run.json").read_text())["config"]["stages"] == 3
            raise InputError("fold 0 refuses", run)
    assert (run / "run.json").read_bytes() == before
    with _targets_recorded(run, 3, 0.5):
        pass
    meta = json.loads((run / "run.json").read_text())
    assert meta["config"]["stages"] == 3 and meta["stop_below_mm"] == 0.5



def test_a_refusal_after_a_fold_finished_a_stage_keeps_the_target(tmp_path):
    """A fold that finished stage 1 within the command (its labels and checkpoint written) trained towards the new
    target: a later refusal leaves run.json as the command recorded it."""
    from cyclereg.training.api import _targets_recorded
    from cyclereg.training.scheduler import StageScheduler

    run = tmp_path / "run"
    _tiny_run_json(run)
    sched = StageScheduler(None, run / "fold0")
    sched.labels_path(0).write_bytes(b"")
    with pytest.raises(InputError):
        with _targets_recorded(run, 3, None):
            sched.checkpoint_path(1).write_bytes(b"")
            sched.labels_path(1).write_bytes(b"")  # stage 1 finished
            assert sched.last_finished_stage() == 1
            raise InputError("stage 2: unreadable", run)
    assert json.loads((run / "run.json").read_text())["config"]["stages"] == 3


def test_a_refusal_leaves_a_run_json_that_another_command_rewrote_meanwhile(tmp_path):
    """Another command changed run.json while this one ran (here: its stopping rule): the refusal does not put
    back the bytes from before, which would undo that command's record."""
    from cyclereg.training.api import _record_stop_rule, _targets_recorded

    run = tmp_path / "run"
    _tiny_run_json(run)
    with pytest.raises(InputError):
        with _targets_recorded(run, 3, None):
            _record_stop_rule(run, 0.7)  # e.g. a cycle --stop-below 0.7 of fold 1
            raise InputError("fold 0 refuses", run)
    meta = json.loads((run / "run.json").read_text())
    assert meta["stop_below_mm"] == 0.7 and meta["config"]["stages"] == 3


def test_an_unreadable_final_checkpoint_is_no_stage_not_stage_0(tmp_path):
    """Stage 0 of a volume run is the random network (no file): a damaged final.pt must not stand for it."""
    from cyclereg.api import final_stage, stage_checkpoint

    (tmp_path / "final.pt").write_bytes(b"not a checkpoint")
    assert final_stage(tmp_path) is None
    assert stage_checkpoint(tmp_path, 0) is None

def test_a_refusal_does_not_take_back_a_target_another_working_cycle_relies_on(tmp_path):
    """Two ``cycle --stages 3`` at once on folds 0 and 1 (fold locks allow it): fold 0's refuses while fold 1's
    works towards the target 3 it found recorded (a no-op write): run.json must keep it."""
    from cyclereg.training.api import _targets_recorded

    run = tmp_path / "run"
    _tiny_run_json(run)
    with _targets_recorded(run, 3, None):  # the other command, on fold 1, still working when fold 0's refuses
        with pytest.raises(InputError):
            with _targets_recorded(run, 3, None):
                raise InputError("fold 0: unreadable pseudo labels", run)
        assert json.loads((run / "run.json").read_text())["config"]["stages"] == 3


def test_a_refusal_does_not_take_back_a_target_another_cycle_trained_to(tmp_path):
    """The same, where fold 1's command finished a stage towards target 3 and ended before fold 0's refused."""
    from cyclereg.training.api import _targets_recorded

    run = tmp_path / "run"
    _tiny_run_json(run)
    with pytest.raises(InputError):
        with _targets_recorded(run, 3, None):
            with _targets_recorded(run, 3, None):  # fold 1's command: trains its stage 1 (files of a finished stage)
                for name in ("pseudo0.pt", "pseudo1.pt", "stage1.pt"):
                    (run / "fold1" / name).write_bytes(b"x")
            raise InputError("fold 0: unreadable pseudo labels", run)
    assert json.loads((run / "run.json").read_text())["config"]["stages"] == 3


def test_a_refusal_alone_still_puts_the_target_back(tmp_path):
    """Once the other command has ended without training (nothing relies on the target), the record goes back."""
    from cyclereg.training.api import _targets_recorded

    run = tmp_path / "run"
    _tiny_run_json(run)
    with pytest.raises(InputError):
        with _targets_recorded(run, 3, None):
            with _targets_recorded(run, 3, None):
                pass
            raise InputError("fold 0: unreadable pseudo labels", run)
    assert json.loads((run / "run.json").read_text())["config"]["stages"] == 1


# ----------------------------------------------------------------------------- aside names of long outputs
def test_two_long_outputs_of_one_prefix_are_both_put_back_when_the_move_in_fails(tmp_path, monkeypatch):
    """``keypoints -o NAME.csv`` near the limit: NAME.csv and NAME.csv.config.json share their first 200 characters,
    so their cut aside names must differ (``.earlier.I.NAME``); a move-in that fails puts back both earlier files."""
    import errno
    from pathlib import Path

    import cyclereg.checkpoint as checkpoint

    first = tmp_path / ("k" * 236 + ".csv")
    second = tmp_path / (first.name + ".config.json")  # 252 bytes
    first.write_text("old csv")
    second.write_text("old config")
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst) == second and Path(src).name == second.name:  # the staged new file onto its target
            raise OSError(errno.EIO, "injected", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", failing)
    with pytest.raises(OSError, match="injected"):
        with checkpoint.staged_file_set() as files:
            checkpoint.atomic_write_text(files(first), "new csv")
            checkpoint.atomic_write_text(files(second), "new config")
    monkeypatch.undo()
    assert first.read_text() == "old csv" and second.read_text() == "old config"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])


# ----------------------------------------------------------------------------- hd95 at whole-number sizes
def test_hd95_takes_a_spacing_of_whole_numbers_and_of_a_numpy_array():
    import numpy as np
    import torch

    from cyclereg.metrics import hd95

    fixed = torch.zeros(6, 6, 6, dtype=torch.long)
    fixed[2:4, 2:4, 2:4] = 1
    warped = torch.zeros_like(fixed)
    warped[2:5, 2:4, 2:4] = 1  # one extra plane along i
    assert hd95(fixed, warped, spacing=(2, 1, 1)) == {1: 2.0}
    assert hd95(fixed, warped, spacing=[3, 1, 1]) == {1: 3.0}
    assert hd95(fixed, warped, spacing=np.array([4, 1, 1], dtype=np.int32)) == {1: 4.0}
    assert hd95(fixed, warped, spacing=np.diag([5, 1, 1])) == {1: 5.0}  # a (3, 3) map of whole numbers


# ----------------------------------------------------------------------------- a NaN prediction in a training step
@pytest.mark.parametrize("supervision", ["ncc", "mind"])
def test_a_metric_training_step_of_a_nan_prediction_gives_a_nan_loss_not_an_error(monkeypatch, supervision):
    """``warp_unchecked`` in the metric loss: a NaN prediction (a diverging step) gives a NaN loss, which the
    gradient scaler skips; the checked ``warp`` would stop the training with 'disp_vox: holds NaN or inf'."""
    import torch

    import cyclereg.training.dense as dense
    from test_cycle_dense import _two_image_task

    task = _two_image_task(supervision=supervision)
    g = torch.Generator().manual_seed(1)
    fixed, moving = torch.rand(1, 1, 16, 16, 16, generator=g), torch.rand(1, 1, 16, 16, 16, generator=g)
    shape = tuple(dense.strided(fixed, task.config.label_stride).shape[2:])

    def nan_prediction(*args, **kwargs):
        field = torch.zeros(1, 3, *shape)
        field[0, 0, 1, 1, 1] = float("nan")
        return field

    monkeypatch.setattr(dense, "predict_displacement", nan_prediction)
    assert task._loss(None, fixed, moving, None).isnan()



# ----------------------------------------------------------------------------- pretrain-random's note on unused options
def test_pretrain_random_again_on_a_metric_run_does_not_say_its_labels_exist(tmp_path, monkeypatch, capsys):
    """The second ``pretrain-random --supervision ncc --device cpu`` into a run: nothing is made, so --device is
    unused, but the reason given must not be labels that the run does not have."""
    import cyclereg.training.api as training
    from cyclereg.checkpoint import to_jsonable
    from cyclereg.training.dense import DenseCycleConfig
    from cyclereg.training.scheduler import StageScheduler

    run = tmp_path / "run"
    (run / "all").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"kind": "volumes", "folds": [],
                                              "config": to_jsonable(DenseCycleConfig(supervision="ncc"))}))
    StageScheduler(None, run / "all").labels_path(0).write_bytes(b"")  # what the first command left as stage 0
    monkeypatch.setattr(training, "pretrain_random", lambda dataset, out, **kwargs: out)  # nothing left to make
    line = training.pretrain_random_summary(tmp_path / "ds", run, device="cpu")
    assert "needs no pseudo labels (its stage 0 holds none, recorded before)" in line
    said = capsys.readouterr().err
    assert "labels exist already" not in said and "--device cpu not used: stage 0 is recorded already" in said


# ----------------------------------------------------------------------------- keypoints, quiet
def test_keypoints_not_verbose_prints_nothing_and_verbose_splits_the_streams(tmp_path, capsys):
    """``keypoints(..., verbose=False)``: neither the step lines nor the result line; verbose: the steps on stderr,
    the one result line on stdout."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage as ndi

    from cyclereg.api import keypoints

    vol = ndi.gaussian_filter(np.random.default_rng(0).standard_normal((26, 24, 20)), 1.5) * 100
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    capsys.readouterr()
    keypoints(tmp_path / "ct.nii.gz", tmp_path / "k.csv", device="cpu", verbose=False)
    assert capsys.readouterr() == ("", "")
    keypoints(tmp_path / "ct.nii.gz", tmp_path / "k2.csv", device="cpu", verbose=True)
    out, err = capsys.readouterr()
    n = len((tmp_path / "k2.csv").read_text().splitlines()) - 1
    assert out.startswith(f"{n} keypoints -> ") and len(out.splitlines()) == 1, out
    assert "keypoints ->" not in err and "done read CT" in err


def test_composition_error_of_a_nan_field_is_nan_and_of_exact_inverses_zero():
    """An inner-loop diagnostic (``warp_unchecked``): a NaN field gives NaN, not 'disp_vox: holds NaN or inf'; a
    constant shift and its negative compose to zero exactly."""
    import torch

    from cyclereg.dense.convex import composition_error

    shift = torch.zeros(1, 3, 4, 4, 4)
    shift[:, 0] = 1.0
    assert composition_error(shift, -shift).item() == 0.0
    broken = shift.clone()
    broken[0, 1, 2, 2, 2] = float("nan")
    assert composition_error(broken, -shift).isnan()


def test_an_output_link_to_another_file_system_is_written_there_atomically(tmp_path):
    """An output linked to another disk (results -> /mnt/...): the temporary file is made beside the target, so
    the final rename stays on one file system (a temporary beside the link would fail with EXDEV)."""
    import tempfile

    from cyclereg.checkpoint import atomic_write_text, staged_file_set

    other = "/dev/shm"
    if not os.path.isdir(other) or not os.access(other, os.W_OK) or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second writable file system here")
    with tempfile.TemporaryDirectory(dir=other) as far:
        target = os.path.join(far, "r.json")
        with open(target, "w") as fh:
            fh.write("old")
        link = tmp_path / "r.json"
        link.symlink_to(target)
        atomic_write_text(link, "one")
        with open(target) as fh:
            assert fh.read() == "one"
        with staged_file_set() as files:
            atomic_write_text(files(link), "two")
        with open(target) as fh:
            assert fh.read() == "two"
        assert link.is_symlink() and os.listdir(far) == ["r.json"] and os.listdir(tmp_path) == ["r.json"]


@pytest.mark.parametrize("stored", [{"pad_multiple": "16"}, {"pad_multiple": 4.0}])
def test_a_dense_config_pad_multiple_that_is_no_count_is_named_as_such(stored):
    """An edited stored config's ``pad_multiple`` of text or 4.0: 'expected a whole number', not a bare TypeError
    ('not all arguments converted') nor 'must be a multiple of the downsampling'."""
    from cyclereg.dense.config import config_from_dict

    with pytest.raises(ValueError, match=rf"^pad_multiple: expected a whole number >= 1, got {stored['pad_multiple']!r}$"):
        config_from_dict(stored)


# ----------------------------------------------------------------------------- the interruption hint counts the given --stages
def test_a_cycle_stopping_early_with_its_stages_done_says_nothing_is_left(tmp_path, monkeypatch):
    """run.json records 3 stages (an interrupted ``cycle --stages 3``), fold 1 has finished stage 1: ``cycle
    --stages 1`` stopped then has nothing left to do (its --stages, not the run's, is what it trains towards)."""
    import signal

    from typer.testing import CliRunner

    import cyclereg.training.api as training
    from conftest import intraop_threads
    from cyclereg_cli.main import app
    from test_session_fixes_d_messages import _tiny_run

    runner = CliRunner()
    with intraop_threads(1):
        ds, run = _tiny_run(tmp_path)
        assert runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"]).exit_code == 0

        def stopped():
            raise SystemExit(128 + signal.SIGTERM)

        monkeypatch.setattr(training, "_progress", stopped)
        training._record_stage_target(run, 3)  # as an interrupted cycle --stages 3 left it
        res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "1"])
    assert res.exit_code == 143
    assert res.stderr == "cyclereg: terminated; every stage it was to train had finished: nothing is left to do\n"
