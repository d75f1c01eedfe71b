"""Contracts of the dense pipeline, its dataset reader and its configuration that a mutation audit found
open (2026-12-07, audit of cyclereg/dense/pipeline.py, data.py, config.py): each test checks an answer
derived by hand (a known count, a known id, an exact message fragment) on tiny inputs and fails on a
specific mutation of the library that the earlier suite let through."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cyclereg.dense.config import DensePipelineConfig, FeatureNetConfig, PreprocessConfig, config_from_dict
from cyclereg.dense.network import random_feature_net
from cyclereg.errors import InputError

pytestmark = pytest.mark.usefixtures("one_intraop_thread")


def _smooth(shape, seed=0, batch=1):
    x = torch.randn(batch, 1, *shape, generator=torch.Generator().manual_seed(seed))
    return F.avg_pool3d(F.pad(x, (1,) * 6, mode="replicate"), 3, stride=1)


# ----------------------------------------------------------------------------- pipeline
def test_a_pair_that_is_not_two_5d_tensors_of_one_shape_is_refused_by_name():
    """(1, 9, 9, 9) lacks the channel axis; a batch of 2 fixed images with 1 moving image is no pair."""
    from cyclereg.dense.pipeline import predict_displacement

    net, cfg, img = random_feature_net(FeatureNetConfig(), 0), DensePipelineConfig(), _smooth((9, 9, 9))
    with pytest.raises(ValueError, match=r"fixed: expected \(B, C, D, H, W\), got \(1, 9, 9, 9\)"):
        predict_displacement(net, img[0], img, cfg)
    with pytest.raises(ValueError, match=r"moving: expected \(B, C, D, H, W\), got \(9, 9, 9\)"):
        predict_displacement(net, img, img[0, 0], cfg)
    with pytest.raises(ValueError, match=r"fixed \(2, 1, 9, 9, 9\) and moving \(1, 1, 9, 9, 9\) must share one grid"):
        predict_displacement(net, img.expand(2, 1, 9, 9, 9), img, cfg)
    with pytest.raises(ValueError, match="stride: must divide the network's downsampling 8, got 0"):
        predict_displacement(net, img, img, cfg, stride=0)


def test_a_strided_prediction_is_in_voxels_of_its_own_grid(monkeypatch):
    """A coarse field of 1 feature voxel everywhere (8 image voxels with the 8x network) is 8 voxels on the image
    grid, 4 on the stride-2 grid and 2 on the stride-4 grid, on every voxel of the (ceil) output grids."""
    import cyclereg.dense.pipeline as pipeline

    monkeypatch.setattr(pipeline, "coarse_field", lambda ff, fm, cfg, ic=False: torch.ones(1, 3, *ff.shape[2:]))
    net, cfg, img = random_feature_net(FeatureNetConfig(), 0), DensePipelineConfig(), _smooth((17, 10, 9))
    with torch.no_grad():
        for stride, shape in ((1, (17, 10, 9)), (2, (9, 5, 5)), (4, (5, 3, 3))):
            out = pipeline.predict_displacement(net, img, img, cfg, stride=stride)
            torch.testing.assert_close(out, torch.full((1, 3, *shape), 8.0 / stride))


def test_register_checks_its_configuration_first():
    """A library caller's DensePipelineConfig(warps=3) registered with one warp: register validates it."""
    from cyclereg.dense.pipeline import register

    img = _smooth((9, 9, 9))
    with pytest.raises(ValueError, match="warps must be 1 or 2, got 3"):
        register(img, img, random_feature_net(FeatureNetConfig(), 0), DensePipelineConfig(warps=3))


def test_register_of_a_batch_registers_each_pair_on_its_own():
    """Pair b of a batch is fixed[b] -> moving[b]: the batch's fields are those of the pairs registered one by one."""
    from cyclereg.dense.pipeline import register

    f, m = _smooth((12, 10, 9), seed=1, batch=2), _smooth((12, 10, 9), seed=2, batch=2)
    net, cfg = random_feature_net(FeatureNetConfig(), 0), DensePipelineConfig(warps=1, use_adam=False)
    both = register(f, m, net, cfg)
    assert both.shape == (2, 3, 12, 10, 9)
    for b in range(2):
        torch.testing.assert_close(both[b:b + 1], register(f[b:b + 1], m[b:b + 1], net, cfg), rtol=0, atol=1e-6)
    assert not torch.allclose(both[0], both[1])  # two different pairs: not one field twice


def test_register_runs_inverse_consistency_in_both_passes_and_refines_on_the_original_moving_features(monkeypatch):
    """Each of the two passes gets ``ic=cfg.use_ic`` and the padded fixed image's features, the second the moving
    image warped by the first pass's field; Adam refines the
    composed field on the projected early features of the padded fixed and of the *original* (unwarped) moving
    image, on the grid of the ``adam_layer`` features: stride 4 for strides (2, 2, 1, 1, 2, 1), where the whole
    network downsamples by 8."""
    import cyclereg.dense.pipeline as pipeline

    netcfg = FeatureNetConfig(strides=(2, 2, 1, 1, 2, 1), adam_layer=2)
    assert (netcfg.downsampling, netcfg.adam_downsampling) == (8, 4)
    net = random_feature_net(netcfg, 0).eval()
    shape = (9, 10, 11)  # padded to 16^3
    fixed, moving = _smooth(shape, seed=3), _smooth(shape, seed=4)
    shift = torch.zeros(1, 3, 16, 16, 16)
    shift[0, 1] = 1.0
    passes, movings, refined = [], [], {}

    def predict(net_, f, m, cfg, *, ic, feat_fix, stride=1):
        assert f.shape[2:] == (16, 16, 16) and torch.equal(feat_fix, net(f))
        passes.append(ic)
        movings.append(m.clone())
        return shift.clone()

    def refine(adam_fix, adam_mov, disp, downsampling, acfg):
        refined.update(fix=adam_fix, mov=adam_mov, disp=disp.clone(), ds=downsampling)
        return disp

    monkeypatch.setattr(pipeline, "predict_displacement", predict)
    monkeypatch.setattr(pipeline, "adam_refine", refine)
    for use_ic in (True, False):
        passes.clear(), movings.clear()
        out = pipeline.register(fixed, moving, net, DensePipelineConfig(net=netcfg, use_ic=use_ic))
        assert passes == [use_ic, use_ic]
    # pass 2 sees the moving image (not the fixed one) warped by pass 1's field
    padded_moving = pipeline.pad_to_multiple(moving, 8)
    torch.testing.assert_close(movings[0], padded_moving)
    torch.testing.assert_close(movings[1], pipeline.warp_unchecked(padded_moving, shift))
    with torch.no_grad():
        torch.testing.assert_close(refined["fix"], net.adam_features(pipeline.pad_to_multiple(fixed, 8)))
        torch.testing.assert_close(refined["mov"], net.adam_features(pipeline.pad_to_multiple(moving, 8)))
    assert refined["ds"] == 4
    # the two 1-voxel shifts along j composed: 2 voxels, cropped to the image grid
    assert out.shape == (1, 3, *shape)
    torch.testing.assert_close(out[0, 1], torch.full(shape, 2.0))
    torch.testing.assert_close(refined["disp"][0, 1, :8, :8, :8], torch.full((8, 8, 8), 2.0))


# ----------------------------------------------------------------------------- data: preprocessing
def test_the_modality_hint_names_ct_as_a_word_or_a_prefix_and_mri_by_its_sequences():
    """'Abdomen CT' names CT as a word, 'CTA' as a prefix; 'T2' and 'T1w' are MRI sequences: each overrides
    the intensities (those of the other modality here)."""
    from cyclereg.dense.data import resolve_mode

    cfg, ct, mr = PreprocessConfig(), torch.tensor([-1000.0, 50.0]), torch.tensor([0.0, 800.0])
    assert resolve_mode(mr, cfg, "Abdomen CT") == "ct"
    assert resolve_mode(mr, cfg, "CTA") == "ct"
    assert resolve_mode(ct, cfg, "T2") == "mri" and resolve_mode(ct, cfg, "T1w") == "mri"
    assert resolve_mode(ct, cfg, "") == "ct"  # no hint: the intensities


def test_auto_mode_is_ct_only_strictly_below_the_threshold():
    """"CT when the volume's minimum is below auto_ct_below_hu": a minimum of exactly -200 HU is MRI."""
    from cyclereg.dense.data import resolve_mode

    cfg = PreprocessConfig()
    assert resolve_mode(torch.tensor([-200.0, 10.0]), cfg) == "mri"
    assert resolve_mode(torch.tensor([-200.5, 10.0]), cfg) == "ct"
    assert resolve_mode(torch.tensor([-1.0]), PreprocessConfig(auto_ct_below_hu=0.0)) == "ct"


def test_mri_normalisation_maps_the_percentiles_to_0_and_1_and_clips_beyond():
    """Values 0..100 (101 of them): the 1st / 99th percentiles are 1 and 99, so x -> (x - 1) / 98, clipped to
    [0, 1]; a constant image (zero range) gives 0 everywhere, not NaN; 'none' only casts to float."""
    from cyclereg.dense.data import preprocess

    x = torch.arange(101.0)
    out = preprocess(x, PreprocessConfig(mode="mri"))
    want = ((x - 1) / 98).clamp(0, 1)
    torch.testing.assert_close(out, want)
    assert out[0] == 0 and out[100] == 1 and out[50].item() == pytest.approx(49 / 98)
    torch.testing.assert_close(preprocess(torch.full((4, 4), 7.0), PreprocessConfig(mode="mri")), torch.zeros(4, 4))
    ints = torch.arange(5, dtype=torch.int16)
    none = preprocess(ints, PreprocessConfig(mode="none"))
    assert none.dtype == torch.float32 and torch.equal(none, torch.arange(5.0))
    with pytest.raises(ValueError, match="unknown preprocessing mode 'pet'"):
        preprocess(x, PreprocessConfig(), mode="pet")


# ----------------------------------------------------------------------------- data: grids
def test_check_pair_grids_names_the_file_and_the_scan_it_differs_from():
    """Each label map is checked against its own scan: the moving label map against the moving image."""
    from cyclereg.dense.data import check_pair_grids
    from cyclereg.volumeio import Volume

    def vol(name, shape=(4, 5, 6), shift=0.0):
        affine = np.eye(4)
        affine[0, 3] = shift
        return Volume(torch.zeros(shape), affine, Path(name))

    f, m, fl, ml = vol("f.nii"), vol("m.nii"), vol("fl.nii"), vol("ml.nii")
    check_pair_grids(f, m, fl, ml)
    for args, path, message in (
            ((f, vol("m.nii", (4, 5, 7)), fl, ml), "m.nii", r"moving image has shape \(4, 5, 7\) but the fixed image f.nii"),
            ((f, m, vol("fl.nii", shift=1.0), ml), "fl.nii", "fixed label map has a different affine .* than the fixed image f.nii"),
            ((f, m, fl, vol("ml.nii", (3, 5, 6))), "ml.nii", r"moving label map has shape \(3, 5, 6\) but the moving image m.nii")):
        with pytest.raises(InputError, match=message) as e:
            check_pair_grids(*args)
        assert e.value.path == Path(path)


def test_a_resampled_volume_keeps_its_own_file_name_for_later_messages():
    from cyclereg.dense.data import resample_onto
    from cyclereg.volumeio import Volume

    ref = Volume(torch.zeros(4, 4, 4), np.eye(4), Path("fixed.nii"))
    for labels in (False, True):
        out = resample_onto(Volume(torch.ones(3, 3, 3, dtype=torch.int64 if labels else torch.float32),
                                   np.eye(4), Path("moving.nii")), ref, labels=labels)
        assert out.path == Path("moving.nii") and out.shape == (4, 4, 4)
        assert out.data[2, 2, 2] == 1 and out.data[3, 3, 3] == (0 if labels else 1)  # beyond: background / edge


def test_overlap_counts_the_reference_centres_inside_the_other_volumes_own_extent():
    """A 4^3 volume at the origin of an 8^3 reference (1 mm voxels both): 4^3 of the 8^3 centres, 1/8; the other
    way round all of the small grid's centres lie in the large one."""
    from cyclereg.dense.data import overlap_fraction
    from cyclereg.volumeio import Volume

    small, large = Volume(torch.zeros(4, 4, 4), np.eye(4)), Volume(torch.zeros(8, 8, 8), np.eye(4))
    assert overlap_fraction(small, large) == pytest.approx(1 / 8)
    assert overlap_fraction(large, small) == 1.0


def test_a_constant_volume_is_refused_naming_its_file_and_value():
    from cyclereg.dense.data import require_contrast
    from cyclereg.volumeio import Volume

    with pytest.raises(InputError, match=r"volume is constant \(every voxel -3.5\): nothing to register") as e:
        require_contrast(Volume(torch.full((3, 3, 3), -3.5), np.eye(4), Path("flat.nii.gz")))
    assert e.value.path == Path("flat.nii.gz")
    ok = Volume(torch.zeros(3, 3, 3), np.eye(4), Path("ok.nii"))
    ok.data[1, 1, 1] = 1e-3
    assert require_contrast(ok) is ok


# ----------------------------------------------------------------------------- data: Learn2Reg datasets
def _dataset(tmp_path, obj, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def _touch(tmp_path, *rels):
    for rel in rels:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")


def test_case_id_is_the_second_to_last_part_and_scan_ids_refine_step_by_step(tmp_path):
    """case_id: the part before the scan number (``2023_0007_0000`` -> ``0007``, not the first number), else the
    first number, else the stem. scan_ids: case and scan number only where both are numbers (``A_0001_mask`` is
    its stem); the stem where case and scan number repeat (two data sets' ``0001_0000``)."""
    from cyclereg.dense.data import case_id, scan_ids

    assert case_id(Path("2023_0007_0000.nii.gz")) == "0007" and case_id(Path("BraTS_2021_0007_0000.nii.gz")) == "0007"
    assert case_id(Path("case_0012.nii")) == "0012" and case_id(Path("brain_scan.nii.gz")) == "brain_scan"
    assert scan_ids([tmp_path / "A_0001_0000.nii.gz", tmp_path / "A_0001_mask.nii.gz"]) == ["0001_0000", "A_0001_mask"]
    assert scan_ids([tmp_path / "A_0001_0000.nii.gz", tmp_path / "B_0001_0000.nii.gz", tmp_path / "A_0002_0000.nii"]) \
        == ["A_0001_0000", "B_0001_0000", "0002"]


def test_label_maps_come_from_training_and_test_entries_before_the_labelstr_guess(tmp_path):
    """Pair (A1 -> T9): A1's label map is its 'training' entry's (not the labelsTr file beside it), the test
    scan T9's its 'test' entry's; for B2 -> B3 in imagesTs the labelsTs file of the same name is found, and
    B3 has none (no such file: None, not a path that does not exist)."""
    from cyclereg.dense.data import load_volume_dataset

    _touch(tmp_path, "labelsTr/A_0001_0000.nii.gz", "labelsTs/B_0002_0000.nii.gz")
    ds = load_volume_dataset(_dataset(tmp_path, {
        "training": [{"image": "./imagesTr/A_0001_0000.nii.gz", "label": "./other/A1_seg.nii.gz"}],
        "test": [{"image": "./imagesTs/T_0009_0000.nii.gz", "label": "./labelsTs/T9_seg.nii.gz"}],
        "registration_val": [{"fixed": "./imagesTr/A_0001_0000.nii.gz", "moving": "./imagesTs/T_0009_0000.nii.gz"},
                             {"fixed": "./imagesTs/B_0002_0000.nii.gz", "moving": "./imagesTs/B_0003_0000.nii.gz"}]}))
    first, second = ds.pairs
    root = tmp_path.resolve()
    assert first.fixed_labels == root / "other" / "A1_seg.nii.gz"
    assert first.moving_labels == root / "labelsTs" / "T9_seg.nii.gz"
    assert second.fixed_labels == root / "labelsTs" / "B_0002_0000.nii.gz"
    assert second.moving_labels is None
    assert [p.id for p in ds.pairs] == ["0001_0009", "0002_0003"]
    assert ds.name == "ds" and ds.modality is None  # no 'name': the file's stem


def test_a_dataset_without_pairs_or_with_an_incomplete_pair_is_refused_naming_the_entry(tmp_path):
    from cyclereg.dense.data import load_volume_dataset

    for val, message in (([], "no 'registration_val' pairs in the dataset"),
                         ([{"fixed": "a.nii", "moving": "b.nii"}, {"fixed": "a.nii"}],
                          "registration_val entry 1 needs 'fixed' and 'moving'")):
        path = _dataset(tmp_path, {"registration_val": val})
        with pytest.raises(InputError, match=message) as e:
            load_volume_dataset(path)
        assert e.value.path == path


def test_training_images_leave_out_both_scans_of_every_validation_pair(tmp_path):
    """Images 1..4 (entries as dicts or plain paths), validation pair 2 -> 3: training uses 1 and 4, in the
    listed order; held_out=False all four."""
    from cyclereg.dense.data import training_images

    img = [f"./imagesTr/A_000{k}_0000.nii.gz" for k in (1, 2, 3, 4)]
    path = _dataset(tmp_path, {"training": [{"image": img[0], "label": "x"}, img[1], {"image": img[2]}, img[3]],
                               "registration_val": [{"fixed": img[1], "moving": img[2]}]})
    want = [(tmp_path / i).resolve() for i in img]
    assert training_images(path) == [want[0], want[3]]
    assert training_images(path, held_out=False) == want


def test_training_images_refuse_an_empty_list_and_an_entry_without_an_image(tmp_path):
    from cyclereg.dense.data import training_images

    for training, message in (([], "no 'training' images in the dataset"),
                              (["a.nii", {"label": "b.nii"}], "training entry 1 has no 'image'")):
        path = _dataset(tmp_path, {"training": training})
        with pytest.raises(InputError, match=message) as e:
            training_images(path)
        assert e.value.path == path


# ----------------------------------------------------------------------------- config
def test_downsampling_factors_are_products_of_the_strides():
    assert (FeatureNetConfig().downsampling, FeatureNetConfig().adam_downsampling) == (8, 2)
    cfg = FeatureNetConfig(strides=(2, 1, 2, 1, 1, 1), adam_layer=3)
    assert (cfg.downsampling, cfg.adam_downsampling) == (4, 4)
    assert FeatureNetConfig(strides=(1, 2, 2, 1, 2, 1), adam_layer=1).adam_downsampling == 1


def _pipeline(**changes):
    """DensePipelineConfig with ``changes`` of its own or of a part: ``"convex.radius": 0``."""
    from dataclasses import replace

    top = {k: v for k, v in changes.items() if "." not in k}
    cfg = DensePipelineConfig(**top)
    for key, value in changes.items():
        if "." in key:
            part, name = key.split(".")
            cfg = replace(cfg, **{part: replace(getattr(cfg, part), **{name: value})})
    return cfg


@pytest.mark.parametrize("changes, message", [
    ({"warps": 0}, "warps must be 1 or 2, got 0"),
    ({"net.channels": (32, 64, 64, 128, 128, 128, 16)}, "net.channels and net.strides must have the same length"),
    ({"net.strides": (2, 1, 4, 1, 1, 1)}, r"net.strides: each must be 1 or 2, got \(2, 1, 4, 1, 1, 1\)"),
    ({"net.adam_layer": 0}, "net.adam_layer out of range"),
    ({"net.adam_layer": 7}, "net.adam_layer out of range"),
    ({"preprocess.mode": "pet"}, "preprocess.mode: expected auto|ct|mri|none, got pet"),
    ({"convex.radius": 0}, "convex.radius: expected a whole number >= 1, got 0"),
    ({"convex.ic_iterations": 2.0}, r"convex.ic_iterations: expected a whole number >= 0, got 2.0"),
    ({"adam.iterations": True}, "adam.iterations: expected a whole number >= 0, got True"),
    ({"adam.final_smooth_passes": -1}, "adam.final_smooth_passes: expected a whole number >= 0, got -1"),
    ({"adam.lr": 0.0}, r"adam.lr: expected a finite number > 0, got 0.0"),
    ({"convex.softmax_temperature": float("inf")}, "convex.softmax_temperature: expected a finite number > 0"),
    ({"adam.reg_weight": -0.1}, r"adam.reg_weight: expected a finite number >= 0, got -0.1"),
    ({"convex.coupling": (0.003, float("nan"), 0.3)}, r"convex.coupling\[1\]: expected a finite number >= 0"),
    ({"spacing_mm": (1.0, 0.0, 1.0)}, r"spacing_mm\[1\]: expected a finite number > 0, got 0.0"),
    ({"spacing_mm": (1.0, 1.0)}, "spacing_mm: expected three voxel sizes"),
    ({"orientation": ("R", "A")}, "orientation: expected three axis codes"),
    ({"orientation": ("R", "L", "S")}, "orientation: expected three axis codes"),
])
def test_validate_names_the_setting_it_refuses(changes, message):
    with pytest.raises(ValueError, match=message):
        _pipeline(**changes).validate()


@pytest.mark.parametrize("changes", [{"warps": 1}, {"net.adam_layer": 6}, {"net.adam_layer": 1},
                                     {"adam.iterations": 0, "convex.ic_iterations": 0}, {"adam.reg_weight": 0.0},
                                     {"adam.reg_factor": 0.0}, {"spacing_tolerance": 0.0},
                                     {"convex.radius": 1}, {"orientation": ("L", "P", "I")},
                                     {"orientation": ("S", "R", "A")}, {"spacing_mm": (0.5, 1.0, 2.5)}])
def test_validate_accepts_the_edges_of_each_range(changes):
    cfg = _pipeline(**changes)
    assert cfg.validate() is cfg


def test_replace_ignores_none_and_a_stored_configuration_reads_back_equal_and_hashable():
    cfg = DensePipelineConfig()
    assert cfg.replace(warps=None, use_adam=None) == cfg and cfg.replace(warps=1, use_ic=None).warps == 1
    stored = {"net": {"strides": [2, 1, 2, 1, 2, 1]}, "convex": {"coupling": [0.01, 0.1]},
              "spacing_mm": [1.5, 1.5, 2.0], "orientation": ["L", "P", "S"]}
    back = config_from_dict(stored)
    assert back.convex.coupling == (0.01, 0.1) and back.spacing_mm == (1.5, 1.5, 2.0)
    assert back.orientation == ("L", "P", "S") and back.net == FeatureNetConfig()
    hash(back)  # frozen, with tuples (lists would make it unhashable)
    with pytest.raises(ValueError, match=r"unknown DensePipelineConfig setting\(s\) extra \(written by a newer"):
        config_from_dict({"extra": 1})


def test_scan_ids_stay_unique_when_a_file_is_named_like_a_suffixed_id(tmp_path):
    from cyclereg.dense.data import scan_ids

    ids = scan_ids([tmp_path / "a" / "x.nii", tmp_path / "b" / "x.nii", tmp_path / "x~2.nii"])
    assert len(set(ids)) == 3, ids


def test_pair_ids_are_unique_among_the_datasets_pairs(tmp_path):
    """VolumePair.id is documented "unique among the dataset's pairs"; evaluate --resume skips pairs by id and
    compare refuses a report listing an id twice."""
    from cyclereg.dense.data import load_volume_dataset

    ds = load_volume_dataset(_dataset(tmp_path, {"registration_val": [
        {"fixed": "p1.nii.gz", "moving": "t2_b.nii.gz"}, {"fixed": "p1_t2.nii.gz", "moving": "b.nii.gz"}]}))
    ids = [p.id for p in ds.pairs]
    assert len(set(ids)) == 2, ids


def test_training_pair_ids_are_unique_and_unchanged_where_they_did_not_collide():
    """Pseudo labels and sampling weights of the volume training path are kept by pair id: the pairs
    p1 -> t2_b and p1_t2 -> b joined alike (p1_t2_b) and would have shared one label. The first keeps
    its id (runs made before keep theirs), the second becomes p1_t2_b~2; the run's identity agrees."""
    from cyclereg.dense.data import pair_ids
    from cyclereg.training.dense import DenseCycleConfig, DenseCycleTask, VolumeImage

    images = [VolumeImage(name, torch.zeros(1, 1, 8, 8, 8)) for name in ("p1", "t2_b", "p1_t2", "b", "c")]
    task = DenseCycleTask(images, [(0, 1), (2, 3), (0, 4)], (1.0, 1.0, 1.0), DenseCycleConfig(), torch.device("cpu"))
    assert [task.pair_id(k) for k in range(3)] == ["p1_t2_b", "p1_t2_b~2", "p1_c"]
    assert pair_ids([("a", "b"), ("b", "a")]) == ["a_b", "b_a"]


@pytest.mark.parametrize("changes, message", [
    ({"warps": True}, "warps must be 1 or 2, got True"),
    ({"pad_multiple": 0}, "pad_multiple: expected a whole number >= 1, got 0"),
    ({"pad_multiple": -8}, "pad_multiple: expected a whole number >= 1, got -8"),
    ({"preprocess": {"ct_scale_hu": 0.0}}, "preprocess.ct_scale_hu: expected a finite number > 0, got 0.0"),
    ({"preprocess": {"ct_clip": (0.6, -0.4)}}, "preprocess.ct_clip: expected two finite numbers low < high"),
    ({"preprocess": {"ct_clip": (-0.4, 0.2, 0.6)}}, "preprocess.ct_clip: expected two finite numbers low < high"),
    ({"preprocess": {"mri_percentiles": (1.0, 150.0)}}, "preprocess.mri_percentiles: expected two finite numbers "
                                                         "low < high within [0, 100]"),
    ({"preprocess": {"auto_ct_below_hu": float("nan")}}, "preprocess.auto_ct_below_hu: expected a finite number"),
])
def test_validate_names_settings_a_stored_configuration_could_break(changes, message):
    """Settings a stored configuration (a checkpoint's JSON) can carry and nothing checked: pad_multiple 0 or -8
    passed (0 % 8 == 0) and failed later in pad_to_multiple naming no setting, warps=True ran one warp,
    ct_scale_hu 0 gave NaN features, a percentile of 150 a RuntimeError of torch.quantile."""
    changes = dict(changes)  # the parameter is shared with the test report
    pre = changes.pop("preprocess", None)
    cfg = replace(DensePipelineConfig(), **changes)
    if pre is not None:
        cfg = replace(cfg, preprocess=replace(PreprocessConfig(), **pre))
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.validate()
    DensePipelineConfig().validate()  # the defaults pass
