"""Held-out evaluation: the learned schedule (Dirichlet mean) against the default schedule.

Both run on the same held-out contexts (prompts x never-trained noises) at the same L, so the
comparison is paired: the table reports each mean +- standard error and the paired difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ray

from common.messages import Context, ScheduleMode
from learner.groups import RewardGroup, RolloutGroup, collect


@dataclass
class EvalResult:
    rewards: dict[str, np.ndarray]  # schedule -> [N] total reward, same contexts in the same order

    def summary(self) -> dict[str, dict[str, float]]:
        out = {name: _mean_se(r) for name, r in self.rewards.items()}
        if "default" in self.rewards:
            for name, r in self.rewards.items():
                if name != "default":
                    out[f"{name} - default"] = _mean_se(r - self.rewards["default"])
        return out

    def table(self, title: str) -> str:
        rows = [title, f"{'schedule':<22}{'reward (mean +- s.e.)':>26}"]
        for name, s in self.summary().items():
            rows.append(f"{name:<22}{s['mean']:>16.4f} +- {s['se']:.4f}")
        return "\n".join(rows)


def _mean_se(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"mean": float(x.mean()), "se": se, "n": len(x)}


def evaluate(
    rollouts: RolloutGroup,
    rewards: RewardGroup,
    contexts: list[Context],
    steps: int,
    version: int,
    weights: ray.ObjectRef,
    modes: tuple[ScheduleMode, ...] = ("default", "mean"),
) -> EvalResult:
    """Reward of each fixed schedule on ``contexts`` (one sample per context)."""
    names = {"default": "default", "mean": "learned (mean)"}
    out = {}
    for mode in modes:
        pending = rollouts.sample(contexts, 1, steps, iteration=0, version=version, weights=weights, mode=mode)
        _, scored, _ = collect(pending, rewards.score(pending))
        out[names[mode]] = rewards.combine(scored).total
    return EvalResult(out)
