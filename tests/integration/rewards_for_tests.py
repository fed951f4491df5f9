"""Rewards named by import path in the integration tests (a user's plug-in, in miniature)."""

from __future__ import annotations

import numpy as np


class NegativeNorm:
    """Prefers samples near the origin: a custom reward a user might plug in."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, images, prompts):
        return (-self.scale * np.linalg.norm(np.asarray(images), axis=1)).astype(np.float32)


class NanForClass3:
    """Returns NaN for prompts naming class 3: must stop the step, never reach the policy."""

    def __call__(self, images, prompts):
        return np.array([np.nan if p == "class 3" else 0.0 for p in prompts], dtype=np.float32)
