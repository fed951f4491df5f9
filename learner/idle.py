"""Where an on-policy iteration's time goes beyond sampling, said once, with the settings that
shorten it.

On policy the rollout workers wait while the last images are scored, the results come back, the
learner updates and the weights go out (docs/performance.md). The run's metrics hold each part
(``system/scoring_tail_s``, ``system/learner_seconds``, ...), but a run that spends a quarter of
every GPU-hour there should say so where the operator looks: once, after a few iterations, naming
the part and its setting.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

#: Iterations the note looks at, after the run's first (which loads and warms up).
WINDOW = 4
#: Iterations whose workers sample for less than this many seconds are not judged: their time
#: beyond sampling is the loop's fixed cost (the toy's and digits' milliseconds), not a setting's.
MIN_SAMPLING_S = 1.0
#: The share of an iteration outside sampling above which the note is given.
THRESHOLD = 0.10


@dataclass
class IdleNote:
    """Fed each iteration's times (``add``); after ``WINDOW`` + 1 iterations, returns the note
    once where the workers sat idle for more than ``THRESHOLD`` of an iteration (medians over
    the window), else nothing, ever after."""

    reward_servers: dict[str, int]  # each reward's label -> its num_servers
    learner_device: str  # the learner's torch device type ("cpu", "cuda")
    _seen: list[dict[str, float]] = field(default_factory=list)
    _done: bool = False

    def add(self, iteration: int, step_s: float, sampling_s: float, tail_s: float, learner_s: float) -> str | None:
        if self._done:
            return None
        self._seen.append(
            {"it": iteration, "step": step_s, "sampling": sampling_s, "tail": tail_s, "learner": learner_s}
        )
        if len(self._seen) < WINDOW + 1:
            return None
        self._done = True
        window = self._seen[1:]
        med = {k: statistics.median(row[k] for row in window) for k in ("step", "sampling", "tail", "learner")}
        if not all(math.isfinite(v) for v in med.values()) or med["sampling"] < MIN_SAMPLING_S:
            return None
        idle = max(0.0, med["step"] - med["sampling"])
        if idle <= THRESHOLD * med["step"]:
            return None
        servers = ", ".join(f"{name}: {n}" for name, n in self.reward_servers.items())
        scoring = f"scoring after the last image {med['tail']:.2f} s (more rewards[].num_servers shorten it: {servers})"
        learner = f"the learner's step {med['learner']:.2f} s" + (
            " (learner.device is the CPU: on a GPU it takes milliseconds)" if self.learner_device == "cpu" else ""
        )
        rest = max(0.0, idle - med["tail"] - med["learner"])
        first, last = int(window[0]["it"]), int(window[-1]["it"])
        return (
            f"note: on policy, the rollout workers sat idle for {idle / med['step']:.0%} of each iteration"
            f" (iterations {first}-{last}, medians: {med['step']:.2f} s, of which sampling {med['sampling']:.2f} s):"
            f" {scoring}, {learner}, the rest {rest:.2f} s (results back, logging, checkpoints). learner.pipeline:"
            " true samples the next rollouts meanwhile (docs/performance.md)"
        )
