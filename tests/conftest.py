"""Shared fixtures. Ray runs under token authentication, as a cluster should, with a token made
for this session (RAY_AUTH_TOKEN, which Ray reads before any token file: one left in ~/.ray by an
earlier ray.init() is never used); every Ray process and subprocess of the tests inherits it.
Clusters get an explicit num_cpus and are shut down in teardown. Whatever
the project caches (the digits models) goes to the checkout's own `.test-cache/`, never to the
user's cache directory: `STEINSCHED_CACHE` is set before anything is imported, and Ray workers
and subprocesses inherit it."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

os.environ.setdefault("STEINSCHED_CACHE", str(Path(__file__).resolve().parents[1] / ".test-cache"))
os.environ["RAY_AUTH_MODE"] = "token"
if len(os.environ.get("RAY_AUTH_TOKEN", "")) < 32:  # given by the caller (.ci/run), or made here
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# The property tests draw new examples on every run (a failure found is replayed from
# .hypothesis/ until fixed); CI sets HYPOTHESIS_PROFILE=ci, hypothesis's own profile for it: the
# same examples each time (derandomized, no example database, no deadline), so a clean
# checkout's result does not depend on the draw or on the machine's speed.
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster shared by the tests of a session (started once: Ray is slow to start)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def load_bench(script: str):
    """A script of bench/ as a module (bench/ is a folder of scripts, not a package), loaded once."""
    import importlib.util
    import sys

    name = f"bench_{Path(script).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


def tiny_overrides(tmp_path: Path, **sections) -> dict:
    """Config overrides for a run that takes seconds: tiny policy, few iterations, output in tmp, one
    rollout worker (each worker is a process that loads torch: seconds of a 2-core machine); a test
    of what several workers do says ``rollout={"num_workers": 2}``."""
    base = {
        "experiment": {"name": "t", "seed": 0, "output_dir": str(tmp_path)},
        "sampler": {"backend": "toy", "toy": {"dim": 4}},
        "policy": {"widths": [8, 8, 16, 16], "groups": 4, "attn_heads": 2, "head_hidden": 16},
        # the policy on the CPU on both sides, GPU or not: the tests of bits compare CPU runs
        "rollout": {
            "num_workers": 1,
            "k": 2,
            "steps": 3,
            "contexts_per_iter": 4,
            "num_cpus": 0.5,
            "policy_device": "cpu",
        },
        "rewards": [{"name": "toy", "num_cpus": 0.5}],
        "learner": {
            "iterations": 3,
            "checkpoint_every": 2,
            "eval_seeds": 4,
            "progress": False,
            "eval_metrics": [],
            "global_baseline": False,
            "plots": False,
            "device": "cpu",
        },
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(base.get(name), dict):
            base[name] = {**base[name], **values}
        else:
            base[name] = values
    return base


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final policy's weights of a finished run."""
    from common.policy import SchedulePolicy

    return SchedulePolicy.from_pretrained(run_dir / "policy").state_dict()


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit for bit the same tensors under the same names."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def actors_now() -> set[str]:
    """The ids of every actor the cluster knows, alive or dead."""
    from ray._private import state

    return set(state.actors())


def live_pids(class_name: str, before: set[str]) -> list[int]:
    """Pids of the live actors of ``class_name`` that are not in ``before`` (``actors_now()``
    taken before the run started): an earlier run's actors are never the target."""
    from ray._private import state

    return [
        a["Pid"]
        for aid, a in state.actors().items()
        if a["ActorClassName"] == class_name and a["State"] == "ALIVE" and a.get("Pid") and aid not in before
    ]


def left_alive(before: set[str], within_s: float = 10.0) -> list[str]:
    """The classes of the actors started since ``before`` (``actors_now()``) that are still alive
    ``within_s`` seconds on (a kill takes a moment to reach the actor table); [] once all are gone."""
    import time

    from ray._private import state

    deadline = time.monotonic() + within_s
    while True:
        alive = sorted(
            a["ActorClassName"] for aid, a in state.actors().items() if aid not in before and a["State"] != "DEAD"
        )
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def interrupt_at(monkeypatch, module, name: str, at: int = 1) -> None:
    """``module.<name>`` raises KeyboardInterrupt (Ctrl-C, a preemption) in its ``at``-th call;
    the calls before and after it are the real function's."""
    real, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) != at:
            return real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, interrupted)
