"""Contracts of the session's second round of mends, from a mutation audit (2026-12-07).

Audited: the library lines changed on 2026-12-07 (``git diff dc0e65c`` of ``cyclereg`` and ``cyclereg_cli``): the
input-kind checks of :mod:`cyclereg.frames` (``require_tensor``, ``check_shape``, ``check_spacing``, the singular
affine, ``half_width_voxels`` / ``UnitBox.around`` ranges), :func:`cyclereg.errors.python_number`, the half-precision
paths of :mod:`cyclereg.clouds.augment` and :mod:`cyclereg.dense.similarity`, the parameter checks of
:mod:`cyclereg.dense.convex`, the new argument checks of point I/O, the lung mask, kNN, LBP and warp helpers, the
per-fold configuration of ``evaluate --run`` reports, the ``ran_on`` record of each training stage, and the
concurrency mends of ``pretrain-random`` / ``cycle`` / register outputs. Hand-made mutants of those lines that the
session's own tests (the input-types, CLI config and concurrency walks) let through are killed here; every expected
value is derived by hand (a known scale, an exact count, an exact dtype, an exact message fragment naming the
argument). Real bugs found were pinned as strict xfails (``BUG: ...``) until they were mended.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cyclereg import frames
from cyclereg.clouds import augment
from cyclereg.clouds.knn import knn_indices
from cyclereg.clouds.lbp import lbp_beliefs
from cyclereg.dense.convex import box_smooth, displacement_set
from cyclereg.dense.similarity import mind_loss, ncc_loss
from cyclereg.keypoints.lungmask import body_mask
from cyclereg.pointio import points_csv
from cyclereg.warp import sample_at_points


def _images(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(1, 1, 6, 6, 6, generator=g).to(dtype), torch.rand(1, 1, 6, 6, 6, generator=g).to(dtype))


# ----------------------------------------------------------------------------- frames: shapes, spacings, ranges
def test_a_bool_grid_size_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^shape: expected 3 spatial sizes"):
        frames.inside_grid(torch.zeros(1, 3), (True, 2, 2))


def test_a_spacing_of_four_values_one_a_bool_is_refused_by_name():
    # the bool is left out of the sizes, so three numbers remain: the count of the given values decides
    with pytest.raises(ValueError, match=r"^spacing_mm: expected 3 finite voxel sizes"):
        frames.spacing_affine((1.0, 2.0, 3.0, True))


def test_a_numpy_array_is_told_the_way_in():
    with pytest.raises(TypeError, match=r"^points: expected a torch.Tensor, got numpy.ndarray \(give torch.from_numpy"):
        augment.apply_affine(np.zeros((2, 3)), torch.eye(3), torch.zeros(3))


def test_half_width_of_radius_zero_is_no_voxel_and_of_inf_or_nan_refused():
    assert frames.half_width_voxels(0.0, (1.0, 2.0, 0.5)) == (0, 0, 0)
    assert frames.half_width_voxels(0, (1.0, 1.0, 1.0)) == (0, 0, 0)
    for bad in (math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^radius_mm: expected a finite radius >= 0"):
            frames.half_width_voxels(bad, (1.0, 1.0, 1.0))


def test_unit_box_margin_of_minus_half_or_nan_is_refused():
    cloud = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 4.0]])
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"^margin: expected a finite fraction > -0.5"):
            frames.UnitBox.around(cloud, margin=bad)
    frames.UnitBox.around(cloud, margin=-0.25)  # just inside the range: a box half the size


# ----------------------------------------------------------------------------- errors.python_number
def test_a_bool_parameter_is_refused_not_read_as_one():
    fixed, warped = _images()
    with pytest.raises(ValueError, match=r"^radius True: need a whole number"):
        ncc_loss(fixed, warped, radius=True)
    with pytest.raises(ValueError, match=r"^kernel True: need a whole number"):
        box_smooth(fixed, kernel=True)


# ----------------------------------------------------------------------------- augment: ranges, dtypes
def test_random_affine_scale_of_one_or_minus_one_is_refused_and_just_below_is_taken():
    for bad in (1.0, -1.0, -3.0):
        with pytest.raises(ValueError, match=r"^scale: expected a range below 1"):
            augment.random_affine(torch.Generator().manual_seed(0), 0.0, bad, 0.0)
    A, t = augment.random_affine(torch.Generator().manual_seed(0), 0.0, 0.5, 0.0)
    factor = A[0, 0].item()  # no rotation: A = s I with s in [0.5, 1.5]
    assert 0.5 <= factor <= 1.5 and torch.allclose(A, factor * torch.eye(3)) and torch.equal(t, torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_displacements_come_back_in_their_dtype(dtype):
    disp = torch.tensor([[2.0, 4.0, -6.0], [0.5, 1.0, 8.0]], dtype=dtype)
    A = 2 * torch.eye(3)  # u = A^{-1} u' = u' / 2, exact in any precision
    back = augment.displacements_back(disp, A)
    assert back.dtype == dtype and torch.equal(back.float(), disp.float() / 2)
    rel = augment.displacements_back_relative(disp, torch.zeros(2, 3, dtype=dtype), A, torch.eye(3), torch.zeros(3))
    assert rel.dtype == dtype and torch.equal(rel.float(), disp.float() / 2)


# ----------------------------------------------------------------------------- similarity: half precision, eps
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_of_half_images_answer_in_the_fixed_dtype(dtype):
    fixed, warped = _images(dtype)
    ncc = ncc_loss(fixed, warped, radius=1)
    assert ncc.dtype == dtype
    assert ncc.item() == ncc_loss(fixed.float(), warped.float(), radius=1).to(dtype).item()
    mind = mind_loss(fixed, fixed)
    assert mind.dtype == dtype and mind.item() == 0.0  # identical images: identical descriptors


def test_a_half_warped_image_beside_a_float32_fixed_one_is_computed_in_float32():
    fixed, warped = _images()
    loss = ncc_loss(fixed, warped.half(), radius=1)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, ncc_loss(fixed, warped.half().float(), radius=1))


def test_ncc_eps_of_zero_inf_or_nan_is_refused_and_a_numpy_scalar_taken():
    fixed, warped = _images()
    for bad in (0.0, -1e-5, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^eps: expected a finite constant > 0"):
            ncc_loss(fixed, warped, eps=bad)
    eps = np.float32(1e-3)  # no Python float subclass (np.float64 is one)
    assert torch.equal(ncc_loss(fixed, warped, radius=1, eps=eps), ncc_loss(fixed, warped, radius=1, eps=float(eps)))


# ----------------------------------------------------------------------------- convex: counts of 0
def test_box_smooth_of_no_passes_is_the_input():
    x = torch.randn(1, 3, 4, 4, 4)
    assert torch.equal(box_smooth(x, 3, 0), x)


def test_displacement_set_of_radius_zero_is_the_zero_displacement():
    assert torch.equal(displacement_set(0), torch.zeros(1, 3))
    assert displacement_set(1).shape == (27, 3)


# ----------------------------------------------------------------------------- named argument checks
def test_points_csv_refuses_complex_points_by_name():
    with pytest.raises(ValueError, match=r"^points_mm: torch.complex64 values"):
        points_csv(torch.tensor([[1 + 1j, 2, 3]], dtype=torch.complex64))


def test_body_mask_names_a_ct_that_is_no_volume():
    with pytest.raises(ValueError, match=r"^ct_hu: expected a \(D, H, W\) volume"):
        body_mask(np.zeros((4, 4)), np.eye(4))


def test_lbp_names_feature_arrays_that_are_no_tensors():
    fixed, moving = torch.rand(4, 3), torch.rand(5, 3)
    with pytest.raises(TypeError, match=r"^features\[0\]\[1\]: expected a torch.Tensor, got numpy.ndarray"):
        lbp_beliefs(fixed, moving, torch.rand(4, 2), np.zeros((5, 2), dtype=np.float32))


def test_knn_names_a_reference_that_is_no_tensor():
    with pytest.raises(TypeError, match=r"^reference: expected a torch.Tensor, got numpy.ndarray"):
        knn_indices(torch.rand(3, 3), np.zeros((4, 3), dtype=np.float32), 1)


def test_sample_at_points_names_points_that_are_no_tensor():
    with pytest.raises(TypeError, match=r"^points_vox: expected a torch.Tensor, got numpy.ndarray"):
        sample_at_points(torch.zeros(1, 2, 3, 3, 3), np.zeros((2, 3)))


# ----------------------------------------------------------------------------- training: where each stage ran
@pytest.mark.parametrize("device, amp, cpu_bf16, precision", [
    ("cpu", False, False, "float32"), ("cpu", True, False, "float32"),  # amp acts on CUDA only
    ("cpu", True, True, "bfloat16 autocast"), ("cuda:0", True, True, "float16 autocast"),
    ("cuda:0", False, True, "float32")])  # cpu_bf16 acts on the CPU only
def test_a_dense_stage_records_the_precision_its_device_trains_in(device, amp, cpu_bf16, precision):
    from cyclereg.training.dense import DenseCycleConfig, DenseCycleTask
    task = object.__new__(DenseCycleTask)  # ran_on reads the configuration and device only (no data needed)
    task.config, task.device = DenseCycleConfig(amp=amp, cpu_bf16=cpu_bf16), torch.device(device)
    assert task.ran_on(1) == {"device": device, "training_precision": precision}
    assert task.ran_on(0) == {"device": device, "training_precision": None}  # stage 0 trains nothing


def test_each_log_line_of_a_cloud_run_records_its_device_and_precision(tmp_path, one_intraop_thread, monkeypatch):
    """Also: ``status`` read between stage 1's log line and its final.pt names the one file missing ('it')."""
    import json

    from cyclereg.training import api as training_api
    from cyclereg.training.scheduler import StageScheduler

    from typer.testing import CliRunner

    from cyclereg_cli.main import app
    ds, run = _tiny_labelled_run(tmp_path)
    seen, real = [], StageScheduler._publish_final

    def publish(self, stage):
        seen.append(training_api.run_status(run)["folds"][0]["next"])
        return real(self, stage)

    monkeypatch.setattr(StageScheduler, "_publish_final", publish)
    res = CliRunner().invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert seen == ["stage 1: its labels are saved, final.pt not yet (a cycle command working on the fold writes it "
                    "next; if none is, the same cycle command writes it)"]
    lines = [json.loads(line) for line in (run / "fold1" / "log.jsonl").read_text().splitlines() if line.strip()]
    assert [(r["stage"], r["device"], r["training_precision"]) for r in lines] == [(0, "cpu", None),
                                                                                  (1, "cpu", "float32")]


# ----------------------------------------------------------------------------- register: the stale set, found late
def test_register_without_query_removes_the_earlier_query_outputs(pair_files, one_intraop_thread):
    """The stale outputs are found under the output folder's lock now (``OutputStage.find_stale``): a second
    register into one folder that writes no query outputs still takes the first one's away."""
    from typer.testing import CliRunner

    from cyclereg_cli.main import app
    d, _ = pair_files
    out = d / "out"
    base = ["register", str(d / "f.csv"), str(d / "m.csv"), "-o", str(out), "--device", "cpu"]
    res = CliRunner().invoke(app, [*base, "--query", str(d / "q.csv")])
    assert res.exit_code == 0, res.output
    with_query = {p.name for p in out.iterdir()}
    query_files = {name for name in with_query if name.startswith("query")}
    assert query_files, with_query
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == with_query - query_files


# ----------------------------------------------------------------------------- cycle: the stage-0 check, both halves
def test_cycle_of_an_unlabelled_fold_is_refused_before_and_under_its_lock(tmp_path, one_intraop_thread):
    """No fold folder: refused at once, nothing made for the fold (no lock file, no folder). A fold folder without
    pseudo0.pt (a fold whose labelling stopped early): refused under the fold's lock with the same line."""
    from typer.testing import CliRunner

    from cyclereg_cli.main import app
    ds, run = _tiny_labelled_run(tmp_path)
    before = sorted(p.name for p in run.iterdir())
    assert "fold2" not in before
    cycle = ["cycle", str(ds), "--run", str(run), "--folds", "2", "--device", "cpu"]
    res = CliRunner().invoke(app, cycle)
    assert res.exit_code != 0 and "fold 2: no stage-0 pseudo labels; run 'cyclereg pretrain-random" in res.output
    assert sorted(p.name for p in run.iterdir()) == before
    (run / "fold2").mkdir()
    res = CliRunner().invoke(app, cycle)
    assert res.exit_code != 0 and "fold 2: no stage-0 pseudo labels; run 'cyclereg pretrain-random" in res.output
    assert not (run / "fold2" / "log.jsonl").exists() and not (run / "fold2" / "final.pt").exists()


# ----------------------------------------------------------------------------- more named checks and label kinds
def test_world_map_to_voxel_names_an_affine_that_is_no_finite_4x4():
    with pytest.raises(ValueError, match=r"^affine: expected a 4x4"):
        frames.world_map_to_voxel(torch.eye(3), torch.zeros(3), torch.eye(3))
    bad = torch.eye(4)
    bad[0, 3] = math.nan
    with pytest.raises(ValueError, match=r"^affine: holds NaN or inf"):
        frames.world_map_to_voxel(torch.eye(3), torch.zeros(3), bad)


def test_dice_takes_labels_given_as_an_integer_tensor():
    from cyclereg.metrics import dice
    fixed = torch.tensor([1, 1, 2, 2]).reshape(1, 1, 1, 1, 4)
    warped = torch.tensor([1, 2, 2, 2]).reshape(1, 1, 1, 1, 4)
    # label 1: 2 * 1 / (2 + 1); label 2: 2 * 2 / (2 + 3)
    for labels in (torch.tensor([1, 2]), [np.int64(1), torch.tensor(2)], [1.0, 2.0]):
        scores = dice(fixed, warped, labels=labels)
        assert list(scores) == [1, 2] and all(type(k) is int for k in scores)
        assert scores[1] == pytest.approx(2 / 3) and scores[2] == pytest.approx(0.8)


def test_spearman_is_nan_for_nan_in_either_sample_and_names_a_second_array():
    from cyclereg.metrics import spearman
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert math.isnan(spearman(a, torch.tensor([1.0, 2.0, math.nan, 4.0])))
    assert math.isnan(spearman(torch.tensor([1.0, math.nan, 3.0, 4.0]), a))
    assert spearman(a, a.flip(0)) == pytest.approx(-1.0)
    with pytest.raises(TypeError, match=r"^b: expected a torch.Tensor, got numpy.ndarray"):
        spearman(a, np.arange(4.0))


def test_lbp_centres_of_another_shape_are_named():
    from cyclereg.clouds.lbp import candidates
    with pytest.raises(ValueError, match=r"^centres \(3, 3\): expected \(4, 3\) like fixed"):
        candidates(torch.rand(4, 3), torch.rand(5, 3), 2, torch.rand(3, 3))


def test_pad_to_multiple_of_zero_is_refused_by_name():
    from cyclereg.dense.pipeline import pad_to_multiple
    with pytest.raises(ValueError, match=r"^multiple: expected a whole number >= 1, got 0"):
        pad_to_multiple(torch.zeros(1, 1, 3, 3, 3), 0)
    assert pad_to_multiple(torch.zeros(1, 1, 3, 3, 3), np.int64(4)).shape == (1, 1, 4, 4, 4)


@pytest.mark.parametrize("spacing", [(np.True_, 1.0, 1.0), np.array([True, True, True]),
                                     torch.tensor([True, True, True])], ids=["np.bool_", "bool array", "bool tensor"])
def test_a_spacing_of_bools_of_any_kind_is_refused_by_name(spacing):
    with pytest.raises(ValueError, match=r"^spacing_mm: expected 3 finite voxel sizes"):
        frames.spacing_affine(spacing)


def test_dense_cycle_without_stage0_labels_is_refused_before_and_under_the_lock(tmp_path, one_intraop_thread):
    """Volumes: the run's ``all`` folder without stage-0 labels is refused under its lock; without the folder it is
    refused at once and no folder is made."""
    import shutil

    from typer.testing import CliRunner

    from cyclereg_cli.main import app
    from test_cycle_dense import _dataset
    ds = _dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--stages", "1", "--iterations", "1",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for p in (run / "all").iterdir():  # the labelling left no labels (e.g. killed before them)
        if p.name.startswith(("pseudo", "stage", "final", "log")):
            p.unlink()
    cycle = ["cycle", str(ds), "--run", str(run), "--device", "cpu"]
    res = CliRunner().invoke(app, cycle)
    assert res.exit_code == 2 and "no stage-0 pseudo labels; run 'cyclereg pretrain-random' first" in res.output
    assert not (run / "all" / "log.jsonl").exists()
    shutil.rmtree(run / "all")
    res = CliRunner().invoke(app, cycle)
    assert res.exit_code == 2 and "no stage-0 pseudo labels; run 'cyclereg pretrain-random' first" in res.output
    assert not (run / "all").exists()


def test_a_dense_pretrain_random_takes_a_run_made_meanwhile(tmp_path, one_intraop_thread):
    """Volumes: ``pretrain-random`` (no ``--seed``) found no run.json, then, before it takes its lock, another
    ``pretrain-random --seed 5`` makes the run and labels it: the first starts again under the lock and takes the
    run's values (seed 5, its labels kept), as it would had it started after the other."""
    import json
    from contextlib import contextmanager

    import cyclereg.training.api as training_api
    from test_cycle_dense import _dataset

    ds = _dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    cheap = dict(stages=1, iterations=1, device="cpu")
    real = training_api.fold_locks

    @contextmanager
    def racing(r, folds):
        if not (run / "run.json").exists():  # the other command runs in the window between the check and the lock
            training_api.fold_locks = real
            training_api.pretrain_random(ds, run, seed=5, **cheap)
        with real(r, folds):
            yield

    training_api.fold_locks = racing
    try:
        training_api.pretrain_random(ds, run, **cheap)
    finally:
        training_api.fold_locks = real
    assert json.loads((run / "run.json").read_text())["config"]["seed"] == 5
    assert (run / "all" / "pseudo0.pt").is_file()


def _tiny_labelled_run(tmp_path):
    """``(dataset, run)``: the two-pair keypoint dataset and a run whose fold 1 has its stage-0 labels (1 stage of
    1 epoch, single-pass test-time settings)."""
    from typer.testing import CliRunner

    from conftest import write_two_pair_dataset
    from cyclereg_cli.main import app
    ds = write_two_pair_dataset(tmp_path)
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", "--stages", "1",
                                   "--epochs", "1", "--train-points", "100,200", "--tta-passes", "0",
                                   "--recentre-passes", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return ds, run
