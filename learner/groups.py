"""Actor groups the learner drives as if they were local objects (verl's worker groups).

``RolloutGroup.sample`` fans a list of contexts out over the rollout workers; ``RewardGroup.score``
fans the workers' image refs out over the reward servers, so images travel worker -> reward
server as object refs and never through the learner.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from common.config import Config, ConfigError, MetricSpec, RewardSpec
from common.messages import Context, RolloutBatch, RolloutRequest, SamplerSpec, ScheduleMode
from rewards.server import MetricServer, RewardServer
from rollout.worker import RolloutWorker


@dataclass
class Pending:
    """One in-flight rollout request: its metadata ref and its image ref."""

    request: RolloutRequest
    batch: ray.ObjectRef
    images: ray.ObjectRef

    @property
    def prompts(self) -> list[str]:
        return [c.prompt for c in self.request.contexts for _ in range(self.request.k)]


class RolloutGroup:
    def __init__(self, cfg: Config):
        r = cfg.rollout
        actor = ray.remote(RolloutWorker).options(num_cpus=r.num_cpus, num_gpus=r.num_gpus)
        self.workers = [
            actor.remote(i, cfg.sampler.model_dump(), cfg.policy.model_dump(), r.steps, cfg.experiment.seed)
            for i in range(r.num_workers)
        ]

    def spec(self) -> SamplerSpec:
        return ray.get(self.workers[0].spec.remote())

    def policy_kwargs(self) -> dict[str, Any]:
        return ray.get(self.workers[0].policy_kwargs.remote())

    def sample(
        self,
        contexts: list[Context],
        k: int,
        steps: int,
        iteration: int,
        version: int,
        weights: ray.ObjectRef | None,
        mode: ScheduleMode = "sample",
        tau: list[float] | None = None,
    ) -> list[Pending]:
        """Split ``contexts`` evenly over the workers; return the in-flight requests in order."""
        chunks = [c for c in np.array_split(np.arange(len(contexts)), len(self.workers)) if len(c)]
        pending = []
        for worker, idx in zip(self.workers, chunks):
            req = RolloutRequest(
                request_id=uuid.uuid4().hex,
                iteration=iteration,
                version=version,
                contexts=[contexts[i] for i in idx],
                k=k,
                steps=steps,
                mode=mode,
                tau=tau,
            )
            batch, images = worker.sample.options(num_returns=2).remote(req, weights)
            pending.append(Pending(req, batch, images))
        return pending


@dataclass
class Scores:
    total: np.ndarray  # [N] weighted sum, float64
    per_reward: dict[str, np.ndarray]  # name -> [N] float32


class RewardGroup:
    def __init__(self, specs: list[RewardSpec], extra_kwargs: dict[str, dict[str, Any]] | None = None):
        """``extra_kwargs[name]`` is merged under a spec's own kwargs (the toy reward's mixture)."""
        self.specs = specs
        self.servers: list[list[Any]] = []
        for spec in specs:
            kwargs = {**(extra_kwargs or {}).get(spec.name, {}), **spec.kwargs}
            actor = ray.remote(RewardServer).options(
                num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, runtime_env=spec.runtime_env
            )
            self.servers.append([actor.remote(spec.name, kwargs) for _ in range(spec.num_servers)])
        self._wait_started()
        self._turn = 0
        names = [s.name for s in specs]
        # metric keys: the reward's name, numbered where the same reward appears twice
        self.keys = [n if names.count(n) == 1 else f"{n}#{j}" for j, n in enumerate(names)]

    def _wait_started(self) -> None:
        """Every server has built its reward (module, class, call signature, kwargs, model load).

        The reward is resolved inside its server, in its own runtime_env (its module may not even
        import in the learner's environment), so a bad spec shows here, at startup, as one line
        naming the reward: not as an actor traceback at the first scoring call.
        """
        for j, (spec, servers) in enumerate(zip(self.specs, self.servers)):
            try:
                ray.get([s.pid.remote() for s in servers])
            except ray.exceptions.RayActorError as e:
                lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
                raise ConfigError(f"rewards[{j}] ({spec.name!r}) could not start: {lines[-1].strip() if lines else e}") from None

    def score(self, pending: list[Pending]) -> list[ray.ObjectRef]:
        """Start scoring every request with every reward; returns refs [request][reward]."""
        refs = []
        for p in pending:
            row = []
            for servers in self.servers:
                row.append(servers[self._turn % len(servers)].score.remote(p.images, p.prompts))
            self._turn += 1
            refs.append(row)
        return refs

    def combine(self, scored: list[list[np.ndarray]]) -> Scores:
        """Concatenate per-request scores and weight them into the total reward."""
        per_reward = {}
        total = 0.0
        for j, spec in enumerate(self.specs):
            s = np.concatenate([row[j] for row in scored])
            per_reward[self.keys[j]] = s
            total = total + spec.weight * s.astype(np.float64)
        return Scores(total=np.asarray(total), per_reward=per_reward)


class MetricGroup:
    """One MetricServer per evaluation metric: features per request (from the image refs), then
    one distance over the whole set, computed on the server."""

    def __init__(self, specs: list[MetricSpec]):
        self.names = [m.name for m in specs]
        self.servers = [
            ray.remote(MetricServer).options(num_cpus=m.num_cpus, num_gpus=m.num_gpus).remote(m.name, m.kwargs)
            for m in specs
        ]

    def measure(self, pending: list[Pending]) -> dict[str, float]:
        out = {}
        for name, server in zip(self.names, self.servers):
            feats = [server.features.remote(p.images, p.prompts) for p in pending]
            out[name] = server.distance.remote(*feats)
        return dict(zip(out, ray.get(list(out.values()))))


def collect(pending: list[Pending], score_refs: list[list[ray.ObjectRef]]) -> tuple[list[RolloutBatch], list[list[np.ndarray]], float]:
    """Wait for every request's metadata and scores; returns them and the seconds waited."""
    start = time.perf_counter()
    batches = ray.get([p.batch for p in pending])
    flat = ray.get([ref for row in score_refs for ref in row])
    width = len(score_refs[0]) if score_refs else 0
    scored = [flat[i * width : (i + 1) * width] for i in range(len(score_refs))]
    return batches, scored, time.perf_counter() - start
