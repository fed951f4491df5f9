"""Held-out evaluation: the learned schedules against the default schedule.

Every schedule runs on the same held-out contexts (prompts x never-trained noises) at the same
L, so the comparison is paired: the table reports each schedule's reward (mean +- standard
error), the paired difference to the default, and set-level metrics such as a Frechet distance
(lower is better), so that a reward that rises while the samples drift from the data (reward
hacking) is visible. Standard errors are clustered by prompt (``learner.stats``): the noises of
one prompt are not independent draws of what the table generalises over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import ray

from common.messages import Context, ScheduleMode
from learner.groups import Collected, Dispatcher, MetricGroup
from learner.stats import mean_se

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
    prompts: list[str] | None = None  # [N] each context's prompt: the clusters of the standard errors

    def summary(self) -> dict[str, dict[str, float]]:
        out = {name: {**mean_se(r, self.prompts), **self.metrics.get(name, {})} for name, r in self.rewards.items()}
        if DEFAULT in self.rewards:
            for name, r in self.rewards.items():
                if name != DEFAULT:
                    out[f"{name} - {DEFAULT}"] = mean_se(r - self.rewards[DEFAULT], self.prompts)
        return out

    def table(self, title: str) -> str:
        metric_names = sorted({m for v in self.metrics.values() for m in v if not m.endswith("_se")})
        head = f"{'schedule':<34}{'reward (mean +- s.e.)':>25}" + "".join(
            f"{m + ' (lower better)':>26}" for m in metric_names
        )
        rows = [title, head]
        for name, s in self.summary().items():
            cells = "".join(_metric_cell(s, m) for m in metric_names)
            rows.append(f"{name:<34}{s['mean']:>12.5g} +- {s['se']:<9.2g}{cells}".rstrip())
        rows.append(
            "(+- one standard error, clustered by prompt; differences are paired: same prompts and noises;"
            " a set metric's +- is its bootstrap noise)"
        )
        return "\n".join(rows)


def _metric_cell(s: dict[str, float], m: str) -> str:
    if m not in s:
        return f"{'':>26}"
    text = f"{s[m]:.3f}" + (f" +- {s[m + '_se']:.2f}" if m + "_se" in s else "")
    return f"{text:>26}"


def run_schedule(
    dispatcher: Dispatcher, contexts: list[Context], steps: int, version: int, weights: ray.ObjectRef, s: Schedule
) -> Collected:
    requests = dispatcher.rollouts.requests(contexts, 1, steps, iteration=0, version=version, mode=s.mode, tau=s.tau)
    return dispatcher.run(requests, weights)


def evaluate(
    dispatcher: Dispatcher,
    metrics: MetricGroup | None,
    contexts: list[Context],
    steps: int,
    version: int,
    weights: ray.ObjectRef,
    schedules: dict[str, Schedule],
) -> EvalResult:
    """Reward (and set metrics) of each schedule on ``contexts``, one sample per context."""
    result = EvalResult({}, prompts=[c.prompt for c in contexts])
    for name, sched in schedules.items():
        got = run_schedule(dispatcher, contexts, steps, version, weights, sched)
        result.rewards[name] = dispatcher.rewards.combine(got.scored).total
        result.taus[name] = np.concatenate([b.tau[:, 0] for b in got.batches])
        if metrics is not None and metrics.names:
            result.metrics[name] = metrics.measure(got.pending)
    return result
