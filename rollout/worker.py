"""RolloutWorker: a frozen sampler and a policy copy; K rollouts per context (a Ray actor in a run).

Every random draw is a function of ids: x_T of the context seed, tau of (run seed, iteration,
context index, k). A re-sent request therefore gives the same rollout. Workers return data;
only the learner logs and writes checkpoints.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from common.actors import Actor, started
from common.collective import FETCH_TIMEOUT_S, Receiver, WeightsHandle, gpu_uuid
from common.config import PolicyConfig, SamplerConfig
from common.devices import resolve_device
from common.messages import RolloutBatch, RolloutRequest
from common.policy import (
    FlatState,
    SchedulePolicy,
    Weights,
    collate,
    dirichlet_mean,
    log_prob,
    policy_kwargs,
    sample_log_taus,
)
from common.prompt_cache import PromptCache
from common.schedule import executed_tau, times_from_tau, uniform_flow_tau
from rewards.images import downscale
from rollout.backends import build_sampler
from rollout.sampler import PromptFeatures, prompt_problem, stacked_pooled


class RolloutWorker(Actor):
    @started
    def __init__(
        self,
        worker_id: int,
        sampler: dict[str, Any],
        policy: dict[str, Any],
        steps: int,
        run_seed: int,
        torch_threads: int = 1,
        prompt_cache: int = 256,
        policy_device: str = "auto",
        image_threads: int = 1,
    ):
        torch.set_num_threads(torch_threads)
        self.worker_id, self.run_seed = worker_id, run_seed
        self.image_threads = image_threads  # the images' downscaling, one image each (rollout.image_threads)
        self.sampler = build_sampler(SamplerConfig(**sampler))
        self._policy_cfg, self._steps = PolicyConfig(**policy), steps
        self.device = resolve_device(policy_device)  # 'auto': the GPU Ray gave this worker, if any
        self._use_policy(self._policy_cfg.variant)
        self._receiver = Receiver()  # learner.broadcast: collective (methods on the 'weights' concurrency group)
        # the policy's features per prompt, bounded (a run may see millions of distinct prompts)
        self._features: PromptCache[PromptFeatures] = PromptCache(self.sampler.encode, prompt_cache)

    def spec(self):
        return self.sampler.spec()

    def default_tau(self, steps: int) -> np.ndarray:
        return self.sampler.default_tau(steps)

    def named_tau(self, name: str, steps: int) -> list[float] | None:
        """A named fixed schedule at ``steps`` NFE for this backend: 'default', 'uniform' (uniform
        in t) or 'ays' (Align Your Steps, where the backend has it; else None)."""
        if name == "default":
            return self.sampler.default_tau(steps).tolist()
        if name == "uniform":
            return uniform_flow_tau(steps).tolist()
        if name == "ays":
            ays = getattr(self.sampler, "ays_tau", None)
            tau = None if ays is None else ays(steps)
            return None if tau is None else np.asarray(tau).tolist()
        raise ValueError(f"unknown schedule {name!r}; expected 'default', 'uniform' or 'ays'")

    def policy_kwargs(self, variant: str | None = None) -> dict[str, Any]:
        """The policy's constructor arguments for this sampler (the learner builds the same), of
        the worker's own policy or (``variant``) of that variant with the same settings."""
        cfg = self._policy_cfg if variant is None else self._policy_cfg.model_copy(update={"variant": variant})
        return policy_kwargs(cfg, self.sampler.spec(), self._steps, self.sampler.default_tau(self._steps))

    def _use_policy(self, variant: str) -> None:
        """Draw under the policy ``variant`` from now on: built here, its weights loaded by the
        next request (a run's global baseline is trained on the same workers first)."""
        self.variant = variant
        self.policy = SchedulePolicy(**self.policy_kwargs(variant)).to(self.device).eval()
        self._weights = FlatState(self.policy)  # each version is copied into the parameters at once
        self.version = -1

    def check_prompts(self, prompts: list[str]) -> str | None:
        """None if the backend reads every prompt, else the first problem (one line)."""
        return prompt_problem(self.sampler, prompts)

    def _encode(self, prompts: list[str]) -> list[PromptFeatures]:
        return self._features.get(prompts)

    # The weight broadcast over a collective (common.collective): the learner calls these on the
    # actor's 'weights' concurrency group, a thread of their own beside sampling.

    def join_weights_group(
        self, group_id: str, host: str, port: int, rank: int, world: int, backend: str, timeout_s: float
    ) -> None:
        self._receiver.join(group_id, host, port, rank, world, backend, timeout_s)

    def gpu_uuid(self) -> str | None:
        """The GPU this worker's side of an NCCL group would use (None without one)."""
        return gpu_uuid()

    def in_weights_group(self, group_id: str) -> bool:
        return self._receiver.group_id == group_id

    def receive_weights(
        self, group_id: str, version: int, layout: list, dtype: str, other: dict[str, np.ndarray]
    ) -> bool:
        return self._receiver.receive(group_id, version, layout, dtype, other)

    def _load(self, request: RolloutRequest, weights: Weights | dict[str, np.ndarray] | WeightsHandle | None) -> str:
        """Load the weights of ``request.version``; returns where they came from: 'collective',
        'object_store' (a handle's ref: the version went by the object store alone, or did not
        arrive over the group) or 'argument' (the weights themselves)."""
        if isinstance(weights, WeightsHandle):
            staged = self._receiver.get(request.version) if weights.broadcast else None
            if staged is not None:
                self._weights.load(staged)
                return "collective"
            import ray

            self._weights.load(ray.get(weights.ref, timeout=FETCH_TIMEOUT_S))
            return "object_store"
        if weights is None:
            raise ValueError(f"request {request.request_id} needs policy version {request.version}")
        self._weights.load(weights)
        return "argument"

    def sample(
        self, request: RolloutRequest, weights: Weights | dict[str, np.ndarray] | WeightsHandle | None
    ) -> tuple[RolloutBatch, np.ndarray, np.ndarray | None]:
        """Rollouts for ``request`` under ``weights`` (version ``request.version``).

        Returns (batch, images, references); called with ``num_returns=3`` so the images and
        references stay object refs that go to the reward servers without passing through the
        learner. Images are ordered context-major: row c*K + i is rollout i of context c.
        ``references`` (None unless ``request.reference_steps``) holds, row for row, the many-step sample
        of the same prompt and noise: made once per context and repeated for its K rollouts.
        Both are downscaled to ``request.image_size`` where it is set (the rewards read no more).
        """
        start, started_at = time.perf_counter(), time.time()
        weights_from, weights_s = "", 0.0  # the version was loaded already (or the request needs no policy)
        variant = request.variant or self._policy_cfg.variant  # carried by the request: a restarted worker knows it too
        if request.mode in ("sample", "mean") and variant != self.variant:
            self._use_policy(variant)
        if request.mode in ("sample", "mean") and request.version != self.version:
            t_load = time.perf_counter()
            weights_from = self._load(request, weights)
            self.version, weights_s = request.version, time.perf_counter() - t_load
        if request.max_concentration is not None:  # the cap in force at this iteration (a schedule)
            self.policy.set_max_concentration(request.max_concentration)
        ctxs, k, steps = request.contexts, request.k, request.steps
        prompts = [c.prompt for c in ctxs]
        feats = self._encode(prompts)
        x = self.sampler.initial_noise([c.seed for c in ctxs])
        pooled, tokens = stacked_pooled(feats), [f.tokens for f in feats]
        inputs = collate(x, tokens, pooled, self.device)

        if request.mode == "sample":
            with torch.inference_mode():  # no_grad's numbers without autograd's bookkeeping (0.5 ms less on the toy)
                alpha = self.policy(inputs).double().cpu()
            keys = [(self.run_seed, request.iteration, c.index, j) for c in ctxs for j in range(k)]
            log_tau = sample_log_taus(np.repeat(alpha.numpy(), k, axis=0), keys).reshape(len(ctxs), k, -1)
            # the draw's own log-prob; the executed schedule is the draw floored (executed_tau)
            logp = log_prob(alpha[:, None, :].expand(-1, k, -1), torch.from_numpy(log_tau)).numpy()
            tau = executed_tau(log_tau)
        else:
            if request.mode == "mean":
                mean = dirichlet_mean(self.policy, inputs)
            else:
                fixed = self.sampler.default_tau(steps) if request.mode == "default" else np.asarray(request.tau)
                mean = np.tile(fixed, (len(ctxs), 1))
            tau = np.repeat(mean[:, None, :], k, axis=1)
            with np.errstate(divide="ignore"):
                log_tau = np.log(tau)  # a deterministic schedule: never scored
            logp = np.zeros((len(ctxs), k))
        if tau.shape[-1] != steps + 1:
            raise ValueError(f"policy has L={tau.shape[-1] - 1} steps but the request asks for L={steps}")

        times = times_from_tau(tau.reshape(-1, steps + 1))
        images = self.sampler.sample([p for p in prompts for _ in range(k)], np.repeat(x, k, axis=0), times)
        references = None
        if request.reference_steps:
            ref_times = np.tile(times_from_tau(self.sampler.default_tau(request.reference_steps)), (len(ctxs), 1))
            references = self.sampler.sample(prompts, x, ref_times)
            if request.image_size is not None:
                references = downscale(references, request.image_size, self.image_threads)
            references = np.repeat(references, k, axis=0)
        if request.image_size is not None:
            images = downscale(images, request.image_size, self.image_threads)
        batch = RolloutBatch(
            request_id=request.request_id,
            iteration=request.iteration,
            version=request.version,
            worker=self.worker_id,
            contexts=list(ctxs),
            x=x,
            tokens=tokens,
            pooled=pooled,
            tau=tau,
            log_tau=log_tau,
            logp=logp,
            seconds=time.perf_counter() - start,
            started_at=started_at,
            weights_from=weights_from,
            weights_s=weights_s,
        )
        return batch, images, references
