"""Dense cyclical self-training: augmentation geometry (analytic), similarity terms
(invariances), the scheduler's label pruning, and a CPU smoke test of pretrain-random +
cycle + evaluate --run on tiny volumes, including resume and the metric baselines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from cyclereg.checkpoint import data_fingerprint, file_sha256, save_checkpoint
from cyclereg.dense.similarity import mind_loss, mind_ssc, ncc_loss
from cyclereg.training.api import run_status
from cyclereg.training.dense import (DenseCycleConfig, DenseCycleTask, affine_field, random_pair_affines, strided,
                                     transform_target)
from cyclereg.warp import warp
from cyclereg_cli.main import app

from conftest import LearningRateSpy, assert_same_weights

pytestmark = pytest.mark.usefixtures("one_intraop_thread")
runner = CliRunner()


def _rot(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]], dtype=torch.float64)


def _smooth(shape, seed=0, sigma=3.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return torch.from_numpy((x - x.mean()) / x.std()).float()[None, None]


# ----------------------------------------------------------------------------- geometry
def test_affine_field_matches_definition_on_strided_grid():
    A = _rot(10) * 1.05
    b = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    d = affine_field(A, b, (5, 6, 7), stride=2, dtype=torch.float64)
    y = torch.tensor([3.0, 1.0, 4.0], dtype=torch.float64)
    expected = (A @ (2 * y) + b) / 2 - y
    assert torch.allclose(d[0, :, 3, 1, 4], expected, atol=1e-12)


def test_transform_target_zero_and_constant_fields():
    A = _rot(12)
    c = torch.tensor([10.0, 12.0, 14.0], dtype=torch.float64)
    b = c - A @ c + torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    maps = (A, b)
    zero = torch.zeros(1, 3, 8, 9, 10)
    assert transform_target(zero, maps, maps, stride=2).abs().max() < 1e-5
    u = torch.tensor([1.5, -0.5, 2.0]).view(1, 3, 1, 1, 1).expand(1, 3, 8, 9, 10).contiguous()
    out = transform_target(u, maps, maps, stride=2)
    expected = (torch.linalg.inv(A) @ u[0, :, 0, 0, 0].double()).float()
    assert torch.allclose(out[0, :, 4, 4, 5], expected, atol=1e-4)


def test_augmented_target_aligns_augmented_images():
    """M(y) = F(y - c): after augmenting both images, the transformed target still maps
    every interior fixed voxel onto the matching moving intensity."""
    shape = (32, 32, 32)
    big = _smooth(shape, seed=1, sigma=3.0)
    c = torch.tensor([2.0, -1.5, 1.0])
    F_img = big
    M_img = warp(F_img, -c.view(1, 3, 1, 1, 1).expand(1, 3, *shape))  # M(y) = F(y - c)
    u = c.view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()  # F(x) ~ M(x + c)
    cfg = DenseCycleConfig()
    g = torch.Generator().manual_seed(3)
    fix_map, mov_map = random_pair_affines(g, cfg, shape, (1.0, 1.5, 2.0))
    Fa = warp(F_img, affine_field(*fix_map, shape))
    Ma = warp(M_img, affine_field(*mov_map, shape))
    ua = transform_target(u, fix_map, mov_map, stride=1)
    aligned = warp(Ma, ua)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8), slice(8, -8))
    before = (Ma - Fa)[inner].pow(2).mean()
    after = (aligned - Fa)[inner].pow(2).mean()
    assert after < 0.05 * before
    assert after < 0.02  # unit-variance image: only interpolation error remains


def test_a_training_batch_augments_images_and_targets_together():
    """The same check through the task's batch maker (`_batch`, label grid of stride 2): the target it
    returns maps the augmented moving image onto the augmented fixed one, as the true shift does the
    originals. A batch whose images were augmented but whose target was not fails this."""
    from cyclereg.training.dense import DenseCycleTask, VolumeImage

    shape = (32, 32, 32)
    F_img = _smooth(shape, seed=1, sigma=3.0)
    c = torch.tensor([2.0, -1.5, 1.0])  # image voxels: M(y) = F(y - c)
    M_img = warp(F_img, -c.view(1, 3, 1, 1, 1).expand(1, 3, *shape))
    task = DenseCycleTask([VolumeImage("f", F_img), VolumeImage("m", M_img)], [(0, 1)], (1.0, 1.5, 2.0),
                          DenseCycleConfig(label_stride=2), torch.device("cpu"))
    label = (c / 2).view(1, 3, 1, 1, 1).expand(1, 3, *task.label_shape).contiguous()  # label-grid voxels
    Fa, Ma, ua = task._batch([0], {task.pair_id(0): label}, torch.Generator().manual_seed(3))
    Fs, Ms = strided(Fa, 2), strided(Ma, 2)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    before = (Ms - Fs)[inner].pow(2).mean()
    after = (warp(Ms, ua) - Fs)[inner].pow(2).mean()
    assert not torch.equal(Fa, F_img) and after < 0.05 * before


def test_random_pair_affines_are_seeded_and_near_identity():
    cfg = DenseCycleConfig()
    a = random_pair_affines(torch.Generator().manual_seed(0), cfg, (20, 20, 20), (1, 1, 1))
    b = random_pair_affines(torch.Generator().manual_seed(0), cfg, (20, 20, 20), (1, 1, 1))
    assert all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
    A, _ = a[0]
    assert (A - torch.eye(3, dtype=A.dtype)).abs().max() < 0.5


def test_strided_grid_centres():
    x = torch.arange(9.0).view(1, 1, 9, 1, 1).expand(1, 1, 9, 3, 3).contiguous()
    s = strided(x, 2)
    assert s.shape[2] == 5
    assert torch.allclose(s[0, 0, 1:4, 1, 1], torch.tensor([2.0, 4.0, 6.0]))  # centred on voxel 2n


# ----------------------------------------------------------------------------- similarity
def test_similarity_invariances():
    x = _smooth((20, 20, 20), seed=2, sigma=2.0)
    y = _smooth((20, 20, 20), seed=5, sigma=2.0)
    assert ncc_loss(x, 2.0 * x + 1.0) < 1e-3
    assert abs(ncc_loss(x, -x).item() - 2.0) < 1e-3
    assert ncc_loss(x, y) > 0.5
    assert mind_ssc(x).shape == (1, 12, 20, 20, 20)
    assert mind_loss(x, x) == 0
    assert mind_loss(x, 3.0 * x + 2.0) < 1e-6  # MIND ignores affine intensity changes
    assert mind_loss(x, y) > 10 * mind_loss(x, 3.0 * x + 2.0)


# ----------------------------------------------------------------------------- scheduler
class _ToyTask:
    """Stage t's labels are t everywhere; ``trained`` lists the stages trained, in order."""

    checkpoint_kind = "toy"

    def __init__(self):
        self.trained = []

    def new_model(self, stage):
        torch.manual_seed(stage)
        return torch.nn.Linear(1, 1)

    def model_config(self):
        return {"toy": 1}

    def make_pseudo_labels(self, model, stage, progress=None, parts=None):
        return {"p": torch.full((2,), float(stage))}, {"weights": {"p": 1.0}, "stats": {}}

    def train_stage(self, model, labels, weights, stage, progress=None, snapshot=None):
        self.trained.append(stage)
        return {"seen": float(labels["p"][0])}


def test_scheduler_prunes_old_labels_and_resumes(tmp_path):
    from cyclereg.training.scheduler import StageScheduler

    calls = []
    s = StageScheduler(_ToyTask(), tmp_path, keep_labels=2, hook=lambda t, m: calls.append(t) or {"hooked": t})
    s.run_stage0()
    assert s.run(3) == 3
    assert sorted(p.name for p in tmp_path.glob("pseudo*.pt")) == ["pseudo2.pt", "pseudo3.pt"]
    assert calls == [0, 1, 2, 3]
    assert StageScheduler(_ToyTask(), tmp_path).run(5) == 5
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0, 1, 2, 3, 4, 5]
    assert [r.get("seen") for r in log[1:]] == [0.0, 1.0, 2.0, 3.0, 4.0]  # each stage trains on t-1
    assert log[1]["hooked"] == 1


class _MovingTask(_ToyTask):
    """Labels of stage t are t everywhere; the change between two stages is the mean |difference|."""

    def label_change_mm(self, old, new):
        return sum((new[p] - old[p]).abs().mean().item() for p in new) / len(new)


def test_scheduler_logs_how_far_each_refresh_moved_the_labels(tmp_path):
    """`pseudo_label_change_mm` compares stage t's labels with stage t-1's (1.0 here at every
    stage), also when a run killed during a refresh re-reads stage t-1's labels from disk; stage 0
    and a task without the measure log none."""
    from cyclereg.training.scheduler import StageScheduler, stage_summary

    s = StageScheduler(_MovingTask(), tmp_path / "run")
    s.run_stage0()
    assert s.run(2) == 2
    (tmp_path / "run" / "pseudo2.pt").unlink()  # as if killed after stage 2's training, before its labels
    assert StageScheduler(_MovingTask(), tmp_path / "run").run(3) == 3
    log = {r["stage"]: r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())}
    assert "pseudo_label_change_mm" not in log[0]
    assert [log[t]["pseudo_label_change_mm"] for t in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert "labels moved 1.00 mm" in stage_summary(log[3])
    plain = StageScheduler(_ToyTask(), tmp_path / "plain")
    plain.run_stage0()
    plain.run(1)
    assert "pseudo_label_change_mm" not in json.loads((tmp_path / "plain" / "log.jsonl").read_text().splitlines()[-1])


class _SettlingTask(_MovingTask):
    """Labels of stage t are ``1 - 0.5 ** t``: stage t's refresh moves them by exactly 0.5 ** t."""

    def make_pseudo_labels(self, model, stage, progress=None, parts=None):
        return {"p": torch.full((2,), 1.0 - 0.5 ** stage)}, {"weights": {"p": 1.0}, "stats": {}}


def test_scheduler_stops_once_the_labels_settle(tmp_path):
    """With ``stop_below_mm`` a run ends after the first refresh that moves the labels less than
    that (0.5, 0.25, 0.125 mm at stages 1-3: below 0.2 mm at stage 3), is not resumed past it by the
    same rule, says so in its status, and goes on under a smaller threshold or none."""
    from cyclereg.checkpoint import load_checkpoint
    from cyclereg.training.scheduler import StageScheduler, settled_stage

    task = _SettlingTask()
    s = StageScheduler(task, tmp_path)
    s.run_stage0()
    assert s.run(6, stop_below_mm=0.2) == 3 and task.trained == [1, 2, 3]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0, 1, 2, 3]
    assert [r["pseudo_label_change_mm"] for r in log[1:]] == [0.5, 0.25, 0.125]
    assert load_checkpoint(tmp_path / "final.pt", kind="toy")["extra"]["stage"] == 3
    assert s.run(6, stop_below_mm=0.2) == 3 and task.trained == [1, 2, 3]  # the same rule: nothing to do
    status = s.status(6, stop_below_mm=0.2)
    assert status["next"] == "finished: labels settled at stage 3 (moved 0.125 mm < 0.2 mm)"
    assert status["remaining_s"] == 0.0
    assert s.status(6)["next"] == "stage 4: training from step 0"  # without the rule it would go on
    assert s.run(6, stop_below_mm=0.1) == 4 and task.trained == [1, 2, 3, 4]  # 0.0625 < 0.1
    assert s.run(5) == 5 and task.trained == [1, 2, 3, 4, 5]
    # no rule, a zero rule, stage 0 alone, or a last stage without the measure never count as settled
    records = {0: {"stage": 0}, 1: {"stage": 1, "pseudo_label_change_mm": 0.01}}
    assert settled_stage(records, 0.1) == (1, 0.01)
    assert settled_stage(records, None) is None and settled_stage(records, 0.0) is None
    assert settled_stage(records, 0.01) is None  # strictly below
    assert settled_stage({0: {"stage": 0}}, 0.1) is None and settled_stage({2: {"stage": 2}}, 0.1) is None
    plain = StageScheduler(_ToyTask(), tmp_path / "plain")
    plain.run_stage0()
    assert plain.run(3, stop_below_mm=100.0) == 3  # a task without the measure runs all its stages


def test_status_of_a_stage_stopped_between_its_labels_and_its_final_checkpoint(tmp_path):
    """A kill after a stage's labels (which make it finished) and before its log line and final.pt: status
    said "finished" (with final.pt still the stage before, which evaluate --run reads) and called the missing
    log line damaged; it says what the same cycle command still writes, which then completes the run."""
    from cyclereg.training.scheduler import StageScheduler

    s = StageScheduler(_ToyTask(), tmp_path)
    s.run_stage0()
    assert s.run(3) == 3 and s.status(3)["next"] == "finished"
    log = tmp_path / "log.jsonl"
    whole = log.read_text()
    log.write_text("".join(whole.splitlines(keepends=True)[:-1]))  # stage 3's line not yet written
    (tmp_path / "final.pt").write_bytes((tmp_path / "stage2.pt").read_bytes())  # nor its final.pt
    status = s.status(3)
    assert status["finished"] == 3 and status["next"].startswith("stage 3: its labels are saved, its log line and "
                                                                 "final.pt not yet")
    assert status["unlogged_stages"] == []  # pending, not damaged
    assert status["next"].endswith("the same cycle command writes them)")
    log.write_text(whole)  # the line written, final.pt not: still pending, and only final.pt is named
    assert s.status(3)["next"] == ("stage 3: its labels are saved, final.pt not yet (a cycle command working on "
                                   "the fold writes it next; if none is, the same cycle command writes it)")
    assert StageScheduler(_ToyTask(), tmp_path).run(3) == 3  # the same command completes it
    assert s.status(3)["next"] == "finished"
    assert (tmp_path / "final.pt").read_bytes() == (tmp_path / "stage3.pt").read_bytes()
    log.write_text("".join(whole.splitlines(keepends=True)[:1] + whole.splitlines(keepends=True)[2:]))
    assert s.status(3)["unlogged_stages"] == [1]  # an earlier stage's line removed: that one is damaged


class _StoppedTask(_ToyTask):
    """Interrupted (Ctrl-C) in the training of stage ``stop``."""

    def __init__(self, stop):
        super().__init__()
        self.stop = stop

    def train_stage(self, model, labels, weights, stage, progress=None, snapshot=None):
        if stage == self.stop:
            raise KeyboardInterrupt
        return super().train_stage(model, labels, weights, stage, progress, snapshot)


def test_final_checkpoint_is_the_last_finished_stage_even_after_an_interruption(tmp_path):
    """``final.pt`` (what evaluation reads) follows every finished stage, not only a run's end: a run
    stopped in stage 3 leaves stage 2's, also after an earlier call that ended at stage 1; a damaged
    checkpoint of the last stage is named, not copied over a good ``final.pt``."""
    from cyclereg.checkpoint import load_checkpoint
    from cyclereg.errors import InputError
    from cyclereg.training.scheduler import StageScheduler

    s = StageScheduler(_ToyTask(), tmp_path)
    s.run_stage0()
    assert s.run(1) == 1
    with pytest.raises(KeyboardInterrupt):
        StageScheduler(_StoppedTask(3), tmp_path).run(4)
    assert load_checkpoint(tmp_path / "final.pt", kind="toy")["extra"]["stage"] == 2
    assert (tmp_path / "final.pt").read_bytes() == (tmp_path / "stage2.pt").read_bytes()
    assert StageScheduler(_ToyTask(), tmp_path).run(3) == 3
    good = (tmp_path / "final.pt").read_bytes()
    (tmp_path / "stage3.pt").write_bytes((tmp_path / "stage3.pt").read_bytes()[:200])
    with pytest.raises(InputError) as exc:
        StageScheduler(_ToyTask(), tmp_path).run(3)
    assert exc.value.path == tmp_path / "stage3.pt"
    assert (tmp_path / "final.pt").read_bytes() == good


def test_a_run_removes_what_a_killed_one_left_behind(tmp_path):
    """Temporary files of atomic writes killed before their cleanup, and the parts of a stage whose
    labels were saved before the parts were cleared, go at the next run; the parts of a stage still
    in progress stay (they are what it resumes from)."""
    from cyclereg.training.scheduler import StageScheduler

    s = StageScheduler(_ToyTask(), tmp_path)
    s.run_stage0()
    assert s.run(1) == 1
    (tmp_path / ".stage1.pt.ab12cd.tmp").write_bytes(b"half")
    (tmp_path / "pseudo1.parts").mkdir()
    (tmp_path / "pseudo1.parts" / "p.pt").write_bytes(b"x")
    (tmp_path / "pseudo2.parts").mkdir()  # stage 2's labels are not saved: kept
    (tmp_path / "notes.tmp").write_text("mine")  # not a temporary file of cyclereg's
    StageScheduler(_ToyTask(), tmp_path).run(1)
    assert not (tmp_path / ".stage1.pt.ab12cd.tmp").exists() and not (tmp_path / "pseudo1.parts").exists()
    assert (tmp_path / "pseudo2.parts").is_dir() and (tmp_path / "notes.tmp").read_text() == "mine"


def test_foreign_pseudo_labels_or_snapshot_contents_are_named_not_a_traceback(tmp_path):
    """A loadable ``pseudo{t}.pt`` without labels and weights, or a snapshot of the right format that
    lacks the model's state, give an InputError naming the file."""
    from cyclereg.errors import InputError
    from cyclereg.training.scheduler import StageScheduler, StageSnapshot

    s = StageScheduler(_ToyTask(), tmp_path)
    s.run_stage0()
    assert s.run(1) == 1
    torch.save({"a": 1}, tmp_path / "pseudo1.pt")
    with pytest.raises(InputError, match="not the pseudo labels of a cyclereg stage") as exc:
        StageScheduler(_ToyTask(), tmp_path).run(2)
    assert exc.value.path == tmp_path / "pseudo1.pt"
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1])
    snap = StageSnapshot(tmp_path / "stage2.partial.pt", stage=2, every_s=0.0)
    snap.restore(4, model=model, optimizer=opt, lr_schedule=sched, generator=torch.Generator())
    snap.every_s = 1e-9
    assert snap.offer(1, model=model, optimizer=opt, lr_schedule=sched, generator=torch.Generator(), losses=[1.0])
    state = torch.load(tmp_path / "stage2.partial.pt", weights_only=True)
    del state["model"]
    torch.save(state, tmp_path / "stage2.partial.pt")
    with pytest.raises(InputError, match="does not fit this stage") as exc:
        StageSnapshot(tmp_path / "stage2.partial.pt", stage=2, every_s=0.0).restore(
            4, model=model, optimizer=opt, lr_schedule=sched, generator=torch.Generator())
    assert exc.value.path == tmp_path / "stage2.partial.pt"


def test_a_log_line_without_its_newline_does_not_swallow_the_next_record(tmp_path):
    """A note added without a newline, or a last line cut short: the next record goes on a line of
    its own, so the stage is seen (by status and by the settling rule) instead of glued to it."""
    from cyclereg.training.scheduler import StageScheduler

    s = StageScheduler(_SettlingTask(), tmp_path)
    s.run_stage0()
    assert s.run(2, stop_below_mm=0.3) == 2  # stage 2 moved the labels 0.25 mm: settled
    log = tmp_path / "log.jsonl"
    log.write_text(log.read_text()[:-40])  # stage 2's line cut short
    task = _SettlingTask()
    assert StageScheduler(task, tmp_path).run(5, stop_below_mm=0.3) == 2 and task.trained == []  # still settled
    with log.open("a") as fh:
        fh.write('{"note": "x"}')
    assert StageScheduler(_SettlingTask(), tmp_path).run(3) == 3
    assert 3 in StageScheduler(_SettlingTask(), tmp_path)._stage_log()
    assert log.read_text().splitlines()[-2] == '{"note": "x"}'


def test_dense_label_change_is_the_mean_displacement_difference_in_mm():
    """A uniform one-voxel change along each axis of the label grid moves the labels by stride x spacing mm."""
    from cyclereg.training.dense import DenseCycleTask, VolumeImage

    images = [VolumeImage(f"c{k}", torch.zeros(1, 1, 16, 16, 16)) for k in range(2)]
    task = DenseCycleTask(images, [(0, 1)], (1.5, 2.0, 3.0), DenseCycleConfig(label_stride=2, loss_border=1),
                          torch.device("cpu"))
    old = {"c0_c1": torch.zeros(1, 3, 8, 8, 8, dtype=torch.float16), "gone": torch.zeros(1, 3, 8, 8, 8)}
    for axis, mm in enumerate((3.0, 4.0, 6.0)):
        new = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float16)
        new[:, axis] = 1.0
        assert task.label_change_mm(old, {"c0_c1": new}) == pytest.approx(mm, rel=1e-5)
    assert task.label_change_mm(old, {"other": new}) is None


# ----------------------------------------------------------------------------- end to end
SHAPE = (24, 24, 32)


def _dataset(root: Path, with_labels: bool = True, names: list[str] | None = None) -> Path:
    """Four smooth CT-like volumes; images 1-2 form the labelled validation pair, 3-4 train.
    ``names``: the four file names (default ``Case_000K_0000.nii.gz``)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    base = ndimage.gaussian_filter(rng.standard_normal((40, 40, 48)), 2.5)
    base = (base - base.mean()) / base.std()
    training = []
    for k, shift in enumerate([(0, 0, 0), (2, -1, 1), (-1, 2, 0), (1, 1, -2)], start=1):
        o = np.array([8, 8, 8]) + np.array(shift)
        img = base[o[0]:o[0] + SHAPE[0], o[1]:o[1] + SHAPE[1], o[2]:o[2] + SHAPE[2]] * 300.0 - 500.0
        lab = (img > -400).astype(np.int16) + (img > -200)
        aff = np.diag([1.5, 1.5, 2.0, 1.0])
        name = names[k - 1] if names else f"Case_{k:04d}_0000.nii.gz"
        nib.save(nib.Nifti1Image(img.astype(np.float32), aff), str(root / "imagesTr" / name))
        entry = {"image": f"./imagesTr/{name}"}
        if with_labels:
            nib.save(nib.Nifti1Image(lab, aff), str(root / "labelsTr" / name))
            entry["label"] = f"./labelsTr/{name}"
        training.append(entry)
    ds = {"name": "tiny", "modality": {"0": "CT"}, "training": training,
          "registration_val": [{"fixed": training[0]["image"], "moving": training[1]["image"]}]}
    path = root / "Tiny_dataset.json"
    path.write_text(json.dumps(ds))
    return path


FAST = ["--stages", "2", "--iterations", "2", "--directions", "both", "--device", "cpu"]


def test_dense_cycle_smoke_resume_and_evaluate(tmp_path, device):
    """On CUDA this is also the test of mixed-precision training (``amp``, CUDA only)."""
    ds = _dataset(tmp_path / "data", with_labels=False)  # training never needs labels
    run = tmp_path / "run"
    on = ["--device", device.type]
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *FAST[:-2], *on])
    assert res.exit_code == 0, res.output
    meta = json.loads((run / "run.json").read_text())
    assert meta["kind"] == "volumes" and meta["pairs"] == ["0003_0004", "0004_0003"]
    assert (run / "all" / "pseudo0.pt").is_file()
    # interrupt after stage 1 (as a killed run would leave it), then resume to stage 2
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--stages", "1", *on])
    assert res.exit_code == 0, res.output
    stage1 = (run / "all" / "stage1.pt").read_bytes()
    res = runner.invoke(app, ["status", str(run), "--json", str(tmp_path / "status.json")])
    assert res.exit_code == 0, res.output
    (row,) = json.loads((tmp_path / "status.json").read_text())["folds"]
    assert row["fold"] is None and row["finished"] == 1 and row["next"] == "stage 2: training from step 0"
    # evaluate --run meanwhile scores stage 1's final.pt, and says so (labels: another copy of the data that has them)
    ds_lab = _dataset(tmp_path / "data_lab", with_labels=True)
    res = runner.invoke(app, ["evaluate", str(ds_lab), "--run", str(run), *on, "--json", str(tmp_path / "mid.json")])
    assert res.exit_code == 0, res.output
    assert f"note: {run} has not finished training (next: stage 2: training from step 0): its final.pt is the " \
           "model of stage 1, not the run's last stage" in " ".join(res.output.split()), res.output
    assert json.loads((tmp_path / "mid.json").read_text())["run_finished"] is False
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), *on])
    assert res.exit_code == 0, res.output
    assert (run / "all" / "stage1.pt").read_bytes() == stage1  # not retrained
    log = [json.loads(line) for line in (run / "all" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0, 1, 2]
    assert all(math.isfinite(r["train_loss_mm"]) for r in log[1:])
    assert sorted(p.name for p in (run / "all").glob("pseudo*.pt")) == ["pseudo1.pt", "pseudo2.pt"]
    ckpt = torch.load(run / "all" / "final.pt", weights_only=True)
    assert ckpt["kind"] == "dense" and ckpt["config"]["spacing_mm"] == [1.5, 1.5, 2.0]
    # and where the training images' voxel axes point, which register then requires
    from cyclereg.volumeio import axis_codes, read_nifti

    scan = next((tmp_path / "data").rglob("*_0000.nii.gz"))
    assert tuple(ckpt["config"]["orientation"]) == axis_codes(read_nifti(scan).affine)
    # the intensity preprocessing the network was trained with travels with it ("auto" resolved)
    assert ckpt["config"]["preprocess"]["mode"] == "ct"
    # a stopping rule under which stage 2's refresh counts as settled: a longer --stages trains nothing
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--stages", "3", "--stop-below", "1e6", *on])
    assert res.exit_code == 0 and "finished stages: all: 2" in res.output, res.output
    assert len((run / "all" / "log.jsonl").read_text().splitlines()) == 3
    assert json.loads((run / "run.json").read_text())["stop_below_mm"] == 1e6
    assert run_status(run)["folds"][0]["next"].startswith("finished: labels settled at stage 2")

    # evaluation of the finished run: its final.pt, named with its SHA-256, and a line per pair (for log files)
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["evaluate", str(ds_lab), "--run", str(run), *on, "--json", str(report)])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    assert rep["num_pairs"] == 1 and 0.0 <= rep["mean_dice"] <= 1.0
    assert rep["method"]["model"].endswith("final.pt") and "run_finished" not in rep
    assert rep["method"]["sha256"] == file_sha256(run / "all" / "final.pt")
    said = " ".join(res.output.split())
    assert "has not finished training" not in said
    pair = rep["pairs"][0]
    assert f"1/1 {pair['id']}: Dice {pair['initial_dice']:.3f} -> {pair['dice']:.3f}, HD95 {pair['hd95_mm']:.2f} mm" \
        in said, said
    # stage 0 has no checkpoint: the error names the random network that made its labels
    res = runner.invoke(app, ["evaluate", str(ds_lab), "--run", str(run), "--stage", "0", *on,
                              "--json", str(tmp_path / "s0.json")])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "'--model random --seed 0'" in said, said
    assert not (tmp_path / "s0.json").exists()
    # the checkpoint records its training scans (held-out images only by default: no evaluated pair) ...
    training = ckpt["extra"]["training"]
    assert training["dataset"] == meta["dataset"] and len(training["images"]) == 2  # the two held-out-free scans
    assert all(name.endswith(".nii.gz") and len(fp) == 64 for name, fp in training["images"].items())
    assert rep["pairs_in_training"] == []
    # ... and a model that trained on both scans of an evaluated pair names it (either direction)
    val = rep["pairs"][0]
    images = {**training["images"], "f": data_fingerprint(val["moving"]), "m": data_fingerprint(val["fixed"])}
    val_id = val["id"]
    extra = {**ckpt["extra"], "training": {**training, "images": images}}
    save_checkpoint(tmp_path / "seen.pt", kind="dense", config=ckpt["config"], state_dict=ckpt["state_dict"],
                    extra=extra)
    res = runner.invoke(app, ["evaluate", str(ds_lab), "--model", str(tmp_path / "seen.pt"), *on,
                              "--json", str(tmp_path / "seen.json")])
    assert res.exit_code == 0, res.output
    assert "note: both scans of 1 of the 1 pairs were training images" in " ".join(res.output.split()), res.output
    assert json.loads((tmp_path / "seen.json").read_text())["pairs_in_training"] == [val_id]


@pytest.mark.parametrize("metric", ["mind", "ncc"])
def test_metric_supervised_baselines_train(tmp_path, metric):
    ds = _dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    args = ["pretrain-random", str(ds), "-o", str(run), "--supervision", metric, "--stages", "1",
            "--iterations", "2", "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (run / "all" / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(log[1][f"train_loss_{metric}"])
    if metric == "ncc":  # extending the finished run by a stage records the new target (status follows it)
        res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--stages", "2", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        assert json.loads((run / "run.json").read_text())["config"]["stages"] == 2
        assert [json.loads(line)["stage"] for line in (run / "all" / "log.jsonl").read_text().splitlines()] == [0, 1, 2]
        res = runner.invoke(app, ["status", str(run), "--json", str(tmp_path / "s.json"), "--history"])
        assert res.exit_code == 0, res.output
        status = json.loads((tmp_path / "s.json").read_text())
        assert status["stages"] == 2 and status["folds"][0]["next"] == "finished"
        # the history names the baseline's loss by its metric, with the logged value of each stage
        assert "train loss (ncc)" in res.output and "train loss [mm]" not in res.output
        for record in log + [json.loads((run / "all" / "log.jsonl").read_text().splitlines()[2])]:
            if "train_loss_ncc" in record:
                assert f"{record['train_loss_ncc']:.3f}" in res.output
    # a training scan rewritten since the run's labels were made (same name): the run refuses it
    scan = ds.parent / "imagesTr" / "Case_0003_0000.nii.gz"
    changed = nib.load(str(scan))
    nib.save(nib.Nifti1Image(np.asarray(changed.dataobj) + 1.0, changed.affine), str(scan))
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--stages", "3", "--device", "cpu"])
    assert res.exit_code == 2 and "training scan(s) Case_0003_0000.nii.gz changed" in " ".join(res.output.split())
    assert not (run / "all" / "stage3.pt").exists()


def test_dense_cycle_errors(tmp_path):
    ds = _dataset(tmp_path / "data", with_labels=True)
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--epochs", "3"])
    assert res.exit_code == 2 and "--epochs" in res.output and not run.exists()
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--supervision", "ssd"])
    assert res.exit_code == 2 and "supervision" in res.output and not run.exists()
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--jobs", "2"])
    assert res.exit_code == 2 and "--jobs" in res.output and not run.exists()
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "nowhere")])
    assert res.exit_code == 2
    # validation scores are for reporting only and need labelled pairs
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--stages", "1", "--iterations", "1",
                               "--val-pairs", "1", "--device", "cpu"]).exit_code == 0
    log = json.loads((run / "all" / "log.jsonl").read_text().splitlines()[0])
    assert 0.0 <= log["val_dice"] <= 1.0 and log["val_pairs"] == 1
    # a run directory of another configuration is refused
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--no-augment", "--stages", "1",
                              "--iterations", "1", "--device", "cpu"])
    assert res.exit_code == 2 and "configuration" in res.output
    # ... and so is a run of another dataset (name differs) or of a keypoint dataset, before any training
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    meta = json.loads((run / "run.json").read_text())
    for key, value in (("dataset", "other"), ("kind", "keypoints")):
        (run / "run.json").write_text(json.dumps({**meta, key: value}))
        res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--device", "cpu"])
        assert res.exit_code == 2 and "another dataset" in res.output, res.output
        assert f"({key} differs)" in res.output
    (run / "run.json").write_text(json.dumps(meta))
    # a dataset that holds out every training image: pretrain-random points to --train-images all,
    # cycle (which has no such option: the run's configuration says) asks whether it is the run's dataset
    obj = json.loads(ds.read_text())
    obj["registration_val"].append({"fixed": obj["training"][2]["image"], "moving": obj["training"][3]["image"]})
    other = ds.with_name("AllHeldOut_dataset.json")
    other.write_text(json.dumps(obj))
    res = runner.invoke(app, ["pretrain-random", str(other), "-o", str(tmp_path / "r2"), "--device", "cpu"])
    assert res.exit_code == 2 and "pretrain-random --train-images all" in " ".join(res.output.split())
    res = runner.invoke(app, ["cycle", str(other), "--run", str(run), "--device", "cpu"])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "is this the dataset it was made with?" in said and "--train-images" not in said
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_training_images_preprocessed_alike_or_refused(tmp_path):
    """Without a modality hint each image's preprocessing is guessed from its intensities; a
    training set that would be preprocessed two ways is refused, naming the image, before any output."""
    ds = _dataset(tmp_path / "data", with_labels=False)
    meta = json.loads(ds.read_text())
    del meta["modality"]
    ds.write_text(json.dumps(meta))
    odd = tmp_path / "data" / "imagesTr" / "Case_0004_0000.nii.gz"
    img = nib.load(str(odd))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1500.0, img.affine), str(odd))  # non-negative: "MRI"
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *FAST])
    assert res.exit_code == 2 and "Case_0004_0000.nii.gz" in res.output and "'mri'" in res.output, res.output
    assert "modality" in res.output and not run.exists()


@pytest.mark.parametrize("problem", ["flipped", "constant"])
def test_training_images_register_would_refuse_are_refused(tmp_path, problem):
    """A training image stored flipped (the same world image on a grid whose first axis runs the
    other way: its voxel array does not line up with the others') or constant (nothing to learn
    from; register refuses it too): named before any output."""
    ds = _dataset(tmp_path / "data", with_labels=False)
    odd = tmp_path / "data" / "imagesTr" / "Case_0004_0000.nii.gz"
    img = nib.load(str(odd))
    arr, affine = np.asarray(img.dataobj), img.affine.copy()
    if problem == "flipped":
        affine[:3, 3] += affine[:3, 0] * (arr.shape[0] - 1)
        affine[:3, 0] *= -1
        arr = arr[::-1]
    else:
        arr = np.full_like(arr, -1000.0)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), affine), str(odd))
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), *FAST])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "Case_0004_0000.nii.gz" in said, res.output
    assert ("another orientation" if problem == "flipped" else "volume is constant") in said
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 20])
def test_spread_pairs_list_every_pair_once_and_every_prefix_spreads_over_the_images(n):
    from cyclereg.training.api import spread_pairs

    pairs = spread_pairs(n)
    assert sorted(pairs) == [(i, j) for i in range(n) for j in range(i + 1, n)]
    for size in range(1, len(pairs) + 1):
        counts = np.bincount(np.array(pairs[:size]).ravel(), minlength=n)
        assert counts.max() - counts.min() <= 2 and abs(counts.mean() - 2 * size / n) < 1e-9
        assert 2 * size < n or counts.min() >= 1
    assert spread_pairs(n, 3) == pairs[:3] and spread_pairs(n, 10 ** 6) == pairs
    if n % 2 == 0:  # a perfect matching first
        assert sorted(i for p in pairs[: n // 2] for i in p) == list(range(n))


def test_max_train_pairs_takes_pairs_spread_over_the_training_images(tmp_path):
    """`--max-train-pairs 2` with `--train-images all` (the tiny dataset's four images): two pairs
    that use all four; with both directions, one pair both ways."""
    from cyclereg.training.api import _dense_training_set

    ds = _dataset(tmp_path)
    images, pairs = _dense_training_set(ds, DenseCycleConfig(train_images="all", max_train_pairs=2))
    assert len(images) == 4 and len(pairs) == 2 and sorted(i for p in pairs for i in p) == [0, 1, 2, 3]
    images, pairs = _dense_training_set(ds, DenseCycleConfig(train_images="all", max_train_pairs=2,
                                                             directions="both"))
    assert [(images[i].name[5:9], images[j].name[5:9]) for i, j in pairs] == [("0001", "0002"), ("0002", "0001")]
    _, every = _dense_training_set(ds, DenseCycleConfig(train_images="all"))
    assert len(every) == 6


def test_each_training_pair_gets_its_own_pseudo_label_when_cases_have_several_scans(tmp_path):
    """Learn2Reg's intra-patient naming (``X_0001_0000``, ``X_0001_0001``): with the case number as
    the scan id, four of the six pairs shared one id, and the pairs after the first of them trained
    on its pseudo label."""
    names = [f"LungCT_{c:04d}_{s:04d}.nii.gz" for c in (1, 2) for s in (0, 1)]
    ds = _dataset(tmp_path / "data", with_labels=False, names=names)
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--stages", "1", "--iterations", "1",
                              "--train-images", "all", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    ids = json.loads((run / "run.json").read_text())["pairs"]
    assert len(ids) == 6 and len(set(ids)) == 6, ids
    labels = torch.load(run / "all" / "pseudo0.pt", weights_only=True)["labels"]
    assert sorted(labels) == sorted(ids)
    values = [labels[i] for i in ids]
    assert all(not torch.equal(a, b) for k, a in enumerate(values) for b in values[k + 1:])


def test_stage0_of_a_volume_run_names_the_random_network_of_its_seed(tmp_path):
    """Stage 0 has no checkpoint; the error names `--model random --seed S`, and that is the network
    the run's task labels stage 0 with (S is derived from the run's seed, not equal to it)."""
    from types import SimpleNamespace

    from cyclereg.dense.api import load_model, run_checkpoint
    from cyclereg.dense.config import DensePipelineConfig
    from cyclereg.errors import InputError
    from cyclereg.training.dense import DenseCycleTask

    (tmp_path / "all").mkdir()
    (tmp_path / "run.json").write_text(json.dumps({"config": {"seed": 3}}))
    with pytest.raises(InputError, match=r"'--model random --seed (\d+)'") as err:
        run_checkpoint(tmp_path, 0)
    named = int(err.value.message.split("--seed ")[1].split("'")[0])
    task = SimpleNamespace(pipeline=DensePipelineConfig(), config=DenseCycleConfig(seed=3), device=torch.device("cpu"))
    stage0 = DenseCycleTask.new_model(task, 0)
    random_net = load_model("random", named, torch.device("cpu"))[0]
    a, b = stage0.state_dict(), random_net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cpu_bf16_trains_the_network_in_bfloat16_and_is_recorded(tmp_path, monkeypatch):
    """`pretrain-random --cpu-bf16` records `cpu_bf16` in run.json, and its training steps run the
    feature network in bfloat16 on CPU (float32 without it), with a finite float32 loss; a CPU
    without bfloat16 units gets a note; keypoint datasets refuse the option."""
    import cyclereg.device as device_mod
    from cyclereg.dense.network import FeatureNet

    seen = []
    real_forward = FeatureNet.forward
    def recording_forward(self, x):
        out = real_forward(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(FeatureNet, "forward", recording_forward)
    monkeypatch.setattr(device_mod, "cpu_has_bf16_units", lambda: False)
    ds = _dataset(tmp_path / "data", with_labels=False)
    for flag, dtype in (("--cpu-bf16", torch.bfloat16), ("--no-cpu-bf16", torch.float32)):
        run = tmp_path / flag
        res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--stages", "1", "--iterations", "1",
                                  "--device", "cpu", flag])
        assert res.exit_code == 0, res.output
        said = " ".join(res.output.split())
        assert ("no bfloat16 matrix units" in said) == (dtype == torch.bfloat16), said
        assert json.loads((run / "run.json").read_text())["config"]["cpu_bf16"] == (dtype == torch.bfloat16)
        seen.clear()
        res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        log = [json.loads(line) for line in (run / "all" / "log.jsonl").read_text().splitlines()]
        assert math.isfinite(log[1]["train_loss_mm"])
        # the training step (autocast) first; the pseudo-label refresh after it stays float32
        assert seen[0] == dtype and seen[-1] == torch.float32, seen
    cloud = tmp_path / "clouds.json"  # a keypoint dataset: the option is refused before its files are read
    cloud.write_text(json.dumps({"pairs": [{"id": "a", "fixed_keypoints": "f.csv", "moving_keypoints": "m.csv"}]}))
    res = runner.invoke(app, ["pretrain-random", str(cloud), "-o", str(tmp_path / "c"), "--cpu-bf16"])
    assert res.exit_code == 2 and "--cpu-bf16: not an option for keypoint datasets" in res.output, res.output
    assert not (tmp_path / "c").exists()


def test_difficulty_weights_rank_pairs():
    from cyclereg.training.scheduler import difficulty_weights

    w = difficulty_weights({"hard": 9.0, "easy": 1.0, "mid": 4.0}, logit_range=5.0)
    assert w["easy"] == pytest.approx(1 / (1 + math.exp(-5))) and w["hard"] == pytest.approx(1 / (1 + math.exp(5)))
    assert w["mid"] == pytest.approx(0.5)
    assert difficulty_weights({"a": 1.0, "b": 2.0}, enabled=False) == {"a": 1.0, "b": 1.0}


def test_a_tiny_training_set_under_weighted_sampling_gets_a_note():
    """Two pairs: the hardest gets sigmoid(-5) / (sigmoid(5) + sigmoid(-5)) = sigmoid(-5) of the draws."""
    from cyclereg.training.scheduler import FEW_PAIRS_NOTE, sampling_note

    note = sampling_note(2, enabled=True, logit_range=5.0)
    assert f"{100 / (1 + math.exp(5)):.1f} % of the draws (uniform: 50 %)" in note and "--uniform-sampling" in note
    assert sampling_note(2, enabled=False, logit_range=5.0) is None
    assert sampling_note(1, enabled=True, logit_range=5.0) is None  # one pair: uniform anyway
    assert sampling_note(FEW_PAIRS_NOTE + 1, enabled=True, logit_range=5.0) is None


def test_difficulty_weights_do_not_depend_on_the_order_of_tied_pairs():
    """Equal disagreements share one weight (average ranks): all equal -> uniform (0.5 each; the
    no-refinement ablation, whose disagreement is 0 by construction, must not weigh pairs by their
    order in the dataset); a tie inside the ranking takes the mean of its positions' arguments."""
    from cyclereg.training.scheduler import difficulty_weights

    tied = {f"p{i}": 0.0 for i in range(8)}
    assert set(difficulty_weights(tied, logit_range=5.0).values()) == {0.5}
    w = difficulty_weights({"a": 1.0, "b": 2.0, "c": 2.0, "d": 3.0}, logit_range=3.0)  # arguments 3, 1, -1, -3
    assert w["b"] == w["c"] == pytest.approx(0.5)
    assert w["a"] == pytest.approx(1 / (1 + math.exp(-3))) and w["d"] == pytest.approx(1 / (1 + math.exp(3)))
    # distinct disagreements: the ranking as before, whatever the listing order
    forward = difficulty_weights({"x": 0.3, "y": 0.1, "z": 0.2})
    assert forward == difficulty_weights({"z": 0.2, "y": 0.1, "x": 0.3})
    assert forward["y"] > forward["z"] > forward["x"]


def test_dense_stage_killed_halfway_resumes_at_its_snapshot(tmp_path, monkeypatch, one_intraop_thread):
    """A killed dense stage resumes after its last snapshot (iteration 2 of 3) and ends bitwise
    where the uninterrupted stage ends (one thread: bitwise-reproducible CPU training)."""
    import cyclereg.training.scheduler as scheduler_mod

    ds = _dataset(tmp_path / "data", with_labels=False)
    args = ["--stages", "1", "--iterations", "3", "--directions", "both", "--device", "cpu"]
    for name in ("a", "b"):
        assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / name), *args]).exit_code == 0
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "a"), "--device", "cpu"]).exit_code == 0
    real = scheduler_mod.StageSnapshot.offer

    def dies_after_iteration_2(self, step, **kw):
        wrote = real(self, step, **kw)
        if step == 2:
            raise KeyboardInterrupt
        return wrote

    monkeypatch.setattr(scheduler_mod.StageSnapshot, "offer", dies_after_iteration_2)
    cmd = ["cycle", str(ds), "--run", str(tmp_path / "b"), "--device", "cpu", "--snapshot-every", "1e-9"]
    assert runner.invoke(app, cmd).exit_code == 130
    assert (tmp_path / "b" / "all" / "stage1.partial.pt").is_file()
    steps = []
    monkeypatch.setattr(scheduler_mod.StageSnapshot, "offer", lambda self, s, **kw: steps.append(s) or real(self, s, **kw))
    res = runner.invoke(app, cmd)
    assert res.exit_code == 0, res.output
    assert "resumes after iteration 2/3" in res.output and steps == [3]
    assert not (tmp_path / "b" / "all" / "stage1.partial.pt").exists()
    assert_same_weights(tmp_path / "a" / "all" / "final.pt", tmp_path / "b" / "all" / "final.pt")


_PSEUDO_LABEL = DenseCycleTask.pseudo_label
"""The library's ``DenseCycleTask.pseudo_label``, captured before any test patches it."""


def recording_pseudo_label(seen: list, die_at: int | None = None):
    """A stand-in for ``DenseCycleTask.pseudo_label`` (the original's result) that appends each pair index
    to ``seen``; with ``die_at``, the ``die_at``-th call raises KeyboardInterrupt (as Ctrl-C or SIGTERM there)."""
    real = _PSEUDO_LABEL  # the original, also while a stand-in is patched in

    def pseudo_label(self, model, k):
        seen.append(k)
        if die_at is not None and len(seen) == die_at:
            raise KeyboardInterrupt
        return real(self, model, k)
    return pseudo_label


def test_dense_stage0_killed_while_labelling_resumes_at_the_next_pair(tmp_path, monkeypatch, one_intraop_thread):
    """pretrain-random killed while labelling the second training pair: the same command labels
    only that pair and writes the labels an uninterrupted run writes."""
    from cyclereg.training.dense import DenseCycleTask

    ds = _dataset(tmp_path / "data", with_labels=False)
    args = ["--stages", "1", "--iterations", "2", "--directions", "both", "--device", "cpu"]
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "a"), *args]).exit_code == 0
    seen = []
    monkeypatch.setattr(DenseCycleTask, "pseudo_label", recording_pseudo_label(seen, die_at=2))
    cmd = ["pretrain-random", str(ds), "-o", str(tmp_path / "b"), *args]
    assert runner.invoke(app, cmd).exit_code == 130
    fold = tmp_path / "b" / "all"
    assert not (fold / "pseudo0.pt").exists() and len(list((fold / "pseudo0.parts").glob("*.pt"))) == 1
    seen.clear()
    monkeypatch.setattr(DenseCycleTask, "pseudo_label", recording_pseudo_label(seen))
    res = runner.invoke(app, cmd)
    assert res.exit_code == 0, res.output
    assert seen == [1] and not (fold / "pseudo0.parts").exists()
    a, b = (torch.load(d / "all" / "pseudo0.pt", weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert a["weights"] == b["weights"]
    for pid in a["labels"]:
        assert torch.equal(a["labels"][pid], b["labels"][pid]), pid


def test_a_stage_whose_checkpoint_is_missing_is_not_finished_and_is_trained_again(tmp_path):
    """Pseudo labels of stage t without stage t's checkpoint (removed, or never written) do not make t
    finished: the run resumes after t - 1 and trains t again."""
    from cyclereg.training.scheduler import StageScheduler

    first = _ToyTask()
    s = StageScheduler(first, tmp_path)
    s.run_stage0()
    assert s.run(2) == 2 and first.trained == [1, 2]
    (tmp_path / "stage2.pt").unlink()
    assert (tmp_path / "pseudo2.pt").is_file() and s.last_finished_stage() == 1
    again = _ToyTask()
    assert StageScheduler(again, tmp_path).run(2) == 2 and again.trained == [2]
    assert (tmp_path / "stage2.pt").is_file()


def _two_image_task(**changes):
    """A dense task of two random 16^3 images and the one pair (0, 1), no augmentation."""
    from dataclasses import replace

    from cyclereg.training.dense import DenseCycleTask, VolumeImage

    g = torch.Generator().manual_seed(0)
    images = [VolumeImage(name, torch.rand(1, 1, 16, 16, 16, generator=g)) for name in ("a", "b")]
    return DenseCycleTask(images, [(0, 1)], (1.0, 1.0, 1.0), replace(DenseCycleConfig(), augment=False, **changes),
                          torch.device("cpu"))


def test_a_dense_stage_anneals_the_learning_rate_from_lr_to_lr_min(monkeypatch):
    """Cosine annealing over a stage of 4 iterations: after step t the rate is
    lr_min + (lr - lr_min) (1 + cos(pi t / 4)) / 2, ending at the paper's 1e-5; every stage starts at 1e-3."""
    task = _two_image_task(iterations=4, batch_size=1)
    assert (task.config.lr, task.config.lr_min) == (1e-3, 1e-5)
    monkeypatch.setattr(task, "_loss", lambda model, *a: sum(p.pow(2).sum() for p in model.parameters()))

    want = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(1, 5)]
    for stage in (1, 2):
        spy = LearningRateSpy()
        task.train_stage(task.new_model(stage), {task.pair_id(0): torch.zeros(1, 3, 8, 8, 8)}, {}, stage, snapshot=spy)
        assert spy.lrs == pytest.approx(want, rel=1e-9) and spy.lrs[-1] == pytest.approx(1e-5, rel=1e-9)


def test_a_dense_training_step_sees_batch_size_pairs(monkeypatch):
    task = _two_image_task(iterations=1, batch_size=3)
    seen = []
    monkeypatch.setattr(task, "_loss", lambda model, fixed, moving, target: (
        seen.append(fixed.shape[0]) or 0) + 0 * sum(p.sum() for p in model.parameters()))
    task.train_stage(task.new_model(1), {task.pair_id(0): torch.zeros(1, 3, 8, 8, 8)}, {}, 1)
    assert seen == [3]


def test_without_refinement_the_dense_pseudo_label_is_the_networks_output(monkeypatch):
    """The refinement ablation (--no-refine): no optimisation-based refinement runs, the label is the raw
    prediction itself."""
    import cyclereg.training.dense as dense

    task = _two_image_task(refine=False)
    monkeypatch.setattr(dense, "register", lambda *a, **k: pytest.fail("the refinement ran with refine=False"))
    raw, label = task.pseudo_label(task.new_model(0), 0)
    assert torch.equal(raw, label)
