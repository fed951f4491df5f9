"""Scoring overlapped with sampling: micro-batches, completion-order collection, reward servers
balanced by readiness, images downscaled on the workers to what the rewards read, and the
guarantees kept (the same rollouts whatever the split; a resume still exact)."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.codec import read_records
from common.config import RewardSpec, load_config
from common.messages import RolloutRecord
from learner.groups import Collected, Dispatcher, Pending, RewardGroup
from learner.loop import train
from learner.metrics import read_jsonl
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ray


def _records(run_dir):
    records = read_records(run_dir / "rollouts.msgpack", RolloutRecord)
    return sorted(records, key=lambda r: (r.iteration, r.context, r.k))


def test_micro_batches_give_the_same_rollouts_and_resume_exactly(ray_local, tmp_path):
    two = {"num_workers": 2}  # the units split between them
    whole = train(load_config([], **tiny_overrides(tmp_path / "a", rollout=two)), final_eval=False)
    micro_over = tiny_overrides(tmp_path / "b", rollout={**two, "micro_batch": 1})
    micro = train(load_config([], **micro_over), final_eval=False)
    a, b = _records(whole.run_dir), _records(micro.run_dir)
    assert [(r.iteration, r.context, r.k, r.seed) for r in a] == [(r.iteration, r.context, r.k, r.seed) for r in b]
    # the draws are keyed by ids, not by the split; only float32 batch-size effects in the policy remain
    np.testing.assert_allclose([r.tau for r in a], [r.tau for r in b], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose([r.reward for r in a], [r.reward for r in b], rtol=1e-4, atol=1e-6)
    # micro-batched, a resumed run is still the uninterrupted one, bit for bit
    over = {**two, "micro_batch": 1}
    train(load_config([], **tiny_overrides(tmp_path / "c", rollout=over, learner={"iterations": 2})), final_eval=False)
    resumed = train(load_config(["--resume", "auto"], **tiny_overrides(tmp_path / "c", rollout=over)), final_eval=False)
    assert [r.tau for r in _records(resumed.run_dir)] == [r.tau for r in b]
    for k, v in micro.policy.state_dict().items():
        assert torch.equal(v, resumed.policy.state_dict()[k])


def _simulated(tmp_path, micro_batch):
    return tiny_overrides(
        tmp_path,
        sampler={
            "backend": "simulated",
            "simulated": {"preset": "tiny", "image_size": 8, "seconds_per_image_step": 0.02},
        },
        policy={"widths": [8, 8, 16, 16], "groups": 4, "attn_heads": 2, "head_hidden": 16},
        rollout={"num_workers": 2, "k": 2, "steps": 2, "contexts_per_iter": 8, "num_cpus": 0.25}
        | {"micro_batch": micro_batch},
        rewards=[{"name": "simulated", "kwargs": {"seconds_per_image": 0.02}, "num_servers": 2, "num_cpus": 0.25}],
        learner={"iterations": 3, "rollout_log": False},
    )


def test_micro_batched_scoring_overlaps_sampling(ray_local, tmp_path):
    """Each worker samples 4 contexts (0.08 s each) and each is scored in 0.04 s. One request per
    worker: every image is scored after its worker is done, nearly nothing overlaps. One context
    per request: each is scored while the next is sampled, all but the last (about 3/4). What
    comes after the last image (the scoring tail the workers wait out on policy) is a worker's 8
    images (0.16 s) in the first case, its last 2 (0.04 s) in the second."""
    overlap, tail = {}, {}
    for mb in (None, 1):
        res = train(load_config([], **_simulated(tmp_path / f"mb{mb}", mb)), final_eval=False)
        rows = [m for m in read_jsonl(res.run_dir / "metrics.jsonl") if "system/scoring_overlap" in m]
        overlap[mb] = float(np.mean([m["system/scoring_overlap"] for m in rows]))
        tail[mb] = float(np.mean([m["system/scoring_tail_s"] for m in rows]))
        assert all(0 <= m["system/collect_latency_s"] < m["system/step_seconds"] for m in rows)
    assert overlap[1] > 0.5 and overlap[None] < 0.3, overlap
    assert tail[None] > 0.12 and 0.03 < tail[1] < 0.1, tail


def test_workers_send_images_at_the_side_every_reward_reads(ray_local, tmp_path):
    probe = "tests.integration.rewards_for_tests:SideProbe"
    cfg = load_config(
        [],
        **_simulated(tmp_path, 1) | {"rewards": [{"name": probe, "kwargs": {"input_size": 4}, "num_cpus": 0.25}]},
    )
    res = train(cfg, final_eval=False)
    rows = [m for m in read_jsonl(res.run_dir / "metrics.jsonl") if f"reward/{probe}" in m]
    assert rows and all(m[f"reward/{probe}"] == 4.0 for m in rows)  # 8x8 images arrived as 4x4


def _unit(images):
    """What ``RewardGroup`` reads of a unit of work: its images (a ref) and prompts."""
    return SimpleNamespace(images=images, prompts=["a"], references=None)


def test_reward_servers_are_chosen_by_readiness(ray_local):
    group = RewardGroup([RewardSpec(name="simulated", kwargs={"seconds_per_image": 0.0}, num_servers=3, num_cpus=0.1)])
    unit = _unit(ray_local.put(np.zeros((1, 4, 4, 3), np.uint8)))
    group.chain(unit)  # at launch: with several servers, none is chosen before the images exist
    assert unit.scores == [None] and unit.servers == [-1]
    group.score(unit, load=[[2, 0, 1]])
    assert unit.servers == [1]  # the idle one
    chosen = []
    for _ in range(3):  # equally loaded: round robin
        group.chain(unit)
        group.score(unit, load=[[0, 0, 0]])
        chosen += unit.servers
    assert sorted(chosen) == [0, 1, 2]
    scores, began, ended = ray_local.get(unit.scores[0])
    assert scores.shape == (1,) and began <= ended


def test_a_unit_is_placed_by_the_calls_in_flight_besides_its_own():
    """The unit whose images just came was counted in the load it is placed by: for a reward of
    several servers a call on the last server (its server not chosen yet, -1), which held it back
    from ties; for one server, its own call, which doubled its time to score."""
    dispatcher = Dispatcher.__new__(Dispatcher)
    dispatcher.rewards = SimpleNamespace(servers=[[0, 1, 2], [0]])

    def unit(servers, got, sampled=True):
        return SimpleNamespace(sampled=object() if sampled else None, servers=servers, got=got)

    scoring = unit([1, 0], [None, None])  # in flight on server 1 of reward 0 and on reward 1's
    scored = unit([2, 0], [np.zeros(1), np.zeros(1)])  # done: no load
    sampling = unit([-1, 0], [None, None], sampled=False)  # its images do not exist yet
    new = unit([-1, 0], [None, None])  # its images just came: to be placed
    live = {"a": scoring, "b": scored, "c": sampling, "d": new}
    assert dispatcher._load(live, new) == [[0, 1, 0], [1]]


def test_one_server_is_sent_the_images_at_launch_and_scores_them_as_they_come(ray_local):
    @ray_local.remote(num_cpus=0.1)
    def late_images(seconds: float) -> np.ndarray:  # a worker still sampling
        time.sleep(seconds)
        return np.zeros((1, 4, 4, 3), np.uint8)

    group = RewardGroup([RewardSpec(name="simulated", kwargs={"seconds_per_image": 0.0}, num_cpus=0.1)])
    slow, fast = _unit(late_images.remote(5.0)), _unit(ray_local.put(np.zeros((1, 4, 4, 3), np.uint8)))
    group.chain(slow)  # sent first, at launch, with no round trip through the learner later
    group.chain(fast)
    assert slow.servers == fast.servers == [0] and None not in slow.scores + fast.scores
    sent = fast.scores[0]
    ready, _ = ray_local.wait([sent], timeout=4.0)
    # not held back by the call sent before it, whose images do not exist yet
    assert ready == [sent] and not ray_local.wait([slow.images], timeout=0)[0]
    group.score(fast, load=[[0]])  # the images exist: the call's deadline starts, nothing is sent again
    assert fast.scores[0] is sent and fast.score_deadlines[0] < math.inf
    assert ray_local.get(slow.scores[0], timeout=30)[0].shape == (1,)


def test_scoring_overlap_is_measured_against_sampling_intervals():
    def batch(start, seconds):
        return SimpleNamespace(started_at=start, seconds=seconds)

    got = Collected(
        batches=[batch(0.0, 1.0), batch(0.5, 1.0)],  # sampling covers [0, 1.5]
        scored=[],
        pending=[],
        seconds=2.0,
        faults=0,
        scoring=[(1.0, 2.0), (0.2, 0.4)],  # 0.5 of the first and all of the second overlap
    )
    assert got.scoring_overlap() == pytest.approx((0.5 + 0.2) / 1.2)
    assert np.isnan(Collected(batches=[], scored=[], pending=[], seconds=0.0, faults=0).scoring_overlap())


def test_scoring_tail_and_collect_latency_are_what_came_after_the_last_image():
    def batch(start, seconds):
        return SimpleNamespace(started_at=start, seconds=seconds)

    sampled = [batch(0.0, 1.0), batch(0.5, 1.0)]  # the last image at 1.5
    got = Collected(sampled, [], [], 2.0, 0, scoring=[(1.0, 1.4), (1.5, 1.8)], finished_at=1.85)
    assert got.scoring_tail() == pytest.approx(0.3) and got.collect_latency() == pytest.approx(0.05)
    early = Collected(sampled, [], [], 2.0, 0, scoring=[(1.0, 1.2)], finished_at=1.6)  # scored before the last image
    assert early.scoring_tail() == 0.0 and early.collect_latency() == pytest.approx(0.1)
    empty = Collected([], [], [], 0.0, 0)
    assert empty.scoring_tail() == 0.0 and np.isnan(empty.collect_latency())


def test_sampling_seconds_run_from_the_first_start_to_the_last_image_whenever_collected():
    """rollout/images_per_s divided by the collect call's wall time: one step off policy, rollouts
    launched during the update were counted from when the learner began to wait for them."""

    def batch(start, seconds):
        return SimpleNamespace(started_at=start, seconds=seconds)

    got = Collected([batch(10.0, 1.0), batch(10.25, 1.0)], [], [], seconds=0.3, faults=0)
    assert got.sampling_seconds() == pytest.approx(1.25)
    assert np.isnan(Collected([], [], [], 0.0, 0).sampling_seconds())


def test_dispatch_skew_counts_each_workers_first_request():
    def batch(worker, start):
        return SimpleNamespace(worker=worker, started_at=start, seconds=1.0)

    queued = [batch(0, 1.0), batch(0, 5.0), batch(1, 1.25)]  # worker 0's second request waited by design
    got = Collected(batches=queued, scored=[], pending=[], seconds=6.0, faults=0)
    assert got.dispatch_skew() == pytest.approx(0.25)


def test_every_sampling_call_goes_out_before_the_scoring_calls():
    """A dispatch sends every worker its request first and only then the scoring calls chained to
    them: the last worker's start does not wait for the others' scoring calls to be submitted."""
    calls: list[tuple[str, int]] = []

    def submit(request, weights, worker):
        calls.append(("sample", worker))
        return Pending(request, worker, None, None, None)

    rollouts = SimpleNamespace(alive=[0, 1, 2], submit=submit, timeout=lambda request: 10.0)
    rewards = SimpleNamespace(chain=lambda p: calls.append(("score", p.worker)))
    requests = [SimpleNamespace(request_id=f"r{i}") for i in range(5)]
    live = Dispatcher(rollouts, rewards)._launch_all(requests, weights=None)
    assert calls == [("sample", w) for w in (0, 1, 2, 0, 1)] + [("score", w) for w in (0, 1, 2, 0, 1)]
    assert list(live) == [r.request_id for r in requests]
    # a worker's second request has the time of the one queued ahead of it as well
    assert live["r3"].deadline - live["r3"].launched == pytest.approx(20.0)


def test_a_run_whose_workers_sit_idle_on_policy_says_where_the_time_goes(ray_local, tmp_path, monkeypatch, capsys):
    """Each worker samples 4 contexts x 2 images (0.48 s) in one request, and the one reward
    server scores the 16 images after them (0.03 s each: about 0.5 s the workers wait out on
    policy). After a
    few iterations the run says so, once, naming the setting; the threshold of 1 s of sampling
    that keeps the toy's and digits' runs quiet is lowered for it."""
    from learner import idle

    monkeypatch.setattr(idle, "MIN_SAMPLING_S", 0.1)
    over = _simulated(tmp_path, None)
    over["sampler"]["simulated"]["seconds_per_image_step"] = 0.03
    over["rewards"] = [{"name": "simulated", "kwargs": {"seconds_per_image": 0.03}, "num_cpus": 0.25}]
    over["learner"]["iterations"] = idle.WINDOW + 2
    train(load_config([], **over), final_eval=False)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: on policy")]
    assert len(notes) == 1, notes
    note = notes[0]
    assert (
        f"(iterations 2-{idle.WINDOW + 1}, medians: " in note
        and "(more rewards[].num_servers shorten it: simulated: 1)" in note
    )
    tail = float(note.split("scoring after the last image ")[1].split(" s")[0])
    assert 0.3 < tail < 1.0, note
    assert note.endswith("learner.pipeline: true samples the next rollouts meanwhile (docs/performance.md)")
