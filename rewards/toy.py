"""The toy reward: exact log-density of a sample under its prompted class, floored.

The floor matters: without it the toy's rewards are heavy-tailed (a sample between modes scores
hundreds of nats below one on a mode), and every baseline's variance estimate is then dominated
by a few outliers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.toy import ToyMixture
from rewards.registry import register


@register("toy")
class ToyReward:
    backends = ("toy",)  # the toy's vectors, scored against its mixture
    #: the reward server hands it the run's sampler section: it scores against the sampler's mixture
    uses_sampler_config = True
    #: the mixture's settings: the sampler's in a run (refused in the reward's kwargs there)
    sampler_owned = ("dim", "num_classes", "modes_per_class", "mode_scale", "spread", "seed")

    def __init__(
        self,
        sampler: dict[str, Any] | None = None,
        floor: float = -10.0,
        *,
        dim: int | None = None,
        num_classes: int | None = None,
        modes_per_class: int | None = None,
        mode_scale: float | None = None,
        spread: float | None = None,
        seed: int | None = None,
    ):
        """``sampler``: the run's sampler section (given by the reward server), whose ``toy``
        settings define the mixture the reward scores against: the sampler's own. Without one (a
        reward built on its own), the mixture's settings are given here (unset ones keep
        ``ToyMixture``'s defaults). Written out, so a misspelt one is refused before a run starts."""
        settings = (dim, num_classes, modes_per_class, mode_scale, spread, seed)
        given: dict[str, Any] = {k: v for k, v in zip(self.sampler_owned, settings, strict=True) if v is not None}
        if sampler is not None:
            if sampler.get("backend") != "toy":
                raise ValueError(
                    f"the toy reward scores the toy backend's samples; sampler.backend is {sampler.get('backend')!r}"
                )
            if given:
                raise ValueError(
                    f"the toy reward scores against the sampler's own mixture: set {sorted(given)} in sampler.toy,"
                    " not in the reward's kwargs"
                )
            given = {k: v for k, v in sampler["toy"].items() if k not in ("token_len", "token_dim")}
        self.floor = floor
        self.mixture = ToyMixture(**given)

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        cls = np.array([self.mixture.parse(p) for p in prompts])
        logp = self.mixture.log_density(np.asarray(images).reshape(len(prompts), -1), cls)
        return np.maximum(logp, self.floor).astype(np.float32)
