"""The learner's side of the weight broadcast over a collective (``learner.broadcast: collective``).

Each version is put into the object store as always (the fallback), then broadcast once over a
torch.distributed group of the learner (rank 0) and the live rollout workers (``common.collective``).
Each version first asks every live worker, on its ``weights`` thread, whether it is in the
group. The group is formed at the first version and again whenever its members are no longer
exactly the live workers, each still in it (one died, restarted, or joined: a restarted worker
has left it). While a worker does not answer (it is restarting, or still leaving a failed
group) the versions go by the object store alone. A broadcast that fails (a worker died in it,
a time-out) is reported and that version too is read from the object store; after
``MAX_FAILURES`` failures in a row the run goes on with the object store alone.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError

from common.collective import backend_for, gpu_uuid, group_backend, init_group, leave_group
from common.policy import Weights
from learner.groups import ACTOR_FAULTS, RolloutGroup

#: Failed broadcasts in a row after which the run uses the object store alone.
MAX_FAILURES = 3


class CollectiveBroadcast:
    def __init__(self, rollouts: RolloutGroup, device: torch.device, timeout_s: float):
        self.rollouts, self.timeout_s = rollouts, timeout_s
        self.wanted = backend_for(device, rollouts.num_gpus)  # NCCL where each rank has a GPU of its own
        self.learner_device = device
        self.backend = self.wanted  # this group's, once formed (``_form``)
        self.device = device if self.backend == "nccl" else torch.device("cpu")  # where the bytes are sent from
        self._said: set[str] = set()  # why a group is gloo's where NCCL was wanted: said once
        self.group_id: str | None = None
        self.members: list[int] = []
        self.failures = 0
        self._store: dist.Store | None = None

    def _call(self, worker: int, method: str, *args: Any) -> ray.ObjectRef:
        """``method`` on ``worker``'s weights thread: it runs beside sampling, never behind it."""
        return getattr(self.rollouts.workers[worker], method).options(concurrency_group="weights").remote(*args)

    def _ready(self) -> tuple[bool, bool]:
        """(every live worker answers on its weights thread, and the group is exactly them, each
        still in it). A call queued behind a join still under way answers once that ends."""
        alive = list(self.rollouts.alive)
        try:
            answers = ray.get(
                [self._call(w, "in_weights_group", self.group_id or "") for w in alive], timeout=self.timeout_s
            )
        except (GetTimeoutError, *ACTOR_FAULTS):
            return False, False
        return True, self.group_id is not None and self.members == alive and all(answers)

    def _form(self) -> None:
        self.close()
        members = list(self.rollouts.alive)
        world, group_id = len(members) + 1, uuid.uuid4().hex
        devices = (
            []
            if self.wanted != "nccl"
            else ray.get([self._call(w, "gpu_uuid") for w in members], timeout=self.timeout_s)
        )
        self.backend, why = group_backend(self.wanted, [gpu_uuid(self.learner_device), *devices])
        self.device = self.learner_device if self.backend == "nccl" else torch.device("cpu")
        if why is not None and why not in self._said:
            self._said.add(why)
            print(f"warning: learner.broadcast=collective: {why}; the weights go over gloo (through the CPU)")
        host = ray.util.get_node_ip_address()
        store = dist.TCPStore(
            host, 0, world, is_master=True, timeout=timedelta(seconds=self.timeout_s), wait_for_workers=False
        )
        joins = [
            self._call(w, "join_weights_group", group_id, host, store.port, rank, world, self.backend, self.timeout_s)
            for rank, w in enumerate(members, start=1)
        ]
        init_group(self.backend, store, group_id, 0, world, self.timeout_s)  # returns once every rank is in
        ray.get(joins, timeout=self.timeout_s)
        self._store, self.group_id, self.members = store, group_id, members

    def send(self, version: int, weights: Weights) -> bool:
        """Broadcast ``weights`` (version ``version``) to the live workers; False if it did not
        reach them all (they then read this version from the object store)."""
        if self.failures >= MAX_FAILURES:
            return False
        ready, current = self._ready()
        if not ready:  # a worker is restarting (or busy leaving a failed group): this version goes by the store
            self.close()
            return False
        try:
            if not current:
                self._form()
            refs = [
                self._call(w, "receive_weights", self.group_id, version, weights.layout, weights.dtype, weights.other)
                for w in self.members
            ]
            raw = weights.flat_tensor().to(self.device).view(torch.uint8)  # bytes, as the workers receive
            dist.broadcast(raw, src=0)
            ok = all(ray.get(refs, timeout=self.timeout_s))
        except Exception as e:  # noqa: BLE001 - any failure of the group falls back to the object store
            ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            why = "a worker was not in the group"
        if ok:
            self.failures = 0
            return True
        self.failures += 1
        self.close()
        left = "the run goes on with the object store alone" if self.failures >= MAX_FAILURES else "it is formed again"
        print(
            f"warning: the {self.backend} weight broadcast of version {version} failed ({why}); the workers read it"
            f" from the object store, and {left}"
        )
        return False

    def close(self) -> None:
        if self.group_id is not None:
            leave_group()
        self.group_id, self.members, self._store = None, [], None
