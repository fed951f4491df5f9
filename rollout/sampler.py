"""The Sampler protocol: what a backend must do for the rollout worker (docs/backends.md).

A user's backend implements these methods; it does not subclass anything of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from common.messages import SamplerSpec
from common.policy import PolicyInputs, collate


@dataclass
class PromptFeatures:
    """The policy's view of one prompt: text tokens trimmed to their real length, pooled embedding."""

    tokens: np.ndarray  # [T, E] float32
    pooled: np.ndarray | None  # [P] float32


def stacked_pooled(feats: list[PromptFeatures]) -> np.ndarray | None:
    """The prompts' pooled embeddings as one [B, P] array, or None where the sampler has none."""
    return None if feats[0].pooled is None else np.stack([f.pooled for f in feats if f.pooled is not None])


def policy_inputs(x: np.ndarray, feats: list[PromptFeatures], device: Any = "cpu") -> PolicyInputs:
    """The policy's batch for noises ``x`` [B, ...] and their prompts' features (padded, masked,
    with the pooled embeddings where the sampler has them), on ``device``."""
    return collate(x, [f.tokens for f in feats], stacked_pooled(feats), device)


#: The methods every sampler has (``check_prompt`` is optional).
REQUIRED_METHODS = ("spec", "default_tau", "encode", "initial_noise", "sample")


def prompt_problem(sampler: Any, prompts: list[str]) -> str | None:
    """None if ``sampler`` reads every prompt (its ``check_prompt``, where it has one: e.g. the
    toy's 'class 3' within its classes), else the first problem, one line."""
    from common.prompts import check_prompts

    try:
        check_prompts(prompts, "prompts")
        check = getattr(sampler, "check_prompt", None)
        if callable(check):
            for p in prompts:
                check(p)
    except ValueError as e:
        return str(e)
    return None


def missing_methods(cls: type) -> list[str]:
    """The protocol's methods that ``cls`` lacks (or has as something other than a callable)."""
    return [f"{m}()" for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]


@runtime_checkable
class Sampler(Protocol):
    def spec(self) -> SamplerSpec:
        """Shapes of the policy inputs and the backend's train / eval prompts."""
        ...

    def default_tau(self, steps: int) -> np.ndarray:
        """The stock schedule at ``steps`` NFE as a point of the simplex, [L+1] float64."""
        ...

    def encode(self, prompts: list[str]) -> list[PromptFeatures]:
        """Policy features of each prompt (a prompt the backend cannot read is a ValueError)."""
        ...

    # Optional: ``check_prompt(prompt) -> None`` raises ValueError for a prompt the backend cannot
    # read, cheaply (without encoding it); the worker checks every train and eval prompt with it
    # before training. Backends that read any text (the diffusers ones) leave it out.

    def initial_noise(self, seeds: list[int]) -> np.ndarray:
        """x_T for each seed, [N, *x_shape] float32, a pure function of the seed."""
        ...

    def sample(self, prompts: list[str], noise: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Run the frozen sampler; sample n starts from ``noise[n]`` at ``times[n, 0]`` and
        evaluates the model at ``times[n, :]`` (its own schedule), stepping to 0 at the end."""
        ...
