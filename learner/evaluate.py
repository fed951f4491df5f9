"""Held-out evaluation: the learned schedules against the default schedule.

Every schedule runs on the same held-out contexts (prompts x never-trained noises) at the same
L, so the comparison is paired: the table reports each schedule's reward (mean +- standard
error), the paired difference to the default, and set-level metrics such as a Frechet distance
(lower is better), so that a reward that rises while the samples drift from the data (reward
hacking) is visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import ray

from common.messages import Context, ScheduleMode
from learner.groups import MetricGroup, Pending, RewardGroup, RolloutGroup, collect

DEFAULT = "default"


@dataclass
class Schedule:
    """A schedule to evaluate: the backend default, the policy's Dirichlet mean, or a fixed tau."""

    mode: ScheduleMode
    tau: list[float] | None = None


@dataclass
class EvalResult:
    rewards: dict[str, np.ndarray]  # schedule -> [N] total reward, same contexts in the same order
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # schedule -> metric -> value
    taus: dict[str, np.ndarray] = field(default_factory=dict)  # schedule -> [N, L+1] executed schedules

    def summary(self) -> dict[str, dict[str, float]]:
        out = {name: {**_mean_se(r), **self.metrics.get(name, {})} for name, r in self.rewards.items()}
        if DEFAULT in self.rewards:
            for name, r in self.rewards.items():
                if name != DEFAULT:
                    out[f"{name} - {DEFAULT}"] = _mean_se(r - self.rewards[DEFAULT])
        return out

    def table(self, title: str) -> str:
        metric_names = sorted({m for v in self.metrics.values() for m in v})
        head = f"{'schedule':<30}{'reward (mean +- s.e.)':>24}" + "".join(f"{m + ' (lower better)':>26}" for m in metric_names)
        rows = [title, head]
        for name, s in self.summary().items():
            cells = "".join(f"{s[m]:>26.3f}" if m in s else f"{'':>26}" for m in metric_names)
            rows.append(f"{name:<30}{s['mean']:>14.4f} +- {s['se']:.4f}{cells}")
        return "\n".join(rows)


def _mean_se(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"mean": float(x.mean()), "se": se, "n": len(x)}


def run_schedule(
    rollouts: RolloutGroup, contexts: list[Context], steps: int, version: int, weights: ray.ObjectRef, s: Schedule
) -> list[Pending]:
    return rollouts.sample(contexts, 1, steps, iteration=0, version=version, weights=weights, mode=s.mode, tau=s.tau)


def evaluate(
    rollouts: RolloutGroup,
    rewards: RewardGroup,
    metrics: MetricGroup | None,
    contexts: list[Context],
    steps: int,
    version: int,
    weights: ray.ObjectRef,
    schedules: dict[str, Schedule],
) -> EvalResult:
    """Reward (and set metrics) of each schedule on ``contexts``, one sample per context."""
    result = EvalResult({})
    for name, sched in schedules.items():
        pending = run_schedule(rollouts, contexts, steps, version, weights, sched)
        batches, scored, _ = collect(pending, rewards.score(pending))
        result.rewards[name] = rewards.combine(scored).total
        result.taus[name] = np.concatenate([b.tau[:, 0] for b in batches])
        if metrics is not None and metrics.names:
            result.metrics[name] = metrics.measure(pending)
    return result
