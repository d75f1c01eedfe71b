"""Cyclical self-training of the keypoint-cloud path: CPU smoke test, resume, no landmarks."""

import json
import math
import re
import time
from dataclasses import asdict, replace

import pytest
import torch
from typer.testing import CliRunner

import cyclereg.training.scheduler as scheduler_mod
from cyclereg.checkpoint import data_fingerprint, load_checkpoint, save_checkpoint
from cyclereg.clouds.pipeline import CloudRegConfig
from cyclereg.clouds.synthetic import BreathingConfig, make_breathing_pair
from cyclereg.pointio import read_points, write_points
from cyclereg.training.api import run_status
from cyclereg.training.clouds import CloudCycleConfig, CloudCycleTask, CloudPairData, random_affine
from cyclereg.training.scheduler import LabelParts
from cyclereg.frames import UnitBox
from cyclereg_cli.main import app

from conftest import LearningRateSpy, assert_same_weights, load_script

runner = CliRunner()
# tiny clouds: one intra-op thread is faster, and makes CPU training bitwise reproducible
pytestmark = pytest.mark.usefixtures("one_intraop_thread")
TINY = BreathingConfig(n_fixed=150, n_moving=300, branches=10, steps=20)
FAST = ["--stages", "2", "--epochs", "2", "--train-points", "100,200", "--device", "cpu"]
CHEAP_LABELS = ["--tta-passes", "0", "--recentre-passes", "0"]  # for tests of the scheduler, not the refinement


def _dataset(tmp_path, n=3, landmarks=True, seeds=None):
    pairs = []
    for i in range(n):
        pair = make_breathing_pair(i if seeds is None else seeds[i], TINY)
        write_points(tmp_path / f"c{i}" / "fk.csv", pair.fixed_mm)
        write_points(tmp_path / f"c{i}" / "mk.csv", pair.moving_mm)
        if landmarks:
            write_points(tmp_path / f"c{i}" / "fl.csv", pair.fixed_mm[:10])
            write_points(tmp_path / f"c{i}" / "ml.csv", pair.fixed_mm[:10] + pair.displacement_mm[:10])
        # landmark entries are always listed; without landmarks the files simply do not exist
        pairs.append({"id": f"c{i}", "fixed_keypoints": f"c{i}/fk.csv", "moving_keypoints": f"c{i}/mk.csv",
                      "fixed_landmarks": f"c{i}/fl.csv", "moving_landmarks": f"c{i}/ml.csv"})
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"name": "tiny", "pairs": pairs, "folds": [["c0"], ["c1"], ["c2"]][:n]}))
    return ds


def test_evaluate_without_a_volume_grid_reports_tre_only(tmp_path):
    """A dataset without volume_shape_zyx / spacing_zyx_mm has no grid to score a field's smoothness on:
    no SDlogJ for a model nor for --identity (which wrote 0.0), and the timing line says landmarks only."""
    ds = _dataset(tmp_path, n=2)
    for i, args in enumerate((["--identity"], ["--model", "random", "--device", "cpu"])):
        out = tmp_path / f"r{i}.json"
        res = runner.invoke(app, ["evaluate", str(ds), *args, "--json", str(out)])
        assert res.exit_code == 0, res.output
        r = json.loads(out.read_text())
        assert r["mean_sdlogj"] is None and not any("sdlogj" in c for c in r["cases"]), r
        assert "(landmarks)" in " ".join(res.output.split()) and "SDlogJ of the dense" not in res.output
    obj = json.loads(ds.read_text())  # with a grid the identity's zero field scores exactly 0
    obj.update(volume_shape_zyx=[40, 40, 40], spacing_zyx_mm=[4.0, 4.0, 4.0])
    ds.write_text(json.dumps(obj))
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(tmp_path / "g.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "g.json").read_text())["mean_sdlogj"] == 0.0


def test_evaluate_reads_every_pair_before_registering_any(tmp_path, monkeypatch):
    """A bad landmark file of the last pair stops evaluate before the first registration."""
    import cyclereg.clouds.api as clouds_api

    ds = _dataset(tmp_path)
    write_points(tmp_path / "c2" / "ml.csv", make_breathing_pair(2, TINY).fixed_mm[:7])
    calls = []
    real = clouds_api.register_clouds
    monkeypatch.setattr(clouds_api, "register_clouds", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = runner.invoke(app, ["evaluate", str(ds), "--model", "random", "--device", "cpu",
                              "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "pair c2: 10 fixed vs 7 moving landmarks" in res.output, res.output
    assert calls == [] and not (tmp_path / "r.json").exists()


def test_validation_files_are_checked_before_any_work(tmp_path):
    """--val-pairs reads its held-out files at the start: a missing or mismatched landmark file fails
    pretrain-random before the run directory exists, and cycle before a stage trains."""
    ds = _dataset(tmp_path, landmarks=False)  # the landmark files are listed but absent
    run = tmp_path / "run"
    args = ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST, *CHEAP_LABELS]
    res = runner.invoke(app, [*args, "--val-pairs", "1"])
    assert res.exit_code == 2 and "fl.csv" in res.output and not run.exists(), res.output
    assert runner.invoke(app, args).exit_code == 0
    write_points(tmp_path / "c0" / "fl.csv", make_breathing_pair(0, TINY).fixed_mm[:10])
    write_points(tmp_path / "c0" / "ml.csv", make_breathing_pair(0, TINY).fixed_mm[:9])
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "1", "--val-pairs", "1"])
    assert res.exit_code == 2 and "10 fixed vs 9 moving landmarks" in res.output, res.output
    assert not (run / "fold1" / "stage1.pt").exists()
    # a training pair whose clouds lie apart (not in one world frame) is refused as register refuses it
    write_points(tmp_path / "c1" / "mk.csv", make_breathing_pair(1, TINY).moving_mm + 5000.0)
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "apart"), "--fold", "1", *FAST])
    assert res.exit_code == 2 and not (tmp_path / "apart").exists()
    assert "training pair c1: its points do not overlap" in " ".join(res.output.split()), res.output


def test_a_run_refuses_keypoint_files_changed_since_its_pseudo_labels(tmp_path):
    """run.json records each pair's keypoint files by content: `cycle` (and `pretrain-random` into the
    same run) refuses files that changed since, naming the pair, instead of training on stale labels
    (or failing on an index); the same ids and dataset name do not make the same data."""
    ds = _dataset(tmp_path)
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST, *CHEAP_LABELS])
    assert res.exit_code == 0, res.output
    assert set(json.loads((run / "run.json").read_text())["data"]["pairs"]) == {"c0", "c1", "c2"}
    redetected = make_breathing_pair(7, TINY).fixed_mm[:150]  # other points, fewer of them
    write_points(tmp_path / "c2" / "fk.csv", redetected)
    for cmd in (["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "1"],
                ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST, *CHEAP_LABELS]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2, res.output
        said = " ".join(res.output.split())
        assert "keypoint files of pair(s) c2 changed (by content)" in said and len(res.output.strip().splitlines()) <= 2
    assert not (run / "fold1" / "stage1.pt").exists()


def test_checkpoints_name_their_training_pairs_to_evaluate_and_ensemble(tmp_path):
    """A checkpoint records its training pairs: evaluate --model names those it scores, a run folder
    without run.json is checked against its checkpoints, and an ensemble records its members' union."""
    ds = _dataset(tmp_path)
    run = tmp_path / "run"
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST]).exit_code == 0
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--device", "cpu"]).exit_code == 0
    res = runner.invoke(app, ["evaluate", str(ds), "--model", str(run / "fold1" / "final.pt"), "--device", "cpu",
                              "--json", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "note: 2 of the 3 pairs were training pairs of" in said and "c1, c2" in said, res.output
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["pairs_in_training"] == ["c1", "c2"]
    assert [c["in_training"] for c in report["cases"]] == [False, True, True]
    # the data decides, not the names: the same files under another dataset name and other ids are
    # named, other clouds under the same name and ids are not
    renamed = tmp_path / "renamed.json"  # other name, other ids, and each pair reversed
    renamed.write_text(json.dumps({"name": "other", "pairs": [
        {**p, "id": f"x{p['id']}", "fixed_keypoints": p["moving_keypoints"], "moving_keypoints": p["fixed_keypoints"]}
        for p in json.loads(ds.read_text())["pairs"]]}))
    res = runner.invoke(app, ["evaluate", str(renamed), "--model", str(run / "fold1" / "final.pt"), "--device", "cpu",
                              "--json", str(tmp_path / "n.json")])
    assert res.exit_code == 0 and json.loads((tmp_path / "n.json").read_text())["pairs_in_training"] == ["xc1", "xc2"]
    other = _dataset(tmp_path / "other_data", seeds=(7, 8, 9))  # also named "tiny", ids c0-c2
    res = runner.invoke(app, ["evaluate", str(other), "--model", str(run / "fold1" / "final.pt"), "--device", "cpu",
                              "--json", str(tmp_path / "o.json")])
    assert res.exit_code == 0 and "training pairs" not in res.output, res.output
    assert json.loads((tmp_path / "o.json").read_text())["pairs_in_training"] == []
    # a folder of exported checkpoints without run.json: the checkpoint's record decides
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "fold1.pt").write_bytes((run / "fold1" / "final.pt").read_bytes())
    one_fold = tmp_path / "one_fold.json"
    one_fold.write_text(json.dumps({**json.loads(ds.read_text()), "folds": [["c0", "c1", "c2"]]}))
    res = runner.invoke(app, ["evaluate", str(one_fold), "--run", str(bare), "--device", "cpu",
                              "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 2 and ("pair c1 is in fold 1 of the dataset, but the checkpoint of fold 1 trained on its "
                                   "keypoint files (as training pair(s) c1") in " ".join(res.output.split()), res.output
    assert not (tmp_path / "b.json").exists()
    # ... and a pair it held out passes, with a note on what was checked
    held = tmp_path / "held.json"
    held.write_text(json.dumps({**json.loads(ds.read_text()), "pairs": json.loads(ds.read_text())["pairs"][:1],
                                "folds": [["c0"]]}))
    res = runner.invoke(app, ["evaluate", str(held), "--run", str(bare), "--device", "cpu",
                              "--json", str(tmp_path / "h.json")])
    assert res.exit_code == 0 and "checked against what the checkpoints of fold(s) 1 record" in \
        " ".join(res.output.split()), res.output
    # stage 0 has labels but no checkpoint, and says why
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--stage", "0", "--device", "cpu",
                              "--json", str(tmp_path / "s0.json")])
    assert res.exit_code == 2 and "stage 0 trains no network" in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--stage", "-1", "--device", "cpu",
                              "--json", str(tmp_path / "s-1.json")])  # it said "expected fold1/stage-1.pt"
    assert res.exit_code == 2 and "--stage -1: need 0 or more" in res.output, res.output
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--stage", "5", "--device", "cpu",
                              "--json", str(tmp_path / "s5.json")])
    assert res.exit_code == 2 and "this fold has the checkpoints of stage(s) 1, 2" in " ".join(res.output.split())
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--stage", "1", "--device", "cpu",
                              "--json", str(tmp_path / "s1.json")])  # fold 2 is not trained yet
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "no trained stage yet" in said and "--folds N evaluates only" in said, said
    # only fold 1 is trained: the whole dataset is refused with a pointer to --folds, which scores fold 1's pairs
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--device", "cpu", "--json", str(tmp_path / "a.json")])
    assert res.exit_code == 2 and "--folds N evaluates only the pairs of a fold" in " ".join(res.output.split())
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--folds", "1", "--device", "cpu",
                              "--json", str(tmp_path / "f1.json")])
    assert res.exit_code == 0, res.output
    scored = json.loads((tmp_path / "f1.json").read_text())
    assert [c["id"] for c in scored["cases"]] == ["c0"] and scored["folds"] == [1] and "fold 1 only" in scored["method"]
    # an ensemble of two stages' checkpoints records the union of their training pairs
    res = runner.invoke(app, ["ensemble", str(run / "fold1" / "stage1.pt"), str(run / "fold1" / "stage2.pt"),
                              "-o", str(tmp_path / "e.pt")])
    assert res.exit_code == 0 and "records the 2 pairs of tiny" in " ".join(res.output.split()), res.output
    assert sorted(load_checkpoint(tmp_path / "e.pt", kind="cloud")["extra"]["training"]["pairs"]) == ["c1", "c2"]


def test_an_ensemble_keeps_every_members_training_files():
    """Members that call other files by one id keep them all (id, id#2, id#3), and pairs match by content."""
    from cyclereg.clouds.api import _union_training

    members = [{"dataset": "copd", "fold": 1, "pairs": {"c1": {"fixed": f, "moving": m}}}
               for f, m in (("A", "a"), ("B", "b"), ("C", "c"), ("B", "b"))]
    union = _union_training(members, 1)
    assert union["pairs"] == {"c1": {"fixed": "A", "moving": "a"}, "c1#2": {"fixed": "B", "moving": "b"},
                              "c1#3": {"fixed": "C", "moving": "c"}}
    assert _union_training([*members, None], 1) is None  # a member without a record: unknown


def test_full_cycle_smoke_and_evaluate(tmp_path, device):
    ds = _dataset(tmp_path)
    run = tmp_path / "run"
    on = ["--device", device.type]
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST[:-2], *on])
    assert res.exit_code == 0, res.output
    assert (run / "fold1" / "pseudo0.pt").is_file() and (run / "run.json").is_file()
    # two training pairs: the weighting all but drops the harder one, and says so
    assert "note: difficulty-weighted sampling over 2 training pairs" in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", *on])
    assert res.exit_code == 0, res.output
    log = [json.loads(l) for l in (run / "fold1" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0, 1, 2]
    assert all(math.isfinite(r["train_loss_mm"]) for r in log[1:])
    # each finished stage is announced with its logged figures (a log file shows no progress bar)
    said = " ".join(res.output.split())
    for r in log[1:]:
        assert (f"fold 1: stage {r['stage']} finished in " in said and f"train loss {r['train_loss_mm']:.2f} mm" in said
                and f"label disagreement {r['pseudo_label_disagreement_mm']:.2f} mm" in said
                and f"labels moved {r['pseudo_label_change_mm']:.2f} mm" in said), res.output
    # how far the refresh moved the labels: what the stored labels of stages t-1 and t say
    box = CloudRegConfig.from_dict(load_checkpoint(run / "fold1" / "final.pt", kind="cloud")["config"]).training_box
    stored = {t: torch.load(run / "fold1" / f"pseudo{t}.pt", weights_only=True)["labels"] for t in range(3)}
    for t in (1, 2):
        diff = [box.disp_unit_to_mm(stored[t][k] - stored[t - 1][k]).norm(dim=1).mean().item() for k in stored[t]]
        assert log[t]["pseudo_label_change_mm"] == pytest.approx(sum(diff) / len(diff), rel=1e-5)
    assert "pseudo_label_change_mm" not in log[0]
    ck = load_checkpoint(run / "fold1" / "final.pt", kind="cloud")
    assert ck["extra"]["stage"] == 2 and "lbp" in ck["config"]
    # it records what it learnt from: fold 1 held out c0 (ids only; never landmarks)
    training = ck["extra"]["training"]
    assert training["dataset"] == "tiny" and training["fold"] == 1 and sorted(training["pairs"]) == ["c1", "c2"]
    assert training["pairs"]["c1"] == {"fixed": data_fingerprint(tmp_path / "c1" / "fk.csv"),
                                       "moving": data_fingerprint(tmp_path / "c1" / "mk.csv")}
    # trained models register like the pseudo-label stream
    assert ck["config"]["recentre_passes"] == 1 and ck["config"]["tta_passes"] == 4
    # and store the frame they were trained in: no volume box here, so the bounding box of the
    # fold's training clouds (c1, c2; c0 is held out)
    clouds = [read_points(tmp_path / f"c{i}" / name) for i in (1, 2) for name in ("fk.csv", "mk.csv")]
    expected = UnitBox.around(*clouds)
    assert ck["config"]["training_box"] == {"lo_mm": list(expected.lo_mm), "extent_mm": list(expected.extent_mm)}
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--max-pairs", "1", *on,
                              "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["cases"][0]["fold"] == 1


def test_search_options_reach_the_run_config(tmp_path):
    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", "--recentre-passes", "0",
                              "--candidates", "24", "--tta-passes", "1", "--learn-recentre-passes", "2", *FAST])
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "run.json").read_text())["config"]
    assert cfg["refine_recentre_passes"] == 0 and cfg["reg"]["lbp"]["num_candidates"] == 24
    assert cfg["refine_tta_passes"] == 1 and cfg["learn_recentre_passes"] == 2
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "bad2"), "--learn-recentre-passes", "-1", *FAST])
    assert res.exit_code == 2 and "--learn-recentre-passes" in res.output and not (tmp_path / "bad2").exists()
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "bad1"), "--tta-passes", "-2", *FAST])
    assert res.exit_code == 2 and "--tta-passes" in res.output and not (tmp_path / "bad1").exists()
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "bad3"), "--train-points", "10,200",
                              *FAST[:4], "--device", "cpu"])
    assert res.exit_code == 2 and "at least 11 fixed and 10 moving points" in res.output and not (tmp_path / "bad3").exists()
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "bad0"), "--candidates", "0", *FAST])
    assert res.exit_code == 2 and "--candidates" in res.output and not (tmp_path / "bad0").exists()
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "bad"), "--recentre-passes", "-1", *FAST])
    assert res.exit_code == 2 and "--recentre-passes" in res.output and not (tmp_path / "bad").exists()


def test_switches_of_a_given_config_are_kept_unless_overridden(tmp_path):
    """The library's ``config=`` is the base: its ablation switches survive unless an option
    names them, and the CLI's flags set them both ways."""
    from cyclereg.training.api import pretrain_random
    from cyclereg.training.clouds import cycle_config

    off = CloudCycleConfig(augment=False, refine=False, weighted_sampling=False)
    assert cycle_config(base=off) == off
    assert cycle_config(base=off, augment=True).augment and not cycle_config(base=off, augment=True).refine
    assert cycle_config() == CloudCycleConfig()
    ds = _dataset(tmp_path, n=2)
    pretrain_random(ds, tmp_path / "lib", fold="1", device="cpu", config=replace(off, stages=2, epochs=2))
    cfg = json.loads((tmp_path / "lib" / "run.json").read_text())["config"]
    assert (cfg["augment"], cfg["refine"], cfg["weighted_sampling"]) == (False, False, False)
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "cli"), "--fold", "1", "--no-augment",
                              "--no-refine", "--uniform-sampling", *FAST])
    assert res.exit_code == 0, res.output
    cli = json.loads((tmp_path / "cli" / "run.json").read_text())["config"]
    assert (cli["augment"], cli["refine"], cli["weighted_sampling"]) == (False, False, False)
    # without refinement every disagreement is 0 and the weights uniform: no note on two training pairs
    three = _dataset(tmp_path / "three")
    res = runner.invoke(app, ["pretrain-random", str(three), "-o", str(tmp_path / "noref"), "--fold", "1",
                              "--no-refine", *FAST])
    assert res.exit_code == 0 and "difficulty-weighted" not in res.output, res.output


def _reference_and_twin(tmp_path, ds, fold: int, options: list[str]):
    """Two runs ``a`` and ``b`` made by the same ``pretrain-random`` of ``fold``; ``a`` then
    trains uninterrupted (the reference), ``b`` is left for the test to interrupt."""
    for name in ("a", "b"):
        res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / name), "--fold", str(fold), *options])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "a"), "--folds", str(fold)])
    assert res.exit_code == 0, res.output
    return tmp_path / "a", tmp_path / "b"


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, monkeypatch):
    ds = _dataset(tmp_path)
    _reference_and_twin(tmp_path, ds, 2, [*FAST, *CHEAP_LABELS])
    # b: killed during stage 2's training, then the same command again
    real = CloudCycleTask.train_stage

    def dies_in_stage2(self, model, labels, weights, stage, progress=None, snapshot=None):
        if stage == 2:
            raise KeyboardInterrupt
        return real(self, model, labels, weights, stage, progress, snapshot)

    monkeypatch.setattr(CloudCycleTask, "train_stage", dies_in_stage2)
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "b"), "--folds", "2"])
    assert res.exit_code == 130
    assert (tmp_path / "b" / "fold2" / "stage1.pt").is_file() and not (tmp_path / "b" / "fold2" / "stage2.pt").exists()
    stage1 = (tmp_path / "b" / "fold2" / "stage1.pt").read_bytes()
    monkeypatch.setattr(CloudCycleTask, "train_stage", real)
    loaded = []
    real_load = scheduler_mod.load_checkpoint
    monkeypatch.setattr(scheduler_mod, "load_checkpoint", lambda p, **kw: loaded.append(p.name) or real_load(p, **kw))
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "b"), "--folds", "2"]).exit_code == 0
    # stage 2 continued from the saved stage-1 weights (then its own checkpoint is checked before it becomes final.pt)
    assert loaded == ["stage1.pt", "stage2.pt"]
    assert (tmp_path / "b" / "fold2" / "stage1.pt").read_bytes() == stage1  # stage 1 was not redone
    # the resumed run ends exactly where the uninterrupted one does
    assert_same_weights(tmp_path / "a" / "fold2" / "final.pt", tmp_path / "b" / "fold2" / "final.pt")


def test_training_never_reads_landmarks(tmp_path, monkeypatch):
    ds = _dataset(tmp_path, landmarks=False)  # landmark files listed in the JSON but absent
    import cyclereg.pointio as pio

    real = pio.read_points

    def guarded(path, **kw):
        assert "fl.csv" not in str(path) and "ml.csv" not in str(path), "training read a landmark file"
        return real(path, **kw)

    calls = []  # every point file of the dataset is read through pointio.read_points
    monkeypatch.setattr(pio, "read_points", lambda path, **kw: calls.append(str(path)) or guarded(path, **kw))
    run = tmp_path / "run"
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "3", *FAST]).exit_code == 0
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "3", "--stages", "1"])
    assert res.exit_code == 0, res.output
    assert (run / "fold3" / "final.pt").is_file()
    assert any(c.endswith("fk.csv") for c in calls)  # the guard did see the keypoint files


def test_run_directory_of_another_dataset_or_config_is_refused(tmp_path):
    ds = _dataset(tmp_path)
    run = tmp_path / "run"
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST]).exit_code == 0
    other = tmp_path / "other"
    other.mkdir()
    ds2 = _dataset(other, n=2)
    res = runner.invoke(app, ["cycle", str(ds2), "--run", str(run)])
    assert res.exit_code == 2 and "another dataset" in res.output
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", "--no-augment",
                              "--candidates", "24", *FAST])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "another configuration" in said, res.output
    assert "augment: True -> False" in said and "reg.lbp.num_candidates: 64 -> 24" in said  # what differs
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "nowhere")])
    assert res.exit_code == 2
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "2"])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and f"pretrain-random {ds} -o {run} --fold 2" in said, res.output
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "9"])
    assert res.exit_code == 2 and "--folds 9: expected 'all' or 1..3" in res.output
    # another fold into the same run: the options not given (seed included) are the run's
    before = json.loads((run / "run.json").read_text())
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (run / "fold2" / "pseudo0.pt").is_file() and json.loads((run / "run.json").read_text()) == before
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "2", "--seed", "5"])
    assert res.exit_code == 2 and "seed: 0 -> 5" in " ".join(res.output.split()), res.output


def test_stage_summary_names_the_logged_figures():
    line = scheduler_mod.stage_summary({"stage": 3, "seconds": 1264.4, "seconds_this_run": 5.0, "epochs": 60,
                                        "train_loss_mm": 2.0349, "pseudo_label_disagreement_mm": 2.514,
                                        "mean_pseudo_displacement_mm": 10.1, "val_pairs": 1, "val_tre_mm": 3.456})
    assert line == ("stage 3 finished in 0:21:04: train loss 2.03 mm, label disagreement 2.51 mm, "
                    "validation TRE 3.46 mm")
    assert scheduler_mod.stage_summary({"stage": 0, "seconds": 59.6}) == "stage 0 finished in 0:01:00"
    assert (scheduler_mod.stage_summary({"stage": 1, "seconds": 3725, "train_loss_ncc": -0.41237})
            == "stage 1 finished in 1:02:05: train loss (ncc) -0.4124")
    # volumes: the held-out pairs' mean Dice, as status --history shows it
    assert (scheduler_mod.stage_summary({"stage": 2, "seconds": 60, "val_pairs": 2, "val_initial_dice": 0.3,
                                         "val_dice": 0.4123}) == "stage 2 finished in 0:01:00: validation Dice 0.412")


def test_sampling_weights_rank_sigmoid():
    pair = CloudPairData("a", torch.rand(10, 3), torch.rand(10, 3))
    task = CloudCycleTask([pair], UnitBox((0, 0, 0), (1, 1, 1)), CloudCycleConfig(), torch.device("cpu"))
    w = task.sampling_weights({"easy": 0.1, "mid": 1.0, "hard": 5.0})
    assert w["easy"] == pytest.approx(1 / (1 + math.exp(-5)))
    assert w["mid"] == pytest.approx(0.5)
    assert w["hard"] == pytest.approx(1 / (1 + math.exp(5)))


def test_cloud_label_change_is_the_mean_point_distance_in_mm():
    """Two pairs whose labels move by 3-4-0 mm and by 0 mm (a box of 100 x 200 x 50 mm, unit
    frame [-1, 1]): the change is the mean of the per-pair means, 2.5 mm; a pair only one stage
    holds, or whose point count differs, is not compared."""
    box = UnitBox((0.0, 0.0, 0.0), (100.0, 200.0, 50.0))
    pair = CloudPairData("a", torch.rand(4, 3), torch.rand(4, 3))
    task = CloudCycleTask([pair], box, CloudCycleConfig(), torch.device("cpu"))
    step = box.disp_mm_to_unit(torch.tensor([[3.0, 4.0, 0.0]]))
    old = {"a": torch.zeros(4, 3), "b": torch.ones(5, 3), "c": torch.zeros(2, 3), "d": torch.zeros(3, 3)}
    new = {"a": step.expand(4, 3).clone(), "b": torch.ones(5, 3), "c": torch.zeros(3, 3), "e": torch.ones(1, 3)}
    assert task.label_change_mm(old, new) == pytest.approx(2.5, rel=1e-6)
    assert task.label_change_mm(old, {"e": torch.ones(1, 3)}) is None


@pytest.mark.parametrize("kernel", ["r2logr", "r"])
def test_label_refinement_smooths_with_the_configured_spline_kernel(kernel, monkeypatch):
    """The refinement's TPS is the registration's kind of spline (both fits, consistency on)."""
    from cyclereg.clouds import tps as tps_mod
    from cyclereg.training import clouds as clouds_mod

    pair = make_breathing_pair(0, TINY)
    box = UnitBox.around(pair.fixed_mm, pair.moving_mm)
    data = CloudPairData("p", box.mm_to_unit(pair.fixed_mm), box.mm_to_unit(pair.moving_mm))
    base = CloudCycleConfig(refine_consistency=True, refine_tta_passes=0, refine_recentre_passes=0)
    cfg = replace(base, reg=replace(base.reg, tps=replace(base.reg.tps, kernel=kernel)))
    task = CloudCycleTask([data], box, cfg, torch.device("cpu"))
    kernels = []
    real_fit = tps_mod.ThinPlateSpline.fit

    def fit(*a, **kw):
        kernels.append(kw.get("kernel", "default"))
        return real_fit(*a, **kw)

    monkeypatch.setattr(clouds_mod.ThinPlateSpline, "fit", staticmethod(fit))
    task.refine(task.new_model(0), data)
    assert len(kernels) >= 2 and set(kernels) == {kernel}


def test_random_affine_is_scaled_rotation():
    g = torch.Generator().manual_seed(0)
    cfg = CloudCycleConfig()
    for _ in range(5):
        A, t = random_affine(g, cfg, torch.float64)
        s = torch.linalg.det(A) ** (1 / 3)
        assert 1 - cfg.aug_scale - 1e-9 <= s <= 1 + cfg.aug_scale + 1e-9
        torch.testing.assert_close(A @ A.T / s**2, torch.eye(3, dtype=torch.float64))
        assert t.abs().max() <= cfg.aug_translation


def test_trained_models_register_with_the_pseudo_label_refinement():
    from cyclereg.training.clouds import CloudCycleConfig, test_time_config

    cfg = CloudCycleConfig(refine_lbp_iterations=7, refine_tps_regularisation=0.25)
    reg = test_time_config(cfg)
    assert reg.lbp.iterations == 7 and reg.tps.regularisation == 0.25
    assert reg.net == cfg.reg.net and reg.lbp.num_candidates == cfg.reg.lbp.num_candidates
    # the "w/o refinement" ablation is tested like the full method
    assert test_time_config(CloudCycleConfig(refine=False)) == test_time_config(CloudCycleConfig())


def test_validation_tre_is_logged_for_reporting(tmp_path):
    ds = _dataset(tmp_path)
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "2", "--val-pairs", "1", *FAST,
                              *CHEAP_LABELS])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "2", "--stages", "1", "--val-pairs", "1"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (run / "fold2" / "log.jsonl").read_text().splitlines()]
    assert [r["val_pairs"] for r in log] == [1, 1]
    assert all(0.0 <= r["val_tre_mm"] < 50.0 for r in log)
    res = runner.invoke(app, ["status", str(run), "--history"])  # shown where logged, marked as reporting only
    assert res.exit_code == 0 and "val TRE [mm] (reporting)" in res.output
    assert all(f"{r['val_tre_mm']:.3f}" in res.output for r in log)


def test_ensemble_stage_trains_every_member_on_the_ensemble_labels(tmp_path):
    """`scripts/ensemble_stage.py`: two tiny runs -> `cyclereg ensemble` -> one more stage per member
    on the ensemble's pseudo labels, without landmark files; a second call resumes (skips)."""
    ds = _dataset(tmp_path, n=2, landmarks=False)
    for seed in ("0", "1"):
        res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / f"r{seed}"), "--fold", "1",
                                  "--seed", seed, "--stages", "1", "--epochs", "1", "--tta-passes", "0",
                                  "--device", "cpu"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / f"r{seed}"), "--folds", "1", "--device", "cpu"])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ensemble", str(tmp_path / "r0"), str(tmp_path / "r1"), "-o", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    # a network already inside an ensemble source is not taken twice
    res = runner.invoke(app, ["ensemble", str(tmp_path / "e"), str(tmp_path / "r0"), "-o", str(tmp_path / "e3")])
    assert res.exit_code == 2 and "which is already a member" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "e3").exists()
    # an ensemble folder has no stages
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(tmp_path / "e"), "--stage", "1", "--device", "cpu",
                              "--json", str(tmp_path / "es.json")])
    assert res.exit_code == 2 and "keeps no per-stage checkpoints" in " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["status", str(tmp_path / "e")])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "a folder of exported per-fold models" in said and "ensemble.json" in said, said
    mod = load_script("scripts/ensemble_stage.py")
    for member in (0, 1):
        line = json.loads(mod.run_job(tmp_path / "e", tmp_path / "s", ds, 1, member, progress=None))
        assert line["stage"] == 2 and math.isfinite(line["train_loss_mm"])
    assert "done before" in mod.run_job(tmp_path / "e", tmp_path / "s", ds, 1, 0, progress=None)
    # --learner: a run outside the ensemble trains one stage on the same labels
    line = json.loads(mod.run_job(tmp_path / "e", tmp_path / "L", ds, 1, None, tmp_path / "r1", progress=None))
    assert line["member"] == "r1" and line["stage"] == 2
    learned = load_checkpoint(tmp_path / "L" / "r1" / "fold1.pt")
    assert {k: learned["extra"][k] for k in ("stage", "pseudo_labels")} == {
        "stage": 2, "pseudo_labels": f"ensemble {tmp_path / 'e'}/fold1.pt"}
    # it records its training data like a checkpoint of `cycle`: the fold's training pairs by content
    from cyclereg.checkpoint import training_data
    from cyclereg.clouds.api import pairs_in_training
    from cyclereg.datasets import load_keypoint_dataset

    kp = load_keypoint_dataset(ds)
    trained = training_data(learned)
    assert trained is not None and trained["fold"] == 1
    assert trained["pairs"] == training_data(load_checkpoint(tmp_path / "r1" / "fold1" / "final.pt"))["pairs"]
    assert pairs_in_training(kp.pairs, trained) == set(kp.training_ids(1))
    assert (tmp_path / "L" / "r1" / "run.json").read_text() == (tmp_path / "r1" / "run.json").read_text()
    before = load_checkpoint(tmp_path / "r0" / "fold1" / "final.pt")["state_dict"]
    after = load_checkpoint(tmp_path / "s" / "r0" / "fold1.pt")
    assert after["extra"]["stage"] == 2 and (tmp_path / "s" / "r0" / "run.json").is_file()
    assert any(not torch.equal(before[k], after["state_dict"][k]) for k in before)
    # the new checkpoint stores the registration settings `cycle` stores for that run
    assert after["config"] == load_checkpoint(tmp_path / "r0" / "fold1" / "final.pt")["config"]
    # --learn-recentre-passes: the member trains with it, and its written run.json says so
    line = json.loads(mod.run_job(tmp_path / "e", tmp_path / "R", ds, 1, 1, None, 1, progress=None))
    assert line["stage"] == 2 and math.isfinite(line["train_loss_mm"])
    assert json.loads((tmp_path / "R" / "r1" / "run.json").read_text())["config"]["learn_recentre_passes"] == 1
    res = runner.invoke(app, ["ensemble", str(tmp_path / "s" / "r0"), str(tmp_path / "s" / "r1"),
                              "-o", str(tmp_path / "e2")])
    assert res.exit_code == 0, res.output
    assert set(json.loads((tmp_path / "e2" / "ensemble.json").read_text())["training"]) == {
        str(tmp_path / "s" / "r0"), str(tmp_path / "s" / "r1")}
    # --joint: both members train together as one job, each written where `cyclereg ensemble` finds it
    line = json.loads(mod.run_joint_job(tmp_path / "e", tmp_path / "J", ds, 1, 1, 1, progress=None))
    assert line["stage"] == 2 and line["members"] == ["r0", "r1"] and line["joint_configuration"] == "r1"
    assert math.isfinite(line["train_loss_mm"])
    for name in ("r0", "r1"):
        joint = load_checkpoint(tmp_path / "J" / name / "fold1.pt")
        original = load_checkpoint(tmp_path / name / "fold1" / "final.pt")
        assert joint["extra"]["stage"] == 2 and "trained jointly" in joint["extra"]["pseudo_labels"]
        assert joint["config"] == original["config"]
        assert training_data(joint)["pairs"] == training_data(original)["pairs"]
        assert any(not torch.equal(original["state_dict"][k], joint["state_dict"][k]) for k in original["state_dict"])
        assert json.loads((tmp_path / "J" / name / "run.json").read_text())["config"]["learn_recentre_passes"] == 1
    assert not list((tmp_path / "J").glob("*.partial.pt"))
    assert "done before" in mod.run_joint_job(tmp_path / "e", tmp_path / "J", ds, 1, 1, progress=None)


def _kill_at_snapshot(monkeypatch, stage: int, step: int):
    """Make the training loop die (like Ctrl-C) right after writing the snapshot of ``step``
    finished steps of ``stage``."""
    real = scheduler_mod.StageSnapshot.offer

    def offer(self, s, **kw):
        wrote = real(self, s, **kw)
        if self.stage == stage and s == step:
            assert wrote and self.path.is_file()
            raise KeyboardInterrupt
        return wrote

    monkeypatch.setattr(scheduler_mod.StageSnapshot, "offer", offer)
    return real


def test_snapshot_left_by_a_kill_after_the_checkpoint_is_removed(tmp_path, monkeypatch):
    """Killed after a stage's checkpoint and before its snapshot was cleared: the next run uses the
    checkpoint (no training) and removes the stale snapshot, which status would otherwise show."""
    ds = _dataset(tmp_path)
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "b"), "--fold", "1", *FAST, *CHEAP_LABELS])
    assert res.exit_code == 0, res.output
    fold = tmp_path / "b" / "fold1"
    real_clear = scheduler_mod.StageSnapshot.clear

    def dies(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(scheduler_mod.StageSnapshot, "clear", dies)
    cmd = ["cycle", str(ds), "--run", str(tmp_path / "b"), "--folds", "1", "--snapshot-every", "1e-9"]
    assert runner.invoke(app, cmd).exit_code == 130
    assert (fold / "stage1.pt").is_file() and (fold / "stage1.partial.pt").is_file()
    monkeypatch.setattr(scheduler_mod.StageSnapshot, "clear", real_clear)
    trained = []
    real_train = CloudCycleTask.train_stage
    monkeypatch.setattr(CloudCycleTask, "train_stage", lambda self, *a, **kw: trained.append(a[3]) or real_train(self, *a, **kw))
    assert runner.invoke(app, cmd).exit_code == 0
    assert trained == [2] and not list(fold.glob("*.partial.pt"))


def test_stage_killed_halfway_resumes_at_its_snapshot(tmp_path, monkeypatch):
    ds = _dataset(tmp_path)
    _reference_and_twin(tmp_path, ds, 1, [*FAST[:2], "--epochs", "3", *FAST[4:], *CHEAP_LABELS])
    fold = tmp_path / "b" / "fold1"
    real = _kill_at_snapshot(monkeypatch, stage=2, step=2)
    cmd = ["cycle", str(ds), "--run", str(tmp_path / "b"), "--folds", "1", "--snapshot-every", "1e-9"]
    assert runner.invoke(app, cmd).exit_code == 130
    assert (fold / "stage2.partial.pt").is_file() and not (fold / "stage2.pt").exists()
    assert not (fold / "stage1.partial.pt").exists()  # removed once stage 1's checkpoint was written
    before_s = torch.load(fold / "stage2.partial.pt", weights_only=True)["elapsed_s"]
    epochs_run = []  # (stage, finished epochs) at each epoch's end
    monkeypatch.setattr(scheduler_mod.StageSnapshot, "offer",
                        lambda self, s, **kw: epochs_run.append((self.stage, s)) or real(self, s, **kw))
    res = runner.invoke(app, cmd)
    assert res.exit_code == 0, res.output
    assert "resumes after epoch 2/3" in res.output
    assert epochs_run == [(2, 3)]  # only the third epoch of stage 2 was trained again
    assert not list(fold.glob("*.partial.pt"))
    assert_same_weights(tmp_path / "a" / "fold1" / "final.pt", fold / "final.pt")  # bitwise the reference
    log_a = (tmp_path / "a" / "fold1" / "log.jsonl").read_text().splitlines()
    log_b = fold.joinpath("log.jsonl").read_text().splitlines()
    for la, lb in zip(log_a, log_b):
        la, lb = json.loads(la), json.loads(lb)
        assert la.get("train_loss_mm") == lb.get("train_loss_mm") and la["stage"] == lb["stage"]
    # the resumed stage's logged time counts the training before the kill
    stage2 = json.loads(log_b[2])
    assert stage2["stage"] == 2 and stage2["train_seconds"] > before_s > 0
    assert stage2["seconds"] > stage2["train_seconds"] and stage2["seconds_this_run"] < stage2["seconds"]


def test_stage_killed_while_refreshing_labels_is_not_trained_again(tmp_path, monkeypatch):
    """Killed while labelling stage 2's second training pair: the same command neither trains
    stage 2 again nor labels its first pair again, and ends with the uninterrupted run's labels."""
    ds = _dataset(tmp_path)
    _reference_and_twin(tmp_path, ds, 3, [*FAST, *CHEAP_LABELS])  # fold 3 trains on c0, c1
    real_make, real_refine = CloudCycleTask.make_pseudo_labels, CloudCycleTask.refine
    refreshing = []

    def make(self, model, stage, progress=None, **kw):
        refreshing.append(stage)
        return real_make(self, model, stage, progress, **kw)

    def dies_at_c1_of_stage2(self, model, pair, labeller=None):
        if refreshing[-1] == 2 and pair.id == "c1":
            raise KeyboardInterrupt
        return real_refine(self, model, pair, labeller)

    monkeypatch.setattr(CloudCycleTask, "make_pseudo_labels", make)
    monkeypatch.setattr(CloudCycleTask, "refine", dies_at_c1_of_stage2)
    cmd = ["cycle", str(ds), "--run", str(tmp_path / "b"), "--folds", "3"]
    assert runner.invoke(app, cmd).exit_code == 130
    fold = tmp_path / "b" / "fold3"
    assert (fold / "stage2.pt").is_file() and not (fold / "pseudo2.pt").exists()
    assert sorted(p.name for p in (fold / "pseudo2.parts").iterdir()) == ["c0.pt"]
    assert run_status(tmp_path / "b")["folds"][2]["next"] == "stage 2: its pseudo labels (trained), 1 pair labelled"
    labelled, trained = [], []
    monkeypatch.setattr(CloudCycleTask, "refine",
                        lambda self, model, pair, labeller=None: labelled.append(pair.id) or real_refine(self, model, pair, labeller))
    real_train = CloudCycleTask.train_stage
    monkeypatch.setattr(CloudCycleTask, "train_stage", lambda self, *a, **kw: trained.append(a[3]) or real_train(self, *a, **kw))
    assert runner.invoke(app, cmd).exit_code == 0
    assert trained == []  # stage 2's training had finished; only its labels were made again
    assert labelled == ["c1"]  # and of those only the pair that had none
    assert not (fold / "pseudo2.parts").exists()
    log_a = [json.loads(l) for l in (tmp_path / "a" / "fold3" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (fold / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log_b] == [0, 1, 2]
    assert log_b[2]["train_loss_mm"] == log_a[2]["train_loss_mm"]
    for key in ("pseudo_label_disagreement_mm", "mean_pseudo_displacement_mm"):
        assert log_b[2][key] == log_a[2][key]
    a, b = (torch.load(d / "pseudo2.pt", weights_only=True) for d in (tmp_path / "a" / "fold3", fold))
    assert a["weights"] == b["weights"] and a["labels"].keys() == b["labels"].keys()
    for pid in a["labels"]:
        assert torch.equal(a["labels"][pid], b["labels"][pid]), pid


def test_stage_killed_between_its_labels_and_its_log_line_is_logged_on_resume(tmp_path, monkeypatch):
    """The labels make a stage count as finished; a kill before its log line was written used to
    lose the line (status, --history and the time estimate). The next run writes it, once."""
    from cyclereg.training.scheduler import StageScheduler

    ds = _dataset(tmp_path)
    _reference_and_twin(tmp_path, ds, 3, [*FAST, *CHEAP_LABELS])
    real_finish = StageScheduler._finish

    def dies_before_logging_stage1(self, record, progress):
        if record["stage"] == 1:
            raise KeyboardInterrupt
        return real_finish(self, record, progress)

    monkeypatch.setattr(StageScheduler, "_finish", dies_before_logging_stage1)
    cmd = ["cycle", str(ds), "--run", str(tmp_path / "b"), "--folds", "3"]
    assert runner.invoke(app, cmd).exit_code == 130
    fold = tmp_path / "b" / "fold3"
    assert (fold / "pseudo1.pt").is_file()
    assert [json.loads(l)["stage"] for l in (fold / "log.jsonl").read_text().splitlines()] == [0]
    monkeypatch.setattr(StageScheduler, "_finish", real_finish)
    log = fold / "log.jsonl"
    log.write_text("a note someone added\n" + log.read_text())  # passed over, as status does
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "b"), "--folds", "3", "--stages", "1"])
    assert res.exit_code == 0, res.output
    assert "fold 3: stage 1 finished" in " ".join(res.output.split())
    assert runner.invoke(app, cmd).exit_code == 0
    log_a = [json.loads(l) for l in (tmp_path / "a" / "fold3" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (fold / "log.jsonl").read_text().splitlines()[1:]]
    assert [r["stage"] for r in log_b] == [0, 1, 2]
    for key in ("train_loss_mm", "pseudo_label_disagreement_mm"):
        assert [r[key] for r in log_b[1:]] == [r[key] for r in log_a[1:]]
    history = run_status(tmp_path / "b")["folds"][2]["stage_log"]
    assert history[1]["train_loss_mm"] == log_a[1]["train_loss_mm"]


def test_label_parts_belong_to_the_network_that_made_them(tmp_path):
    one, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        other.weight.copy_(one.weight)
        other.bias.copy_(one.bias)
        other.bias[0] += 1e-6
    parts = LabelParts(tmp_path / "pseudo1.parts", one)
    parts.put("c0", {"label": torch.ones(4, 3), "disagreement": 1.5, "magnitude": 2.0})
    got = LabelParts(tmp_path / "pseudo1.parts", one).get("c0")
    assert torch.equal(got["label"], torch.ones(4, 3)) and got["disagreement"] == 1.5
    assert LabelParts(tmp_path / "pseudo1.parts", other).get("c0") is None  # another network: made again
    assert parts.get("c1") is None
    (tmp_path / "pseudo1.parts" / "c1.pt").write_bytes(b"damaged")
    assert parts.get("c1") is None and LabelParts.count_in(tmp_path / "pseudo1.parts") == 2
    for odd in ("a/b", "a_b", "../x"):
        parts.put(odd, {"label": torch.full((1, 3), float(len(odd))), "disagreement": 0.0, "magnitude": 0.0})
    assert all(p.parent == tmp_path / "pseudo1.parts" for p in (tmp_path / "pseudo1.parts").rglob("*.pt"))
    assert LabelParts.count_in(tmp_path / "pseudo1.parts") == 5
    assert parts.get("a/b")["label"][0, 0] == 3.0 and parts.get("../x")["label"][0, 0] == 4.0
    parts.clear()
    assert not (tmp_path / "pseudo1.parts").exists()


def test_training_snapshot_checks(tmp_path):
    snap_path = tmp_path / "stage2.partial.pt"
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2], 0.1)
    g = torch.Generator().manual_seed(0)
    objs = dict(model=net, optimizer=opt, lr_schedule=sched, generator=g)
    off = scheduler_mod.StageSnapshot(snap_path, stage=2, every_s=0)
    assert off.restore(5, **objs) == (0, [])
    assert not off.offer(1, losses=[1.0], **objs) and not snap_path.exists()  # every_s = 0: none written
    snap = scheduler_mod.StageSnapshot(snap_path, stage=2, every_s=1e-9)
    snap.restore(5, **objs)
    assert not snap.offer(5, losses=[1.0] * 5, **objs)  # the stage is over: its checkpoint follows
    assert snap.offer(3, losses=[1.0, 2.0, 3.0], **objs)
    assert scheduler_mod.StageSnapshot(snap_path, stage=2, every_s=60).restore(5, **objs) == (3, [1.0, 2.0, 3.0])
    with pytest.raises(scheduler_mod.InputError, match="stage 2 with 5 steps, expected stage 3 with 5"):
        scheduler_mod.StageSnapshot(snap_path, stage=3, every_s=60).restore(5, **objs)
    with pytest.raises(scheduler_mod.InputError, match="expected stage 2 with 7"):
        scheduler_mod.StageSnapshot(snap_path, stage=2, every_s=60).restore(7, **objs)
    snap_path.write_bytes(b"not a snapshot")
    with pytest.raises(scheduler_mod.InputError, match="unreadable training snapshot") as err:
        scheduler_mod.StageSnapshot(snap_path, stage=2, every_s=60).restore(5, **objs)
    assert str(snap_path) in str(err.value)


def test_snapshot_counts_training_time_across_resumes_and_status_uses_it(tmp_path, monkeypatch):
    """Before any stage >= 1 has finished, `status` estimates from the snapshot's training pace:
    40 s for 4 epochs, killed, 20 s more for 2 epochs after the restart -> 60 s for 6 of 60
    epochs, 600 s per stage, 3 stages to go minus the 60 s spent: 1740 s."""
    import types

    clock = [1000.0]
    monkeypatch.setattr(scheduler_mod, "time", types.SimpleNamespace(monotonic=lambda: clock[0],
                                                                     perf_counter=time.perf_counter))
    fold = tmp_path / "fold1"
    fold.mkdir()
    torch.save({"stage": 0, "labels": {}, "weights": {}}, fold / "pseudo0.pt")
    (fold / "log.jsonl").write_text(json.dumps({"stage": 0, "seconds": 100.0}) + "\n")
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    objs = dict(model=net, optimizer=opt, lr_schedule=torch.optim.lr_scheduler.MultiStepLR(opt, [2], 0.1),
                generator=torch.Generator().manual_seed(0))
    snap = scheduler_mod.StageSnapshot(fold / "stage1.partial.pt", stage=1, every_s=1e-9)
    snap.restore(60, **objs)
    clock[0] += 40
    assert snap.offer(4, losses=[1.0] * 4, **objs)
    clock[0] = 5000.0  # the machine restarts; the clock does not carry over
    snap = scheduler_mod.StageSnapshot(fold / "stage1.partial.pt", stage=1, every_s=1e-9)
    assert snap.restore(60, **objs)[0] == 4
    clock[0] += 20
    assert snap.offer(6, losses=[1.0] * 6, **objs)
    status = scheduler_mod.StageScheduler(None, fold).status(3)
    assert status["next"] == "stage 1: training after step 6/60"
    assert status["current_stage_s"] == pytest.approx(60.0)
    assert status["remaining_s"] == pytest.approx(1740.0)


def test_status_of_a_folder_of_exported_checkpoints_says_so(tmp_path):
    run = tmp_path / "set"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"dataset": "d", "kind": "keypoints", "pairs": ["a", "b"],
                                              "folds": [["a"], ["b"]], "config": {"stages": 5}}))
    (run / "fold1.pt").write_bytes(b"x")
    folds = run_status(run)["folds"]
    assert folds[0]["next"] == "no training here: the exported checkpoint fold1.pt"
    assert folds[1]["next"] == "stage 0 labels (pretrain-random)"  # nothing there at all


def test_status_estimates_at_the_latest_stage_pace(tmp_path):
    """Stages 1 and 2 took 1000 s and 300 s (e.g. a faster code since): three stages of 300 s
    are left, minus the 100 s stage 3 has trained so far."""
    fold = tmp_path / "fold1"
    fold.mkdir()
    for t in range(3):
        torch.save({"stage": t, "labels": {}, "weights": {}}, fold / f"pseudo{t}.pt")
        if t:
            (fold / f"stage{t}.pt").write_bytes(b"checkpoint")
    (fold / "final.pt").write_bytes(b"checkpoint")  # as a run leaves it: a copy of the last stage's checkpoint
    (fold / "log.jsonl").write_text("".join(json.dumps({"stage": t, "seconds": s}) + "\n"
                                            for t, s in ((0, 50.0), (1, 1000.0), (2, 300.0))))
    torch.save({"step": 10, "total_steps": 60, "elapsed_s": 100.0}, fold / "stage3.partial.pt")
    status = scheduler_mod.StageScheduler(None, fold).status(5)
    assert status["finished"] == 2 and status["next"] == "stage 3: training after step 10/60"
    assert status["remaining_s"] == pytest.approx(3 * 300.0 - 100.0)


def test_snapshot_interval_is_checked(tmp_path):
    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST]).exit_code == 0
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--snapshot-every", "-1"])
    assert res.exit_code == 2 and "--snapshot-every" in res.output
    assert not (run / "fold1" / "stage1.pt").exists()


def test_parallel_folds_give_the_sequential_result(tmp_path):
    """`pretrain-random --jobs 2` and `cycle --jobs 2` label and train two folds in worker
    processes, with the sequential run's labels and weights."""
    ds = _dataset(tmp_path, n=2)
    args = ["--stages", "1", "--epochs", "2", "--train-points", "100,200", "--device", "cpu", *CHEAP_LABELS]
    for name, jobs in (("seq", "1"), ("par", "2")):
        res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / name), "--jobs", jobs, *args])
        assert res.exit_code == 0, res.output
    for k in (1, 2):
        seq, par = (torch.load(tmp_path / name / f"fold{k}" / "pseudo0.pt", weights_only=True)
                    for name in ("seq", "par"))
        assert seq["labels"].keys() == par["labels"].keys() and seq["weights"] == par["weights"]
        for pid in seq["labels"]:
            assert torch.equal(seq["labels"][pid], par["labels"][pid]), pid
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "none"), "--jobs", "0", *args])
    assert res.exit_code == 2 and "--jobs" in res.output and not (tmp_path / "none").exists()
    seq = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "seq")])
    assert seq.exit_code == 0, seq.output
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "par"), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "fold 1: 1, fold 2: 1" in res.output
    for out in (seq.output, res.output):  # in turn or in workers, each fold names its finished stage
        said = " ".join(out.split())
        assert "fold 1: stage 1 finished in " in said and "fold 2: stage 1 finished in " in said, out
    for k in (1, 2):
        assert_same_weights(tmp_path / "seq" / f"fold{k}" / "final.pt", tmp_path / "par" / f"fold{k}" / "final.pt")
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "par"), "--jobs", "0"])
    assert res.exit_code == 2 and "--jobs" in res.output
    # a finished run: no worker process is started for folds that have all their stages
    import cyclereg.training.parallel as parallel

    def no_workers(*a, **k):
        raise AssertionError("a worker was started for a finished fold")

    real = parallel.run_parallel
    parallel.run_parallel = no_workers
    try:
        res = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "par"), "--jobs", "2"])
    finally:
        parallel.run_parallel = real
    assert res.exit_code == 0 and "fold 1: 1, fold 2: 1" in res.output, res.output
    assert_same_weights(tmp_path / "seq" / "fold2" / "final.pt", tmp_path / "par" / "fold2" / "final.pt")


def test_a_second_command_on_a_working_fold_is_refused(tmp_path):
    """While one command holds a fold's lock, pretrain-random and cycle on that fold stop at once with
    one line (and leave it alone); other folds of the run can be worked on meanwhile, as separate
    `--folds K` processes do; the lock goes with the command."""
    from cyclereg.training.api import RUN_LOCK, fold_locks

    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    args = ["--stages", "1", "--epochs", "1", "--train-points", "100,200", "--device", "cpu", *CHEAP_LABELS]
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *args]).exit_code == 0
    assert (run / "fold1" / RUN_LOCK).is_file()
    with fold_locks(run, [1]):  # as another process working on fold 1 would (flock locks per open file)
        for cmd in (["cycle", str(ds), "--run", str(run), "--folds", "1"],
                    ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *args]):
            res = runner.invoke(app, cmd)
            said = " ".join(res.output.split())
            assert res.exit_code == 2 and "another cyclereg command (pretrain-random or cycle) is working on this " \
                "fold (1)" in said, said
        assert not (run / "fold1" / "stage1.pt").exists()
        res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "2", *args])
        assert res.exit_code == 0 and (run / "fold2" / "pseudo0.pt").is_file(), res.output
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"]).exit_code == 0
    # a run directory made by a command stopped before it wrote anything is not taken for a foreign folder
    (tmp_path / "fresh" / "fold1").mkdir(parents=True)
    (tmp_path / "fresh" / "fold1" / RUN_LOCK).touch()
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "fresh"), "--fold", "1", *args])
    assert res.exit_code == 0, res.output


def test_pretrain_random_completes_an_interrupted_run(tmp_path):
    """pretrain-random stopped after fold 1 (here: run for fold 1 alone), then the command for all
    folds: fold 1's labels are kept as they were, only fold 2 is labelled."""
    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    args = ["--stages", "1", "--device", "cpu", *CHEAP_LABELS]
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *args])
    assert res.exit_code == 0 and "were kept" not in res.output, res.output  # a new run keeps nothing
    first = (run / "fold1" / "pseudo0.pt").read_bytes()
    assert not (run / "fold2").exists()
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *args])
    assert res.exit_code == 0, res.output
    assert "made now: fold2; the stage-0 labels that were there already were kept: fold1" in " ".join(res.output.split())
    assert (run / "fold1" / "pseudo0.pt").read_bytes() == first
    assert len((run / "fold1" / "log.jsonl").read_text().splitlines()) == 1
    assert (run / "fold2" / "pseudo0.pt").is_file()
    # the same command without --stages keeps the run's number of stages (it was raised to the default)
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *args[2:]])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "run.json").read_text())["config"]["stages"] == 1


def test_pretrain_random_refuses_damaged_stage0_labels_it_would_keep(tmp_path):
    """A truncated pseudo0.pt (e.g. a copy cut short) is not reported as kept: the command names the file
    and fails, leaving it as it was; deleting it and running the command again makes the labels again."""
    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    args = ["--fold", "1", "--stages", "1", "--device", "cpu", *CHEAP_LABELS]
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *args]).exit_code == 0
    labels = run / "fold1" / "pseudo0.pt"
    whole = labels.read_bytes()
    first = torch.load(labels, weights_only=True)["labels"]
    labels.write_bytes(whole[: len(whole) // 2])
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *args])
    assert res.exit_code != 0 and "kept" not in res.output, res.output
    assert "pseudo0.pt" in res.output and "unreadable pseudo labels" in res.output
    assert labels.read_bytes() == whole[: len(whole) // 2]
    torch.save({"labels": [1, 2]}, labels)  # readable, but not what a stage saves
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *args])
    assert res.exit_code != 0 and "not the pseudo labels of a cyclereg stage" in res.output, res.output
    labels.unlink()
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *args])
    assert res.exit_code == 0, res.output
    again = torch.load(labels, weights_only=True)["labels"]  # the same draws: the run's seed
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_status_reports_progress_without_touching_the_run(tmp_path):
    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    args = ["--stages", "2", "--epochs", "2", "--train-points", "100,200", "--device", "cpu", *CHEAP_LABELS]
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *args]).exit_code == 0
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "1"]).exit_code == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
    res = runner.invoke(app, ["status", str(run), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    info = json.loads((tmp_path / "s.json").read_text())
    assert info["stages"] == 2 and info["kind"] == "keypoints"
    f1, f2 = info["folds"]
    log = [json.loads(line) for line in (run / "fold1" / "log.jsonl").read_text().splitlines()]
    assert f1["finished"] == 1 and f1["next"] == "stage 2: training from step 0"
    assert f1["stage_seconds"] == {str(r["stage"]): r["seconds"] for r in log}
    assert f1["remaining_s"] == pytest.approx(log[1]["seconds"])  # one stage left at stage 1's pace
    assert f2["finished"] == -1 and f2["remaining_s"] is None and "pretrain-random" in f2["next"]
    assert f1["stage_log"] == {str(r["stage"]): r for r in log} and f2["stage_log"] == {}
    # --history: each finished stage's logged loss and label disagreement, units in the headers
    res = runner.invoke(app, ["status", str(run), "--history"])
    assert res.exit_code == 0, res.output
    assert "train loss [mm]" in res.output and "label disagreement [mm]" in res.output and "val TRE" not in res.output
    assert f"{log[1]['train_loss_mm']:.3f}" in res.output
    assert all(f"{r['pseudo_label_disagreement_mm']:.3f}" in res.output for r in log)
    assert "labels moved [mm]" in res.output and f"{log[1]['pseudo_label_change_mm']:.3f}" in res.output
    assert f1["unlogged_stages"] == [] and "without a readable line" not in res.output
    # a damaged log: the finished stage whose line is unreadable is named, not silently left out of the time
    text = (run / "fold1" / "log.jsonl").read_text()
    (run / "fold1" / "log.jsonl").write_text(text.splitlines()[0] + "\n" + text.splitlines()[1][:40] + "\n{\"a\":\n")
    res = runner.invoke(app, ["status", str(run)])
    assert res.exit_code == 0 and run_status(run)["folds"][0]["unlogged_stages"] == [1]
    assert "fold 1: stage 1 finished but without a readable line in log.jsonl" in " ".join(res.output.split())
    (run / "fold1" / "log.jsonl").write_text(text)
    torch.save({"step": 1, "total_steps": 2}, run / "fold1" / "stage2.partial.pt")
    status = run_status(run)["folds"][0]
    assert status["next"] == "stage 2: training after step 1/2"
    (run / "fold1" / "stage2.partial.pt").write_bytes(b"damaged")
    assert "unreadable training snapshot" in run_status(run)["folds"][0]["next"]
    trained = load_checkpoint(run / "fold1" / "stage1.pt")  # stage 1's weights, saved as cycle saves a trained stage 2
    save_checkpoint(run / "fold1" / "stage2.pt", kind=trained["kind"], config=trained["config"],
                    state_dict=trained["state_dict"], extra={**trained["extra"], "stage": 2})
    status = run_status(run)["folds"][0]
    assert status["next"] == "stage 2: its pseudo labels (trained)"
    # trained, labels not yet refreshed: the stage's training seconds count (those of stage 1, saved as stage 2)
    stage1 = load_checkpoint(run / "fold1" / "stage1.pt")["extra"]["train"]["train_seconds"]
    assert stage1 > 0 and status["current_stage_s"] == pytest.approx(stage1)
    assert run_status(run, stages=1)["folds"][0]["next"] == "finished"
    res = runner.invoke(app, ["status", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "nowhere: run directory does not exist" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["status", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "empty: not a cyclereg run directory" in res.output


def test_cycle_with_more_stages_extends_a_finished_run_and_status_follows(tmp_path, monkeypatch):
    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    args = ["--stages", "1", "--epochs", "1", "--train-points", "100,200", "--device", "cpu", *CHEAP_LABELS]
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *args]).exit_code == 0
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"]).exit_code == 0
    assert run_status(run)["folds"][0]["next"] == "finished"
    meta = json.loads((run / "run.json").read_text())
    # stopping early (--stages below the record) trains nothing and leaves the record alone
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "1"])
    assert res.exit_code == 0 and json.loads((run / "run.json").read_text()) == meta
    # extending: the new target is recorded before training, so status counts towards it
    real = CloudCycleTask.train_stage
    seen = []

    def interrupted(self, model, labels, weights, stage, progress=None, snapshot=None):
        seen.append(run_status(run))
        raise KeyboardInterrupt

    monkeypatch.setattr(CloudCycleTask, "train_stage", interrupted)
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "3"])
    monkeypatch.setattr(CloudCycleTask, "train_stage", real)
    assert res.exit_code == 130
    assert seen[0]["stages"] == 3 and seen[0]["folds"][0]["finished"] == 1
    assert seen[0]["folds"][0]["next"] == "stage 2: training from step 0"
    extended = json.loads((run / "run.json").read_text())
    assert extended["config"]["stages"] == 3
    assert {**extended, "config": {**extended["config"], "stages": 1}} == meta  # nothing else changed
    # a plain re-run (no --stages) now resumes the extension; pretrain-random again does not shorten it
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *args])
    assert res.exit_code == 0 and "the run has 3 stages already; --stages 1 does not shorten it" in \
        " ".join(res.output.split()), res.output
    assert json.loads((run / "run.json").read_text())["config"]["stages"] == 3
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (run / "fold1" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0, 1, 2, 3]
    assert load_checkpoint(run / "fold1" / "final.pt")["extra"]["stage"] == 3
    assert run_status(run)["folds"][0]["next"] == "finished"


def test_cycle_stop_below_ends_a_fold_whose_labels_settled_and_keeps_the_rule(tmp_path):
    """``cycle --stop-below MM``: a fold stops at the first stage whose refresh moves its labels less
    than MM mm (here any refresh: 1000 mm), the rule is recorded in run.json so that a plain re-run
    (and pretrain-random again) keeps it, status says why the fold is finished, and ``--stop-below 0``
    removes the rule and trains on."""
    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    args = ["--stages", "2", "--epochs", "1", "--train-points", "100,200", "--device", "cpu", *CHEAP_LABELS]
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *args]).exit_code == 0
    bad = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stop-below", "-1"])
    assert bad.exit_code == 2 and "--stop-below -1.0: expected a distance in mm >= 0" in bad.output, bad.output
    assert "stop_below_mm" not in json.loads((run / "run.json").read_text())
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stop-below", "1000"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (run / "fold1" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0, 1]
    said = " ".join(res.output.split())
    assert (f"moved the pseudo labels {log[1]['pseudo_label_change_mm']:.3f} mm < 1000 mm (--stop-below): the labels "
            "have settled; stopping at stage 1") in said, res.output
    assert "finished stages: fold 1: 1" in said
    assert load_checkpoint(run / "fold1" / "final.pt")["extra"]["stage"] == 1
    assert json.loads((run / "run.json").read_text())["stop_below_mm"] == 1000.0
    info = run_status(run)
    assert info["stop_below_mm"] == 1000.0 and info["folds"][0]["next"].startswith("finished: labels settled at stage 1")
    res = runner.invoke(app, ["status", str(run)])
    assert "a fold stops once its labels move < 1000 mm" in " ".join(res.output.split()), res.output
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *args]).exit_code == 0
    assert json.loads((run / "run.json").read_text())["stop_below_mm"] == 1000.0
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"]).exit_code == 0
    assert len((run / "fold1" / "log.jsonl").read_text().splitlines()) == 2  # the recorded rule: no stage 2
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stop-below", "0"])
    assert res.exit_code == 0, res.output
    assert "stop_below_mm" not in json.loads((run / "run.json").read_text())
    log = [json.loads(line) for line in (run / "fold1" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0, 1, 2]
    assert run_status(run)["folds"][0]["next"] == "finished"
    # benchmarks/label_change.py reads the same figures from the stored labels and applies the same rule
    script = load_script("benchmarks/label_change.py")
    curve = script.fold_curve(run / "fold1")
    for t in (1, 2):
        assert curve[t]["pseudo_label_change_mm"] == pytest.approx(log[t]["pseudo_label_change_mm"], rel=1e-5)
    assert script.stop_stage(curve, 1000.0) == 1 and script.stop_stage(curve, 1e-9) is None
    between = (log[1]["pseudo_label_change_mm"] + log[2]["pseudo_label_change_mm"]) / 2
    expected = 2 if log[2]["pseudo_label_change_mm"] < log[1]["pseudo_label_change_mm"] else 1
    assert script.stop_stage(curve, between) == expected


def test_parallel_folds_report_a_failing_fold(tmp_path):
    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    args = ["--stages", "1", "--epochs", "1", "--train-points", "100,200", "--device", "cpu", *CHEAP_LABELS]
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *args]).exit_code == 0
    (run / "fold2" / "stage1.partial.pt").write_bytes(b"damaged")
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--jobs", "2"])
    assert res.exit_code == 2
    assert "stage1.partial.pt" in res.output and "unreadable training snapshot" in res.output


def _learning_inputs(seed=0):
    """A tiny breathing pair in the unit frame and a random network."""
    from cyclereg.clouds.features import build_graph_net

    pair = make_breathing_pair(seed, TINY)
    box = UnitBox.around(pair.fixed_mm, pair.moving_mm, margin=0.05)
    net = build_graph_net(CloudCycleConfig().reg.net, seed=seed)
    return net, box.mm_to_unit(pair.fixed_mm), box.mm_to_unit(pair.moving_mm)


def _small_search(**changes) -> CloudCycleConfig:
    from dataclasses import replace

    base = CloudCycleConfig()
    return replace(base, reg=replace(base.reg, lbp=replace(base.reg.lbp, num_candidates=16)), **changes)


def test_learning_stream_without_recentring_is_the_single_lbp_pass():
    from cyclereg.clouds.lbp import lbp_displacements
    from cyclereg.training.clouds import learning_prediction

    net, f, m = _learning_inputs()
    cfg = _small_search()
    expected = lbp_displacements(f, m, *net.pair(f, m), cfg.reg.lbp)
    assert torch.equal(learning_prediction(net, f, m, cfg), expected)


def test_joint_learning_stream_is_one_lbp_over_the_members_mean_cost_and_trains_every_member():
    from cyclereg.clouds.features import FeatureEnsemble, build_graph_net
    from cyclereg.clouds.lbp import joint_lbp_displacements
    from cyclereg.clouds.pipeline import joint_recentred_displacements, search_centres
    from cyclereg.training.clouds import learning_prediction, test_time_config

    _, f, m = _learning_inputs(2)
    cfg = _small_search(learn_recentre_passes=1)
    ensemble = FeatureEnsemble(cfg.reg.net, 2)
    for i, member in enumerate(ensemble.members):
        member.load_state_dict(build_graph_net(cfg.reg.net, seed=10 + i).state_dict())
    feats = [n.pair(f, m) for n in ensemble.members]
    with torch.no_grad():  # by hand: the joint first pass, smoothed, re-centres the joint pass
        search = test_time_config(cfg)
        first = joint_recentred_displacements(f, m, feats, replace(cfg.reg, tps=search.tps, recentre_passes=0))
        expected = joint_lbp_displacements(f, m, feats, cfg.reg.lbp, centres=search_centres(f, first, search.tps))
    pred = learning_prediction(ensemble, f, m, cfg)
    torch.testing.assert_close(pred, expected)
    # differs from either member alone, and the loss reaches both members
    for member in ensemble.members:
        assert not torch.allclose(pred, learning_prediction(member, f, m, cfg).detach())
    pred.norm(dim=1).mean().backward()
    for member in ensemble.members:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in member.parameters())
    # without a labeller the ensemble's own pseudo labels are joint as well
    task = CloudCycleTask([CloudPairData("p", f, m)], UnitBox((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), cfg,
                          torch.device("cpu"))
    joint_stream = replace(test_time_config(cfg), ensemble_size=2, ensemble_fusion="joint")
    own = task.refine(ensemble, task.pairs[0])[1]
    torch.testing.assert_close(own, task.refine(ensemble, task.pairs[0], labeller=(ensemble, joint_stream))[1])
    averaged = task.refine(ensemble, task.pairs[0], labeller=(ensemble, replace(joint_stream, ensemble_fusion="average")))
    assert (own - averaged[1]).abs().max() > 1e-6


def test_learning_stream_recentring_searches_around_the_smoothed_first_pass_and_keeps_gradients():
    from cyclereg.clouds.lbp import lbp_displacements
    from cyclereg.clouds.tps import ThinPlateSpline
    from cyclereg.training.clouds import learning_prediction, test_time_config

    net, f, m = _learning_inputs(1)
    cfg = _small_search(learn_recentre_passes=1)
    feats = net.pair(f, m)
    with torch.no_grad():  # by hand: first pass, the test-time TPS, then the pass re-centred there
        first = lbp_displacements(f, m, *feats, cfg.reg.lbp)
        tps = test_time_config(cfg).tps
        centres = f + ThinPlateSpline.fit(f, first, regularisation=tps.regularisation, kernel=tps.kernel)(f)
        expected = lbp_displacements(f, m, *feats, cfg.reg.lbp, centres=centres)
    pred = learning_prediction(net, f, m, cfg)
    torch.testing.assert_close(pred, expected)
    assert not torch.allclose(pred, first)  # the search really moved
    pred.norm(dim=1).mean().backward()  # the re-centred pass is differentiable in the network's weights
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="learn_recentre_passes"):
        CloudCycleConfig(learn_recentre_passes=-1)
    # runs written before the setting existed keep the single pass
    assert CloudCycleConfig.from_dict({}).learn_recentre_passes == 0


def test_stage0_error_names_the_network_of_the_stage0_labels(tmp_path):
    """`evaluate --run RUN --stage 0` has no checkpoint to load; its error names the seed with which
    `--model random` builds the network of the run's stage-0 labels (initial_network_seed, not the
    run's seed), and that network is the one the task labels stage 0 with."""
    from cyclereg.clouds.api import fold_checkpoint, load_cloud_model
    from cyclereg.errors import InputError

    cfg = CloudCycleConfig(seed=3)
    (tmp_path / "run.json").write_text(json.dumps({"kind": "keypoints", "config": asdict(cfg)}))
    with pytest.raises(InputError) as err:
        fold_checkpoint(tmp_path, 1, stage=0)
    said = str(err.value)
    assert "'--model random --seed 3000'" in said, said
    named, _ = load_cloud_model("random", seed=3000)
    task = CloudCycleTask([CloudPairData("x", torch.zeros(1, 3), torch.zeros(1, 3))], UnitBox.around(torch.zeros(1, 3)),
                          cfg, torch.device("cpu"))
    want = task.new_model(0).state_dict()
    assert named.state_dict().keys() == want.keys()
    assert all(torch.equal(named.state_dict()[n], want[n]) for n in want)
    # another network setting than the default: no seed is named, since --model random would not build it
    other = replace(cfg, reg=replace(cfg.reg, net=replace(cfg.reg.net, k_fixed=cfg.reg.net.k_fixed + 1)))
    (tmp_path / "run.json").write_text(json.dumps({"kind": "keypoints", "config": asdict(other)}))
    with pytest.raises(InputError, match="default settings, not this run's"):
        fold_checkpoint(tmp_path, 1, stage=0)


def test_run_model_set_exports_a_stage_of_every_fold(tmp_path):
    """`scripts/run_model_set.py`: final / stage-T / stage-0 model sets of a run, each fold's
    file the run's own checkpoint (stage 0: the network the scheduler labels stage 0 with, with
    the stage-1 settings); a missing stage or an existing output writes nothing."""
    import os

    from cyclereg.errors import InputError

    ds = _dataset(tmp_path, n=2, landmarks=False)
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "all", "--stages", "1",
                              "--epochs", "1", "--train-points", "100,200", *CHEAP_LABELS, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "all", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    mod = load_script("scripts/run_model_set.py")

    old_mask = os.umask(0o022)
    try:  # a folder that does not exist yet is made beside the output; the set gets a plain folder's permissions
        assert mod.main([str(run), "-o", str(tmp_path / "sets" / "final")]) == 0
    finally:
        os.umask(old_mask)
    assert (tmp_path / "sets" / "final").stat().st_mode & 0o777 == 0o755
    assert [p.name for p in (tmp_path / "sets").iterdir()] == ["final"]
    (tmp_path / "sets" / "final").rename(tmp_path / "final")
    assert mod.main([str(run), "-o", str(tmp_path / "s1"), "--stage", "1"]) == 0
    assert mod.main([str(run), "-o", str(tmp_path / "s0"), "--stage", "0"]) == 0
    cfg = CloudCycleConfig.from_dict(json.loads((run / "run.json").read_text())["config"])
    stage0 = CloudCycleTask([CloudPairData("x", torch.zeros(1, 3), torch.zeros(1, 3))], UnitBox.around(torch.zeros(1, 3)),
                            cfg, torch.device("cpu")).new_model(0).state_dict()
    for k in (1, 2):
        src = load_checkpoint(run / f"fold{k}" / "final.pt", kind="cloud")
        for name in ("final", "s1"):
            got = load_checkpoint(tmp_path / name / f"fold{k}.pt", kind="cloud")
            assert got["config"] == src["config"] and got["extra"] == src["extra"]
            assert all(torch.equal(got["state_dict"][n], src["state_dict"][n]) for n in src["state_dict"])
        got = load_checkpoint(tmp_path / "s0" / f"fold{k}.pt", kind="cloud")
        assert got["config"] == src["config"] and got["extra"]["stage"] == 0
        assert got["state_dict"].keys() == stage0.keys()
        assert all(torch.equal(got["state_dict"][n], stage0[n]) for n in stage0)
        assert any(not torch.equal(got["state_dict"][n], src["state_dict"][n]) for n in stage0)
    info = json.loads((tmp_path / "s0" / "model_set.json").read_text())
    assert info["stage"] == 0 and set(info["folds"]) == {"fold1", "fold2"}
    with pytest.raises(InputError, match="already exists"):
        mod.export(run, tmp_path / "final")
    with pytest.raises(InputError, match="no stage2.pt in 2 of 2 folds"):
        mod.export(run, tmp_path / "s2", 2)
    assert not (tmp_path / "s2").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_pair_graphs_are_those_of_every_similarity_transformed_copy():
    from cyclereg.clouds.augment import apply_affine
    from cyclereg.clouds.graphs import PairGraphs, is_similarity

    f, m = torch.rand(200, 3, dtype=torch.float64), torch.rand(450, 3, dtype=torch.float64)
    cfg = _small_search()
    graphs = PairGraphs.build(f, m, cfg.reg.net, cfg.reg.lbp)
    assert graphs.fixed_edges.shape == (2, 200 * cfg.reg.net.k_fixed)
    assert graphs.candidates.shape == (200, 16)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        A, t = random_affine(g, replace(cfg, aug_rotation_deg=30.0, aug_scale=0.3), torch.float64)
        assert is_similarity(A)
        moved = PairGraphs.build(apply_affine(f, A, t), apply_affine(m, A, t), cfg.reg.net, cfg.reg.lbp)
        for name in ("fixed_edges", "moving_edges", "lbp_edges", "lbp_reverse", "candidates"):
            assert torch.equal(getattr(moved, name), getattr(graphs, name)), name
    # a stretch along one axis changes neighbourhoods, and is_similarity says so
    stretch = torch.diag(torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64))
    assert not is_similarity(stretch) and not is_similarity(torch.zeros(3, 3))
    stretched = PairGraphs.build(f @ stretch, m @ stretch, cfg.reg.net, cfg.reg.lbp)
    assert not torch.equal(stretched.candidates, graphs.candidates)
    with pytest.raises(ValueError, match="moving: expected"):
        PairGraphs.build(f, m[:, :2], cfg.reg.net, cfg.reg.lbp)
    from cyclereg.clouds.features import build_graph_net
    with pytest.raises(ValueError, match=r"edge_index \(2, \d+\) \(torch.int64\): expected \(2, E\) int64 indices 0..199 of the 200 points"):
        build_graph_net(cfg.reg.net, seed=0).pair(f.float(), m.float(), (graphs.moving_edges, graphs.fixed_edges))


@pytest.mark.parametrize("learn_recentre_passes", [0, 1])
def test_learning_stream_with_prebuilt_graphs_is_the_searching_one(learn_recentre_passes):
    from cyclereg.clouds.augment import apply_affine
    from cyclereg.clouds.graphs import PairGraphs
    from cyclereg.clouds.lbp import candidates
    from cyclereg.training.clouds import learning_prediction

    net, f, m = _learning_inputs(4)
    cfg = _small_search(learn_recentre_passes=learn_recentre_passes)
    graphs = PairGraphs.build(f, m, cfg.reg.net, cfg.reg.lbp)  # built before the transform
    A, t = random_affine(torch.Generator().manual_seed(1), cfg)
    fa, ma = apply_affine(f, A, t), apply_affine(m, A, t)
    searched = learning_prediction(net, fa, ma, cfg)
    searched.norm(dim=1).mean().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    reused = learning_prediction(net, fa, ma, cfg, graphs=graphs)
    reused.norm(dim=1).mean().backward()
    torch.testing.assert_close(reused, searched)
    for a, b in zip(grads, (p.grad for p in net.parameters())):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"idx \(150, 8\): expected \(150, 16\)"):
        candidates(f, m, 16, idx=graphs.candidates[:, :8])


def test_training_on_whole_clouds_reuses_their_graphs_with_the_same_result(monkeypatch):
    import cyclereg.training.clouds as training_clouds
    from cyclereg.clouds.features import build_graph_net

    pairs = []
    for i in range(2):
        pair = make_breathing_pair(i, TINY)
        box = UnitBox.around(pair.fixed_mm, pair.moving_mm, margin=0.05)
        pairs.append(CloudPairData(f"p{i}", box.mm_to_unit(pair.fixed_mm), box.mm_to_unit(pair.moving_mm)))
    cfg = replace(_small_search(learn_recentre_passes=1), epochs=3, batch_size=2)
    labels = {p.id: 0.01 * torch.ones_like(p.fixed) for p in pairs}
    builds = []
    real_build = training_clouds.PairGraphs.build
    monkeypatch.setattr(training_clouds.PairGraphs, "build",
                        staticmethod(lambda *a: builds.append(1) or real_build(*a)))
    results = []
    for reuse in (True, False):
        task = CloudCycleTask(pairs, box, cfg, torch.device("cpu"))
        if not reuse:  # every sample searches its transformed clouds, as before graphs were kept
            task.pair_graphs = lambda pair: None
        net = build_graph_net(cfg.reg.net, seed=0)
        log = task.train_stage(net, labels, {}, 1)
        results.append((log["train_loss_mm"], net.state_dict()))
    assert 1 <= len(builds) <= len(pairs)  # once per pair drawn, not per sample (6 samples here)
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    # the same weights up to rounding: neighbours at near-equal distances (in these clouds e.g.
    # 0.2335162 and 0.2335165) may come in another order, which changes float sums in the last bits; Adam's
    # normalised steps enlarge that where a gradient is ~0, up to one step (lr) per parameter
    start = build_graph_net(cfg.reg.net, seed=0).state_dict()
    moved = max((v - start[k]).abs().max().item() for k, v in results[0][1].items())
    differ = max((v - results[1][1][k]).abs().max().item() for k, v in results[0][1].items())
    assert moved > 2 * cfg.lr and differ < cfg.lr
    # random subsets build their own graphs: nothing is kept for them
    task = CloudCycleTask(pairs, box, replace(cfg, epochs=1, train_fixed_points=100, train_moving_points=200),
                          torch.device("cpu"))
    task.train_stage(build_graph_net(cfg.reg.net, seed=0), labels, {}, 1)
    assert task._graphs == {}


def test_a_fold_that_holds_out_every_pair_is_refused_before_any_work(tmp_path):
    ds = _dataset(tmp_path, n=2)
    meta = json.loads(ds.read_text())
    meta["folds"] = [["c0", "c1"]]
    ds.write_text(json.dumps(meta))
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 2 and "fold 1 holds out every pair of the dataset" in " ".join(res.output.split()), \
        res.output
    assert str(ds) in res.output and not (tmp_path / "run").exists()


def test_fold_and_folds_are_one_option_in_every_training_and_evaluation_command(tmp_path):
    """pretrain-random names it --fold, cycle and evaluate --folds (the issue's spelling); each takes
    the other spelling too (a fold that does not exist shows that the value arrived)."""
    ds = _dataset(tmp_path, n=2)
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), "--folds", "1", "--device", "cpu"])
    assert res.exit_code == 0 and [p.name for p in (tmp_path / "run").glob("fold*")] == ["fold1"], res.output
    for command in (["pretrain-random", str(ds), "-o", str(tmp_path / "run")],
                    ["cycle", str(ds), "--run", str(tmp_path / "run")],
                    ["evaluate", str(ds), "--identity", "--json", str(tmp_path / "r.json")]):
        said = set()
        for flag in ("--fold", "--folds"):
            res = runner.invoke(app, [*command, flag, "7"])
            assert res.exit_code == 2 and "7" in res.output, (command, flag, res.output)
            said.add(" ".join(res.output.split()).replace("--folds", "--fold"))
        assert len(said) == 1, said


def test_pretrain_random_into_a_file_is_a_one_line_error(tmp_path):
    ds = _dataset(tmp_path, n=2)
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "afile"), "--device", "cpu"])
    assert res.exit_code == 2 and "afile: exists and is not a folder" in res.output, res.output  # was 'Not a directory'
    assert (tmp_path / "afile").read_text() == "x"


def test_relative_augmentation_maps_the_true_displacement_back_exactly():
    """A known motion ``u`` through ``A, t`` for both clouds and a further ``R, c`` for the moving
    one: the displacement of the augmented pair maps back to ``u`` (and with ``R = I``, ``c = 0``
    the map is the common-transform one)."""
    from cyclereg.clouds.augment import (apply_affine, displacements_back, displacements_back_relative,
                                         random_relative_affine)

    g = torch.Generator().manual_seed(3)
    f = torch.rand(50, 3, generator=g, dtype=torch.float64) * 2 - 1
    u = 0.1 * torch.randn(50, 3, generator=g, dtype=torch.float64)
    A, t = random_affine(g, CloudCycleConfig(), dtype=torch.float64)
    R, c = random_relative_affine(g, 0.05, dtype=torch.float64)
    assert not torch.allclose(R, torch.eye(3, dtype=torch.float64)) and (c.abs() > 0).all()
    fa = apply_affine(f, A, t)
    target = apply_affine(apply_affine(f + u, A, t), R, c)  # where f's partner is in the moving cloud now
    back = displacements_back_relative(target - fa, fa, A, R, c)
    torch.testing.assert_close(back, u, rtol=0, atol=1e-12)
    eye, zero = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(displacements_back_relative(u, fa, A, eye, zero), displacements_back(u, A))
    # a pure translation c shifts every partner by c: the right answer is u, not u - c
    shifted = apply_affine(f + u, A, t) + torch.tensor([0.2, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(displacements_back_relative(shifted - fa, fa, A, eye, torch.tensor([0.2, 0.0, 0.0],
                               dtype=torch.float64)), u, rtol=0, atol=1e-12)


def test_relative_augmentation_rebuilds_only_the_graphs_it_changes():
    from cyclereg.clouds.augment import apply_affine, random_relative_affine
    from cyclereg.clouds.graphs import PairGraphs
    from cyclereg.training.clouds import learning_prediction

    net, f, m = _learning_inputs(2)
    cfg = _small_search(learn_recentre_passes=1)
    graphs = PairGraphs.build(f, m, cfg.reg.net, cfg.reg.lbp)
    R, c = random_relative_affine(torch.Generator().manual_seed(0), 0.1)
    mr = apply_affine(m, R, c)
    kept = graphs.moving_changed(f, mr, cfg.reg.net, cfg.reg.lbp)
    fresh = PairGraphs.build(f, mr, cfg.reg.net, cfg.reg.lbp)
    for name in ("fixed_edges", "moving_edges", "lbp_edges", "lbp_reverse", "candidates"):
        assert torch.equal(getattr(kept, name), getattr(fresh, name)), name
    assert not torch.equal(kept.candidates, graphs.candidates)  # the shear moved the candidates
    torch.testing.assert_close(learning_prediction(net, f, mr, cfg, graphs=kept), learning_prediction(net, f, mr, cfg))


def test_relative_augmentation_trains_and_is_refused_out_of_range(tmp_path):
    from cyclereg.clouds.features import build_graph_net

    with pytest.raises(ValueError, match="aug_relative_std"):
        CloudCycleConfig(aug_relative_std=float("nan"))
    with pytest.raises(ValueError, match="aug_relative_std"):
        CloudCycleConfig(aug_relative_std=-0.01)
    # the default is the adopted 0.05; a run.json or checkpoint written before the key existed keeps 0 (off)
    assert CloudCycleConfig().aug_relative_std == 0.05 and CloudCycleConfig.from_dict({}).aug_relative_std == 0.0
    # the stage trains on whole clouds (kept graphs) and on subsets (searched), and the draws differ from a run without
    pairs = []
    for i in range(2):
        pair = make_breathing_pair(i, TINY)
        box = UnitBox.around(pair.fixed_mm, pair.moving_mm, margin=0.05)
        pairs.append(CloudPairData(f"p{i}", box.mm_to_unit(pair.fixed_mm), box.mm_to_unit(pair.moving_mm)))
    labels = {p.id: 0.01 * torch.ones_like(p.fixed) for p in pairs}
    losses = {}
    for std in (0.0, 0.05):
        for subset in (None, 100):
            cfg = replace(_small_search(aug_relative_std=std), epochs=2, batch_size=2, train_fixed_points=subset,
                          train_moving_points=None if subset is None else 200)
            task = CloudCycleTask(pairs, box, cfg, torch.device("cpu"))
            losses[std, subset] = task.train_stage(build_graph_net(cfg.reg.net, seed=0), labels, {}, 1)["train_loss_mm"]
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[0.05, None] != losses[0.0, None]
    # the CLI: written into the run, refused out of range, only for keypoint datasets
    ds = _dataset(tmp_path, n=2)
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), "--fold", "1",
                              *CHEAP_LABELS, *FAST])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["aug_relative_std"] == 0.05
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "off"), "--fold", "1",
                              "--aug-relative", "0", *CHEAP_LABELS, *FAST])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "off" / "run.json").read_text())["config"]["aug_relative_std"] == 0.0
    for bad in ("-0.1", "nan", "1"):
        res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "bad"), "--aug-relative", bad, *FAST])
        assert res.exit_code == 2 and "--aug-relative" in res.output and not (tmp_path / "bad").exists(), res.output
    # a run's setting is fixed when it is made: cycle has no such option (it must not be accepted and ignored)
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(tmp_path / "run"), "--aug-relative", "0.5"])
    assert res.exit_code == 2 and "No such option" in res.output


def test_a_run_json_of_a_foreign_shape_is_one_line_not_a_traceback(tmp_path):
    """Valid JSON that is not a run record (a list, no configuration, an unknown setting, a bad stage
    count): `cycle`, `status` and `pretrain-random` into the run name run.json in one line, exit 2."""
    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *CHEAP_LABELS, *FAST])
    assert res.exit_code == 0, res.output
    good = json.loads((run / "run.json").read_text())
    no_config = {k: v for k, v in good.items() if k != "config"}
    bogus = {**good, "config": {**good["config"], "bogus": 1}}
    zero = {**good, "config": {**good["config"], "stages": 0}}
    rule = {**good, "stop_below_mm": "0.2"}  # a stopping rule must be a number of mm
    endless = {**good, "stop_below_mm": float("inf")}  # and finite: Infinity (json.dumps writes it) stopped every fold
    for broken in ([], no_config, bogus, zero, {**good, "kind": "images"}, rule, endless):
        (run / "run.json").write_text(json.dumps(broken))
        for args in (["cycle", str(ds), "--run", str(run), "--device", "cpu"], ["status", str(run)],
                     ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *CHEAP_LABELS, *FAST]):
            res = runner.invoke(app, args)
            assert res.exit_code == 2 and "run.json" in res.output and "Traceback" not in res.output, (broken, args,
                                                                                                     res.output)
    # a log line written by hand with a NaN time: status shows no time there instead of a traceback
    (run / "run.json").write_text(json.dumps(good))
    with (run / "fold1" / "log.jsonl").open("a") as fh:
        fh.write(json.dumps({"stage": 1, "seconds": float("nan")}) + "\n")
    res = runner.invoke(app, ["status", str(run)])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output


def test_pretrain_random_resumes_after_a_kill_in_its_first_run_json_write(tmp_path):
    """A kill -9 between the temporary file of the first run.json and its rename leaves
    ``.run.json.XXXX.tmp`` beside the lock: the same command then makes the run (and removes the
    leftover) instead of calling the directory foreign; a file of the user's still counts."""
    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".cyclereg.lock").write_text("")
    (run / ".run.json.k3j2x9.tmp").write_text('{"half')
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *CHEAP_LABELS, *FAST])
    assert res.exit_code == 0, res.output
    assert (run / "fold1" / "pseudo0.pt").is_file() and not list(run.glob(".run.json.*.tmp"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.tmp").write_text("mine")
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(other), "--fold", "1", *CHEAP_LABELS, *FAST])
    assert res.exit_code == 2 and "not a cyclereg run" in res.output


def test_evaluate_outputs_never_overwrite_the_files_the_dataset_lists(tmp_path):
    """--json onto a pair's keypoint file, --errors-csv onto a landmark file the command itself reads:
    refused by name before any work, the files unchanged."""
    ds = _dataset(tmp_path, n=2)
    for flag, target in (("--json", tmp_path / "c1" / "mk.csv"), ("--errors-csv", tmp_path / "c0" / "fl.csv")):
        before = target.read_bytes()
        args = ["evaluate", str(ds), "--identity", flag, str(target)]
        if flag == "--errors-csv":
            args += ["--json", str(tmp_path / "r.json")]
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and target.name in res.output and "of pair" in res.output, res.output
        assert target.read_bytes() == before and not (tmp_path / "r.json").exists()


def test_log_lines_are_strict_json_with_a_diverged_loss_as_null(tmp_path):
    """A stage whose loss diverged (NaN) is logged as null, not as Python's NaN token that jq and other
    JSON readers refuse; the stage line and the stage log still read it."""
    fold = tmp_path / "fold1"
    fold.mkdir()
    sched = scheduler_mod.StageScheduler(None, fold)
    sched._log({"stage": 1, "seconds": 12.0, "train_loss_mm": float("nan"), "pseudo_label_disagreement_mm": 2.5})
    line = (fold / "log.jsonl").read_text().strip()
    assert "NaN" not in line
    record = json.loads(line)
    assert record["train_loss_mm"] is None and record["pseudo_label_disagreement_mm"] == 2.5
    assert sched._stage_log()[1]["seconds"] == 12.0
    assert scheduler_mod.stage_summary(record) == "stage 1 finished in 0:00:12: label disagreement 2.50 mm"


def test_evaluate_with_a_run_of_volume_data_names_the_mismatch(tmp_path):
    """A volume run given for a keypoint dataset: said so, not 'no checkpoint for fold 1 ... --folds N'."""
    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "vrun"
    (run / "all").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"kind": "volumes", "folds": [], "config": {"stages": 1}}))
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "a run of a volume dataset, and this is a keypoint dataset" in res.output, res.output
    assert not (tmp_path / "r.json").exists()


def test_pretrain_random_takes_folds_as_the_command_does_and_names_a_misspelt_option(tmp_path):
    """`pretrain_random(folds="1")` (the command's --folds, run_cycle's keyword) was refused as "not an
    option for keypoints datasets", and so was any misspelt keyword, as if it were a volume option."""
    from cyclereg.errors import InputError
    from cyclereg.training.api import pretrain_random

    ds = _dataset(tmp_path, n=2)
    off = CloudCycleConfig(refine=False, stages=1, epochs=1)
    pretrain_random(ds, tmp_path / "a", folds=2, device="cpu", config=off)
    assert sorted(p.name for p in (tmp_path / "a").glob("fold*")) == ["fold2"]
    with pytest.raises(InputError, match="give fold or folds, not both"):
        pretrain_random(ds, tmp_path / "b", fold="1", folds="1", device="cpu", config=off)
    with pytest.raises(InputError, match=r"unknown option\(s\) epoch; the options are .*epochs"):
        pretrain_random(ds, tmp_path / "c", device="cpu", config=off, epoch=3)
    with pytest.raises(InputError, match="--cpu-bf16: not an option for keypoint datasets"):
        pretrain_random(ds, tmp_path / "d", device="cpu", config=off, cpu_bf16=True)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_pretrain_random_takes_only_true_or_false_for_its_switches(tmp_path):
    """A library caller's `augment="no"` counted as on (any non-empty string is true) and trained with
    augmentation; the on/off options take True or False, named by the command's flags, before any work."""
    from cyclereg.errors import InputError
    from cyclereg.training.api import pretrain_random

    ds = _dataset(tmp_path, n=2)
    off = CloudCycleConfig(refine=False, stages=1, epochs=1)
    cases = {"augment": ("no", "--augment/--no-augment 'no'"), "refine": (0, "--refine/--no-refine 0"),
             "weighted_sampling": ("False", "--weighted-sampling/--uniform-sampling 'False'")}
    for key, (value, shown) in cases.items():
        with pytest.raises(InputError, match=re.escape(f"{shown}: expected True or False")):
            pretrain_random(ds, tmp_path / key, fold="1", device="cpu", config=off, **{key: value})
        assert not (tmp_path / key).exists()
    pretrain_random(ds, tmp_path / "ok", fold="1", device="cpu", config=off, augment=False)
    assert json.loads((tmp_path / "ok" / "run.json").read_text())["config"]["augment"] is False


def test_stage_one_starts_from_another_random_network_than_stage_zero():
    """Paper Sec. 2.2: stage 1 starts from a new random initialisation, not stage 0's network (the one that
    made the stage-0 labels); every later stage without previous weights would start from stage 1's."""
    from cyclereg.training.clouds import initial_network
    from cyclereg.training.scheduler import initial_network_seed

    cfg = CloudCycleConfig()
    assert initial_network_seed(cfg.seed, 0) != initial_network_seed(cfg.seed, 1)
    assert initial_network_seed(cfg.seed, 1) == initial_network_seed(cfg.seed, 2)
    assert initial_network_seed(1, 0) != initial_network_seed(0, 0)  # the run's seed matters too
    zero, one = initial_network(cfg, 0).state_dict(), initial_network(cfg, 1).state_dict()
    weights = [name for name, t in zero.items() if t.is_floating_point() and t.numel() > 1 and t.std() > 0]
    assert weights and all(not torch.equal(zero[name], one[name]) for name in weights)
    again = initial_network(cfg, 0).state_dict()  # and each is reproducible
    assert all(torch.equal(zero[name], again[name]) for name in zero)


def _one_pair_task(config, extent_mm=(2.0, 2.0, 2.0)):
    """A task with one random pair (60 fixed, 80 moving points in the unit frame) in a box of ``extent_mm``."""
    from cyclereg.training.clouds import CloudCycleTask

    g = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(60, 3, generator=g) * 2 - 1, torch.rand(80, 3, generator=g) * 2 - 1
    return CloudCycleTask([CloudPairData("p", fixed, moving)], UnitBox((0.0, 0.0, 0.0), extent_mm), config,
                          torch.device("cpu"))


def _predict_zero(monkeypatch):
    """The learning stream predicts 0 (still in the network's gradient graph)."""
    import cyclereg.training.clouds as clouds

    monkeypatch.setattr(clouds, "learning_prediction", lambda model, fixed, *a, **k: (
        torch.zeros_like(fixed) + 0 * sum(p.sum() for p in model.parameters())))


def test_the_training_loss_is_the_mean_distance_in_mm(monkeypatch):
    """Labels of (0.03, 0, 0.04) in the unit frame of a box with half extents (100, 50, 25) mm are (3, 0, 1)
    mm; against a prediction of 0 the loss is sqrt(10) mm (0.05 if measured in the unit frame)."""
    from cyclereg.clouds.features import build_graph_net

    _predict_zero(monkeypatch)
    cfg = replace(CloudCycleConfig(), epochs=1, batch_size=1, augment=False)
    task = _one_pair_task(cfg, extent_mm=(200.0, 100.0, 50.0))
    labels = {"p": torch.tensor([0.03, 0.0, 0.04]).expand(60, 3).clone()}
    stats = task.train_stage(build_graph_net(cfg.reg.net, seed=0), labels, {}, 1)
    assert stats["train_loss_mm"] == pytest.approx(math.sqrt(10.0), rel=1e-5)


@pytest.mark.parametrize("relative", [0.0, 0.05])
def test_augmented_predictions_are_mapped_back_before_the_loss(monkeypatch, relative):
    """A learning stream that predicts the true displacement of whatever (augmented) pair it is shown has
    zero loss against the true labels: the augmented prediction goes back to the original frame (A^-1, and
    the relative map of the moving cloud) before it is compared. Moving = fixed + u in the same point order."""
    from cyclereg.clouds.features import build_graph_net
    import cyclereg.training.clouds as clouds

    monkeypatch.setattr(clouds, "learning_prediction", lambda model, fixed, moving, *a, **k: (
        moving - fixed + 0 * sum(p.sum() for p in model.parameters())))
    cfg = replace(CloudCycleConfig(), epochs=1, batch_size=1, augment=True, aug_relative_std=relative)
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(60, 3, generator=g) * 2 - 1
    u = torch.tensor([0.03, 0.0, 0.04])
    task = CloudCycleTask([CloudPairData("p", fixed, fixed + u)], UnitBox((0.0, 0.0, 0.0), (200.0, 100.0, 50.0)),
                          cfg, torch.device("cpu"))
    stats = task.train_stage(build_graph_net(cfg.reg.net, seed=0), {"p": u.expand(60, 3).clone()}, {}, 1)
    assert stats["train_loss_mm"] == pytest.approx(0.0, abs=1e-4)


def test_the_learning_rate_drops_tenfold_at_each_milestone(monkeypatch):
    """lr 1e-3 decayed x0.1 after epochs 1 and 2 of 3 (one step per epoch): the snapshot sees 1e-4, 1e-5,
    1e-5 after the three steps (warm restart: each stage starts again at 1e-3)."""
    from cyclereg.clouds.features import build_graph_net

    _predict_zero(monkeypatch)
    cfg = replace(CloudCycleConfig(), epochs=3, lr_milestones=(1, 2), batch_size=1, augment=False)

    for stage in (1, 2):
        spy = LearningRateSpy()
        _one_pair_task(cfg).train_stage(build_graph_net(cfg.reg.net, seed=0), {"p": torch.zeros(60, 3)}, {},
                                        stage, snapshot=spy)
        assert spy.lrs == pytest.approx([1e-4, 1e-5, 1e-5])


def test_fewer_epochs_scale_the_learning_rate_milestones():
    """The paper's 40 and 52 of 60 epochs, scaled with --epochs."""
    from cyclereg.training.clouds import cycle_config

    assert cycle_config().lr_milestones == (40, 52)
    assert cycle_config(epochs=6).lr_milestones == (4, 5)
    assert cycle_config(epochs=120).lr_milestones == (80, 104)


def test_uniform_sampling_gives_every_pair_the_same_weight():
    """Weighted sampling (paper Sec. 2.3.1): pairs ranked by disagreement get sigmoid weights with arguments
    from 5 (lowest disagreement) to -5 (highest), so of two pairs sigmoid(5) and sigmoid(-5);
    --uniform-sampling: 1 for every pair."""
    on = _one_pair_task(CloudCycleConfig()).sampling_weights({"a": 1.0, "b": 5.0})
    assert on["a"] == pytest.approx(1 / (1 + math.exp(-5))) and on["b"] == pytest.approx(1 / (1 + math.exp(5)))
    off = _one_pair_task(replace(CloudCycleConfig(), weighted_sampling=False)).sampling_weights({"a": 1.0, "b": 5.0})
    assert off == {"a": 1.0, "b": 1.0}


def test_a_pair_counts_as_trained_on_only_when_both_its_clouds_were(tmp_path):
    """A test pair sharing one cloud with a training pair is not flagged; the training pair reversed is."""
    from cyclereg.clouds.api import pairs_in_training
    from cyclereg.datasets import KeypointPair

    a, b, c = (tmp_path / name for name in ("a.csv", "b.csv", "c.csv"))
    for k, path in enumerate((a, b, c)):
        path.write_text(f"x_mm,y_mm,z_mm\n{k},0,0\n")
    record = {"pairs": {"t1": {"fixed": data_fingerprint(a), "moving": data_fingerprint(b)}}}
    assert pairs_in_training([KeypointPair("p", a, c, None, None)], record) == set()
    assert pairs_in_training([KeypointPair("q", b, a, None, None)], record) == {"q"}
    assert pairs_in_training([KeypointPair("r", a, b, None, None)], record) == {"r"}


def _stopped(*args, **kwargs):
    """A patched step that is interrupted (Ctrl-C) as soon as it is called."""
    raise KeyboardInterrupt


def test_evaluate_records_each_fold_checkpoint_and_names_a_fold_still_training(tmp_path, monkeypatch):
    """An evaluate report says which checkpoint scored each fold (path, SHA-256, stage); while a fold
    has not finished training, its final.pt is an earlier stage's model: a note says so, and the
    report marks it. Every pair gets a progress line (a log file shows no bar)."""
    from cyclereg.checkpoint import file_sha256

    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    args = ["--stages", "1", "--epochs", "1", "--train-points", "100,200", "--device", "cpu", *CHEAP_LABELS]
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *args]).exit_code == 0
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1"]).exit_code == 0
    final = run / "fold1" / "final.pt"

    def evaluate(name):
        res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--folds", "1", "--device", "cpu",
                                  "--json", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        return " ".join(res.output.split()), json.loads((tmp_path / name).read_text())

    said, report = evaluate("finished.json")
    assert report["checkpoints"]["1"].pop("config") == report["config"]  # one fold: its configuration is the report's
    assert report["checkpoints"] == {"1": {"path": str(final), "sha256": file_sha256(final), "stage": 1}}
    assert "has not finished training" not in said
    case = report["cases"][0]
    assert (f"1/1 c0 (fold 1): TRE {case['tre_before_mm']['mean']:.2f} -> {case['tre_after_mm']['mean']:.2f} mm"
            in said), said
    assert case["scoring_seconds"] >= 0 and report["mean_scoring_seconds"] == case["scoring_seconds"]

    # the run extended to 2 stages and stopped before stage 2 trained: final.pt is still stage 1's
    monkeypatch.setattr(CloudCycleTask, "train_stage", _stopped)
    assert runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "2"]).exit_code == 130
    monkeypatch.undo()
    said, report = evaluate("training.json")
    assert f"note: fold 1 of {run} has not finished training (next: stage 2: training from step 0): its final.pt " \
           "is the model of stage 1, not the run's last stage" in said, said
    assert report["checkpoints"]["1"].pop("config") == report["config"]
    assert report["checkpoints"]["1"] == {"path": str(final), "sha256": file_sha256(final), "stage": 1,
                                          "run_finished": False}
    # an exported folder, or a stage chosen with --stage, gets no such note
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--folds", "1", "--stage", "1", "--device", "cpu",
                              "--json", str(tmp_path / "stage1.json")])
    assert res.exit_code == 0 and "has not finished training" not in res.output
    assert json.loads((tmp_path / "stage1.json").read_text())["checkpoints"]["1"]["path"] == \
        str(run / "fold1" / "stage1.pt")


def test_status_estimates_from_a_trained_stage_while_its_labels_are_refreshed(tmp_path):
    """Stage 1 trained in 500 s and its labels are being refreshed (no stage >= 1 logged yet, the
    snapshot gone): two more stages of 500 s of training are left (refreshes not counted)."""
    fold = tmp_path / "fold1"
    fold.mkdir()
    torch.save({"stage": 0, "labels": {}, "weights": {}}, fold / "pseudo0.pt")
    (fold / "log.jsonl").write_text(json.dumps({"stage": 0, "seconds": 100.0}) + "\n")
    save_checkpoint(fold / "stage1.pt", kind="cloud", config={}, state_dict={},
                    extra={"stage": 1, "train": {"train_seconds": 500.0}})
    status = scheduler_mod.StageScheduler(None, fold).status(3)
    assert status["next"] == "stage 1: its pseudo labels (trained)"
    assert status["current_stage_s"] == pytest.approx(500.0)
    assert status["remaining_s"] == pytest.approx(3 * 500.0 - 500.0)


def test_a_resumed_run_brings_final_pt_up_to_date_before_training_the_next_stage(tmp_path, monkeypatch):
    """Killed after stage 1's labels and before final.pt, then stopped again during stage 2: final.pt is
    stage 1's checkpoint at once (it was missing until stage 2 finished), so evaluate --run reads the last
    finished stage and status says what is really next."""
    from cyclereg.training.scheduler import StageScheduler

    ds = _dataset(tmp_path, n=2)
    run = tmp_path / "run"
    args = ["--stages", "2", "--epochs", "1", "--train-points", "100,200", "--device", "cpu", *CHEAP_LABELS]
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *args]).exit_code == 0
    real_publish, real_train = StageScheduler._publish_final, CloudCycleTask.train_stage

    cmd = ["cycle", str(ds), "--run", str(run), "--folds", "1"]
    monkeypatch.setattr(StageScheduler, "_publish_final", _stopped)
    assert runner.invoke(app, cmd).exit_code == 130
    fold = run / "fold1"
    assert (fold / "pseudo1.pt").is_file() and not (fold / "final.pt").exists()
    monkeypatch.setattr(StageScheduler, "_publish_final", real_publish)
    monkeypatch.setattr(CloudCycleTask, "train_stage", _stopped)
    assert runner.invoke(app, cmd).exit_code == 130  # stopped again, in stage 2
    assert (fold / "final.pt").read_bytes() == (fold / "stage1.pt").read_bytes()
    assert run_status(run)["folds"][0]["next"] == "stage 2: training from step 0"
    monkeypatch.setattr(CloudCycleTask, "train_stage", real_train)
    res = runner.invoke(app, ["evaluate", str(ds), "--run", str(run), "--folds", "1", "--device", "cpu",
                              "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["checkpoints"]["1"]["stage"] == 1
    assert runner.invoke(app, cmd).exit_code == 0
    assert (fold / "final.pt").read_bytes() == (fold / "stage2.pt").read_bytes()
