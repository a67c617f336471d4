"""Which device a run computes on."""

from __future__ import annotations

import torch

from zoomnet.errors import UserError, device_option


# a device's allocator out of memory (torch.OutOfMemoryError since torch 2.5)
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (CUDA when available).

    Raises:
        UserError: an unknown name, or ``cuda`` without a CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("{device}: no CUDA device is available; use cpu or auto", device=device_option(name))
    if name not in ("cpu", "cuda"):
        raise UserError("{device}: choose cpu, cuda or auto", device=device_option(name))
    return torch.device(name)
