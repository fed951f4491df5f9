"""Messages between the learner, the rollout workers and the reward servers (docs/method.md, The system).

Pydantic models with ``extra="forbid"``. Arrays are numpy; inside Ray they travel as they are,
outside Ray (the rollout log, HTTP) through ``common.codec``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArrayMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class SamplerSpec(Message):
    """What the learner needs to know of a sampler without loading it."""

    backend: str
    x_shape: tuple[int, ...] = Field(description="Shape of one initial noise x_T ([D] or [C, H, W]).")
    token_dim: int = Field(gt=0)
    pooled_dim: int = Field(ge=0)
    train_prompts: list[str] = Field(min_length=1)
    eval_prompts: list[str] = Field(min_length=1)
    pipeline: str | None = Field(None, description="The diffusers pipeline class it runs (a policy exports to it).")
    time_convention: str | None = Field(
        None, description="How a time t in [0, 1] becomes the model's noise level ('flow: sigma = t', ...)."
    )
    call_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="The stock pipeline's __call__ settings under which it makes this sampler's images (guidance).",
    )
    reads: dict[str, Any] = Field(
        default_factory=dict,
        description="The pipeline's settings its policy inputs and images are made of (SD's scheduler betas).",
    )


class Context(Message):
    """One (prompt, initial noise) pair; ``index`` is its position in the run's context stream."""

    index: int = Field(ge=0)
    prompt: str
    seed: int = Field(ge=0)


ScheduleMode = Literal["sample", "mean", "default", "fixed"]


class RolloutRequest(Message):
    """K rollouts for each context under policy ``version`` (``mode='sample'``), or samples with a
    deterministic schedule: the policy's Dirichlet mean (``'mean'``), the backend's default
    (``'default'``) or the given ``tau`` for every context (``'fixed'``)."""

    request_id: str
    iteration: int = Field(ge=0)
    version: int = Field(ge=0)
    contexts: list[Context] = Field(min_length=1)
    k: int = Field(ge=1)
    steps: int = Field(ge=1)
    mode: ScheduleMode = "sample"
    tau: list[float] | None = Field(None, description="The schedule of mode 'fixed' (L+1 components).")
    max_concentration: float | None = Field(
        None, gt=0, description="The policy's cap on sum(alpha) at this iteration (None: the policy's own)."
    )
    image_size: int | None = Field(
        None,
        ge=1,
        description="Longest side of the images sent on (every reward reads no more: its input_size); None: as made.",
    )
    reference_steps: int = Field(
        0,
        ge=0,
        description="NFE of the many-step reference sample made once per context, for rewards that compare"
        " with it (0: none).",
    )
    variant: Literal["conditional", "global"] | None = Field(
        None,
        description="The policy variant drawn under: the workers' own (None), or the other with the same"
        " settings (a run trains its global baseline on the workers of its conditional policy).",
    )

    @model_validator(mode="after")
    def _tau_iff_fixed(self) -> RolloutRequest:
        if (self.mode == "fixed") != (self.tau is not None):
            raise ValueError("tau is given exactly when mode is 'fixed'")
        if self.tau is not None and len(self.tau) != self.steps + 1:
            raise ValueError(f"tau has {len(self.tau)} components, expected L+1 = {self.steps + 1}")
        return self


class RolloutBatch(ArrayMessage):
    """What a worker returns for one request (the images travel separately, as an object ref).

    Holds what the learner needs to recompute log pi with gradients: the policy inputs, the
    action and the behaviour log-prob, with the ids and the version that produced them.
    """

    request_id: str
    iteration: int
    version: int
    worker: int
    contexts: list[Context]
    x: np.ndarray  # [C, *x_shape] float32: initial noises
    tokens: list[np.ndarray]  # C x [T_c, E] float32, trimmed to each prompt's real length
    pooled: np.ndarray | None  # [C, P] float32
    tau: np.ndarray  # [C, K, L+1] float64: the executed schedules
    log_tau: np.ndarray  # [C, K, L+1] float64: log of the drawn points (the actions the update scores)
    logp: np.ndarray  # [C, K] float64: behaviour log-probs (0 for fixed schedules)
    seconds: float = 0.0  # time the worker spent on the request
    started_at: float = 0.0  # wall-clock time (time.time()) the worker started it: dispatch skew
    weights_from: str = ""  # where the worker read this version: 'collective', 'object_store', 'argument'; '' had it
    weights_s: float = 0.0  # seconds the worker spent reading it (waiting for it included); 0 if it had it

    @property
    def prompts(self) -> list[str]:
        return [c.prompt for c in self.contexts]


class RolloutRecord(Message):
    """One rollout in the run's rollout log (rollouts.msgpack): ids, action, rewards, advantage."""

    iteration: int
    context: int
    k: int
    prompt: str
    seed: int
    version: int
    tau: list[float]
    log_tau: list[float] | None = None  # log of the drawn point, whose log-prob ``logp`` is
    logp: float
    reward: float
    rewards: dict[str, float]
    baseline: float
    advantage: float
