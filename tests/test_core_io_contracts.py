"""Contracts of the core frame, warp and I/O modules that a mutation audit found open.

``cyclereg.frames``, ``cyclereg.warp``, ``cyclereg.volumeio``, ``cyclereg.checkpoint`` and
``cyclereg.datasets``: each test pins an answer derived by hand (a known shift, a known label, a known
file mode, a known fold) on tiny tensors and files in ``tmp_path``, and fails when the code it guards
is changed in a way the rest of the suite did not notice. The audit's bugs (a single-slice warp, an empty
volume, a fold of 1.5) were fixed; their tests pass now.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import intraop_threads
from cyclereg.errors import InputError


# ----------------------------------------------------------------------------- frames
def test_grid_disp_to_voxel_disp_names_its_argument_when_the_shape_is_wrong():
    from cyclereg.frames import grid_disp_to_voxel_disp

    for bad in (torch.zeros(1, 3, 4, 4, 4), torch.zeros(4, 4, 4, 3)):
        with pytest.raises(ValueError, match=r"disp_grid: expected \(B, D, H, W, 3\)"):
            grid_disp_to_voxel_disp(bad)


def test_spacing_affine_scales_each_index_axis_by_its_own_spacing():
    from cyclereg.frames import spacing_affine, voxel_to_world

    A = spacing_affine((0.5, 2.0, 3.0))
    pts = voxel_to_world(torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 2.0]], dtype=torch.float64), A)
    torch.testing.assert_close(pts, torch.tensor([[0.5, 2.0, 3.0], [2.0, 0.0, 6.0]], dtype=torch.float64))


def test_unit_box_displacements_scale_by_half_the_extent_both_ways():
    from cyclereg.frames import UnitBox

    box = UnitBox((-3.0, 7.0, 100.0), (10.0, 20.0, 40.0))
    one = torch.ones(2, 3, dtype=torch.float64)
    expected = torch.tensor([[5.0, 10.0, 20.0]] * 2, dtype=torch.float64)
    torch.testing.assert_close(box.disp_unit_to_mm(one), expected)
    torch.testing.assert_close(box.disp_mm_to_unit(expected), one)
    # a unit displacement is the difference of two unit points: the same scale as the points' map
    p = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(box.unit_to_mm(p + 1) - box.unit_to_mm(p), expected[:1])


# ----------------------------------------------------------------------------- volumeio
def _vol(shape, affine=None):
    from cyclereg.volumeio import Volume

    return Volume(data=torch.zeros(shape), affine=np.eye(4) if affine is None else np.asarray(affine, float))


def test_volumes_of_one_affine_but_two_shapes_are_not_one_grid():
    from cyclereg.volumeio import same_grid

    assert same_grid(_vol((4, 4, 4)), _vol((4, 4, 4)))
    assert not same_grid(_vol((4, 4, 4)), _vol((4, 4, 5)))


def test_spacing_differs_is_relative_to_the_expected_spacing():
    from cyclereg.volumeio import spacing_differs

    # 10.05 mm against 10 mm is 0.5 %: within 1 %, although 0.05 mm exceeds 0.01 (an absolute tolerance)
    assert not spacing_differs((10.05, 10.0, 10.0), (10.0, 10.0, 10.0), 0.01)
    assert spacing_differs((10.0, 10.0, 10.2), (10.0, 10.0, 10.0), 0.01)
    # and 0.05 mm against 0.5 mm is 10 %
    assert spacing_differs((0.55, 0.5, 0.5), (0.5, 0.5, 0.5), 0.05)


# ----------------------------------------------------------------------------- warp
@pytest.fixture
def four_threads():
    """Four intra-op threads for the test (the slab path of :func:`cyclereg.warp.sample_grid`), then back."""
    with intraop_threads(4):
        yield


@pytest.mark.parametrize("batch, depth", [(1, 9), (1, 8), (2, 9)])
def test_sample_grid_in_slabs_is_one_grid_sample(four_threads, batch, depth):
    """Cut into one slab per thread (9 planes for 4 threads: slabs of 3 and a padded last one) or not,
    two channels and a batch of two come back exactly as one ``grid_sample`` gives them."""
    import torch.nn.functional as F

    from cyclereg.warp import sample_grid

    g = torch.Generator().manual_seed(0)
    src = torch.rand(batch, 2, 5, 4, 3, generator=g, dtype=torch.float64)
    grid = torch.rand(batch, depth, 3, 4, 3, generator=g, dtype=torch.float64) * 2.2 - 1.1
    expected = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)
    out = sample_grid(src, grid)
    assert out.shape == (batch, 2, depth, 3, 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_labels_beyond_float32_precision_come_back_unchanged_and_zero_outside():
    """Labels of 2^24 + 1 (not a float32) are warped by nearest neighbour unchanged; a map without
    label 0 and with a negative label still gets 0 (background) where the sample leaves it."""
    from cyclereg.warp import warp_labels

    big = 2**24 + 1
    labels = torch.full((1, 1, 3, 4, 5), 5, dtype=torch.int64)
    labels[..., 2:] = big
    labels[..., 1, :] = -7
    d = torch.zeros(1, 3, 3, 4, 5)
    assert torch.equal(warp_labels(labels, d), labels)
    d[:, 2] = 2.0  # two voxels along k: the last two columns sample beyond the map
    out = warp_labels(labels, d)
    assert torch.equal(out[..., :3], labels[..., 2:])
    assert (out[..., 3:] == 0).all()


def test_warp_labels_gives_background_beyond_a_single_slice_map():
    from cyclereg.frames import inside_grid
    from cyclereg.warp import warp_labels

    labels = torch.ones(1, 1, 1, 3, 3, dtype=torch.int64)
    d = torch.zeros(1, 3, 1, 3, 3)
    d[:, 1] = 5.0  # along a 3-voxel axis: outside, background
    assert (warp_labels(labels, d) == 0).all()
    d = torch.zeros(1, 3, 1, 3, 3)
    d[:, 0] = 5.0  # along the 1-voxel axis: just as far outside (it took the slice's label: grid_sample with
    assert not inside_grid(torch.tensor([[5.0, 1.0, 1.0]]), (1, 3, 3))  # align_corners maps it to the slice)
    assert (warp_labels(labels, d) == 0).all()
    for offset, label in ((0.5, 1), (-0.5, 1), (0.51, 0), (-0.51, 0)):  # the slice's voxel: -0.5 .. 0.5
        d[:, 0] = offset
        assert (warp_labels(labels, d) == label).all(), offset


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_single_slice_fades_to_zero_padding_as_an_edge_voxel_does(axis):
    """Trilinear with zero padding: ``max(0, 1 - |v|)`` of the slice at offset ``v`` along its size-1 axis,
    the weight ``grid_sample`` gives the edge voxel of a longer axis (checked on a 3-voxel axis)."""
    from cyclereg.warp import warp

    shape = [4, 3, 2]
    shape[axis] = 1
    ones = torch.ones(1, 1, *shape, dtype=torch.float64)
    for v, expected in ((0.0, 1.0), (0.25, 0.75), (-0.6, 0.4), (1.0, 0.0), (-3.0, 0.0)):
        d = torch.zeros(1, 3, *shape, dtype=torch.float64)
        d[:, axis] = v
        torch.testing.assert_close(warp(ones, d, padding_mode="zeros"), torch.full_like(ones, expected))
        assert torch.equal(warp(ones, d), ones)  # border padding: the slice everywhere, as before
    edge = torch.ones(1, 1, 3, 3, 3, dtype=torch.float64)
    d = torch.zeros(1, 3, 3, 3, 3, dtype=torch.float64)
    d[:, 0] = -0.6  # voxel 0 of the longer axis at -0.6: the same weight 0.4
    assert float(warp(edge, d, padding_mode="zeros")[0, 0, 0, 0, 0]) == pytest.approx(0.4)


def test_an_integer_image_warped_trilinearly_is_rounded_not_truncated():
    from cyclereg.warp import warp

    ramp = (10 * torch.arange(6)).expand(1, 1, 2, 3, 6).clone()  # 0, 10, .., 50 along k (int64)
    d = torch.zeros(1, 3, 2, 3, 6)
    d[:, 2] = 0.26  # 2.6 above each voxel's value: 3 when rounded
    out = warp(ramp, d)
    assert out.dtype == torch.int64
    assert out[0, 0, 0, 0, :5].tolist() == [3, 13, 23, 33, 43]


def test_warp_between_grids_with_a_slab_smaller_than_one_plane(monkeypatch):
    """A slab budget below one plane of the fixed grid still warps (one plane per slab), the same as
    one piece."""
    import cyclereg.warp as warp_mod

    g = torch.Generator().manual_seed(1)
    moving = torch.rand(1, 1, 4, 3, 5, generator=g)
    d = torch.rand(1, 3, 4, 3, 5, generator=g) - 0.5
    affine = np.diag([1.5, 2.0, 1.0, 1.0])
    whole = warp_mod.warp(moving, d)
    monkeypatch.setattr(warp_mod, "SLAB_VOXELS", 5)  # a plane has 15 voxels
    torch.testing.assert_close(warp_mod.warp_between_grids(moving, affine, d, affine), whole, atol=1e-5, rtol=0)


def test_compose_applies_the_first_field_first_and_holds_the_border():
    """a = +1 voxel along k, b = 0.1 k along k: (a then b)(x) = a + b(x + a) = 1 + 0.1 (k + 1); at the
    last k the sample x + a leaves the grid and takes the border value, 0.1 (n - 1)."""
    from cyclereg.warp import compose

    n = 6
    a = torch.zeros(1, 3, 2, 3, n, dtype=torch.float64)
    a[:, 2] = 1.0
    b = torch.zeros_like(a)
    b[:, 2] = 0.1 * torch.arange(n, dtype=torch.float64)
    c = compose(a, b)
    k = torch.arange(n, dtype=torch.float64)
    expected = 1.0 + 0.1 * torch.clamp(k + 1, max=n - 1)
    torch.testing.assert_close(c[0, 2, 1, 2], expected, atol=1e-6, rtol=0)
    assert (c[:, :2] == 0).all()
    with pytest.raises(ValueError, match="disp_b: grid"):
        compose(a, torch.zeros(1, 3, 2, 3, n + 1, dtype=torch.float64))


def test_warp_labels_takes_both_affines_or_neither():
    from cyclereg.warp import warp_labels

    labels, d = torch.ones(1, 1, 2, 2, 2, dtype=torch.int64), torch.zeros(1, 3, 2, 2, 2)
    for given in ({"labels_affine": np.eye(4)}, {"fixed_affine": np.eye(4)}):
        with pytest.raises(ValueError, match="give both labels_affine and fixed_affine, or neither"):
            warp_labels(labels, d, **given)
    mask = warp_labels(labels.bool(), d, labels_affine=np.eye(4), fixed_affine=np.eye(4))
    assert mask.dtype == torch.bool and mask.all()


def test_warp_refuses_a_moving_image_on_another_grid():
    from cyclereg.warp import warp

    with pytest.raises(ValueError, match="grids differ"):
        warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 3, 4, 4, 5))


def test_sample_at_points_holds_the_border_outside_the_field():
    from cyclereg.warp import sample_at_points

    field = torch.full((1, 2, 3, 3, 3), 5.0)
    field[:, 1] = -2.0
    pts = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 3.5, 1.0]])
    torch.testing.assert_close(sample_at_points(field, pts), torch.tensor([[5.0, -2.0]] * 3))


def _save(path, arr, affine=None):
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return path


def test_read_nifti_drops_every_trailing_singleton_axis(tmp_path):
    from cyclereg.volumeio import read_nifti

    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1, 1)
    vol = read_nifti(_save(tmp_path / "v.nii.gz", arr))
    assert vol.shape == (2, 3, 4)
    assert torch.equal(vol.data, torch.from_numpy(arr[..., 0, 0]))


def test_label_maps_hold_every_32_bit_label_and_refuse_one_beyond(tmp_path):
    from cyclereg.volumeio import LABEL_MAX, read_nifti

    ok = np.zeros((2, 2, 2), dtype=np.int32)
    ok[0, 0, 0], ok[1, 1, 1] = LABEL_MAX, -LABEL_MAX - 1
    data = read_nifti(_save(tmp_path / "ok.nii.gz", ok), labels=True).data
    assert (int(data.max()), int(data.min())) == (LABEL_MAX, -LABEL_MAX - 1)
    for value in (LABEL_MAX + 1.0, -LABEL_MAX - 2.0):  # stored as float64: exact
        bad = np.zeros((2, 2, 2), dtype=np.float64)
        bad[1, 0, 1] = value
        with pytest.raises(InputError, match="does not fit a 32-bit integer"):
            read_nifti(_save(tmp_path / "bad.nii.gz", bad), labels=True)


def test_float_label_maps_are_rounded_to_the_nearest_label(tmp_path):
    from cyclereg.volumeio import read_nifti

    arr = np.array([2.9996, 1.0004, 0.0, 7.0], dtype=np.float32).reshape(1, 2, 2)
    vol = read_nifti(_save(tmp_path / "l.nii.gz", arr), labels=True)
    assert vol.data.dtype == torch.int64
    assert vol.data.flatten().tolist() == [3, 1, 0, 7]
    arr[0, 0, 0] = 2.5
    with pytest.raises(InputError, match="non-integer values"):
        read_nifti(_save(tmp_path / "i.nii.gz", arr), labels=True)


def test_write_nifti_stores_labels_floats_units_and_compression(tmp_path):
    import nibabel as nib

    from cyclereg.volumeio import write_nifti

    labels = torch.tensor([0, 1, 32767, 32768, -32768, 5, 6, 7]).reshape(2, 2, 2)
    write_nifti(tmp_path / "l.nii.gz", labels, np.eye(4))
    img = nib.load(str(tmp_path / "l.nii.gz"))
    assert np.array_equal(np.asarray(img.dataobj), labels.numpy())
    assert img.header.get_xyzt_units()[0] == "mm"
    assert (tmp_path / "l.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip
    small = torch.tensor([0, 1, 32767, -32767, 5, 6, 7, 8]).reshape(2, 2, 2)
    write_nifti(tmp_path / "s.nii", small, np.eye(4))
    assert nib.load(str(tmp_path / "s.nii")).get_data_dtype() == np.int16
    assert (tmp_path / "s.nii").read_bytes()[:2] != b"\x1f\x8b"
    write_nifti(tmp_path / "f.nii.gz", torch.rand(2, 2, 2, dtype=torch.float64), np.eye(4))
    assert nib.load(str(tmp_path / "f.nii.gz")).get_data_dtype() == np.float32


def test_write_nifti_gives_a_qform_exactly_where_one_can_hold_the_affine(tmp_path):
    import nibabel as nib

    from cyclereg.volumeio import write_nifti

    rotated = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.0, 0.75, 3.0], [0, 0, 0, 1.0]])
    sheared = np.array([[1.0, 0.4, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0, 0, 0, 1.0]])
    for name, affine, qform_code in (("r.nii", rotated, 2), ("s.nii", sheared, 0)):
        write_nifti(tmp_path / name, torch.zeros(2, 3, 4), affine)
        img = nib.load(str(tmp_path / name))
        assert int(img.header["qform_code"]) == qform_code, name
        assert int(img.header["sform_code"]) == 2
        np.testing.assert_allclose(img.get_sform(), affine, atol=1e-6)
        if qform_code:
            np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)


def test_read_nifti_refuses_nan_and_inf_in_images_and_label_maps_and_keeps_a_float64_affine(tmp_path):
    from cyclereg.volumeio import read_nifti

    affine = np.array([[0.0, -1.1, 0.0, 12.3456789], [0.7, 0.0, 0.0, -4.0], [0.0, 0.0, 2.5, 1e3 / 3], [0, 0, 0, 1]])
    vol = read_nifti(_save(tmp_path / "ok.nii.gz", np.ones((2, 2, 2), dtype=np.float32), affine))
    assert vol.affine.dtype == np.float64 and vol.data.dtype == torch.float32
    np.testing.assert_allclose(vol.affine, affine, atol=1e-9)
    for value in (np.nan, np.inf):
        arr = np.ones((2, 2, 2), dtype=np.float32)
        arr[1, 1, 0] = value
        path = _save(tmp_path / "bad.nii.gz", arr)
        with pytest.raises(InputError, match="volume holds NaN or inf"):
            read_nifti(path)
        with pytest.raises(InputError, match="label map holds NaN or inf"):
            read_nifti(path, labels=True)


def test_qform_sform_distance_is_the_largest_corner_voxel_displacement():
    from cyclereg.volumeio import qform_sform_distance_mm

    stretched = np.diag([1.1, 1.0, 1.0, 1.0])  # voxel i at 1.1 i mm instead of i mm: 0.1 mm per voxel
    assert qform_sform_distance_mm((11, 3, 4), stretched, np.eye(4)) == pytest.approx(1.0)
    assert qform_sform_distance_mm((3, 11, 4), np.diag([1.0, 1.0, 1.1, 1.0]), np.eye(4)) == pytest.approx(0.3)
    shifted = np.eye(4)
    shifted[:3, 3] = [0.3, 0.0, 0.4]
    assert qform_sform_distance_mm((5, 5, 5), shifted, np.eye(4)) == pytest.approx(0.5)


@pytest.mark.parametrize("shift_mm, qform_code, noted", [(0.02, 1, True), (0.005, 1, False), (40.0, 0, False)])
def test_a_qform_is_noted_only_when_coded_and_more_than_0_01_mm_from_the_sform(tmp_path, capsys, shift_mm, qform_code,
                                                                             noted):
    import nibabel as nib

    from cyclereg.volumeio import read_nifti

    sform = np.diag([2.0, 2.0, 2.0, 1.0])
    sform[:3, 3] = 10.0
    qform = sform.copy()
    qform[0, 3] += shift_mm
    img = nib.Nifti1Image(np.zeros((3, 3, 3), dtype=np.float32), sform)
    img.set_sform(sform, code=1)
    img.set_qform(qform, code=qform_code)
    nib.save(img, str(tmp_path / "q.nii"))
    capsys.readouterr()
    vol = read_nifti(tmp_path / "q.nii")
    np.testing.assert_allclose(vol.affine, sform)  # the sform is used either way
    assert ("its qform and sform disagree" in capsys.readouterr().err) == noted


@pytest.mark.parametrize("dtype", [np.int16, np.float32])
@pytest.mark.parametrize("labels", [False, True])
def test_an_empty_volume_is_refused_naming_the_file(tmp_path, dtype, labels):
    """A volume of shape (0, 3, 3): an empty float label map failed with numpy's raw 'zero-size array'
    error, and an empty image or integer map was read as an empty volume (and failed later, elsewhere)."""
    from cyclereg.volumeio import read_nifti

    path = _save(tmp_path / "e.nii", np.zeros((0, 3, 3), dtype=dtype))
    with pytest.raises(InputError, match=r"empty volume: shape \(0, 3, 3\) holds no voxels") as err:
        read_nifti(path, labels=labels)
    assert "e.nii" in str(err.value)


def test_read_nifti_refuses_a_vector_volume_instead_of_taking_its_first_component(tmp_path):
    from cyclereg.volumeio import read_nifti

    with pytest.raises(InputError, match="expected a 3-D volume"):
        read_nifti(_save(tmp_path / "v.nii.gz", np.zeros((2, 3, 4, 3), dtype=np.float32)))


# ----------------------------------------------------------------------------- checkpoint
def test_an_atomic_write_leaves_only_the_file_and_a_failed_one_only_the_earlier_file(tmp_path):
    import errno

    from cyclereg.checkpoint import atomic_write_bytes, atomic_write_text

    target = tmp_path / "out.json"
    atomic_write_text(target, "old")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]

    def fails(fh, exc):
        fh.write(b"half")
        raise exc

    with pytest.raises(RuntimeError):
        atomic_write_bytes(target, lambda fh: fails(fh, RuntimeError("interrupted")))
    with pytest.raises(OSError) as err:
        atomic_write_bytes(target, lambda fh: fails(fh, OSError(errno.ENOSPC, "No space left on device")))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)  # the file asked for
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_leftover_is_a_hidden_tmp_file(tmp_path):
    from cyclereg.checkpoint import atomic_leftover

    for name in (".out.json.abc123.tmp", "out.tmp", "out.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".d.tmp").mkdir()
    assert [atomic_leftover(tmp_path / n) for n in (".out.json.abc123.tmp", "out.tmp", "out.json", ".d.tmp")] == [
        True, False, False, False]


def test_staged_outputs_replace_the_set_and_remove_only_stale_files_not_written_again(tmp_path):
    from cyclereg.checkpoint import atomic_write_text, staged_outputs

    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.txt", "b.txt"):
        (out / name).write_text("earlier")
    with staged_outputs(out) as stage:
        atomic_write_text(stage / "a.txt", "new")
        stage.stale = [out / "a.txt", out / "b.txt"]  # a.txt is written again: it stays
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert (out / "a.txt").read_text() == "new"


def test_a_failed_set_of_outputs_leaves_no_folder_behind_and_names_the_output(tmp_path):
    from cyclereg.checkpoint import atomic_write_text, staged_outputs

    out = tmp_path / "x" / "y" / "z"
    with pytest.raises(OSError) as err:
        with staged_outputs(out) as stage:
            atomic_write_text(stage / "a.txt", "new")
            open(stage / "sub" / "b.txt", "w").close()  # no such folder
    assert err.value.filename == str(out / "sub" / "b.txt")
    assert list(tmp_path.iterdir()) == []


def test_stale_outputs_are_plain_names_in_the_folder_never_inputs_nor_this_runs_outputs(tmp_path):
    from cyclereg.checkpoint import stale_outputs

    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "outside.txt").write_text("x")
    for name in ("old.nii.gz", "input.nii.gz", "kept.csv"):
        (out / name).write_text("x")
    names = ["old.nii.gz", "../outside.txt", "input.nii.gz", "kept.csv", "missing.csv", 3]
    for outputs in (names, {"files": names}):
        record = {"command": "register", "cyclereg_version": "0", "outputs": outputs}
        (out / "config.json").write_text(json.dumps(record))
        assert stale_outputs(out, ["kept.csv"], keep=(out / "input.nii.gz",)) == [out / "old.nii.gz"]
        for other in ({"command": "keypoints"}, {"command": None}, {"cyclereg_version": None}):  # not register's
            (out / "config.json").write_text(json.dumps({k: v for k, v in {**record, **other}.items() if v is not None}))
            assert stale_outputs(out, ["kept.csv"], keep=(out / "input.nii.gz",)) == []


def test_data_fingerprint_is_the_hash_of_the_files_hashes_in_order(tmp_path):
    import hashlib

    from cyclereg.checkpoint import data_fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"fixed")
    b.write_bytes(b"moving")
    sha = [hashlib.sha256(x).hexdigest() for x in (b"fixed", b"moving")]
    assert data_fingerprint(a, b) == hashlib.sha256((sha[0] + sha[1]).encode()).hexdigest()
    assert data_fingerprint(b, a) != data_fingerprint(a, b)


def test_training_records_of_images_alone_are_read_back_and_pairs_are_sorted():
    from cyclereg.checkpoint import training_data, training_record

    rec = training_record("lungs", None, images={"b.nii.gz": "2", "a.nii.gz": "1"})
    assert training_data({"extra": {"training": rec}}) == rec
    rec = training_record("copd", 2, pairs={"p2": {"fixed": "f"}, "p1": {"fixed": "g"}})
    assert list(rec["pairs"]) == ["p1", "p2"] and rec["fold"] == 2
    assert training_data({"extra": {"training": {"dataset": "x", "fold": None}}}) is None


def test_json_text_is_strict_json_with_string_keys():
    from cyclereg.checkpoint import json_text, to_jsonable

    assert to_jsonable({1: (2.0, float("nan")), "p": [float("-inf")]}) == {"1": [2.0, None], "p": [None]}
    assert json.loads(json_text({2: float("inf")})) == {"2": None}
    assert json.loads(json_text({"run": Path("runs") / "a", "box": (1, 2)})) == {"run": "runs/a", "box": [1, 2]}


def test_a_checkpoint_without_its_version_is_refused(tmp_path):
    from cyclereg.checkpoint import load_checkpoint, save_checkpoint

    torch.save({"kind": "cloud", "config": {}, "state_dict": {}}, tmp_path / "c.pt")
    with pytest.raises(InputError, match="needs config, state_dict, version"):
        load_checkpoint(tmp_path / "c.pt")
    save_checkpoint(tmp_path / "ok.pt", kind="cloud", config={3: 1}, state_dict={"w": torch.ones(2)})
    payload = load_checkpoint(tmp_path / "ok.pt", kind="cloud")
    assert payload["config"] == {"3": 1} and torch.equal(payload["state_dict"]["w"], torch.ones(2))


def test_a_file_set_refuses_a_folder_where_an_output_goes(tmp_path):
    from cyclereg.checkpoint import atomic_write_text, staged_file_set

    (tmp_path / "report.json").mkdir()
    (tmp_path / "report.json" / "inside").write_text("kept")
    with pytest.raises(InputError, match="is a folder"):
        with staged_file_set() as files:
            atomic_write_text(files(tmp_path / "report.json"), "{}")
    assert (tmp_path / "report.json" / "inside").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


# ----------------------------------------------------------------------------- datasets
def _dataset(tmp_path, n_pairs=3, name="ds.json", **extra):
    pairs = [{"id": f"p{i}", "fixed_keypoints": f"f{i}.csv", "moving_keypoints": f"m{i}.csv"} for i in range(n_pairs)]
    path = tmp_path / name
    path.write_text(json.dumps({"pairs": pairs, **extra}))
    return path


def test_folds_select_train_and_name_the_pairs_they_hold_out(tmp_path):
    from cyclereg.datasets import load_keypoint_dataset, select_folds

    ds = load_keypoint_dataset(_dataset(tmp_path, folds=[["p0"], {"test": ["p2", "p1"]}]))
    assert ds.name == "ds"  # the file's stem when the JSON names none
    assert [ds.fold_of(p) for p in ("p0", "p1", "p2", "zz")] == [1, 2, 2, None]
    assert ds.training_ids(None) == ["p0", "p1", "p2"]
    assert ds.training_ids(1) == ["p1", "p2"] and ds.training_ids(2) == ["p0"]
    assert select_folds(ds, None) == [1, 2] and select_folds(ds, "all") == [1, 2]
    assert select_folds(ds, "2") == [2] and select_folds(ds, 1) == [1]
    for bad in ("0", "3", "x"):
        with pytest.raises(InputError, match=r"--fold .*: expected 'all' or 1\.\.2"):
            select_folds(ds, bad)
    plain = load_keypoint_dataset(_dataset(tmp_path, name="plain.json"))
    assert select_folds(plain, None) == [None] and select_folds(plain, "all") == [None]
    with pytest.raises(InputError, match="defines no folds"):
        select_folds(plain, "1")


def test_a_fold_that_is_not_a_whole_number_is_refused(tmp_path):
    """A Python-API ``fold=`` of 1.5 (or True) was truncated by ``int()`` to fold 1 and trained or
    evaluated it silently; the string '1.5' was refused. Whole numbers in any form still select."""
    from cyclereg.datasets import load_keypoint_dataset, select_folds

    ds = load_keypoint_dataset(_dataset(tmp_path, folds=[["p0"], ["p1"]]))
    assert select_folds(ds, 2.0) == [2] and select_folds(ds, "2") == [2] and select_folds(ds, np.int64(1)) == [1]
    for bad in (1.5, True, "1.5", float("inf"), float("nan"), [1]):
        with pytest.raises(InputError, match="expected 'all' or 1..2"):
            select_folds(ds, bad)


@pytest.mark.parametrize("folds, message", [
    ([["p0"], []], "fold 2: expected a non-empty list"),
    ([["p0", "p9"]], "holds out 'p9', which is not a pair id"),
    ([["p0"], ["p1", "p0"]], "held out by folds 1 and 2"),
    ([["p1", "p1"]], "fold 1 lists 'p1' twice"),
    ({"test": ["p0"]}, "'folds' should be a list"),
])
def test_folds_that_are_not_a_partition_of_pair_ids_are_refused(tmp_path, folds, message):
    from cyclereg.datasets import load_keypoint_dataset

    with pytest.raises(InputError, match=message):
        load_keypoint_dataset(_dataset(tmp_path, folds=folds))


@pytest.mark.parametrize("extra, message", [
    ({"volume_shape_zyx": [10, 10, 10]}, "go together"),
    ({"spacing_zyx_mm": [1, 1, 1]}, "go together"),
    ({"volume_shape_zyx": [10, 10, 0], "spacing_zyx_mm": [1, 1, 1]}, "volume_shape_zyx: expected three positive"),
    ({"volume_shape_zyx": [10, 10, 10.5], "spacing_zyx_mm": [1, 1, 1]}, "volume_shape_zyx: expected three positive"),
    ({"volume_shape_zyx": [10, 10, 10, 1], "spacing_zyx_mm": [1, 1, 1]}, "volume_shape_zyx: expected three positive"),
    ({"volume_shape_zyx": [10, 10, 10], "spacing_zyx_mm": [1, 0, 1]}, "spacing_zyx_mm: expected three positive"),
    ({"volume_shape_zyx": [10, 10, 10], "spacing_zyx_mm": [1, 1e999, 1]}, "spacing_zyx_mm: expected three positive"),
    ({"volume_shape_zyx": [1024, 1024, 2049], "spacing_zyx_mm": [1, 1, 1]}, "more than 2147483648"),
])
def test_a_volume_grid_is_three_positive_finite_numbers_given_together(tmp_path, extra, message):
    from cyclereg.datasets import load_keypoint_dataset

    with pytest.raises(InputError, match=message):
        load_keypoint_dataset(_dataset(tmp_path, **extra))


def test_a_grid_of_exactly_2_to_the_31_voxels_is_accepted_and_its_spacing_read_along_x_y_z(tmp_path):
    from cyclereg.datasets import load_keypoint_dataset

    ds = load_keypoint_dataset(_dataset(tmp_path, volume_shape_zyx=[1024, 1024, 2048.0], spacing_zyx_mm=[2.5, 1, 0.5]))
    assert ds.volume_shape_zyx == (1024, 1024, 2048) and ds.has_volume_grid
    assert ds.voxel_spacing_xyz_mm() == (0.5, 1.0, 2.5)


def test_pairs_are_listed_once_with_both_landmarks_or_neither(tmp_path):
    from cyclereg.datasets import load_keypoint_dataset

    path = _dataset(tmp_path)
    obj = json.loads(path.read_text())
    obj["pairs"][1]["moving_landmarks"] = "ml.csv"
    path.write_text(json.dumps(obj))
    with pytest.raises(InputError, match="pairs\\[1\\] gives moving_landmarks alone"):
        load_keypoint_dataset(path)
    obj["pairs"][1].pop("moving_landmarks")
    obj["pairs"][2]["id"] = "p0"
    path.write_text(json.dumps(obj))
    with pytest.raises(InputError, match="pair id 'p0' is listed more than once"):
        load_keypoint_dataset(path)


def test_dataset_json_may_start_with_a_byte_order_mark_but_must_be_an_object(tmp_path):
    from cyclereg.datasets import dataset_kind, is_label_number, read_json

    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"pairs": [{"id": "a"}]}).encode())
    assert dataset_kind(tmp_path / "bom.json") == "keypoints"  # a pair lacking a key: the reader names it
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="expected a JSON object at top level"):
        read_json(tmp_path / "list.json")
    (tmp_path / "empty.json").write_text(json.dumps({"pairs": []}))
    with pytest.raises(InputError, match="'pairs' is empty"):
        dataset_kind(tmp_path / "empty.json")
    assert [is_label_number(t) for t in ("12", "\u00b2", "1.5", "")] == [True, False, False, False]


def test_an_output_that_would_replace_an_input_stops_the_set_before_anything_moves(tmp_path):
    from cyclereg.checkpoint import atomic_write_text, staged_outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "in.txt").write_text("input")
    with pytest.raises(InputError, match="an input of this command"):
        with staged_outputs(out) as stage:
            atomic_write_text(stage / "a.txt", "new")
            atomic_write_text(stage / "in.txt", "new")
            stage.inputs = [out / "in.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["in.txt"]
    assert (out / "in.txt").read_text() == "input"


def test_a_set_that_cannot_be_moved_in_puts_every_earlier_file_back(tmp_path, monkeypatch):
    """Moving c.txt in fails after a.txt (replacing an earlier one) and b.txt (new) are in: a.txt is
    the earlier file again, b.txt is gone, c.txt is untouched and the error names c.txt."""
    import errno
    import os

    from cyclereg.checkpoint import atomic_write_text, staged_outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("earlier a")
    (out / "c.txt").write_text("earlier c")
    replace = os.replace

    def failing_replace(src, dst):
        if str(dst) == str(out / "c.txt") and ".cyclereg-staging." in str(src) and ".earlier." not in str(src):
            raise OSError(errno.EACCES, "Permission denied", str(dst))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError) as err:
        with staged_outputs(out) as stage:
            for name in ("a.txt", "b.txt", "c.txt"):
                atomic_write_text(stage / name, "new")
    assert err.value.filename == str(out / "c.txt")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "c.txt"]
    assert (out / "a.txt").read_text() == "earlier a" and (out / "c.txt").read_text() == "earlier c"
