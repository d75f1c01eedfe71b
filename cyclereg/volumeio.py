"""NIfTI I/O with nibabel. Arrays keep nibabel's axis order (i, j, k); see :mod:`cyclereg.frames`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cyclereg.checkpoint import atomic_write_bytes
from cyclereg.errors import InputError, require_file


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


def read_nifti(path: str | Path, *, labels: bool = False) -> Volume:
    """Read a 3-D NIfTI (a trailing singleton 4th axis is dropped).

    Raises :class:`InputError` naming the file if it is missing, unreadable, not 3-D,
    or holds NaN/inf.
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
        data = torch.from_numpy(arr.astype(np.int64))
    else:
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise InputError("volume holds NaN or inf values", p)
        data = torch.from_numpy(arr)
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), path=p)


def write_nifti(path: str | Path, data: torch.Tensor | np.ndarray, affine: np.ndarray) -> None:
    """Write a volume (``(D, H, W)`` or ``(D, H, W, C)``) atomically with the given affine."""
    import nibabel as nib  # noqa: PLC0415

    arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if arr.dtype == np.int64:
        arr = arr.astype(np.int16 if np.abs(arr).max(initial=0) < 32768 else np.int32)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    atomic_write_bytes(path, lambda fh: fh.write(img.to_bytes()) if not str(path).endswith(".gz")
                       else fh.write(_gzip(img.to_bytes())))


def _gzip(raw: bytes) -> bytes:
    import gzip

    return gzip.compress(raw, compresslevel=1)
