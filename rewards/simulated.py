"""The simulated reward: the cost of a real one (``seconds_per_image``, sleeping) and a
deterministic score of the image (its mean brightness), for capacity planning with the simulated
backend (`bench/overhead.py`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from rewards.images import as_uint8_images
from rewards.registry import register


@register("simulated")
class SimulatedReward:
    def __init__(self, seconds_per_image: float = 0.004, seconds_per_call: float = 0.0, input_size: int | None = 224):
        """``input_size``: the side it declares (as HPS does, 224): the workers send images no
        larger (None: full size)."""
        if seconds_per_image < 0 or seconds_per_call < 0:
            raise ValueError("simulated reward: costs must be >= 0 seconds")
        if input_size is not None and input_size < 1:
            raise ValueError(f"simulated reward: input_size must be >= 1 or None, got {input_size}")
        self.seconds_per_image, self.seconds_per_call = seconds_per_image, seconds_per_call
        self.input_size = input_size

    def __call__(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        arrs = as_uint8_images(images)
        time.sleep(self.seconds_per_call + self.seconds_per_image * len(prompts))
        return np.array([a.mean() / 255.0 for a in arrs], dtype=np.float32)
