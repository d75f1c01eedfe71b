"""Training at the edges (bad-input walk, 2026-12-07): the keypoint path first, then the dense path, on tiny data.

Audited: what ``pretrain_random`` / ``run_cycle`` (cyclereg/training/{scheduler,clouds,dense,api}.py) do when a
stage diverges (a learning rate so large that the weights become NaN mid-stage), on odd training sets (a fold
with one training pair, batch_size above the number of pairs, epochs 1, clouds of the minimum size for the
network's k, zero motion, one pair listed twice, all pairs alike), with ties and NaN in the difficulty ranking,
with ``--stop-below`` met at stage 1 and extended with ``--stages``, with unsorted / duplicated / unreachable LR
milestones and ``lr_gamma`` 1, and ``evaluate --run`` of a run whose folds finished different numbers of stages.

The answers are analytic: a moving cloud that is the fixed cloud shifted by ``s`` holds, for every fixed point,
a candidate whose features equal the point's (the graph network sees relative coordinates and normalises each
cloud), so every network labels the pair with ``s`` exactly: pseudo labels ``s``, disagreement and label change
0, the trained model registers ``s`` (``s = 0``: zero motion). Real bugs are pinned as strict xfails.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cyclereg.checkpoint import load_checkpoint, nonfinite_weights
from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair
from cyclereg.errors import InputError, ResultError
from cyclereg.pointio import write_points
from cyclereg.training.api import pretrain_random, run_cycle, run_status
from cyclereg.training.clouds import CloudCycleConfig, CloudCycleTask, CloudPairData
from cyclereg.training.scheduler import difficulty_weights

from conftest import LearningRateSpy

pytestmark = pytest.mark.usefixtures("one_intraop_thread")

TINY = BreathingConfig(n_fixed=60, n_moving=100, branches=6, steps=10)
CHEAP = dict(refine_tta_passes=0, refine_recentre_passes=0, lr_milestones=())
DIVERGING_LR = 1e36
"""Adam's first steps move every weight by about lr: the graph network's weights overflow to inf / NaN
within the two steps of a stage of two epochs on one pair (the loss of the second step is NaN)."""


def _write_dataset(root: Path, clouds: dict, folds: list, landmarks: dict | None = None) -> Path:
    """A keypoint dataset of ``clouds`` ``{id: (fixed mm, moving mm)}``; ``landmarks`` ``{id: (fixed, moving)}``."""
    pairs = []
    for pid, (fixed, moving) in clouds.items():
        write_points(root / pid / "fk.csv", fixed)
        write_points(root / pid / "mk.csv", moving)
        entry = {"id": pid, "fixed_keypoints": f"{pid}/fk.csv", "moving_keypoints": f"{pid}/mk.csv"}
        if landmarks and pid in landmarks:
            write_points(root / pid / "fl.csv", landmarks[pid][0])
            write_points(root / pid / "ml.csv", landmarks[pid][1])
            entry.update(fixed_landmarks=f"{pid}/fl.csv", moving_landmarks=f"{pid}/ml.csv")
        pairs.append(entry)
    ds = root / "dataset.json"
    ds.write_text(json.dumps({"name": "edge", "pairs": pairs, "folds": folds}))
    return ds


def _breathing(i: int):
    pair = make_breathing_pair(i, TINY)
    return pair.fixed_mm, pair.moving_mm


def _minimal_cloud() -> torch.Tensor:
    """11 points: the fewest a fixed cloud may have (the LBP graph's 10 neighbours plus the point)."""
    return torch.rand(11, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 50.0


def _log(fold_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (fold_dir / "log.jsonl").read_text().splitlines()]


def _labels(fold_dir: Path, stage: int) -> dict:
    return torch.load(fold_dir / f"pseudo{stage}.pt", weights_only=True)


# ----------------------------------------------------------------------------- divergence (keypoints)
def _diverging_run(tmp_path, refine: bool):
    ds = _write_dataset(tmp_path / "data", {"c0": _breathing(0), "c1": _breathing(1)}, [["c0"], ["c1"]])
    run = tmp_path / "run"
    cfg = CloudCycleConfig(stages=1, epochs=2, lr=DIVERGING_LR, refine=refine, **CHEAP)
    pretrain_random(ds, run, config=cfg, fold=1, device="cpu")
    return ds, run, _labels(run / "fold1", 0)


@pytest.mark.parametrize("refine", [True, False], ids=["refine", "no-refine"])
def test_a_diverging_keypoint_stage_stops_naming_the_stage_and_lr_and_writes_no_nan_file(tmp_path, refine):
    ds, run, before = _diverging_run(tmp_path, refine)
    with pytest.raises((InputError, ResultError)) as caught:
        run_cycle(ds, run, folds="1", device="cpu")
    said = str(caught.value)
    assert "\n" not in said and "stage 1" in said and "lr" in said, said
    fold = run / "fold1"
    assert not (fold / "stage1.pt").exists() and not (fold / "pseudo1.pt").exists()
    assert not (fold / "final.pt").exists()
    kept = _labels(fold, 0)  # the last good labels are kept as they were
    assert all(torch.equal(kept["labels"][k], before["labels"][k]) for k in before["labels"])


def test_a_diverged_keypoint_run_resumes_once_its_lr_is_lowered(tmp_path):
    ds, run, _ = _diverging_run(tmp_path, refine=True)
    with pytest.raises(Exception):  # noqa: B017 - whatever it raises today; the test above pins which
        run_cycle(ds, run, folds="1", device="cpu")
    meta = json.loads((run / "run.json").read_text())
    meta["config"]["lr"] = 1e-3
    (run / "run.json").write_text(json.dumps(meta))
    assert run_cycle(ds, run, folds="1", device="cpu") == {1: 1}
    assert nonfinite_weights(load_checkpoint(run / "fold1" / "final.pt")["state_dict"]) is None
    assert all(bool(torch.isfinite(v).all()) for v in _labels(run / "fold1", 1)["labels"].values())


# ----------------------------------------------------------------------------- difficulty ranking
@pytest.mark.parametrize("disagreement, expected", [
    ({"a": 2.0, "b": 2.0, "c": 2.0}, {"a": 0.5, "b": 0.5, "c": 0.5}),  # all tied: uniform (sigmoid(0))
    ({"only": 7.0}, {"only": 1.0}),  # one pair: weight 1
    # a tie between the two easiest shares the mean argument of +5 and 0: sigmoid(2.5)
    ({"x": 1.0, "y": 1.0, "z": 3.0}, {"x": 1 / (1 + math.exp(-2.5)), "y": 1 / (1 + math.exp(-2.5)),
                                      "z": 1 / (1 + math.exp(5.0))}),
])
def test_difficulty_weights_of_ties_and_of_a_single_pair(disagreement, expected):
    got = difficulty_weights(disagreement)
    assert got == pytest.approx(expected, rel=1e-12)
    assert difficulty_weights(dict(reversed(list(disagreement.items())))) == got  # the listing order weighs nothing


def test_difficulty_weights_of_a_nan_disagreement_do_not_depend_on_the_listing_order():
    nan = float("nan")
    orders = [{"a": nan, "b": 1.0, "c": 2.0}, {"b": 1.0, "a": nan, "c": 2.0}, {"b": 1.0, "c": 2.0, "a": nan}]
    try:
        weights = [difficulty_weights(d) for d in orders]
        pair = difficulty_weights({"p": nan, "q": nan})
    except ValueError:  # refusing a NaN disagreement (a diverged stage) is as good
        return
    assert weights[0] == weights[1] == weights[2]
    assert pair["p"] == pair["q"]


# ----------------------------------------------------------------------------- odd training sets (keypoints)
@pytest.mark.parametrize("shift", [(0.0, 0.0, 0.0), (1.0, -2.0, 0.5)], ids=["zero-motion", "shift"])
def test_a_shifted_minimal_cloud_is_labelled_and_learnt_as_its_shift_and_settles_at_stage_1(tmp_path, shift):
    """Fold 1 trains on one pair (b) of minimal clouds (11 points), moving = fixed + s, with batch_size 3 > 1 pair
    and one epoch, at the default refinement (re-centring, TTA): every stage's labels are s at every point
    (0 for zero motion), the disagreement and the label change are 0, so --stop-below stops at stage 1; a larger
    --stages later trains nothing under the recorded rule (but is recorded), and the trained model registers the
    held-out pair a (the same clouds) as s."""
    f = _minimal_cloud()
    s = torch.tensor(shift, dtype=torch.float64)
    ds = _write_dataset(tmp_path / "data", {"a": (f, f + s), "b": (f.clone(), f + s)}, [["a"], ["b"]])
    run = tmp_path / "run"
    pretrain_random(ds, run, config=CloudCycleConfig(stages=3, epochs=1, batch_size=3), fold=1, device="cpu")
    assert run_cycle(ds, run, folds="1", device="cpu", stop_below_mm=0.01) == {1: 1}
    fold = run / "fold1"
    log = _log(fold)
    assert [r["stage"] for r in log] == [0, 1]
    for record in log:
        assert record["mean_pseudo_displacement_mm"] == pytest.approx(float(s.norm()), abs=1e-4)
        assert record["pseudo_label_disagreement_mm"] < 1e-4
    assert log[1]["pseudo_label_change_mm"] < 1e-4 and math.isfinite(log[1]["train_loss_mm"])
    for t in (0, 1):
        stored = _labels(fold, t)
        assert stored["weights"] == {"b": 1.0}  # one training pair: weight 1
        assert set(stored["labels"]) == {"b"} and stored["labels"]["b"].shape == (11, 3)
    # extending with --stages under the recorded rule: nothing trains, the new target is recorded
    assert run_cycle(ds, run, folds="1", device="cpu", stages=4) == {1: 1}
    assert json.loads((run / "run.json").read_text())["config"]["stages"] == 4
    assert run_status(run)["folds"][0]["next"].startswith("finished: labels settled at stage 1")
    # the trained model registers the held-out pair (the same clouds) as s
    import cyclereg.api

    out = cyclereg.api.register(tmp_path / "data" / "a" / "fk.csv", tmp_path / "data" / "a" / "mk.csv",
                                tmp_path / "reg", model=fold / "final.pt", verbose=False)
    got = _displacements(out)
    torch.testing.assert_close(got, s.expand_as(got).to(got), atol=1e-3, rtol=0)


def _displacements(result) -> torch.Tensor:
    """The ``(N, 3)`` mm displacements a ``register`` call wrote (``displacements.csv``: dx_mm, dy_mm, dz_mm)."""
    import csv

    with open(result.path("displacements.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    return torch.tensor([[float(r[k]) for k in ("dx_mm", "dy_mm", "dz_mm")] for r in rows], dtype=torch.float64)


def test_a_pair_listed_three_times_under_three_ids_gets_one_label_and_uniform_weights(tmp_path):
    """All training pairs alike (one pair's files copied under three ids), at the default refinement (re-centred
    pass, 4 TTA passes): each stage labels them bitwise alike, so their disagreements tie and the difficulty
    weights are uniform, sigmoid(0) = 0.5 (not sigmoid(+5) ... sigmoid(-5) by listing order)."""
    same = _breathing(0)
    clouds = {"d": _breathing(1), "a": same, "b": (same[0].clone(), same[1].clone()), "c": same}
    ds = _write_dataset(tmp_path / "data", clouds, [["d"], ["a"], ["b"], ["c"]])
    run = tmp_path / "run"
    pretrain_random(ds, run, config=CloudCycleConfig(stages=1, epochs=1), fold=1, device="cpu")
    assert run_cycle(ds, run, folds="1", device="cpu") == {1: 1}
    for t in (0, 1):
        stored = _labels(run / "fold1", t)
        assert stored["weights"] == {"a": 0.5, "b": 0.5, "c": 0.5}
        assert torch.equal(stored["labels"]["a"], stored["labels"]["b"])
        assert torch.equal(stored["labels"]["a"], stored["labels"]["c"])


# ----------------------------------------------------------------------------- divergence (volumes)
def test_a_diverging_dense_stage_stops_naming_the_stage_and_lr_and_writes_no_nan_file(tmp_path):
    from cyclereg.training.dense import DenseCycleConfig
    from test_cycle_dense import _dataset as dense_dataset

    ds = dense_dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    pretrain_random(ds, run, config=DenseCycleConfig(stages=1, iterations=2, lr=DIVERGING_LR), device="cpu")
    with pytest.raises((InputError, ResultError)) as caught:
        run_cycle(ds, run, device="cpu")
    said = str(caught.value)
    assert "stage 1" in said and "lr" in said, said
    assert not (run / "all" / "stage1.pt").exists() and not (run / "all" / "pseudo1.pt").exists()
    assert [r["stage"] for r in _log(run / "all")] == [0]


# ----------------------------------------------------------------------------- learning-rate schedule
def _one_pair_task(config: CloudCycleConfig) -> CloudCycleTask:
    g = torch.Generator().manual_seed(0)
    pair = CloudPairData("p", torch.rand(60, 3, generator=g) * 2 - 1, torch.rand(80, 3, generator=g) * 2 - 1)
    from cyclereg.frames import UnitBox

    return CloudCycleTask([pair], UnitBox((0.0, 0.0, 0.0), (2.0, 2.0, 2.0)), config, torch.device("cpu"))


@pytest.mark.parametrize("record, lrs", [
    ({"lr_milestones": [2, 1]}, [1e-4, 1e-5, 1e-5]),  # unsorted: the same schedule as [1, 2]
    ({"lr_milestones": [1, 1]}, [1e-5, 1e-5, 1e-5]),  # listed twice: two decays at epoch 1
    ({"lr_milestones": [10, 20]}, [1e-3, 1e-3, 1e-3]),  # beyond the epochs: never reached
    ({"lr_milestones": [1, 2], "lr_gamma": 1.0}, [1e-3, 1e-3, 1e-3]),  # gamma 1: no decay
], ids=["unsorted", "duplicated", "beyond-epochs", "gamma-1"])
def test_lr_milestones_from_a_run_json_record(record, lrs):
    """A run.json configuration (``CloudCycleConfig.from_dict``, lists as JSON has them) with milestones out of
    order, repeated, past the last epoch, or lr_gamma 1: the learning rate after each of 3 epochs is
    lr * gamma ** (milestones passed, counted with repeats), at every stage (the warm restart)."""
    from cyclereg.clouds.features import build_graph_net

    cfg = CloudCycleConfig.from_dict({**CHEAP, "lr_milestones": [], "epochs": 3, "batch_size": 1, "augment": False,
                                      **record})
    for stage in (1, 2):
        spy = LearningRateSpy()
        _one_pair_task(cfg).train_stage(build_graph_net(cfg.reg.net, seed=0), {"p": torch.zeros(60, 3)}, {}, stage,
                                        snapshot=spy)
        assert spy.lrs == pytest.approx(lrs, rel=1e-9)


def test_epochs_that_round_both_milestones_onto_one_epoch_still_end_at_the_papers_last_lr():
    """--epochs 4 scales the paper's 40 and 52 of 60 epochs to 2.67 and 3.47, both 3: the last epoch then runs at
    lr * gamma^2 (1e-5), the paper's last learning rate, not lr * gamma."""
    from cyclereg.clouds.features import build_graph_net
    from cyclereg.training.clouds import cycle_config

    cfg = replace(cycle_config(epochs=4), batch_size=1, augment=False)
    assert cfg.lr_milestones == (3, 3)
    spy = LearningRateSpy()
    _one_pair_task(cfg).train_stage(build_graph_net(cfg.reg.net, seed=0), {"p": torch.zeros(60, 3)}, {}, 1,
                                    snapshot=spy)
    assert spy.lrs == pytest.approx([1e-3, 1e-3, 1e-5, 1e-5], rel=1e-9)


# ----------------------------------------------------------------------------- folds at different stages
def test_evaluate_run_of_folds_that_finished_different_numbers_of_stages(tmp_path, capsys):
    """Fold 1 (trains on two shifted minimal pairs) settles at stage 1 under --stop-below; fold 2 (a breathing
    pair) has trained stage 1 of 2. evaluate --run scores each fold with its final.pt, marks only fold 2 as not
    finished (a settled fold is finished), and --stage 2 names a fold that has no stage 2."""
    import cyclereg.api

    f = _minimal_cloud()
    s = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    bf, bm = _breathing(2)
    clouds = {"a": (f, f + s), "b": (f + 0.0, f + s), "c": (bf, bm)}
    ds = _write_dataset(tmp_path / "data", clouds, [["c"], ["a", "b"]],
                        landmarks={"a": (f, f + s), "b": (f, f + s), "c": (bf[:10], bf[:10] + 1.0)})
    run = tmp_path / "run"
    pretrain_random(ds, run, config=CloudCycleConfig(stages=2, epochs=1, **CHEAP), device="cpu")
    assert run_cycle(ds, run, folds="1", device="cpu", stop_below_mm=0.01) == {1: 1}
    assert run_cycle(ds, run, folds="2", device="cpu", stages=1) == {2: 1}
    nxt = {row["fold"]: row["next"] for row in run_status(run)["folds"]}
    assert nxt[1].startswith("finished: labels settled at stage 1") and nxt[2] == "stage 2: training from step 0"
    report = cyclereg.api.evaluate(ds, tmp_path / "r.json", run=run, device="cpu")
    checkpoints = report["checkpoints"]
    assert checkpoints["1"]["stage"] == 1 and "run_finished" not in checkpoints["1"]
    assert checkpoints["2"]["stage"] == 1 and checkpoints["2"]["run_finished"] is False
    assert {c["id"]: c["fold"] for c in report["cases"]} == {"a": 2, "b": 2, "c": 1}
    named = (r"no checkpoint for fold (\d) \(expected fold\1/stage2.pt\) "
             r"\(this fold has the checkpoints of stage\(s\) 1\)")
    with pytest.raises(InputError, match=named):
        cyclereg.api.evaluate(ds, tmp_path / "r2.json", run=run, stage=2, device="cpu")
    # an ensemble of this run and a finished one says which member fold is an intermediate stage's model
    from cyclereg.clouds.api import combine_cloud_models

    done = tmp_path / "done"
    pretrain_random(ds, done, config=CloudCycleConfig(stages=1, epochs=1, seed=1, **CHEAP), device="cpu")
    run_cycle(ds, done, device="cpu")
    capsys.readouterr()
    combine_cloud_models([run, done], tmp_path / "ens")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: fold 2 of {run} has not finished training (next: stage 2: training from step 0): the "
                     "ensemble takes its final.pt, the model of an intermediate stage"], notes


@pytest.mark.parametrize("key, value", [
    ("lr", "0.001"), ("lr", -1.0), ("lr", float("inf")), ("batch_size", 1.5), ("augment", "no"),
    ("aug_linear_std", float("nan")),
])
def test_a_dense_run_json_with_an_unusable_training_setting_is_refused_naming_it(key, value):
    from cyclereg.training.dense import DenseCycleConfig

    with pytest.raises(ValueError, match=key):
        DenseCycleConfig.from_dict({key: value})
