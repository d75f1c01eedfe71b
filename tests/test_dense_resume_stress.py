"""Resume points of the dense (volume) training path found by a kill-and-resume stress test: every
resumed run must end with the files of an uninterrupted one (the same checkpoints, labels and log
values, and nothing else). Deterministic: the "kill" is a KeyboardInterrupt raised at an exact point."""

from __future__ import annotations

import pytest

from cyclereg.training.scheduler import StageScheduler
from test_cycle_dense import _ToyTask


@pytest.mark.parametrize("killed_in", ["_log", "_publish_final", "_prune_labels"])
def test_a_last_stage_killed_after_its_labels_still_prunes_the_old_labels(tmp_path, monkeypatch, killed_in):
    """keep_labels=2 (the dense runs' DENSE_KEEP_LABELS): once the last stage's labels are saved, a run killed
    before it pruned the old label files (in its log line, its final.pt or the pruning itself) left
    ``pseudo{T-2}.pt`` for good: the same command found nothing to train and never pruned again (a dense
    stage's labels reach a gigabyte). The resumed run must keep only the newest two, as an uninterrupted one."""
    whole = StageScheduler(_ToyTask(), tmp_path / "whole", keep_labels=2)
    whole.run_stage0()
    assert whole.run(3) == 3
    expected = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert [n for n in expected if n.startswith("pseudo")] == ["pseudo2.pt", "pseudo3.pt"]

    real = getattr(StageScheduler, killed_in)

    def killed_at_stage_3(self, arg, *rest):
        stage = arg["stage"] if isinstance(arg, dict) else arg
        if stage == 3:
            raise KeyboardInterrupt  # as SIGTERM / Ctrl-C there: the stage's labels are saved already
        return real(self, arg, *rest)

    s = StageScheduler(_ToyTask(), tmp_path / "killed", keep_labels=2)
    s.run_stage0()
    monkeypatch.setattr(StageScheduler, killed_in, killed_at_stage_3)
    with pytest.raises(KeyboardInterrupt):
        s.run(3)
    monkeypatch.setattr(StageScheduler, killed_in, real)
    assert s.last_finished_stage() == 3  # its labels (and checkpoint) are saved: stage 3 is finished
    task = _ToyTask()
    assert StageScheduler(task, tmp_path / "killed", keep_labels=2).run(3) == 3 and task.trained == []
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == expected
    assert s.status(3)["next"] == "finished"


def test_status_of_stage_0_stopped_between_its_labels_and_its_log_line(tmp_path, monkeypatch):
    """pretrain-random killed after ``pseudo0.pt`` and before its line in ``log.jsonl``: status called stage 0
    "finished but without a readable line in log.jsonl (damaged or removed lines)", where the same command
    (pretrain-random, or cycle) writes the line (``_complete_log``), as it says for a stage >= 1 stopped there."""
    s = StageScheduler(_ToyTask(), tmp_path, keep_labels=2)
    monkeypatch.setattr(StageScheduler, "_log", lambda self, record: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        s.run_stage0()
    monkeypatch.undo()
    assert s.last_finished_stage() == 0 and not (tmp_path / "log.jsonl").exists()
    status = s.status(3)
    assert status["unlogged_stages"] == []  # pending, not damaged
    assert status["next"].startswith("stage 0: its labels are saved, its log line not yet")
    StageScheduler(_ToyTask(), tmp_path, keep_labels=2).run_stage0()  # the same command writes the line
    status = s.status(3)
    assert status["unlogged_stages"] == [] and status["next"] == "stage 1: training from step 0"
    assert 0 in status["stage_log"]


def test_dense_refresh_of_a_trained_stage_killed_halfway_resumes_at_the_next_pair(tmp_path, monkeypatch,
                                                                                   one_intraop_thread):
    """cycle killed while refreshing stage 1's labels (its checkpoint saved, the first pair's label in
    ``pseudo1.parts``): the same command trains nothing, labels only the second pair with the network it reloads
    from ``stage1.pt`` (the part's fingerprint matches it), and ends with the labels, log values and weights of an
    uninterrupted run, bitwise (one thread). The dense tests cover a kill in stage 0's labelling and in a stage's
    training, not in the refresh of a trained stage."""
    import json

    import torch
    from typer.testing import CliRunner

    from cyclereg.training.dense import DenseCycleTask
    from cyclereg_cli.main import app
    from conftest import assert_same_weights
    from test_cycle_dense import _dataset, recording_pseudo_label

    runner = CliRunner()
    ds = _dataset(tmp_path / "data", with_labels=False)
    args = ["--stages", "1", "--iterations", "2", "--directions", "both", "--device", "cpu"]
    for name in ("a", "b"):
        assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / name), *args]).exit_code == 0
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "a"), "--device", "cpu"]).exit_code == 0
    seen = []
    monkeypatch.setattr(DenseCycleTask, "pseudo_label", recording_pseudo_label(seen, die_at=2))
    cmd = ["cycle", str(ds), "--run", str(tmp_path / "b"), "--device", "cpu"]
    assert runner.invoke(app, cmd).exit_code == 130
    fold = tmp_path / "b" / "all"
    assert (fold / "stage1.pt").is_file() and not (fold / "pseudo1.pt").exists()
    assert len(list((fold / "pseudo1.parts").glob("*.pt"))) == 1
    seen.clear()
    trained = []
    monkeypatch.setattr(DenseCycleTask, "pseudo_label", recording_pseudo_label(seen))
    monkeypatch.setattr(DenseCycleTask, "train_stage", lambda *a, **k: trained.append(a) or {})
    res = runner.invoke(app, cmd)
    assert res.exit_code == 0, res.output
    assert seen == [1] and trained == [] and not (fold / "pseudo1.parts").exists()
    assert_same_weights(tmp_path / "a" / "all" / "final.pt", fold / "final.pt")
    a, b = (torch.load(d / "all" / "pseudo1.pt", weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert a["weights"] == b["weights"] and a["labels"].keys() == b["labels"].keys()
    assert all(torch.equal(a["labels"][pid], b["labels"][pid]) for pid in a["labels"])
    timing = {"seconds", "seconds_this_run", "train_seconds"}
    logs = [[{k: v for k, v in json.loads(line).items() if k not in timing}
             for line in (d / "all" / "log.jsonl").read_text().splitlines()] for d in (tmp_path / "a", tmp_path / "b")]
    assert logs[0] == logs[1] and [r["stage"] for r in logs[1]] == [0, 1]
