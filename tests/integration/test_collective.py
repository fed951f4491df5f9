"""The weight broadcast over a collective (``learner.broadcast: collective``) on a real local Ray
cluster: gloo on the CPU, the code path NCCL takes on GPUs. The workers must read every version
over the group (none from the object store), end with exactly the weights of an object-store
run, and survive a killed worker (the group is formed again without it, then with its restart).
"""

from __future__ import annotations

import pytest

from common.collective import Receiver
from common.config import load_config
from learner.loop import train
from learner.metrics import read_jsonl
from tests.conftest import final_weights, same_weights, tiny_overrides
from tests.integration.test_faults import Killer, training_started

pytestmark = pytest.mark.ray


def _run(tmp_path, **learner):
    over = tiny_overrides(tmp_path, learner={"iterations": 4, **learner}, rollout={"num_workers": 2, "max_restarts": 5})
    return train(load_config([], **over))


def _loads(run_dir) -> tuple[float, float]:
    rows = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "learner/pg_loss" in m]
    return (
        sum(m["system/weights_from_collective"] for m in rows),
        sum(m["system/weights_from_object_store"] for m in rows),
    )


@pytest.mark.parametrize(("pipeline", "dtype"), [(False, "float32"), (True, "bfloat16")])
def test_collective_run_equals_the_object_store_run(ray_local, tmp_path, pipeline, dtype):
    settings = {"pipeline": pipeline, "broadcast_dtype": dtype}
    ref = _run(tmp_path / "store", **settings)
    got = _run(tmp_path / "collective", broadcast="collective", **settings)
    a, b = final_weights(ref.run_dir), final_weights(got.run_dir)
    assert same_weights(a, b)
    over_group, from_store = _loads(got.run_dir)
    assert from_store == 0 and over_group >= 4, (over_group, from_store)  # every load came over the group
    assert _loads(ref.run_dir)[0] == 0
    for run in (ref, got):  # the slowest read of the iteration's version: 0 where every worker held it already
        rows = [m for m in read_jsonl(run.run_dir / "metrics.jsonl") if "learner/pg_loss" in m]
        loaded = [m["system/weights_from_collective"] + m["system/weights_from_object_store"] > 0 for m in rows]
        assert sum(loaded) >= 3, loaded
        assert all((0 < m["system/weights_load_seconds"] < 60) == ld for m, ld in zip(rows, loaded, strict=True))


def test_a_killed_worker_changes_nothing_and_the_group_is_formed_again(ray_local, tmp_path, capsys):
    iters = 30  # the kill lands after the third row: most of the run is still to come
    ref = _run(tmp_path / "ref", iterations=iters, broadcast="collective")
    started = training_started(tmp_path / "faulty" / "t", rows=3)
    killer = Killer("RolloutWorker", kills=1, every_s=1.0, first_after_s=0.0, when=started)
    killer.start()
    try:
        got = _run(tmp_path / "faulty", iterations=iters, broadcast="collective", broadcast_timeout_s=20.0)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.done, "the fault was injected too late to matter"
    a, b = final_weights(ref.run_dir), final_weights(got.run_dir)
    assert same_weights(a, b), "the fault changed the trained weights"
    rows = [m for m in read_jsonl(got.run_dir / "metrics.jsonl") if "learner/pg_loss" in m]
    assert rows[-1]["system/weights_from_collective"] > 0, "the group was not formed again after the restart"
    # the restart costs about a worker's start, never a chain of broadcast time-outs (20 s each here)
    assert max(m["system/step_seconds"] for m in rows) < 15, [round(m["system/step_seconds"], 2) for m in rows]


def test_a_worker_outside_a_group_reads_nothing_from_it():
    r = Receiver()
    assert r.get(3, wait_s=5.0) is None  # not in a group: no wait, the caller reads the object store
    assert r.receive("some-group", 3, [("w", (2,))], "float32", {}) is False


def test_nccl_only_where_every_worker_holds_whole_gpus():
    """Workers on fractions of a GPU may share a device, which NCCL refuses (two ranks on one):
    three failed broadcasts, then the object store alone."""
    import torch

    from common.collective import backend_for

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert backend_for(gpu, 1.0) == "nccl" and backend_for(gpu, 2.0) == "nccl"
    assert backend_for(gpu, 0.5) == "gloo" and backend_for(gpu, 0.0) == "gloo" and backend_for(cpu, 1.0) == "gloo"


def test_ranks_on_one_gpu_form_a_gloo_group():
    """Where the workers took every GPU of the learner's node (``rollout.num_workers: auto``, one
    GPU each), the learner's cuda:0 is worker 1's: NCCL refused the group ('Duplicate GPU
    detected') three times before the run kept to the object store. The group is gloo's there."""
    from common.collective import gpu_uuid, group_backend

    assert group_backend("nccl", ["GPU-a", "GPU-b", "GPU-c"]) == ("nccl", None)
    backend, why = group_backend("nccl", ["GPU-a", "GPU-a", "GPU-b"])
    assert backend == "gloo" and why == "the learner and worker rank 1 are on one GPU (GPU-a), which NCCL refuses"
    backend, why = group_backend("nccl", ["GPU-a", "GPU-b", "GPU-c", "GPU-b"])
    assert backend == "gloo" and why is not None and why.startswith("worker rank 1 and worker rank 3 are on one GPU")
    assert group_backend("nccl", ["GPU-a", None]) == ("gloo", "worker rank 1 has no GPU")
    assert group_backend("gloo", ["GPU-a", "GPU-a"]) == ("gloo", None)
    assert gpu_uuid() is None  # this process sees no GPU


def test_an_nccl_group_that_times_out_leaves_the_learner_running(monkeypatch):
    """PyTorch's default for an NCCL operation past its time-out ends the process: a worker lost
    in a broadcast took the learner down with it, where the version was to be read from the object
    store. The group is made with NCCL's errors raised in the process instead; gloo's raise as is."""
    import os

    import torch.distributed as dist

    from common import collective

    seen = []
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    monkeypatch.setattr(
        dist, "init_process_group", lambda *a, **k: seen.append(os.environ.get(collective.NCCL_ERROR_HANDLING[0]))
    )
    collective.init_group("gloo", dist.HashStore(), "g", 0, 1, 5.0)
    collective.init_group("nccl", dist.HashStore(), "g", 0, 1, 5.0)
    assert seen == [None, "2"]
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # the operator's choice stays
    collective.init_group("nccl", dist.HashStore(), "g", 0, 1, 5.0)
    assert seen[-1] == "1"
