"""Fault tests on a real local Ray cluster with the toy backend: actors are SIGKILLed mid-run,
and the run must end with exactly the weights of a fault-free run, every rollout used once."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from common.codec import read_records
from common.config import load_config
from common.messages import RolloutRecord
from learner import loop
from learner.groups import AttemptsSpent, WorkersLost
from learner.loop import train
from learner.metrics import read_jsonl
from tests.conftest import actors_now, final_weights, live_pids, same_weights, tiny_overrides

pytestmark = pytest.mark.ray

ITERS, C, K = 30, 4, 2


class Killer(threading.Thread):
    """SIGKILLs a live actor of ``class_name`` every ``every_s`` seconds, ``kills`` times."""

    def __init__(self, class_name: str, kills: int, every_s: float, first_after_s: float = 1.0, when=None):
        super().__init__(daemon=True)
        self.class_name, self.kills, self.every_s, self.first_after_s = class_name, kills, every_s, first_after_s
        self.when = when or (lambda: True)  # start killing once this holds (e.g. training has begun)
        self.done: list[int] = []
        self.stop = threading.Event()
        # only actors of the run about to start: an earlier run's may still be alive (until collected)
        self.before = actors_now()

    def run(self) -> None:
        time.sleep(self.first_after_s)
        while not self.when() and not self.stop.is_set():
            time.sleep(0.05)
        while len(self.done) < self.kills and not self.stop.is_set():
            pids = [p for p in live_pids(self.class_name, self.before) if p not in self.done]
            if pids:
                pid = pids[len(self.done) % len(pids)]
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.done.append(pid)
                except ProcessLookupError:
                    pass
            self.stop.wait(self.every_s)


def training_started(run_dir, rows: int = 2):
    """A ``Killer.when`` that holds once the run in ``run_dir`` has logged ``rows`` metric rows:
    faults then land mid-training however fast the machine runs the toy."""
    log = run_dir / "metrics.jsonl"
    return lambda: log.exists() and len(log.read_text().splitlines()) >= rows


def _run(tmp_path, name, **sections):
    over = tiny_overrides(tmp_path, experiment={"name": name, "seed": 0, "output_dir": str(tmp_path)}, **sections)
    over["learner"] = {**over["learner"], "iterations": ITERS, "checkpoint_every": 10}
    rollout = {"num_workers": 2, **sections.get("rollout", {}), "contexts_per_iter": C, "k": K}  # one killed, one on
    over["rollout"] = {**over["rollout"], **rollout}
    return train(load_config([], **over))


def _assert_every_rollout_once(run_dir):
    recs = list(read_records(run_dir / "rollouts.msgpack", RolloutRecord))
    ids = [(r.iteration, r.context, r.k) for r in recs]
    assert len(ids) == ITERS * C * K and len(set(ids)) == len(ids), "a rollout was lost or used twice"


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    res = _run(tmp_path_factory.mktemp("ref"), "ref")
    return final_weights(res.run_dir)


@pytest.mark.parametrize("victim", ["RolloutWorker", "RewardServer"])
def test_killed_actors_change_nothing(ray_local, reference, tmp_path, victim, capfd):
    killer = Killer(victim, kills=3, every_s=1.0, first_after_s=0.0, when=training_started(tmp_path / "faulty"))
    killer.start()
    try:
        res = _run(tmp_path, "faulty", rollout={"max_restarts": 5})
    finally:
        killer.stop.set()
        killer.join()
    faults = sum(m.get("system/faults", 0) for m in read_jsonl(res.run_dir / "metrics.jsonl"))
    print(f"\n{victim}: injected {len(killer.done)} SIGKILLs, the learner saw {faults:.0f} failed requests")
    assert len(killer.done) >= 2, "the faults were injected too late to matter"
    _assert_every_rollout_once(res.run_dir)
    w = final_weights(res.run_dir)
    assert same_weights(reference, w), "faults changed the trained weights"
    # the scoring calls of the attempts given up are read and dropped: Ray printed each as an
    # "Unhandled error" traceback on the terminal, over faults the run survived
    assert "Unhandled error" not in capfd.readouterr().err


def test_the_calls_of_an_attempt_given_up_are_read_as_they_end(ray_local):
    """A unit re-sent after a fault leaves the scoring calls of its first attempt, which fail (their
    images died with the worker): Ray printed them, unread, as "Unhandled error" tracebacks on
    the terminal (the run's own check is in test_killed_actors_change_nothing). They are kept
    and read as they end; a call still under way is kept until it ends."""
    from types import SimpleNamespace

    from learner.groups import Dispatcher

    @ray_local.remote(num_cpus=0.1)
    def images_of_a_dead_worker():
        raise ray_local.exceptions.ActorUnavailableError("the worker is gone", None)

    @ray_local.remote(num_cpus=0.1)
    def score(images, seconds=0.0):
        time.sleep(seconds)
        return images

    dispatcher = Dispatcher.__new__(Dispatcher)
    dispatcher._abandoned = []
    failed, slow, done = score.remote(images_of_a_dead_worker.remote()), score.remote(1, 3.0), score.remote(1)
    ray_local.wait([failed, done], num_returns=2, timeout=30)
    dispatcher._abandon(SimpleNamespace(scores=[failed, slow, done, None], got=[None, None, 1.0, None]))
    assert dispatcher._abandoned == [slow], "those over are read at once; a scored one is not the attempt's to drop"
    dispatcher._drop(timeout_s=30)
    assert dispatcher._abandoned == []


def test_all_workers_dead_is_a_clear_error_not_a_hang(ray_local, tmp_path):
    killer = Killer(
        "RolloutWorker",
        kills=2,
        every_s=0.2,
        first_after_s=0.0,
        when=training_started(tmp_path / "t", rows=0),
    )
    killer.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(WorkersLost, match="rollout workers are alive"):
            over = tiny_overrides(tmp_path, rollout={"num_workers": 2, "max_restarts": 0, "restart_timeout_s": 20.0})
            over["learner"] = {**over["learner"], "iterations": 100000}
            train(load_config([], **over))
    finally:
        killer.stop.set()
        killer.join()
    print(f"\nall workers dead: injected {len(killer.done)} SIGKILLs, stopped after {time.perf_counter() - t0:.1f} s")
    assert time.perf_counter() - t0 < 120
    ckpts = sorted((tmp_path / "t" / "checkpoints").glob("ckpt-*"))
    assert ckpts, "the run stops only after writing a checkpoint"


def _dying_reward(tmp_path, told, **learner):
    over = tiny_overrides(
        tmp_path,
        rewards=[{"name": "tests.integration.rewards_for_tests:DiesWhenTold", "kwargs": {"told": str(told)}}],
        rollout={"max_attempts": 2, "max_restarts": 10},
    )
    over["learner"] = {**over["learner"], **learner}
    return load_config([], **over)


def test_a_unit_that_fails_on_every_try_is_one_line_naming_it(ray_local, tmp_path, capsys):
    """A unit whose reward server died on every try stopped the run with 'request <id> failed 2
    times; last error: ' and Ray's message of the death over several lines (class, actor id, pid,
    ...), said to be 'too few live actors' though every actor was back."""
    told = tmp_path / "die"
    told.touch()
    with pytest.raises(AttemptsSpent) as e:
        train(_dying_reward(tmp_path, told))
    said = str(e.value)
    assert "\n" not in said and said.startswith("prompts ['class ")
    assert " failed 2 times (rollout.max_attempts; " in said
    assert "the last on reward 'tests.integration.rewards_for_tests:DiesWhenTold': Actor" in said
    assert "stopping: a unit failed on every try; checkpoint" in capsys.readouterr().out


def test_a_unit_that_fails_on_every_try_in_an_evaluation_keeps_what_was_learned(ray_local, tmp_path, monkeypatch):
    """Actors lost in a mid-run evaluation (learner.eval_every) stopped the run without the
    checkpoint a step writes: the iterations since the last one were lost."""
    told = tmp_path / "die"
    real = loop.evaluate

    def evaluate_then_die(*args, **kwargs):
        told.touch()  # the reward dies from the evaluation on
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate_then_die)
    with pytest.raises(AttemptsSpent):
        train(_dying_reward(tmp_path, told, iterations=4, checkpoint_every=100, eval_every=3))
    assert sorted(p.name for p in (tmp_path / "t" / "checkpoints").glob("ckpt-*")) == ["ckpt-00000003"]
