"""Random affine transforms of point clouds (training augmentation and test-time averaging).

Points ``(N, 3)`` in any frame (here the unit frame); ``x -> A x + t``. Displacements of a
transformed pair map back through the inverse of the linear part alone:
``u = A^{-1} u'``.
"""

from __future__ import annotations

import math

import torch


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


def apply_affine(points: torch.Tensor, A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x -> A x + t`` for points ``(N, 3)`` (``A``, ``t`` moved to the points' device/dtype)."""
    return points @ A.T.to(points) + t.to(points)


def displacements_back(disp: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Displacements ``(N, 3)`` predicted on ``A x + t`` mapped back to the frame of ``x``."""
    return disp @ torch.linalg.inv(A.to(disp)).T
