"""Devices by name, as the config writes them."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """A device setting ('auto', 'cpu', 'cuda', 'cuda:N') as a torch device: 'auto' is the first
    GPU this process sees, else the CPU. Asking for a GPU that is not there is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this process sees no GPU (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this process sees {torch.cuda.device_count()} GPU(s)")
    return device
