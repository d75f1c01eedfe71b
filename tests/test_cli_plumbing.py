"""Option plumbing: every option of a command reaches its own keyword of the library call (and no other),
options left out take the library's defaults, and what a user passes takes effect and is recorded.

Written by a mutation audit: each test kills one or more mutants that the rest of the suite let through
(swapped keywords, CLI defaults that differ from the library's, ``--device`` ignored, ...)."""

from __future__ import annotations

import importlib
import inspect
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import cyclereg_cli.main as cli
from cyclereg_cli.main import app

from conftest import command_parameters, intraop_threads

runner = CliRunner()

COMMANDS = [  # command function, library function it calls, the library function whose defaults apply
    ("register", "cyclereg.api:register", None),
    ("evaluate", "cyclereg.api:evaluate", None),
    ("keypoints", "cyclereg.api:keypoints", None),
    ("pretrain_random", "cyclereg.training.api:pretrain_random_summary", "cyclereg.training.api:pretrain_random"),
    ("cycle", "cyclereg.training.api:run_cycle", None),
    ("status", "cyclereg.training.status:show_run_status", None),
    ("compare", "cyclereg.compare:compare_reports", None),
    ("ensemble", "cyclereg.clouds.api:combine_cloud_models", None),
    ("demo", "cyclereg.clouds.api:run_demo", None),
]


def _function(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


SIGNATURES = {spec: inspect.signature(_function(spec)) for _, library, defaults in COMMANDS
              for spec in (library, defaults) if spec}
"""The library functions' own signatures (taken before any test replaces a function by a recorder)."""


def _spy(monkeypatch, spec: str) -> list:
    """Replace the library function ``spec`` by a recorder; returns the list its calls go to."""
    calls = []

    class Result(dict):
        summary = "ok"

    module, name = spec.split(":")
    monkeypatch.setattr(importlib.import_module(module), name, lambda *a, **k: calls.append((a, k)) or Result())
    monkeypatch.setattr(cli, "require_inputs", lambda *a, **k: None)  # the paths below need not exist
    monkeypatch.setattr(cli, "require_run_dir", lambda *a, **k: None)
    return calls


def _bound(spec: str, call) -> dict:
    """The call's arguments by the library function's parameter names (``**kwargs`` flattened)."""
    args, kwargs = call
    arguments = dict(SIGNATURES[spec].bind(*args, **kwargs).arguments)
    for name, param in SIGNATURES[spec].parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    return arguments


def _options(function, tmp_path):
    """``(required argv, [(name, param_decls, kind, default)])`` of a command function."""
    required, options = [], []
    for name, info, kind in command_parameters(function):
        if isinstance(info, typer.models.ArgumentInfo):
            many = typing.get_origin(kind) is list
            required += [str(tmp_path / f"arg_{name}_{n}") for n in range(2 if many else 1)]
        elif info.default is ...:  # a required option
            required += [info.param_decls[0], str(tmp_path / f"req_{name}")]
        else:
            options.append((name, info.param_decls, kind, info.default))
    return required, options


def _variants(name, decls, kind, n: int, tmp_path):
    """``(argv, expected value)`` ways to give one option; ``n`` makes values distinct between options."""
    if "/" in decls[0]:  # --x/--no-x: both ways
        on, off = decls[0].split("/")
        return [([on], True), ([off], False)]
    flag = next(d for d in decls if d.startswith("--"))
    if kind is bool:
        return [([flag], True)]
    if name == "device":
        return [([flag, "cpu"], "cpu"), ([flag, "cuda"], "cuda")]
    value = {Path: tmp_path / f"opt_{name}", int: 11 + n, float: 0.125 * (n + 3), str: f"s_{name}"}[kind]
    return [([flag, str(value)], value)]


@pytest.mark.parametrize("command, library, _", COMMANDS)
def test_each_option_given_alone_reaches_its_own_keyword_and_changes_no_other(monkeypatch, tmp_path, command,
                                                                            library, _):
    """An option parsed and passed on under another option's keyword (``tta_passes=recentre_passes``,
    ``refine=weighted``, ``nms_radius_mm=moving_nms_radius``) goes unnoticed when every option of one type
    gets the same value: here each option is given on its own, and the library call must differ from the
    call without options in that keyword alone, by the value given."""
    calls = _spy(monkeypatch, library)
    function = getattr(cli, command)
    required, options = _options(function, tmp_path)
    argv0 = [command.replace("_", "-"), *required]
    assert runner.invoke(app, argv0).exit_code == 0
    baseline = _bound(library, calls.pop())
    renamed = {"sigma": "sigma_mm", "nms_radius": "nms_radius_mm", "moving_nms_radius": "moving_nms_radius_mm",
               "weighted": "weighted_sampling", "snapshot_every": "snapshot_every_s", "stop_below": "stop_below_mm"}
    for n, (name, decls, kind, _default) in enumerate(options):
        for extra, value in _variants(name, decls, kind, n, tmp_path):
            res = runner.invoke(app, [*argv0, *extra])
            assert res.exit_code == 0, (extra, res.output)
            got = _bound(library, calls.pop())
            key = renamed.get(name, name)
            assert key in got and got[key] == value, (command, extra, key, got.get(key))
            changed = {k for k in set(got) | set(baseline) if k != key and got.get(k) != baseline.get(k)}
            assert not changed, (command, extra, {k: (baseline.get(k), got.get(k)) for k in changed})


@pytest.mark.parametrize("command, library, defaults", COMMANDS)
def test_options_left_out_take_the_library_defaults(monkeypatch, tmp_path, command, library, defaults):
    """Without an option the command passes the library function's own default (or None: "not given"),
    so that the command and the library call without that keyword behave alike (a CLI default of
    ``--fusion average`` or ``demo --seed 1`` would silently differ from the documented library default)."""
    calls = _spy(monkeypatch, library)
    required, _ = _options(getattr(cli, command), tmp_path)
    assert runner.invoke(app, [command.replace("_", "-"), *required]).exit_code == 0
    got = _bound(library, calls.pop())
    signature = SIGNATURES[defaults or library].parameters
    for key, value in got.items():
        if str(value).startswith(str(tmp_path)) or isinstance(value, list):
            continue  # the required arguments given above
        param = signature.get(key)
        if param is None or param.default is inspect.Parameter.empty:
            assert value is None, (command, key, value)  # a **options keyword: None means "not given"
        else:
            assert value == param.default, (command, key, value, param.default)


# ----------------------------------------------------------------------------- training: what is given takes effect
FAST = ["--stages", "1", "--epochs", "1", "--train-points", "100,200", "--tta-passes", "0", "--recentre-passes", "0"]


def _keypoint_dataset(tmp_path: Path) -> Path:
    from cyclereg.clouds.synthetic import BreathingConfig

    from conftest import write_synthetic_pairs_dataset

    return write_synthetic_pairs_dataset(tmp_path, BreathingConfig(n_fixed=150, n_moving=300, branches=10, steps=20))


@pytest.fixture
def one_thread():
    with intraop_threads(1):
        yield


def test_device_reaches_pretrain_random_and_cycle(tmp_path, one_thread):
    """``--device`` is resolved, not ignored: an unknown device is refused (exit 2, naming it) by
    pretrain-random before its run directory is made, and by cycle before any stage is trained."""
    ds = _keypoint_dataset(tmp_path)
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST, "--device", "tpu"])
    assert res.exit_code == 2 and "--device tpu" in res.output, res.output
    assert not run.exists()
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--device", "tpu"])
    assert res.exit_code == 2 and "--device tpu" in res.output, res.output
    assert not (run / "fold1" / "stage1.pt").exists()


def test_keypoints_device_is_resolved_and_recorded(tmp_path):
    """keypoints --device: an unknown device is refused before anything is written; a known one is
    the one recorded in OUTPUT.config.json."""
    import nibabel as nib
    from scipy import ndimage as ndi

    from cyclereg.device import resolve_device
    from cyclereg.keypoints.api import config_path_for

    vol = ndi.gaussian_filter(np.random.default_rng(0).standard_normal((16, 16, 16)), 1.5).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    res = runner.invoke(app, ["keypoints", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "kp.csv"), "--device", "tpu"])
    assert res.exit_code == 2 and "--device tpu" in res.output and not (tmp_path / "kp.csv").exists()
    res = runner.invoke(app, ["keypoints", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "kp.csv"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(config_path_for(tmp_path / "kp.csv").read_text())["device"] == "cpu"
    # without --device (auto): the device it resolved to is recorded, not the word "auto"
    res = runner.invoke(app, ["keypoints", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "kp2.csv")])
    assert res.exit_code == 0, res.output
    assert json.loads(config_path_for(tmp_path / "kp2.csv").read_text())["device"] == str(resolve_device("auto"))


def test_cycle_without_snapshot_every_snapshots_at_the_documented_default(monkeypatch, tmp_path):
    """``--snapshot-every`` not given: the documented default interval (60 s), not 0 (= no snapshots)."""
    import cyclereg.training.api as training
    from cyclereg.training.scheduler import DEFAULT_SNAPSHOT_EVERY_S

    got = {}
    monkeypatch.setattr(training, "dataset_kind", lambda _: "keypoints")
    monkeypatch.setattr(training, "_cloud_cycle", lambda *a, **k: got.update(k) or {})
    training.run_cycle(tmp_path / "d.json", tmp_path / "run")
    assert DEFAULT_SNAPSHOT_EVERY_S == 60 and got["snapshot_every_s"] == DEFAULT_SNAPSHOT_EVERY_S
    training.run_cycle(tmp_path / "d.json", tmp_path / "run", snapshot_every_s=0)
    assert got["snapshot_every_s"] == 0


def _config(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["config"]


def test_seed_is_used_recorded_and_kept_by_a_run(tmp_path, one_thread):
    """``--seed S`` is the seed run.json records (and the run trains with); a new run without it has
    seed 0; labelling another fold of the run without ``--seed`` or ``--stages`` takes the run's values
    (the options not given take the run's values), instead of the defaults."""
    ds = _keypoint_dataset(tmp_path)
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "plain"), "--fold", "1", *FAST,
                               "--device", "cpu"]).exit_code == 0
    assert _config(tmp_path / "plain")["seed"] == 0
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST, "--seed", "5",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert _config(run)["seed"] == 5 and _config(run)["stages"] == 1
    # fold 2 without --seed and --stages: the run's seed 5 and 1 stage, not 0 and the paper's 5
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "2", "--epochs", "1",
                              "--train-points", "100,200", "--tta-passes", "0", "--recentre-passes", "0",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert _config(run)["seed"] == 5 and _config(run)["stages"] == 1
    # and the seed is the one the stage-0 network was drawn with: --seed 0 labels as the default does,
    # --seed 5 otherwise
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "zero"), "--fold", "1", *FAST,
                               "--seed", "0", "--device", "cpu"]).exit_code == 0
    labels = {name: _labels(tmp_path / name) for name in ("plain", "zero", "run")}
    assert labels["plain"].keys() == labels["run"].keys() == {"c1"}
    assert torch.equal(labels["plain"]["c1"], labels["zero"]["c1"])
    assert not torch.allclose(labels["plain"]["c1"], labels["run"]["c1"])


def _labels(run: Path) -> dict:
    return torch.load(run / "fold1" / "pseudo0.pt", map_location="cpu", weights_only=True)["labels"]


def test_cycle_stages_extends_the_recorded_target_but_never_shortens_it(tmp_path, one_thread):
    """``cycle --stages T``: T stages are trained (not the run's number), and run.json's number of stages
    only grows (a smaller T stops early without lowering the run's target)."""
    ds = _keypoint_dataset(tmp_path)
    run = tmp_path / "run"
    opts = ["--stages", "2", *FAST[2:], "--device", "cpu"]
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *opts]).exit_code == 0
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--folds", "1", "--stages", "1"])
    assert res.exit_code == 0 and "fold 1: 1" in res.output, res.output
    assert _config(run)["stages"] == 2 and not (run / "fold1" / "stage2.pt").exists()


def test_a_library_config_without_stages_keeps_the_runs_number_of_stages(tmp_path, one_thread):
    """pretrain-random into an existing run without ``stages``: the stored number of stages is kept
    "whatever it is", also when the library's ``config=`` holds another number."""
    from dataclasses import replace

    from cyclereg.training.api import pretrain_random
    from cyclereg.training.clouds import CloudCycleConfig

    ds = _keypoint_dataset(tmp_path)
    run = tmp_path / "run"
    assert runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--fold", "1", *FAST,
                               "--device", "cpu"]).exit_code == 0
    stored = CloudCycleConfig.from_dict(_config(run))
    pretrain_random(ds, run, fold="2", device="cpu", config=replace(stored, stages=3))
    assert _config(run)["stages"] == 1 and (run / "fold2" / "pseudo0.pt").is_file()


# ----------------------------------------------------------------------------- keypoints and lung mask
def test_lung_mask_follows_the_affine_when_the_array_axes_are_permuted():
    """The lung mask is a property of the scan in the world: storing the same CT with its array axes
    permuted (and the affine's columns with them) permutes the mask alike. The voxel size of each array
    axis is the norm of the affine's column of that axis (not of its row): with anisotropic voxels the
    opening and closing radii in voxels differ per axis."""
    from test_keypoints import chest_phantom

    from cyclereg.keypoints.lungmask import lung_mask

    ct, parts = chest_phantom()
    affine = np.diag([1.2, 1.0, 3.0, 1.0])  # lungs of ~80 ml each: above the 50 ml floor
    mask = lung_mask(ct, affine)
    dice = 2 * (mask & parts["lungs"]).sum() / (mask.sum() + parts["lungs"].sum())
    assert dice > 0.95, dice
    for perm in ((2, 0, 1), (1, 2, 0)):
        permuted = np.eye(4)
        permuted[:3, :3] = affine[:3, :3][:, list(perm)]
        np.testing.assert_array_equal(lung_mask(np.ascontiguousarray(ct.transpose(perm)), permuted),
                                      mask.transpose(perm))


def test_max_points_keeps_the_strongest_n_and_zero_keeps_all(tmp_path):
    """``--max-points N`` keeps the N strongest keypoints (N = 1: exactly one, the strongest); 0 keeps every
    keypoint, as many as the detector's candidates recorded in the configuration."""
    import nibabel as nib
    from scipy import ndimage as ndi

    from cyclereg.keypoints.api import config_path_for
    from cyclereg.pointio import read_points

    vol = ndi.gaussian_filter(np.random.default_rng(1).standard_normal((20, 20, 20)), 1.5).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    got = {}
    for n in (0, 1, 2):
        out = tmp_path / f"kp{n}.csv"
        res = runner.invoke(app, ["keypoints", str(tmp_path / "ct.nii.gz"), "-o", str(out), "--max-points", str(n),
                                  "--nms-radius", "2", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        got[n] = read_points(out).numpy()
        record = json.loads(config_path_for(out).read_text())
        assert record["foerstner"]["max_points"] == (None if n == 0 else n)
    assert len(got[0]) == record["num_candidates"] > 2
    assert len(got[1]) == 1 and len(got[2]) == 2
    np.testing.assert_allclose(got[2], got[0][:2])
    np.testing.assert_allclose(got[1], got[0][:1])


def test_the_lung_mask_settings_are_recorded_with_lung_mask(tmp_path):
    """keypoints --lung-mask: OUTPUT.config.json records the lung-mask parameters it used (the defaults
    of LungMaskConfig) and that the mask was automatic; every keypoint lies in the saved mask."""
    import dataclasses

    import nibabel as nib
    from test_keypoints import chest_phantom

    from cyclereg.keypoints.api import config_path_for
    from cyclereg.keypoints.lungmask import LungMaskConfig
    from cyclereg.pointio import read_points

    ct, _ = chest_phantom()
    nib.save(nib.Nifti1Image(ct, np.diag([1.2, 1.0, 3.0, 1.0])), str(tmp_path / "ct.nii.gz"))
    out = tmp_path / "kp.csv"
    res = runner.invoke(app, ["keypoints", str(tmp_path / "ct.nii.gz"), "-o", str(out), "--lung-mask",
                              "--save-mask", str(tmp_path / "m.nii.gz"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    record = json.loads(config_path_for(out).read_text())
    assert record["lung_mask"] is True
    assert record["lung_mask_config"] == json.loads(json.dumps(dataclasses.asdict(LungMaskConfig())))
    saved = np.asarray(nib.load(str(tmp_path / "m.nii.gz")).dataobj) > 0
    vox = np.rint(read_points(out).numpy() / np.array([1.2, 1.0, 3.0])).astype(int)
    assert record["mask_voxels"] == int(saved.sum()) and saved[tuple(vox.T)].all()


# ----------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize("error, code", [("InputError", 2), ("OSError", 2), ("WorkerError", 1), ("ResultError", 1)])
def test_each_kind_of_failure_has_its_exit_code_and_one_line(monkeypatch, tmp_path, error, code):
    """Bad input or an unwritable output: exit 2; a worker that died or a non-finite result: exit 1 (the
    input was fine: running again may help); never 0, always one line on stderr."""
    from cyclereg import errors

    exc = {"InputError": lambda: errors.InputError("bad input"),
           "OSError": lambda: OSError(28, "No space left on device", str(tmp_path / "x")),
           "WorkerError": lambda: errors.WorkerError("worker died"),
           "ResultError": lambda: errors.ResultError("NaN in the result")}[error]

    def fail(*args, **kwargs):
        raise exc()

    monkeypatch.setattr(importlib.import_module("cyclereg.clouds.api"), "run_demo", fail)
    res = runner.invoke(app, ["demo", "--device", "cpu"])
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cyclereg: error: "), res.stderr


@pytest.mark.parametrize("seed, smoothing, sigma_mm, nms_radius_mm, threshold, quantile", [
    (0, 1.0, 1.0, 4.0, 0.01, 0.999), (1, 1.0, 1.0, 4.0, 0.01, 0.999), (7, 0.6, 1.0, 2.0, 0.01, 0.999),
    (7, 0.6, 1.0, 2.0, 1.0, 0.95),  # a threshold that bites: relative to the 95th percentile, not the maximum
])
def test_keypoints_in_a_mask_are_those_of_the_whole_volume_inside_it(seed, smoothing, sigma_mm, nms_radius_mm,
                                                                     threshold, quantile):
    """The detector works on the mask's bounding box plus its support (gradient + Gaussian + NMS radius)
    for speed only: the keypoints are those of the whole-volume computation (distinctiveness, local maxima
    over the NMS box, threshold relative to the eroded mask's quantile, greedy NMS), with anisotropic voxels."""
    from scipy import ndimage as ndi

    from cyclereg.keypoints.foerstner import (FoerstnerConfig, distinctiveness, erode, foerstner_keypoints,
                                              greedy_box_nms, local_maxima)

    img = torch.from_numpy(ndi.gaussian_filter(np.random.default_rng(seed).standard_normal((44, 40, 36)), smoothing))
    spacing = (1.0, 1.5, 0.8)
    mask = torch.zeros(img.shape, dtype=torch.bool)
    mask[12:32, 10:30, 10:28] = True
    config = FoerstnerConfig(sigma_mm=sigma_mm, nms_radius_mm=nms_radius_mm, threshold=threshold,
                             reference_quantile=quantile, max_points=None)
    got = foerstner_keypoints(img, spacing, mask, config).voxels

    dist = distinctiveness(img, spacing, config.sigma_mm)
    inside = erode(mask, config.mask_erosion_voxels)
    radius = config.nms_radius_voxels(spacing)
    reference = torch.quantile(dist[inside], config.reference_quantile)
    cand = local_maxima(dist, radius) & inside & (dist > 0) & (dist >= config.threshold * reference)
    vox = torch.nonzero(cand)
    keep = greedy_box_nms(vox.numpy().astype(np.float64), dist[cand].numpy(), radius)
    want = vox[torch.from_numpy(keep)]
    assert len(want) >= 3
    assert torch.equal(got, want)
    if threshold > 0.1:  # the threshold left out some local maxima of the eroded mask
        assert (local_maxima(dist, radius) & inside).sum() > len(want)


def test_pairs_with_lung_mask_keep_every_scans_keypoints_in_its_lung_mask(tmp_path):
    """keypoints --pairs --lung-mask: every keypoint of every scan lies in that scan's automatic lung mask
    (as one-scan keypoints --lung-mask places them), and the dataset's record says the mask was used."""
    import nibabel as nib
    from test_keypoints import chest_phantom

    from cyclereg.datasets import load_keypoint_dataset
    from cyclereg.keypoints.api import config_path_for
    from cyclereg.keypoints.lungmask import lung_mask
    from cyclereg.pointio import read_points

    affine = np.diag([1.2, 1.0, 3.0, 1.0])
    masks = {}
    for seed in (0, 1):
        ct, _ = chest_phantom(seed=seed)
        nib.save(nib.Nifti1Image(ct, affine), str(tmp_path / f"s{seed}.nii.gz"))
        masks[seed] = lung_mask(ct, affine)
    (tmp_path / "pairs.csv").write_text("id,fixed,moving\np,s0.nii.gz,s1.nii.gz\n")
    res = runner.invoke(app, ["keypoints", "--pairs", str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "ds"),
                              "--lung-mask", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    pair = load_keypoint_dataset(tmp_path / "ds" / "dataset.json").pair("p")
    for path, seed in ((pair.fixed_keypoints, 0), (pair.moving_keypoints, 1)):
        vox = np.rint(read_points(path).numpy() / np.diag(affine)[:3]).astype(int)
        assert len(vox) > 5 and masks[seed][tuple(vox.T)].all()
    assert json.loads(config_path_for(tmp_path / "ds" / "dataset.json").read_text())["lung_mask"] is True


@pytest.mark.parametrize("lung_hu", [-900.0, -550.0])
def test_lung_mask_finds_lungs_anywhere_in_the_documented_parenchyma_range(lung_hu):
    """Lung parenchyma is about -900 to -500 HU (expiration scans lie high in that range): the air
    threshold (-400 HU) must take the whole range as lung, and the body threshold (-500 HU) none of it."""
    from test_keypoints import chest_phantom

    from cyclereg.keypoints.lungmask import lung_mask

    ct, parts = chest_phantom()
    lungs = parts["lungs"]
    parenchyma = lungs & (ct < -500)  # the lungs less their vessels (tissue blobs)
    ct[parenchyma] += lung_hu - (-850.0)
    mask = lung_mask(ct, np.diag([1.2, 1.0, 3.0, 1.0]))
    dice = 2 * (mask & lungs).sum() / (mask.sum() + lungs.sum())
    assert dice > 0.95, dice
    assert not (mask & ~parts["body"]).any() and not (mask & parts["gas"]).any()


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1)])
def test_lungs_cut_by_the_first_and_last_axial_slice_are_found(perm):
    """A scan whose field of view cuts the lungs at its first and last axial slice: the lungs are enclosed
    by the body only in axial slices, so the body's holes must be filled along the axial axis, the array
    axis the affine maps closest to world z (whichever array axis that is)."""
    from test_keypoints import chest_phantom

    from cyclereg.keypoints.lungmask import lung_mask

    ct, parts = chest_phantom()
    ct, lungs = ct[:, :, 10:30], parts["lungs"][:, :, 10:30]  # the lungs span k = 4..36
    affine = np.diag([1.2, 1.0, 3.0, 1.0])
    permuted = np.eye(4)
    permuted[:3, :3] = affine[:3, :3][:, list(perm)]
    mask = lung_mask(np.ascontiguousarray(ct.transpose(perm)), permuted)
    lungs = lungs.transpose(perm)
    dice = 2 * (mask & lungs).sum() / (mask.sum() + lungs.sum())
    assert dice > 0.95, dice


def test_volume_runs_record_the_seed_and_resolve_the_device(tmp_path, one_thread):
    """Volume datasets: ``--seed S`` is the seed run.json records (the stage-0 network is drawn from it),
    and an unknown ``--device`` is refused by pretrain-random and cycle before any work."""
    from test_cycle_dense import _dataset

    ds = _dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    opts = ["--stages", "1", "--iterations", "1", "--max-train-pairs", "1"]
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *opts, "--device", "tpu"])
    assert res.exit_code == 2 and "--device tpu" in res.output and not run.exists(), res.output
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), *opts, "--seed", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert _config(run)["seed"] == 3
    res = runner.invoke(app, ["cycle", str(ds), "--run", str(run), "--device", "tpu"])
    assert res.exit_code == 2 and "--device tpu" in res.output and not (run / "all" / "stage1.pt").exists()


def test_pairs_detect_fixed_scans_with_nms_radius_and_moving_scans_with_moving_nms_radius(tmp_path):
    """keypoints --pairs: each fixed scan's keypoints are the detector's with --nms-radius, each moving
    scan's with --moving-nms-radius (radii that differ in voxels here, so a swap shows), and the record
    gives each scan the radius in voxels that was applied to it."""
    import nibabel as nib
    from scipy import ndimage as ndi

    from cyclereg.datasets import load_keypoint_dataset
    from cyclereg.keypoints.api import config_path_for, detect_keypoints
    from cyclereg.keypoints.foerstner import FoerstnerConfig
    from cyclereg.pointio import read_points
    from cyclereg.volumeio import read_nifti

    for seed in (0, 1):
        vol = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal((26, 24, 22)), 1.0).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / f"s{seed}.nii.gz"))
    (tmp_path / "pairs.csv").write_text("id,fixed,moving\np,s0.nii.gz,s1.nii.gz\n")
    res = runner.invoke(app, ["keypoints", "--pairs", str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "ds"),
                              "--nms-radius", "5", "--moving-nms-radius", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    pair = load_keypoint_dataset(tmp_path / "ds" / "dataset.json").pair("p")

    def detected(seed, radius):
        return detect_keypoints(read_nifti(tmp_path / f"s{seed}.nii.gz"), config=FoerstnerConfig(nms_radius_mm=radius),
                                device="cpu").points_mm.numpy()

    fixed, moving = read_points(pair.fixed_keypoints).numpy(), read_points(pair.moving_keypoints).numpy()
    np.testing.assert_allclose(fixed, detected(0, 5.0), atol=1e-3)
    np.testing.assert_allclose(moving, detected(1, 2.0), atol=1e-3)
    assert len(moving) > len(detected(1, 5.0))  # the radii make a difference
    scans = json.loads(config_path_for(tmp_path / "ds" / "dataset.json").read_text())["scans"]["p"]
    assert scans["fixed"]["nms_radius_voxels"] == [5, 5, 5] and scans["moving"]["nms_radius_voxels"] == [2, 2, 2]


def test_no_stages_note_when_no_stages_were_given_to_a_volume_run(tmp_path, one_thread, capsys):
    """pretrain-random into an existing volume run: "--stages N does not shorten it" is said only when
    ``stages`` was given; a library ``config=`` with fewer stages and no ``stages`` keeps the run's number
    without a note naming an option nobody gave."""
    from dataclasses import replace

    from test_cycle_dense import _dataset

    from cyclereg.training.api import pretrain_random
    from cyclereg.training.dense import DenseCycleConfig

    ds = _dataset(tmp_path / "data", with_labels=False)
    run = tmp_path / "run"
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(run), "--stages", "2", "--iterations", "1",
                              "--max-train-pairs", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    capsys.readouterr()
    pretrain_random(ds, run, device="cpu", config=replace(DenseCycleConfig.from_dict(_config(run)), stages=1))
    assert "--stages" not in capsys.readouterr().err
    assert _config(run)["stages"] == 2
    pretrain_random(ds, run, device="cpu", stages=1)
    assert "does not shorten it" in " ".join(capsys.readouterr().err.split()) and _config(run)["stages"] == 2
