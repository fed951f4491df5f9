"""A bounded per-prompt cache of text features: a run scores the same prompts again and again.

Text features are a pure function of the prompt (the reward's model is frozen), so caching them
changes no score; it saves the text tower's forward on every repeated prompt.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class PromptCache:
    def __init__(self, encode: Callable[[list[str]], torch.Tensor], max_prompts: int = 4096):
        """``encode(prompts) -> [P, D]``; ``max_prompts=0`` turns caching off."""
        self.encode = encode
        self.max_prompts = max_prompts
        self._feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.encode_seconds = 0.0  # time spent in ``encode`` (benchmarks, logs)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        t = time.perf_counter()
        out = self.encode(prompts)
        self.encode_seconds += time.perf_counter() - t
        return out

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """Features [N, D] for ``prompts`` (repeats allowed); each new prompt is encoded once."""
        import torch

        if self.max_prompts == 0:
            unique = list(dict.fromkeys(prompts))
            feats = dict(zip(unique, self._encode(unique), strict=True))
            self.misses += len(unique)
            return torch.stack([feats[p] for p in prompts])
        new = [p for p in dict.fromkeys(prompts) if p not in self._feats]
        self.misses += len(new)
        self.hits += len(prompts) - len(new)
        if new:
            for p, f in zip(new, self._encode(new), strict=True):
                self._feats[p] = f
        out = torch.stack([self._feats[p] for p in prompts])
        for p in dict.fromkeys(prompts):
            self._feats.move_to_end(p)
        while len(self._feats) > self.max_prompts:
            self._feats.popitem(last=False)
        return out
