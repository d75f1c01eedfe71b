"""The sparse LBP's arg-min search as a small C kernel (``_minconv.c``), compiled on first use.

The torch path of :func:`cyclereg.clouds.lbp.min_convolution` writes an ``(edges, K', K)``
product with ``bmm`` and reduces it; ``torch.min`` with indices over it costs half as much again
as the product. The kernel computes the same products (same floating-point operations, see the C
file) one register block at a time and keeps only the running minimum, with the same exact
two-pass pruning, so on CPU it returns the torch path's indices several times faster.

The same source also runs a whole min-sum message passing (:func:`min_sum`: every sweep, and its
backward pass to the unary costs), so that the per-sweep tensor steps around the search (summing
the incoming messages, gathering the source beliefs, the arg-min's value, the normalisation) and
their autograd graph cost nothing extra: bitwise the torch loop's beliefs, its gradient to float
rounding, about 35 % less time for an LBP without gradient and half for one with its backward pass
(docs/benchmarks.md). It is a second library (:data:`SWEEPS`) with its own check.

Each is built, cached and checked once per process against the torch path on a small problem by
:class:`cyclereg.native.NativeLibrary` (the shared machinery of the package's C kernels). Without a
compiler, or if the check fails, or with ``CYCLEREG_NATIVE=0`` in the environment, the torch path
is used: the results do not depend on it, only the time.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from cyclereg.native import NativeLibrary

SOURCE = Path(__file__).with_name("_minconv.c")


def _bind(lib):
    fn = lib.cyclereg_minconv_argmin
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_double] + [ctypes.c_void_p] * 2 + [ctypes.c_int]
    return fn


def _self_check(fn) -> bool:
    """The kernel's indices and pairwise terms equal the torch path's on a small problem with
    flat and peaked beliefs, with ties, pruned and not (the floating-point evaluation order of
    ``bmm`` is the platform's)."""
    from cyclereg.clouds import lbp  # imports this module

    gen = torch.Generator().manual_seed(0)
    e, ks, kd, alpha = 6, 40, 33, 10.3
    cand_src = torch.randn(e, ks, 3, generator=gen) * 0.05
    cand_dst = cand_src.roll(1, 0)[:, :kd] + 0.01 * torch.randn(e, kd, 3, generator=gen)
    cand_src[:, 1] = cand_src[:, 0]  # a tie
    for scale in (1e-4, 1.0):
        belief = torch.rand(e, ks, generator=gen) * scale
        belief[:, 1] = belief[:, 0]
        want = lbp._argmin_chunk(belief, cand_src, cand_dst, alpha)
        want_pair = alpha * (cand_src.gather(1, want[..., None].expand(-1, -1, 3)) - cand_dst).pow(2).sum(-1)
        for first in (0, ks // 4):
            arg, pair = _call(fn, belief, cand_src, cand_dst, alpha, first, with_pair=True)
            if not (torch.equal(arg, want) and torch.equal(pair, want_pair)):
                return False
    return True


LIBRARY = NativeLibrary(SOURCE, "minconv", _bind, _self_check,
                        "its indices differ from the torch path's on this platform")


def kernel():
    """The loaded kernel, or None (then :func:`reason` says why)."""
    return LIBRARY.kernel()


def reason() -> str:
    """Why :func:`kernel` returns what it does (for diagnostics)."""
    return LIBRARY.reason()


def _call(fn, belief, cand_src, cand_dst, alpha, first, src_ax2=None, with_pair=False):
    b = belief.contiguous()
    src, dst = cand_src.contiguous(), cand_dst.contiguous()
    if src_ax2 is None:
        src_ax2 = source_term(src, alpha)
    ax2 = src_ax2.contiguous()
    _require_float32_cpu(belief=b, cand_src=src, src_ax2=ax2, cand_dst=dst)
    e, ks = b.shape
    kd = dst.shape[1]
    if src.shape != (e, ks, 3) or dst.shape != (e, kd, 3) or ax2.shape != (e, ks):
        raise ValueError(f"minconv kernel: belief {tuple(b.shape)}, cand_src {tuple(src.shape)}, "
                         f"src_ax2 {tuple(ax2.shape)}, cand_dst {tuple(dst.shape)} do not match")
    out = torch.empty(e, kd, dtype=torch.int64)
    pair = torch.empty(e, kd, dtype=torch.float32) if with_pair else None
    if fn(b.data_ptr(), src.data_ptr(), ax2.data_ptr(), dst.data_ptr(), e, ks, kd, first, alpha,
          out.data_ptr(), None if pair is None else pair.data_ptr(), torch.get_num_threads()):
        raise MemoryError("minconv kernel: out of memory")
    return out, pair


def _require_float32_cpu(**tensors: torch.Tensor) -> None:
    """:class:`ValueError` naming the first argument that is not a float32 CPU tensor: the kernels read
    raw float32 memory, so another dtype would be read as wrong numbers, not refused by C."""
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name}: the C kernel reads float32 CPU tensors, got {t.dtype} on {t.device}")


def source_term(cand_src: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * |x_l|^2`` ``(E, K)``, the belief-independent part of the source rows (used by
    :func:`cyclereg.clouds.lbp._source_rows` too, so both searches add the same floats; the LBP
    computes it once, not per sweep)."""
    return alpha * cand_src.pow(2).sum(-1)


def usable(belief: torch.Tensor) -> bool:
    """Whether the kernel applies to these beliefs: float32 on CPU, all finite, kernel loaded.
    (Finite through their sum, one pass; a sum that overflows only sends them to the torch path.)"""
    return (belief.device.type == "cpu" and belief.dtype == torch.float32
            and kernel() is not None and bool(torch.isfinite(belief.sum())))


def search(belief: torch.Tensor, cand_src: torch.Tensor, cand_dst: torch.Tensor, alpha: float,
           first: int, src_ax2: torch.Tensor | None = None, with_pair: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices ``(E, K')`` of :func:`cyclereg.clouds.lbp._argmin_chunk` (``first`` > 0: the
    two-pass pruned search, the same indices) and, with ``with_pair``, the pairwise term
    ``alpha |cand_src[arg] - cand_dst|^2`` ``(E, K')`` (no autograd). ``src_ax2``:
    :func:`source_term` of ``cand_src`` if already computed. Call only when :func:`usable`."""
    return _call(kernel(), belief, cand_src, cand_dst, alpha, first, src_ax2, with_pair)


# ----------------------------------------------------------------------------- whole min-sum
def _bind_sweeps(lib):
    fwd = lib.cyclereg_minsum_forward
    fwd.restype = ctypes.c_int
    fwd.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_double] + [ctypes.c_void_p] * 3 + [ctypes.c_int]
    bwd = lib.cyclereg_minsum_backward
    bwd.restype = ctypes.c_int
    bwd.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_void_p]
    return fwd, bwd


SWEEP_MAX_LABELS = 2 ** 16
"""The fused sweeps keep arg-min indices in 16 bits: at most this many labels per node."""


SWEEP_GRAD_RTOL = 1e-4
"""How close the kernel's gradient must be to autograd's through the torch sweeps (relative to
the largest gradient entry): the two sum the same terms in another order."""


def _check_sweeps(fns) -> bool:
    """The fused sweeps give the torch loop's beliefs bitwise and its gradient to float rounding,
    on a small kNN graph with ties in the messages, pruned and not."""
    from cyclereg.clouds import lbp
    from cyclereg.clouds.knn import symmetric_edge_index

    gen = torch.Generator().manual_seed(1)
    pts = torch.rand(40, 3, generator=gen)
    edge_index, reverse = symmetric_edge_index(pts, 4)
    for k, prune_from in ((12, None), (16, 8)):
        cand = torch.randn(40, k, 3, generator=gen) * 0.1
        cand[:, 1] = cand[:, 0]  # equal candidates: ties in the search and the messages
        unary = (torch.rand(40, k, generator=gen) * 0.5).requires_grad_(True)
        w = torch.randn(40, k, generator=gen)
        with torch.enable_grad():  # also when first used under no_grad
            want = lbp.min_sum(unary, cand, edge_index, reverse, 3.0, 4, prune_from=prune_from, fused=False)
            (g_want,) = torch.autograd.grad((want * w).sum(), unary)
            got = _sweeps(fns, unary, cand, edge_index, reverse, 3.0, 4, prune_first(k, prune_from, 0.25))
            (g_got,) = torch.autograd.grad((got * w).sum(), unary)
        if not torch.equal(got.detach(), want.detach()):
            return False
        if (g_got - g_want).abs().max() > SWEEP_GRAD_RTOL * g_want.abs().max():
            return False
    return True


SWEEPS = NativeLibrary(SOURCE, "minsum", _bind_sweeps, _check_sweeps,
                       "its beliefs or gradients differ from the torch loop's on this platform")


def require_graph(unary: torch.Tensor, cand: torch.Tensor, edge_index: torch.Tensor, reverse: torch.Tensor) -> None:
    """:class:`ValueError` naming the argument unless ``unary (N, K)``, ``cand (N, K, 3)``, ``edge_index
    (2, E)`` with node indices in ``[0, N)`` and ``reverse (E,)`` with edge indices in ``[0, E)``: the
    min-sum's inputs, checked before any sweep (the C sweeps would read past the tensors)."""
    if unary.ndim != 2:
        raise ValueError(f"unary: expected (N, K), got {tuple(unary.shape)}")
    n, k = unary.shape
    if tuple(cand.shape) != (n, k, 3):
        raise ValueError(f"cand: expected {(n, k, 3)} to match unary {(n, k)}, got {tuple(cand.shape)}")
    if edge_index.ndim != 2 or edge_index.shape[0] != 2 or edge_index.is_floating_point():
        raise ValueError(f"edge_index: expected (2, E) integers, got {tuple(edge_index.shape)} {edge_index.dtype}")
    e = edge_index.shape[1]
    if tuple(reverse.shape) != (e,) or reverse.is_floating_point():
        raise ValueError(f"reverse: expected ({e},) integers (one per edge), got {tuple(reverse.shape)} {reverse.dtype}")
    if e and not (0 <= int(edge_index.min()) and int(edge_index.max()) < n):
        raise ValueError(f"edge_index: node indices must lie in [0, {n}), got "
                         f"[{int(edge_index.min())}, {int(edge_index.max())}]")
    if e and not (0 <= int(reverse.min()) and int(reverse.max()) < e):
        raise ValueError(f"reverse: edge indices must lie in [0, {e}), got [{int(reverse.min())}, {int(reverse.max())}]")


def prune_first(k: int, prune_from: int | None, prune_fraction: float) -> int:
    """Labels of the first pass of the exact pruned search for ``k`` source labels on CPU (0: one
    full pass): the lowest-belief ``prune_fraction`` of them when ``k >= prune_from`` (see
    :func:`cyclereg.clouds.lbp.min_convolution`, whose CPU search and the fused sweeps use it)."""
    first = int(k * prune_fraction)
    return first if prune_from is not None and k >= prune_from and 0 < first < k else 0


def sweeps_usable(unary: torch.Tensor, cand: torch.Tensor) -> bool:
    """Whether :func:`min_sum` applies: float32 CPU tensors, finite unary costs, coordinates without
    gradient, both kernels loaded (the search's check vouches for the arg-min)."""
    return (unary.ndim == 2 and not cand.requires_grad and cand.dtype == torch.float32 and cand.device.type == "cpu"
            and unary.shape[1] <= SWEEP_MAX_LABELS and usable(unary.detach()) and SWEEPS.kernel() is not None)


class _MinSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unary, fns, cand, ax2, src, dst, rev, alpha, iterations, first):
        fwd, _ = fns
        u = unary.detach().contiguous()
        n, k = u.shape
        e = src.shape[0]
        keep = ctx.needs_input_grad[0]  # autograd records this call: keep what the backward pass needs
        arg = torch.empty(iterations, e, k, dtype=torch.uint16) if keep else None
        zero = torch.empty(iterations, e, k, dtype=torch.uint8) if keep else None
        belief = torch.empty(n, k, dtype=torch.float32)
        if fwd(u.data_ptr(), cand.data_ptr(), ax2.data_ptr(), src.data_ptr(), dst.data_ptr(), rev.data_ptr(),
               n, e, k, iterations, first, alpha, belief.data_ptr(),
               None if arg is None else arg.data_ptr(), None if zero is None else zero.data_ptr(),
               torch.get_num_threads()):
            raise MemoryError("min-sum kernel: out of memory")
        ctx.fns, ctx.sizes = fns, (n, e, k, iterations)
        if keep:
            ctx.save_for_backward(arg, zero, src, dst, rev)
        return belief

    @staticmethod
    def backward(ctx, grad_belief):
        _, bwd = ctx.fns
        arg, zero, src, dst, rev = ctx.saved_tensors
        n, e, k, iterations = ctx.sizes
        g = grad_belief.contiguous().to(torch.float32)
        out = torch.empty(n, k, dtype=torch.float32)
        if bwd(g.data_ptr(), arg.data_ptr(), zero.data_ptr(), src.data_ptr(), dst.data_ptr(), rev.data_ptr(),
               n, e, k, iterations, out.data_ptr()):
            raise MemoryError("min-sum kernel: out of memory")
        return (out,) + (None,) * 9


def _sweeps(fns, unary, cand, edge_index, reverse, alpha, iterations, first):
    src, dst = (t.to(torch.int64).contiguous() for t in edge_index)
    cand = cand.detach().contiguous()
    _require_float32_cpu(unary=unary.detach(), cand=cand)
    require_graph(unary, cand, edge_index, reverse)  # the C sweeps index with these unchecked
    return _MinSum.apply(unary, fns, cand, source_term(cand, alpha).contiguous(), src, dst,
                         reverse.to(torch.int64).contiguous(), float(alpha), int(iterations), int(first))


def min_sum(unary: torch.Tensor, cand: torch.Tensor, edge_index: torch.Tensor, reverse: torch.Tensor,
            alpha: float, iterations: int, first: int) -> torch.Tensor:
    """:func:`cyclereg.clouds.lbp.min_sum`'s beliefs ``(N, K)`` (without ``source_labels``), every
    sweep in C: bitwise the torch loop's values; differentiable in ``unary`` (the backward pass in
    C too, the same gradient up to float rounding). ``first``: :func:`prune_first`. Call only when
    :func:`sweeps_usable`."""
    return _sweeps(SWEEPS.kernel(), unary, cand, edge_index, reverse, alpha, iterations, first)
