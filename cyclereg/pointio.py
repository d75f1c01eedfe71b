"""Point-set I/O.

Formats (chosen by suffix, or explicitly):

* ``.csv`` with header ``x_mm,y_mm,z_mm`` (the shared COPD data): world mm.
* ``.csv`` without header (Learn2Reg keypoint files): voxel indices ``(i, j, k)``; needs
  ``spacing_mm`` (per array axis) and converts with ``mm = index * spacing`` unless an
  affine is given.
* ``.npy``: float array ``(N, 3)`` in mm.
* ``.ply`` / ``.pcd``: in mm; read here (ascii and binary; a compressed PCD through open3d), written
  through open3d.

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
from cyclereg.errors import InputError, _path, require_file
from cyclereg.frames import spacing_affine, voxel_to_world, world_to_voxel

HEADER = ("x_mm", "y_mm", "z_mm")
MAX_COORDINATE_MM = 1e6
"""Largest world coordinate magnitude a point file may hold (mm): a kilometre. Scanner frames put a body
within a few metres of the origin, and float32 (the clouds' type) resolves 0.06 mm there; a file
beyond it holds another unit or garbage, reported as its own file's problem (the overlap check of a
pair could only blame the two files together)."""


def _check_points(arr: np.ndarray, path: Path, *, columns: int = 3, lines: list[int] | None = None) -> torch.Tensor:
    """``arr`` as ``(N, columns)`` float32 points, or :class:`InputError` naming ``path``; ``lines``: the
    file line of each row (CSV files), so a bad value is reported by its line as parse errors are."""
    if arr.ndim == 1 and arr.size == columns:
        arr = arr.reshape(1, columns)
    if arr.ndim != 2 or arr.shape[1] != columns:
        raise InputError(f"expected {columns} columns per point, got array of shape {arr.shape}", path)
    if arr.shape[0] == 0:
        raise InputError("point cloud is empty", path)

    def where(row: int) -> str:
        return f"line {lines[row]}" if lines is not None else f"point {row} (0-based)"

    def first_bad(values: np.ndarray) -> str:
        return where(int(np.argwhere(~np.isfinite(values))[0, 0]))

    if not np.isfinite(arr).all():
        raise InputError(f"non-finite coordinate (NaN or inf) on {first_bad(arr)}", path)
    with np.errstate(over="ignore"):
        single = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(single).all():  # finite in the file, but beyond what float32 holds (~3.4e38)
        raise InputError(f"coordinate out of range (beyond float32's {np.finfo(np.float32).max:.1e}) on "
                         f"{first_bad(single)}", path)
    beyond = np.abs(single) > MAX_COORDINATE_MM
    if beyond.any():
        far = int(np.argwhere(beyond)[0, 0])
        raise InputError(f"coordinate {float(np.abs(single[far]).max()):.3g} mm on {where(far)} is beyond "
                         f"{MAX_COORDINATE_MM:.0e} mm (a kilometre): not millimetres of a scan", path)
    return torch.from_numpy(single)


def holds_voxel_indices(path: str | Path) -> bool:
    """Whether the point file ``path`` holds Learn2Reg voxel indices (a ``.csv`` / ``.txt`` whose first
    line is numbers, no header), which :func:`read_points` converts with a spacing or an affine. A
    file that does not exist or cannot be read says no (its reader names the problem)."""
    p = Path(path)
    if p.suffix.lower() not in (".csv", ".txt") or not p.is_file():
        return False
    try:
        with p.open(encoding="utf-8-sig", errors="replace") as fh:
            first = next((ln for ln in fh if ln.strip()), "")
    except OSError:
        return False
    return bool(first.strip()) and _header_cells(first) is None


def _header_cells(line: str) -> list[str] | None:
    """The cells of a CSV file's first line when they are a header (not all numbers), else None."""
    cells = [c.strip() for c in line.split(",")]
    try:
        [float(c) for c in cells]
    except ValueError:
        return cells
    return None


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
    header = _header_cells(numbered[0][1])
    if header is not None:
        first, numbered = numbered[0], numbered[1:]
        if not numbered and sorted(h.strip().lower() for h in header) != sorted(HEADER):  # JSON, prose: no header
            raise InputError(f"cannot be parsed as points: line {first[0]} is neither numbers nor the header "
                             f"{','.join(HEADER)}: {first[1][:60]!r}", path)
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


# ----------------------------------------------------------------------------- .ply / .pcd
# Read here rather than through open3d: open3d reports a truncated file only as a warning on
# stderr and returns the points it was promised, the missing ones as zeros or whatever its buffer held.
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
_PCD_TYPES = {("F", 4): "f4", ("F", 8): "f8", ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8",
              ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8"}


def _header_lines(data: bytes, end, path: Path, what: str) -> tuple[list[str], int]:
    """The text lines of a header up to the line for which ``end(words)`` holds (included), and the
    byte offset after it."""
    lines, pos = [], 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            raise InputError(f"not a {what} file: its header does not end", path)
        try:
            line = data[pos:nl].decode("ascii").strip()
        except UnicodeDecodeError:
            raise InputError(f"not a {what} file: its header is not text", path) from None
        pos = nl + 1
        lines.append(line)
        if end(line.split()):
            return lines, pos


def _ascii_table(rows: list[str], width: int, path: Path, what: str, *, at_least: bool = False) -> np.ndarray:
    """``(len(rows), width)`` numbers of the text ``rows`` (``at_least``: further values of a row ignored)."""
    table = np.empty((len(rows), width), dtype=np.float64)
    for k, row in enumerate(rows):
        values = row.split()
        if len(values) < width or (len(values) > width and not at_least):
            raise InputError(f"{what} {k}: {len(values)} values, the header says {width}"
                             + (" (truncated?)" if k == len(rows) - 1 else ""), path)
        try:
            table[k] = [float(v) for v in values[:width]]
        except ValueError:
            raise InputError(f"{what} {k}: not a number in {row[:60]!r}", path) from None
    return table


def _xyz(table: dict[str, np.ndarray], path: Path, what: str) -> np.ndarray:
    missing = [c for c in "xyz" if c not in table]
    if missing:
        raise InputError(f"{what} has no {', '.join(missing)} coordinate(s) (has {', '.join(table) or 'none'})", path)
    return np.stack([table[c].astype(np.float64) for c in "xyz"], axis=1)


def _refuse_repeated_names(names: list[str], path: Path, what: str) -> None:
    """:class:`InputError` naming ``path`` when a header names a column twice (which x would be meant?)."""
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"{what} {', '.join(map(repr, twice))} named more than once in the header", path)


def _read_ply(path: Path) -> np.ndarray:
    """The vertices ``(N, 3)`` of a PLY file (ascii or binary, either byte order), refusing truncated ones."""
    data = path.read_bytes()
    if not data.startswith(b"ply"):
        raise InputError("not a PLY file (it does not start with 'ply')", path)
    lines, pos = _header_lines(data, lambda w: w[:1] == ["end_header"], path, "PLY")
    fmt, elements = None, []  # elements: [name, count, [(property, dtype or (count dtype, item dtype))]]
    for line in lines[1:-1]:
        w = line.split()
        try:
            if w[:1] == ["format"]:
                fmt = w[1]
            elif w[:1] == ["element"]:
                if int(w[2]) < 0:
                    raise ValueError(w[2])
                elements.append([w[1], int(w[2]), []])
            elif w[:1] == ["property"] and w[1] == "list":
                elements[-1][2].append((w[4], (_PLY_TYPES[w[2]], _PLY_TYPES[w[3]])))
            elif w[:1] == ["property"]:
                elements[-1][2].append((w[2], _PLY_TYPES[w[1]]))
        except (IndexError, KeyError, ValueError):
            raise InputError(f"unreadable PLY header line {line[:60]!r}", path) from None
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise InputError(f"unknown PLY format {fmt!r}", path)
    vertex = next((e for e in elements if e[0] == "vertex"), None)
    if vertex is None:
        raise InputError("PLY file without a vertex element", path)
    _refuse_repeated_names([n for n, _ in vertex[2]], path, "PLY vertex property")
    if any(isinstance(t, tuple) for _, t in vertex[2]):
        raise InputError("PLY vertices with list properties are not supported", path)
    before = elements[:elements.index(vertex)]  # elements stored ahead of the vertices (rare)
    order = "<" if fmt == "binary_little_endian" else ">"
    body = data[pos:]
    if fmt == "ascii":
        rows = body.decode("ascii", errors="replace").splitlines()
        rows = [r for r in rows if r.strip()]
        skip = sum(count for _, count, _ in before)  # one line per element
        got = rows[skip:skip + vertex[1]]
        if len(got) < vertex[1]:
            raise InputError(f"truncated: the header promises {vertex[1]} vertices, the file holds {len(got)}", path)
        table = _ascii_table(got, len(vertex[2]), path, "vertex", at_least=True)
        return _xyz({n: table[:, i] for i, (n, _) in enumerate(vertex[2])}, path, "the PLY vertex element")
    offset = 0
    for _, count, props in before:
        for _ in range(count):  # step over each row
            for _, t in props:
                if isinstance(t, tuple):
                    n = int(np.frombuffer(body, order + t[0], 1, offset)[0]) if offset < len(body) else 0
                    offset += np.dtype(t[0]).itemsize + n * np.dtype(t[1]).itemsize
                else:
                    offset += np.dtype(t).itemsize
    dtype = np.dtype([(n, order + t) for n, t in vertex[2]])
    have = max(0, len(body) - offset) // dtype.itemsize
    if have < vertex[1]:
        raise InputError(f"truncated: the header promises {vertex[1]} vertices, the file holds {have}", path)
    table = np.frombuffer(body, dtype, vertex[1], offset)
    return _xyz({n: table[n] for n in dtype.names}, path, "the PLY vertex element")


def _read_pcd(path: Path) -> np.ndarray:
    """The points ``(N, 3)`` of a PCD file (DATA ascii or binary; binary_compressed through open3d),
    refusing truncated ones."""
    data = path.read_bytes()
    lines, pos = _header_lines(data, lambda w: w[:1] == ["DATA"], path, "PCD")
    head = {}
    for line in lines:
        w = line.split()
        if w and not w[0].startswith("#"):
            head[w[0].upper()] = w[1:]
    try:
        fields = head["FIELDS"]
        n = int(head["POINTS"][0]) if "POINTS" in head else int(head["WIDTH"][0]) * int(head["HEIGHT"][0])
        sizes = [int(v) for v in head.get("SIZE", ["4"] * len(fields))]
        types = head.get("TYPE", ["F"] * len(fields))
        counts = [int(v) for v in head.get("COUNT", ["1"] * len(fields))]
        kind = head["DATA"][0].lower()
        dtypes = [_PCD_TYPES[(t.upper(), s)] for t, s in zip(types, sizes)]
    except (KeyError, IndexError, ValueError):
        raise InputError("not a PCD file, or an unreadable PCD header", path) from None
    if not (len(fields) == len(sizes) == len(types) == len(counts)):
        raise InputError("PCD header: FIELDS, SIZE, TYPE and COUNT differ in length", path)
    if not fields:
        raise InputError("PCD header: FIELDS names no field", path)
    _refuse_repeated_names([f for f in fields if f != "_"], path, "PCD field")  # "_": padding, may repeat
    if n < 0 or min(counts, default=1) < 1:
        raise InputError(f"PCD header: negative point count or a COUNT below 1 (POINTS {n}, COUNT {counts})", path)
    if kind == "binary_compressed":
        o3d = require_open3d()
        pts = np.asarray(o3d.io.read_point_cloud(str(path)).points, dtype=np.float64)
        if pts.shape[0] != n:
            raise InputError(f"unreadable compressed PCD: the header promises {n} points, open3d read {pts.shape[0]}",
                             path)
        return pts
    columns = [(f, d, c) for f, d, c in zip(fields, dtypes, counts)]
    if kind == "ascii":
        rows = [r for r in data[pos:].decode("ascii", errors="replace").splitlines() if r.strip()]
        if len(rows) != n:
            raise InputError(f"{'truncated' if len(rows) < n else 'malformed'}: the header promises {n} points, "
                             f"the file holds {len(rows)} lines", path)
        table = _ascii_table(rows, sum(counts), path, "point")
        starts = np.cumsum([0] + counts[:-1])
        return _xyz({f: table[:, s] for (f, _, _), s in zip(columns, starts)}, path, "the PCD file")
    if kind != "binary":
        raise InputError(f"unknown PCD DATA kind {kind!r}", path)
    dtype = np.dtype([(f if f != "_" else f"_{i}", "<" + d, (c,) if c > 1 else ())  # "_": padding
                      for i, (f, d, c) in enumerate(columns)])
    have = (len(data) - pos) // dtype.itemsize
    if have < n:
        raise InputError(f"truncated: the header promises {n} points, the file holds {have}", path)
    table = np.frombuffer(data, dtype, n, pos)
    return _xyz({f: table[f] for f in dtype.names if table[f].ndim == 1}, path, "the PCD file")


def _index_grid(affine, spacing_mm) -> np.ndarray:
    """The voxel -> mm affine of a Learn2Reg voxel-index file: the scan's ``affine`` when given, else
    ``mm = index * spacing_mm`` (:func:`spacing_affine`)."""
    return np.asarray(affine, dtype=np.float64) if affine is not None else spacing_affine(spacing_mm)


VOXEL_HINT = "give the voxel spacing (--spacing) or the scan (--reference) to convert to mm"
"""The end of the message for a headerless (voxel-index) CSV read without a spacing or an affine."""


def read_points(path: str | Path, *, spacing_mm: tuple[float, float, float] | None = None,
                affine: np.ndarray | None = None, voxel_hint: str = VOXEL_HINT) -> torch.Tensor:
    """Read a point cloud as ``(N, 3)`` float32 mm (x, y, z). See the module doc for formats.
    ``voxel_hint``: what the message for a headerless CSV without ``spacing_mm`` / ``affine`` tells
    the user to give (the option of the command, or a dataset's grid)."""
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
            raise InputError(f"headerless CSV holds voxel indices; {voxel_hint}", p)
        grid = _index_grid(affine, spacing_mm)
        return _check_points(voxel_to_world(torch.from_numpy(arr), torch.from_numpy(grid)).numpy(), p, lines=lines)
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"not a readable .npy array ({type(exc).__name__})", p) from None
        if not isinstance(arr, np.ndarray):  # np.load opens an .npz archive whatever the suffix
            arr.close()
            raise InputError("not a .npy array (an .npz archive of arrays; save one array with numpy.save)", p)
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise InputError(f"expected real numbers, the array holds {arr.dtype} values", p)
        return _check_points(np.asarray(arr, dtype=np.float64), p)
    if suffix in (".ply", ".pcd"):
        try:
            arr = (_read_ply if suffix == ".ply" else _read_pcd)(p)
        except OSError as exc:
            raise InputError(f"cannot read it ({exc.strerror or type(exc).__name__})", p) from None
        return _check_points(arr, p)
    raise InputError(f"unknown point-cloud format '{suffix}' (use .csv, .npy, .ply or .pcd)", p)


def read_landmark_pair(fixed: str | Path, moving: str | Path, what: str, *,
                       read=read_points) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-aligned landmarks ``(N, 3)`` (mm) of a pair: row ``i`` of ``fixed`` corresponds to row ``i``
    of ``moving``; :class:`InputError` naming ``fixed`` when the counts differ. ``what`` names the pair
    in the message (e.g. ``"pair copd01"``); ``read``: how a file is read (a dataset's
    :meth:`~cyclereg.datasets.KeypointDataset.read_points` places voxel indices on its grid)."""
    lf, lm = read(fixed), read(moving)
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


def _points_array(points_mm) -> np.ndarray:
    """``points_mm`` (a tensor, array or nested list) as a float64 ``(N, 3)`` array; :class:`ValueError`
    naming ``points_mm`` for another shape (an ``(N, 4)`` row would lose its last column) or complex
    values."""
    pts = torch.as_tensor(points_mm).detach().cpu()
    if pts.is_complex():
        raise ValueError(f"points_mm: {pts.dtype} values; complex numbers are no coordinates")
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points_mm: expected (N, 3) points, got shape {tuple(pts.shape)}")
    return pts.double().numpy()


def points_csv(points_mm: torch.Tensor | np.ndarray) -> str:
    """``(N, 3)`` mm points as the text of a point CSV (header x_mm,y_mm,z_mm), as
    :func:`write_points` writes it."""
    pts = _points_array(points_mm)
    return format_csv({h: pts[:, i] for i, h in enumerate(HEADER)})


def parse_points_csv(text: str) -> torch.Tensor:
    """The ``(N, 3)`` float32 mm points of a point CSV's text as :func:`points_csv` writes it (header row,
    then x, y, z per line), as :func:`read_points` reads that file; the text of an empty cloud (the header
    alone) gives ``(0, 3)``."""
    if not any(line.strip() for line in text.splitlines()[1:]):  # np.loadtxt: (0, 1) and a warning
        return torch.zeros(0, 3, dtype=torch.float32)
    table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, ndmin=2)
    return torch.from_numpy(table.astype(np.float32))


def write_points(path: str | Path, points_mm: torch.Tensor, *, fmt: str | None = None,
                 spacing_mm: tuple[float, float, float] | None = None, affine: np.ndarray | None = None) -> None:
    """Write ``(N, 3)`` mm points atomically as ``csv`` (header x_mm,y_mm,z_mm; also a ``.txt`` name), ``l2r``
    (headerless voxel indices on the grid of the scan's ``affine``, or without a scan of
    ``mm = index * spacing_mm``: what :func:`read_points` reads back with the same argument),
    ``npy``, ``ply`` or ``pcd``. An empty cloud is refused (:class:`InputError` naming ``path``, nothing
    written): :func:`read_points` refuses an empty file in every format."""
    p = _path(path, "path")
    pts = _points_array(points_mm)
    if pts.shape[0] == 0:
        raise InputError("point cloud is empty: nothing to write (an empty point file is refused when read)", p)
    suffix = p.suffix.lstrip(".").lower()
    fmt = (fmt or ("csv" if suffix == "txt" else suffix) or "csv").lower()  # .txt reads back as csv: written so
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
