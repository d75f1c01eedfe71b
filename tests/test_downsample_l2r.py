"""benchmarks/downsample_l2r.py: coarser Learn2Reg copies keep the world frame and the anatomy."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def ds():
    return load_script("benchmarks/downsample_l2r.py")


@pytest.mark.parametrize("f", [2, 3])
def test_coarse_voxel_centres_are_the_block_centres_in_world_mm(ds, f):
    rng = np.random.default_rng(0)
    affine = np.eye(4)
    affine[:3, :3] = rng.normal(size=(3, 3)) + 3 * np.eye(3)
    affine[:3, 3] = rng.normal(size=3) * 50
    coarse = ds.coarser_affine(affine, f)
    for ijk in ([0, 0, 0], [2, 1, 4], [5, 7, 3]):
        block = np.array([[f * a + b for a, b in zip(ijk, off)] for off in np.ndindex(f, f, f)], float)
        centre = (affine @ np.c_[block, np.ones(len(block))].T)[:3].mean(1)
        np.testing.assert_allclose((coarse @ np.r_[ijk, 1.0])[:3], centre, atol=1e-9)


def test_block_mean_of_a_linear_ramp_is_the_ramp_at_the_block_centres(ds):
    x, y, z = np.meshgrid(np.arange(8), np.arange(6), np.arange(5), indexing="ij")
    ramp = 2.0 * x - 3.0 * y + 0.5 * z
    out = ds.block_mean(ramp, 2)  # the last z slice is dropped (5 = 2 * 2 + 1)
    assert out.shape == (4, 3, 2)
    i, j, k = np.meshgrid(np.arange(4), np.arange(3), np.arange(2), indexing="ij")
    np.testing.assert_allclose(out, 2.0 * (2 * i + 0.5) - 3.0 * (2 * j + 0.5) + 0.5 * (2 * k + 0.5))


def test_block_majority_takes_the_most_frequent_label_and_ties_go_to_the_smaller(ds):
    labels = np.zeros((4, 2, 2), np.uint8)
    labels[:2] = 7                      # block 0: all 7
    labels[2:, :, 0] = 5                # block 1: four 5s, four 3s: a tie -> the smaller, 3
    labels[2:, :, 1] = 3
    out = ds.block_majority(labels, 2)
    assert out.dtype == np.uint8 and out.shape == (2, 1, 1)
    assert out[:, 0, 0].tolist() == [7, 3]
    labels[3, 1, 1] = 0                 # four 5s, three 3s, one 0 -> 5
    assert ds.block_majority(labels, 2)[1, 0, 0] == 5


def test_dataset_copy_keeps_validation_scans_and_the_first_training_scans(ds, tmp_path):
    src = tmp_path / "src"
    names = [f"./imagesTr/S_{k:04d}_0000.nii.gz" for k in range(1, 6)]
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for k, name in enumerate(names):
        for folder, data in (("imagesTr", np.full((6, 4, 4), 100 * k - 500, np.int16)),
                             ("labelsTr", np.full((6, 4, 4), k, np.uint8))):
            path = src / name.replace("imagesTr", folder)
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(path))
    spec = {"name": "tiny", "training": [{"image": n, "label": n.replace("imagesTr", "labelsTr")} for n in names],
            "registration_val": [{"fixed": names[0], "moving": names[3]}]}
    (src / "D_dataset.json").write_text(json.dumps(spec))
    assert ds.main([str(src / "D_dataset.json"), str(tmp_path / "out"), "--training-images", "2"]) == 0
    out = json.loads((tmp_path / "out" / "D_dataset.json").read_text())
    assert [e["image"] for e in out["training"]] == [names[0], names[1], names[2], names[3]]
    assert out["registration_val"] == spec["registration_val"] and out["numTraining"] == 4
    img = nib.load(str(tmp_path / "out" / names[2]))
    assert img.shape == (3, 2, 2) and img.get_data_dtype() == np.int16
    assert np.all(np.asanyarray(img.dataobj) == -300)
    np.testing.assert_allclose(img.affine, ds.coarser_affine(affine, 2))
    lab = nib.load(str(tmp_path / "out" / names[2].replace("imagesTr", "labelsTr")))
    assert lab.get_data_dtype() == np.uint8 and np.all(np.asanyarray(lab.dataobj) == 2)
    assert not (tmp_path / "out" / names[4]).exists()
