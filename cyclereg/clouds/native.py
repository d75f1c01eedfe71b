"""The sparse LBP's arg-min search as a small C kernel (``_minconv.c``), compiled on first use.

The torch path of :func:`cyclereg.clouds.lbp.min_convolution` writes an ``(edges, K', K)``
product with ``bmm`` and reduces it; ``torch.min`` with indices over it costs half as much again
as the product. The kernel computes the same products (same floating-point operations, see the C
file) one register block at a time and keeps only the running minimum, with the same exact
two-pass pruning, so on CPU it returns the torch path's indices several times faster.

It is built, cached and checked once per process against the torch path on a small problem by
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
