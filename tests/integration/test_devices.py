"""'auto' devices in Ray's actors: the GPU share an actor was given, not every GPU it can see.

Ray leaves ``CUDA_VISIBLE_DEVICES`` as it was for an actor that asks for no GPU (it used to set
it empty), so on a GPU node ``torch.cuda.is_available()`` is true in every actor: with 'auto' as
"cuda if available", every rollout worker's policy and every reward's model with no GPU share
went onto GPU 0, outside Ray's accounting (an exclusive-process GPU refuses them all)."""

from __future__ import annotations

import pytest
import ray

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0.1)
class Probe:
    def __init__(self, sees_a_gpu: bool, given: list[int]):
        import torch

        torch.cuda.is_available = lambda: sees_a_gpu  # the node's GPUs, as this actor sees them
        if given:  # a share Ray gave it (this test cluster has no GPU resource to give)
            ray.get_gpu_ids = lambda: given

    def auto(self) -> tuple[str, bool | None]:
        from common.devices import given_gpus, resolve_device

        return str(resolve_device("auto")), given_gpus()


def test_an_actor_without_a_gpu_share_runs_on_the_cpu_though_it_sees_a_gpu(ray_local):
    alone = Probe.remote(sees_a_gpu=True, given=[])
    assert ray.get(alone.auto.remote(), timeout=60) == ("cpu", False)
    shared = Probe.remote(sees_a_gpu=True, given=[0])
    assert ray.get(shared.auto.remote(), timeout=60) == ("cuda", True)
    blind = Probe.remote(sees_a_gpu=False, given=[0])  # given a share it cannot see: the CPU, not an error
    assert ray.get(blind.auto.remote(), timeout=60) == ("cpu", True)
    for actor in (alone, shared, blind):
        ray.kill(actor)


def test_the_driver_takes_the_first_gpu_it_sees(ray_local, monkeypatch):
    """The learner, rollout.generate and a reward's HTTP server are no Ray actors: 'auto' is the
    first GPU they see."""
    import torch

    from common.devices import given_gpus, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert given_gpus() is None and str(resolve_device("auto")) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert str(resolve_device("auto")) == "cpu"


@ray.remote(num_cpus=0.1)
def _where() -> tuple[str, bool]:
    import torch

    from common.devices import resolve_device

    return str(resolve_device("auto")), torch.cuda.is_available()


def test_a_task_without_a_gpu_share_runs_on_the_cpu_though_it_sees_a_gpu(ray_local):
    @ray.remote(num_cpus=0.1)
    def probe() -> str:
        import torch

        from common.devices import resolve_device

        torch.cuda.is_available = lambda: True
        return str(resolve_device("auto"))

    assert ray.get(probe.remote(), timeout=60) == "cpu"


@pytest.mark.gpu
def test_on_a_gpu_node_only_the_actors_given_a_share_use_it(ray_local):
    """On a real GPU node: Ray lets an actor with no GPU share see the GPU; 'auto' leaves it alone."""
    assert ray.get(_where.remote(), timeout=120) == ("cpu", True)  # sees it, was given none
    assert ray.get(_where.options(num_gpus=0.5).remote(), timeout=120) == ("cuda", True)
