"""Contracts of the session's third round of mends, from a mutation audit (2026-12-07).

Audited: the library lines of ca5bfef (:data:`cyclereg.frames.HALF_VOXEL_TOLERANCE` in ``half_width_voxels``),
762f97b (``evaluate`` refuses a keypoint pair whose fixed keypoints all lie outside the dataset's volume grid,
``clouds.api._require_in_dataset_grid``), b5bce2d (:func:`cyclereg.errors.refuse_special_file` in
``require_output_file``, ``checkpoint.atomic_write_bytes`` and ``staged_outputs``), 01cef8c (plain click help,
the no-argument help on stdout, a usage error without click context pointing at its command's help), 986f58c
(progress bars off where stdout is no terminal, the volume evaluate table on stdout, ``status`` printing the run
path whole on its own line and counting '1 stage', long paths kept whole) and 13ae9c9 (NumPy and tensor bools are
no voxel size in ``check_spacing``). Hand-made mutants of those lines that the session's own tests (the invariance
and streams walks, the second round's contracts) let through are killed here; every expected value is derived by
hand (a rounding worked out on paper, a grid's extent in mm, an exact message fragment naming the file).

Also checked: the tolerance changes no NMS half-width of the shared data's scans (chest CT 0.9765625 x 0.9765625 x
2 mm, brain MRI 1 mm) at the default radii, and ``refuse_special_file`` lets through a regular file reached through
a symlink and a path whose folder does not exist yet.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch

from cyclereg import frames
from cyclereg.checkpoint import atomic_write_bytes, staged_outputs
from cyclereg.errors import InputError, refuse_special_file, require_output_file
from cyclereg.pointio import write_points

from conftest import shared_path



# ============================================================================= half_width_voxels' tolerance
@pytest.mark.parametrize("ratio, voxels", [
    (2.5 - 5e-6, 3),   # within 1e-5 voxel under the half: the half, rounded up
    (2.5 - 1e-4, 2),   # 1e-4 under: a plain rounding down
    (0.5 - 5e-6, 1),
    (0.5 - 1e-4, 0),
    (100.5 - 1e-4, 100),  # the tolerance is in voxels, not relative to the ratio (1e-5 x 100.5 = 1e-3 > 1e-4)
    (100.5 - 5e-6, 101),
    (2.5, 3), (1.5, 2), (2.5 + 0.4, 3),
])
def test_a_ratio_within_1e_5_voxel_under_a_half_counts_as_the_half_and_no_further(ratio, voxels):
    """floor(r / s + 0.5 + 1e-5) on 1 mm voxels: 2.499995 -> 3, 2.4999 -> 2 (the tolerance is 1e-5 voxel, as
    documented, neither 0 nor 1e-3, and added to the ratio, not scaled by it)."""
    assert frames.half_width_voxels(ratio, (1.0, 1.0, 1.0)) == (voxels,) * 3


def test_float32_voxel_sizes_read_from_a_header_round_the_half_up():
    """1.2 mm stored in float32 is 1.2000000477 mm: 3 mm / that = 2.4999999 -> 3 (the half); 0.002 m in float32
    read back in mm is 2.0000000950 mm: 3 mm / that = 1.4999999 -> 2."""
    import numpy as np

    s12, s2 = float(np.float32(1.2)), float(np.float32(0.002)) * 1000.0
    assert 3.0 / s12 < 2.5 and 3.0 / s2 < 1.5  # the premise: a hair under the half
    assert frames.half_width_voxels(3.0, (s2, 1.5, s12)) == (2, 2, 3)


CHEST_CT_MM = (0.9765625, 0.9765625, 2.0)
BRAIN_MM = (1.0, 1.0, 1.0)


@pytest.mark.parametrize("spacing, radius, voxels", [
    (CHEST_CT_MM, 4.0, (4, 4, 2)),  # 4.096 -> 4, 2.0 -> 2
    (CHEST_CT_MM, 3.0, (3, 3, 2)),  # 3.072 -> 3, 1.5 (an exact half) -> 2
    (BRAIN_MM, 4.0, (4, 4, 4)),
    (BRAIN_MM, 3.0, (3, 3, 3)),
])
def test_the_tolerance_changes_no_nms_half_width_of_the_shared_scans(spacing, radius, voxels):
    """The default NMS radii (fixed 4 mm, moving 3 mm) on the shared data's voxel sizes: the same half-widths
    as without the tolerance (floor(r / s + 0.5)), worked out by hand."""
    from cyclereg.keypoints.foerstner import DEFAULT_NMS_RADIUS_MM, MOVING_NMS_RADIUS_MM

    assert (DEFAULT_NMS_RADIUS_MM, MOVING_NMS_RADIUS_MM) == (4.0, 3.0)
    assert tuple(int(math.floor(radius / s + 0.5)) for s in spacing) == voxels
    assert frames.half_width_voxels(radius, spacing) == voxels


@pytest.mark.parametrize("scan, spacing", [("chest-ct/chest_ct.nii.gz", CHEST_CT_MM),
                                           ("brain-mri/imagesTr/BrainMRI_0001_0000.nii.gz", BRAIN_MM),
                                           ("brain-mri/imagesTr/BrainMRI_0002_0000.nii.gz", BRAIN_MM)])
def test_the_shared_scans_headers_hold_those_voxel_sizes(scan, spacing):
    """The voxel sizes the test above takes are the shared scans' own (header only, float32 exact: 0.9765625 is
    1000 / 1024)."""
    nib = pytest.importorskip("nibabel")
    path = shared_path(*scan.split("/"))
    zooms = sorted(float(z) for z in nib.load(str(path)).header.get_zooms()[:3])
    assert zooms == sorted(spacing)


# ============================================================================= evaluate: keypoints in the dataset's grid
GRID = {"volume_shape_zyx": [20, 30, 60], "spacing_zyx_mm": [2.0, 1.0, 0.5]}
"""x 0..29.5 mm (60 voxels of 0.5), y 0..29 mm (30 of 1), z 0..38 mm (20 of 2): first voxel at the origin."""


def _cloud(lo, hi, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    return lo + (hi - lo) * torch.rand(n, 3, generator=g, dtype=torch.float64)


def _dataset(folder: Path, fixed, moving, grid=GRID) -> Path:
    """One pair ``c0`` with the given keypoints (x, y, z mm) and 6 landmarks moved by (1, 0, 0) mm."""
    folder.mkdir(parents=True, exist_ok=True)
    lm = _cloud([5.0, 5.0, 5.0], [25.0, 25.0, 30.0], n=6, seed=9)
    for name, pts in {"fk": fixed, "mk": moving, "fl": lm, "ml": lm + torch.tensor([1.0, 0.0, 0.0],
                                                                                  dtype=torch.float64)}.items():
        write_points(folder / f"{name}.csv", pts)
    entry = {"id": "c0", "fixed_keypoints": "fk.csv", "moving_keypoints": "mk.csv", "fixed_landmarks": "fl.csv",
             "moving_landmarks": "ml.csv"}
    (folder / "d.json").write_text(json.dumps({"name": "g", "pairs": [entry], "folds": [["c0"]], **grid}))
    return folder / "d.json"


def _evaluate(ds: Path):
    from cyclereg import api

    return api.evaluate(ds, ds.parent / "r.json", identity=True, device="cpu")


INSIDE = ([20.0, 5.0, 22.0], [29.0, 25.0, 36.0])
"""A corner of the grid: x 20-29 mm (voxels 40-58 of 60), z 22-36 mm (voxels 11-18 of 20). Read with the z y x
spacing or shape reversed (x voxels of 2 mm, z of 0.5 mm: x 0..118, z 0..9.5) no point of it is inside."""


def test_keypoints_in_a_far_corner_of_an_anisotropic_grid_are_accepted(tmp_path):
    fixed = _cloud(*INSIDE)
    r = _evaluate(_dataset(tmp_path, fixed, fixed + 1.0))
    assert r["initial_tre_mm"] == pytest.approx(1.0, abs=1e-6) and r["mean_tre_mm"] == pytest.approx(1.0, abs=1e-6)


def test_keypoints_just_beyond_the_grid_along_z_are_refused_naming_the_fixed_file(tmp_path):
    """Every fixed keypoint at z 40-50 mm (beyond the 38 mm of 20 voxels of 2 mm), x and y inside; the moving
    keypoints at z 30-45 mm, some inside: refused, the message names the fixed keypoint file and the grid as the
    dataset gives it."""
    fixed = _cloud([2.0, 5.0, 40.0], [18.0, 25.0, 50.0])
    moving = _cloud([2.0, 5.0, 30.0], [18.0, 25.0, 45.0], seed=1)
    assert (moving[:, 2] < 38.0).any()
    ds = _dataset(tmp_path, fixed, moving)
    with pytest.raises(InputError) as caught:
        _evaluate(ds)
    assert caught.value.path is not None and caught.value.path.name == "fk.csv"
    assert str(caught.value).startswith(str(caught.value.path) + ": none of its 12 keypoints lies in the "
                                        "dataset's volume grid (20 x 30 x 60 voxels of 2 x 1 x 0.5 mm, z y x")
    assert not (tmp_path / "r.json").exists()


def test_one_fixed_keypoint_inside_the_grid_is_enough(tmp_path):
    """11 of 12 fixed keypoints 1e4 mm away, one inside: not refused (the check asks for any point inside)."""
    fixed = _cloud(*INSIDE)
    fixed[1:] += 1e4
    r = _evaluate(_dataset(tmp_path, fixed, fixed + 1.0))
    assert r["initial_tre_mm"] == pytest.approx(1.0, abs=1e-6)


def test_only_the_fixed_keypoints_are_held_to_the_grid(tmp_path):
    """One fixed keypoint inside (x 28 mm), the others and every moving keypoint beyond x = 29.5 mm (60 voxels of
    0.5 mm), the two clouds overlapping: not refused (the grid is the fixed points' frame)."""
    fixed = _cloud([30.0, 5.0, 5.0], [40.0, 25.0, 30.0])
    fixed[0, 0] = 28.0
    moving = _cloud([31.0, 5.0, 5.0], [41.0, 25.0, 30.0], seed=1)
    r = _evaluate(_dataset(tmp_path, fixed, moving))
    assert r["initial_tre_mm"] == pytest.approx(1.0, abs=1e-6)


def test_a_dataset_without_a_volume_grid_takes_points_anywhere(tmp_path):
    fixed = _cloud(*INSIDE) + 1e4
    r = _evaluate(_dataset(tmp_path, fixed, fixed + 1.0, grid={}))
    assert r["initial_tre_mm"] == pytest.approx(1.0, abs=1e-6)


# ============================================================================= refuse_special_file
@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "out.json"
    os.mkfifo(path)
    return path


def _writer(calls):
    def write(fh):
        calls.append(1)
        fh.write(b"{}")
    return write


def test_a_regular_file_reached_through_a_symlink_is_no_special_file(tmp_path):
    (tmp_path / "real.json").write_text("old")
    link = tmp_path / "link.json"
    os.symlink(tmp_path / "real.json", link)
    assert refuse_special_file(link) is None
    assert require_output_file(link) == link
    atomic_write_bytes(link, _writer([]))
    assert link.read_bytes() == b"{}"


def test_a_path_whose_folder_does_not_exist_yet_is_no_special_file(tmp_path):
    out = tmp_path / "a" / "b" / "r.json"
    assert refuse_special_file(out) is None
    assert require_output_file(out) == out
    assert not (tmp_path / "a").exists()  # nothing made by the checks


def test_a_folder_is_no_special_file(tmp_path):
    """Documented: only what is neither a regular file nor a folder is refused (a folder is the other checks')."""
    assert refuse_special_file(tmp_path) is None


def test_a_path_under_a_file_is_told_its_folder_cannot_be_made(tmp_path):
    """os.stat of FILE/r.json fails with ENOTDIR (not ENOENT): still no special file; require_output_file then
    names the file in the way."""
    (tmp_path / "f.txt").write_text("x")
    assert refuse_special_file(tmp_path / "f.txt" / "r.json") is None
    with pytest.raises(InputError, match=r"cannot make its folder \(.*f\.txt is a file\)"):
        require_output_file(tmp_path / "f.txt" / "r.json")


def test_a_symlink_to_a_fifo_is_refused_naming_the_link(tmp_path, fifo):
    link = tmp_path / "link.json"
    os.symlink(fifo, link)
    with pytest.raises(InputError) as caught:
        refuse_special_file(link)
    assert caught.value.path == link and "exists and is not a regular file" in str(caught.value)


def test_a_device_is_refused():
    if not os.path.exists("/dev/null") or not stat.S_ISCHR(os.stat("/dev/null").st_mode):
        pytest.skip("no /dev/null character device")
    with pytest.raises(InputError, match=r"^/dev/null: exists and is not a regular file"):
        refuse_special_file("/dev/null")


def test_require_output_file_refuses_a_fifo_by_name(fifo):
    with pytest.raises(InputError) as caught:
        require_output_file(fifo)
    assert caught.value.path == fifo and "exists and is not a regular file" in str(caught.value)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_an_atomic_write_refuses_a_fifo_before_writing_and_leaves_it(tmp_path, fifo):
    calls = []
    with pytest.raises(InputError) as caught:
        atomic_write_bytes(fifo, _writer(calls))
    assert caught.value.path == fifo and calls == []
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temporary file left


def test_a_staged_set_is_not_moved_in_over_a_fifo(tmp_path):
    """The output folder holds a FIFO named like one of the staged files: refused naming the output's path,
    the FIFO left as it is, and no file of the set moved in (the other one neither)."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "r.json")
    with pytest.raises(InputError) as caught:
        with staged_outputs(out) as stage:
            (stage.path / "a.csv").write_text("1,2,3\n")
            (stage.path / "r.json").write_text("{}")
    assert caught.value.path == out / "r.json"
    assert stat.S_ISFIFO(os.lstat(out / "r.json").st_mode)
    assert sorted(p.name for p in out.iterdir()) == ["r.json"]


# ============================================================================= status: the run path and '1 stage'
def _status_info(run: str, stages: int) -> dict:
    return {"run": run, "dataset": "d", "kind": "keypoints", "stages": stages, "stop_below_mm": None,
            "folds": [{"fold": 1, "finished": 0, "next": "stage 1", "stage_seconds": {}, "current_stage_s": None,
                       "remaining_s": None, "unlogged_stages": []}]}


@pytest.mark.parametrize("stages, said", [(1, "d (keypoints), 1 stage"), (3, "d (keypoints), 3 stages")])
def test_status_prints_the_run_path_whole_and_plain_on_its_own_line(monkeypatch, stages, said):
    """A run path holding rich markup (``[red]``) and longer than the 80 columns: its own first line, exactly
    the path and a colon; the title counts stages in the singular for one."""
    from rich.console import Console

    from cyclereg.training import api as training_api
    from cyclereg.training.status import show_run_status

    run = "/tmp/[red]x/" + "a_long_folder_name/" * 5 + "run"
    monkeypatch.setattr(training_api, "run_status", lambda path, stages=None, n=stages: _status_info(str(path), n))
    buf = io.StringIO()
    show_run_status(run, console=Console(file=buf, width=80, color_system=None, force_terminal=False))
    lines = buf.getvalue().splitlines()
    assert lines[0] == f"{run}:"
    assert said in buf.getvalue() and (stages != 1 or "1 stages" not in buf.getvalue())
