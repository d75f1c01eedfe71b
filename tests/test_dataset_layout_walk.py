"""Dataset JSON and layout walk (2026-12-07): Learn2Reg ``*_dataset.json`` files as real users bring
them (``./`` prefixes or none, absolute paths, the JSON in another folder than the images, label maps
given for some scans only, ``modality`` as a dict or a text, duplicated and conflicting entries, scans
of one file name in per-subject folders), fed to the readers (``cyclereg.dense.data``) and to
``pretrain-random`` / ``evaluate`` on tiny synthetic volumes. What should happen was decided from the
README, the docstrings and the Learn2Reg convention: the scans used as listed, or a one-line error
naming the file and the entry, never a silent misuse. Cases that break this are pinned as strict
xfails (``BUG: ...``)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from cyclereg.checkpoint import data_fingerprint
from cyclereg.dense.data import load_volume_dataset, training_images
from cyclereg.errors import InputError
from cyclereg_cli.main import app

pytestmark = pytest.mark.usefixtures("one_intraop_thread")
runner = CliRunner()

SHAPE = (16, 16, 16)
SPACING = (1.5, 1.5, 2.0)
FAST = ["--stages", "1", "--iterations", "1", "--device", "cpu"]


def _write(path: Path, k: int, *, label: bool = False) -> Path:
    """A smooth CT-like scan (or its 3-class label map) number ``k``: crops of one random field, shifted by ``k``."""
    rng = np.random.default_rng(0)
    base = ndimage.gaussian_filter(rng.standard_normal((28, 28, 28)), 2.0)
    base = (base - base.mean()) / base.std()
    o = 4 + k % 4
    img = base[o:o + SHAPE[0], 6:6 + SHAPE[1], 5:5 + SHAPE[2]] * 300.0 - 500.0
    data = ((img > -400).astype(np.int16) + (img > -200)) if label else img.astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([*SPACING, 1.0])), str(path))
    return path


def _l2r(root: Path, n: int = 4) -> None:
    """``imagesTr/C_000K_0000.nii.gz`` and ``labelsTr/`` of the same name, ``K = 0 .. n-1``."""
    for k in range(n):
        _write(root / "imagesTr" / f"C_{k:04d}_0000.nii.gz", k)
        _write(root / "labelsTr" / f"C_{k:04d}_0000.nii.gz", k, label=True)


def _img(k: int, prefix: str = "./") -> str:
    return f"{prefix}imagesTr/C_{k:04d}_0000.nii.gz"


def _lab(k: int) -> str:
    return f"./labelsTr/C_{k:04d}_0000.nii.gz"


def _json(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------- handled as documented
@pytest.mark.parametrize("spelling", ["./", "", "absolute"])
def test_paths_with_or_without_dot_slash_or_absolute_name_the_same_scans_and_hold_out_the_val_pair(tmp_path, spelling):
    """Learn2Reg writes ``./imagesTr/...``; users write ``imagesTr/...`` or absolute paths: each names
    the same file, so the registration_val scans are left out of training whatever the spelling."""
    _l2r(tmp_path)

    def img(k):
        return str(tmp_path / _img(k, "")) if spelling == "absolute" else _img(k, spelling)

    ds = _json(tmp_path / "ds.json", {
        "training": [{"image": _img(k), "label": _lab(k)} for k in range(4)],
        "registration_val": [{"fixed": img(0), "moving": img(1)}]})
    assert [p.name for p in training_images(ds)] == ["C_0002_0000.nii.gz", "C_0003_0000.nii.gz"]
    (pair,) = load_volume_dataset(ds).pairs
    assert (pair.fixed, pair.moving) == (tmp_path / _img(0, ""), tmp_path / _img(1, ""))
    assert (pair.fixed_labels, pair.moving_labels) == (tmp_path / _lab(0)[2:], tmp_path / _lab(1)[2:])
    assert pair.id == "0000_0001"


def test_a_dataset_json_in_another_folder_resolves_its_paths_against_its_own_folder(tmp_path):
    """Relative paths are relative to the JSON file (the module docstring), not to the working directory."""
    _l2r(tmp_path / "data")
    ds = _json(tmp_path / "meta" / "ds.json", {
        "training": [{"image": f"../data/{_img(k, '')}", "label": f"../data/{_lab(k)[2:]}"} for k in range(3)],
        "registration_val": [{"fixed": f"../data/{_img(0, '')}", "moving": f"../data/{_img(1, '')}"}]})
    assert training_images(ds) == [tmp_path / "data" / _img(2, "")]
    (pair,) = load_volume_dataset(ds).pairs
    assert pair.moving_labels == tmp_path / "data" / _lab(1)[2:]


def test_label_maps_missing_for_some_entries_are_found_beside_in_labelstr_or_refused_by_evaluate(tmp_path):
    """A training entry without ``label`` (or ``label: null``) falls back to ``labelsTr/`` of the same name;
    where that file is absent too, ``evaluate`` refuses naming the image, instead of scoring without it."""
    _l2r(tmp_path)
    (tmp_path / "labelsTr" / "C_0002_0000.nii.gz").unlink()
    ds = _json(tmp_path / "ds.json", {
        "training": [{"image": _img(0), "label": None}, {"image": _img(1)}, {"image": _img(2)}],
        "registration_val": [{"fixed": _img(0), "moving": _img(1)}, {"fixed": _img(1), "moving": _img(2)}]})
    first, second = load_volume_dataset(ds).pairs
    assert first.fixed_labels == tmp_path / _lab(0)[2:] and first.moving_labels == tmp_path / _lab(1)[2:]
    assert second.moving_labels is None
    res = runner.invoke(app, ["evaluate", str(ds), "--identity", "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 2, res.output
    out = _one_line(res.output)
    assert "C_0002_0000.nii.gz: no label map found for this image" in out
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("modality, expected", [({"0": "CT"}, "CT"), ("MR", "MR"), ({}, None), (None, None)])
def test_modality_as_a_dict_or_a_text(tmp_path, modality, expected):
    _l2r(tmp_path, 2)
    obj = {"training": [{"image": _img(0)}], "registration_val": [{"fixed": _img(0), "moving": _img(1)}]}
    if modality is not None:
        obj["modality"] = modality
    assert load_volume_dataset(_json(tmp_path / "ds.json", obj)).modality == expected


@pytest.mark.parametrize("entry", [{"fixed": _img(0), "moving": _img(1)}, {"label": _lab(0)}, {"image": None}])
def test_a_training_entry_without_an_image_is_refused_naming_the_entry(tmp_path, entry):
    """Paired-task entries (``fixed``/``moving``, Learn2Reg's ``training_paired_images`` shape) are no
    ``training`` images: refused by entry number, not read as nothing."""
    _l2r(tmp_path, 3)
    ds = _json(tmp_path / "ds.json", {"training": [{"image": _img(2)}, entry], "registration_val": []})
    with pytest.raises(InputError, match=r"training entry 1 has no 'image'") as e:
        training_images(ds)
    assert str(e.value).startswith(str(ds))


@pytest.mark.parametrize("shape, spacing, shown", [((16, 16, 18), SPACING, "(16, 16, 18) / (1.5, 1.5, 2) mm"),
                                                   ((16, 16, 16), (1.0, 1.0, 1.0), "(16, 16, 16) / (1, 1, 1) mm")])
def test_training_images_of_other_shapes_or_spacings_are_refused_naming_both_files(tmp_path, shape, spacing, shown):
    _l2r(tmp_path, 3)
    odd = tmp_path / "imagesTr" / "odd.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).normal(size=shape).astype(np.float32),
                             np.diag([*spacing, 1.0])), str(odd))
    ds = _json(tmp_path / "ds.json", {"training": [{"image": _img(1)}, {"image": "imagesTr/odd.nii.gz"},
                                                    {"image": _img(2)}], "registration_val": []})
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), *FAST])
    assert res.exit_code == 2, res.output
    out = _one_line(res.output)
    assert f"{odd}: training images need one shape and spacing: {shown} here" in out
    assert str(tmp_path / _img(1, "")) in out and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- bugs
def test_a_training_image_listed_twice_is_refused_by_name_or_trained_once(tmp_path):
    _l2r(tmp_path, 3)
    ds = _json(tmp_path / "ds.json", {"training": [{"image": _img(0)}, {"image": _img(1)}, {"image": _img(1, "")}],
                                      "registration_val": []})
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), *FAST])
    if res.exit_code == 0:  # the duplicate dropped: one pair of two distinct scans, never a scan with itself
        assert json.loads((tmp_path / "run" / "run.json").read_text())["pairs"] == ["0000_0001"]
    else:
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
        out = _one_line(res.output)
        assert str(ds) in out and "training entr" in out


def test_training_scans_of_one_file_name_in_subject_folders_are_each_recorded(tmp_path):
    paths = [_write(tmp_path / f"sub-0{k}" / "ct.nii.gz", k) for k in range(1, 4)]
    ds = _json(tmp_path / "ds.json", {"training": [{"image": f"sub-0{k}/ct.nii.gz"} for k in range(1, 4)],
                                      "registration_val": []})
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), *FAST])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())["data"]["images"]
    assert sorted(record.values()) == sorted(data_fingerprint(p) for p in paths)


def test_one_image_with_two_different_label_maps_is_refused_naming_the_entries(tmp_path):
    _l2r(tmp_path, 2)
    ds = _json(tmp_path / "ds.json", {
        "training": [{"image": _img(0), "label": _lab(0)}, {"image": _img(0), "label": _lab(1)},
                     {"image": _img(1), "label": _lab(1)}],
        "registration_val": [{"fixed": _img(0), "moving": _img(1)}]})
    with pytest.raises(InputError, match=r"training entr") as e:
        load_volume_dataset(ds)
    assert str(e.value).startswith(str(ds))


def test_a_modality_dict_naming_two_modalities_is_not_read_as_its_first(tmp_path):
    _l2r(tmp_path, 2)
    ds = _json(tmp_path / "ds.json", {"modality": {"0": "MR", "1": "CT"}, "training": [{"image": _img(0)}],
                                      "registration_val": [{"fixed": _img(0), "moving": _img(1)}]})
    with pytest.raises(InputError, match=r"modality") as e:
        load_volume_dataset(ds)
    assert str(e.value).startswith(str(ds))


def test_a_registration_val_pair_of_a_scan_with_itself_is_refused_naming_the_entry(tmp_path):
    _l2r(tmp_path, 2)
    ds = _json(tmp_path / "ds.json", {"training": [{"image": _img(0)}, {"image": _img(1)}],
                                      "registration_val": [{"fixed": _img(1), "moving": _img(0)},
                                                           {"fixed": _img(0), "moving": _img(0, "")}]})
    with pytest.raises(InputError, match=r"registration_val entry 1") as e:
        load_volume_dataset(ds)
    assert str(e.value).startswith(str(ds))


def test_a_blank_training_image_is_refused_naming_the_entry(tmp_path):
    _l2r(tmp_path, 3)
    ds = _json(tmp_path / "ds.json", {"training": [{"image": ""}, {"image": _img(1)}, {"image": _img(2)}],
                                      "registration_val": []})
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), *FAST])
    assert res.exit_code == 2, res.output
    out = _one_line(res.output)
    assert str(ds) in out and "training entry 0" in out


def test_the_labelstr_guess_follows_the_path_as_written_not_a_symlinks_target(tmp_path):
    for k in range(2):
        target = _write(tmp_path / "raw" / f"C_{k:04d}_0000.nii.gz", k)
        _write(tmp_path / "labelsTr" / f"C_{k:04d}_0000.nii.gz", k, label=True)
        (tmp_path / "imagesTr").mkdir(exist_ok=True)
        (tmp_path / "imagesTr" / target.name).symlink_to(target)
    ds = _json(tmp_path / "ds.json", {"training": [{"image": _img(0)}, {"image": _img(1)}],
                                      "registration_val": [{"fixed": _img(0), "moving": _img(1)}]})
    (pair,) = load_volume_dataset(ds).pairs
    assert (pair.fixed_labels, pair.moving_labels) == (tmp_path / _lab(0)[2:], tmp_path / _lab(1)[2:])


def test_a_paired_learn2reg_dataset_trains_only_its_listed_pairs_or_is_refused(tmp_path):
    names = [f"L_{c:04d}_{s:04d}.nii.gz" for c in (1, 2) for s in (0, 1)]
    for k, name in enumerate(names):
        _write(tmp_path / "imagesTr" / name, k)
    ds = _json(tmp_path / "ds.json", {
        "pairings": "paired", "numPairedTraining": 2, "registration_direction": {"fixed": 0, "moving": 1},
        "training": [{"image": f"./imagesTr/{n}"} for n in names],
        "training_paired_images": [{"fixed": f"./imagesTr/{names[0]}", "moving": f"./imagesTr/{names[1]}"},
                                   {"fixed": f"./imagesTr/{names[2]}", "moving": f"./imagesTr/{names[3]}"}],
        "registration_val": []})
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), *FAST])
    if res.exit_code == 0:
        pairs = json.loads((tmp_path / "run" / "run.json").read_text())["pairs"]
        listed = {"0001_0000_0001_0001", "0001_0001_0001_0000", "0002_0000_0002_0001", "0002_0001_0002_0000"}
        assert pairs and set(pairs) <= listed, pairs
    else:
        assert res.exit_code == 2 and "training_paired_images" in _one_line(res.output), res.output


def test_keypoint_paths_are_relative_to_the_json_and_voxel_csvs_land_on_its_grid(tmp_path):
    """A keypoint dataset.json in ``meta/`` naming ``../pts/...``: a headerless (Learn2Reg voxel-index) CSV
    ``(i, j, k)`` along x, y, z lands at ``index * spacing`` with ``spacing_zyx_mm`` reversed; a mm CSV as it is."""
    from cyclereg.datasets import load_keypoint_dataset

    (tmp_path / "pts").mkdir()
    (tmp_path / "pts" / "f.csv").write_text("1,2,3\n4,5,6\n")
    (tmp_path / "pts" / "m.csv").write_text("x_mm,y_mm,z_mm\n1,2,3\n4,5,6\n")
    pair = {"fixed_keypoints": "../pts/f.csv", "moving_keypoints": "../pts/m.csv"}
    ds = load_keypoint_dataset(_json(tmp_path / "meta" / "dataset.json", {
        "pairs": [{"id": "a", **pair}, {"id": 7, **pair}], "folds": [{"test": [7]}, ["a"]],
        "volume_shape_zyx": [10, 20, 30], "spacing_zyx_mm": [2.0, 1.0, 0.5]}))
    assert ds.folds == (("7",), ("a",)) and ds.training_ids(1) == ["a"]
    fixed = ds.read_points(ds.pair("a").fixed_keypoints)
    assert fixed.tolist() == [[0.5, 2.0, 6.0], [2.0, 5.0, 12.0]]
    assert ds.read_points(ds.pair("7").moving_keypoints).tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


@pytest.mark.parametrize("modality", [{"0": 5}, ["CT"], True])
def test_pretrain_random_refuses_a_modality_that_is_no_text_in_one_line(tmp_path, modality):
    _l2r(tmp_path, 3)
    ds = _json(tmp_path / "ds.json", {"modality": modality, "training": [{"image": _img(k)} for k in range(3)],
                                      "registration_val": []})
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), *FAST])
    assert res.exit_code == 2, repr(res.exception)
    assert f"{ds}: 'modality' should name the imaging modality" in _one_line(res.output)


def test_registration_val_pairs_of_scans_outside_training_leave_the_training_set_whole(tmp_path):
    """Val pairs may name scans that no ``training`` entry lists (e.g. in ``imagesTs``): the held-out rule
    leaves out only training scans that are in a val pair, so all training images stay."""
    _l2r(tmp_path, 3)
    for k in (7, 8):
        _write(tmp_path / "imagesTs" / f"C_{k:04d}_0000.nii.gz", k)
    ds = _json(tmp_path / "ds.json", {
        "training": [{"image": _img(k)} for k in range(3)],
        "registration_val": [{"fixed": "./imagesTs/C_0007_0000.nii.gz", "moving": "imagesTs/C_0008_0000.nii.gz"},
                             {"fixed": "./imagesTs/C_0008_0000.nii.gz", "moving": _img(2)}]})
    assert training_images(ds) == [tmp_path / _img(k, "") for k in range(2)]
    assert training_images(ds, held_out=False) == [tmp_path / _img(k, "") for k in range(3)]
    assert [p.id for p in load_volume_dataset(ds).pairs] == ["0007_0008", "0008_0002"]


def test_one_label_map_given_for_two_different_images_is_refused_naming_the_entries(tmp_path):
    _l2r(tmp_path, 2)
    ds = _json(tmp_path / "ds.json", {
        "training": [{"image": _img(0), "label": _lab(0)}, {"image": _img(1), "label": _lab(0)}],
        "registration_val": [{"fixed": _img(0), "moving": _img(1)}]})
    with pytest.raises(InputError, match=r"training entr") as e:
        load_volume_dataset(ds)
    assert str(e.value).startswith(str(ds))


def test_learn2reg_metadata_counts_masks_keypoints_and_test_entries_do_not_change_the_training_list(tmp_path):
    """``numTraining``, ``tensorImageShape`` / ``tensorImageSize`` describe the lists and are not read; ``mask``
    and ``keypoints`` of an entry are ignored; ``test`` images are never training images. The ``training`` list
    itself decides (here 3 entries where ``numTraining`` says 30)."""
    _l2r(tmp_path, 3)
    _write(tmp_path / "imagesTs" / "C_0009_0000.nii.gz", 9)
    ds = _json(tmp_path / "ds.json", {
        "numTraining": 30, "numTest": 1, "tensorImageSize": {"0": "3D"}, "tensorImageShape": {"0": [192, 160, 256]},
        "provided_data": {"0": ["image", "label", "mask", "keypoints"]},
        "training": [{"image": _img(k), "label": _lab(k), "mask": f"./masksTr/C_{k:04d}_0000.nii.gz",
                      "keypoints": f"./keypointsTr/C_{k:04d}_0000.csv"} for k in range(3)],
        "test": [{"image": "./imagesTs/C_0009_0000.nii.gz"}],
        "registration_val": [{"fixed": _img(0), "moving": _img(1)}],
        "registration_test": [{"fixed": "./imagesTs/C_0009_0000.nii.gz", "moving": _img(2)}]})
    assert training_images(ds) == [tmp_path / _img(2, "")]
    assert training_images(ds, held_out=False) == [tmp_path / _img(k, "") for k in range(3)]
    (pair,) = load_volume_dataset(ds).pairs  # registration_test pairs are not evaluated
    assert pair.id == "0000_0001" and pair.fixed_labels == tmp_path / _lab(0)[2:]


def test_val_pairs_names_the_scan_whose_label_map_is_missing(tmp_path):
    for k in range(4):
        _write(tmp_path / "imagesTr" / f"C_{k:04d}_0000.nii.gz", k)
    _write(tmp_path / "labelsTr" / "C_0000_0000.nii.gz", 0, label=True)  # the moving scan C_0001 has none
    ds = _json(tmp_path / "ds.json", {"training": [{"image": _img(k)} for k in range(4)],
                                      "registration_val": [{"fixed": _img(0), "moving": _img(1)}]})
    res = runner.invoke(app, ["pretrain-random", str(ds), "-o", str(tmp_path / "run"), *FAST, "--val-pairs", "1"])
    assert res.exit_code == 2, res.output
    out = _one_line(res.output)
    assert f"{tmp_path / _img(1, '')}: " in out and f"{tmp_path / _img(0, '')}: " not in out


@pytest.mark.parametrize("folds", [{}, 0, "", {"1": ["c0"]}])
def test_keypoint_folds_that_are_no_list_are_refused_not_read_as_none(tmp_path, folds):
    """``"folds": {}`` / ``0`` / ``""`` (or a dict of folds) is no list of folds: refused naming the file, not
    read as a dataset without folds (an absent, null or empty list means none)."""
    from cyclereg.datasets import load_keypoint_dataset

    base = {"pairs": [{"id": "c0", "fixed_keypoints": "f.csv", "moving_keypoints": "m.csv"}]}
    for none in (None, [], "absent"):
        obj = dict(base) if none == "absent" else {**base, "folds": none}
        assert load_keypoint_dataset(_json(tmp_path / "ok.json", obj)).folds == ()
    ds = _json(tmp_path / "ds.json", {**base, "folds": folds})
    with pytest.raises(InputError, match=r"'folds' should be a list of folds") as e:
        load_keypoint_dataset(ds)
    assert str(e.value).startswith(str(ds))


def test_keypoint_pairs_given_as_an_object_are_refused_as_such(tmp_path):
    """``"pairs": {"c0": {...}}`` is no list: named as such (its keys were read as entries: 'pairs[0] needs id')."""
    from cyclereg.datasets import load_keypoint_dataset

    ds = _json(tmp_path / "ds.json", {"pairs": {"c0": {"fixed_keypoints": "f.csv", "moving_keypoints": "m.csv"}}})
    with pytest.raises(InputError, match=r"'pairs' should be a list of .* entries, got dict"):
        load_keypoint_dataset(ds)


def test_a_modality_dict_with_a_value_that_is_no_text_is_named_so(tmp_path):
    """``{"0": "CT", "1": null}``: refused as a value that is no modality name (it was 'several modalities
    (CT, None)')."""
    _l2r(tmp_path, 2)
    ds = _json(tmp_path / "ds.json", {"modality": {"0": "CT", "1": None}, "training": [{"image": _img(0)}],
                                      "registration_val": [{"fixed": _img(0), "moving": _img(1)}]})
    with pytest.raises(InputError, match=r"'modality' should name the imaging modality of each channel"):
        load_volume_dataset(ds)


def test_a_paired_list_giving_both_directions_trains_each_direction_once(tmp_path):
    """``training_paired_images`` listing (a, b) and (b, a) with ``--directions both``: two training pairs,
    not four (each direction was trained twice, the second under an id ``...~2``)."""
    from cyclereg.training.api import _dense_training_set
    from cyclereg.training.dense import DenseCycleConfig

    names = [f"L_0001_{s:04d}.nii.gz" for s in (0, 1)]
    for k, name in enumerate(names):
        _write(tmp_path / "imagesTr" / name, k)
    a, b = (f"./imagesTr/{n}" for n in names)
    ds = _json(tmp_path / "ds.json", {"pairings": "paired", "training": [{"image": a}, {"image": b}],
                                      "training_paired_images": [{"fixed": a, "moving": b}, {"fixed": b, "moving": a}],
                                      "registration_val": []})
    images, pairs = _dense_training_set(ds, DenseCycleConfig(directions="both"))
    assert len(images) == 2 and pairs == [(0, 1), (1, 0)]
