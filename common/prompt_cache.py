"""The one cache of per-prompt features: the rollout worker's policy features, a diffusers
backend's encoder outputs, a reward's text features.

Features are a pure function of the prompt (every encoder here is frozen), so caching them changes
no result; it saves an encoder forward on every repeated prompt. The cache is bounded: least
recently used prompts are evicted beyond ``max_prompts`` (0 turns caching off), so memory stays
flat however many distinct prompts a run sees (with T5 features, megabytes per prompt).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class PromptCache(Generic[T]):
    def __init__(self, encode: Callable[[list[str]], Iterable[T]], max_prompts: int):
        """``encode(prompts)`` returns one feature per prompt, in order."""
        if max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0, got {max_prompts}")
        self.encode, self.max_prompts = encode, max_prompts
        self._items: OrderedDict[str, T] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.encode_seconds = 0.0  # time spent in ``encode`` (benchmarks, logs)

    def __len__(self) -> int:
        return len(self._items)

    def _encode(self, prompts: list[str]) -> list[T]:
        t = time.perf_counter()
        out = list(self.encode(prompts))
        self.encode_seconds += time.perf_counter() - t
        if len(out) != len(prompts):
            raise ValueError(f"the encoder returned {len(out)} features for {len(prompts)} prompts")
        return out

    def get(self, prompts: Sequence[str]) -> list[T]:
        """The features of ``prompts`` (repeats allowed), in order; each new prompt is encoded once."""
        unique = list(dict.fromkeys(prompts))
        new = [p for p in unique if p not in self._items]
        self.misses += len(new)
        self.hits += len(prompts) - len(new)
        fresh = dict(zip(new, self._encode(new), strict=True)) if new else {}
        out = [self._items[p] if p in self._items else fresh[p] for p in prompts]
        if self.max_prompts:
            for p in unique:
                if p in fresh:
                    self._items[p] = fresh[p]
                self._items.move_to_end(p)
            while len(self._items) > self.max_prompts:
                self._items.popitem(last=False)
        return out
