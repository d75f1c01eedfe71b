"""NIfTI I/O with nibabel. Arrays keep nibabel's axis order (i, j, k); see :mod:`cyclereg.frames`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cyclereg.checkpoint import atomic_write_bytes
from cyclereg.console import print_note
from cyclereg.errors import InputError, require_file
from cyclereg.frames import LOW_PRECISION, voxel_disp_to_mm


@dataclass(frozen=True)
class Volume:
    """A 3-D volume.

    Attributes:
        data: ``(D, H, W)`` tensor (float32 for images, int64 for label maps), axes (i, j, k).
        affine: ``(4, 4)`` float64 numpy array, voxel index -> world mm.
        path: where it was read from (for messages), or None.
    """

    data: torch.Tensor
    affine: np.ndarray
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along (i, j, k) in mm."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))  # type: ignore[return-value]


LABEL_ROUNDING_TOLERANCE = 1e-3
"""Float label maps are rounded to integers when every value lies this close to one (scaled storage)."""

GRID_TOLERANCE_MM = 1e-3
"""Two grids are one when their shapes agree and their affines' entries (voxel -> mm) differ by at most this."""


def same_grid(a: Volume, b: Volume, *, atol_mm: float = GRID_TOLERANCE_MM) -> bool:
    """Whether two volumes lie on one grid: the same shape and affine (:data:`GRID_TOLERANCE_MM`)."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, rtol=0.0, atol=atol_mm)


def check_same_grid(fixed: Volume, moving: Volume, what: str = "moving image", ref: str = "fixed image",
                    hint: str = "resample both onto one grid first") -> None:
    """Raise :class:`InputError` naming ``moving``'s file when its grid differs from ``fixed``'s
    (different shape, or an affine differing by more than :data:`GRID_TOLERANCE_MM`); ``hint`` ends the message."""
    if fixed.shape != moving.shape:
        raise InputError(f"{what} has shape {moving.shape} but the {ref} {fixed.path} has {fixed.shape};"
                         f" {hint}", moving.path)
    if not same_grid(fixed, moving):
        raise InputError(f"{what} has a different affine (voxel-to-world) than the {ref} {fixed.path};"
                         f" {hint}", moving.path)


def axis_codes(affine: np.ndarray) -> tuple[str, str, str]:
    """Where the voxel axes (i, j, k) of a voxel -> mm ``affine`` point: the nearest world direction of
    each as nibabel's codes (``R``/``L``, ``A``/``P``, ``S``/``I``), e.g. ``("R", "A", "S")``."""
    from nibabel.orientations import aff2axcodes  # noqa: PLC0415

    return tuple(str(c) for c in aff2axcodes(np.asarray(affine, dtype=np.float64)))  # type: ignore[return-value]


def spacing_differs(got, expected, rel_tol: float) -> bool:
    """Whether voxel sizes ``got`` differ from ``expected`` (mm per axis) by more than ``rel_tol`` of
    ``expected`` along some axis."""
    got, expected = np.asarray(got, dtype=float), np.asarray(expected, dtype=float)
    return bool(np.any(np.abs(got - expected) > rel_tol * expected))


def spacing_text(spacing_mm) -> str:
    """Voxel sizes for a message: ``(2, 1.5, 1.25)`` (4 significant digits, no array reprs)."""
    return "(" + ", ".join(f"{float(v):.4g}" for v in spacing_mm) + ")"


MIN_VOXEL_SIZE_MM = 1e-6
"""A voxel -> mm affine whose grid collapses an axis to less than this (its smallest singular value)
is refused: points and fields cannot be mapped back to voxels."""


MM_PER_UNIT = {"mm": 1.0, "meter": 1000.0, "micron": 0.001}
"""Millimetres per spatial unit a NIfTI header can name (``xyzt_units``); ``unknown`` is read as mm."""


def _stored_zooms(img) -> np.ndarray | None:
    """``pixdim[1:4]`` as the file stores them (nibabel's loading sets a zero one to 1); ``None`` when the
    header cannot be read again."""
    try:
        holder = img.file_map.get("header") or img.file_map["image"]  # a .hdr/.img pair, or one .nii(.gz) file
        with holder.get_prepare_fileobj("rb") as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
        return np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    except Exception:  # noqa: BLE001 - it was read once already: the check is skipped, not the file refused
        return None


def _spatial_unit(img) -> str:
    """The spatial unit of ``img``'s header (a key of :data:`MM_PER_UNIT`); ``"mm"`` when unknown or unnamed."""
    get = getattr(img.header, "get_xyzt_units", None)
    unit = get()[0] if get is not None else "unknown"
    return unit if unit in MM_PER_UNIT else "mm"


def affine_problem(affine: np.ndarray) -> str | None:
    """Why a 4x4 voxel -> mm ``affine`` cannot be used (``None``: it can): non-finite entries, or a
    (nearly) singular linear part (a voxel size of zero along some direction)."""
    A = np.asarray(affine, dtype=np.float64)
    if A.shape != (4, 4) or not np.isfinite(A).all():
        return "the voxel-to-world affine holds NaN or inf" if A.shape == (4, 4) else f"affine of shape {A.shape}"
    smallest = float(np.linalg.svd(A[:3, :3], compute_uv=False).min())
    if smallest < MIN_VOXEL_SIZE_MM:
        sizes = ", ".join(f"{v:g}" for v in np.linalg.norm(A[:3, :3], axis=0))
        return (f"the voxel-to-world affine is singular (voxel sizes {sizes} mm; a zero pixdim or a degenerate "
                "sform/qform): fix the header")
    return None


_NOTED: set[tuple[str, Path]] = set()
"""(what, file) of every header note said in this process: each is said once per file."""


def _note_once(path: Path, what: str, text: str) -> None:
    """:func:`~cyclereg.console.print_note` ``"{path}: {text}"`` unless note ``what`` was said of ``path``."""
    key = (what, path.resolve())
    if key not in _NOTED:
        _NOTED.add(key)
        print_note(f"{path}: {text}")


def _note_unknown_orientation(path: Path) -> None:
    """Say once per file (stderr) that its header has no orientation (qform and sform codes 0): the
    affine used is nibabel's fallback (x flipped, origin at the volume's centre), which other tools may
    not share (the NIfTI standard's method 1 puts voxel i at ``pixdim * i``), so points and outputs in
    world mm may overlay the file differently there. Kept as read: within cyclereg it is consistent."""
    _note_once(path, "orientation", "its header has no orientation (qform and sform codes 0); read with nibabel's "
               "fallback affine (x flipped, origin at the volume's centre): world mm and outputs may not overlay it in "
               "other tools; set the sform/qform if it has a known orientation")


QFORM_SFORM_NOTE_MM = 0.01
"""A header whose qform and sform (both coded) place some corner voxel of the volume more than this
far apart [mm] gets a note (:func:`_note_qform_sform_disagree`)."""


def qform_sform_distance_mm(shape: tuple[int, ...], qform: np.ndarray, sform: np.ndarray) -> float:
    """Largest distance [mm] between where two voxel -> mm affines put the centres of the eight corner
    voxels of a volume of ``shape`` (its first three axes)."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    diff = corners @ (np.asarray(qform, dtype=np.float64) - np.asarray(sform, dtype=np.float64)).T
    return float(np.linalg.norm(diff[:, :3], axis=1).max())


def _note_qform_sform_disagree(path: Path, distance_mm: float) -> None:
    """Say once per file (stderr) that its qform and sform disagree: cyclereg (as nibabel) uses the
    sform, while tools that prefer the qform (older ITK and the tools built on it) place the volume
    up to ``distance_mm`` elsewhere, so points and outputs in world mm may not overlay it there."""
    _note_once(path, "qform", f"its qform and sform disagree (by up to {distance_mm:.3g} mm at the volume's corners); "
               "the sform is used, as nibabel does: tools that read the qform place it elsewhere; make the two agree if "
               "the file is used with such tools")


LABEL_MAX = 2**31 - 1
"""Largest label value (label maps are written as 32-bit integers)."""


def _beyond_label_range(lo, hi):
    """The smallest ``lo`` or largest ``hi`` value of a label map that a 32-bit integer cannot hold
    (``hi`` first), or ``None`` when both fit (:data:`LABEL_MAX`)."""
    return hi if hi > LABEL_MAX else lo if lo < -LABEL_MAX - 1 else None


def read_nifti(path: str | Path, *, labels: bool = False) -> Volume:
    """Read a 3-D NIfTI (a trailing singleton 4th axis is dropped). The affine is in mm: a header in metres or
    microns (``xyzt_units``) is converted (:data:`MM_PER_UNIT`, a note says so once per file).

    Raises :class:`InputError` naming the file if it is missing, unreadable, not 3-D, empty, complex-valued or
    not scalar (RGB), holds NaN/inf, or has an unusable affine (:func:`affine_problem`; a zero pixdim where the
    pixdims place the volume, no sform).
    """
    import nibabel as nib  # noqa: PLC0415

    p = require_file(path)
    try:
        img = nib.load(str(p))
        arr = np.asarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - any nibabel failure is bad input
        raise InputError(f"unreadable NIfTI ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", p) from None
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise InputError(f"expected a 3-D volume, got shape {arr.shape}", p)
    if arr.size == 0:
        raise InputError(f"empty volume: shape {arr.shape} holds no voxels", p)
    if np.iscomplexobj(arr):
        raise InputError(f"complex-valued voxels ({arr.dtype}): expected a real-valued image or label map", p)
    if arr.dtype.fields is not None or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        kind = "RGB / RGBA colour" if arr.dtype.fields is not None else str(arr.dtype)
        raise InputError(f"{kind} voxels: expected a scalar (one value per voxel) image or label map", p)
    if isinstance(img.header, nib.Nifti1Header):  # NIfTI-2 and .hdr/.img pairs too
        qform_code, sform_code = int(img.header["qform_code"]), int(img.header["sform_code"])
        zooms = _stored_zooms(img) if sform_code == 0 else None
        if zooms is not None and not (zooms != 0).all():  # nibabel puts 1 mm there (a log line at most)
            axis = int(np.flatnonzero(zooms == 0)[0])
            raise InputError(f"pixdim[{axis + 1}] is 0, and the pixdims place this volume (no sform): its voxel size "
                             f"along array axis {axis} is unknown; fix the header", p)
    affine = np.asarray(img.affine, dtype=np.float64)
    unit = _spatial_unit(img)
    if unit != "mm":  # the package's world frame is mm: the affine is converted, and every output says mm
        affine = np.diag([MM_PER_UNIT[unit]] * 3 + [1.0]) @ affine
        _note_once(p, "unit", f"its header's spatial unit is {unit}: its affine is read in mm (x{MM_PER_UNIT[unit]:g})")
    problem = affine_problem(affine)
    if problem:
        raise InputError(problem, p)
    if isinstance(img.header, nib.Nifti1Header):
        if qform_code == sform_code == 0:
            _note_unknown_orientation(p)
        elif qform_code > 0 and sform_code > 0:
            # the header's units: a disagreement in metres is 1000x as many mm
            distance = MM_PER_UNIT[unit] * qform_sform_distance_mm(arr.shape, img.get_qform(), img.get_sform())
            if distance > QFORM_SFORM_NOTE_MM:
                _note_qform_sform_disagree(p, distance)
    if labels:
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise InputError("label map holds NaN or inf", p)
            rounded = np.rint(arr)
            off = np.abs(arr - rounded)
            if off.max() > LABEL_ROUNDING_TOLERANCE:  # rounding would merge labels: an image, not labels
                value = arr.flat[int(off.argmax())]
                raise InputError(f"label map holds non-integer values (e.g. {value:g}): is it an image?", p)
            arr = rounded
        big = _beyond_label_range(arr.min(), arr.max())  # in the file's own type: an int64 cast wraps 1e20 or 2^64 - 1
        if big is not None:
            text = str(int(big)) if abs(float(big)) < 1e15 else f"{float(big):g}"  # 3000000000, 1e+20
            raise InputError(f"label value {text} does not fit a 32-bit integer (the warped label maps' type)", p)
        data = torch.from_numpy(arr.astype(np.int64))
    else:
        floating = np.issubdtype(arr.dtype, np.floating)  # integers and bools are finite, and fit float32
        if floating and not np.isfinite(arr).all():
            raise InputError("volume holds NaN or inf values", p)
        narrowed = floating and arr.dtype.itemsize > 4
        with np.errstate(over="ignore"):  # a finite float64 beyond float32 becomes inf: named below
            arr = arr.astype(np.float32)
        if narrowed and not np.isfinite(arr).all():
            raise InputError(f"volume value out of range (beyond float32's {np.finfo(np.float32).max:.1e})", p)
        data = torch.from_numpy(arr)
    return Volume(data=data, affine=affine, path=p)


DISPLACEMENT_INTENT_NAMES = {"voxel": "disp voxel ijk", "mm": "disp mm xyz"}
"""NIfTI ``intent_name`` (at most 16 characters) of a displacement file per unit: the file says what
its vector components are (voxels of its grid along the array axes i, j, k, or world mm x, y, z).
The intent *code* stays ``none``: NIfTI-1's ``vector`` code wants the components in the 5th
dimension, and Learn2Reg's layout keeps them in the 4th."""


def write_displacement(path: str | Path, disp_vox: torch.Tensor, affine: np.ndarray, *, unit: str = "voxel") -> None:
    """Write a dense fixed -> moving field in the Learn2Reg layout ``(D, H, W, 3)`` atomically, its unit
    in the NIfTI intent name (:data:`DISPLACEMENT_INTENT_NAMES`) and ``descrip``.

    Args:
        disp_vox: ``(1, 3, D, H, W)`` displacement in voxels of the grid of ``affine`` (channel c along
            array axis c), the package's convention.
        affine: 4x4 voxel -> world mm affine of the fixed grid.
        unit: ``"voxel"`` writes ``disp_vox`` as it is; ``"mm"`` writes world-mm components x, y, z
            (:func:`cyclereg.frames.voxel_disp_to_mm`).
    """
    if unit not in DISPLACEMENT_INTENT_NAMES:
        raise ValueError(f"unit: expected one of {sorted(DISPLACEMENT_INTENT_NAMES)}, got {unit!r}")
    if disp_vox.ndim != 5 or disp_vox.shape[:2] != (1, 3):
        raise ValueError(f"disp_vox: expected (1, 3, D, H, W), got {tuple(disp_vox.shape)}")
    field = disp_vox.detach().cpu().float()
    if unit == "mm":
        field = voxel_disp_to_mm(field, torch.from_numpy(np.asarray(affine, dtype=np.float64)).float())
    description = ("cyclereg displacement fixed->moving, " +
                   ("voxels along i,j,k" if unit == "voxel" else "world mm x,y,z"))
    write_nifti(path, field[0].permute(1, 2, 3, 0), affine, intent=("none", DISPLACEMENT_INTENT_NAMES[unit]),
                description=description)


def write_nifti(path: str | Path, data: torch.Tensor | np.ndarray, affine: np.ndarray, *,
                intent: tuple[str, str] | None = None, description: str | None = None) -> None:
    """Write a volume (``(D, H, W)`` or ``(D, H, W, C)``) atomically with the given affine;
    ``intent``: NIfTI intent code and name (e.g. ``("none", "disp mm xyz")``); ``description``: the
    header's ``descrip`` (at most 80 characters). float64, float16 and bfloat16 are written as float32 (NIfTI
    has no half-precision type); a bool mask as uint8 (0 / 1); 64-bit integers (``int64`` or
    ``uint64``: label maps, which NIfTI readers often cannot take as such) as the narrowest of int16 / int32 that
    holds every value (:class:`ValueError` naming ``data`` for a value beyond int32)."""
    import nibabel as nib  # noqa: PLC0415

    if isinstance(data, torch.Tensor):
        data = data.detach().cpu()
        arr = (data.float() if data.dtype in LOW_PRECISION else data).numpy()  # NumPy has no bfloat16
    else:
        arr = np.asarray(data)
    if arr.dtype in (np.float64, np.float16):
        arr = arr.astype(np.float32)
    if arr.dtype == np.bool_:  # a mask (warp_labels of a bool mask): nibabel refuses bool
        arr = arr.astype(np.uint8)
    if arr.dtype in (np.int64, np.uint64):  # label maps: the narrowest of int16 / int32 that holds every value
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        big = _beyond_label_range(lo, hi)
        if big is not None:
            raise ValueError(f"data: integer value {big} does not fit the 32-bit integers label maps are written as")
        arr = arr.astype(np.int16 if -32768 <= lo and hi <= 32767 else np.int32)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(arr, affine)  # sform code 2 (aligned)
    _set_qform_where_exact(img, affine)
    img.header.set_xyzt_units("mm")
    if intent is not None:
        img.header.set_intent(intent[0], (), name=intent[1])
    if description is not None:
        img.header["descrip"] = description.encode()[:80]
    atomic_write_bytes(path, lambda fh: fh.write(img.to_bytes()) if not str(path).endswith(".gz")
                       else fh.write(_gzip(img.to_bytes())))


QFORM_TOLERANCE = 1e-5
"""Largest difference (relative to the affine's largest entry) between an affine and the qform
that stores it (a quaternion, zooms and an offset in float32) for the qform to be written."""


def _set_qform_where_exact(img, affine: np.ndarray) -> None:
    """Give ``img`` a qform (code 2, as its sform) equal to ``affine`` where a qform can hold it (a
    rotation or reflection times voxel sizes), so that readers which take the qform (older ITK and
    the tools built on it) read the same geometry; an affine with shear keeps qform code 0 (the sform
    alone holds it)."""
    img.set_qform(affine, code=2)
    if np.abs(img.get_qform() - affine).max() > QFORM_TOLERANCE * max(np.abs(affine).max(), 1.0):
        img.set_qform(None, code=0)


def _gzip(raw: bytes) -> bytes:
    """``raw`` gzip-compressed with a zero time stamp in its header, so that the same volume gives the same
    ``.nii.gz`` bytes whenever it is written (a checksum or ``cmp`` of two runs' outputs compares the data)."""
    import gzip

    return gzip.compress(raw, compresslevel=1, mtime=0)
