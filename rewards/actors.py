"""The reward side's Ray actors: RewardServer hosts one reward and scores batches of images;
MetricServer hosts one set-level evaluation metric.

The images arrive as a Ray object ref resolved by Ray itself, straight from the rollout worker
that made them: the learner never holds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from common.actors import Actor, started
from rewards.registry import build, build_metric, check_scores, limit_torch_threads, shown_prompts


class RewardServer(Actor):
    @started
    def __init__(
        self, name: str, kwargs: dict[str, Any], torch_threads: int = 1, sampler: dict[str, Any] | None = None
    ):
        """``sampler``: the run's sampler section, for a reward that declares ``uses_sampler_config``."""
        limit_torch_threads(torch_threads)  # torch is loaded by the rewards that use it, not for them
        self.name = name
        self.reward: Any = build(name, kwargs, sampler)  # a Reward, or one that also takes references=

    def needs_reference(self) -> bool:
        """Whether the reward compares with the many-step reference sample (``needs_reference``)."""
        return bool(getattr(self.reward, "needs_reference", False))

    def input_size(self) -> int | None:
        """The side the reward resizes an image's longest side to (its ``input_size``, e.g. 224
        for HPS), or None: the workers may send images downscaled to it."""
        size = getattr(self.reward, "input_size", None)
        return None if size is None else int(size)

    def score_timed(
        self, images: Any, prompts: Sequence[str], references: Any = None
    ) -> tuple[np.ndarray, float, float]:
        """``score``, with the wall-clock times (time.time()) it started and finished: the learner
        measures how much scoring overlapped sampling."""
        started = time.time()
        scores = self.score(images, prompts, references)
        return scores, started, time.time()

    def score(self, images: Any, prompts: Sequence[str], references: Any = None) -> np.ndarray:
        """Scores [N] float32; a crash, a non-finite score or a wrong shape raises, naming the reward
        and the prompt(s): the step stops and nothing reaches the policy. ``references`` (the
        many-step samples of the same contexts, or None) goes to rewards that declare
        ``needs_reference``."""
        prompts = list(prompts)
        try:
            if self.needs_reference():
                raw = self.reward(images, prompts, references=references)
            else:
                raw = self.reward(images, prompts)
        except Exception as e:  # noqa: BLE001 - re-raised with the reward and the prompts named
            raise RuntimeError(
                f"reward {self.name!r} failed on prompts {shown_prompts(prompts)}: {type(e).__name__}: {e}"
            ) from e
        return check_scores(self.name, raw, prompts)


class MetricServer(Actor):
    """Hosts one set-level evaluation metric (e.g. a Frechet distance): per-request features, then
    one distance over all of them. Images arrive as object refs, as for rewards."""

    @started
    def __init__(self, name: str, kwargs: dict[str, Any], torch_threads: int = 1):
        limit_torch_threads(torch_threads)
        self.name = name
        self.metric = build_metric(name, kwargs)

    def lower_is_better(self) -> bool:
        """Which way the metric is better: its class says (``build_metric`` checked it)."""
        return bool(self.metric.lower_is_better)

    def features(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.metric.features(images, list(prompts)))

    def distance(self, *features: np.ndarray) -> float:
        value = float(self.metric.distance(*features))
        if not np.isfinite(value):
            raise ValueError(f"metric {self.name!r} returned a non-finite value ({value})")
        return value

    def distance_with_se(
        self, *features: np.ndarray, strata: Sequence[str], resamples: int = 50, seed: int = 0
    ) -> tuple[float, float | None]:
        """The distance of one set and its sampling noise: the spread of the distance over
        ``resamples`` bootstrap resamples of the set's noises, each prompt's among its own
        (``strata``, one per row), as ``difference_with_se`` draws them (a set-level metric has
        no per-sample standard error). Resampling the rows as one pool changed each resample's
        prompt mix, which moved the distance 3.8 times as much as another draw of the noises
        did. None with fewer than 2 resamples, or a prompt of one noise."""
        rows = np.concatenate(features)
        if len(rows) != len(strata):
            raise ValueError(f"metric {self.name!r}: one row per context: {len(rows)} rows, {len(strata)} contexts")
        value = self.distance(*features)
        return value, self._within_prompts(lambda r: self.distance(rows[r]), strata, resamples, seed)

    def difference_with_se(
        self, first: int, *features: np.ndarray, strata: Sequence[str], resamples: int = 50, seed: int = 0
    ) -> tuple[float, float | None]:
        """distance(A) - distance(B), where ``features[:first]`` are A's and the rest B's, row i
        of both the same context (same prompt, same noise), and its bootstrap noise, paired: each
        resample takes the same rows of A and of B, drawn among each prompt's own (``strata``, one
        per row), so the prompt mix the distance is measured on stays the held-out set's. The
        noise the two sets share cancels, where the two ``distance_with_se`` +-s count it twice.
        Whole prompts are not resampled: a distance to a fixed reference is not a sum over
        prompts, and a resampled mix (three sevens, no two) moves both distances far more than
        the schedules do. None with fewer than 2 resamples, or a prompt of one noise (nothing of
        its noise to resample)."""
        a, b = np.concatenate(features[:first]), np.concatenate(features[first:])
        if not len(a) == len(b) == len(strata):
            raise ValueError(
                f"metric {self.name!r}: a paired difference needs one row per context of both:"
                f" {len(a)} and {len(b)} rows, {len(strata)} contexts"
            )
        value = self.distance(a) - self.distance(b)
        return value, self._within_prompts(lambda r: self.distance(a[r]) - self.distance(b[r]), strata, resamples, seed)

    @staticmethod
    def _within_prompts(
        statistic: Callable[[np.ndarray], float], strata: Sequence[str], resamples: int, seed: int
    ) -> float | None:
        """The bootstrap spread of ``statistic(rows)``, each resample drawing every prompt's rows
        among its own. Drawing m rows among m shrinks a variance by (m - 1) / m (by half at two
        noises a prompt): the spread is scaled back by sqrt(m / (m - 1)), exact for a linear
        statistic where every prompt has m noises, as an evaluation's do. None with fewer than 2
        resamples, or a prompt of one noise (nothing of its noise to resample)."""
        labels = np.unique(np.asarray(strata), return_inverse=True)[1]
        members = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
        if resamples < 2 or min(len(m) for m in members) < 2:
            return None
        rng = np.random.default_rng(seed)
        boot = [
            statistic(np.concatenate([m[rng.integers(0, len(m), len(m))] for m in members])) for _ in range(resamples)
        ]
        per_prompt = len(labels) / len(members)
        return float(np.std(boot, ddof=1) * np.sqrt(per_prompt / (per_prompt - 1)))
