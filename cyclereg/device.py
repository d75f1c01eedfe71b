"""Device selection (``auto`` picks CUDA when available, else CPU), the machine a record names, and a
device's memory."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from cyclereg.errors import InputError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a device) to a :class:`torch.device`."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    cuda = re.fullmatch(r"cuda(?::([0-9]+))?", name)  # cuda:abc, cudax, cuda:-1: torch's RuntimeError otherwise
    if cuda is None:
        raise InputError(f"--device {device}: expected auto, cpu or cuda" +
                         (" (or cuda:N, N a GPU number)" if name.startswith("cuda") else ""))
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if cuda.group(1) is not None and int(cuda.group(1)) >= count:  # else CUDA's 'invalid device ordinal' later
        raise InputError(f"--device {device}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                         f"(cuda:0 .. cuda:{count - 1})")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on ``device`` has finished (CUDA runs asynchronously), so that
    a wall-clock reading covers it; nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpuinfo_field(field: str) -> str | None:
    """The value of the first ``field`` line of ``/proc/cpuinfo`` (e.g. ``"model name"``), or None
    where there is none or no such file."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what :mod:`platform` knows)."""
    name = cpuinfo_field("model name")
    return name if name is not None else platform.processor() or "unknown"


def cpu_has_bf16_units() -> bool:
    """Whether the CPU multiplies bfloat16 matrices natively (the ``amx_bf16`` or ``avx512_bf16``
    flag of ``/proc/cpuinfo``), which makes bfloat16 autocast fast; False where unknown."""
    return bool({"amx_bf16", "avx512_bf16"} & set((cpuinfo_field("flags") or "").split()))


def provenance(device: torch.device | None = None) -> dict:
    """What a report or configuration record says about where and when it was made: cyclereg's
    version, the UTC time, the machine (platform, CPU, torch, and the GPU when ``device`` is one) and
    the working directory (relative paths in the record are relative to it, as they were given). Every value is
    a plain ``str`` (torch's version string is a ``str`` subclass, which ``pickle`` and type checks would keep)."""
    import datetime as _dt

    from cyclereg import __version__

    machine = {"platform": platform.platform(), "cpu": cpu_model(), "torch": str(torch.__version__)}
    if device is not None and device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    return {"cyclereg_version": __version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "working_directory": os.getcwd()}


def memory_bytes(device: torch.device | str) -> int | None:
    """The memory of ``device`` in bytes: the machine's physical memory for the CPU, the GPU's for CUDA;
    None where unknown (also for a name torch does not know, e.g. ``auto``: resolve it first)."""
    try:
        device = torch.device(device)
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None
