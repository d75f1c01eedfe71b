"""The command entry points of :mod:`cyclereg.api`: the path follows the inputs, options of the
other path are refused by name before any work, and the result is the path-specific call's."""

from __future__ import annotations

import json
import re

import pytest

from cyclereg import api
from cyclereg.clouds.api import register_cloud_files
from cyclereg.errors import InputError

@pytest.fixture
def clouds(pair_files):
    """The folder of conftest's pair files (f.csv, m.csv, l.csv, ml.csv, q.csv)."""
    return pair_files[0]


@pytest.mark.parametrize("name,volume", [("a.nii", True), ("a.NII.GZ", True), ("dir.nii/a.csv", False),
                                         ("a.nii.gz.csv", False), ("a.ply", False)])
def test_is_volume_file(name, volume):
    assert api.is_volume_file(name) is volume


def test_register_clouds_is_the_cloud_path(clouds):
    """Two point files go to the keypoint path: the same call with the same seed gives the same
    displacements, byte for byte."""
    result = api.register(str(clouds / "f.csv"), str(clouds / "m.csv"), str(clouds / "a"), seed=3, device="cpu")
    summary = register_cloud_files(clouds / "f.csv", clouds / "m.csv", clouds / "b", seed=3, device="cpu")
    def untimed(line: str) -> str:  # the summary says how long it took: not the same twice
        return re.sub(r"in [0-9.]+ s", "in _ s", line)

    assert str(result) == result.summary
    assert untimed(result.summary) == untimed(summary.replace(str(clouds / "b"), str(clouds / "a")))
    assert (clouds / "a" / "displacements.csv").read_bytes() == (clouds / "b" / "displacements.csv").read_bytes()
    # what a library user needs without parsing the summary: the files, their paths and the record
    assert result.out_dir == clouds / "a" and result.files == ("displacements.csv",)
    assert result.path("displacements.csv") == clouds / "a" / "displacements.csv"
    assert result.record == json.loads((clouds / "a" / "config.json").read_text())
    with pytest.raises(KeyError, match="not an output"):
        result.path("warped.nii.gz")


@pytest.mark.parametrize("files,options,message", [
    (("f.csv", "m.csv"), {"warps": 2}, "--warps is an option for volumes, not point clouds"),
    (("f.csv", "m.csv"), {"adam": False, "l2r_name": True},
     "--adam/--no-adam and --l2r-name are options for volumes, not point clouds"),
    (("f.csv", "m.csv"), {"lung_mask": True}, "--lung-mask is an option for volumes registered --via-keypoints"),
    (("f.csv", "m.csv"), {"via_keypoints": True}, "--via-keypoints registers two volumes"),
    (("f.nii.gz", "m.nii.gz"), {"query": "q.csv"},
     "--query is an option for point clouds (or volumes with --via-keypoints), not the dense path"),
    (("f.nii.gz", "m.nii.gz"), {"spacing": "1,1,1"}, "--spacing is an option for point-cloud files, not volumes"),
    (("f.nii.gz", "m.nii.gz"), {"via_keypoints": True, "ic": True}, "--ic/--no-ic is an option for the dense path"),
    (("f.nii.gz", "m.csv"), {}, "a point cloud, but"),
])
def test_register_refuses_options_of_another_path(clouds, files, options, message):
    """Refused before anything is read or written (the volumes here are not even valid NIfTI)."""
    for name in files:
        if not (clouds / name).exists():
            (clouds / name).write_bytes(b"not read")
    if "query" in options:
        options = {**options, "query": clouds / "f.csv"}
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        api.register(clouds / files[0], clouds / files[1], clouds / "out", **options)
    assert not (clouds / "out").exists()


def test_evaluate_follows_the_dataset_kind(clouds):
    ds = clouds / "dataset.json"
    ds.write_text(json.dumps({"pairs": [{"id": "c0", "fixed_keypoints": "f.csv", "moving_keypoints": "m.csv",
                                         "fixed_landmarks": "l.csv", "moving_landmarks": "ml.csv"}]}))
    report = api.evaluate(ds, clouds / "r.json", identity=True)
    written = json.loads((clouds / "r.json").read_text())
    assert report["mean_tre_mm"] == written["mean_tre_mm"] and len(written["cases"]) == 1
    assert report["mean_tre_mm"] == pytest.approx(report["initial_tre_mm"]) and report["initial_tre_mm"] > 0
    with pytest.raises(InputError, match="--both-directions is an option for volume datasets"):
        api.evaluate(ds, clouds / "r2.json", identity=True, both_directions=True)
    volumes = clouds / "l2r.json"
    volumes.write_text(json.dumps({"registration_val": [], "training": []}))
    with pytest.raises(InputError, match="--tta-passes and --spread are options for keypoint datasets"):
        api.evaluate(volumes, clouds / "r2.json", model="random", tta_passes=2, spread=True)
    # the identity registers nothing: settings of a registration are refused, not ignored (or unchecked)
    for dataset, options, flags in ((ds, {"tta_passes": -1}, "--tta-passes is"),
                                    (ds, {"recentre_passes": 1, "ensemble_fusion": "joint"},
                                     "--recentre-passes and --ensemble-fusion are"),
                                    (volumes, {"warps": 1, "adam": False}, "--warps and --adam/--no-adam are")):
        with pytest.raises(InputError, match=f"{flags} (an option|options) for a model, not --identity"):
            api.evaluate(dataset, clouds / "r2.json", identity=True, **options)
    # --seed is the untrained network's: with a checkpoint, a run or the identity it is refused, not ignored
    for method in ({"identity": True}, {"run": clouds}):
        with pytest.raises(InputError, match="--seed is an option for --model random"):
            api.evaluate(ds, clouds / "r2.json", seed=3, **method)
    for methods in ({}, {"identity": True, "model": "random"}, {"model": "random", "run": clouds}):
        with pytest.raises(InputError, match="give exactly one of --identity"):
            api.evaluate(ds, clouds / "r2.json", **methods)
    assert not (clouds / "r2.json").exists()


def test_keypoints_needs_one_volume_or_pairs(clouds):
    with pytest.raises(InputError, match="give a CT volume, or --pairs"):
        api.keypoints(None, clouds / "k.csv")
    (clouds / "pairs.csv").write_text("id,fixed,moving\n")
    (clouds / "ct.nii.gz").write_bytes(b"not read")
    with pytest.raises(InputError, match="not both"):
        api.keypoints(clouds / "ct.nii.gz", clouds / "k", pairs=clouds / "pairs.csv")
    with pytest.raises(InputError, match="--folds is an option for --pairs"):
        api.keypoints(clouds / "ct.nii.gz", clouds / "k.csv", folds=2)
    with pytest.raises(InputError, match="--format is an option for one CT volume, not --pairs"):
        api.keypoints(None, clouds / "k", pairs=clouds / "pairs.csv", fmt="csv")
    assert not (clouds / "k.csv").exists() and not (clouds / "k").exists()


@pytest.mark.parametrize("seconds,text", [(None, "-"), (float("nan"), "-"), (0.4, "0:00:00"), (59.6, "0:01:00"), (3725, "1:02:05"),
                                          (100 * 3600 + 1, "100:00:01")])
def test_status_times_read_as_hours_minutes_seconds(seconds, text):
    from cyclereg.training.status import hms

    assert hms(seconds) == text


def test_status_time_so_far_adds_the_finished_stages_and_the_running_one(monkeypatch):
    """The table's "time so far" of a fold: its finished stages' seconds plus the running stage's (30 + 60 +
    30 s = 0:02:00), or the running stage's alone; a fold with nothing yet shows "-", a fold whose stage 0 is
    done shows 0 as its finished stage. Only the status dict was tested before."""
    from rich.console import Console

    import cyclereg.training.api as training_api
    from cyclereg.training.status import show_run_status

    row = {"finished": 1, "next": "stage 2", "remaining_s": 90.0, "unlogged_stages": []}
    monkeypatch.setattr(training_api, "run_status", lambda run, stages=None: {
        "run": "r", "dataset": "d.json", "kind": "keypoints", "stages": 3, "stop_below_mm": None,
        "folds": [{**row, "fold": 1, "stage_seconds": {0: 30.0, 1: 60.0}, "current_stage_s": 30.0},
                  {**row, "fold": 2, "stage_seconds": {}, "current_stage_s": None, "finished": -1},
                  {**row, "fold": 3, "stage_seconds": {}, "current_stage_s": 30.0, "finished": 0}]})
    console = Console(record=True, width=200)
    show_run_status("r", console=console)
    lines = console.export_text().splitlines()
    fold1, fold2, fold3 = ([cell.strip() for cell in line.split("│")[1:-1]] for line in lines
                           if line.split()[:2] in (["│", "1"], ["│", "2"], ["│", "3"]))
    assert fold1 == ["1", "1", "stage 2", "0:02:00", "0:01:30"] and fold2[1] == "-" and fold2[3] == "-"
    assert fold3[1] == "0" and fold3[3] == "0:00:30"  # stage 0 finished (not "-"); only the running stage's time


def test_status_json_that_cannot_be_written_is_refused_first(tmp_path):
    from cyclereg.training.status import show_run_status

    (tmp_path / "out.json").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        show_run_status(tmp_path, json_out=tmp_path / "out.json")  # before the run directory is even read


def test_data_fingerprint_is_of_the_content(tmp_path):
    from cyclereg.checkpoint import data_fingerprint

    (tmp_path / "a.csv").write_text("1,2,3\n")
    (tmp_path / "b.csv").write_text("1,2,3\n")
    (tmp_path / "c.csv").write_text("1,2,4\n")
    assert data_fingerprint(tmp_path / "a.csv") == data_fingerprint(tmp_path / "b.csv")  # the name does not count
    assert data_fingerprint(tmp_path / "a.csv") != data_fingerprint(tmp_path / "c.csv")
    assert data_fingerprint(tmp_path / "a.csv", tmp_path / "c.csv") != data_fingerprint(tmp_path / "c.csv",
                                                                                         tmp_path / "a.csv")
    with pytest.raises(InputError, match="nope.csv: file does not exist"):
        data_fingerprint(tmp_path / "nope.csv")


def test_register_refuses_a_seed_with_a_checkpoint(clouds):
    (clouds / "m.pt").write_bytes(b"not read")
    with pytest.raises(InputError, match="--seed is an option for --model random"):
        api.register(clouds / "f.csv", clouds / "m.csv", clouds / "out", model=clouds / "m.pt", seed=4)
    assert not (clouds / "out").exists()


def _library_calls(folder):
    """Each library entry point with one path argument given as an empty string (argument name, call)."""
    from cyclereg.clouds.api import combine_cloud_models
    from cyclereg.compare import compare_reports
    from cyclereg.training.api import pretrain_random, run_cycle, run_status
    from cyclereg.training.status import show_run_status

    f, m = str(folder / "f.csv"), str(folder / "m.csv")
    return [
        ("out_dir", lambda: api.register(f, m, "", device="cpu")),
        ("out_dir", lambda: api.register(f, m, "  ", device="cpu")),
        ("moving", lambda: api.register(f, "", str(folder / "out"), device="cpu")),
        ("model", lambda: api.register(f, m, str(folder / "out"), model="", device="cpu")),
        ("output", lambda: api.keypoints(str(folder / "ct.nii.gz"), "")),
        ("report", lambda: api.evaluate(f, "", identity=True)),
        ("errors_csv", lambda: api.evaluate(f, str(folder / "r.json"), identity=True, errors_csv="")),
        ("run", lambda: pretrain_random(f, "")),
        ("run", lambda: run_cycle(f, "")),
        ("run", lambda: run_status("")),
        ("json_out", lambda: show_run_status(str(folder), json_out="")),
        ("output", lambda: compare_reports([f, m], "")),
        ("reports", lambda: compare_reports([f, ""])),
        ("output", lambda: combine_cloud_models([f, m], "")),
    ]


def test_library_refuses_empty_paths(clouds, tmp_path, monkeypatch):
    """``Path("")`` is the current folder: a library call with an empty path string (an unset
    variable) is refused naming the argument, before anything is read or written, as the command
    line refuses an empty value."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    for name, call in _library_calls(clouds):
        with pytest.raises(InputError) as err:
            call()
        assert str(err.value).startswith(f"{name}: an empty path"), (name, str(err.value))
    assert list(work.iterdir()) == [] and not (clouds / "out").exists()


@pytest.mark.parametrize("check", ["require_file", "require_output_file", "require_output_dir"])
def test_path_checks_refuse_an_empty_string(check):
    """The shared checks behind the path-specific functions refuse ``""`` too (and still take ``"."``
    where a folder is meant)."""
    from cyclereg import errors

    with pytest.raises(InputError, match="an empty path"):
        getattr(errors, check)("")
    assert errors.require_output_dir(".") == errors.Path(".")


@pytest.mark.parametrize("stages,text", [([1], "1"), ([0, 1, 2], "0-2"), ([0, 2, 3, 4, 7], "0, 2-4, 7")])
def test_stage_lists_read_as_ranges(stages, text):
    from cyclereg.training.status import stage_list

    assert stage_list(stages) == text


def test_library_takes_python_values_or_names_the_keyword(clouds, tmp_path):
    """Python's natural forms of documented keywords: ``spacing=(sx, sy, sz)`` works as the command's
    "sx,sy,sz" (it raised AttributeError); a count given as text or a fraction is an InputError naming the
    option (they raised TypeError), and nothing is written."""
    import numpy as np

    f, m = clouds / "f.csv", clouds / "m.csv"
    vox_f, vox_m = tmp_path / "f_vox.csv", tmp_path / "m_vox.csv"  # headerless: voxel indices
    for src, dst in ((f, vox_f), (m, vox_m)):
        np.savetxt(dst, np.loadtxt(src, delimiter=",", skiprows=1) / np.array([2.0, 1.0, 1.5]), delimiter=",")
    by_text = api.register(vox_f, vox_m, tmp_path / "a", spacing="2,1,1.5", device="cpu")
    by_tuple = api.register(vox_f, vox_m, tmp_path / "b", spacing=(2, 1.0, 1.5), device="cpu")
    assert by_tuple.path("displacements.csv").read_text() == by_text.path("displacements.csv").read_text()
    for kwargs, message in (({"spacing": (2, 1)}, "--spacing"), ({"spacing": 2.0}, "--spacing"),
                            ({"tta_passes": "2"}, "--tta-passes '2': need a whole number"),
                            ({"recentre_passes": 1.5}, "--recentre-passes 1.5: need a whole number")):
        with pytest.raises(InputError, match=message):
            api.register(vox_f if "spacing" in kwargs else f, vox_m if "spacing" in kwargs else m, tmp_path / "c",
                         device="cpu", **kwargs)
    (tmp_path / "pairs.csv").write_text("id,fixed,moving\na,f.nii.gz,m.nii.gz\nb,f.nii.gz,m.nii.gz\n")
    with pytest.raises(InputError, match="--folds '2': need a whole number"):
        api.keypoints(None, tmp_path / "d", pairs=tmp_path / "pairs.csv", folds="2")
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_library_callers_get_input_errors_json_reports_and_their_rng_back(clouds):
    """Found by a library-user audit: a seed is a whole number >= 0 (1.5 raised deep inside torch on the cloud
    path and was truncated to 1 elsewhere); max_points likewise; ensemble / compare name a missing source or a
    single path given for the list; api.evaluate returns the report as written (it returned config objects
    that json.dumps refused); loading a model leaves torch's global RNG where the caller had it."""
    import nibabel as nib
    import numpy as np
    import torch

    from cyclereg.checkpoint import save_checkpoint
    from cyclereg.clouds.api import combine_cloud_models, load_cloud_model
    from cyclereg.clouds.features import build_graph_net
    from cyclereg.clouds.pipeline import CloudRegConfig
    from cyclereg.compare import compare_reports
    from cyclereg.dense.api import load_model, save_model
    from cyclereg.training.api import pretrain_random

    out = clouds / "out"
    out.mkdir()
    f, m = clouds / "f.csv", clouds / "m.csv"
    for seed, message in ((1.5, "--seed 1.5: need a whole number"), ("x", "--seed 'x': need a whole number"),
                          (-1, "--seed -1: need a whole number from 0"), (True, "--seed True: need a whole number"),
                          # a random network's seed reaches the largest a run's stage-0 network has (errors.MAX_MODEL_SEED)
                          (1000 * 2**32, "--seed 4294967296000: need a whole number from 0 to 4294967295001"),
                          (2**64, "--seed 18446744073709551616: need a whole number")):
        with pytest.raises(InputError, match=re.escape(message)):
            api.register(f, m, out / "r", seed=seed, device="cpu")
    ds = clouds / "dataset.json"
    ds.write_text(json.dumps({"pairs": [{"id": "c0", "fixed_keypoints": "f.csv", "moving_keypoints": "m.csv",
                                         "fixed_landmarks": "l.csv", "moving_landmarks": "ml.csv"}],
                              "folds": [["c0"]]}))
    with pytest.raises(InputError, match="--seed 1.5: need a whole number"):
        api.evaluate(ds, out / "e.json", model="random", seed=1.5)
    for seed in (1.5, 2**64):  # 2**64 raised inside torch, after run.json was written: no re-run could mend it
        with pytest.raises(InputError, match=f"--seed {seed}: need a whole number"):
            pretrain_random(ds, out / "run", seed=seed)
        assert not (out / "run").exists()
    ct = clouds / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32), np.eye(4)),
             str(ct))
    with pytest.raises(InputError, match=re.escape("--max-points must be a whole number >= 0 (0: no limit), got 10.5")):
        api.keypoints(ct, out / "k.csv", max_points=10.5)
    with pytest.raises(InputError, match="does not exist"):
        combine_cloud_models([clouds / "a.pt", clouds / "b.pt"], out / "e.pt")
    with pytest.raises(InputError, match="expected a list"):
        combine_cloud_models(str(clouds / "a.pt"), out / "e.pt")
    with pytest.raises(InputError, match="expected a list of two or more report files, got one path"):
        compare_reports(str(clouds / "a.json"))
    assert not any(out.iterdir())

    # the report as written: JSON types all through
    report = api.evaluate(ds, out / "e.json", model="random", device="cpu")
    assert report == json.loads((out / "e.json").read_text()) and json.dumps(report)
    assert isinstance(report["config"], dict)

    # the caller's random stream is untouched by loading models (their initial values are replaced)
    save_model(clouds / "dense.pt", *load_model("random", 0)[:2])
    for name, seed in (("a.pt", 1), ("b.pt", 2)):
        save_checkpoint(clouds / name, kind="cloud", config=CloudRegConfig(),
                        state_dict=build_graph_net(CloudRegConfig().net, seed=seed).state_dict())
    state = torch.get_rng_state()
    load_model("random", 3)
    load_model(clouds / "dense.pt")
    load_cloud_model(clouds / "a.pt")
    combine_cloud_models([clouds / "a.pt", clouds / "b.pt"], out / "ens.pt")
    assert torch.equal(torch.get_rng_state(), state)


def test_on_off_switches_are_true_or_false(clouds):
    """A library caller's adam="no" counted as on (any non-empty value is truthy); every switch of the three
    entry points takes True or False (None where it means "the model's setting"), else an InputError
    naming it, before any work."""
    out = clouds / "out"
    for kwargs, flag in (({"adam": "no"}, "--adam/--no-adam 'no'"), ({"disp_mm": 1}, "--disp-mm 1"),
                         ({"verbose": "yes"}, "verbose 'yes'")):
        with pytest.raises(InputError, match=re.escape(f"{flag}: expected True or False")):
            api.register(clouds / "f.csv", clouds / "m.csv", out, **kwargs)
    with pytest.raises(InputError, match=re.escape("--resume 'false': expected True or False")):
        api.evaluate(clouds / "dataset.json", out / "r.json", identity=True, resume="false")
    with pytest.raises(InputError, match=re.escape("--lung-mask 0: expected True or False")):
        api.keypoints(clouds / "f.nii.gz", out / "k.csv", lung_mask=0)
    assert not out.exists()
