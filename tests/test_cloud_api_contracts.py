"""Contracts of the cloud ``register`` file handling, ``combine_cloud_models`` (ensemble) and
``keypoints --pairs`` dataset creation that a mutation audit found unpinned: where each point file
is placed, what config.json and ensemble records carry, which inputs are refused."""

import json
import re

import numpy as np
import pytest
import torch

from cyclereg.errors import InputError
from cyclereg.volumeio import write_nifti

from test_cli_clouds import _box_volume


def _grid_affine(points_mm, spacing, flip_x=False, margin=8.0):
    """An affine whose voxel grid covers ``points_mm`` (``spacing`` mm; x reversed with ``flip_x``) and its shape."""
    lo = points_mm.min(0).values.double() - margin
    hi = points_mm.max(0).values.double() + margin
    affine = np.diag([-spacing if flip_x else spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [hi[0].item() if flip_x else lo[0].item(), lo[1].item(), lo[2].item()]
    shape = tuple(int(v) for v in ((hi - lo) / spacing).ceil() + 1)
    return affine, shape


def _indices(points_mm, affine):
    """Voxel indices of ``points_mm`` on the grid of ``affine``."""
    pts = points_mm.double().numpy()
    return np.linalg.solve(affine, np.c_[pts, np.ones(len(pts))].T).T[:, :3]


def _world(idx, affine):
    return idx @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture
def captured_register(monkeypatch):
    """Calls of the registration step after register_cloud_files read its inputs: its keyword arguments
    and the point clouds (no registration runs)."""
    import cyclereg.clouds.api as capi

    calls = []

    def record(fixed_mm, moving_mm, out_dir, **kw):
        calls.append({"fixed_mm": fixed_mm, "moving_mm": moving_mm, **kw})
        return "captured"

    monkeypatch.setattr(capi, "_register_points_and_write", record)
    return calls


def test_voxel_index_clouds_are_placed_each_on_its_own_scans_grid(pair_files, captured_register):
    """Headerless CSVs with --reference and --moving-image: the fixed and query files by the reference's
    affine, the moving file by the moving image's (another spacing, x reversed); config.json's inputs name
    both volumes."""
    from cyclereg.clouds.api import register_cloud_files

    d, pair = pair_files
    ref_affine, ref_shape = _grid_affine(pair.fixed_mm, 2.0)
    mov_affine, mov_shape = _grid_affine(pair.moving_mm, 3.0, flip_x=True)
    write_nifti(d / "ref.nii.gz", torch.zeros(ref_shape), ref_affine)
    write_nifti(d / "mov.nii.gz", torch.zeros(mov_shape), mov_affine)
    idx_f, idx_m, idx_q = (_indices(pair.fixed_mm, ref_affine), _indices(pair.moving_mm, mov_affine),
                           _indices(pair.fixed_mm[:7], ref_affine))
    for name, idx in (("fv.csv", idx_f), ("mv.csv", idx_m), ("qv.csv", idx_q)):
        np.savetxt(d / name, idx, delimiter=",", fmt="%.10f")
    register_cloud_files(d / "fv.csv", d / "mv.csv", d / "out", query=d / "qv.csv", reference=d / "ref.nii.gz",
                         moving_image=d / "mov.nii.gz", device="cpu")
    (call,) = captured_register
    np.testing.assert_allclose(call["fixed_mm"].numpy(), _world(idx_f, ref_affine), atol=1e-4)
    np.testing.assert_allclose(call["moving_mm"].numpy(), _world(idx_m, mov_affine), atol=1e-4)
    np.testing.assert_allclose(call["query_mm"].numpy(), _world(idx_q, ref_affine), atol=1e-4)
    np.testing.assert_allclose(call["moving_mm"].numpy(), pair.moving_mm.double().numpy(), atol=1e-3)
    assert call["inputs"]["reference"] == str(d / "ref.nii.gz")
    assert call["inputs"]["moving_image"] == str(d / "mov.nii.gz")


def test_spacing_scales_every_voxel_index_file_alike(pair_files, captured_register):
    """--spacing without a reference: index * spacing for the fixed, moving and query files."""
    from cyclereg.clouds.api import register_cloud_files

    d, pair = pair_files
    sp = np.array([1.5, 2.0, 2.5])
    idx_f, idx_m = pair.fixed_mm.double().numpy() / sp, pair.moving_mm.double().numpy() / sp
    for name, idx in (("fv.csv", idx_f), ("mv.csv", idx_m), ("qv.csv", idx_f[:7])):
        np.savetxt(d / name, idx, delimiter=",", fmt="%.10f")
    register_cloud_files(d / "fv.csv", d / "mv.csv", d / "out", query=d / "qv.csv", spacing="1.5,2,2.5",
                         device="cpu")
    (call,) = captured_register
    for key, idx in (("fixed_mm", idx_f), ("moving_mm", idx_m), ("query_mm", idx_f[:7])):
        np.testing.assert_allclose(call[key].numpy(), idx * sp, rtol=1e-6, atol=1e-4, err_msg=key)


# ----------------------------------------------------------------------------- ensemble
def _checkpoint(path, seed, config=None, training=None):
    """A cloud checkpoint of a seeded random network (optionally with a training record)."""
    from cyclereg.checkpoint import save_checkpoint
    from cyclereg.clouds.features import build_graph_net
    from cyclereg.clouds.pipeline import CloudRegConfig

    config = config or CloudRegConfig()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, kind="cloud", config=config, state_dict=build_graph_net(config.net, seed=seed).state_dict(),
                    extra={"training": training} if training else None)
    return path


def _training(pairs, dataset="ds", fold=None):
    from cyclereg.checkpoint import training_record

    return training_record(dataset, fold, pairs={p: {"fixed": f"{p}f", "moving": f"{p}m"} for p in pairs})


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_file_ensemble_holds_each_members_weights_and_records_what_it_was_given(tmp_path):
    """Two checkpoint files: one checkpoint whose members are the sources' networks in order, with the
    overrides and fusion applied to its configuration, each member's SHA-256, and the union of the members'
    training pairs (an id naming other files in another member kept apart)."""
    from cyclereg.checkpoint import file_sha256
    from cyclereg.clouds.api import combine_cloud_models

    a = _checkpoint(tmp_path / "a.pt", 1, training=_training(["p1", "p2"]))
    b_training = _training(["p3"])
    b_training["pairs"]["p1"] = {"fixed": "other", "moving": "files"}
    b = _checkpoint(tmp_path / "b.pt", 2, training=b_training)
    combine_cloud_models([a, b], tmp_path / "e.pt", recentre_passes=3, tta_passes=2, fusion="average")
    ens = _state(tmp_path / "e.pt")
    for i, src in enumerate((a, b)):
        member = _state(src)["state_dict"]
        for name, value in member.items():
            assert torch.equal(ens["state_dict"][f"members.{i}.{name}"], value), (i, name)
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["command"] == "ensemble" and record["overrides"] == {"recentre_passes": 3, "tta_passes": 2}
    assert record["config"]["ensemble_size"] == 2 and record["config"]["ensemble_fusion"] == "average"
    assert record["config"]["recentre_passes"] == 3 and record["config"]["tta_passes"] == 2
    assert [m["sha256"] for m in record["members"]] == [file_sha256(a), file_sha256(b)]
    assert sorted(record["training"]["pairs"]) == ["p1", "p1#2", "p2", "p3"]
    assert record["training"]["pairs"]["p1#2"] == {"fixed": "other", "moving": "files"}


def test_a_file_ensemble_records_no_training_pairs_unless_every_member_does(tmp_path):
    from cyclereg.clouds.api import combine_cloud_models

    a = _checkpoint(tmp_path / "a.pt", 1, training=_training(["p1"]))
    b = _checkpoint(tmp_path / "b.pt", 2)
    combine_cloud_models([a, b], tmp_path / "e.pt")
    assert json.loads((tmp_path / "e.json").read_text())["training"] is None
    assert "training" not in _state(tmp_path / "e.pt")["extra"]


def test_an_ensemble_of_an_ensemble_keeps_every_networks_provenance(tmp_path):
    """An ensemble source contributes all its networks, each with its own member record; the new
    ensemble's size counts networks, not sources."""
    from cyclereg.clouds.api import combine_cloud_models

    a, b, c = (_checkpoint(tmp_path / f"{n}.pt", s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    combine_cloud_models([a, b], tmp_path / "ab.pt")
    combine_cloud_models([tmp_path / "ab.pt", c], tmp_path / "abc.pt")
    record = json.loads((tmp_path / "abc.json").read_text())
    assert record["config"]["ensemble_size"] == 3
    assert [m["source"] for m in record["members"]] == [str(a), str(b), str(c)]


@pytest.mark.parametrize("case", ["mixed", "pt_name", "source_is_output", "missing_fold", "existing_record"])
def test_ensemble_refusals_write_nothing(tmp_path, case):
    from cyclereg.clouds.api import combine_cloud_models

    for r, seed in (("a", 1), ("b", 3)):
        _checkpoint(tmp_path / r / "fold1.pt", seed)
        _checkpoint(tmp_path / r / "fold2" / "final.pt", seed + 1)
    a, b = tmp_path / "a", tmp_path / "b"
    sources, out, message = {
        "mixed": ([a, b / "fold1.pt"], tmp_path / "e", "either run directories or checkpoint files"),
        "pt_name": ([a, b], tmp_path / "e.pt", "looks like one checkpoint file"),
        "source_is_output": ([a, b], b, "one of the sources"),
        "missing_fold": ([a, b], tmp_path / "e", "no checkpoint for fold(s) 3"),
        "existing_record": ([a / "fold1.pt", b / "fold1.pt"], tmp_path / "e.pt", "is not an ensemble's"),
    }[case]
    if case == "missing_fold":
        _checkpoint(a / "fold3.pt", 9)
    if case == "existing_record":
        (tmp_path / "e.json").write_text('{"command": "register"}')
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(InputError, match=re.escape(message)):
        combine_cloud_models(sources, out)
    assert sorted(tmp_path.rglob("*")) == before


def test_an_ensemble_of_runs_has_one_checkpoint_per_fold_of_foldk_pt_and_foldk_final_pt(tmp_path):
    """Run directories: foldK.pt and foldK/final.pt both count; each fold's ensemble holds that fold's
    members and records their training pairs with its fold number; ensemble.json carries the overrides."""
    from cyclereg.clouds.api import combine_cloud_models

    for r, seed in (("a", 1), ("b", 3)):
        _checkpoint(tmp_path / r / "fold1.pt", seed, training=_training([f"{r}1"], fold=1))
        _checkpoint(tmp_path / r / "fold2" / "final.pt", seed + 1, training=_training([f"{r}2"], fold=2))
    combine_cloud_models([tmp_path / "a", tmp_path / "b"], tmp_path / "e", tta_passes=2)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["ensemble.json", "fold1.pt", "fold2.pt"]
    for k, member in ((1, "fold1.pt"), (2, "fold2/final.pt")):
        ens = _state(tmp_path / "e" / f"fold{k}.pt")
        for i, r in enumerate("ab"):
            sd = _state(tmp_path / r / member)["state_dict"]
            assert all(torch.equal(ens["state_dict"][f"members.{i}.{n}"], v) for n, v in sd.items()), (k, r)
        assert sorted(ens["extra"]["training"]["pairs"]) == [f"a{k}", f"b{k}"]
        assert ens["extra"]["training"]["fold"] == k
    record = json.loads((tmp_path / "e" / "ensemble.json").read_text())
    assert record["overrides"] == {"tta_passes": 2} and record["config"]["tta_passes"] == 2


# ----------------------------------------------------------------------------- keypoints --pairs
@pytest.fixture
def fake_detector(monkeypatch):
    """build_keypoint_dataset with a stand-in detector (every scan's keypoints: four points; the work
    is the dataset's files, not the detection, which tests/test_keypoints.py checks)."""
    from types import SimpleNamespace

    import cyclereg.keypoints.api as kapi

    monkeypatch.setattr(kapi, "detect_keypoints",
                        lambda volume, **kw: SimpleNamespace(points_mm=torch.arange(12.0).reshape(4, 3)))


def _pairs_csv(tmp_path, n):
    """The three scans of tests/test_keypoints.py's pairs CSV, listed as ``n`` pairs p0..p{n-1}."""
    from test_keypoints import _scan_pairs

    csv = _scan_pairs(tmp_path)
    csv.write_text("id,fixed,moving\n" + "".join(f"p{i},../s{i % 3}.nii.gz,../s{(i + 1) % 3}.nii.gz\n"
                                                 for i in range(n)))
    return csv


@pytest.mark.parametrize("n, folds", [(5, 2), (5, 3), (7, 3), (4, 4), (3, 2)])
def test_pairs_folds_are_consecutive_and_differ_in_size_by_at_most_one(tmp_path, fake_detector, n, folds):
    from cyclereg.keypoints.api import build_keypoint_dataset

    ds = build_keypoint_dataset(_pairs_csv(tmp_path, n), tmp_path / "ds", folds=folds, device="cpu", verbose=False)
    split = json.loads(ds.read_text())["folds"]
    assert len(split) == folds and [p for fold in split for p in fold] == [f"p{i}" for i in range(n)]
    sizes = [len(fold) for fold in split]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("folds, message", [(1, "--folds 1: expected 2 to 3"), ("2", "--folds '2': need a whole"),
                                            (4, "--folds 4: expected 2 to 3")])
def test_pairs_folds_out_of_range_are_refused_before_detection(tmp_path, fake_detector, folds, message):
    from cyclereg.keypoints.api import build_keypoint_dataset

    with pytest.raises(InputError, match=re.escape(message)):
        build_keypoint_dataset(_pairs_csv(tmp_path, 3), tmp_path / "ds", folds=folds, device="cpu", verbose=False)
    assert not (tmp_path / "ds").exists()


def test_pairs_dataset_is_named_by_the_csv_stem_and_references_mm_landmarks_relatively(tmp_path, fake_detector):
    """dataset.json: name = the CSV's stem, landmark files in mm referenced where they are, by paths relative
    to the dataset (so the folders move together); cells are read without surrounding blanks."""
    from test_keypoints import _scan_pairs

    from cyclereg.keypoints.api import build_keypoint_dataset

    csv = _scan_pairs(tmp_path)
    csv.write_text("id,fixed,moving,fixed_landmarks,moving_landmarks\n"
                   " a , ../s0.nii.gz , ../s1.nii.gz ,../lm_f.csv,../lm_m.csv\n")
    ds = build_keypoint_dataset(csv, tmp_path / "ds", device="cpu", verbose=False)
    obj = json.loads(ds.read_text())
    assert obj["name"] == "pairs"
    (entry,) = obj["pairs"]
    assert entry["id"] == "a" and entry["fixed_keypoints"] == "keypoints/a_fixed.csv"
    assert entry["fixed_landmarks"] == "../lm_f.csv" and entry["moving_landmarks"] == "../lm_m.csv"
    assert sorted(p.name for p in (tmp_path / "ds" / "keypoints").iterdir()) == ["a_fixed.csv", "a_moving.csv"]


@pytest.mark.parametrize("pair_id", ["..", "a/b", "../x", "a b"])
def test_pair_ids_that_are_no_plain_file_name_part_are_refused(tmp_path, pair_id):
    from test_keypoints import _scan_pairs

    from cyclereg.keypoints.api import read_pairs_csv

    csv = _scan_pairs(tmp_path)
    csv.write_text(f"id,fixed,moving\n{pair_id},../s0.nii.gz,../s1.nii.gz\n")
    with pytest.raises(InputError, match="may hold only letters"):
        read_pairs_csv(csv)


def test_a_pairs_csv_with_a_byte_order_mark_is_read(tmp_path):
    """A spreadsheet's "CSV UTF-8" export starts with a BOM: it was read into the first column's name and the
    CSV refused for a missing 'id' column that is there (point files were read without it already)."""
    from test_keypoints import _scan_pairs

    from cyclereg.keypoints.api import read_pairs_csv

    csv = _scan_pairs(tmp_path)
    csv.write_bytes("\ufeffid,fixed,moving\na,../s0.nii.gz,../s1.nii.gz\n".encode("utf-8"))
    (pair,) = read_pairs_csv(csv)
    assert pair.id == "a" and pair.fixed.name == "s0.nii.gz" and pair.moving.name == "s1.nii.gz"


def test_pair_keypoint_config_sets_each_nms_radius_on_its_own_scan():
    """--nms-radius is the fixed scans', --moving-nms-radius the moving scans' (default: the moving default);
    the other settings reach both."""
    from cyclereg.keypoints import FoerstnerConfig
    from cyclereg.keypoints.api import pair_keypoint_config
    from cyclereg.keypoints.foerstner import PairKeypointConfig

    default = PairKeypointConfig()
    c = pair_keypoint_config(nms_radius_mm=6.0, sigma_mm=2.0)
    assert c.fixed == FoerstnerConfig(nms_radius_mm=6.0, sigma_mm=2.0)
    assert c.moving == FoerstnerConfig(nms_radius_mm=default.moving.nms_radius_mm, sigma_mm=2.0)
    c = pair_keypoint_config(moving_nms_radius_mm=1.0)
    assert c.fixed == default.fixed and c.moving.nms_radius_mm == 1.0


def test_pairs_record_each_scans_nms_radius_in_its_own_voxels(tmp_path, fake_detector):
    """dataset.json.config.json: the moving scans' radius (in voxels) is the moving setting's."""
    from cyclereg.keypoints.api import build_keypoint_dataset, config_path_for, pair_keypoint_config

    config = pair_keypoint_config(nms_radius_mm=6.0, moving_nms_radius_mm=1.5)
    ds = build_keypoint_dataset(_pairs_csv(tmp_path, 1), tmp_path / "ds", keypoints=config, device="cpu",
                                verbose=False)
    scans = json.loads(config_path_for(ds).read_text())["scans"]["p0"]
    spacing = (1.5, 1.5, 2.0)
    assert scans["fixed"]["nms_radius_voxels"] == list(config.fixed.nms_radius_voxels(spacing))
    assert scans["moving"]["nms_radius_voxels"] == list(config.moving.nms_radius_voxels(spacing))
    assert scans["fixed"]["nms_radius_voxels"] != scans["moving"]["nms_radius_voxels"]


# ----------------------------------------------------------------------------- register refusals
@pytest.fixture
def no_model(monkeypatch):
    """register refusals come before the model is loaded: loading it fails the test."""
    import cyclereg.clouds.api as capi

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the input was not refused first")

    monkeypatch.setattr(capi, "_register_model", refuse)


@pytest.mark.parametrize("spacing", ["0,1,1", "1,-2,1", "1,2", "1,2,3,4", "1,inf,1", (1.0, 1.0), "a,b,c"])
def test_spacing_must_be_three_finite_positive_numbers(pair_files, no_model, spacing):
    from cyclereg.clouds.api import register_cloud_files

    d, pair = pair_files
    np.savetxt(d / "fv.csv", pair.fixed_mm.numpy(), delimiter=",", fmt="%.6f")
    with pytest.raises(InputError, match=re.escape(f"--spacing {spacing!r}: expected three positive numbers")):
        register_cloud_files(d / "fv.csv", d / "fv.csv", d / "out", spacing=spacing, device="cpu")
    assert not (d / "out").exists()


def test_a_moving_image_that_holds_none_of_the_moving_points_is_refused(pair_files, no_model):
    """--moving-image of another place than the moving cloud (the fixed points inside the reference):
    refused naming the moving file before the model is loaded, nothing written."""
    from cyclereg.clouds.api import register_cloud_files

    d, pair = pair_files
    ref_data, ref_affine = _box_volume(pair.fixed_mm, spacing=4.0)
    write_nifti(d / "ref.nii.gz", ref_data, ref_affine)
    far_affine = ref_affine.copy()
    far_affine[:3, 3] += 1000.0
    write_nifti(d / "far.nii.gz", ref_data, far_affine)
    with pytest.raises(InputError, match="none of the 600 points of .*m.csv lies inside this volume"):
        register_cloud_files(d / "f.csv", d / "m.csv", d / "out", reference=d / "ref.nii.gz",
                             moving_image=d / "far.nii.gz", device="cpu")
    assert not (d / "out").exists()


def test_config_json_names_the_moving_label_map_and_every_volume_input(pair_files):
    """A register with --reference and --moving-labels (no moving image: the map keeps its own grid):
    config.json names the label map, the reference and the files it wrote."""
    from cyclereg.clouds.api import register_cloud_files

    d, pair = pair_files
    ref_data, ref_affine = _box_volume(pair.fixed_mm, spacing=8.0)
    write_nifti(d / "ref.nii.gz", ref_data, ref_affine)
    mov_data, mov_affine = _box_volume(pair.moving_mm, spacing=6.0)
    write_nifti(d / "lab.nii.gz", (torch.from_numpy(np.asarray(mov_data)) // 10).long(), mov_affine)
    register_cloud_files(d / "f.csv", d / "m.csv", d / "out", reference=d / "ref.nii.gz",
                         moving_labels=d / "lab.nii.gz", device="cpu")
    cfg = json.loads((d / "out" / "config.json").read_text())
    assert cfg["moving_labels"] == str(d / "lab.nii.gz") and cfg["reference"] == str(d / "ref.nii.gz")
    assert cfg["moving_image"] is None and cfg["fixed"] == str(d / "f.csv") and cfg["moving"] == str(d / "m.csv")
    assert cfg["outputs"] == ["displacements.csv", "displacement.nii.gz", "warped_labels.nii.gz"]
