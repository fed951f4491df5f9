"""The toy backend: a Gaussian mixture sampled by its exact rectified flow (common/toy.py).

Euler from ``t_k`` to ``t_{k+1}`` (``t_{L+1} = 0``) with the exact velocity, every sample on its
own schedule. Prompts name a class ("class 3"); the "text tokens" are a fixed embedding of it.
"""

from __future__ import annotations

import numpy as np

from common.messages import SamplerSpec
from common.schedule import step_ends, uniform_flow_tau
from common.toy import ToyMixture
from rollout.sampler import PromptFeatures


class ToySampler:
    def __init__(self, **problem):
        self.mixture = ToyMixture(**problem)

    def spec(self) -> SamplerSpec:
        prompts = [self.mixture.prompt(c) for c in range(self.mixture.num_classes)]
        return SamplerSpec(
            backend="toy",
            x_shape=(self.mixture.dim,),
            token_dim=self.mixture.tokens.shape[-1],
            pooled_dim=self.mixture.tokens.shape[-1],
            train_prompts=prompts,
            eval_prompts=prompts,
        )

    def default_tau(self, steps: int) -> np.ndarray:
        return uniform_flow_tau(steps)

    def check_prompt(self, prompt: str) -> None:
        self.mixture.parse(prompt)

    def encode(self, prompts: list[str]) -> list[PromptFeatures]:
        out = []
        for p in prompts:
            tokens = self.mixture.tokens[self.mixture.parse(p)]
            out.append(PromptFeatures(tokens=tokens, pooled=tokens.mean(axis=0)))
        return out

    def initial_noise(self, seeds: list[int]) -> np.ndarray:
        return np.stack([np.random.default_rng(s).standard_normal(self.mixture.dim, dtype=np.float32) for s in seeds])

    def sample(self, prompts: list[str], noise: np.ndarray, times: np.ndarray) -> np.ndarray:
        cls = np.array([self.mixture.parse(p) for p in prompts])
        x = noise.astype(np.float64)
        ends = step_ends(times)
        for k in range(times.shape[1]):
            x = x + (ends[:, k] - times[:, k])[:, None] * self.mixture.velocity(x, times[:, k], cls)
        return x.astype(np.float32)
