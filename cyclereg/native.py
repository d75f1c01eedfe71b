"""Small C kernels compiled on first use: build, cache, load and check them in one place.

Each kernel is a single C source next to the module that uses it (:mod:`cyclereg.clouds.native`:
the LBP's arg-min search; :mod:`cyclereg.dense.native`: trilinear feature sampling). A
:class:`NativeLibrary` compiles its source with the system C compiler (``$CC``, else
``cc``/``gcc``/``clang``) into ``$CYCLEREG_CACHE_DIR`` (default ``$XDG_CACHE_HOME/cyclereg`` or
``~/.cache/cyclereg``), keyed by the source, the compiler flags and this CPU, binds its functions
with :mod:`ctypes` and checks them once per process against the torch path they replace. Without a
compiler, or if the check fails, or with ``CYCLEREG_NATIVE=0`` in the environment, callers use the
torch path: a kernel may change the time of a result, never what it means (see each module for how
close the results are).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

DISABLE_ENV = "CYCLEREG_NATIVE"
"""Set to ``0`` to always use the torch paths."""
CACHE_ENV = "CYCLEREG_CACHE_DIR"
COMMON_FLAGS = ("-std=c99", "-shared", "-fPIC", "-ffp-contract=off")
"""``-ffp-contract=off``: a kernel's fused multiply-adds are written out; no others may appear."""
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native"), ("-O3", "-fopenmp"), ("-O3",))
"""Tried in order until one compiles (OpenMP and ``-march=native`` are optional)."""
COMPILE_TIMEOUT_S = 120


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cyclereg"


def cpu_identity() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU model and flags
    (x86: ``model name``, ``flags``; ARM: ``CPU part``, ``Features``)."""
    from cyclereg.device import cpuinfo_field

    fields = ("model name", "flags", "Features", "CPU part")
    return "\n".join([platform.machine(), platform.processor(),
                      *(f"{f}: {v}" for f in fields if (v := cpuinfo_field(f)) is not None)])


def compiler() -> str | None:
    """The C compiler to use: ``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def disabled() -> bool:
    """Whether ``CYCLEREG_NATIVE=0`` is set (read at every call: it holds while it is set)."""
    return os.environ.get(DISABLE_ENV, "1") == "0"


def build(source: Path, stem: str) -> Path:
    """Path of the compiled ``source`` (``cache_dir()/native/{stem}-{key}.so``), compiling it if this
    source, compiler and CPU have none yet. :class:`RuntimeError` without a compiler or when every
    flag set of :data:`FLAG_SETS` fails (naming the last error)."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    text = Path(source).read_bytes()
    machine = cpu_identity().encode()  # reads /proc/cpuinfo: once, not per flag set
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([text, cc.encode(), " ".join(COMMON_FLAGS + flags).encode(),
                                         machine])).hexdigest()[:16]
        target = cache_dir() / "native" / f"{stem}-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *COMMON_FLAGS, *flags, str(source), "-o", tmp, "-lm"],
                                  capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent processes each write their own tmp
                return target
            errors.append(proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} failed: {errors[-1][0]}")


IN_USE = "C kernel in use"
"""How :meth:`NativeLibrary.reason` begins when the kernel runs."""


class NativeLibrary:
    """One C source as a loadable kernel: :meth:`kernel` builds (:func:`build`), binds and checks it
    on first use and remembers the outcome for the process (:meth:`reason` says it).

    Args:
        source: the C file.
        stem: file-name stem of the compiled library in the cache.
        bind: ``bind(ctypes.CDLL) -> kernel``: looks the functions up and sets their signatures.
        check: ``check(kernel) -> bool``: the kernel agrees with the torch path on a small problem.
        mismatch: the reason given when ``check`` fails.
    """

    def __init__(self, source: Path, stem: str, bind: Callable[[Any], Any], check: Callable[[Any], bool],
                 mismatch: str):
        self.source, self.stem, self.bind, self.check, self.mismatch = Path(source), stem, bind, check, mismatch
        self._kernel = None
        self._reason = "not loaded yet"

    def build(self) -> Path:
        return build(self.source, self.stem)

    def kernel(self):
        """The loaded kernel, or None (then :meth:`reason` says why)."""
        import ctypes

        if disabled():
            return None
        if self._kernel is None and self._reason == "not loaded yet":
            try:
                built = self.build()
                fn = self.bind(ctypes.CDLL(str(built)))
                if self.check(fn):
                    self._kernel = fn
                    self._reason = (f"{IN_USE}: {built} (compiled from {self.source}; it agreed with the torch "
                                    "path on this process's check)")
                else:
                    self._reason = self.mismatch
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
                self._reason = f"could not be built: {exc}"
        return self._kernel

    def reason(self) -> str:
        """Which path runs and why, in one line (for diagnostics): starts with :data:`IN_USE` when the
        C kernel runs, otherwise says why the torch path runs instead."""
        self.kernel()
        if disabled():
            return f"disabled by {DISABLE_ENV}=0: the torch path runs"
        return self._reason if self._kernel is not None else f"{self._reason}: the torch path runs"

    def reset(self) -> None:
        """Forget the outcome of the last load (tests)."""
        self._kernel, self._reason = None, "not loaded yet"
