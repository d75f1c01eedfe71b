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

from cyclereg.frames import floating_dtype


def random_affine(generator: torch.Generator, rotation_deg: float, scale: float, translation: float,
                  dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(A (3, 3), t (3,))``: rotations about x, y and z, each uniform in
    ``[-rotation_deg, rotation_deg]`` degrees, then one isotropic scale uniform in
    ``[1 - scale, 1 + scale]``, and a translation uniform in ``[-translation, translation]``
    per axis (units of the points). Draws in float64 from ``generator`` (CPU), returns ``dtype``."""
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
    the points). Draws in float64 from ``generator`` (CPU), returns ``dtype``."""
    R = torch.eye(3, dtype=torch.float64) + std * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    c = std * torch.randn(3, generator=generator, dtype=torch.float64)
    return R.to(dtype), c.to(dtype)


def apply_affine(points: torch.Tensor, A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x -> A x + t`` for points ``(N, 3)`` (``A``, ``t`` moved to the points' device/dtype; integer
    points are computed in torch's default float dtype, :func:`cyclereg.frames.floating_dtype`)."""
    points = points.to(floating_dtype(points))
    return points @ A.T.to(points) + t.to(points)


def displacements_back(disp: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Displacements ``(N, 3)`` predicted on ``A x + t`` mapped back to the frame of ``x``."""
    return disp @ torch.linalg.inv(A.to(disp)).T


def displacements_back_relative(disp: torch.Tensor, fixed: torch.Tensor, A: torch.Tensor, R: torch.Tensor,
                                c: torch.Tensor) -> torch.Tensor:
    """Displacements ``(N, 3)`` of the fixed points ``fixed`` ``(N, 3)`` (= ``A f + t``) towards a
    moving cloud transformed by ``y -> R (A y + t) + c``, mapped back to the original pair's frame:
    ``A^{-1} (R^{-1} (fixed + disp - c) - fixed)`` (with ``R = I``, ``c = 0``:
    :func:`displacements_back`)."""
    R, c = R.to(disp), c.to(disp)
    in_moving = (fixed + disp - c) @ torch.linalg.inv(R).T  # the moving point in the once-transformed frame
    return displacements_back(in_moving - fixed, A)
