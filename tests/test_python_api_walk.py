"""Bad-argument walk over the public Python API (audited 2026-12-07).

What was audited: the library calls the README names (``cyclereg.api.keypoints`` / ``register`` /
``evaluate``, ``cyclereg.training.api.pretrain_random`` / ``run_cycle``,
``cyclereg.training.status.show_run_status``, ``cyclereg.compare.compare_reports`` and
``cyclereg.clouds.api.combine_cloud_models``) were fed bad or unusual ARGUMENTS, not bad files:
numbers, bytes, lists, dicts and None where a path goes; a generator where a list of paths goes; bools,
text, NumPy integers, 1.5, NaN, inf and negative numbers where counts, seeds, folds, mm values and seconds
go; unknown device strings and ``fmt`` values; contradicting keyword combinations; empty lists; and the
same call with ``str``, ``pathlib.Path`` and a bare ``os.PathLike``.

The project's rule: a bad argument raises :class:`cyclereg.errors.InputError` (or ``ValueError``) in one
line naming the argument (or its CLI flag), before any work and with no output written; a ``str`` path
and a ``Path`` give identical results. The cases the code already handles and that no other test covers
are pinned first; the thirteen cases it mishandled follow at the end, each mended in the library (its test
fails without the mend).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import cyclereg.api as api
from cyclereg.errors import InputError

NAN, INF = float("nan"), float("inf")


class _PathLike:
    """A bare ``os.PathLike`` (neither ``str`` nor ``Path``)."""

    def __init__(self, path):
        self.path = str(path)

    def __fspath__(self) -> str:
        return self.path


AS = {"str": str, "Path": Path, "PathLike": _PathLike}


@pytest.fixture(scope="module")
def kp(tmp_path_factory):
    """A keypoint dataset of two pairs in two folds (the small synthetic pair of conftest), a run with
    fold 1's stage-0 labels (1 stage, 1 epoch), two cloud checkpoints, two evaluate reports and a tiny CT."""
    from cyclereg.checkpoint import save_checkpoint
    from cyclereg.clouds.features import build_graph_net
    from cyclereg.clouds.pipeline import CloudRegConfig
    from cyclereg.training.api import pretrain_random

    from conftest import intraop_threads, write_two_pair_dataset

    d = tmp_path_factory.mktemp("kp")
    write_two_pair_dataset(d)
    with intraop_threads(1):
        pretrain_random(d / "dataset.json", d / "run", fold=1, stages=1, epochs=1, device="cpu")
        for name, seed in (("a.pt", 1), ("b.pt", 2)):
            save_checkpoint(d / name, kind="cloud", config=CloudRegConfig(),
                            state_dict=build_graph_net(CloudRegConfig().net, seed=seed).state_dict())
        api.evaluate(d / "dataset.json", d / "id.json", identity=True, max_pairs=1, device="cpu")
        api.evaluate(d / "dataset.json", d / "rnd.json", model="random", max_pairs=1, device="cpu")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32), np.eye(4)),
             str(d / "ct.nii.gz"))
    return d


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")} if folder.exists() else set()


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- handled well


def _device_calls(d: Path, out: Path):
    from cyclereg.training.api import pretrain_random

    ds = d / "dataset.json"
    return {
        "register": lambda dev: api.register(d / "f.csv", d / "m.csv", out / "r", device=dev),
        "keypoints": lambda dev: api.keypoints(d / "ct.nii.gz", out / "k.csv", device=dev, verbose=False),
        "evaluate": lambda dev: api.evaluate(ds, out / "e.json", model="random", device=dev),
        "pretrain_random": lambda dev: pretrain_random(ds, out / "run", fold=1, device=dev),
    }


@pytest.mark.parametrize("call", ["register", "keypoints", "evaluate", "pretrain_random"])
@pytest.mark.parametrize("device,message", [("gpu", "--device gpu: expected auto, cpu or cuda"),
                                            ("", "--device : expected auto, cpu or cuda"),
                                            (None, "--device None: expected auto, cpu or cuda"),
                                            (1, "--device 1: expected auto, cpu or cuda"),
                                            ("cuda:x", "--device cuda:x: expected auto, cpu or cuda (or cuda:N")])
def test_an_unknown_device_is_refused_by_every_entry_point_naming_it_and_nothing_is_written(kp, tmp_path, call, device,
                                                                                            message):
    with pytest.raises(InputError) as err:
        _device_calls(kp, tmp_path)[call](device)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert _files(tmp_path) == set()


@pytest.mark.parametrize("kwargs,message", [
    ({"sigma_mm": NAN}, "--sigma must be a positive number, got nan"),
    ({"sigma_mm": INF}, "--sigma must be a positive number, got inf"),
    ({"sigma_mm": 0}, "--sigma must be a positive number, got 0"),
    ({"nms_radius_mm": NAN}, "--nms-radius must be >= 0, got nan"),
    ({"nms_radius_mm": -INF}, "--nms-radius must be >= 0, got -inf"),
    ({"threshold": NAN}, "--threshold must be >= 0, got nan"),
    ({"threshold": -0.1}, "--threshold must be >= 0, got -0.1"),
    ({"max_points": NAN}, "--max-points must be a whole number >= 0 (0: no limit), got nan"),
    ({"max_points": True}, "--max-points must be a whole number >= 0 (0: no limit), got True"),
    ({"max_points": 2.0}, "--max-points must be a whole number >= 0 (0: no limit), got 2.0"),
    ({"fmt": "xyz"}, "--format xyz: expected one of csv, l2r, ply, pcd, npy"),
    ({"fmt": ""}, "--format : expected one of csv, l2r, ply, pcd, npy"),
    ({"moving_nms_radius_mm": 2.0}, "--moving-nms-radius is an option for --pairs"),
])
def test_keypoints_refuses_non_finite_or_negative_values_naming_the_flag_and_writes_nothing(kp, tmp_path, kwargs,
                                                                                             message):
    with pytest.raises(InputError) as err:
        api.keypoints(kp / "ct.nii.gz", tmp_path / "o" / "k.csv", verbose=False, **kwargs)
    assert str(err.value) == message
    assert _files(tmp_path) == set()


@pytest.mark.parametrize("kwargs,message", [
    ({"fold": True}, "--fold True: expected 'all' or 1..2"),
    ({"fold": 1.5}, "--fold 1.5: expected 'all' or 1..2"),
    ({"fold": [1]}, "--fold [1]: expected 'all' or 1..2"),
    ({"fold": 0}, "--fold 0: expected 'all' or 1..2"),
    ({"fold": 1, "folds": 1}, "give fold or folds, not both"),
    ({"jobs": True}, "--jobs True: need a whole number, 1 or more"),
    ({"val_pairs": -1}, "--val-pairs -1: need 0 or more"),
    ({"candidates": NAN}, "--candidates nan: need a whole number, 1 or more"),
    ({"learn_recentre_passes": INF}, "--learn-recentre-passes inf: need a whole number, 0 or more"),
    ({"aug_relative": NAN}, "--aug-relative nan: need a value in [0, 1)"),
    ({"aug_relative": True}, "--aug-relative True: need a value in [0, 1)"),
    ({"train_points": "1000,2000,3"}, "--train-points '1000,2000,3': expected 'F,M' (two integers)"),
    ({"iterations": 10}, "--iterations: not an option for keypoint datasets"),
    ({"config": {"stages": 2}}, "config: a keypoints dataset takes a CloudCycleConfig, got a dict"),
])
def test_pretrain_random_refuses_bad_counts_and_folds_naming_the_option_and_makes_no_run(kp, tmp_path, kwargs, message):
    from cyclereg.training.api import pretrain_random

    with pytest.raises(InputError) as err:
        pretrain_random(kp / "dataset.json", tmp_path / "run", device="cpu", **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"stop_below_mm": NAN}, "--stop-below nan: expected a distance in mm >= 0"),
    ({"stop_below_mm": -1}, "--stop-below -1: expected a distance in mm >= 0"),
    ({"snapshot_every_s": NAN}, "--snapshot-every nan: expected a number of seconds >= 0"),
    ({"snapshot_every_s": -INF}, "--snapshot-every -inf: expected a number of seconds >= 0"),
    ({"stages": True}, "--stages True: need a whole number, 1 or more"),
    ({"val_pairs": 1.5}, "--val-pairs 1.5: need a whole number, 0 or more"),
    ({"folds": True}, "--folds True: expected 'all' or 1..2"),
    ({"folds": 1.5}, "--folds 1.5: expected 'all' or 1..2"),
    ({"folds": [1]}, "--folds [1]: expected 'all' or 1..2"),
    ({"device": "gpu"}, "--device gpu: expected auto, cpu or cuda"),
])
def test_run_cycle_refuses_bad_values_naming_the_option_and_leaves_the_run_as_it_was(kp, kwargs, message):
    from cyclereg.training.api import run_cycle

    before = _tree(kp / "run")
    with pytest.raises(InputError, match=re.escape(message)):
        run_cycle(kp / "dataset.json", kp / "run", **kwargs)
    assert _tree(kp / "run") == before


@pytest.mark.parametrize("kwargs,message", [
    ({"max_pairs": NAN}, "--max-pairs nan: need a whole number, 1 or more"),
    ({"max_pairs": True}, "--max-pairs True: need a whole number, 1 or more"),
    ({"stage": 1.5}, "--stage 1.5: need a whole number, 0 or more"),
    ({"folds": True}, "--folds True: expected 'all' or 1..2"),
    ({"folds": 0}, "--folds 0: expected 'all' or 1..2"),
    ({"identity": 1}, "--identity 1: expected True or False"),
])
def test_evaluate_refuses_bad_counts_and_folds_naming_the_option_and_writes_no_report(kp, tmp_path, kwargs, message):
    method = {} if "identity" in kwargs else {"identity": True}
    with pytest.raises(InputError) as err:
        api.evaluate(kp / "dataset.json", tmp_path / "r.json", **method, **kwargs)
    assert message in str(err.value)
    assert _files(tmp_path) == set()


@pytest.mark.parametrize("kwargs,message", [
    ({"warps": 0}, "--warps must be 1 or 2, got 0"),
    ({"warps": 1.5}, "--warps must be 1 or 2, got 1.5"),
    ({"via_keypoints": True, "spacing": "1,1,1"}, "--spacing is an option for point-cloud files, not --via-keypoints"),
    ({"ensemble_fusion": "joint"}, "--ensemble-fusion is an option for point clouds (or volumes with --via-keypoints)"),
    ({"via_keypoints": True, "tta_passes": NAN}, "--tta-passes nan: need a whole number, 0 or more"),
])
def test_register_of_volumes_refuses_bad_or_contradicting_options_and_writes_nothing(tmp_path, kwargs, message):
    for name in ("F", "M"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    with pytest.raises(InputError) as err:
        api.register(tmp_path / "F.nii.gz", tmp_path / "M.nii.gz", tmp_path / "o", device="cpu", verbose=False,
                     **kwargs)
    assert message in str(err.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["str", "PathLike"])
def test_register_gives_the_same_files_for_str_path_and_pathlike(kp, tmp_path, kind):
    conv = AS[kind]
    by_path = api.register(kp / "f.csv", kp / "m.csv", tmp_path / "a", query=kp / "q.csv", device="cpu")
    other = api.register(conv(kp / "f.csv"), conv(kp / "m.csv"), conv(tmp_path / "b"), query=conv(kp / "q.csv"),
                         device="cpu")
    assert other.out_dir == tmp_path / "b" and other.files == by_path.files == ("displacements.csv",
                                                                                 "query_displacements.csv")
    for name in by_path.files:
        assert other.path(name).read_bytes() == by_path.path(name).read_bytes()
    assert other.record["fixed"] == by_path.record["fixed"] == str(kp / "f.csv")


@pytest.mark.parametrize("kind", ["str", "PathLike"])
def test_compare_status_and_ensemble_give_the_same_results_for_str_path_and_pathlike(kp, tmp_path, kind, capsys):
    import io

    from rich.console import Console

    from cyclereg.clouds.api import combine_cloud_models
    from cyclereg.compare import compare_reports
    from cyclereg.training.status import show_run_status

    conv = AS[kind]
    a = compare_reports([kp / "id.json", kp / "rnd.json"], tmp_path / "c1.json", quiet=True)
    b = compare_reports([conv(kp / "id.json"), conv(kp / "rnd.json")], conv(tmp_path / "c2.json"), quiet=True)
    undated = (lambda d: {k: v for k, v in d.items() if k != "date"})  # seconds apart: another second, maybe
    assert undated(a) == undated(b)
    strip = (lambda t: undated(json.loads(t)))
    assert strip((tmp_path / "c1.json").read_text()) == strip((tmp_path / "c2.json").read_text())
    console = Console(file=io.StringIO())
    s1 = show_run_status(kp / "run", json_out=tmp_path / "s1.json", console=console)
    s2 = show_run_status(conv(kp / "run"), json_out=conv(tmp_path / "s2.json"), console=console)
    assert s1 == s2 and s1["run"] == str(kp / "run")
    assert (tmp_path / "s1.json").read_text() == (tmp_path / "s2.json").read_text()
    combine_cloud_models([kp / "a.pt", kp / "b.pt"], tmp_path / "e1.pt")
    combine_cloud_models([conv(kp / "a.pt"), conv(kp / "b.pt")], conv(tmp_path / "e2.pt"))
    e1, e2 = (torch.load(tmp_path / n, map_location="cpu", weights_only=False) for n in ("e1.pt", "e2.pt"))
    assert e1["state_dict"].keys() == e2["state_dict"].keys()
    assert all(torch.equal(e1["state_dict"][k], e2["state_dict"][k]) for k in e1["state_dict"])
    assert strip((tmp_path / "e1.json").read_text()) == strip((tmp_path / "e2.json").read_text())


@pytest.mark.parametrize("call,message", [
    (lambda d, o: __import__("cyclereg.compare", fromlist=["x"]).compare_reports([]),
     "compare needs at least two reports"),
    (lambda d, o: __import__("cyclereg.compare", fromlist=["x"]).compare_reports([d / "id.json", d / "rnd.json"],
                                                                                  metric="TRE"),
     "--metric must be one of tre, dice, hd95, sdlogj (got 'TRE')"),
    (lambda d, o: __import__("cyclereg.compare", fromlist=["x"]).compare_reports([d / "id.json", d / "rnd.json"],
                                                                                  label=1),
     "--label is an option for volume reports"),
    (lambda d, o: __import__("cyclereg.clouds.api", fromlist=["x"]).combine_cloud_models([], o / "e.pt"),
     "an ensemble needs at least two sources"),
    (lambda d, o: __import__("cyclereg.clouds.api", fromlist=["x"]).combine_cloud_models(
        [d / "a.pt", d / "b.pt"], o / "e.pt", fusion=3), "--fusion 3: expected one of average, joint"),
    (lambda d, o: __import__("cyclereg.clouds.api", fromlist=["x"]).combine_cloud_models(
        [d / "a.pt", d / "b.pt"], o / "e.pt", tta_passes=True), "--tta-passes True: need a whole number, 0 or more"),
    (lambda d, o: __import__("cyclereg.training.status", fromlist=["x"]).show_run_status(d / "run", stages=True),
     "--stages True: need a whole number, 1 or more"),
])
def test_compare_ensemble_and_status_refuse_empty_lists_and_bad_values_and_write_nothing(kp, tmp_path, call, message):
    with pytest.raises(InputError) as err:
        call(kp, tmp_path)
    assert message in str(err.value)
    assert _files(tmp_path) == set()


# ----------------------------------------------------------------------------- bugs found by the walk (mended)
@pytest.mark.parametrize("source", [Path("a.pt"), "my models/a.pt"])
def test_combine_cloud_models_refuses_one_path_given_for_the_list_alike_for_str_and_path(tmp_path, source):
    from cyclereg.clouds.api import combine_cloud_models

    with pytest.raises(InputError, match="sources: expected a list of run directories or checkpoint files, got one path"):
        combine_cloud_models(source, tmp_path / "e.pt")
    assert _files(tmp_path) == set()


@pytest.mark.parametrize("which", ["compare", "ensemble"])
def test_a_generator_of_paths_works_like_a_list(kp, tmp_path, which):
    from cyclereg.clouds.api import combine_cloud_models
    from cyclereg.compare import compare_reports

    if which == "compare":
        got = compare_reports((p for p in (kp / "id.json", kp / "rnd.json")), quiet=True)
        assert got == compare_reports([kp / "id.json", kp / "rnd.json"], quiet=True)
    else:
        combine_cloud_models((p for p in (kp / "a.pt", kp / "b.pt")), tmp_path / "e.pt")
        assert (tmp_path / "e.pt").is_file()


@pytest.mark.parametrize("kwargs,flag", [({"sigma_mm": True}, "--sigma"), ({"nms_radius_mm": True}, "--nms-radius"),
                                         ({"threshold": True}, "--threshold"), ({"sigma_mm": "2"}, "--sigma"),
                                         ({"threshold": "0"}, "--threshold"),
                                         ({"moving_nms_radius_mm": True}, "--moving-nms-radius")])
def test_keypoints_refuses_a_bool_or_a_text_as_an_mm_value_naming_the_flag(kp, tmp_path, kwargs, flag):
    out = tmp_path / "o"
    with pytest.raises(InputError, match=flag):
        if "moving_nms_radius_mm" in kwargs:  # an option of --pairs (the keypoint dataset of scan pairs)
            (tmp_path / "pairs.csv").write_text(f"id,fixed,moving\na,{kp / 'ct.nii.gz'},{kp / 'ct.nii.gz'}\n")
            api.keypoints(None, out, pairs=tmp_path / "pairs.csv", verbose=False, **kwargs)
        else:
            api.keypoints(kp / "ct.nii.gz", out / "k.csv", verbose=False, **kwargs)
    assert not out.exists()


def test_register_refuses_bools_as_a_spacing(kp, tmp_path):
    for src, dst in (("f.csv", "fv.csv"), ("m.csv", "mv.csv")):  # headerless: voxel indices
        np.savetxt(tmp_path / dst, np.loadtxt(kp / src, delimiter=",", skiprows=1), delimiter=",")
    with pytest.raises(InputError, match="--spacing"):
        api.register(tmp_path / "fv.csv", tmp_path / "mv.csv", tmp_path / "o", spacing=(True, True, True),
                     device="cpu")
    assert not (tmp_path / "o").exists()


def test_keypoints_refuses_a_format_that_is_no_text_naming_the_flag(kp, tmp_path):
    with pytest.raises(InputError, match="--format 3"):
        api.keypoints(kp / "ct.nii.gz", tmp_path / "k.csv", fmt=3, verbose=False)


@pytest.mark.parametrize("warps", [2.0, True])
def test_register_refuses_warps_that_is_no_whole_number(tmp_path, warps):
    rng = np.random.default_rng(0)
    for name in ("F", "M"):
        nib.save(nib.Nifti1Image(rng.normal(size=(32, 32, 32)).astype(np.float32), np.diag([2, 2, 2, 1])),
                 str(tmp_path / f"{name}.nii.gz"))
    with pytest.raises(InputError, match="--warps"):
        api.register(tmp_path / "F.nii.gz", tmp_path / "M.nii.gz", tmp_path / "o", warps=warps, device="cpu")
    assert not (tmp_path / "o").exists()


def test_pretrain_random_names_train_points_that_are_no_text(kp, tmp_path):
    from cyclereg.training.api import pretrain_random

    with pytest.raises(InputError, match="--train-points"):
        pretrain_random(kp / "dataset.json", tmp_path / "run", fold=1, train_points=5, device="cpu")
    try:  # the Python form of "F,M": taken as it, or refused by name, never an AttributeError
        pretrain_random(kp / "dataset.json", tmp_path / "run2", fold=1, stages=1, epochs=1, train_points=(200, 400),
                        device="cpu")
    except InputError as exc:
        assert "--train-points" in str(exc)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("call,flag", [
    (lambda d, r: __import__("cyclereg.training.api", fromlist=["x"]).run_cycle(d, r, stop_below_mm=True),
     "--stop-below"),
    (lambda d, r: __import__("cyclereg.training.api", fromlist=["x"]).run_cycle(d, r, stop_below_mm="1"),
     "--stop-below"),
    (lambda d, r: __import__("cyclereg.training.api", fromlist=["x"]).run_cycle(d, r, snapshot_every_s="5"),
     "--snapshot-every"),
    (lambda d, r: __import__("cyclereg.training.api", fromlist=["x"]).pretrain_random(d, r, aug_relative="0.1"),
     "--aug-relative"),
])
def test_training_refuses_a_text_or_bool_as_mm_or_seconds_naming_the_option(kp, tmp_path, call, flag):
    with pytest.raises(InputError, match=flag):
        call(kp / "dataset.json", tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("which", ["compare", "status"])
def test_compare_and_status_switches_are_true_or_false(kp, which):
    import io

    from rich.console import Console

    from cyclereg.compare import compare_reports
    from cyclereg.training.status import show_run_status

    with pytest.raises(InputError, match="expected True or False"):
        if which == "compare":
            compare_reports([kp / "id.json", kp / "rnd.json"], quiet="no")
        else:
            show_run_status(kp / "run", history="no", console=Console(file=io.StringIO()))


@pytest.mark.parametrize("kwargs, flag", [({"seed": np.int64(3)}, "--seed"), ({"tta_passes": np.int64(1)},
                                                                               "--tta-passes")])
def test_numpy_integers_are_refused_with_the_way_out(kp, tmp_path, kwargs, flag):
    """A NumPy integer seed or count was told "need a whole number" (np.int64(3) is one): torch's generators and
    the JSON records take Python ints, so it is refused naming the option and saying to give int(value)."""
    with pytest.raises(InputError, match=re.escape(f"{flag} {kwargs[next(iter(kwargs))]!r}") + r".*give int\(value\) "
                                         r"for this int64"):
        api.register(kp / "f.csv", kp / "m.csv", tmp_path / "b", device="cpu", **kwargs)
    assert _files(tmp_path) == set()


@pytest.mark.parametrize("call,name", [
    (lambda d, o: api.register(d / "f.csv", d / "m.csv", None), "out_dir"),
    (lambda d, o: api.register(1, d / "m.csv", o / "r"), "fixed"),
    (lambda d, o: api.register([d / "f.csv"], d / "m.csv", o / "r"), "fixed"),
    (lambda d, o: api.keypoints(bytes(d / "ct.nii.gz"), o / "k.csv", verbose=False), "ct"),
    (lambda d, o: api.evaluate(d / "dataset.json", None, identity=True), "report"),
    (lambda d, o: __import__("cyclereg.training.api", fromlist=["x"]).pretrain_random(d / "dataset.json", None),
     "run"),
    (lambda d, o: __import__("cyclereg.compare", fromlist=["x"]).compare_reports([d / "id.json", d / "rnd.json"], 5),
     "output"),
    (lambda d, o: __import__("cyclereg.training.status", fromlist=["x"]).show_run_status(d / "run", json_out=5),
     "json_out"),
])
def test_a_path_argument_of_the_wrong_type_is_an_input_error_naming_it(kp, tmp_path, call, name):
    with pytest.raises(InputError, match=name):
        call(kp, tmp_path)
    assert _files(tmp_path) == set()


def test_pretrain_random_and_run_cycle_read_a_float_fold_alike(kp, tmp_path, monkeypatch):
    """pretrain_random turned fold=1.0 into the text "1.0" and refused it while run_cycle trained fold 1: both now
    read a fold as select_folds does (2.0 is fold 2, 1.5 is refused naming the option)."""
    from cyclereg.training import api as training_api

    run = tmp_path / "run"
    shutil.copytree(kp / "run", run)
    before = _tree(run)
    with pytest.raises(InputError, match=re.escape("--fold 1.5: expected 'all' or 1..2")):
        training_api.pretrain_random(kp / "dataset.json", tmp_path / "fresh", fold=1.5)
    with pytest.raises(InputError, match=re.escape("--folds 1.5: expected 'all' or 1..2")):
        training_api.run_cycle(kp / "dataset.json", run, folds=1.5, device="cpu")
    assert _tree(run) == before and not (tmp_path / "fresh").exists()
    seen = []
    monkeypatch.setattr(training_api, "_cloud_pretrain", lambda dataset, run, **kw: seen.append(kw["fold"]))
    training_api.pretrain_random(kp / "dataset.json", tmp_path / "fresh", fold=1.0)
    ds = training_api.load_keypoint_dataset(kp / "dataset.json")
    assert training_api.select_folds(ds, seen[0], "--fold") == [1]


def test_combine_cloud_models_names_a_fusion_of_none(kp, tmp_path):
    from cyclereg.clouds.api import combine_cloud_models

    with pytest.raises(InputError, match=r"^--fusion None"):
        combine_cloud_models([kp / "a.pt", kp / "b.pt"], tmp_path / "e.pt", fusion=None)
    assert _files(tmp_path) == set()
