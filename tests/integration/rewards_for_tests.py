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


class BadImageReward:
    """For the HTTP server tests: 0 per image, NaN for the prompt 'nan please', a crash for 'crash please'."""

    def __call__(self, images, prompts):
        if "crash please" in prompts:
            raise RuntimeError("deliberate crash")
        return np.array([np.nan if p == "nan please" else 0.0 for p in prompts], dtype=np.float32)


class EnvScale:
    """Scores every sample with the float in $STEINSCHED_TEST_SCALE: set only by its runtime_env."""

    def __call__(self, images, prompts):
        import os

        return np.full(len(prompts), float(os.environ["STEINSCHED_TEST_SCALE"]), dtype=np.float32)


class CrashOnClass7:
    """Raises on a batch holding 'class 7': the step must stop with the reward and prompts named."""

    def __call__(self, images, prompts):
        if "class 7" in prompts:
            raise KeyError("no model for class 7")
        return np.zeros(len(prompts), dtype=np.float32)
