"""Contracts of the value checks mended in a session of small fixes (2026-12-07).

Each input was taken quietly before (or refused in words naming no argument): :func:`cyclereg.clouds.knn.knn_indices`
and the graphs built on it of points holding NaN or inf (some neighbours came back);
:func:`cyclereg.metrics.tre_stats` of negative "distances"; :func:`cyclereg.dense.convex.inverse_consistency` with
``iterations`` -1, True or 2.0; :func:`cyclereg.frames.spacing_xyz` of the text ``"123"`` (taken as (1, 2, 3));
:func:`cyclereg.dense.similarity.ncc_loss` / ``mind_loss`` of empty images (NaN); :func:`cyclereg.metrics.sdlogj` /
``determinant_stats`` of a field holding NaN or inf (``std_logj`` and ``folding_fraction`` left those voxels out);
``DensePipelineConfig.validate`` with counts that are no whole numbers (``warps=2.0`` from a stored config);
:func:`cyclereg.volumeio.write_nifti` of a uint64 label map (nibabel's error, now written as int16 / int32); and
:func:`cyclereg.metrics.hd95` at a spacing of text or truth values (0, negative, NaN and inf were already refused,
pinned here). Each test checks the one-line error naming the argument, and the valid input beside it keeps its
exact answer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cyclereg.clouds.knn import knn_edge_index, knn_indices, symmetric_edge_index
from cyclereg.dense.config import DensePipelineConfig, config_from_dict
from cyclereg.dense.convex import inverse_consistency
from cyclereg.dense.similarity import mind_loss, ncc_loss
from cyclereg.frames import spacing_affine, spacing_xyz
from cyclereg.metrics import determinant_stats, hd95, sdlogj, tre_stats
from cyclereg.volumeio import write_nifti


# ----------------------------------------------------------------------------- knn of NaN points
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_knn_refuses_points_holding_nan_or_inf_by_name(bad):
    pts = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    broken = pts.clone()
    broken[1, 2] = bad
    with pytest.raises(ValueError, match=r"^query: holds NaN or inf coordinates$"):
        knn_indices(broken, pts, 1)
    with pytest.raises(ValueError, match=r"^reference: holds NaN or inf coordinates$"):
        knn_indices(pts, broken, 1)
    with pytest.raises(ValueError, match=r"^points: holds NaN or inf coordinates$"):
        knn_edge_index(broken, 2)
    with pytest.raises(ValueError, match=r"^points: holds NaN or inf coordinates$"):
        symmetric_edge_index(broken, 1)
    assert knn_indices(pts, pts, 1, exclude_self=True).flatten().tolist() == [1, 0, 1]


# ----------------------------------------------------------------------------- tre_stats of no distances
def test_tre_stats_refuses_negative_or_nan_distances_by_name():
    with pytest.raises(ValueError, match=r"^errors_mm: holds negative values \(e\.g\. -2\); expected distances >= 0$"):
        tre_stats(torch.tensor([1.0, -2.0, 3.0]))
    with pytest.raises(ValueError, match=r"^errors_mm: holds NaN or inf$"):
        tre_stats(torch.tensor([1.0, float("nan")]))
    stats = tre_stats(torch.tensor([0.0, 2.0]))
    assert (stats["mean"], stats["p50"], stats["std"]) == (1.0, 1.0, 2.0 ** 0.5)


# ----------------------------------------------------------------------------- inverse_consistency's count
@pytest.mark.parametrize("iterations", [-1, True, 2.0, "3"])
def test_inverse_consistency_refuses_no_count_by_name(iterations):
    field = torch.zeros(1, 3, 4, 4, 4)
    with pytest.raises(ValueError, match=r"^iterations .*: need (a whole number, 0 or more|0 or more)"):
        inverse_consistency(field, field, iterations)


def test_inverse_consistency_zero_iterations_returns_the_fields_as_given():
    a, b = torch.full((1, 3, 4, 4, 4), 0.5), torch.full((1, 3, 4, 4, 4), -0.25)
    out_a, out_b = inverse_consistency(a, b, 0)
    assert out_a is a and out_b is b
    out_a, _ = inverse_consistency(a, b, np.int64(1))  # a constant pair: a <- (a - b) / 2 exactly
    assert torch.equal(out_a, torch.full_like(a, 0.375))


# ----------------------------------------------------------------------------- spacing given as text
@pytest.mark.parametrize("text", ["123", b"123", ("1", "2", "3")])
def test_spacing_xyz_refuses_text_by_name(text):
    with pytest.raises(ValueError, match=r"^spacing_zyx_mm: expected 3 finite voxel sizes > 0 mm, got "):
        spacing_xyz(text)
    with pytest.raises(ValueError, match=r"^spacing_mm: expected 3 finite voxel sizes > 0 mm, got "):
        spacing_affine(text)


def test_spacing_xyz_of_sizes_is_unchanged():
    assert spacing_xyz((3, 2.5, np.float32(1.5))) == (1.5, 2.5, 3.0)
    with pytest.raises(ValueError, match=r"^spacing_zyx_mm: expected 3 finite voxel sizes > 0 mm, got \(0, 1, 1\)$"):
        spacing_xyz((0, 1, 1))


# ----------------------------------------------------------------------------- similarity losses of no images
@pytest.mark.parametrize("loss", [ncc_loss, mind_loss])
@pytest.mark.parametrize("shape", [(0, 1, 8, 8, 8), (1, 1, 0, 8, 8)])
def test_similarity_losses_refuse_empty_images_by_name(loss, shape):
    empty = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"^fixed, warped: empty images \(.*\); a loss needs at least one voxel$"):
        loss(empty, empty)
    image = torch.arange(512, dtype=torch.float64).reshape(1, 1, 8, 8, 8)  # windows' variances >> eps
    assert loss(image, image).item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- SDlogJ of a field holding NaN
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sdlogj_refuses_a_field_holding_nan_or_inf_by_name(bad):
    field = torch.zeros(1, 3, 6, 6, 6)
    assert sdlogj(field) == {"sdlogj": 0.0, "std_logj": 0.0, "folding_fraction": 0.0}
    field[0, 1, 3, 3, 3] = bad
    with pytest.raises(ValueError, match=r"^disp_vox: holds NaN or inf values$"):
        sdlogj(field)
    J = torch.ones(1, 4, 4, 4, dtype=torch.float64)
    assert determinant_stats(J)["folding_fraction"] == 0.0
    J[0, 2, 2, 2] = bad
    with pytest.raises(ValueError, match=r"^J: holds NaN or inf values$"):
        determinant_stats(J)


# ----------------------------------------------------------------------------- a dense config's counts
@pytest.mark.parametrize("stored, message", [
    ({"warps": 2.0}, r"^warps must be 1 or 2, got 2\.0$"),
    ({"warps": True}, r"^warps must be 1 or 2, got True$"),
    ({"pad_multiple": 8.0}, r"^pad_multiple: expected a whole number >= 1, got 8\.0$"),
    ({"net": {"strides": [2.0, 1, 2, 1, 2, 1]}}, r"^net\.strides: each must be 1 or 2, got \(2\.0, 1, 2, 1, 2, 1\)$"),
    ({"net": {"adam_layer": 2.0}}, r"^net\.adam_layer out of range: expected a whole number from 1 to 6, got 2\.0$"),
    ({"net": {"in_channels": True}}, r"^net\.in_channels: expected a whole number >= 1, got True$"),
    ({"net": {"channels": [32, 64, 64.0, 128, 128, 128]}},
     r"^net\.channels\[2\]: expected a whole number >= 1, got 64\.0$"),
    ({"net": {"kernel_size": 3.0}}, r"^net\.kernel_size: expected a whole number >= 1, got 3\.0$"),
    ({"net": {"out_channels": 0}}, r"^net\.out_channels: expected a whole number >= 1, got 0$"),
    ({"net": {"adam_channels": 16.5}}, r"^net\.adam_channels: expected a whole number >= 1, got 16\.5$"),
    ({"convex": {"patch_size": 3.0}},
     r"^convex\.patch_size: expected an odd width >= 1 \(1: no smoothing\), got 3\.0$"),
    ({"adam": {"smooth_kernel": True}},
     r"^adam\.smooth_kernel: expected an odd width >= 1 \(1: no smoothing\), got True$"),
])
def test_dense_config_refuses_counts_that_are_no_whole_numbers_by_name(stored, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(stored)


def test_dense_config_of_whole_numbers_loads_as_stored():
    cfg = config_from_dict({"warps": 1, "pad_multiple": 16, "net": {"adam_layer": 3, "kernel_size": 3}})
    assert (cfg.warps, cfg.pad_multiple, cfg.net.adam_layer) == (1, 16, 3)
    assert config_from_dict(dataclasses.asdict(DensePipelineConfig())) == DensePipelineConfig()


# ----------------------------------------------------------------------------- uint64 volumes written
def test_write_nifti_writes_uint64_labels_as_the_narrowest_int_that_holds_them(tmp_path):
    import nibabel as nib

    labels = np.array([0, 3, 70000, 5, 1, 2, 3, 4], dtype=np.uint64).reshape(2, 2, 2)
    for data, name in ((labels, "a.nii.gz"), (torch.from_numpy(labels.astype(np.int64)).to(torch.uint64), "b.nii")):
        write_nifti(tmp_path / name, data, np.eye(4))
        img = nib.load(tmp_path / name)
        assert img.get_data_dtype() == np.int32
        assert np.asarray(img.dataobj).tolist() == labels.astype(np.int64).tolist()
    write_nifti(tmp_path / "small.nii", labels[:1, :1], np.eye(4))
    assert nib.load(tmp_path / "small.nii").get_data_dtype() == np.int16
    with pytest.raises(ValueError, match=r"^data: integer value 1099511627776 does not fit the 32-bit integers label "
                                         r"maps are written as$"):
        write_nifti(tmp_path / "big.nii", np.full((1, 1, 1), 2**40, dtype=np.uint64), np.eye(4))
    assert not (tmp_path / "big.nii").exists()


# ----------------------------------------------------------------------------- HD95 at spacings that are no sizes
@pytest.mark.parametrize("spacing", [(0, 1, 1), (-1.0, 1, 1), (float("nan"), 1, 1), (float("inf"), 1, 1), "123",
                                     ("1", "2", "3"), (True, 1, 1), [1, [2, 3]], None])
def test_hd95_refuses_a_spacing_that_is_no_voxel_size_by_name(spacing):
    fixed = torch.zeros(6, 6, 6, dtype=torch.long)
    fixed[2:4, 2:4, 2:4] = 1
    warped = torch.zeros_like(fixed)
    warped[2:5, 2:4, 2:4] = 1
    with pytest.raises(ValueError,
                       match=r"^spacing=.*: expected three positive voxel sizes \[mm\] or a \(3, 3\) voxel -> mm map$"):
        hd95(fixed, warped, spacing=spacing)
    assert hd95(fixed, warped, spacing=(2, 1.5, 1)) == {1: 2.0}  # the one extra plane along i: 2 mm apart


def test_write_nifti_gives_the_same_gz_bytes_at_another_time(tmp_path, monkeypatch):
    """The same volume written twice, a minute apart by the clock, gives byte-identical ``.nii.gz`` files (gzip's
    header held the writing time, so two runs' outputs differed in bytes though not in data)."""
    import time as time_module

    import numpy as np

    from cyclereg.volumeio import write_nifti

    data = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    write_nifti(tmp_path / "a.nii.gz", data, np.eye(4))
    now = time_module.time()
    monkeypatch.setattr(time_module, "time", lambda: now + 60.0)  # what gzip reads for its header's time stamp
    write_nifti(tmp_path / "b.nii.gz", data, np.eye(4))
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
