"""Devices by name, as the config writes them."""

from __future__ import annotations

import sys

import torch


def given_gpus() -> bool | None:
    """Whether Ray gave this process a GPU share, where it is one of Ray's workers (an actor or a
    task); None elsewhere (a driver: the learner, ``rollout.generate``, a reward's HTTP server).
    Ray leaves ``CUDA_VISIBLE_DEVICES`` as it was for an actor that asked for no GPU (it used to
    hide them all), so such an actor sees every GPU of its node without owning any of it."""
    ray = sys.modules.get("ray")  # not imported: not in a Ray process
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None
    return bool(ray.get_gpu_ids())


def resolve_device(name: str) -> torch.device:
    """A device setting ('auto', 'cpu', 'cuda', 'cuda:N') as a torch device: 'auto' is the GPU
    this process was given (an actor or task of Ray's: by its ``num_gpus``; elsewhere the first
    it sees), else the CPU. Asking for a GPU that is not there is a ValueError."""
    if name == "auto":
        return torch.device("cuda" if given_gpus() is not False and torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this process sees no GPU (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this process sees {torch.cuda.device_count()} GPU(s)")
    return device
