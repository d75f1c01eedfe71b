"""Random affine transforms of point clouds (training augmentation and test-time averaging).

Points ``(N, 3)`` in any frame (here the unit frame); ``x -> A x + t``. Displacements of a
transformed pair map back through the inverse of the linear part alone:
``u = A^{-1} u'``. When the moving cloud gets a further transform ``y -> R y + c`` (a change of
the motion itself, :func:`random_relative_affine`), a displacement ``u'`` of the fixed point
``f' = A f + t`` names the moving point ``f' + u'`` of the doubly transformed cloud, which maps
back to ``u = A^{-1} (R^{-1} (f' + u' - c) - f')`` (:func:`displacements_back_relative`).
"""

from __future__ import annotations

import math

import torch

from cyclereg.errors import finite_number, python_number
from cyclereg.frames import LOW_PRECISION, check_points, floating_dtype


def _check_draw(dtype, ranges: dict[str, float]) -> None:
    """:class:`ValueError` naming the argument unless ``dtype`` is floating (an integer matrix would be
    truncated to zeros) and every range is a finite number."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point torch dtype for the matrix, got {dtype!r}")
    for name, value in ranges.items():
        if not finite_number(python_number(value)):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")


def random_affine(generator: torch.Generator, rotation_deg: float, scale: float, translation: float,
                  dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(A (3, 3), t (3,))``: rotations about x, y and z, each uniform in
    ``[-rotation_deg, rotation_deg]`` degrees, then one isotropic scale uniform in
    ``[1 - scale, 1 + scale]``, and a translation uniform in ``[-translation, translation]``
    per axis (units of the points). Draws in float64 from ``generator`` (CPU), returns ``dtype``
    (floating). :class:`ValueError` naming the argument for a range that is not finite, or a ``scale`` of 1
    or more (a factor of 0 or below collapses or mirrors the cloud)."""
    _check_draw(dtype, {"rotation_deg": rotation_deg, "scale": scale, "translation": translation})
    if abs(scale) >= 1:
        raise ValueError(f"scale: expected a range below 1 (factors in [1 - scale, 1 + scale] stay > 0), got {scale!r}")
    ang = (torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(rotation_deg)
    c, s = torch.cos(ang), torch.sin(ang)
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    rx = torch.stack([one, zero, zero, zero, c[0], -s[0], zero, s[0], c[0]]).view(3, 3)
    ry = torch.stack([c[1], zero, s[1], zero, one, zero, -s[1], zero, c[1]]).view(3, 3)
    rz = torch.stack([c[2], -s[2], zero, s[2], c[2], zero, zero, zero, one]).view(3, 3)
    factor = 1 + (torch.rand((), generator=generator, dtype=torch.float64) * 2 - 1) * scale
    t = (torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1) * translation
    return (factor * rz @ ry @ rx).to(dtype), t.to(dtype)


def random_relative_affine(generator: torch.Generator, std: float, dtype=torch.float32
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(R (3, 3), c (3,))`` near the identity: ``R = I + std N`` and ``c = std n`` with every
    entry of ``N`` and ``n`` standard normal (a general affine map, shear included; ``c`` in units of
    the points). Draws in float64 from ``generator`` (CPU), returns ``dtype`` (floating; ``std`` finite)."""
    _check_draw(dtype, {"std": std})
    R = torch.eye(3, dtype=torch.float64) + std * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    c = std * torch.randn(3, generator=generator, dtype=torch.float64)
    return R.to(dtype), c.to(dtype)


def apply_affine(points: torch.Tensor, A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x -> A x + t`` for points ``(N, 3)`` (``A``, ``t`` moved to the points' device/dtype; half-precision
    points, :data:`cyclereg.frames.LOW_PRECISION`, are computed in float32 and answered in their dtype; integer
    points are computed in torch's default float dtype, :func:`cyclereg.frames.floating_dtype`)."""
    check_points("points", points)
    if points.dtype in LOW_PRECISION:
        return apply_affine(points.float(), A, t).to(points.dtype)
    points = points.to(floating_dtype(points))
    return points @ A.T.to(points) + t.to(points)


def _working(disp: torch.Tensor) -> torch.Tensor:
    """``disp`` in a dtype :func:`torch.linalg.inv` works in: float32 / float64 as given, half precision in
    float32, integers in torch's default float dtype (:func:`cyclereg.frames.floating_dtype`)."""
    check_points("disp", disp)
    if disp.dtype in LOW_PRECISION:
        return disp.float()
    return disp.to(floating_dtype(disp))


def _as_given(out: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """``out`` back in ``disp``'s dtype where that is floating (integers stay in the float dtype)."""
    return out.to(disp.dtype) if disp.is_floating_point() else out


def displacements_back(disp: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Displacements ``(N, 3)`` predicted on ``A x + t`` mapped back to the frame of ``x`` (in ``disp``'s
    dtype, computed in float32 for half precision; integer displacements give floats)."""
    work = _working(disp)
    return _as_given(work @ torch.linalg.inv(A.to(work)).T, disp)


def displacements_back_relative(disp: torch.Tensor, fixed: torch.Tensor, A: torch.Tensor, R: torch.Tensor,
                                c: torch.Tensor) -> torch.Tensor:
    """Displacements ``(N, 3)`` of the fixed points ``fixed`` ``(N, 3)`` (= ``A f + t``) towards a
    moving cloud transformed by ``y -> R (A y + t) + c``, mapped back to the original pair's frame:
    ``A^{-1} (R^{-1} (fixed + disp - c) - fixed)`` (with ``R = I``, ``c = 0``:
    :func:`displacements_back`)."""
    work = _working(disp)
    fixed, R, c = fixed.to(work), R.to(work), c.to(work)
    in_moving = (fixed + work - c) @ torch.linalg.inv(R).T  # the moving point in the once-transformed frame
    return _as_given(displacements_back(in_moving - fixed, A), disp)
