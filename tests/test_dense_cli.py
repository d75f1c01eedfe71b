"""Dense path through files and the CLI: NIfTI round trips, register/evaluate with
typer's CliRunner on tiny synthetic volumes, and bad-input handling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from cyclereg.dense.api import load_model, register_volume_files, save_model
from cyclereg.dense.config import DensePipelineConfig
from cyclereg.dense.network import random_feature_net
from cyclereg.errors import InputError
from cyclereg.frames import mm_disp_to_voxel
from cyclereg.metrics import jacobian_map
from cyclereg.volumeio import Volume, qform_sform_distance_mm, read_nifti, write_nifti
from cyclereg.warp import warp

pytestmark = pytest.mark.usefixtures("one_intraop_thread")
from cyclereg_cli.main import app

from conftest import command_parameters



runner = CliRunner()

SHAPE = (24, 28, 32)
AFFINE = np.array([[0.0, -1.5, 0.0, 10.0],  # a permuted, flipped, anisotropic affine
                   [2.0, 0.0, 0.0, -20.0],
                   [0.0, 0.0, 1.0, 5.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _blob_image(shift=(0, 0, 0), seed=0):
    rng = np.random.default_rng(seed)
    big = rng.standard_normal((40, 44, 48)).astype(np.float32)
    from scipy import ndimage

    big = ndimage.gaussian_filter(big, 2.0)
    o = np.array([8, 8, 8]) - np.array(shift)
    img = big[o[0]:o[0] + SHAPE[0], o[1]:o[1] + SHAPE[1], o[2]:o[2] + SHAPE[2]]
    img = (img - img.min()) / (img.max() - img.min()) * 1000.0
    x = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(float)
    c = np.array(SHAPE) / 2 - np.array(shift)
    lab = (np.linalg.norm(x - c, axis=-1) <= 6).astype(np.int16)
    lab[(np.linalg.norm(x - c - np.array([0, 0, 7]), axis=-1) <= 3)] = 2
    img = img + 400.0 * (lab > 0)
    return img, lab


def _save(path: Path, arr, affine=AFFINE):
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "imagesTr").mkdir()
    (d / "labelsTr").mkdir()
    names = []
    for n, shift in enumerate([(0, 0, 0), (0, 2, 1)], start=1):
        img, lab = _blob_image(shift, seed=0)
        name = f"Tiny_{n:04d}_0000.nii.gz"
        _save(d / "imagesTr" / name, img)
        _save(d / "labelsTr" / name, lab)
        names.append(name)
    ds = {
        "name": "tiny", "modality": {"0": "MRI"},
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "registration_val": [{"fixed": f"./imagesTr/{names[0]}", "moving": f"./imagesTr/{names[1]}"}],
    }
    (d / "Tiny_dataset.json").write_text(json.dumps(ds))
    return d


FAST = ["--warps", "1", "--no-adam"]


def test_cli_register_writes_outputs_and_reloaded_field_reproduces_warp(tiny, tmp_path):
    out = tmp_path / "out"
    fixed = tiny / "imagesTr" / "Tiny_0001_0000.nii.gz"
    moving = tiny / "imagesTr" / "Tiny_0002_0000.nii.gz"
    res = runner.invoke(app, ["register", str(fixed), str(moving), "-o", str(out), "--model", "random",
                              "--seed", "0", "--moving-labels", str(tiny / "labelsTr" / "Tiny_0002_0000.nii.gz"),
                              "--l2r-name", "--jacobian", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for name in ("displacement.nii.gz", "warped.nii.gz", "warped_labels.nii.gz", "config.json",
                 "disp_0001_0002.nii.gz", "jacobian.nii.gz"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["outputs"]["displacement"]["units"] == "voxel"
    assert {"cyclereg_version", "date", "machine"} <= set(cfg)  # where and when, as every record
    assert cfg["command"] == "register"  # as the keypoint path's record says
    assert cfg["config"]["warps"] == 2 and cfg["config"]["use_adam"] is True

    dimg = nib.load(str(out / "displacement.nii.gz"))
    assert np.allclose(dimg.affine, AFFINE)
    assert dimg.header.get_intent() == ("none", (), "disp voxel ijk")  # the file names its unit
    assert b"fixed->moving, voxels" in dimg.header["descrip"].tobytes()
    disp = torch.from_numpy(np.asarray(dimg.dataobj)).permute(3, 0, 1, 2)[None].float()
    assert disp.shape == (1, 3, *SHAPE)
    jac = torch.from_numpy(np.asarray(nib.load(str(out / "jacobian.nii.gz")).dataobj))
    assert np.allclose(nib.load(str(out / "jacobian.nii.gz")).affine, AFFINE)
    torch.testing.assert_close(jac, jacobian_map(disp), atol=1e-5, rtol=0)
    mv = read_nifti(moving)
    again = warp(mv.data[None, None], disp)[0, 0]
    saved = torch.from_numpy(np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj)).float()
    assert torch.allclose(again, saved, atol=1e-3)
    # the registration moved the labels onto the fixed ones (direction is fixed -> moving)
    fl = read_nifti(tiny / "labelsTr" / "Tiny_0001_0000.nii.gz", labels=True).data
    ml = read_nifti(tiny / "labelsTr" / "Tiny_0002_0000.nii.gz", labels=True).data
    wl = read_nifti(out / "warped_labels.nii.gz", labels=True).data
    from cyclereg.metrics import dice

    assert np.mean(list(dice(fl, wl).values())) > np.mean(list(dice(fl, ml).values()))

    # the same registration written in mm converts back to the voxel field
    out_mm = tmp_path / "out_mm"
    res = runner.invoke(app, ["register", str(fixed), str(moving), "-o", str(out_mm), "--disp-mm",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    dmm = torch.from_numpy(np.asarray(nib.load(str(out_mm / "displacement.nii.gz")).dataobj)).permute(3, 0, 1, 2)[None]
    back = mm_disp_to_voxel(dmm.double(), torch.from_numpy(AFFINE)).float()
    assert torch.allclose(back, disp, atol=1e-3)
    assert json.loads((out_mm / "config.json").read_text())["outputs"]["displacement"]["units"] == "mm"
    assert nib.load(str(out_mm / "displacement.nii.gz")).header.get_intent() == ("none", (), "disp mm xyz")
    # again into the first folder without labels, --l2r-name, --jacobian: their files go, the rest stays
    (out / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["register", str(fixed), str(moving), "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "displacement.nii.gz", "notes.txt", "warped.nii.gz"]


def test_cli_evaluate_identity_and_random(tiny, tmp_path):
    ds = tiny / "Tiny_dataset.json"
    rep0 = tmp_path / "id.json"
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(rep0)])
    assert res.exit_code == 0, res.output
    r0 = json.loads(rep0.read_text())
    assert r0["mean_dice"] == pytest.approx(r0["initial_dice"])
    assert r0["mean_sdlogj"] == 0.0 and len(r0["pairs"]) == 1
    # a folder where a figure goes is refused before any work: the earlier report stays as it was
    (tmp_path / "id_dice_cdf.png").unlink()
    (tmp_path / "id_dice_cdf.png").mkdir()
    before = rep0.read_bytes()
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(rep0)])
    assert res.exit_code == 2 and "id_dice_cdf.png: is a folder" in " ".join(res.output.split()), res.output
    assert rep0.read_bytes() == before and not (tmp_path / "id.partial.json").exists()
    (tmp_path / "id_dice_cdf.png").rmdir()

    rep = tmp_path / "rnd.json"
    res = runner.invoke(app, ["evaluate", str(ds), "--model", "random", "--seed", "0", "--both-directions",
                              "--json", str(rep), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    for key in ("mean_dice", "initial_dice", "mean_hd95_mm", "mean_sdlogj", "pairs"):
        assert key in r
    assert len(r["pairs"]) == 2  # both directions
    assert r["mean_dice"] > r["initial_dice"]
    assert r["mean_folding_fraction"] < 0.01
    p = r["pairs"][0]
    for key in ("dice_per_label", "hd95_mm", "sdlogj", "std_logj", "folding_fraction", "seconds"):
        assert key in p
    assert p["scoring_seconds"] > 0 and r["mean_scoring_seconds"] == pytest.approx(
        np.mean([q["scoring_seconds"] for q in r["pairs"]]))
    assert (tmp_path / "rnd_dice_cdf.png").stat().st_size > 0
    assert (tmp_path / "rnd_overlay.png").stat().st_size > 0
    # compare reads the real reports: the identity's Dice is each pair's initial Dice
    res = runner.invoke(app, ["compare", str(rep0), str(rep), "--json", str(tmp_path / "cmp.json")])
    assert res.exit_code == 0, res.output
    c = json.loads((tmp_path / "cmp.json").read_text())["comparisons"][0]
    shared = [q for q in r["pairs"] if q["id"] in {q0["id"] for q0 in r0["pairs"]}]
    assert c["n"] == len(shared) == 1 and c["pairs"][0]["other"] == shared[0]["dice"]
    assert c["pairs"][0]["base"] == pytest.approx(shared[0]["initial_dice"])


def test_missing_or_bad_nifti_exits_2_without_output(tiny, tmp_path):
    out = tmp_path / "never"
    fixed = tiny / "imagesTr" / "Tiny_0001_0000.nii.gz"
    res = runner.invoke(app, ["register", str(fixed), str(tmp_path / "missing.nii.gz"), "-o", str(out)])
    assert res.exit_code == 2
    assert "missing.nii.gz" in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()

    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    res = runner.invoke(app, ["register", str(fixed), str(bad), "-o", str(out)])
    assert res.exit_code == 2
    assert "bad.nii.gz" in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()

    flat = _save(tmp_path / "flat.nii.gz", np.zeros(SHAPE, dtype=np.float32))  # an empty scan: nothing to match
    res = runner.invoke(app, ["register", str(fixed), str(flat), "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 2 and "flat.nii.gz: volume is constant (every voxel 0)" in res.output
    assert not out.exists()


def test_unusable_headers_and_too_small_volumes_exit_2_without_output(tmp_path):
    """A zero voxel size (singular affine), NaN in the affine, complex or RGB voxels, or a volume smaller than
    the network's downsampling: one line naming the file, exit 2, nothing written."""
    out = tmp_path / "never"
    img = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    nan_affine = np.eye(4)
    nan_affine[0, 3] = np.nan
    for name, sform in (("zero_voxel_size.nii.gz", np.diag([2.0, 2.0, 0.0, 1.0])), ("nan_affine.nii.gz", nan_affine)):
        header = nib.Nifti1Header()  # written as given: an image made with an affine would get it repaired
        header.set_data_dtype(np.float32)
        header.set_data_shape(img.shape)
        header.set_sform(sform, code=1)
        nib.save(nib.Nifti1Image(img, None, header=header), str(tmp_path / name))
    _save(tmp_path / "complex.nii.gz", img.astype(np.complex64), np.eye(4))
    rgb = np.zeros(img.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])  # NIfTI's RGB24
    rgb["G"] = (255 * img).astype(np.uint8)
    _save(tmp_path / "rgb.nii.gz", rgb, np.eye(4))
    for name, problem in (("zero_voxel_size.nii.gz", "affine is singular"), ("nan_affine.nii.gz", "affine holds NaN"),
                          ("complex.nii.gz", "complex-valued voxels"), ("rgb.nii.gz", "colour voxels")):
        for cmd in (["register", str(tmp_path / name), str(tmp_path / name), "-o", str(out)],
                    ["keypoints", str(tmp_path / name), "-o", str(out / "k.csv")]):
            res = runner.invoke(app, [*cmd, "--device", "cpu"] if cmd[0] == "register" else cmd)
            assert res.exit_code == 2, (cmd, res.output)
            assert f"{name}: " in res.output and problem in res.output and len(res.output.strip().splitlines()) == 1
            assert not out.exists()
    small = _save(tmp_path / "small.nii.gz", img[:8], np.eye(4))  # (8, 16, 16): one feature voxel along i
    res = runner.invoke(app, ["register", str(small), str(small), "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 2 and "small.nii.gz: volume of shape (8, 16, 16) is too small" in res.output
    assert "at least 9 voxels" in res.output and not out.exists()


def test_grid_mismatch_is_rejected(tiny, tmp_path):
    out = tmp_path / "never"
    fixed = tiny / "imagesTr" / "Tiny_0001_0000.nii.gz"
    img, _ = _blob_image()
    other_shape = _save(tmp_path / "small.nii.gz", img[:20])
    res = runner.invoke(app, ["register", str(fixed), str(other_shape), "-o", str(out)])
    assert res.exit_code == 2 and "small.nii.gz" in res.output and "shape" in res.output
    other_affine = _save(tmp_path / "shifted.nii.gz", img, AFFINE + np.array([[0, 0, 0, 3.0]] * 3 + [[0, 0, 0, 0]]))
    res = runner.invoke(app, ["register", str(fixed), str(other_affine), "-o", str(out)])
    assert res.exit_code == 2 and "shifted.nii.gz" in res.output and "affine" in res.output
    assert not out.exists()


def test_resample_onto_a_grid_shifted_by_whole_voxels_is_the_shifted_array():
    """A volume whose voxel v lies at the reference grid's voxel v + t (t whole voxels) resamples
    onto the reference grid as ``out[x] = vol[x - t]``; outside its extent an image repeats its
    edge value and a label map is background."""
    from cyclereg.dense.data import resample_onto

    t = np.array([2, 1, -3])
    shift = np.eye(4)
    shift[:3, 3] = t
    g = torch.Generator().manual_seed(0)
    img = torch.rand(SHAPE, generator=g)
    lab = torch.randint(1, 5, SHAPE, generator=g)
    ref = Volume(torch.zeros(SHAPE), AFFINE)
    out = resample_onto(Volume(img, AFFINE @ shift), ref)
    out_l = resample_onto(Volume(lab, AFFINE @ shift), ref, labels=True)
    assert out.shape == SHAPE and np.allclose(out.affine, AFFINE) and out_l.data.dtype == lab.dtype
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1) - t
    inside = np.all((idx >= 0) & (idx < np.array(SHAPE)), axis=-1)
    clamped = np.clip(idx, 0, np.array(SHAPE) - 1)
    expected = img.numpy()[clamped[..., 0], clamped[..., 1], clamped[..., 2]]
    np.testing.assert_allclose(out.data.numpy(), expected, atol=1e-5)
    expected_l = np.where(inside, lab.numpy()[clamped[..., 0], clamped[..., 1], clamped[..., 2]], 0)
    np.testing.assert_array_equal(out_l.data.numpy(), expected_l)


def test_cli_register_never_replaces_its_own_input(tiny, tmp_path):
    """A fixed scan kept in the output folder as warped.nii.gz stops register before anything moves in."""
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(tiny / "imagesTr" / "Tiny_0001_0000.nii.gz", out / "warped.nii.gz")
    before = (out / "warped.nii.gz").read_bytes()
    res = runner.invoke(app, ["register", str(out / "warped.nii.gz"), str(tiny / "imagesTr" / "Tiny_0002_0000.nii.gz"),
                              "-o", str(out), *FAST, "--device", "cpu"])
    assert res.exit_code == 2 and "warped.nii.gz" in res.output and "would replace" in res.output, res.output
    assert [p.name for p in out.iterdir()] == ["warped.nii.gz"] and (out / "warped.nii.gz").read_bytes() == before


def test_cli_register_resample_moving_equals_the_same_scan_on_the_fixed_grid(tiny, tmp_path):
    """The moving scan stored with its axes permuted and flipped (another array on another grid,
    the same world image) registers with --resample-moving exactly as the original does."""
    fixed = tiny / "imagesTr" / "Tiny_0001_0000.nii.gz"
    moving = tiny / "imagesTr" / "Tiny_0002_0000.nii.gz"
    labels = tiny / "labelsTr" / "Tiny_0002_0000.nii.gz"
    # N[p, q, r] = M[q, r, P - 1 - p]: voxel (p, q, r) of N is voxel (q, r, P - 1 - p) of M
    to_m = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, SHAPE[2] - 1], [0, 0, 0, 1.0]])
    reordered = {}
    for name, src in (("moving", moving), ("labels", labels)):
        arr = np.asarray(nib.load(str(src)).dataobj)
        reordered[name] = _save(tmp_path / f"{name}_reordered.nii.gz",
                                np.ascontiguousarray(np.flip(arr.transpose(2, 0, 1), 0)), AFFINE @ to_m)
    res = runner.invoke(app, ["register", str(fixed), str(reordered["moving"]), "-o", str(tmp_path / "no"), *FAST])
    assert res.exit_code == 2 and "--resample-moving" in res.output and not (tmp_path / "no").exists()
    fields, warped_labels, warped = [], [], []
    for out, mv, lab, extra in ((tmp_path / "a", moving, labels, []),
                                (tmp_path / "b", reordered["moving"], reordered["labels"], ["--resample-moving"])):
        res = runner.invoke(app, ["register", str(fixed), str(mv), "-o", str(out), "--moving-labels", str(lab),
                                  "--device", "cpu", *FAST, *extra])
        assert res.exit_code == 0 and "lie inside the moving scan" not in res.output, res.output  # covers it
        assert json.loads((out / "config.json").read_text())["inputs"]["moving_resampled_onto_fixed_grid"] is bool(extra)
        fields.append(np.asarray(nib.load(str(out / "displacement.nii.gz")).dataobj))
        warped_labels.append(np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj))
        warped.append(np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj))
    assert fields[1].shape == (*SHAPE, 3)
    np.testing.assert_allclose(fields[1], fields[0], atol=1e-3)
    np.testing.assert_array_equal(warped_labels[1], warped_labels[0])
    np.testing.assert_allclose(warped[1], warped[0], rtol=1e-5, atol=1e-3)  # sampled from the reordered file itself
    # a moving scan 5 m away: nothing of it lands on the fixed grid; said so, not "the volume is constant"
    far_affine = AFFINE.copy()
    far_affine[:3, 3] += 5000.0
    far = _save(tmp_path / "far.nii.gz", np.asarray(nib.load(str(moving)).dataobj), far_affine)
    res = runner.invoke(app, ["register", str(fixed), str(far), "-o", str(tmp_path / "far"), "--resample-moving", *FAST])
    assert res.exit_code == 2 and "does not overlap the fixed scan" in " ".join(res.output.split()), res.output
    assert "far.nii.gz" in res.output and not (tmp_path / "far").exists()
    # beside the fixed scan along one axis only: resampling copies its face across the fixed grid (not one
    # value), which passed as an overlap and registered (exit 0); refused by the world extents now
    beside_affine = AFFINE.copy()
    beside_affine[0, 3] += 1.5 * max(SHAPE) * np.abs(AFFINE[0, :3]).sum()  # along world x only, past its extent
    beside = _save(tmp_path / "beside.nii.gz", np.asarray(nib.load(str(moving)).dataobj), beside_affine)
    res = runner.invoke(app, ["register", str(fixed), str(beside), "-o", str(tmp_path / "bs"), "--resample-moving",
                              *FAST])
    assert res.exit_code == 2 and "does not overlap the fixed scan" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "bs").exists()
    record = json.loads((tmp_path / "b" / "config.json").read_text())["inputs"]
    assert record["fixed_voxels_inside_moving"] == 1.0  # the reordered copy covers the fixed grid
    # three quarters of its extent away along its first axis: registered, with a note that a quarter overlaps
    part_affine = AFFINE.copy()
    part_affine[:3, 3] += 0.75 * SHAPE[0] * AFFINE[:3, 0]
    part = _save(tmp_path / "part.nii.gz", np.asarray(nib.load(str(moving)).dataobj), part_affine)
    res = runner.invoke(app, ["register", str(fixed), str(part), "-o", str(tmp_path / "pt"), "--resample-moving",
                              *FAST])
    inside = json.loads((tmp_path / "pt" / "config.json").read_text())["inputs"]["fixed_voxels_inside_moving"]
    assert res.exit_code == 0 and 0.2 < inside < 0.3, (res.output, inside)
    text = " ".join(res.output.split())
    assert f"note: only {inside:.0%} of the fixed scan's voxels lie inside the moving scan" in text
    assert "part.nii.gz" in text


def test_overlap_fraction_of_shifted_grids_is_the_shared_share():
    """A grid shifted by half its extent along one axis holds half the reference's voxel centres; shifted
    beyond it along one axis, none; rotated about its centre by 90 degrees (a cube), all of them."""
    from cyclereg.dense.data import overlap_fraction

    ref = Volume(torch.zeros(10, 12, 14), np.diag([2.0, 1.0, 1.5, 1.0]))
    for shift_vox, expected in ((5, 0.5), (10, 0.0), (-3, 0.7), (0, 1.0)):
        affine = ref.affine.copy()
        affine[0, 3] = 2.0 * shift_vox  # the volume's voxel i sits at the reference's voxel i + shift
        assert overlap_fraction(Volume(torch.zeros(10, 12, 14), affine), ref) == pytest.approx(expected)
    cube = Volume(torch.zeros(9, 9, 9), np.eye(4))
    turn = np.array([[0, -1, 0, 8], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # voxel (i, j) -> (8 - j, i)
    assert overlap_fraction(Volume(torch.zeros(9, 9, 9), turn), cube) == 1.0
    big = Volume(torch.zeros(200, 3, 3), np.eye(4))  # more centres than the lattice: sampled, ends included
    half = np.eye(4)
    half[0, 3] = 100.0
    assert overlap_fraction(Volume(torch.zeros(200, 3, 3), half), big) == pytest.approx(0.5, abs=1 / 64)


def test_label_maps_must_hold_integers(tmp_path):
    """Float storage of labels is rounded when it is integer up to scaling noise; a map with other
    values (an image given as labels) would have its labels merged by rounding: refused by name."""
    lab = np.zeros(SHAPE, dtype=np.float32)
    lab[2:6, 2:6, 2:6] = 3.0000002
    ok = _save(tmp_path / "ok.nii.gz", lab, AFFINE)
    assert torch.equal(read_nifti(ok, labels=True).data.unique(), torch.tensor([0, 3]))
    lab[1, 1, 1] = 3.5
    bad = _save(tmp_path / "bad.nii.gz", lab, AFFINE)
    with pytest.raises(InputError, match="non-integer values \\(e.g. 3.5\\)") as err:
        read_nifti(bad, labels=True)
    assert "bad.nii.gz" in str(err.value)
    # labels beyond 32 bits would be changed when the warped map is written: refused
    big = np.zeros(SHAPE, dtype=np.int64)
    big[2:4, 2:4, 2:4] = 2**40
    import nibabel as nib
    nib.save(nib.Nifti1Image(big, AFFINE, dtype=np.int64), str(tmp_path / "big.nii.gz"))
    with pytest.raises(InputError, match=f"label value {2**40} does not fit a 32-bit integer") as err:
        read_nifti(tmp_path / "big.nii.gz", labels=True)
    assert "big.nii.gz" in str(err.value)


@pytest.mark.parametrize("dtype, value, named", [
    (np.uint64, 2**64 - 1, "1.84467e+19"),  # cast to int64 it was -1: a label read silently as another
    (np.uint32, 2**31, "2147483648"),
    (np.float32, 1e20, "1e+20"),  # cast to int64 it wrapped: the message named -9223372036854775808
    (np.float32, -3e9, "-3000000000"),
])
def test_a_label_beyond_32_bits_is_named_as_the_file_stores_it(tmp_path, dtype, value, named):
    """The range is checked in the file's own type, before the cast to int64 can wrap the value."""
    lab = np.zeros(SHAPE, dtype=dtype)
    lab[1, 2, 3] = value
    nib.save(nib.Nifti1Image(lab, AFFINE, dtype=dtype), str(tmp_path / "l.nii.gz"))
    with pytest.raises(InputError, match=f"label value {re.escape(named)} does not fit a 32-bit integer"):
        read_nifti(tmp_path / "l.nii.gz", labels=True)


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_the_32_bit_label_extremes_are_read_exactly(tmp_path, dtype):
    lab = np.zeros(SHAPE, dtype=dtype)
    lab[0, 0, 0], lab[1, 1, 1] = -(2**31), 2**31 - 1
    nib.save(nib.Nifti1Image(lab, AFFINE, dtype=dtype), str(tmp_path / "l.nii.gz"))
    data = read_nifti(tmp_path / "l.nii.gz", labels=True).data
    assert int(data[0, 0, 0]) == -(2**31) and int(data[1, 1, 1]) == 2**31 - 1


@pytest.mark.parametrize("value, stored", [(-32768, np.int16), (32767, np.int16), (32768, np.int32),
                                           (-32769, np.int32), (2**31 - 1, np.int32), (-(2**31), np.int32)])
def test_an_integer_map_is_written_in_the_narrowest_type_that_holds_it(tmp_path, value, stored):
    lab = torch.zeros(SHAPE, dtype=torch.int64)
    lab[1, 2, 3] = value
    write_nifti(tmp_path / "l.nii.gz", lab, AFFINE)
    img = nib.load(str(tmp_path / "l.nii.gz"))
    assert img.get_data_dtype() == stored and int(np.asarray(img.dataobj)[1, 2, 3]) == value


@pytest.mark.parametrize("value", [2**31, -(2**31) - 1])
def test_an_integer_map_beyond_32_bits_is_refused_not_wrapped(tmp_path, value):
    """It was cast to int32: 3000000000 was written as -1294967296, and no file is left."""
    lab = torch.zeros(SHAPE, dtype=torch.int64)
    lab[1, 2, 3] = value
    with pytest.raises(ValueError, match=f"integer value {value} does not fit"):
        write_nifti(tmp_path / "l.nii.gz", lab, AFFINE)
    assert not any(tmp_path.iterdir())


def test_checkpoint_roundtrip_and_spacing_check(tiny, tmp_path):
    cfg = DensePipelineConfig(spacing_mm=(2.0, 1.5, 1.0))
    net = random_feature_net(cfg.net, seed=5)
    ck = tmp_path / "model.pt"
    save_model(ck, net, cfg, extra={"stage": 0})
    net2, cfg2, info = load_model(ck)
    assert cfg2 == cfg and info["extra"] == {"stage": 0}
    x = torch.rand(1, 1, 16, 16, 16)
    assert torch.allclose(net(x), net2(x))
    fixed = tiny / "imagesTr" / "Tiny_0001_0000.nii.gz"
    moving = tiny / "imagesTr" / "Tiny_0002_0000.nii.gz"
    # matching spacing (2, 1.5, 1) passes; a model for 1 mm rejects the volume with a clear message
    register_volume_files(fixed, moving, tmp_path / "ok", model=str(ck), warps=1, adam=False, device="cpu")
    cfg3 = DensePipelineConfig(spacing_mm=(1.0, 1.0, 1.0))
    save_model(tmp_path / "iso.pt", net, cfg3)
    with pytest.raises(InputError, match=r"voxel spacing \(2, 1.5, 1\) mm differs from the model's \(1, 1, 1\) mm"):
        register_volume_files(fixed, moving, tmp_path / "no", model=str(tmp_path / "iso.pt"), device="cpu")
    assert not (tmp_path / "no").exists()
    # a checkpoint of another kind is refused
    from cyclereg.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "cloud.pt", kind="cloud", config={}, state_dict={})
    res = runner.invoke(app, ["register", str(fixed), str(moving), "-o", str(tmp_path / "x"), "--model",
                              str(tmp_path / "cloud.pt")])
    assert res.exit_code == 2 and "cloud.pt" in res.output


def test_a_trained_model_refuses_volumes_stored_in_another_orientation(tiny, tmp_path):
    """A model that learnt on voxel arrays stored one way (its checkpoint's orientation) refuses a volume
    whose axes point otherwise (a flip or an axis swap changes the arrays it sees) instead of registering
    it with features of mirrored anatomy; a model without the record (a random network, an older
    checkpoint) accepts any."""
    from cyclereg.volumeio import axis_codes

    fixed = tiny / "imagesTr" / "Tiny_0001_0000.nii.gz"
    moving = tiny / "imagesTr" / "Tiny_0002_0000.nii.gz"
    own = axis_codes(AFFINE)
    assert own == ("A", "L", "S")  # the test affine: i along +y, j along -x, k along +z (nibabel's RAS codes)
    net = random_feature_net(DensePipelineConfig().net, seed=5)
    for orientation, ok in ((own, True), (("R", "A", "S"), False), (None, True)):
        save_model(tmp_path / "m.pt", net, DensePipelineConfig(orientation=orientation))
        out = tmp_path / f"o_{ok}_{orientation is None}"
        if ok:
            register_volume_files(fixed, moving, out, model=str(tmp_path / "m.pt"), warps=1, adam=False, device="cpu")
            assert (out / "displacement.nii.gz").exists()
        else:
            with pytest.raises(InputError, match="its voxel axes point ALS .* stored RAS: .* reorient the volume"):
                register_volume_files(fixed, moving, out, model=str(tmp_path / "m.pt"), device="cpu")
            assert not out.exists()
    assert load_model(tmp_path / "m.pt")[1].orientation is None
    with pytest.raises(ValueError, match="orientation: expected three axis codes"):
        DensePipelineConfig(orientation=("R", "R", "S")).validate()


def test_invalid_warps_rejected(tiny, tmp_path):
    fixed = tiny / "imagesTr" / "Tiny_0001_0000.nii.gz"
    res = runner.invoke(app, ["register", str(fixed), str(fixed), "-o", str(tmp_path / "o"), "--warps", "3"])
    assert res.exit_code == 2 and "--warps" in res.output
    assert not (tmp_path / "o").exists()


def test_learn2reg_loader_labels_and_directions(tiny):
    from cyclereg.dense.data import case_id, load_volume_dataset

    ds = load_volume_dataset(tiny / "Tiny_dataset.json")
    assert len(ds.pairs) == 1 and ds.modality == "MRI"
    p = ds.pairs[0]
    assert p.fixed_labels.name == p.fixed.name and p.fixed_labels.parent.name == "labelsTr"
    assert p.id == "0001_0002" and case_id(Path("AbdomenCTCT_0007_0000.nii.gz")) == "0007"
    both = load_volume_dataset(tiny / "Tiny_dataset.json", both_directions=True)
    assert [q.id for q in both.pairs] == ["0001_0002", "0002_0001"]
    brain = Path(__file__).resolve().parents[1] / "../shared/data/brain-mri/BrainMRI_dataset.json"
    if brain.exists():  # lists both directions already: no duplicates
        assert len(load_volume_dataset(brain, both_directions=True).pairs) == 2


def test_learn2reg_fields_of_a_wrong_type_are_one_line_before_any_work(tiny, tmp_path):
    """'training' that is no list or a 'modality' that names nothing: one line naming the dataset, exit 2,
    no report and no unfinished report."""
    good = json.loads((tiny / "Tiny_dataset.json").read_text())
    for field, value, message in (("training", 5, "'training' should be a list"), ("modality", 5, "'modality' should")):
        ds = tiny / f"bad_{field}.json"  # beside the images, whose paths are relative
        ds.write_text(json.dumps({**good, field: value}))
        try:
            res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(tmp_path / "r.json")])
        finally:
            ds.unlink()
        assert res.exit_code == 2 and message in res.output and f"bad_{field}.json" in res.output, res.output
        assert "Traceback" not in res.output and list(tmp_path.iterdir()) == []


def test_evaluate_without_labels_is_an_input_error(tiny, tmp_path):
    obj = json.loads((tiny / "Tiny_dataset.json").read_text())
    obj["training"] = [{"image": t["image"]} for t in obj["training"]]
    import shutil

    d = tmp_path / "nolab"
    shutil.copytree(tiny / "imagesTr", d / "imagesTr")
    (d / "ds.json").write_text(json.dumps(obj))
    res = runner.invoke(app, ["evaluate", str(d / "ds.json"), "--identity", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "label" in res.output
    assert not (tmp_path / "r.json").exists()
    # a scan that does not exist is named as such (it was called a scan without a label map)
    labelled = json.loads((tiny / "Tiny_dataset.json").read_text())
    labelled["registration_val"].append({"fixed": labelled["registration_val"][0]["fixed"],
                                         "moving": "./imagesTr/Nope.nii.gz"})
    shutil.copytree(tiny / "labelsTr", d / "labelsTr")
    (d / "ds.json").write_text(json.dumps(labelled))
    res = runner.invoke(app, ["evaluate", str(d / "ds.json"), "--identity", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "Nope.nii.gz: file does not exist" in res.output, res.output


@pytest.mark.slow
def test_brain_pair_random_features_acceptance(tmp_path):
    """Issue-3 acceptance on the real brain pair (about 4 min on 2 CPU cores): run with -m slow."""
    from tests.conftest import shared_path

    ds = shared_path("brain-mri", "BrainMRI_dataset.json")
    rep = tmp_path / "brain.json"
    torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))
    res = runner.invoke(app, ["evaluate", str(ds), "--model", "random", "--seed", "0", "--both-directions",
                              "--json", str(rep)])
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    assert len(r["pairs"]) == 2
    assert r["mean_dice"] >= 0.50 and r["initial_dice"] == pytest.approx(0.423, abs=0.001)
    assert r["mean_folding_fraction"] < 0.01 and np.isfinite(r["mean_sdlogj"])


def test_evaluate_checks_every_input_first_and_writes_the_report_only_when_done(tiny, tmp_path, monkeypatch):
    """A bad file in a later pair stops evaluate before any registration, and an earlier report at
    --json is left as it was; an interrupted evaluate keeps its finished pairs in r.partial.json
    (never over the report), which --resume continues and removes."""
    import shutil

    import cyclereg.dense.api as dense_api

    d = tmp_path / "ds"
    shutil.copytree(tiny, d)
    img, lab = _blob_image((1, 0, 2), seed=0)
    _save(d / "imagesTr" / "Tiny_0003_0000.nii.gz", img)
    _save(d / "labelsTr" / "Tiny_0003_0000.nii.gz", lab[:-2])  # its label map lies on another grid
    meta = json.loads((d / "Tiny_dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/Tiny_0003_0000.nii.gz", "label": "./labelsTr/Tiny_0003_0000.nii.gz"})
    meta["registration_val"].append({"fixed": "./imagesTr/Tiny_0001_0000.nii.gz",
                                     "moving": "./imagesTr/Tiny_0003_0000.nii.gz"})
    (d / "Tiny_dataset.json").write_text(json.dumps(meta))
    rep = tmp_path / "r.json"
    rep.write_text('{"an earlier": "report"}')
    args = ["evaluate", str(d / "Tiny_dataset.json"), "--model", "random", *FAST, "--json", str(rep), "--device", "cpu"]
    scored = []
    real_scores = dense_api.pair_scores
    monkeypatch.setattr(dense_api, "pair_scores", lambda *a, **k: scored.append(1) or real_scores(*a, **k))
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "Tiny_0003_0000.nii.gz" in res.output and "label map" in res.output
    assert scored == [] and rep.read_text() == '{"an earlier": "report"}'
    assert not (tmp_path / "r.partial.json").exists()

    _save(d / "labelsTr" / "Tiny_0003_0000.nii.gz", lab)  # mended; now the run is killed after one pair

    def interrupted(*a, **k):
        if scored:
            raise KeyboardInterrupt
        scored.append(1)
        return real_scores(*a, **k)

    monkeypatch.setattr(dense_api, "pair_scores", interrupted)
    assert runner.invoke(app, args).exit_code == 130
    assert rep.read_text() == '{"an earlier": "report"}'
    partial = json.loads((tmp_path / "r.partial.json").read_text())
    assert partial["complete"] is False and [r["id"] for r in partial["pairs"]] == ["0001_0002"]
    monkeypatch.setattr(dense_api, "pair_scores", real_scores)
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    done = json.loads(rep.read_text())
    assert done["complete"] and [r["id"] for r in done["pairs"]] == ["0001_0002", "0001_0003"]
    assert done["pairs"][0] == partial["pairs"][0] and not (tmp_path / "r.partial.json").exists()


def test_evaluate_resume_keeps_finished_pairs(tiny, tmp_path):
    ds = tiny / "Tiny_dataset.json"
    rep = tmp_path / "part.json"
    args = ["evaluate", str(ds), "--model", "random", "--both-directions", *FAST, "--json", str(rep), "--device", "cpu"]
    assert runner.invoke(app, [*args, "--max-pairs", "1"]).exit_code == 0
    first = json.loads(rep.read_text())["pairs"][0]
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    assert len(r["pairs"]) == 2 and r["pairs"][0] == first and r["complete"]
    # a report of another method is not silently merged
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(rep), "--resume"])
    assert res.exit_code == 2 and "another" in res.output
    # nor one scored by the label rule before 2026-12 (no label_scoring entry)
    old = {k: v for k, v in r.items() if k != "label_scoring"}
    old["pairs"], old["complete"] = old["pairs"][:1], False
    rep.write_text(json.dumps(old))
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 2 and "earlier label rule" in " ".join(res.output.split())
    # a report that is no JSON object, or whose pair records lack a field, is one line, not a traceback
    damaged = {**r, "complete": False, "pairs": [{k: v for k, v in r["pairs"][0].items() if k != "dice"}]}
    for text, message in (("[]", "not a report"), (json.dumps(damaged), "are not pair records"),
                          ("[" * 100000, "unreadable")):
        rep.write_text(text)
        res = runner.invoke(app, [*args, "--resume"])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
        assert "Traceback" not in res.output and rep.read_text() == text


def test_evaluate_resume_reads_figures_written_as_null(tiny, tmp_path):
    """A figure that was NaN (e.g. HD95 with every label erased) is written as null (strict JSON); a
    report holding such a record resumes: the table shows '-', the means leave it out."""
    ds = tiny / "Tiny_dataset.json"
    rep = tmp_path / "part.json"
    args = ["evaluate", str(ds), "--identity", "--both-directions", "--json", str(rep)]
    assert runner.invoke(app, [*args, "--max-pairs", "1"]).exit_code == 0
    r = json.loads(rep.read_text())
    r["pairs"][0].update(hd95_mm=None, std_logj=None)
    r["complete"] = False
    rep.write_text(json.dumps(r))
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    done = json.loads(rep.read_text())
    assert done["complete"] and done["pairs"][0]["hd95_mm"] is None
    assert done["mean_hd95_mm"] == done["pairs"][1]["hd95_mm"]


def test_volume_cache_evicts_the_least_recently_used(tiny, monkeypatch):
    """`VolumeCache` keeps the volumes used last: a scan used again stays while others come and go
    (a first-in-first-out cache would drop it and read it again)."""
    import cyclereg.dense.api as dense_api

    reads = []
    real = dense_api.read_nifti
    monkeypatch.setattr(dense_api, "read_nifti", lambda path, **k: reads.append(Path(path).name) or real(path, **k))
    a, b = tiny / "imagesTr" / "Tiny_0001_0000.nii.gz", tiny / "imagesTr" / "Tiny_0002_0000.nii.gz"
    la = tiny / "labelsTr" / "Tiny_0001_0000.nii.gz"
    cache = dense_api.VolumeCache(2)
    for path, labels in ((a, False), (b, False), (a, False), (la, True), (a, False), (b, False)):
        vol = cache.get(path, labels=labels)
        assert vol.path == path and vol.data.dtype == (torch.int64 if labels else torch.float32)
    # a, b, a (kept), la (drops b, not a), a (kept), b (drops la)
    assert reads == ["Tiny_0001_0000.nii.gz", "Tiny_0002_0000.nii.gz", "Tiny_0001_0000.nii.gz",
                     "Tiny_0002_0000.nii.gz"]
    assert reads.count("Tiny_0001_0000.nii.gz") == 2  # the image and the label map of scan 1, once each
    with pytest.raises(InputError, match="capacity 0"):
        dense_api.VolumeCache(0)


def test_evaluate_reads_each_file_once_to_check_it(tiny, tmp_path, monkeypatch):
    """The checking pass reads every distinct scan and label map once (pairs share them), not four
    files per pair; with room for all of them, the whole evaluation reads each file once."""
    import cyclereg.dense.api as dense_api

    reads = []
    real = dense_api.read_nifti
    monkeypatch.setattr(dense_api, "read_nifti", lambda path, **k: reads.append(str(path)) or real(path, **k))
    ds = tiny / "Tiny_dataset.json"
    monkeypatch.setattr(dense_api, "EVALUATE_CACHED_VOLUMES", 1)  # room for one: every use past the checks reads
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--both-directions", "--json", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    # 4 distinct files checked once each, then 2 pairs x 4 files (each a miss with one slot)
    assert len(reads) == 4 + 8 and len(set(reads[:4])) == 4, reads
    reads.clear()
    monkeypatch.setattr(dense_api, "EVALUATE_CACHED_VOLUMES", 4)
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--both-directions", "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 4, reads
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert [r["dice"] for r in a["pairs"]] == [r["dice"] for r in b["pairs"]]


def test_scan_ids_unique_where_a_case_has_several_scans(tmp_path):
    """Learn2Reg names two scans of one case ``X_0001_0000`` / ``X_0001_0001`` (intra-patient tasks):
    the case number alone would give both pairs of a case the same id, and training would hand one
    pair the other's pseudo labels (they are kept by pair id)."""
    from cyclereg.dense.data import scan_ids, load_volume_dataset

    names = ["LungCT_0001_0000", "LungCT_0001_0001", "LungCT_0002_0000", "LungCT_0002_0001", "LungCT_0003_0000"]
    ids = scan_ids([tmp_path / f"{n}.nii.gz" for n in names])
    assert ids == ["0001_0000", "0001_0001", "0002_0000", "0002_0001", "0003"]
    # one scan per case: the case number, as before (stored runs keep their pair ids)
    assert scan_ids([tmp_path / "A_0007_0000.nii.gz", tmp_path / "A_0009_0000.nii.gz"]) == ["0007", "0009"]
    # the same path twice is one scan; equal names in two folders differ
    (tmp_path / "b").mkdir()
    assert scan_ids([tmp_path / "x.nii", tmp_path / "x.nii", tmp_path / "b" / "x.nii"]) == ["x", "x", "x~2"]
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"registration_val": [
        {"fixed": "./imagesTr/LungCT_0001_0000.nii.gz", "moving": "./imagesTr/LungCT_0001_0001.nii.gz"},
        {"fixed": "./imagesTr/LungCT_0002_0000.nii.gz", "moving": "./imagesTr/LungCT_0002_0001.nii.gz"}]}))
    both = [p.id for p in load_volume_dataset(ds_file, both_directions=True).pairs]
    assert both == ["0001_0000_0001_0001", "0001_0001_0001_0000", "0002_0000_0002_0001", "0002_0001_0002_0000"]



def test_a_pair_listed_twice_is_refused_naming_both_entries(tmp_path):
    """A registration_val pair listed twice was dropped silently (the evaluation then had one pair
    fewer than the dataset lists); the reverse direction of a listed pair is another pair."""
    from cyclereg.dense.data import load_volume_dataset

    a, b, c = (f"./imagesTr/A_000{k}_0000.nii.gz" for k in (1, 2, 3))
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"registration_val": [
        {"fixed": a, "moving": b}, {"fixed": b, "moving": c},
        {"fixed": "imagesTr/../imagesTr/A_0001_0000.nii.gz", "moving": b}]}))
    with pytest.raises(InputError, match=r"entries 0 and 2 list the same pair") as e:
        load_volume_dataset(ds_file)
    assert e.value.path == ds_file
    ds_file.write_text(json.dumps({"registration_val": [{"fixed": a, "moving": b}, {"fixed": b, "moving": a}]}))
    assert len(load_volume_dataset(ds_file).pairs) == 2
    assert len(load_volume_dataset(ds_file, both_directions=True).pairs) == 2


@pytest.mark.parametrize("labels", [{"0": {"1": "spleen", "6": "liver"}},  # Learn2Reg: per channel
                                    {"0": "background", "1": "spleen", "6": "liver"},  # flat, with background
                                    {"1": "spleen", "6": "liver"}])  # flat, without
def test_label_names_in_either_dataset_form(tmp_path, labels):
    from cyclereg.dense.data import load_volume_dataset

    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"labels": labels, "registration_val": [
        {"fixed": "./imagesTr/A_0001_0000.nii.gz", "moving": "./imagesTr/A_0002_0000.nii.gz"}]}))
    names = load_volume_dataset(ds_file).label_names
    assert names[1] == "spleen" and names[6] == "liver"  # the flat form with a "0" key lost them all


def test_label_keys_that_are_not_ascii_numbers_are_not_labels(tmp_path):
    """'²' is a digit to str.isdigit but not to int(): such a key is a name, not a label number
    (it stopped the evaluation with a ValueError traceback)."""
    from cyclereg.dense.data import load_volume_dataset

    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"labels": {"0": {"1": "a", "\u00b2": "b", "\u0663": "c"}}, "registration_val": [
        {"fixed": "./imagesTr/A_0001_0000.nii.gz", "moving": "./imagesTr/A_0002_0000.nii.gz"}]}))
    assert load_volume_dataset(ds_file).label_names == {1: "a"}


def test_evaluate_writes_its_unfinished_report_before_the_first_registration(tiny, tmp_path, monkeypatch):
    """An output that cannot be written fails before any registration (it failed after the first pair,
    which takes minutes on real scans): the unfinished report is written once the inputs are checked."""
    import cyclereg.dense.api as dense_api

    calls = []
    real_register = dense_api.register_pair
    monkeypatch.setattr(dense_api, "register_pair", lambda *a, **k: calls.append(1) or real_register(*a, **k))

    def unwritable(path, obj):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(dense_api, "write_json", unwritable)
    res = runner.invoke(app, ["evaluate", str(tiny / "Tiny_dataset.json"), "--model", "random", "--warps", "1",
                              "--no-adam", "--device", "cpu", "--json", str(tmp_path / "r.json")])
    assert res.exit_code != 0 and calls == [], res.output
    assert "Read-only file system" in res.output and "Traceback" not in res.output


def test_cli_evaluate_identity_refuses_a_volume_too_small_for_sdlogj(tmp_path):
    """SDlogJ drops two voxels at each border: a 4-voxel axis cannot be scored, and the identity (which
    registers nothing, so no model's size check applies) names the file before writing anything."""
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    names = []
    for n in (1, 2):
        img = np.random.default_rng(n).normal(size=(12, 4, 12)).astype(np.float32)
        lab = np.zeros((12, 4, 12), dtype=np.uint8)
        lab[3:8, 1:3, 3:8] = 1
        name = f"Small_{n:04d}_0000.nii.gz"
        _save(tmp_path / "imagesTr" / name, img)
        _save(tmp_path / "labelsTr" / name, lab)
        names.append(name)
    ds = tmp_path / "Small_dataset.json"
    ds.write_text(json.dumps({
        "name": "small", "modality": {"0": "MRI"},
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "registration_val": [{"fixed": f"./imagesTr/{names[0]}", "moving": f"./imagesTr/{names[1]}"}]}))
    rep = tmp_path / "id.json"
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(rep)])
    assert res.exit_code == 2, res.output
    assert "Small_0001_0000.nii.gz" in res.output and "too small to score" in res.output and "5 voxels" in res.output
    assert not rep.exists() and not (tmp_path / "id.partial.json").exists()


def test_cli_evaluate_json_never_overwrites_a_scan_or_label_map_of_the_dataset(tiny, tmp_path):
    target = tiny / "labelsTr" / "Tiny_0002_0000.nii.gz"
    before = target.read_bytes()
    res = runner.invoke(app, ["evaluate", str(tiny / "Tiny_dataset.json"), "--identity", "--json", str(target)])
    assert res.exit_code == 2 and "moving label map of pair" in res.output, res.output
    assert target.read_bytes() == before


def test_a_nifti_without_orientation_is_read_as_nibabel_reads_it_with_a_note_once(tmp_path, capfd):
    """qform and sform codes 0: no orientation in the header. Read with nibabel's fallback affine (as every
    tool built on nibabel reads it), and said once per file on stderr: other tools may place it elsewhere."""
    img = nib.Nifti1Image(np.random.default_rng(0).random((6, 7, 8), dtype=np.float32), np.diag([2.0, 1.0, 1.5, 1.0]))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    bare = tmp_path / "bare.nii.gz"
    nib.save(img, str(bare))
    coded = _save(tmp_path / "coded.nii.gz", np.zeros((6, 7, 8), np.float32))
    capfd.readouterr()
    for _ in range(2):
        v = read_nifti(bare)
        read_nifti(coded)
    np.testing.assert_allclose(v.affine, nib.load(str(bare)).affine)
    err = capfd.readouterr().err
    assert err.count("has no orientation") == 1 and "bare.nii.gz" in err and "coded.nii.gz" not in err, err


def test_a_qform_that_disagrees_with_the_sform_is_noted_once_and_the_sform_is_used(tmp_path, capfd):
    """Both codes set, the qform 5 mm along x from the sform (a header edited by one tool and not the other):
    read with the sform, as nibabel reads it, and said once per file, with the distance, on stderr; a file
    whose two forms agree (cyclereg's own outputs) and a file with the sform alone get no note."""
    data = np.random.default_rng(0).random((6, 7, 8), dtype=np.float32)
    sform = np.diag([2.0, 1.0, 1.5, 1.0])
    img = nib.Nifti1Image(data, sform)
    img.set_sform(sform, code=1)
    shifted = sform.copy()
    shifted[0, 3] = 5.0
    img.set_qform(shifted, code=1)
    split = tmp_path / "split.nii.gz"
    nib.save(img, str(split))
    agree = tmp_path / "agree.nii.gz"
    write_nifti(agree, data, sform)  # qform and sform both code 2, equal
    alone = _save(tmp_path / "alone.nii.gz", data, sform)
    capfd.readouterr()
    for _ in range(2):
        v = read_nifti(split)
        read_nifti(agree)
        read_nifti(alone)
    np.testing.assert_allclose(v.affine, sform)
    err = capfd.readouterr().err
    assert err.count("qform and sform disagree") == 1 and "split.nii.gz" in err and "by up to 5 mm" in err, err
    assert "agree.nii.gz" not in err and "alone.nii.gz" not in err, err


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 5, 6)])
def test_the_qform_sform_distance_is_the_largest_corner_displacement(shape):
    """Analytic: a pure shift t moves every corner by |t|; a scale s of axis i moves the last corner along i
    by (s - 1) * (n_i - 1) (most of all corners); a one-voxel grid has one corner."""
    a = np.diag([1.0, 2.0, 3.0, 1.0])
    b = a.copy()
    b[:3, 3] = [3.0, 0.0, 4.0]
    assert qform_sform_distance_mm(shape, a, b) == pytest.approx(5.0)
    c = a.copy()
    c[1, 1] = 2.5
    assert qform_sform_distance_mm(shape, a, c) == pytest.approx(0.5 * (shape[1] - 1))


def test_evaluate_with_a_run_of_keypoint_data_names_the_mismatch(tiny, tmp_path):
    """A keypoint run (its run.json) or a committed folder of per-fold keypoint models given for a volume
    dataset: said so, instead of 'no finished stage yet (run cyclereg cycle)', which invited training it."""
    run = tmp_path / "krun"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "keypoints", "folds": [], "config": {"stages": 1}}))
    models = Path(__file__).resolve().parents[1] / "models" / "copd"
    for folder in (run, models):
        res = runner.invoke(app, ["evaluate", str(tiny / "Tiny_dataset.json"), "--run", str(folder), "--json",
                                  str(tmp_path / "r.json")])
        assert res.exit_code == 2 and "a run of a keypoint dataset, and this is a volume dataset" in res.output, (
            res.output)
        assert str(folder) in res.output and not (tmp_path / "r.json").exists()


def test_register_refuses_replacing_an_input_before_registering(tiny, tmp_path, monkeypatch):
    """`register OUT/warped.nii.gz M -o OUT`: the output warped.nii.gz would replace the fixed scan. Refused
    before the registration (it was refused after it: 27 s at 256 x 256 x 70), nothing written."""
    import cyclereg.dense.api as dense_api

    def no_registration(*args, **kwargs):
        raise AssertionError("registered before the output check")

    monkeypatch.setattr(dense_api, "register_pair", no_registration)
    out = tmp_path / "out"
    out.mkdir()
    fixed = out / "warped.nii.gz"
    fixed.write_bytes((tiny / "imagesTr" / "Tiny_0001_0000.nii.gz").read_bytes())
    moving = tiny / "imagesTr" / "Tiny_0002_0000.nii.gz"
    for extra, name in (([], "warped.nii.gz"), (["--jacobian"], "warped.nii.gz")):
        res = runner.invoke(app, ["register", str(fixed), str(moving), "-o", str(out), *FAST, *extra])
        assert res.exit_code == 2 and f"which its output {name} would replace" in " ".join(res.output.split())
    labels = out / "jacobian.nii.gz"  # a label map named as an optional output: refused only when it is asked
    labels.write_bytes((tiny / "labelsTr" / "Tiny_0002_0000.nii.gz").read_bytes())
    res = runner.invoke(app, ["register", str(moving), str(moving), "-o", str(out), "--moving-labels", str(labels),
                              "--jacobian", *FAST])
    assert res.exit_code == 2 and "which its output jacobian.nii.gz would replace" in " ".join(res.output.split())
    assert sorted(p.name for p in out.iterdir()) == ["jacobian.nii.gz", "warped.nii.gz"]


def test_an_evaluation_stopped_by_a_bad_file_says_one_line_in_a_log(tiny, tmp_path):
    """Where the output is no terminal (a log file, a pipe), the progress bar's last frame ("checking inputs
    ...") was printed before the error line; the log gets the error alone."""
    import shutil

    for sub in ("imagesTr", "labelsTr"):
        shutil.copytree(tiny / sub, tmp_path / sub)
    img, _ = _blob_image((0, 0, 0), seed=0)
    _save(tmp_path / "labelsTr" / "Tiny_0002_0000.nii.gz", np.zeros(tuple(n + 2 for n in img.shape), np.uint8))
    shutil.copy(tiny / "Tiny_dataset.json", tmp_path / "Tiny_dataset.json")
    res = runner.invoke(app, ["evaluate", str(tmp_path / "Tiny_dataset.json"), "--identity", "--json",
                              str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "moving label map has shape" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_evaluate_writes_its_report_and_figures_as_a_set(tiny, tmp_path, monkeypatch):
    """A figure that cannot be written leaves the earlier report and figures as they were (the report was
    replaced beside the earlier run's figures); the unfinished report stays for --resume."""
    import cyclereg.dense.api as dense_api

    ds, rep = tiny / "Tiny_dataset.json", tmp_path / "r.json"
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--both-directions", "--json", str(rep)])
    assert res.exit_code == 0, res.output
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["r.json", "r_dice_cdf.png", "r_overlay.png"]

    def disk_full(path, *args):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(dense_api, "_plot_overlay", disk_full)
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(rep)])
    assert res.exit_code != 0 and str(tmp_path / "r_overlay.png") in " ".join(res.output.split()), res.output
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {k: after[k] for k in before} == before and set(after) - set(before) == {"r.partial.json"}


def test_register_refuses_a_folder_named_like_an_output_before_registering(tiny, tmp_path, monkeypatch):
    """A folder called config.json in the output folder: one line naming it, before the registration,
    and the folder with its contents is left as it was (it was moved aside and deleted)."""
    import cyclereg.dense.api as dense_api

    def no_registration(*args, **kwargs):
        raise AssertionError("registered before the output check")

    monkeypatch.setattr(dense_api, "register_pair", no_registration)
    out = tmp_path / "out"
    (out / "config.json").mkdir(parents=True)
    (out / "config.json" / "notes.txt").write_text("precious")
    scans = [str(tiny / "imagesTr" / f"Tiny_000{k}_0000.nii.gz") for k in (1, 2)]
    res = runner.invoke(app, ["register", *scans, "-o", str(out), *FAST])
    assert res.exit_code == 2 and "is a folder; an output file is needed here" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json" / "notes.txt").read_text() == "precious"


def test_written_nifti_carry_a_qform_equal_to_the_sform_where_one_can_hold_it(tmp_path):
    """Outputs had sform code 2 and qform code 0: readers that take the qform (older ITK and tools built on it)
    saw no orientation. A rotation (or reflection) times voxel sizes is now in both; a sheared affine, which a
    qform cannot hold, stays in the sform alone."""
    theta = 0.3
    rotated = np.eye(4)
    rotated[:3, :3] = np.array([[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0],
                                [0.0, 0.0, 1.0]]) @ np.diag([1.5, 2.0, 3.0])
    rotated[:3, 3] = [10.0, -5.0, 3.0]
    flipped = np.diag([-0.8, 0.8, 2.5, 1.0])
    sheared = rotated.copy()
    sheared[0, 1] += 0.5
    for name, affine, qform_code in (("rot", rotated, 2), ("flip", flipped, 2), ("shear", sheared, 0)):
        path = tmp_path / f"{name}.nii.gz"
        write_nifti(path, torch.zeros(3, 4, 5), affine)
        img = nib.load(str(path))
        assert int(img.header["sform_code"]) == 2 and int(img.header["qform_code"]) == qform_code, name
        np.testing.assert_allclose(img.get_sform(), affine, atol=1e-6)
        np.testing.assert_allclose(img.affine, affine, atol=1e-6)
        if qform_code:
            np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)


def test_a_float_label_map_is_rounded_to_the_nearest_label(tmp_path):
    """Label maps stored as floats a little off their integers (resampling, scaling) read as the nearest label."""
    path = tmp_path / "labels.nii.gz"
    values = np.array([0.0, 0.9996, 2.0004, 2.9996] * 2, dtype=np.float32).reshape(2, 2, 2)
    nib.save(nib.Nifti1Image(values, np.eye(4)), str(path))
    assert read_nifti(path, labels=True).data.flatten().tolist() == [0, 1, 2, 3] * 2


@pytest.mark.parametrize("command, library, renamed", [
    ("register", "cyclereg.api:register", {}),
    ("evaluate", "cyclereg.api:evaluate", {}),
    ("keypoints", "cyclereg.api:keypoints", {"sigma": "sigma_mm", "nms_radius": "nms_radius_mm",
                                             "moving_nms_radius": "moving_nms_radius_mm"}),
    ("pretrain_random", "cyclereg.training.api:pretrain_random_summary", {"weighted": "weighted_sampling"}),
    ("cycle", "cyclereg.training.api:run_cycle", {"snapshot_every": "snapshot_every_s", "stop_below": "stop_below_mm"}),
    ("status", "cyclereg.training.status:show_run_status", {}),
    ("compare", "cyclereg.compare:compare_reports", {}),
    ("ensemble", "cyclereg.clouds.api:combine_cloud_models", {}),
    ("demo", "cyclereg.clouds.api:run_demo", {}),
])
def test_every_cli_option_reaches_the_library_call(monkeypatch, tmp_path, command, library, renamed):
    """The CLI is a thin layer over one library call per command: every option, given a value other than
    its default, arrives in that call under its name (an option parsed and dropped would leave the library
    default in force, e.g. `register --no-ic` registering with inverse consistency)."""
    import importlib
    import typing

    import cyclereg_cli.main as cli

    got = {"kwargs": {}}

    class Result(dict):
        summary = "ok"

    module, name = library.split(":")
    monkeypatch.setattr(importlib.import_module(module), name,
                        lambda *a, **k: got.update(args=a, kwargs=k) or Result())
    monkeypatch.setattr(cli, "require_inputs", lambda *a, **k: None)  # the paths below need not exist
    monkeypatch.setattr(cli, "require_run_dir", lambda *a, **k: None)
    function = getattr(cli, command)
    command = command.replace("_", "-")
    argv, expected, positional = [command], {}, []
    for name, info, kind in command_parameters(function):
        if isinstance(info, typer.models.ArgumentInfo):
            many = typing.get_origin(kind) is list
            paths = [tmp_path / f"arg_{name}_{n}" for n in range(2 if many else 1)]
            positional.append(paths if many else paths[0])
            argv += [str(p) for p in paths]
            continue
        decl = info.param_decls[0]
        if "/" in decl:  # --x/--no-x with default None (the model's setting): give --no-x
            argv.append(decl.split("/")[1])
            value = False
        else:
            flag = next(d for d in info.param_decls if d.startswith("--"))
            if kind is bool:
                argv.append(flag)
                value = True
            else:
                value = "cpu" if name == "device" else {Path: tmp_path / f"opt_{name}", int: 7, float: 0.25,
                                                        str: f"s_{name}"}[kind]
                argv += [flag, str(value)]
        expected[renamed.get(name, name)] = value
    res = runner.invoke(app, argv)
    assert res.exit_code == 0, res.output
    passed = dict(got["kwargs"])
    for value in positional:  # arguments and required options may go positionally
        assert value in got["args"] or value in passed.values(), value
    for name, value in expected.items():
        if value in got["args"] and name not in passed:
            continue
        assert name in passed, f"{command}: option {name} is not passed on"
        assert passed[name] == value, (name, passed[name], value)


def test_cli_register_without_ic_flags_leaves_the_models_setting(monkeypatch, tmp_path):
    """Neither --ic nor --no-ic: None reaches the library (the model's own setting), not False."""
    import cyclereg.api as api

    got = {}

    class Result:
        summary = "ok"

    monkeypatch.setattr(api, "register", lambda *a, **k: got.update(k) or Result())
    res = runner.invoke(app, ["register", "f.nii.gz", "m.nii.gz", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert got["ic"] is None and got["adam"] is None and got["warps"] is None


def test_register_jacobian_file_keeps_folding_negative(tmp_path, monkeypatch):
    # a displacement u_i = -2 i (voxels) maps x -> (-i, j, k): det(I + du/dx) = -1 at every voxel,
    # and the jacobian.nii.gz written by register must say so (no clamping of the folding)
    import nibabel as nib
    import numpy as np
    import torch
    import cyclereg.dense.api as dense_api

    shape = (16, 16, 16)
    rng = np.random.default_rng(0)
    for name in ("f.nii.gz", "m.nii.gz"):
        nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), np.eye(4)), str(tmp_path / name))

    def folding(fixed, moving, net, cfg, **kw):
        disp = torch.zeros(1, 3, *shape)
        disp[0, 0] = -2.0 * torch.arange(shape[0], dtype=torch.float32)[:, None, None]
        return disp

    monkeypatch.setattr(dense_api, "register_pair", folding)
    dense_api.register_volume_files(tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", tmp_path / "out", model="random",
                                    jacobian=True, device="cpu")
    jac = np.asarray(nib.load(str(tmp_path / "out" / "jacobian.nii.gz")).dataobj)
    assert jac.shape == shape
    np.testing.assert_allclose(jac, -1.0, atol=1e-5)


def test_register_l2r_name_file_is_in_voxels_and_disp_mm_is_world_mm(tmp_path, monkeypatch):
    # fixed grid affine diag(2, 3, 4) mm; a constant displacement of (1, 2, 3) voxels is (2, 6, 12) mm.
    # With --disp-mm, displacement.nii.gz holds mm and the Learn2Reg-named file still holds voxels.
    import nibabel as nib
    import numpy as np
    import torch
    import cyclereg.dense.api as dense_api

    shape = (16, 16, 16)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    rng = np.random.default_rng(0)
    for name in ("case_0001_0000.nii.gz", "case_0002_0000.nii.gz"):
        nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), affine), str(tmp_path / name))

    def constant(fixed, moving, net, cfg, **kw):
        return torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1).expand(1, 3, *shape).clone()

    monkeypatch.setattr(dense_api, "register_pair", constant)
    out = tmp_path / "out"
    dense_api.register_volume_files(tmp_path / "case_0001_0000.nii.gz", tmp_path / "case_0002_0000.nii.gz", out,
                                    model="random", disp_mm=True, l2r_name=True, device="cpu")
    l2r = sorted(out.glob("disp_*.nii.gz"))
    assert len(l2r) == 1
    mm = np.asarray(nib.load(str(out / "displacement.nii.gz")).dataobj)
    vox = np.asarray(nib.load(str(l2r[0])).dataobj)
    assert mm.shape == vox.shape == (*shape, 3)
    np.testing.assert_allclose(mm.reshape(-1, 3), np.tile([2.0, 6.0, 12.0], (mm.size // 3, 1)), atol=1e-5)
    np.testing.assert_allclose(vox.reshape(-1, 3), np.tile([1.0, 2.0, 3.0], (vox.size // 3, 1)), atol=1e-5)


def test_one_grid_means_affine_entries_within_the_tolerance_in_mm_whatever_the_origin():
    """GRID_TOLERANCE_MM is absolute: 0.0055 mm apart is another grid at an origin of -500 mm as at 0
    (np.allclose's default relative tolerance of 1e-5 x |entry| would let 0.005 mm more through there)."""
    from cyclereg.volumeio import GRID_TOLERANCE_MM, same_grid

    data = torch.zeros(4, 4, 4)
    for origin in (0.0, -500.0):
        a = np.diag([1.0, 1.0, 1.0, 1.0])
        a[:3, 3] = origin
        for gap, same in ((0.5 * GRID_TOLERANCE_MM, True), (5.5 * GRID_TOLERANCE_MM, False)):
            b = a.copy()
            b[0, 3] += gap
            assert same_grid(Volume(data, a), Volume(data, b)) is same, (origin, gap)


# ----------------------------------------------------------------------------- gaps found by mutation (I/O round)
def test_pair_scores_measure_before_and_after_in_mm():
    """A cube [3, 7)^3 in 12^3 moved 3 voxels along i at spacing (2, 1, 1): before, Dice 1/4 and HD95 6 mm
    (3 voxels of 2 mm); a perfect warp gives Dice 1 and HD95 0 (the initial HD95 was taken from the warped
    labels by a mutant and was 0 too)."""
    from cyclereg.dense.api import pair_scores

    fixed = torch.zeros(12, 12, 12, dtype=torch.int64)
    fixed[3:7, 3:7, 3:7] = 1
    moving = torch.roll(fixed, 3, dims=0)
    s = pair_scores(fixed, moving, fixed.clone(), torch.zeros(1, 3, 12, 12, 12), (2.0, 1.0, 1.0))
    assert s["initial_dice"] == pytest.approx(0.25) and s["dice"] == 1.0
    assert s["initial_hd95_mm"] == pytest.approx(6.0) and s["hd95_mm"] == 0.0


def test_a_pair_counts_as_trained_on_only_when_both_its_scans_were(tmp_path):
    """pairs_of_training_images matches scans by content: with only scan A among the training images, the
    pairs (A, B) and (B, A) are held out; (A, A') with A' a byte copy of A was trained on."""
    from types import SimpleNamespace

    from cyclereg.checkpoint import data_fingerprint
    from cyclereg.dense.api import pairs_of_training_images

    a, b, a2 = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "a2.nii.gz"
    a.write_bytes(b"scan a")
    b.write_bytes(b"scan b")
    a2.write_bytes(b"scan a")
    record = {"images": {"case_a": data_fingerprint(a)}}
    pairs = [SimpleNamespace(id=i, fixed=f, moving=m) for i, f, m in (("ab", a, b), ("ba", b, a), ("aa", a, a2))]
    assert pairs_of_training_images(pairs, record) == ["aa"]
    assert pairs_of_training_images(pairs, None) == []


def test_label_values_at_the_int16_limits_read_back_exactly(tmp_path):
    """An int64 label map is stored in the narrowest type that holds it: 32767 and -32767 fit int16, 32768
    and -32768 do not by |value| < 32768 (a `<=` stored 32768 as int16, which read back as -32768)."""
    from cyclereg.volumeio import write_nifti

    for values in ([0, 32767, -32767], [0, 32768, 1], [0, -32768, 5]):
        arr = np.zeros((4, 4, 4), dtype=np.int64)
        arr[0, 0, :3] = values
        write_nifti(tmp_path / "l.nii.gz", arr, np.eye(4))
        back = read_nifti(tmp_path / "l.nii.gz", labels=True).data
        assert back[0, 0, :3].tolist() == values


def test_evaluate_measures_hd95_in_mm_of_the_scans_grid(tmp_path):
    """Label cubes 3 voxels apart along i on a grid of 2 x 1 x 1 mm: the identity's HD95 is 6 mm before
    and after (a mutant that scored with 1 mm voxels gave 3; every other test has 1 mm voxels)."""
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    names = []
    for n, start in enumerate((6, 9), start=1):
        lab = np.zeros((24, 24, 24), dtype=np.int16)
        lab[start:start + 8, 8:16, 8:16] = 1
        name = f"Mm_{n:04d}_0000.nii.gz"
        _save(tmp_path / "imagesTr" / name, (100.0 * lab + np.arange(24)[:, None, None]).astype(np.float32), affine)
        _save(tmp_path / "labelsTr" / name, lab, affine)
        names.append(name)
    (tmp_path / "d.json").write_text(json.dumps({
        "name": "mm", "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
        "registration_val": [{"fixed": f"./imagesTr/{names[0]}", "moving": f"./imagesTr/{names[1]}"}]}))
    res = runner.invoke(app, ["evaluate", str(tmp_path / "d.json"), "--identity", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    pair = json.loads((tmp_path / "r.json").read_text())["pairs"][0]
    assert pair["initial_hd95_mm"] == pytest.approx(6.0) and pair["hd95_mm"] == pytest.approx(6.0)


def test_resample_moving_interpolates_the_moving_scan_once(tmp_path, monkeypatch):
    """--resample-moving: the warped scan is sampled from the moving scan on its own grid, not from its copy on
    the fixed grid. A moving grid 0.5 mm along x from the fixed one and a field of 0.5 voxels along i: every
    fixed voxel lands on a moving voxel centre, so the warped scan is the moving scan's values exactly (from
    the resampled copy they would be interpolated twice: means of neighbours)."""
    import cyclereg.dense.api as dense_api

    rng = np.random.default_rng(0)
    fixed = rng.random((24, 24, 24)).astype(np.float32) * 100
    moving = rng.random((24, 24, 24)).astype(np.float32) * 100
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    _save(tmp_path / "f.nii.gz", fixed, np.eye(4))
    _save(tmp_path / "m.nii.gz", moving, shifted)
    monkeypatch.setattr(dense_api, "register_pair", lambda fv, mv, *a, **k: torch.stack(
        [torch.full(fv.shape, 0.5), torch.zeros(fv.shape), torch.zeros(fv.shape)])[None])
    res = runner.invoke(app, ["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"),
                              "-o", str(tmp_path / "out"), "--resample-moving", *FAST])
    assert res.exit_code == 0, res.output
    warped = np.asarray(nib.load(str(tmp_path / "out" / "warped.nii.gz")).dataobj)
    np.testing.assert_allclose(warped[:-1], moving[:-1], rtol=0, atol=1e-3)


def test_resume_means_cover_resumed_and_new_pairs_and_only_the_wanted_pairs(tiny, tmp_path):
    """--resume: the report's means are over the resumed records and the new ones (a resumed Dice set to 0
    halves the mean of two pairs), and resuming with fewer pairs keeps only the wanted ones."""
    ds, rep = tiny / "Tiny_dataset.json", tmp_path / "r.json"
    args = ["evaluate", str(ds), "--identity", "--both-directions", "--json", str(rep)]
    assert runner.invoke(app, [*args, "--max-pairs", "1"]).exit_code == 0
    r = json.loads(rep.read_text())
    r["pairs"][0]["dice"] = 0.0  # a resumed record with a known figure
    r["complete"] = False
    rep.write_text(json.dumps(r))
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    done = json.loads(rep.read_text())
    assert done["num_pairs"] == 2 and done["mean_dice"] == pytest.approx(done["pairs"][1]["dice"] / 2)
    res = runner.invoke(app, [*args, "--max-pairs", "1", "--resume"])
    assert res.exit_code == 0, res.output
    one = json.loads(rep.read_text())
    assert [p["id"] for p in one["pairs"]] == [done["pairs"][0]["id"]] and one["num_pairs"] == 1


def test_resume_refuses_a_report_of_another_configuration(tiny, tmp_path):
    """A report made with --warps 1 is not continued with --warps 2 (its pairs would mix two methods)."""
    ds, rep = tiny / "Tiny_dataset.json", tmp_path / "r.json"
    base = ["evaluate", str(ds), "--model", "random", "--both-directions", "--no-adam", "--device", "cpu",
            "--json", str(rep)]
    assert runner.invoke(app, [*base, "--warps", "1", "--max-pairs", "1"]).exit_code == 0
    res = runner.invoke(app, [*base, "--warps", "2", "--resume"])
    assert res.exit_code == 2 and "another" in res.output, res.output
