import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cyclereg.checkpoint import load_checkpoint, save_checkpoint
from cyclereg.datasets import load_keypoint_dataset
from cyclereg.errors import InputError, require_count
from cyclereg.pointio import read_points, write_points


@pytest.fixture
def pts():
    return torch.tensor([[1.5, 2.25, 3.0], [10.0, -4.5, 7.125], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("fmt", ["csv", "npy", "ply", "pcd"])
def test_round_trip(tmp_path, pts, fmt):
    p = tmp_path / f"cloud.{fmt}"
    write_points(p, pts)
    torch.testing.assert_close(read_points(p), pts, atol=1e-4, rtol=0)
    assert [q.name for q in tmp_path.iterdir()] == [p.name]  # nothing else left beside it


@pytest.mark.parametrize("fmt", ["ply", "pcd"])
def test_failed_open3d_write_leaves_nothing(tmp_path, pts, fmt, monkeypatch):
    """open3d reporting failure (e.g. a full disk) after writing part of its file: an error naming the
    output, no output and no temporary file beside it."""
    import open3d as o3d

    def half_written(name, pcd):
        Path(name).write_text("ply\n")
        return False

    monkeypatch.setattr(o3d.io, "write_point_cloud", half_written)
    with pytest.raises(InputError, match="open3d failed to write") as err:
        write_points(tmp_path / f"cloud.{fmt}", pts)
    assert f"cloud.{fmt}" in str(err.value) and list(tmp_path.iterdir()) == []


def test_csv_header(tmp_path, pts):
    p = tmp_path / "c.csv"
    write_points(p, pts)
    assert p.read_text().splitlines()[0] == "x_mm,y_mm,z_mm"


def test_csv_columns_are_read_by_their_names(tmp_path, pts):
    """The header names the axes: any order of x_mm, y_mm, z_mm is read as (x, y, z); other names
    (voxel indices, unknown units) are refused rather than taken for mm in x, y, z."""
    p = tmp_path / "zyx.csv"
    rows = "\n".join(f"{z},{y},{x}" for x, y, z in pts.tolist())
    p.write_text("\ufeffZ_mm, y_mm ,x_mm\n" + rows + "\n")  # byte-order mark, case and spaces as spreadsheets write
    torch.testing.assert_close(read_points(p), pts, atol=1e-5, rtol=0)
    for header in ("i,j,k", "x,y,z", "x_mm,y_mm,x_mm"):
        p.write_text(header + "\n" + rows + "\n")
        with pytest.raises(InputError, match="expected the columns x_mm,y_mm,z_mm"):
            read_points(p)


def test_learn2reg_voxel_csv(tmp_path, pts):
    p = tmp_path / "kp.csv"
    spacing = (1.75, 1.0, 1.25)
    write_points(p, pts, fmt="l2r", spacing_mm=spacing)
    assert "x_mm" not in p.read_text()
    vox = np.loadtxt(p, delimiter=",")
    np.testing.assert_allclose(vox, pts.numpy() / np.array(spacing), atol=1e-4)
    torch.testing.assert_close(read_points(p, spacing_mm=spacing), pts, atol=1e-3, rtol=0)
    p.write_text("\ufeff" + p.read_text())  # a byte-order mark does not make the first row a header
    torch.testing.assert_close(read_points(p, spacing_mm=spacing), pts, atol=1e-3, rtol=0)
    with pytest.raises(InputError, match="spacing"):
        read_points(p)


def test_learn2reg_voxel_csv_on_a_scan_grid(tmp_path):
    """With a scan's affine (flipped axis, permuted axes, offset origin), l2r files hold that scan's
    voxel indices, and reading with the same affine gives the points back."""
    affine = np.array([[0.0, 0.0, -1.5, 40.0], [2.0, 0.0, 0.0, -12.5], [0.0, 0.8, 0.0, 7.0], [0, 0, 0, 1]])
    vox = np.array([[0.0, 0.0, 0.0], [3.0, 5.0, 7.0], [10.0, 1.0, 2.0]])
    pts = torch.from_numpy(vox @ affine[:3, :3].T + affine[:3, 3])
    p = tmp_path / "kp.csv"
    write_points(p, pts, fmt="l2r", affine=affine)
    np.testing.assert_allclose(np.loadtxt(p, delimiter=","), vox, atol=1e-4)
    torch.testing.assert_close(read_points(p, affine=affine), pts.float(), atol=1e-3, rtol=0)
    with pytest.raises(InputError, match="affine or the voxel spacing"):
        write_points(tmp_path / "x.csv", pts, fmt="l2r")
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("content,match", [
    ("x_mm,y_mm,z_mm\n", "empty"),
    ("", "empty"),
    ("x_mm,y_mm,z_mm\n1,2,nan\n", "NaN"),
    ("x_mm,y_mm,z_mm\n1,2,3\n4,5,6\n1,inf,3\n", "NaN or inf\\) on line 4"),  # lines counted as parse errors are
    ("x_mm,y_mm,z_mm\n\n1,2,3\n\n1,inf,3\n", "NaN or inf\\) on line 5"),  # the file's lines, blank ones too
    ("x_mm,y_mm,z_mm\n1,2,3\n1e39,2,3\n", "out of range .* on line 3"),  # finite in float64, inf in float32
    # a kilometre off: another unit or garbage, named as this file's problem (a pair's overlap check blamed the other)
    ("x_mm,y_mm,z_mm\n1,2,3\n1,-2e6,3\n", "coordinate 2e\\+06 mm on line 3 is beyond 1e\\+06 mm"),
    ("x_mm,y_mm,z_mm\n\n1,2,3\n\n1,x,3\n", "line 5: not a number"),
    ("x_mm,y_mm\n1,2\n", "3 columns"),
    ("x_mm,y_mm,z_mm\n1,2,3\n1,2\n", "columns"),
    ("x_mm,y_mm,z_mm\n1,2,3,4\n5,6,7,8\n", "line 2: 4 columns, expected 3 \\(as the header\\)"),  # no column dropped
    ("x_mm,y_mm,z_mm\n1,2\n3,4\n", "line 2: 2 columns, expected 3"),  # was an IndexError
    ("x_mm,y_mm,z_mm\n1,abc,3\n", "not a number"),
])
def test_bad_csv(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(InputError, match=match) as err:
        read_points(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_the_coordinate_bound_holds_for_every_format_and_admits_scanner_frames(tmp_path):
    """Scanner coordinates (a table position of two metres) load; a file in micrometres of a body beyond a
    kilometre is refused whatever its format, naming the point."""
    near = np.array([[10.0, -2000.0, 1500.0], [999_999.0, 0.0, 0.0]])
    np.save(tmp_path / "near.npy", near)
    torch.testing.assert_close(read_points(tmp_path / "near.npy"), torch.tensor(near, dtype=torch.float32))
    np.save(tmp_path / "far.npy", near * 1000)
    with pytest.raises(InputError, match=r"far.npy: coordinate 2e\+06 mm on point 0 \(0-based\)"):
        read_points(tmp_path / "far.npy")


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_points(tmp_path / "nope.csv")
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputError, match="npy"):
        read_points(bad)
    for name, values in (("str.npy", np.array([["a", "b", "c"]])), ("complex.npy", np.ones((4, 3)) * (1 + 2j)),
                         ("bool.npy", np.ones((4, 3), dtype=bool))):
        np.save(tmp_path / name, values)
        with pytest.raises(InputError, match="expected real numbers") as err:
            read_points(tmp_path / name)  # strings raised a traceback; complex lost its imaginary part
        assert name in str(err.value)
    np.save(tmp_path / "int.npy", np.arange(12, dtype=np.int16).reshape(4, 3))
    assert read_points(tmp_path / "int.npy")[3].tolist() == [9.0, 10.0, 11.0]
    with pytest.raises(InputError, match="format"):
        (tmp_path / "x.xyz").write_text("1 2 3")
        read_points(tmp_path / "x.xyz")


def test_checkpoint_round_trip_and_kind(tmp_path):
    sd = {"w": torch.randn(3, 4)}
    save_checkpoint(tmp_path / "m.pt", kind="cloud", config={"a": (1, 2)}, state_dict=sd)
    ck = load_checkpoint(tmp_path / "m.pt", kind="cloud")
    assert ck["config"] == {"a": [1, 2]} and "version" in ck
    torch.testing.assert_close(ck["state_dict"]["w"], sd["w"])
    with pytest.raises(InputError, match="expected 'dense' .a keypoint-cloud model: register two scans with it through --via-keypoints"):
        load_checkpoint(tmp_path / "m.pt", kind="dense")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporaries


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    """Outputs are written through a private temporary file but end up 0o666 less the umask."""
    import os

    from cyclereg.checkpoint import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_renames_are_made_durable_by_syncing_the_directory(tmp_path, monkeypatch):
    """After the rename into place, the folder holding the file is synced (for an atomic write and for
    a command's set of staged outputs), so that a power loss cannot bring back the earlier file."""
    import os
    import stat

    from cyclereg.checkpoint import atomic_write_text, staged_outputs

    synced, real_fsync = [], os.fsync

    def fsync(fd):
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            synced.append((info.st_dev, info.st_ino))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    folder = tmp_path / "a"
    atomic_write_text(folder / "x.txt", "x")
    ident = lambda p: (p.stat().st_dev, p.stat().st_ino)  # noqa: E731
    assert synced == [ident(folder)]
    synced.clear()
    with staged_outputs(tmp_path / "b") as stage:
        atomic_write_text(stage / "y.txt", "y")
    assert ident(tmp_path / "b") in synced and (tmp_path / "b" / "y.txt").read_text() == "y"


def test_staged_outputs_reach_the_folder_together_or_not_at_all(tmp_path, monkeypatch):
    """A command's files appear together; a failure while writing them leaves the folder as it was
    (folders it made are removed again), and a failure while moving them in restores the earlier
    files, keeps the earlier command's other outputs, and names the output, not a staged file."""
    import json
    import os
    from pathlib import Path

    import pytest

    from cyclereg import checkpoint
    from cyclereg.checkpoint import OutputsNotRestored, atomic_write_text, stale_outputs, staged_outputs

    out = tmp_path / "new" / "deeper"
    with pytest.raises(RuntimeError):
        with staged_outputs(out) as stage:
            atomic_write_text(stage / "a.txt", "a")
            raise RuntimeError("the second output failed")
    assert not (tmp_path / "new").exists()

    def earlier_run(folder: Path) -> None:  # an earlier command's outputs, listed in its config.json
        for name in ("a.txt", "b.txt", "extra.txt"):
            (folder / name).write_text("earlier")
        (folder / "config.json").write_text(json.dumps({"command": "register", "cyclereg_version": "0",
                                                        "outputs": ["a.txt", "b.txt", "extra.txt"]}))

    def new_run(stage) -> None:
        for name in ("a.txt", "b.txt", "config.json"):
            atomic_write_text(stage / name, "new")
        stage.stale = stale_outputs(out, ["a.txt", "b.txt"])

    out = tmp_path / "old"
    out.mkdir()
    earlier_run(out)
    with staged_outputs(out) as stage:
        new_run(stage)
    assert {f.name: f.read_text() for f in out.iterdir()} == {"a.txt": "new", "b.txt": "new", "config.json": "new"}

    earlier_run(out)
    before = {f.name: f.read_text() for f in out.iterdir()}
    real = os.replace

    def refuse_b(src, dst):  # like a write-protected (immutable) b.txt: it cannot be moved or replaced
        if out / "b.txt" in (Path(src), Path(dst)):
            raise PermissionError(1, "Operation not permitted", str(src))
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", refuse_b)
    with pytest.raises(OSError) as err:
        with staged_outputs(out) as stage:
            new_run(stage)
    assert err.value.filename == str(out / "b.txt")
    assert {f.name: f.read_text() for f in out.iterdir()} == before  # extra.txt too

    # a write into the staging folder that fails names the output
    monkeypatch.setattr(checkpoint.os, "replace", real)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(OSError) as err:
        with staged_outputs(out) as stage:
            new_run(stage)
    assert err.value.filename == str(out / "a.txt") and err.value.errno == 28
    monkeypatch.undo()
    assert {f.name: f.read_text() for f in out.iterdir()} == before

    # an earlier file that cannot be put back is kept in the staging folder, which the error names
    # (b.txt cannot be replaced, nor a.txt put back)
    err = _move_in_with(out, monkeypatch, lambda src, dst: dst == out / "b.txt" or (
        src.name.startswith(".earlier.") and src.name.endswith(".a.txt")))
    assert isinstance(err, OutputsNotRestored)
    kept = [f for f in out.iterdir() if f.name.startswith(".cyclereg-staging")]
    assert len(kept) == 1 and str(kept[0]) in str(err)
    aside = [f for f in kept[0].iterdir() if f.name.startswith(".earlier.") and f.name.endswith(".a.txt")]
    assert len(aside) == 1 and aside[0].read_text() == "earlier"  # .earlier.XXXXXXXX.a.txt


def test_atomic_write_errors_name_the_output(tmp_path):
    import pytest

    from cyclereg.checkpoint import atomic_write_text

    (tmp_path / "taken").write_text("a file where a folder must go")
    with pytest.raises(OSError) as err:
        atomic_write_text(tmp_path / "taken" / "out.txt", "x")
    assert err.value.filename == str(tmp_path / "taken" / "out.txt")


def test_require_count_names_flag_and_bound():
    """``None`` and values at or above the minimum pass through; below it the error names flag, value and bound."""
    assert require_count("--stages", None, 1) is None
    assert require_count("--stages", 1, 1) == 1 and require_count("--tta-passes", 0, 0) == 0
    with pytest.raises(InputError, match=r"^--tta-passes -1: need 0 or more$"):
        require_count("--tta-passes", -1, 0)
    with pytest.raises(InputError, match=r"^--stages 0: need 1 or more$"):
        require_count("--stages", 0, 1)


@pytest.mark.parametrize("change,message", [
    ({"pairs": "dup"}, "'a' is listed more than once"),
    ({"folds": [["a"], ["zz"]]}, "fold 2 holds out 'zz', which is not a pair id"),
    ({"folds": [["a"], ["a", "b"]]}, "pair 'a' is held out by folds 1 and 2"),
    ({"folds": [["a", "a"], ["b"]]}, "fold 1 lists 'a' twice"),
    ({"folds": [[]]}, "fold 1: expected a non-empty list"),
    ({"folds": 5}, "'folds' should be a list of folds"),
    ({"volume_shape_zyx": [192, 192], "spacing_zyx_mm": [1, 1, 1]}, "volume_shape_zyx: expected three positive whole"),
    ({"volume_shape_zyx": [0.5, 0.5, 0.5], "spacing_zyx_mm": [1, 1, 1]}, "volume_shape_zyx: expected three positive whole"),
    ({"volume_shape_zyx": [10.5, 10, 10], "spacing_zyx_mm": [1, 1, 1]}, "volume_shape_zyx: expected three positive whole"),
    ({"volume_shape_zyx": [192, 192, 208], "spacing_zyx_mm": [1, 0, 1]}, "spacing_zyx_mm: expected three positive finite"),
    ({"volume_shape_zyx": [192, 192, 208], "spacing_zyx_mm": [float("inf"), 1, 1]}, "spacing_zyx_mm: expected three"),
    ({"volume_shape_zyx": [192, 192, 208]}, "go together"),
    # 10^21 voxels passed, then torch's index arithmetic overflowed in scoring (a traceback)
    ({"volume_shape_zyx": [10**7, 10**7, 10**7], "spacing_zyx_mm": [1, 1, 1]}, "voxels, more than 2147483648 (2^31)"),
])
def test_keypoint_dataset_json_is_validated(tmp_path, change, message):
    pairs = [{"id": i, "fixed_keypoints": f"{i}f.csv", "moving_keypoints": f"{i}m.csv"} for i in ("a", "b")]
    obj = {"pairs": pairs, "folds": [["a"], ["b"]]}
    if change.pop("pairs", None) == "dup":
        obj["pairs"] = pairs + [pairs[0]]
    obj.update(change)
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(InputError, match=re.escape(message)) as info:
        load_keypoint_dataset(path)
    assert str(info.value).startswith(str(path))
    obj.update({"folds": [["a"], ["b"]], "pairs": pairs})
    obj.pop("volume_shape_zyx", None), obj.pop("spacing_zyx_mm", None)
    path.write_text(json.dumps(obj))
    assert load_keypoint_dataset(path).folds == (("a",), ("b",))


@pytest.mark.parametrize("fmt,ascii_,compressed", [("ply", False, False), ("ply", True, False), ("pcd", False, False),
                                                   ("pcd", True, False), ("pcd", False, True)])
def test_ply_pcd_as_open3d_writes_them_and_truncated_ones_refused(tmp_path, fmt, ascii_, compressed):
    """Files open3d writes (with normals and colours beside x, y, z) read back exactly; the same files
    cut short are refused naming the file (open3d itself only warns on stderr and hands back the
    promised number of points, the missing ones as zeros or leftover memory)."""
    import open3d as o3d

    rng = np.random.default_rng(0)
    xyz = rng.uniform(-50, 150, (40, 3))
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    pcd.normals = o3d.utility.Vector3dVector(rng.uniform(-1, 1, (40, 3)))
    pcd.colors = o3d.utility.Vector3dVector(rng.uniform(0, 1, (40, 3)))
    path = tmp_path / f"c.{fmt}"
    assert o3d.io.write_point_cloud(str(path), pcd, write_ascii=ascii_, compressed=compressed)
    np.testing.assert_allclose(read_points(path).numpy(), xyz, atol=1e-3 if ascii_ else 1e-4)  # ascii: 3 decimals
    cut = tmp_path / f"cut.{fmt}"
    for keep in (len(path.read_bytes()) - 37, len(path.read_bytes()) // 2):
        cut.write_bytes(path.read_bytes()[:keep])
        with pytest.raises(InputError) as err:
            read_points(cut)
        message = str(err.value)
        assert message.startswith(str(cut)) and "\n" not in message
        assert any(w in message for w in ("truncated", "promises", "unreadable")), message


def test_ply_layouts(tmp_path):
    """Big-endian doubles with a trailing property, and an element with a list property before the
    vertices (binary and ascii): the vertices' x, y, z; a header without them, or no PLY: refused."""
    xyz = np.arange(15, dtype=np.float64).reshape(5, 3) * 1.5 - 4
    head = "ply\nformat {}\ncomment made by hand\n{}end_header\n"
    rows = np.zeros(5, dtype=[("x", ">f8"), ("y", ">f8"), ("z", ">f8"), ("red", "u1")])
    rows["x"], rows["y"], rows["z"] = xyz.T
    vertex = "element vertex 5\nproperty double x\nproperty double y\nproperty double z\nproperty uchar red\n"
    (tmp_path / "be.ply").write_bytes(head.format("binary_big_endian 1.0", vertex).encode() + rows.tobytes())
    np.testing.assert_allclose(read_points(tmp_path / "be.ply").numpy(), xyz)
    faces = "element face 2\nproperty list uchar int vertex_indices\n"
    vertex_f = "element vertex 5\nproperty float z\nproperty float y\nproperty float x\n"  # another order
    body = (np.array([3], "u1").tobytes() + np.array([0, 1, 2], "<i4").tobytes() + np.array([4], "u1").tobytes()
            + np.array([0, 1, 2, 3], "<i4").tobytes() + xyz[:, ::-1].astype("<f4").tobytes())
    (tmp_path / "f.ply").write_bytes(head.format("binary_little_endian 1.0", faces + vertex_f).encode() + body)
    np.testing.assert_allclose(read_points(tmp_path / "f.ply").numpy(), xyz)
    text = "3 0 1 2\n4 0 1 2 3\n" + "\n".join(" ".join(f"{v:g}" for v in r[::-1]) for r in xyz) + "\n"
    (tmp_path / "fa.ply").write_text(head.format("ascii 1.0", faces + vertex_f) + text)
    np.testing.assert_allclose(read_points(tmp_path / "fa.ply").numpy(), xyz)
    (tmp_path / "noz.ply").write_text(head.format("ascii 1.0", "element vertex 1\nproperty float x\nproperty float y\n")
                                      + "1 2\n")
    with pytest.raises(InputError, match="no z coordinate"):
        read_points(tmp_path / "noz.ply")
    (tmp_path / "no.ply").write_text("hello\n")
    with pytest.raises(InputError, match="not a PLY file"):
        read_points(tmp_path / "no.ply")
    # a negative count in the header (with a stray byte after it): the header's problem, not a numpy error
    neg = "element vertex -1\nproperty float x\nproperty float y\nproperty float z\n"
    (tmp_path / "neg.ply").write_bytes(head.format("binary_little_endian 1.0", neg).encode() + b"\0")
    with pytest.raises(InputError, match="unreadable PLY header line 'element vertex -1'"):
        read_points(tmp_path / "neg.ply")
    pcd = "VERSION .7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 1\nHEIGHT 1\nPOINTS -1\nDATA binary\n"
    (tmp_path / "neg.pcd").write_bytes(pcd.encode() + b"\0")
    with pytest.raises(InputError, match="negative point count"):
        read_points(tmp_path / "neg.pcd")


def test_a_set_of_outputs_in_several_folders_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """staged_file_set: files in two folders reach their places together; a file that cannot be moved in
    takes the ones already moved out again and puts the earlier files back; a failing or interrupted body
    changes nothing and leaves no folder it made; errors name the output; a folder where an output goes
    is refused, never moved aside and deleted."""
    import os
    from pathlib import Path

    import pytest

    from cyclereg import checkpoint
    from cyclereg.checkpoint import atomic_write_text, staged_file_set
    from cyclereg.errors import InputError

    a, b = tmp_path / "one" / "r.json", tmp_path / "two" / "deep" / "e.csv"
    for body_error in (RuntimeError("the second output failed"), KeyboardInterrupt()):
        with pytest.raises(type(body_error)):
            with staged_file_set() as files:
                atomic_write_text(files(a), "new")
                atomic_write_text(files(tmp_path / "two" / "x.txt"), "new")  # "two" made before "two/deep"
                atomic_write_text(files(b), "new")
                raise body_error
        assert sorted(os.listdir(tmp_path)) == []

    with staged_file_set() as files:
        atomic_write_text(files(a), "first")
        atomic_write_text(files(b), "first")
    assert (a.read_text(), b.read_text()) == ("first", "first")
    assert sorted(p.name for p in a.parent.iterdir()) == ["r.json"] and sorted(os.listdir(b.parent)) == ["e.csv"]

    real = os.replace

    def refuse_b(src, dst):  # like a write-protected (immutable) e.csv: it cannot be moved or replaced
        if b in (Path(src), Path(dst)):
            raise PermissionError(1, "Operation not permitted", str(src))
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", refuse_b)
    with pytest.raises(OSError) as err:
        with staged_file_set() as files:
            atomic_write_text(files(a), "second")
            atomic_write_text(files(b), "second")
    monkeypatch.undo()
    assert err.value.filename == str(b)
    assert (a.read_text(), b.read_text()) == ("first", "first")  # r.json was moved in, and taken out again
    assert sorted(os.listdir(a.parent)) == ["r.json"] and sorted(os.listdir(b.parent)) == ["e.csv"]

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    with pytest.raises(OSError) as err:
        with staged_file_set() as files:
            atomic_write_text(files(b), "third")
    monkeypatch.undo()
    assert err.value.filename == str(b) and err.value.errno == 28 and b.read_text() == "first"

    a.unlink()
    (a / "keep").mkdir(parents=True)  # a folder of the user's where the report goes
    with pytest.raises(InputError, match="is a folder; an output file is needed here") as err:
        with staged_file_set() as files:
            atomic_write_text(files(a), "fourth")
            atomic_write_text(files(b), "fourth")
    assert str(a) in str(err.value) and (a / "keep").is_dir() and b.read_text() == "first"


# ----------------------------------------------------------------------------- found by mutation (round 3)
_PCD_HEADER = "VERSION .7\nFIELDS {f}\nSIZE {s}\nTYPE {t}\nCOUNT {c}\n{wh}VIEWPOINT 0 0 0 1 0 0 0\n{pts}DATA {kind}\n"


def _pcd(fields, sizes, types, counts, kind, n, wh=None):
    """A PCD header (bytes) for ``n`` points; ``wh``: WIDTH/HEIGHT lines instead of a POINTS line."""
    return _PCD_HEADER.format(f=fields, s=sizes, t=types, c=counts, kind=kind,
                       wh=wh or f"WIDTH {n}\nHEIGHT 1\n", pts="" if wh else f"POINTS {n}\n").encode()


_XYZ = np.array([[1.5, 2.0, -3.0], [4.0, 5.25, 6.0]])


def test_pcd_count_above_one_before_xyz(tmp_path):
    """A field of COUNT 2 before x, y, z (ascii and binary): the coordinates are read from their own columns."""
    a = tmp_path / "a.pcd"
    a.write_bytes(_pcd("h x y z", "4 4 4 4", "F F F F", "2 1 1 1", "ascii", 2)
                  + b"".join(b"9 8 %g %g %g\n" % tuple(r) for r in _XYZ))
    np.testing.assert_array_equal(read_points(a).numpy(), _XYZ)
    rows = np.zeros(2, [("h", "<f4", (2,)), ("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    rows["h"] = 9
    rows["x"], rows["y"], rows["z"] = _XYZ.T
    b = tmp_path / "b.pcd"
    b.write_bytes(_pcd("h x y z", "4 4 4 4", "F F F F", "2 1 1 1", "binary", 2) + rows.tobytes())
    np.testing.assert_array_equal(read_points(b).numpy(), _XYZ)


def test_pcd_ascii_extra_line_or_value_is_refused(tmp_path):
    """An ascii PCD with more lines than POINTS, or more values on a line than its fields, is refused."""
    p = tmp_path / "c.pcd"
    p.write_bytes(_pcd("x y z", "4 4 4", "F F F", "1 1 1", "ascii", 2) + b"1 2 3\n4 5 6\n7 8 9\n")
    with pytest.raises(InputError, match="malformed"):
        read_points(p)
    p.write_bytes(_pcd("x y z", "4 4 4", "F F F", "1 1 1", "ascii", 2) + b"1 2 3 4\n4 5 6\n")
    with pytest.raises(InputError, match="point 0: 4 values"):
        read_points(p)


def test_pcd_without_points_uses_width_times_height(tmp_path):
    """Without a POINTS line an organised cloud holds WIDTH x HEIGHT points (2 x 2 here, not 2)."""
    p = tmp_path / "o.pcd"
    p.write_bytes(_pcd("x y z", "4 4 4", "F F F", "1 1 1", "ascii", 0, wh="WIDTH 2\nHEIGHT 2\n")
                  + b"".join(b"%d 0 0\n" % k for k in range(4)))
    np.testing.assert_array_equal(read_points(p).numpy()[:, 0], [0, 1, 2, 3])


def test_pcd_binary_padding_fields_and_one_byte_short(tmp_path):
    """Padding fields named _ (PCL writes several) are skipped; a binary body one byte short holds one point less."""
    rows = np.zeros(2, [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("_0", "u1"), ("_1", "u1")])
    rows["x"], rows["y"], rows["z"] = _XYZ.T
    p = tmp_path / "p.pcd"
    head = _pcd("x y z _ _", "4 4 4 1 1", "F F F U U", "1 1 1 1 1", "binary", 2)
    p.write_bytes(head + rows.tobytes())
    np.testing.assert_array_equal(read_points(p).numpy(), _XYZ)
    p.write_bytes(head + rows.tobytes()[:-1])
    with pytest.raises(InputError, match="promises 2 points, the file holds 1"):
        read_points(p)


def _earlier(out, names):
    for n in names:
        (out / n).write_text("earlier")


def _move_in_with(out, monkeypatch, refused):
    """staged_outputs of a new a.txt and b.txt into ``out`` while ``os.replace(src, dst)`` raises a
    PermissionError where ``refused(src, dst)``; returns the error the writer raised."""
    from cyclereg import checkpoint
    from cyclereg.checkpoint import atomic_write_text, staged_outputs

    real = os.replace

    def replace(src, dst):
        if refused(Path(src), Path(dst)):
            raise PermissionError(1, "Operation not permitted", str(src))
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError) as err:
        with staged_outputs(out) as stage:
            atomic_write_text(stage / "a.txt", "new")
            atomic_write_text(stage / "b.txt", "new")
    monkeypatch.undo()
    return err.value


def test_move_in_takes_out_a_new_file_without_an_earlier_one(tmp_path, monkeypatch):
    """A new a.txt (no earlier one) moved in before b.txt fails is taken out again: the folder is as it was."""
    out = tmp_path / "o"
    out.mkdir()
    _earlier(out, ["b.txt"])
    _move_in_with(out, monkeypatch, lambda src, dst: out / "b.txt" in (src, dst))
    assert {f.name: f.read_text() for f in out.iterdir()} == {"b.txt": "earlier"}


def test_move_in_restores_the_failing_outputs_earlier_file(tmp_path, monkeypatch):
    """b.txt moved aside, then its new file cannot go in: both earlier files are back, unchanged."""
    out = tmp_path / "o"
    out.mkdir()
    _earlier(out, ["a.txt", "b.txt"])
    err = _move_in_with(out, monkeypatch, lambda src, dst: dst == out / "b.txt" and not src.name.startswith(".earlier"))
    assert err.errno == 1 and err.filename == str(out / "b.txt")
    assert {f.name: f.read_text() for f in out.iterdir()} == {"a.txt": "earlier", "b.txt": "earlier"}


def test_stale_outputs_reads_outputs_files_and_never_leaves_the_folder(tmp_path):
    """Both forms of a config's outputs (a list, outputs.files) are read; a name outside the folder or in a
    subfolder is never a stale output."""
    from cyclereg.checkpoint import stale_outputs
    out = tmp_path / "o"
    (out / "sub").mkdir(parents=True)
    _earlier(out, ["a.txt", "sub/x.txt"])
    _earlier(tmp_path, ["outside.txt"])
    own = {"command": "register", "cyclereg_version": "0"}  # what register's own record holds
    (out / "config.json").write_text(json.dumps({**own, "outputs": {"files": ["a.txt"]}}))
    assert stale_outputs(out, []) == [out / "a.txt"]
    (out / "config.json").write_text(json.dumps({**own, "outputs": ["../outside.txt", "sub/x.txt", "a.txt"]}))
    assert stale_outputs(out, []) == [out / "a.txt"]
