"""Invariants of the stage scheduler and of run-directory / checkpoint handling that the other
tests leave open (found by a mutation audit). Tiny toy tasks; each test runs in about a second."""

from __future__ import annotations

import pytest
import torch

from cyclereg.training.scheduler import StageScheduler
from test_cycle_dense import _ToyTask


class _WarmTask(_ToyTask):
    """A one-bias network: training sets the bias to ``100 + stage`` and records the bias each
    stage started from; stage t's labels are ``t`` everywhere and training records the labels it saw."""

    def __init__(self):
        super().__init__()
        self.start: dict[int, float] = {}
        self.seen: dict[int, float] = {}

    def new_model(self, stage):
        return super().new_model(1000 + min(stage, 1))

    def train_stage(self, model, labels, weights, stage, progress=None, snapshot=None):
        self.start[stage] = float(model.bias.detach())
        self.seen[stage] = float(labels["p"][0])
        with torch.no_grad():
            model.bias.fill_(100.0 + stage)
        return super().train_stage(model, labels, weights, stage)


def _fresh_bias(stage: int) -> float:
    return float(_WarmTask().new_model(stage).bias.detach())


def test_each_stage_after_the_first_starts_from_the_previous_stages_weights(tmp_path):
    """Stage 1 starts from a fresh initialisation, stage t >= 2 from stage t-1's trained weights (also
    across a resumed run), and every stage trains on the labels of stage t-1."""
    task = _WarmTask()
    s = StageScheduler(task, tmp_path)
    s.run_stage0()
    assert s.run(2) == 2
    task2 = _WarmTask()
    assert StageScheduler(task2, tmp_path).run(4) == 4
    start = {**task.start, **task2.start}
    seen = {**task.seen, **task2.seen}
    assert start[1] == _fresh_bias(1)
    assert [start[t] for t in (2, 3, 4)] == [101.0, 102.0, 103.0]
    assert [seen[t] for t in (1, 2, 3, 4)] == [0.0, 1.0, 2.0, 3.0]


def test_stage_generators_differ_between_stages_and_seeds():
    """A stage's training draws (sampling, augmentation) come from its own stream: not the same
    sequence at every stage, nor for two seeds; the same (seed, stage) repeats it."""
    from cyclereg.training.scheduler import training_generator

    def draws(seed, stage):
        return torch.rand(8, generator=training_generator(seed, stage)).tolist()

    assert draws(0, 1) == draws(0, 1)
    assert len({tuple(draws(0, t)) for t in range(0, 5)}) == 5
    assert draws(0, 1) != draws(1, 1)


def test_labels_without_their_stages_checkpoint_do_not_finish_the_stage(tmp_path):
    """A stage counts as finished only with its pseudo labels *and* its checkpoint: with stage 2's
    checkpoint deleted, the run resumes by training stage 2 again (on stage 1's labels)."""
    s = StageScheduler(_WarmTask(), tmp_path)
    s.run_stage0()
    assert s.run(2) == 2
    (tmp_path / "stage2.pt").unlink()
    assert s.last_finished_stage() == 1
    task = _WarmTask()
    assert StageScheduler(task, tmp_path).run(2) == 2
    assert task.trained == [2] and task.seen[2] == 1.0 and task.start[2] == 101.0


def test_a_checkpoint_of_another_stage_is_not_taken_as_this_stages_training(tmp_path):
    """``stage2.pt`` that holds stage 1's checkpoint (e.g. copied there) does not count as stage 2's
    finished training: stage 2 is trained, not only relabelled."""
    s = StageScheduler(_WarmTask(), tmp_path)
    s.run_stage0()
    assert s.run(1) == 1
    (tmp_path / "stage2.pt").write_bytes((tmp_path / "stage1.pt").read_bytes())
    task = _WarmTask()
    assert StageScheduler(task, tmp_path).run(2) == 2
    assert task.trained == [2]
    from cyclereg.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "stage2.pt", kind="toy")["extra"]["stage"] == 2


class _SettlingWarmTask(_WarmTask):
    """Labels of stage t are ``1 - 0.5 ** t``; the change between two stages is the mean |difference|."""

    def make_pseudo_labels(self, model, stage, progress=None, parts=None):
        return {"p": torch.full((2,), 1.0 - 0.5 ** stage)}, {"weights": {"p": 1.0}, "stats": {}}

    def label_change_mm(self, old, new):
        return sum((new[p] - old[p]).abs().mean().item() for p in new) / len(new)


def test_the_settling_rule_reads_only_finished_stages(tmp_path):
    """A log line of a stage that is no longer finished (its checkpoint and labels deleted to redo it)
    does not make the run count as settled: the stage is trained again."""
    s = StageScheduler(_SettlingWarmTask(), tmp_path)
    s.run_stage0()
    assert s.run(6, stop_below_mm=0.2) == 3  # 0.5, 0.25, 0.125 mm
    (tmp_path / "stage3.pt").unlink()
    (tmp_path / "pseudo3.pt").unlink()
    assert s.settled(0.2) is None
    task = _SettlingWarmTask()
    assert StageScheduler(task, tmp_path).run(6, stop_below_mm=0.2) == 3 and task.trained == [3]


def _snapshot_objects():
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return dict(model=model, optimizer=opt, lr_schedule=torch.optim.lr_scheduler.MultiStepLR(opt, [2]),
                generator=torch.Generator().manual_seed(0))


def test_a_snapshot_write_that_fails_keeps_the_previous_snapshot(tmp_path, monkeypatch):
    """Snapshots are written atomically: a write that dies halfway (disk full, kill) leaves the last
    whole snapshot in place, which the stage then resumes from."""
    from cyclereg.training.scheduler import StageSnapshot

    path = tmp_path / "stage1.partial.pt"
    snap = StageSnapshot(path, stage=1, every_s=1e-9)
    objs = _snapshot_objects()
    snap.restore(5, **objs)
    assert snap.offer(1, losses=[1.0], **objs)
    real_save = torch.save

    def half_save(obj, fh, *a, **kw):
        fh.write(b"PK\x03\x04 half a snapshot")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError):
        snap.offer(2, losses=[1.0, 0.5], **objs)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left either
    step, losses = StageSnapshot(path, stage=1, every_s=0).restore(5, **_snapshot_objects())
    assert (step, losses) == (1, [1.0])


def test_a_restored_snapshot_puts_back_every_random_state_and_the_training_state(tmp_path):
    """restore() gives back what offer() saw: the step and losses, the weights, the sampling generator
    and torch's global CPU generator (a task that draws from it resumes the same draws)."""
    from cyclereg.training.scheduler import StageSnapshot

    path = tmp_path / "stage2.partial.pt"
    objs = _snapshot_objects()
    snap = StageSnapshot(path, stage=2, every_s=1e-9)
    snap.restore(4, **objs)
    with torch.no_grad():
        objs["model"].weight.fill_(3.0)
    torch.manual_seed(123)
    torch.rand(5, generator=objs["generator"])  # the sampling generator has moved on from its seed
    assert snap.offer(2, losses=[2.0, 1.5], **objs)
    next_global = torch.rand(3)
    next_sampling = torch.rand(3, generator=objs["generator"])
    torch.manual_seed(999)  # the state a fresh process would have
    again = _snapshot_objects()
    assert StageSnapshot(path, stage=2, every_s=0).restore(4, **again) == (2, [2.0, 1.5])
    assert torch.equal(torch.rand(3), next_global)
    assert torch.equal(torch.rand(3, generator=again["generator"]), next_sampling)
    assert torch.equal(again["model"].weight, torch.full_like(again["model"].weight, 3.0))


@pytest.mark.parametrize("missing", ["config", "state_dict", "version"])
def test_a_checkpoint_needs_config_state_dict_and_version(tmp_path, missing):
    """A checkpoint holds {config, state_dict, version} (and its kind): one without any of the three is
    refused, naming the file, not loaded."""
    from cyclereg.checkpoint import load_checkpoint, save_checkpoint
    from cyclereg.errors import InputError

    path = tmp_path / "m.pt"
    save_checkpoint(path, kind="toy", config={"toy": 1}, state_dict={"w": torch.ones(2)})
    payload = load_checkpoint(path, kind="toy")
    assert {"config", "state_dict", "version", "kind"} <= set(payload) and payload["config"] == {"toy": 1}
    del payload[missing]
    torch.save(payload, path)
    with pytest.raises(InputError) as exc:
        load_checkpoint(path, kind="toy")
    assert exc.value.path == path


# module-level jobs for run_parallel (spawned workers import this module by name)
def _job_quick(*, progress) -> str:
    return "quick"


def _job_waits_for(path: str, *, progress) -> str:
    import os
    import time

    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "waited"


def _job_threads_then_mark(path: str, *, progress) -> int:
    progress.add_task("threads", total=1)  # adopts the thread count the parent published
    threads = torch.get_num_threads()
    with open(path, "w") as fh:
        fh.write("done")
    return threads


def test_workers_take_over_threads_only_once_no_job_is_left_to_start(tmp_path):
    """With jobs still to start, a finished worker's threads go to the next job, not to the running
    ones (which would oversubscribe the cores once the next job starts): the third job of three on two
    workers runs with its own share while the second still runs."""
    from test_parallel import Recorder

    from cyclereg.training.parallel import run_parallel

    mark = str(tmp_path / "third_done")
    got = []
    run_parallel([(_job_quick, (), "fold 1"), (_job_waits_for, (mark,), "fold 2"),
                  (_job_threads_then_mark, (mark,), "fold 3")], 2, Recorder(), 1, got.append, total_threads=2)
    assert sorted(map(str, got)) == ["1", "quick", "waited"]


class _UnpicklableError(Exception):
    """An error that cannot cross a process boundary as itself (it holds a lock)."""

    def __init__(self, message):
        super().__init__(message)
        import threading

        self.lock = threading.Lock()


def _job_raises_unpicklable(*, progress) -> None:
    raise _UnpicklableError("fold exploded")


def test_a_job_error_that_cannot_be_pickled_still_reaches_the_parent_with_its_message():
    """An error of a fold that cannot be pickled reaches the parent as a RuntimeError naming its type
    and message, at once (not a 'worker ended without a result' after a grace period)."""
    from test_parallel import Recorder

    from cyclereg.errors import WorkerError
    from cyclereg.training.parallel import run_parallel

    with pytest.raises(RuntimeError, match="_UnpicklableError: fold exploded") as exc:
        run_parallel([(_job_raises_unpicklable, (), "fold 1")], 1, Recorder(), 1, lambda _r: None)
    assert not isinstance(exc.value, WorkerError)


class _PartsTask(_WarmTask):
    """Labels each pair through :class:`LabelParts` (as the real tasks do)."""

    def make_pseudo_labels(self, model, stage, progress=None, parts=None):
        from cyclereg.training.scheduler import LabelParts

        labels = {pid: LabelParts.get_or_make(parts, pid, lambda: {"label": torch.full((2,), float(stage))})["label"]
                  for pid in ("p", "q")}
        return labels, {"weights": {"p": 1.0, "q": 1.0}, "stats": {}}


def test_the_label_parts_of_a_stage_go_once_its_labels_are_saved(tmp_path):
    """``pseudo{t}.parts/`` is gone as soon as ``pseudo{t}.pt`` is written, at stage 0 as at later stages
    (a volume run's parts take gigabytes), without waiting for the next command to clean up."""
    s = StageScheduler(_PartsTask(), tmp_path)
    s.run_stage0()
    assert (tmp_path / "pseudo0.pt").is_file() and not (tmp_path / "pseudo0.parts").exists()
    assert s.run(1) == 1
    assert not any(tmp_path.glob("pseudo*.parts"))


def test_a_stage_logged_twice_is_reported_by_its_last_line(tmp_path):
    """A stage redone (its checkpoint deleted) is logged again; status, the history and the settling rule
    read its newest line, not the first."""
    task = _SettlingWarmTask()
    s = StageScheduler(task, tmp_path)
    s.run_stage0()
    assert s.run(2) == 2
    (tmp_path / "stage2.pt").unlink()
    assert StageScheduler(_SettlingWarmTask(), tmp_path).run(2) == 2
    import json

    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in lines] == [0, 1, 2, 2] and lines[2] != lines[3]
    status = s.status(2)
    assert status["stage_log"][2] == lines[3]
    assert status["stage_seconds"][2] == lines[3]["seconds"]


# ----------------------------------------------------------------------------- run.json rewrites killed (kill-and-resume stress test)
def _tiny_cli_run(tmp_path):
    from test_cli_plumbing import _keypoint_dataset
    from typer.testing import CliRunner

    from cyclereg_cli.main import app

    return _keypoint_dataset(tmp_path), tmp_path / "run", CliRunner(), app


@pytest.mark.parametrize("then", ["pretrain-random", "cycle"])
def test_the_leftover_of_a_killed_run_json_rewrite_is_removed(tmp_path, then):
    """``kill -9`` of a command rewriting run.json (pretrain-random run again, ``cycle --stages N+1`` or
    ``--stop-below``) between its temporary file and the rename leaves ``RUN/.run.json.XXXX.tmp``; the next
    command that reads run.json under the run's lock removes it (it was kept for good before)."""
    ds, run, runner, app = _tiny_cli_run(tmp_path)
    args = ["--fold", "1", "--stages", "2", "--epochs", "1", "--train-points", "100,200", "--tta-passes", "0",
            "--recentre-passes", "0", "--device", "cpu"]
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *args]).exit_code == 0
    leftover = run / ".run.json.k3j2x9.tmp"  # what the kill leaves: a whole or half-written copy
    leftover.write_text('{"half')
    command = (["pretrain-random", str(ds), "-o", str(run), *args] if then == "pretrain-random"
               else ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "1"])
    res = runner.invoke(app, command)
    assert res.exit_code == 0, res.output
    assert not leftover.exists() and (run / "run.json").is_file()


def test_status_of_a_run_trimmed_to_its_final_checkpoint_names_the_stage_it_holds(tmp_path):
    """A finished run from which the stage files were removed to save space (only final.pt and log.jsonl kept,
    as carried-runs/abd4): status said 'finished stage -, next: stage 0 labels (pretrain-random)', and
    evaluate --run noted that the run had not finished. It holds stage T's model: finished at T (with fewer
    stages than the question's T: it cannot go on)."""
    s = StageScheduler(_ToyTask(), tmp_path, keep_labels=2)
    s.run_stage0()
    assert s.run(2) == 2
    for path in [*tmp_path.glob("pseudo*"), *tmp_path.glob("stage*.pt")]:
        path.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "log.jsonl"]
    status = s.status(2)
    assert status["finished"] == 2 and status["next"].startswith("finished") and status["remaining_s"] == 0.0
    assert "only final.pt (stage 2)" in status["next"] and status["unlogged_stages"] == []
    longer = s.status(3)
    assert longer["finished"] == 2 and longer["next"].startswith("cannot go on")
    (tmp_path / "pseudo0.pt").write_bytes(b"")  # a stage file left: the ordinary reading (stage 0 labels only)
    assert s.status(2)["finished"] == 0


def test_status_of_stage_1_stopped_before_its_first_final_checkpoint(tmp_path):
    """Killed after stage 1's labels and before the run's first final.pt (a resume killed again just after the
    log line, in the dense stress test): status said 'stage 2: training from step 0' although evaluate --run
    finds no final.pt; like a later stage's, it names what the same cycle command still writes."""
    s = StageScheduler(_ToyTask(), tmp_path, keep_labels=2)
    s.run_stage0()
    assert s.run(1) == 1
    (tmp_path / "final.pt").unlink()
    assert s.status(3)["next"] == ("stage 1: its labels are saved, final.pt not yet (a cycle command working on "
                                   "the fold writes it next; if none is, the same cycle command writes it)")
    assert StageScheduler(_ToyTask(), tmp_path, keep_labels=2).run(1) == 1  # the same command writes it
    assert (tmp_path / "final.pt").read_bytes() == (tmp_path / "stage1.pt").read_bytes()
    assert s.status(3)["next"] == "stage 2: training from step 0"
