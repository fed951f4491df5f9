"""RewardServer: hosts one reward and scores batches of images (a Ray actor in a run).

The images arrive as a Ray object ref resolved by Ray itself, straight from the rollout worker
that made them: the learner never holds them.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from rewards.base import build, check_scores


class RewardServer:
    def __init__(self, name: str, kwargs: dict[str, Any], torch_threads: int = 1):
        import torch

        torch.set_num_threads(torch_threads)
        self.name = name
        self.reward = build(name, kwargs)

    def score(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        """Scores [N] float32; a non-finite score or a wrong shape raises, naming reward and prompt."""
        return check_scores(self.name, self.reward(images, list(prompts)), prompts)

    def pid(self) -> int:
        return os.getpid()
