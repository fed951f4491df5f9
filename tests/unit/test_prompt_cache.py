"""The one prompt-feature cache: each prompt encoded once while it is kept, least recently used
evicted, and memory bounded over 10,000 distinct prompts."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.prompt_cache import PromptCache


class Counting:
    def __init__(self, nbytes: int = 8):
        self.calls: list[list[str]] = []
        self.nbytes = nbytes

    def __call__(self, prompts: list[str]) -> list[np.ndarray]:
        self.calls.append(list(prompts))
        return [np.full(self.nbytes // 8, hash(p) % 1000, dtype=np.float64) for p in prompts]


def test_each_prompt_is_encoded_once_while_kept_and_order_is_kept():
    enc = Counting()
    cache = PromptCache(enc, max_prompts=3)
    out = cache.get(["a", "b", "a"])
    assert enc.calls == [["a", "b"]] and [o[0] for o in out] == [hash(p) % 1000 for p in "aba"]
    cache.get(["b", "c"])
    assert enc.calls[-1] == ["c"] and cache.hits == 2 and cache.misses == 3
    cache.get(["d"])  # evicts the least recently used: "a"
    cache.get(["a"])
    assert enc.calls[-1] == ["a"] and len(cache) == 3


def test_zero_keeps_nothing_but_still_encodes_each_distinct_prompt_once_per_call():
    enc = Counting()
    cache = PromptCache(enc, max_prompts=0)
    cache.get(["a", "a", "b"])
    cache.get(["a"])
    assert enc.calls == [["a", "b"], ["a"]] and len(cache) == 0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abcdefgh"), max_size=6), max_size=12), st.integers(0, 5))
def test_results_equal_uncached_encoding(batches, bound):
    enc = Counting()
    cache = PromptCache(enc, max_prompts=bound)
    for prompts in batches:
        got = cache.get(prompts)
        assert [g[0] for g in got] == [hash(p) % 1000 for p in prompts]
        assert len(cache) <= bound


def test_memory_stays_bounded_over_ten_thousand_distinct_prompts():
    enc = Counting(nbytes=64 * 1024)  # 64 KiB of features per prompt
    cache = PromptCache(enc, max_prompts=64)
    tracemalloc.start()
    for i in range(0, 10_000, 50):
        cache.get([f"prompt {j}" for j in range(i, i + 50)])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(cache) == 64 and cache.misses == 10_000
    # 64 kept + one batch of 50 in flight, at 64 KiB each: about 7.3 MB; unbounded would be 655 MB
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_the_worker_keeps_at_most_its_bound(tmp_path):
    from common.config import PolicyConfig, SamplerConfig
    from rollout.worker import RolloutWorker

    w = RolloutWorker(0, SamplerConfig(backend="toy").model_dump(), PolicyConfig().model_dump(), 4, 0, prompt_cache=4)
    w._encode([f"class {c}" for c in range(10)])
    assert len(w._features) == 4


def test_a_bad_encoder_is_an_error():
    cache = PromptCache(lambda ps: [1], max_prompts=4)
    with pytest.raises(ValueError, match="returned 1 features for 2 prompts"):
        cache.get(["a", "b"])
