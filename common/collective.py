"""The weight broadcast over a collective (``learner.broadcast: collective``).

The learner is rank 0 of a torch.distributed group, the live rollout workers ranks 1..W: NCCL
where the learner's policy and the workers are on GPUs (one GPU per rank: NCCL refuses two ranks
on one device), gloo (TCP) otherwise. Each version goes out in one
``broadcast`` of the bytes of the flat buffer the object store would carry (``common.policy.Weights``); a
worker receives it on a thread of its own (a Ray concurrency group, so a broadcast never waits
for sampling) into a fresh buffer, and the sampling thread takes the version a request asks for.

The object store stays the fallback: each version is still put there once, and a request
carries its ref nested in a ``WeightsHandle`` (which Ray does not fetch), so a worker that lacks
the version (restarted, just started, or the broadcast failed) reads it from there instead.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from common.policy import Weights, wire_storage

#: Seconds a worker waits for a version still arriving over the group before it reads the object store.
STAGE_WAIT_S = 10.0
#: Seconds to read an object that already exists from the object store: a version of the weights on a
#: worker (the unit's own deadline is shorter), finished images on the learner.
FETCH_TIMEOUT_S = 300.0


@dataclass
class WeightsHandle:
    """A request's weights: the version's object ref (nested in this object, so Ray does not fetch
    it with the call: a worker that holds the version reads nothing) and whether the version went
    out over a collective's group as well (if not, the worker reads the ref at once instead of
    waiting for it)."""

    ref: Any
    broadcast: bool


def backend_for(learner_device: torch.device, worker_gpus: float) -> str:
    """NCCL where the learner and every worker hold a GPU of their own (``worker_gpus``, each
    worker's share, at least 1), gloo otherwise: workers on fractions of a GPU may share a device,
    and NCCL refuses two ranks on one."""
    return "nccl" if learner_device.type == "cuda" and worker_gpus >= 1 else "gloo"


def gpu_uuid(device: torch.device | None = None) -> str | None:
    """The UUID of ``device`` (default: this process's current GPU), None without a GPU: the
    physical device, which an index under each process's own ``CUDA_VISIBLE_DEVICES`` is not."""
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    return str(torch.cuda.get_device_properties(index).uuid)


def group_backend(wanted: str, devices: list[str | None]) -> tuple[str, str | None]:
    """(the backend a group of ranks on ``devices`` (their GPUs' UUIDs, the learner's first) can
    use, why not ``wanted`` where it cannot): NCCL refuses two ranks on one GPU ('Duplicate GPU
    detected') and a rank without one. On a node whose GPUs all went to workers, the learner's
    cuda:0 is one of theirs: there the group is gloo's."""
    if wanted != "nccl":
        return wanted, None
    for i, d in enumerate(devices):
        if d is None:
            return "gloo", f"{'the learner' if i == 0 else f'worker rank {i}'} has no GPU"
        ranks = [j for j, e in enumerate(devices) if e == d]
        if len(ranks) > 1:
            who = " and ".join("the learner" if j == 0 else f"worker rank {j}" for j in ranks)
            return "gloo", f"{who} are on one GPU ({d}), which NCCL refuses"
    return "nccl", None


#: NCCL's handling of an operation past the group's time-out (a rank died in a broadcast): abort
#: the communicator and raise in this process (2), where PyTorch's default (3) ends the process: the
#: learner, which was to read that version from the object store and go on.
NCCL_ERROR_HANDLING = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


def init_group(backend: str, store: dist.Store, group_id: str, rank: int, world: int, timeout_s: float) -> None:
    """Join group ``group_id`` (this process's default group; any earlier one is left first)."""
    leave_group()
    if backend == "nccl":  # read as the group is made; an operator's own setting stays
        os.environ.setdefault(*NCCL_ERROR_HANDLING)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(group_id, store),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Receiver:
    """A rollout worker's side of the group: joins it, receives each version into a buffer of
    its own, and hands the version a request asks for to the sampling thread (the last ``KEEP``
    versions are kept: one step off policy, requests of the previous version may still start)."""

    KEEP = 2

    def __init__(self) -> None:
        self.group_id: str | None = None
        self._device = torch.device("cpu")
        self._store: dist.Store | None = None
        self._staged: dict[int, Weights] = {}
        self._cond = threading.Condition()

    def join(self, group_id: str, host: str, port: int, rank: int, world: int, backend: str, timeout_s: float) -> None:
        self.leave()
        self._store = dist.TCPStore(host, port, world, is_master=False, timeout=timedelta(seconds=timeout_s))
        init_group(backend, self._store, group_id, rank, world, timeout_s)
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.group_id = group_id

    def leave(self) -> None:
        """Leave the group; its versions go too (the next group's version numbers are its own)."""
        if self.group_id is not None:
            leave_group()
        self.group_id, self._store = None, None
        with self._cond:
            self._staged.clear()

    def receive(
        self,
        group_id: str,
        version: int,
        layout: list[tuple[str, tuple[int, ...]]],
        dtype: str,
        other: dict[str, Any],
    ) -> bool:
        """Take part in the broadcast of ``version``; False (and no part) if not in ``group_id``."""
        if group_id != self.group_id:
            return False
        storage = wire_storage(dtype)
        n = sum(math.prod(shape) for _, shape in layout)
        raw = torch.empty(n * storage.itemsize, dtype=torch.uint8, device=self._device)
        dist.broadcast(raw, src=0)  # as bytes: gloo has no 16-bit integers, the wire of bfloat16
        buf = raw.view(storage)
        with self._cond:
            self._staged[version] = Weights(buf, [(name, tuple(shape)) for name, shape in layout], dtype, other)
            for old in sorted(self._staged)[: -self.KEEP]:
                del self._staged[old]
            self._cond.notify_all()
        return True

    def get(self, version: int, wait_s: float = STAGE_WAIT_S) -> Weights | None:
        """Version ``version`` once received (waiting up to ``wait_s`` while in a group), else None."""
        with self._cond:
            if self.group_id is not None:
                self._cond.wait_for(lambda: version in self._staged, timeout=wait_s)
            return self._staged.get(version)
