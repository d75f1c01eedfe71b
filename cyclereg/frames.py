"""Coordinate frames and the only place where they are converted.

Frames (see the package docstring):

``world``  millimetres, ``(..., 3)`` columns x, y, z.
``voxel``  float array indices ``(..., 3)`` ordered like the tensor axes (i, j, k) = (D, H, W).
``grid``   ``[-1, 1]`` coordinates of :func:`torch.nn.functional.grid_sample` with
           ``align_corners=True``; last dim ordered (W, H, D) = (k, j, i) as torch expects.
``unit``   point-cloud frame: per-axis affine map of a millimetre box ``[lo, lo + extent]``
           onto ``[-1, 1]^3`` (x, y, z). The cloud optimiser's costs live here.

Dense displacement fields are ``(B, 3, D, H, W)`` in voxels (channel c along axis c).
:func:`ijk_to_kji` is the single function that reorders the components of points and vectors
between voxel (i, j, k) and grid (k, j, i) order; every voxel <-> grid conversion goes through it.
Keypoint datasets describe their grid by ``shape_zyx`` / ``spacing_zyx_mm`` (array axis 0 along
world z): :func:`zyx_grid_affine` is its voxel -> mm affine, and everything else derives from it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from cyclereg.errors import finite_number, python_number

ALIGN_CORNERS = True
"""Every ``grid_sample``/``interpolate``/``affine_grid`` call in the package uses this."""


# ----------------------------------------------------------------------------- voxel <-> grid
def check_shape(name: str, shape) -> tuple[int, int, int]:
    """``shape`` as three Python ints, :class:`ValueError` naming ``name`` unless it is three whole numbers
    >= 1 (a grid of 0, -3 or 5.5 voxels is no grid)."""
    sizes = tuple(shape)
    if len(sizes) != 3 or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1
                                  for n in sizes):
        raise ValueError(f"{name}: expected 3 spatial sizes (D, H, W), whole numbers >= 1, got {sizes}")
    return tuple(int(n) for n in sizes)  # type: ignore[return-value]


def _is_bool(value) -> bool:
    """Whether ``value`` is a truth value of any kind (Python, NumPy, a bool tensor): no size."""
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def check_spacing(name: str, spacing) -> tuple[float, float, float]:
    """``spacing`` as three Python floats, :class:`ValueError` naming ``name`` unless it is three finite voxel
    sizes > 0 mm (a zero size puts every point on one plane, a negative one mirrors; text is no size, also
    where it is iterable: ``"123"`` is not ``(1, 2, 3)``)."""
    if isinstance(spacing, (str, bytes)):
        raise ValueError(f"{name}: expected 3 finite voxel sizes > 0 mm, got the text {spacing!r}")
    try:
        given = tuple(spacing)
        sizes = tuple(float(v) for v in given if not (_is_bool(v) or isinstance(v, (str, bytes))))
    except (TypeError, ValueError):
        given, sizes = (spacing,), ()
    if len(sizes) != 3 or len(given) != 3 or not all(math.isfinite(v) and v > 0 for v in sizes):
        raise ValueError(f"{name}: expected 3 finite voxel sizes > 0 mm, got {given!r}")
    return sizes  # type: ignore[return-value]


def _sizes(shape: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([max(s - 1, 1) for s in check_shape("shape", shape)], dtype=like.dtype, device=like.device)


def require_tensor(name: str, value) -> None:
    """:class:`TypeError` naming the argument ``name`` unless ``value`` is a :class:`torch.Tensor` (a NumPy
    array is told the way in), :class:`ValueError` when it holds complex numbers: no coordinate,
    displacement, distance or intensity here is complex, and torch would drop the imaginary part."""
    if not isinstance(value, torch.Tensor):
        kind = f"{type(value).__module__}.{type(value).__name__}".removeprefix("builtins.")
        hint = " (give torch.from_numpy(value))" if isinstance(value, np.ndarray) else ""
        raise TypeError(f"{name}: expected a torch.Tensor, got {kind}{hint}")
    if value.is_complex():
        raise ValueError(f"{name}: {value.dtype} values; complex numbers are no coordinates, displacements, "
                         "distances or intensities")


def require_finite(name: str, values: torch.Tensor, what: str = "") -> None:
    """:class:`ValueError` "``name``: holds NaN or inf ``what``" when the floating-point tensor ``values`` does
    (one pass at a public entry; integer tensors are always finite): NaN coordinates or displacements are
    sampled, ranked or averaged quietly into ordinary-looking answers otherwise."""
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name}: holds NaN or inf{' ' + what if what else ''}")


def check_points(name: str, points: torch.Tensor) -> None:
    """:class:`ValueError` naming the argument ``name`` unless ``points`` is a real ``(..., 3)`` tensor
    (:func:`require_tensor`)."""
    require_tensor(name, points)
    if points.shape[-1:] != (3,):
        raise ValueError(f"{name}: expected (..., 3), got {tuple(points.shape)}")


def check_cloud(name: str, points: torch.Tensor) -> None:
    """:class:`ValueError` naming the argument ``name`` unless the tensor ``points`` is ``(N, 3)`` with
    ``N >= 1``: one point cloud, flat (the shape only: callers check the type and dtype they need, e.g.
    :func:`require_tensor`)."""
    if points.ndim != 2 or points.shape[1] != 3 or points.shape[0] == 0:
        raise ValueError(f"{name}: expected (N, 3) with N >= 1, got {tuple(points.shape)}")


def check_displacement(name: str, field: torch.Tensor) -> None:
    """:class:`ValueError` naming the argument ``name`` unless ``field`` is a dense displacement
    ``(B, 3, D, H, W)`` (a real tensor, :func:`require_tensor`)."""
    require_tensor(name, field)
    if field.ndim != 5 or field.shape[1] != 3:
        raise ValueError(f"{name}: expected (B, 3, D, H, W), got {tuple(field.shape)}")


def ijk_to_kji(t: torch.Tensor) -> torch.Tensor:
    """Reverse the last axis ``(..., 3)``: voxel (i, j, k) order <-> grid (k, j, i) order (its own
    inverse). The one place where components are reordered between the two frames."""
    check_points("t", t)
    return t.flip(-1)


def inside_grid(points_vox: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``(...)`` bool: which voxel positions ``(..., 3)`` (i, j, k) lie within a grid of ``shape``, i.e. in
    some voxel of it (index ``-0.5 .. n - 0.5`` along every axis)."""
    check_points("points_vox", points_vox)
    points_vox = points_vox.to(working_dtype(points_vox))  # a half-precision bound n - 0.5 rounds to n
    size = torch.as_tensor(check_shape("shape", shape), dtype=points_vox.dtype, device=points_vox.device)
    return ((points_vox >= -0.5) & (points_vox <= size - 0.5)).all(dim=-1)


def voxel_to_grid(points_vox: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Voxel indices ``(..., 3)`` in (i, j, k) order -> grid coordinates ``(..., 3)`` in (k, j, i) order.
    A size-1 axis maps to -1 (with ``align_corners=True`` every coordinate samples its one voxel)."""
    check_points("points_vox", points_vox)  # before the arithmetic, which would broadcast an (N, 1) input
    p = points_vox.to(working_dtype(points_vox))
    return ijk_to_kji(2.0 * p / _sizes(shape, p) - 1.0).to(floating_dtype(points_vox))


def grid_to_voxel(points_grid: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`voxel_to_grid`."""
    check_points("points_grid", points_grid)
    return (ijk_to_kji(points_grid) + 1.0) * 0.5 * _sizes(shape, points_grid)


def voxel_disp_to_grid_disp(disp_vox: torch.Tensor) -> torch.Tensor:
    """Dense displacement ``(B, 3, D, H, W)`` in voxels -> ``(B, D, H, W, 3)`` in grid units, (k, j, i) order,
    as ``grid_sample`` takes it (components reordered by :func:`ijk_to_kji`)."""
    check_displacement("disp_vox", disp_vox)
    scale = 2.0 / _sizes(tuple(disp_vox.shape[2:]), disp_vox)
    return ijk_to_kji(disp_vox.permute(0, 2, 3, 4, 1) * scale)


def grid_disp_to_voxel_disp(disp_grid: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`voxel_disp_to_grid_disp`: ``(B, D, H, W, 3)`` grid -> ``(B, 3, D, H, W)`` voxels."""
    if disp_grid.ndim != 5 or disp_grid.shape[-1] != 3:
        raise ValueError(f"disp_grid: expected (B, D, H, W, 3), got {tuple(disp_grid.shape)}")
    scale = _sizes(tuple(disp_grid.shape[1:4]), disp_grid) / 2.0
    return (ijk_to_kji(disp_grid) * scale).permute(0, 4, 1, 2, 3)


def identity_grid(shape: tuple[int, int, int], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Grid coordinates of every voxel centre, ``(1, D, H, W, 3)`` in (k, j, i) order
    (:func:`voxel_to_grid` of :func:`voxel_coordinates`); ``dtype`` a floating-point one (:class:`ValueError`
    naming it otherwise: grid coordinates are fractions of ``[-1, 1]``)."""
    return voxel_to_grid(voxel_coordinates(shape, device=device, dtype=dtype), shape).unsqueeze(0)


def _float_dtype(dtype):
    """``dtype`` (``None``: torch's default float dtype, as for ``torch.zeros``), :class:`ValueError` naming ``dtype``
    unless a floating-point dtype: voxel and grid coordinates are floats (the package docstring), and integer ones
    of 8 bits wrap silently."""
    if dtype is None:
        return torch.get_default_dtype()
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating-point dtype (coordinates are floats), got {dtype}")
    return dtype


def voxel_coordinates(shape: tuple[int, int, int], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel indices of every voxel, ``(D, H, W, 3)`` in (i, j, k) order, as floats of ``dtype`` (the
    ``voxel`` frame; :class:`ValueError` naming ``dtype`` when it is no floating-point one, and ``shape`` unless
    three whole numbers >= 1, :func:`check_shape`)."""
    dtype = _float_dtype(dtype)
    axes = [torch.arange(s, device=device, dtype=dtype) for s in check_shape("shape", shape)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


# ----------------------------------------------------------------------------- voxel <-> world
LOW_PRECISION = (torch.float16, torch.bfloat16)
"""Half-precision dtypes that computations here take in float32 and answer in the input's dtype (CPU pooling,
``linalg.inv`` and NumPy lack them; Adam's ``eps`` of 1e-8 is 0 in float16)."""


def working_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype arithmetic on ``tensors`` (coordinates, fields, images) runs in: the widest of their
    :func:`floating_dtype`, at least float32 (:data:`LOW_PRECISION` is computed in float32 and answered in the
    input's dtype: rounding every step to 8 or 11 bits moved positions by up to most of a voxel; a float64 image
    warped by a float32 field keeps float64 positions)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, floating_dtype(t))
    return dtype


def floating_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype coordinates computed from ``t`` get: ``t``'s own when floating, else torch's default float
    dtype (integer voxel indices such as :attr:`~cyclereg.keypoints.api.Keypoints.voxels` are promoted, not
    computed in integers)."""
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


def _affine(affine, like: torch.Tensor, dtype: torch.dtype, name: str = "affine") -> torch.Tensor:
    """``affine`` as a finite ``(4, 4)`` tensor of ``dtype`` on ``like``'s device (:class:`ValueError`
    naming the argument ``name`` otherwise). On the ``meta`` device (shapes only, no values) only its shape is
    checked, and the answer is a meta tensor as torch's own operations give."""
    A = torch.as_tensor(affine, device=like.device).to(dtype)
    if A.shape != (4, 4):
        raise ValueError(f"{name}: expected a 4x4 voxel -> mm matrix, got shape {tuple(A.shape)}")
    if not A.is_meta and not torch.isfinite(A).all():
        raise ValueError(f"{name}: holds NaN or inf")
    return A


def _singular(name: str) -> str:
    """What a singular affine passed as the argument ``name`` is told."""
    return f"{name}: singular (its voxel axes do not span 3D), it has no inverse"


SINGULAR_AFFINE = _singular("affine")


def _inverse_affine(affine, like: torch.Tensor, dtype: torch.dtype, name: str = "affine") -> torch.Tensor:
    """The inverse of :func:`_affine`'s matrix (inverted in float64), as ``dtype``; :class:`ValueError`
    naming the argument ``name`` when it is singular (a voxel axis of zero length, or two along one line)."""
    try:
        return torch.linalg.inv(_affine(affine, like, torch.float64, name)).to(dtype)
    except torch.linalg.LinAlgError:
        raise ValueError(_singular(name)) from None


def check_affine(name: str, affine, *, invertible: bool = False) -> None:
    """:class:`ValueError` naming the argument ``name`` unless ``affine`` is a finite 4x4 voxel -> mm matrix,
    invertible where ``invertible`` (checked where it is, in float64): for functions that pass two affines on,
    whose conversions would name either one ``affine``."""
    like = affine if isinstance(affine, torch.Tensor) else torch.empty(0)
    (_inverse_affine if invertible else _affine)(affine, like, torch.float64, name)


def voxel_to_world(points_vox: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Voxel indices ``(..., 3)`` -> world mm ``(..., 3)`` with a 4x4 NIfTI ``affine``
    (dtype: :func:`floating_dtype` of ``points_vox``)."""
    check_points("points_vox", points_vox)
    return _to_world(points_vox, affine, "affine")


def world_to_voxel(points_mm: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """World mm ``(..., 3)`` -> voxel indices ``(..., 3)`` (inverse of :func:`voxel_to_world`;
    dtype: :func:`floating_dtype` of ``points_mm``)."""
    check_points("points_mm", points_mm)
    return _to_voxel(points_mm, affine, "affine")


def _to_world(points_vox: torch.Tensor, affine, name: str) -> torch.Tensor:
    """:func:`voxel_to_world` of checked points, a bad ``affine`` named as the argument ``name``."""
    dtype = working_dtype(points_vox)
    A = _affine(affine, points_vox, dtype, name)
    return (points_vox.to(dtype) @ A[:3, :3].T + A[:3, 3]).to(floating_dtype(points_vox))


def _to_voxel(points_mm: torch.Tensor, affine, name: str) -> torch.Tensor:
    """:func:`world_to_voxel` of checked points, a bad ``affine`` named as the argument ``name``."""
    dtype = working_dtype(points_mm)
    Ainv = _inverse_affine(affine, points_mm, dtype, name)
    return (points_mm.to(dtype) @ Ainv[:3, :3].T + Ainv[:3, 3]).to(floating_dtype(points_mm))


def voxel_disp_to_mm(disp_vox: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Dense voxel displacement ``(B, 3, D, H, W)`` -> world-mm displacement ``(B, 3, D, H, W)`` (x, y, z)."""
    check_displacement("disp_vox", disp_vox)
    dtype = floating_dtype(disp_vox)
    A = _affine(affine, disp_vox, dtype)[:3, :3]
    return torch.einsum("rc,bcdhw->brdhw", A, disp_vox.to(dtype))


def mm_disp_to_voxel(disp_mm: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`voxel_disp_to_mm`."""
    check_displacement("disp_mm", disp_mm)
    dtype = floating_dtype(disp_mm)
    Ainv = _inverse_affine(affine, disp_mm, dtype)[:3, :3]
    return torch.einsum("rc,bcdhw->brdhw", Ainv, disp_mm.to(dtype))


def crop_affine(affine, offset_vox) -> np.ndarray:
    """4x4 float64 voxel -> mm affine of a crop (or slab) of the grid with ``affine`` whose voxel 0 is the
    grid's voxel ``offset_vox`` (i, j, k): the crop's voxel ``v`` lies where the grid's ``v + offset`` does."""
    shift = np.eye(4)
    shift[:3, 3] = [float(v) for v in offset_vox]
    return np.asarray(affine, dtype=np.float64) @ shift


def fixed_to_moving_voxels(disp_vox: torch.Tensor, fixed_affine, moving_affine) -> torch.Tensor:
    """Where each fixed voxel lands in the *moving* grid: the voxel indices ``(B, D, H, W, 3)``
    (i, j, k of the moving array) of ``x + u(x)`` for every fixed voxel ``x``, through world mm.

    Args:
        disp_vox: ``(B, 3, D, H, W)`` displacement in voxels of the fixed grid.
        fixed_affine, moving_affine: 4x4 NIfTI affines of the two grids (they may differ in
            shape, spacing, origin and orientation); :class:`ValueError` naming the one that is no finite
            4x4 matrix, or ``moving_affine`` when it is singular (it is inverted).
    """
    check_displacement("disp_vox", disp_vox)
    dtype = working_dtype(disp_vox)
    x = voxel_coordinates(tuple(disp_vox.shape[2:]), device=disp_vox.device, dtype=dtype)
    target = x.unsqueeze(0) + disp_vox.permute(0, 2, 3, 4, 1).to(dtype)
    # one voxel -> voxel map inv(moving_affine) @ fixed_affine composed in float64: through float32 world mm the
    # positions lost ulp(world) / spacing (0.02 voxels of 0.05 mm 1e4 mm from the origin)
    fixed = _affine(fixed_affine, disp_vox, torch.float64, "fixed_affine")
    V = (_inverse_affine(moving_affine, disp_vox, torch.float64, "moving_affine") @ fixed).to(dtype)
    return (target @ V[:3, :3].T + V[:3, 3]).to(floating_dtype(disp_vox))


def centred_affine(shape: tuple[int, int, int], spacing_mm) -> torch.Tensor:
    """4x4 float64 voxel -> mm affine of a grid of ``shape`` and voxel size ``spacing_mm`` (i, j, k)
    with its axes along the array axes and its origin at the volume centre (voxel ``(shape - 1) / 2``)."""
    if len(tuple(shape)) != 3 or len(tuple(spacing_mm)) != 3:
        raise ValueError(f"shape, spacing_mm: expected 3 values each (i, j, k), got {tuple(shape)}, {tuple(spacing_mm)}")
    S = torch.diag(torch.tensor(check_spacing("spacing_mm", spacing_mm), dtype=torch.float64))
    centre = (torch.tensor([float(n) for n in shape], dtype=torch.float64) - 1) / 2
    A = torch.eye(4, dtype=torch.float64)
    A[:3, :3], A[:3, 3] = S, -(S @ centre)
    return A


def world_map_to_voxel(A_mm: torch.Tensor, t_mm: torch.Tensor, affine: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map ``x -> A_mm x + t_mm`` of world mm, written in the voxel indices of the grid
    with the 4x4 ``affine``: ``(A_vox (3, 3), b_vox (3,))`` with ``v -> A_vox v + b_vox`` equal to
    ``world_to_voxel(A_mm voxel_to_world(v) + t_mm)`` (float64)."""
    W = torch.eye(4, dtype=torch.float64)
    W[:3, :3], W[:3, 3] = torch.as_tensor(A_mm, dtype=torch.float64), torch.as_tensor(t_mm, dtype=torch.float64)
    M = _affine(affine, W, torch.float64)
    try:
        V = torch.linalg.solve(M, W @ M)
    except torch.linalg.LinAlgError:
        raise ValueError(SINGULAR_AFFINE) from None
    return V[:3, :3], V[:3, 3]


def spacing_xyz(spacing_zyx_mm) -> tuple[float, float, float]:
    """Voxel size along world ``(x, y, z)`` [mm] of a keypoint dataset's grid given as ``spacing_zyx_mm``
    (array axes z, y, x): the spacing of its voxel indices ``(i, j, k)`` along x, y, z (Learn2Reg CSVs);
    :class:`ValueError` naming ``spacing_zyx_mm`` unless three finite sizes > 0 (:func:`check_spacing`)."""
    zyx = torch.tensor(check_spacing("spacing_zyx_mm", spacing_zyx_mm), dtype=torch.float64)
    return tuple(float(v) for v in ijk_to_kji(zyx))  # type: ignore[return-value]


HALF_VOXEL_TOLERANCE = 1e-5
"""Voxels by which a ratio under a half still counts as the half in :func:`half_width_voxels`: a header
stores its voxel size in float32 (1.2 mm as 1.2000000477, 0.002 m as 0.0020000001 m), so 3 mm on those
voxels came out a hair under 2.5 or 1.5 and rounded down in one unit and up in another."""


def half_width_voxels(radius_mm: float, spacing_mm) -> tuple[int, ...]:
    """Half-width [whole voxels per array axis] of a box of half-width ``radius_mm`` [mm] on a grid of
    voxel size ``spacing_mm`` (per array axis, mm): ``radius_mm / spacing`` rounded to the nearest whole
    voxel, halves up (Python's ``round`` takes halves to even: on a 2 mm grid 3 and 5 mm both gave 2
    voxels, and 1 mm gave 0). A radius below half a voxel along an axis spans no neighbour there (0)."""
    if not (finite_number(python_number(radius_mm)) and radius_mm >= 0):
        raise ValueError(f"radius_mm: expected a finite radius >= 0 mm, got {radius_mm!r}")
    return tuple(int(math.floor(float(radius_mm) / s + 0.5 + HALF_VOXEL_TOLERANCE))
                 for s in check_spacing("spacing_mm", spacing_mm))


def spacing_affine(spacing_mm) -> np.ndarray:
    """4x4 float64 voxel -> mm affine of headerless Learn2Reg voxel indices without a scan:
    ``mm = index * spacing`` (origin 0, index axes (i, j, k) along world x, y, z; ``spacing_mm`` per
    axis, mm; :class:`ValueError` naming it unless three finite sizes > 0)."""
    return np.diag([*check_spacing("spacing_mm", spacing_mm), 1.0])


def zyx_grid_affine(shape_zyx, spacing_zyx_mm) -> torch.Tensor:
    """4x4 float64 voxel -> mm affine of a keypoint dataset's grid: array axes (z, y, x), voxel
    ``(i, j, k)`` at mm ``(k sx, j sy, i sz)`` (origin at voxel 0). ``shape_zyx`` is accepted for
    symmetry with :meth:`UnitBox.from_volume` and checked to have three sizes."""
    if len(tuple(shape_zyx)) != 3 or len(tuple(spacing_zyx_mm)) != 3:
        raise ValueError(f"shape_zyx, spacing_zyx_mm: expected 3 values each, got {tuple(shape_zyx)}, "
                         f"{tuple(spacing_zyx_mm)}")
    A = torch.eye(4, dtype=torch.float64)
    # voxel (i, j, k) -> (k, j, i) (the one reordering, ijk_to_kji, as a matrix), then scaled along x, y, z
    A[:3, :3] = torch.diag(torch.tensor(spacing_xyz(spacing_zyx_mm), dtype=torch.float64)) @ ijk_to_kji(
        torch.eye(3, dtype=torch.float64))
    return A


# ----------------------------------------------------------------------------- mm <-> unit (clouds)
@dataclass(frozen=True)
class UnitBox:
    """Axis-aligned millimetre box mapped onto ``[-1, 1]^3``.

    Attributes:
        lo_mm: lower corner (x, y, z) in mm.
        extent_mm: side lengths (x, y, z) in mm, all > 0.
    """

    lo_mm: tuple[float, float, float]
    extent_mm: tuple[float, float, float]

    def __post_init__(self):
        if len(tuple(self.lo_mm)) != 3 or len(tuple(self.extent_mm)) != 3:
            raise ValueError(f"lo_mm, extent_mm: expected 3 values each, got {self.lo_mm}, {self.extent_mm}")
        if not all(math.isfinite(float(v)) for v in (*self.lo_mm, *self.extent_mm)):
            raise ValueError(f"lo_mm, extent_mm: need finite values, got {self.lo_mm}, {self.extent_mm}")
        if min(float(v) for v in self.extent_mm) <= 0:
            raise ValueError(f"extent_mm: every side must be > 0 mm, got {self.extent_mm}")

    @staticmethod
    def from_volume(shape_zyx, spacing_zyx_mm) -> "UnitBox":
        """The box of a volume of ``shape_zyx`` voxels at ``spacing_zyx_mm`` starting at the origin
        (world extent of the :func:`zyx_grid_affine` grid: ``n`` voxels of size ``s`` span ``n s`` mm)."""
        sizes = torch.tensor([float(n) for n in shape_zyx], dtype=torch.float64)
        ext = (zyx_grid_affine(shape_zyx, spacing_zyx_mm)[:3, :3] @ sizes).abs()
        return UnitBox((0.0, 0.0, 0.0), tuple(ext.tolist()))  # type: ignore[arg-type]

    @staticmethod
    def around(*clouds_mm: torch.Tensor, margin: float = 0.05) -> "UnitBox":
        """Bounding box of the given clouds ``(N, 3)`` in mm, enlarged by ``margin`` of its size per side
        (a finite fraction > -0.5: a box shrunk by half its size per side has none left).

        A side shorter than 1 mm, or than 1/20 of the largest side where that is less, counts as that floor
        (a flat or linear cloud gets a thin box, not a zero division): clouds 20 mm or more across get the
        1 mm floor, smaller ones (a micro-CT specimen) one that scales with them, so they are framed alike at
        any scale; a single point (no extent at all) gets a 1 mm cube."""
        if not (finite_number(python_number(margin)) and margin > -0.5):
            raise ValueError(f"margin: expected a finite fraction > -0.5 of the box size per side, got {margin!r}")
        for i, cloud in enumerate(clouds_mm):
            check_points(f"clouds_mm[{i}]", cloud)
        pts = torch.cat([c.reshape(-1, 3) for c in clouds_mm]).double() if clouds_mm else torch.zeros(0, 3)
        if pts.shape[0] == 0:
            raise ValueError("clouds_mm: need at least one point")
        lo, hi = pts.min(0).values, pts.max(0).values
        size = hi - lo
        largest = float(size.max())
        size = size.clamp_min(min(1.0, largest / 20) if largest > 0 else 1.0)
        lo = lo - margin * size
        size = size * (1 + 2 * margin)
        return UnitBox(tuple(lo.tolist()), tuple(size.tolist()))  # type: ignore[arg-type]

    def _t(self, like: torch.Tensor, name: str):
        """The box's low corner and half extent as tensors of :func:`working_dtype` of ``like`` (the methods
        answer in :func:`floating_dtype` of their input)."""
        check_points(name, like)
        dtype = working_dtype(like)
        lo = torch.tensor(self.lo_mm, dtype=dtype, device=like.device)
        half = torch.tensor(self.extent_mm, dtype=dtype, device=like.device) / 2
        return lo, half

    def mm_to_unit(self, points_mm: torch.Tensor) -> torch.Tensor:
        """Points ``(..., 3)`` in mm -> unit frame."""
        lo, half = self._t(points_mm, "points_mm")
        return ((points_mm - lo) / half - 1.0).to(floating_dtype(points_mm))

    def unit_to_mm(self, points_unit: torch.Tensor) -> torch.Tensor:
        """Points ``(..., 3)`` in the unit frame -> mm."""
        lo, half = self._t(points_unit, "points_unit")
        return ((points_unit + 1.0) * half + lo).to(floating_dtype(points_unit))

    def disp_mm_to_unit(self, disp_mm: torch.Tensor) -> torch.Tensor:
        """Displacements ``(..., 3)`` in mm -> unit frame (scale only)."""
        return (disp_mm / self._t(disp_mm, "disp_mm")[1]).to(floating_dtype(disp_mm))

    def disp_unit_to_mm(self, disp_unit: torch.Tensor) -> torch.Tensor:
        """Displacements ``(..., 3)`` in the unit frame -> mm (scale only)."""
        return (disp_unit * self._t(disp_unit, "disp_unit")[1]).to(floating_dtype(disp_unit))
