"""The one-time note on where an on-policy iteration's time goes beyond sampling."""

from __future__ import annotations

import math

from learner.idle import MIN_SAMPLING_S, THRESHOLD, WINDOW, IdleNote


def _feed(note: IdleNote, rows: list[tuple[float, float, float, float]]) -> list[str]:
    said = [note.add(i + 1, *row) for i, row in enumerate(rows)]
    return [s for s in said if s is not None]


def test_idle_workers_are_said_once_with_the_medians_and_the_settings():
    note = IdleNote({"hps": 1, "clip": 2}, "cpu")
    first = (30.0, 2.0, 0.5, 1.2)  # loading and warm-up: not judged
    rows = [first] + [(3.0, 2.0, 0.5, 0.4), (3.2, 2.1, 0.6, 0.4), (2.8, 1.9, 0.5, 0.3), (3.0, 2.0, 0.4, 0.4)] * 3
    (said,) = _feed(note, rows)
    assert said == (
        "note: on policy, the rollout workers sat idle for 33% of each iteration (iterations 2-5, medians: 3.00 s,"
        " of which sampling 2.00 s): scoring after the last image 0.50 s (more rewards[].num_servers shorten it:"
        " hps: 1, clip: 2), the learner's step 0.40 s (learner.device is the CPU: on a GPU it takes milliseconds),"
        " the rest 0.10 s (results back, logging, checkpoints). learner.pipeline: true samples the next rollouts"
        " meanwhile (docs/performance.md)"
    )
    assert len(rows) > WINDOW + 1 and note.add(len(rows) + 1, *rows[1]) is None, "and never again"


def test_busy_workers_fast_samplers_and_unknown_times_say_nothing():
    busy = [(2.1, 2.0, 0.05, 0.01)] * (WINDOW + 3)  # 5% idle
    assert THRESHOLD > 0.05 and _feed(IdleNote({"hps": 1}, "cuda"), busy) == []
    toy = [(0.04, 0.01, 0.005, 0.02)] * (WINDOW + 3)  # the toy: 75% idle, but milliseconds of sampling
    assert MIN_SAMPLING_S > 0.01 and _feed(IdleNote({"toy": 1}, "cpu"), toy) == []
    unknown = [(3.0, math.nan, 0.5, 0.4)] * (WINDOW + 3)  # no batch came back with a time
    assert _feed(IdleNote({"hps": 1}, "cpu"), unknown) == []


def test_a_gpu_learner_is_not_told_to_move_to_a_gpu():
    rows = [(4.0, 2.0, 1.5, 0.01)] * (WINDOW + 1)
    (said,) = _feed(IdleNote({"hps": 1}, "cuda"), rows)
    assert "idle for 50%" in said and "the learner's step 0.01 s, the rest 0.49 s" in said
    assert "learner.device" not in said
