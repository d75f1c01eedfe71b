"""Point-set I/O.

Formats (chosen by suffix, or explicitly):

* ``.csv`` with header ``x_mm,y_mm,z_mm`` (the shared COPD data): world mm.
* ``.csv`` without header (Learn2Reg keypoint files): voxel indices ``(i, j, k)``; needs
  ``spacing_mm`` (per array axis) and converts with ``mm = index * spacing`` unless an
  affine is given.
* ``.npy``: float array ``(N, 3)`` in mm.
* ``.ply`` / ``.pcd``: through open3d, in mm.

Every reader returns a ``float32`` tensor ``(N, 3)`` in mm (x, y, z) and raises
:class:`~cyclereg.errors.InputError` naming the file for empty clouds, NaN/inf, wrong
column counts and unreadable files.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import torch

from cyclereg.checkpoint import atomic_write_bytes, atomic_write_text
from cyclereg.errors import InputError, require_file
from cyclereg.frames import voxel_to_world, world_to_voxel

HEADER = ("x_mm", "y_mm", "z_mm")


def _check_points(arr: np.ndarray, path: Path, *, columns: int = 3, lines: list[int] | None = None) -> torch.Tensor:
    """``arr`` as ``(N, columns)`` float32 points, or :class:`InputError` naming ``path``; ``lines``: the
    file line of each row (CSV files), so a bad value is reported by its line as parse errors are."""
    if arr.ndim == 1 and arr.size == columns:
        arr = arr.reshape(1, columns)
    if arr.ndim != 2 or arr.shape[1] != columns:
        raise InputError(f"expected {columns} columns per point, got array of shape {arr.shape}", path)
    if arr.shape[0] == 0:
        raise InputError("point cloud is empty", path)
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr))[0, 0])
        where = f"line {lines[bad]}" if lines is not None else f"point {bad} (0-based)"
        raise InputError(f"non-finite coordinate (NaN or inf) on {where}", path)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None, list[int]]:
    """The numbers of a CSV file, its header (``None`` without one) and the file line of each row."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read text ({type(exc).__name__})", path) from None
    text = text.lstrip("\ufeff")  # a byte-order mark (spreadsheet exports) is not part of the first cell
    numbered = [(n, ln) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]  # file line numbers
    if not numbered:
        raise InputError("point cloud is empty", path)
    header = None
    first = [c.strip() for c in numbered[0][1].split(",")]
    try:
        [float(c) for c in first]
    except ValueError:
        header = first
        numbered = numbered[1:]
    if not numbered:
        raise InputError("point cloud is empty", path)
    rows = []
    for n, ln in numbered:
        cells = [c.strip() for c in ln.split(",")]
        try:
            rows.append([float(c) for c in cells])
        except ValueError:
            raise InputError(f"line {n}: not a number in {ln[:60]!r}", path) from None
        expected = len(header) if header is not None else len(rows[0])
        if len(rows[-1]) != expected:
            raise InputError(f"line {n}: {len(rows[-1])} columns, expected {expected}"
                             f"{' (as the header)' if header is not None else ''}", path)
    return np.asarray(rows, dtype=np.float64), header, [n for n, _ in numbered]


def spacing_affine(spacing_mm) -> np.ndarray:
    """The 4x4 affine of headerless Learn2Reg voxel indices without a scan: ``mm = index * spacing``
    (origin 0, axes along x, y, z)."""
    return np.diag([*(float(v) for v in spacing_mm), 1.0])


def _index_grid(affine, spacing_mm) -> np.ndarray:
    """The voxel -> mm affine of a Learn2Reg voxel-index file: the scan's ``affine`` when given, else
    ``mm = index * spacing_mm`` (:func:`spacing_affine`)."""
    return np.asarray(affine, dtype=np.float64) if affine is not None else spacing_affine(spacing_mm)


def read_points(path: str | Path, *, spacing_mm: tuple[float, float, float] | None = None,
                affine: np.ndarray | None = None) -> torch.Tensor:
    """Read a point cloud as ``(N, 3)`` float32 mm (x, y, z). See the module doc for formats."""
    p = require_file(path)
    suffix = p.suffix.lower()
    if suffix == ".csv" or suffix == ".txt":
        arr, header, lines = _read_csv(p)
        if header is not None:
            if len(header) != 3:
                raise InputError(f"expected 3 columns ({','.join(HEADER)}), header has {len(header)}", p)
            names = [h.lstrip("\ufeff").strip().lower() for h in header]
            if sorted(names) != sorted(HEADER):
                raise InputError(f"header {','.join(header)!r}: expected the columns {','.join(HEADER)} (world mm, "
                                 "any order); voxel indices go in a file without a header", p)
            return _check_points(arr[:, [names.index(h) for h in HEADER]], p, lines=lines)
        # headerless: Learn2Reg voxel indices
        if arr.shape[1] != 3:
            raise InputError(f"expected 3 columns per point, got {arr.shape[1]}", p)
        if spacing_mm is None and affine is None:
            raise InputError("headerless CSV holds voxel indices; give the voxel spacing (--spacing) or the scan "
                             "(--reference) to convert to mm", p)
        grid = _index_grid(affine, spacing_mm)
        return _check_points(voxel_to_world(torch.from_numpy(arr), torch.from_numpy(grid)).numpy(), p, lines=lines)
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"not a readable .npy array ({type(exc).__name__})", p) from None
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise InputError(f"expected real numbers, the array holds {arr.dtype} values", p)
        return _check_points(np.asarray(arr, dtype=np.float64), p)
    if suffix in (".ply", ".pcd"):
        o3d = require_open3d()
        try:
            pcd = o3d.io.read_point_cloud(str(p))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"open3d cannot read it ({type(exc).__name__})", p) from None
        return _check_points(np.asarray(pcd.points, dtype=np.float64), p)
    raise InputError(f"unknown point-cloud format '{suffix}' (use .csv, .npy, .ply or .pcd)", p)


def read_landmark_pair(fixed: str | Path, moving: str | Path, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-aligned landmarks ``(N, 3)`` (mm) of a pair: row ``i`` of ``fixed`` corresponds to row ``i``
    of ``moving``; :class:`InputError` naming ``fixed`` when the counts differ. ``what`` names the pair
    in the message (e.g. ``"pair copd01"``)."""
    lf, lm = read_points(fixed), read_points(moving)
    if lf.shape != lm.shape:
        raise InputError(f"{what}: {lf.shape[0]} fixed vs {lm.shape[0]} moving landmarks (the files are row-aligned: "
                         "row i of one corresponds to row i of the other)", fixed)
    return lf, lm


def format_csv(columns: dict[str, torch.Tensor | np.ndarray], *, precision: int = 4) -> str:
    """Render equally long 1-D columns as a CSV text with a header row."""
    names = list(columns)
    data = np.stack([np.asarray(torch.as_tensor(columns[n]).detach().cpu(), dtype=np.float64) for n in names], axis=1)
    buf = io.StringIO()
    buf.write(",".join(names) + "\n")
    np.savetxt(buf, data, delimiter=",", fmt=f"%.{precision}f")
    return buf.getvalue()


def points_csv(points_mm: torch.Tensor | np.ndarray) -> str:
    """``(N, 3)`` mm points as the text of a point CSV (header x_mm,y_mm,z_mm), as
    :func:`write_points` writes it."""
    pts = np.asarray(torch.as_tensor(points_mm).detach().cpu(), dtype=np.float64)
    return format_csv({h: pts[:, i] for i, h in enumerate(HEADER)})


def write_points(path: str | Path, points_mm: torch.Tensor, *, fmt: str | None = None,
                 spacing_mm: tuple[float, float, float] | None = None, affine: np.ndarray | None = None) -> None:
    """Write ``(N, 3)`` mm points atomically as ``csv`` (header x_mm,y_mm,z_mm), ``l2r``
    (headerless voxel indices on the grid of the scan's ``affine``, or without a scan of
    ``mm = index * spacing_mm``: what :func:`read_points` reads back with the same argument),
    ``npy``, ``ply`` or ``pcd``."""
    p = Path(path)
    pts = torch.as_tensor(points_mm).detach().cpu().double().numpy()
    fmt = (fmt or p.suffix.lstrip(".") or "csv").lower()
    if fmt == "csv":
        atomic_write_text(p, points_csv(pts))
    elif fmt == "l2r":
        if spacing_mm is None and affine is None:
            raise InputError("l2r output needs the scan's affine or the voxel spacing", p)
        grid = _index_grid(affine, spacing_mm)
        vox = world_to_voxel(torch.from_numpy(pts), torch.from_numpy(grid)).numpy()
        buf = io.StringIO()
        np.savetxt(buf, vox, delimiter=",", fmt="%.4f")
        atomic_write_text(p, buf.getvalue())
    elif fmt == "npy":
        atomic_write_bytes(p, lambda fh: np.save(fh, pts.astype(np.float32)))
    elif fmt in ("ply", "pcd"):
        o3d = require_open3d()
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
        # open3d writes by file name (the suffix picks the format): into a private folder that is
        # removed whatever happens, then into place as every other output
        with tempfile.TemporaryDirectory(prefix="cyclereg-") as folder:
            tmp = Path(folder) / f"points.{fmt}"
            if not o3d.io.write_point_cloud(str(tmp), pcd):
                raise InputError("open3d failed to write", p)
            data = tmp.read_bytes()
        atomic_write_bytes(p, lambda fh: fh.write(data))
    else:
        raise InputError(f"unknown output format '{fmt}' (csv, l2r, npy, ply, pcd)", p)


def require_open3d():
    """Import open3d or raise a one-line :class:`InputError` explaining how to fix it."""
    try:
        import open3d as o3d  # noqa: PLC0415
    except ImportError as exc:
        msg = str(exc)
        hint = (" (the system library libusb-1.0 is missing: apt-get install -y libusb-1.0-0)"
                if "libusb" in msg else " (pip install open3d)")
        raise InputError(f"open3d is needed for PLY/PCD files but cannot be imported: {msg.splitlines()[0]}{hint}") from None
    return o3d
