"""The sparse LBP's arg-min search as a small C kernel (``_minconv.c``), compiled on first use.

The torch path of :func:`cyclereg.clouds.lbp.min_convolution` writes an ``(edges, K', K)``
product with ``bmm`` and reduces it; ``torch.min`` with indices over it costs half as much again
as the product. The kernel computes the same products (same floating-point operations, see the C
file) one register block at a time and keeps only the running minimum, with the same exact
two-pass pruning, so on CPU it returns the torch path's indices several times faster.

It is built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into
``$CYCLEREG_CACHE_DIR`` (default ``$XDG_CACHE_HOME/cyclereg`` or ``~/.cache/cyclereg``), keyed by
the source, the compiler flags and this CPU, and checked once per process against the torch path
on a small problem. Without a compiler, or if the check fails, or with ``CYCLEREG_NATIVE=0`` in
the environment, the torch path is used: the results do not depend on it, only the time.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_minconv.c")
DISABLE_ENV = "CYCLEREG_NATIVE"
"""Set to ``0`` to always use the torch path."""
CACHE_ENV = "CYCLEREG_CACHE_DIR"
COMMON_FLAGS = ("-std=c99", "-shared", "-fPIC", "-ffp-contract=off")
"""``-ffp-contract=off``: the kernel's fused multiply-adds are written out; no others may appear."""
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native"), ("-O3", "-fopenmp"), ("-O3",))
"""Tried in order until one compiles (OpenMP and ``-march=native`` are optional)."""
COMPILE_TIMEOUT_S = 120

_kernel = None
_reason = "not loaded yet"


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cyclereg"


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU model and flags
    (x86: ``model name``, ``flags``; ARM: ``CPU part``, ``Features``)."""
    from cyclereg.device import cpuinfo_field

    fields = ("model name", "flags", "Features", "CPU part")
    return "\n".join([platform.machine(), platform.processor(),
                      *(f"{f}: {v}" for f in fields if (v := cpuinfo_field(f)) is not None)])


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> Path:
    """Path of the compiled library, compiling it if this source/CPU has none yet."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(COMMON_FLAGS + flags).encode(),
                                         _cpu_identity().encode()])).hexdigest()[:16]
        target = cache_dir() / "native" / f"minconv-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *COMMON_FLAGS, *flags, str(SOURCE), "-o", tmp, "-lm"],
                                  capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent processes each write their own tmp
                return target
            errors.append(proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} failed: {errors[-1][0]}")


def _load():
    lib = ctypes.CDLL(str(_build()))
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


def kernel():
    """The loaded kernel, or None (then :func:`reason` says why)."""
    global _kernel, _reason
    if _disabled():
        return None
    if _kernel is None and _reason == "not loaded yet":
        try:
            fn = _load()
            if _self_check(fn):
                _kernel, _reason = fn, "loaded"
            else:
                _reason = "its indices differ from the torch path's on this platform"
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
            _reason = f"could not be built: {exc}"
    return _kernel


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") == "0"


def reason() -> str:
    """Why :func:`kernel` returns what it does (for diagnostics)."""
    kernel()
    return f"disabled by {DISABLE_ENV}=0" if _disabled() else _reason


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
