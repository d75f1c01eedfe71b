"""Thin-plate-spline densification of sparse displacements.

``u(x) = A [1, x] + sum_i w_i phi(|x - c_i|)`` fitted to displacements at control points
``c_i`` with smoothing ``lambda`` (``(Phi + lambda I) w + P a = u``, ``P^T w = 0``).
With ``lambda = 0`` the spline interpolates exactly, and any affine field is reproduced
exactly (its affine part lies in the null space of the bending energy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cyclereg.errors import finite_number, whole_number
from cyclereg.frames import floating_dtype, require_tensor

PLANAR_TOLERANCE = 1e-6
"""A cloud spans no volume (all on one plane or line) when its smallest centred singular value is at most
this fraction of its largest: the spline's affine part then has no unique solution."""


def spans_volume(points: torch.Tensor) -> bool:
    """Whether ``points`` ``(N, 3)`` span a volume (:data:`PLANAR_TOLERANCE`): an oblique plane or line is
    singular in exact arithmetic, but floating point hides it from the solver (values of 1e7 came back)."""
    if points.shape[0] < 4:
        return False
    centred = points.detach().double()  # a geometric test: no graph (the spline stays differentiable)
    centred = centred - centred.mean(0)
    sv = torch.linalg.svdvals(centred)
    return bool(sv[-1] > PLANAR_TOLERANCE * max(float(sv[0]), 1e-12))


EVAL_CHUNK_BYTES_CPU = 4 * 2**20
"""On CPU, the bytes of kernel matrix (query points x control points, float64) evaluated at
once: a piece that stays in the cache. Against 8192 query points at once this made the dense
COPD field (127k points, 1346-1750 control points) 2.5-2.8x faster on a 2-core EPYC. The chunk
size changes the result only by float64 rounding (about 1e-14; the BLAS kernels block differently)."""

EVAL_CHUNK_ROWS = 8192
"""On other devices (GPU), the query points evaluated at once (memory: rows x N float64)."""


def eval_chunk_rows(n_centres: int, device: torch.device) -> int:
    """Query points per piece of :meth:`ThinPlateSpline.__call__` for ``n_centres`` control points."""
    if device.type == "cpu":
        return max(1, EVAL_CHUNK_BYTES_CPU // (8 * max(n_centres, 1)))
    return EVAL_CHUNK_ROWS


FIT_MATRICES = 3
"""The float64 ``(N + 4) x (N + 4)`` matrices :meth:`ThinPlateSpline.fit` holds at once on ``N`` control points
at its peak (kernel, system, LU factors): 9.9 GB peak resident memory measured for 20,000 points."""


def fit_bytes(n_centres: int) -> int:
    """Bytes of the matrices :meth:`ThinPlateSpline.fit` holds at once for ``n_centres`` control points
    (:data:`FIT_MATRICES`); its time grows as ``n_centres^3`` (the solve)."""
    return FIT_MATRICES * 8 * (int(n_centres) + 4) ** 2


@dataclass(frozen=True)
class TPSConfig:
    """TPS settings.

    Attributes:
        regularisation: lambda, added to the kernel diagonal (unit-frame coordinates).
        kernel: ``"r2logr"`` (``r^2 log r``, as the authors) or ``"r"`` (the 3-D biharmonic kernel).
        grid_step: dense fields are evaluated on a coarse grid at most ``grid_step`` voxels apart
            (first and last voxel of each axis included) and upsampled trilinearly.
    """

    regularisation: float = 0.1
    kernel: str = "r2logr"
    grid_step: int = 4

    def __post_init__(self):
        if self.kernel not in TPS_KERNELS:
            raise ValueError(f"kernel: expected {' or '.join(map(repr, TPS_KERNELS))}, got {self.kernel!r}")
        if not whole_number(self.grid_step) or self.grid_step < 1:
            raise ValueError(f"grid_step: expected a whole number of voxels >= 1, got {self.grid_step!r}")
        if not finite_number(self.regularisation) or self.regularisation < 0:
            raise ValueError(f"regularisation: expected a finite number >= 0, got {self.regularisation!r}")


TPS_KERNELS = ("r2logr", "r")
"""The radial kernels of :class:`TPSConfig` (see :func:`_phi`)."""


def _phi(r: torch.Tensor, kernel: str) -> torch.Tensor:
    """Kernel of the distances ``r``; ``r2logr`` overwrites ``r`` (no extra full-size copy)
    unless autograd needs it."""
    if kernel == "r2logr":
        log_r = torch.log(r + 1e-6)
        return r.pow(2) * log_r if r.requires_grad else r.pow_(2).mul_(log_r)
    if kernel == "r":
        return r
    raise ValueError(f"kernel: expected 'r2logr' or 'r', got {kernel!r}")


@dataclass(frozen=True)
class ThinPlateSpline:
    """A fitted spline: control points ``(N, 3)``, weights ``(N, C)``, affine ``(4, C)``."""

    centres: torch.Tensor
    weights: torch.Tensor
    affine: torch.Tensor
    kernel: str

    @staticmethod
    def fit(centres: torch.Tensor, values: torch.Tensor, *, regularisation: float | torch.Tensor = 0.0,
            kernel: str = "r2logr") -> "ThinPlateSpline":
        """Fit to ``values (N, C)`` at ``centres (N, 3)``. Solved in float64.

        ``regularisation``: lambda, one for all points, or ``(N,)`` per point (a point with a
        larger lambda is followed less closely; 0 interpolates it)."""
        require_tensor("centres", centres)
        require_tensor("values", values)
        if centres.ndim != 2 or centres.shape[1] != 3:
            raise ValueError(f"centres: expected (N, 3), got {tuple(centres.shape)}")
        if values.ndim != 2 or values.shape[0] != centres.shape[0]:
            raise ValueError(f"values: expected ({centres.shape[0]}, C), got {tuple(values.shape)}")
        c = centres.double()
        n = c.shape[0]
        if isinstance(regularisation, bool):  # True would be lambda 1
            raise ValueError(f"regularisation: expected a number or ({n},) lambdas, got {regularisation!r}")
        if isinstance(regularisation, torch.Tensor):
            if regularisation.shape != (n,):
                raise ValueError(f"regularisation: expected a number or ({n},), got {tuple(regularisation.shape)}")
            lam = regularisation.to(c).clone()
        else:
            lam = torch.full((n,), regularisation, dtype=c.dtype, device=c.device)
        if not bool(torch.all(torch.isfinite(lam) & (lam >= 0))):
            raise ValueError(f"regularisation: expected lambda >= 0 (finite), got {regularisation!r}"
                             if not isinstance(regularisation, torch.Tensor) else
                             "regularisation: expected every lambda >= 0 (finite); some are negative, NaN or inf")
        if not (torch.isfinite(c).all() and torch.isfinite(values).all()):
            raise ValueError("centres, values: hold NaN or inf")
        if not spans_volume(c):
            raise ValueError(f"centres: the spline's system is singular for these {n} points: they span no volume "
                             "(all on one plane or line, or fewer than 4), so its affine part has no unique solution")
        unique, inverse = torch.unique(c, dim=0, return_inverse=True)
        if unique.shape[0] < n:  # a point given twice: fine with lambda > 0 at both, else one equation twice
            index = torch.arange(n, device=c.device)
            first = torch.full((unique.shape[0],), n, dtype=torch.long, device=c.device).scatter_reduce(
                0, inverse, index, reduce="amin")[inverse]
            repeat = (first != index) & ((lam == 0) | (lam[first] == 0))
            if bool(repeat.any()):
                if not bool((values.double()[repeat] == values.double()[first[repeat]]).all()):
                    i = int(repeat.nonzero()[0, 0])
                    raise ValueError(f"centres: point {i} repeats point {int(first[i])} with another value and "
                                     "regularisation 0 there: no spline passes through both")
                keep = ~repeat  # the same equation twice: the interpolant of the others is the same
                c, values, lam = c[keep], values[keep], lam[keep]
                n = c.shape[0]
        K = _phi(torch.cdist(c, c), kernel) + torch.diag(lam)
        P = torch.cat([torch.ones(n, 1, dtype=c.dtype, device=c.device), c], dim=1)
        A = torch.zeros(n + 4, n + 4, dtype=c.dtype, device=c.device)
        A[:n, :n], A[:n, n:], A[n:, :n] = K, P, P.T
        rhs = torch.cat([values.double(), values.new_zeros(4, values.shape[1]).double()])
        try:
            sol = torch.linalg.solve(A, rhs)
        except torch.linalg.LinAlgError:
            raise ValueError(f"centres: the spline's system is singular for these {n} points; it needs at least 4 "
                             "points that span 3D (not all on one plane) and, with regularisation 0, no point "
                             "twice") from None
        return ThinPlateSpline(centres=c, weights=sol[:n], affine=sol[n:], kernel=kernel)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """Evaluate at ``points (M, 3)`` -> ``(M, C)`` in :func:`~cyclereg.frames.floating_dtype` of ``points``
        (``M = 0``: an empty result)."""
        d = self.centres.shape[1]
        if points.ndim != 2 or points.shape[1] != d:
            raise ValueError(f"points: expected (M, {d}), got {tuple(points.shape)}")
        dtype = floating_dtype(points)
        if points.shape[0] == 0:
            return points.new_zeros(0, self.weights.shape[1], dtype=dtype)
        rows = eval_chunk_rows(self.centres.shape[0], self.centres.device)
        if torch.is_grad_enabled() and (points.requires_grad or self.weights.requires_grad
                                        or self.affine.requires_grad or self.centres.requires_grad):
            out = []
            for s in range(0, points.shape[0], rows):
                x = points[s:s + rows].double()
                U = _phi(torch.cdist(x, self.centres), self.kernel)
                out.append(U @ self.weights + self.affine[0] + x @ self.affine[1:])
            return torch.cat(out).to(dtype)
        # without a graph the pieces are written into one result: thousands of small results kept between the
        # freed kernel pieces fragmented the heap (8.3 GB resident for 200k points on 10k centres, 0.3 GB now)
        result = torch.empty(points.shape[0], self.weights.shape[1], dtype=self.weights.dtype,
                             device=self.weights.device)
        for s in range(0, points.shape[0], rows):
            x = points[s:s + rows].double()
            U = _phi(torch.cdist(x, self.centres), self.kernel)
            piece = result[s:s + rows]  # the same operations, in the same order, as with a graph
            torch.matmul(U, self.weights, out=piece)
            piece.add_(self.affine[0]).add_(x @ self.affine[1:])
        return result.to(dtype)
