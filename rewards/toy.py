"""The toy reward: exact log-density of a sample under its prompted class, floored.

The floor matters: without it the toy's rewards are heavy-tailed (a sample between modes scores
hundreds of nats below one on a mode), and every baseline's variance estimate is then dominated
by a few outliers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.toy import ToyMixture
from rewards.base import register


@register("toy")
class ToyReward:
    def __init__(self, floor: float = -10.0, **problem):
        """``problem``: the toy mixture's settings (the sampler's ``sampler.toy`` section)."""
        self.floor = floor
        self.mixture = ToyMixture(**problem)

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        cls = np.array([self.mixture.parse(p) for p in prompts])
        logp = self.mixture.log_density(np.asarray(images).reshape(len(prompts), -1), cls)
        return np.maximum(logp, self.floor).astype(np.float32)
