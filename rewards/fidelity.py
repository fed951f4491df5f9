"""Fidelity: closeness of a few-step sample to the many-step sample of the same prompt and noise.

``reward = -mean((image - reference)^2)`` per sample, over every pixel (images as the sampler
returns them: float in [0, 1], or uint8 read as /255). The reference is made by the rollout
worker, once per context with the backend's default schedule at ``rollout.reference_steps`` NFE,
and shared by the context's K rollouts; it reaches the reward server as an object ref beside the
images, never through the learner.

Why it is a good reward for schedules: the sampler is frozen, so the best a schedule can do is
make the L-step solve land where the many-step solve lands. Unlike a learned preference model it
cannot be hacked by drifting away from what the model makes; on digits it tracks the gold
Frechet distance far better than realism x p(class) does (docs/method.md). Its cost is
``reference_steps`` extra NFE per context, against ``K * L`` for the rollouts themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rewards.registry import register


def as_float_images(images: Any) -> np.ndarray:
    """[N, ...] images as float64 in [0, 1] (uint8 is divided by 255; torch tensors are fetched)."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    a = np.asarray(images)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"images must be float in [0, 1] or uint8, got dtype {a.dtype}")
    return a.astype(np.float64)


@register("fidelity")
class Fidelity:
    """-MSE to the many-step reference sample of the same context (needs rollout.reference_steps)."""

    needs_reference = True

    def __init__(self, scale: float = 1.0):
        """``scale`` multiplies the negative MSE (a unit choice only: baselines are scale-free)."""
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale}")
        self.scale = float(scale)

    def __call__(self, images: Any, prompts: Sequence[str], references: Any = None) -> np.ndarray:
        if references is None:
            raise ValueError("the fidelity reward needs reference samples: set rollout.reference_steps > 0")
        a, b = as_float_images(images), as_float_images(references)
        if a.shape != b.shape or len(a) != len(prompts):
            raise ValueError(f"images {a.shape} and references {b.shape} must match, one per prompt ({len(prompts)})")
        return (-self.scale * ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)).astype(np.float32)
