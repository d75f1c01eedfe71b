"""Device selection: ``auto`` picks CUDA when available, else CPU."""

from __future__ import annotations

import torch

from cyclereg.errors import InputError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a device) to a :class:`torch.device`."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise InputError(f"--device {device}: expected auto, cpu or cuda")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on ``device`` has finished (CUDA runs asynchronously), so that
    a wall-clock reading covers it; nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
