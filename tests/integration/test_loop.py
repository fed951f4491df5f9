"""The learner loop on a real local Ray cluster with the toy backend, on a tiny budget."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import ray

from common.codec import read_records
from common.config import load_config
from common.messages import RolloutRecord
from common.policy import SchedulePolicy
from learner import baselines, evaluate
from learner.groups import StepFailed
from learner.loop import train
from learner.main import run
from learner.metrics import read_jsonl
from tests.conftest import actors_now, final_weights, left_alive, same_weights, tiny_overrides

pytestmark = pytest.mark.ray

SLOW = "tests.integration.rewards_for_tests:SlowStart"


def _run(tmp_path, argv=(), **sections):
    cfg = load_config(list(argv), **tiny_overrides(tmp_path, **sections))
    return cfg, train(cfg)


def test_tiny_run_writes_everything(ray_local, tmp_path):
    cfg, res = _run(tmp_path)
    run = res.run_dir
    C, K, iters = 4, 2, 3
    assert res.version == iters
    metrics = read_jsonl(run / "metrics.jsonl")
    train_rows = [m for m in metrics if "learner/pg_loss" in m]
    assert [m["step"] for m in train_rows] == [1, 2, 3]
    for key in ("rollout/reward_mean", "rollout/images_per_s", "baseline/alpha", "learner/grad_norm", "policy/entropy"):
        assert all(np.isfinite(m[key]) for m in train_rows), key
    # on-policy: the learner's recomputed log-probs equal the workers' behaviour log-probs up to
    # float32 batch-size effects in the policy (~1e-7); stale weights would show as O(1e-2)
    assert max(m["learner/logp_drift"] for m in train_rows) < 1e-4

    recs = list(read_records(run / "rollouts.msgpack", RolloutRecord))
    assert len(recs) == iters * C * K
    assert len({(r.iteration, r.context, r.k) for r in recs}) == len(recs)
    assert all(r.version == r.iteration for r in recs)
    assert sorted({r.context for r in recs}) == list(range(iters * C))
    # the logged advantages are r - b with the configured (js) baseline, per iteration
    for it in range(iters):
        rows = sorted((r for r in recs if r.iteration == it), key=lambda r: (r.context, r.k))
        R = np.array([r.reward for r in rows]).reshape(C, K)
        b, _ = baselines.compute("js", R)
        np.testing.assert_allclose([r.baseline for r in rows], b.ravel(), rtol=1e-12)
        np.testing.assert_allclose([r.advantage for r in rows], (R - b).ravel(), rtol=1e-12, atol=1e-12)
        for r in rows:
            assert len(r.tau) == 4 and abs(sum(r.tau) - 1) < 1e-9

    assert (run / "config.yaml").is_file() and (run / "tb").is_dir()
    assert (run / "checkpoints" / "latest").read_text().strip() == "ckpt-00000003"
    summary = json.loads((run / "eval.json").read_text())
    assert {"default", "learned instance-level", "learned instance-level - default"} <= set(summary)
    assert summary["default"]["n"] == 10 * 4  # 10 eval prompts x 4 seeds
    assert not _dispatch_threads(), "the run left its dispatch thread behind"


def test_resume_is_exact(ray_local, tmp_path):
    """Stop after 2 iterations, resume the same run to 4: bit-identical to the uninterrupted run."""
    _, a = _run(tmp_path / "a", learner={"iterations": 4, "checkpoint_every": 2})
    _run(tmp_path / "c", learner={"iterations": 2, "checkpoint_every": 2})
    _, c = _run(tmp_path / "c", ["--resume", "auto"], learner={"iterations": 4, "checkpoint_every": 2})
    wa, wc = final_weights(a.run_dir), final_weights(c.run_dir)
    assert same_weights(wa, wc)
    # and the weights did move after the checkpoint: the test would notice a resume that skipped the updates
    assert not same_weights(wa, final_weights(a.run_dir / "checkpoints" / "ckpt-00000002"))


def test_the_global_baseline_and_the_policy_train_on_the_same_actors(ray_local, tmp_path):
    """learner.main trains the global baseline, then the policy, on one set of rollout workers and
    reward servers (a sampler's weights and a reward model load once), each on policy, and the
    global run as it is on actors of its own."""
    from ray._private import state

    before = actors_now()
    cfg = load_config([], **tiny_overrides(tmp_path / "shared", learner={"global_baseline": True}))
    run(cfg)
    started = sorted(a["ActorClassName"] for aid, a in state.actors().items() if aid not in before)
    assert started == ["RewardServer", "RolloutWorker"], "one set of actors for both"
    assert left_alive(before) == [], "the run stops the actors it started when it ends"
    for run_dir in (cfg.run_dir / "global", cfg.run_dir):
        rows = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "learner/pg_loss" in m]
        assert len(rows) == 3 and max(m["learner/logp_drift"] for m in rows) < 1e-4, run_dir
    assert "learned global" in json.loads((cfg.run_dir / "eval.json").read_text())
    alone = tiny_overrides(tmp_path / "alone", policy={"variant": "global"}, learner={"lr": cfg.learner.global_lr})
    res = train(load_config([], **alone), final_eval=False)
    assert same_weights(final_weights(cfg.run_dir / "global"), final_weights(res.run_dir))


def test_custom_reward_by_import_path_trains(ray_local, tmp_path):
    spec = [{"name": "tests.integration.rewards_for_tests:NegativeNorm", "kwargs": {"scale": 2.0}, "num_cpus": 0.5}]
    _, res = _run(tmp_path, rewards=spec, learner={"iterations": 2})
    rows = [m for m in read_jsonl(res.run_dir / "metrics.jsonl") if "learner/pg_loss" in m]
    assert all(m["reward/tests.integration.rewards_for_tests:NegativeNorm"] < 0 for m in rows)


def _dispatch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("steinsched-dispatch")]


def test_non_finite_reward_stops_the_step(ray_local, tmp_path):
    spec = [{"name": "tests.integration.rewards_for_tests:NanForClass3", "num_cpus": 0.5}]
    before = actors_now()
    with pytest.raises(StepFailed, match=r"^reward '.*NanForClass3' raised ValueError: .*non-finite.*'class 3'") as e:
        _run(tmp_path, rewards=spec, rollout={"contexts_per_iter": 10})
    assert isinstance(e.value.__cause__, ray.exceptions.RayTaskError)
    assert "\n" not in str(e.value) and str(e.value).endswith("; the step stopped, nothing of it used")
    assert not _dispatch_threads(), "a run that stopped left its dispatch thread behind"
    assert left_alive(before) == [], "a run that stopped left its actors holding the cluster"
    # the step stopped before any update: no metrics row, no checkpoint
    assert not (tmp_path / "t" / "metrics.jsonl").exists() or not read_jsonl(tmp_path / "t" / "metrics.jsonl")
    assert not (tmp_path / "t" / "checkpoints").exists()


def test_k_schedule_raises_k_from_its_iteration(ray_local, tmp_path):
    cfg = load_config([], **tiny_overrides(tmp_path, rollout={"k_schedule": {2: 3}}))
    assert [cfg.rollout.k_at(i) for i in range(4)] == [2, 2, 3, 3]
    train(cfg, final_eval=False)
    records = list(read_records(cfg.run_dir / "rollouts.msgpack", RolloutRecord))
    per_iteration = {it: sorted({r.k for r in records if r.iteration == it}) for it in range(3)}
    assert per_iteration == {0: [0, 1], 1: [0, 1], 2: [0, 1, 2]}
    assert len(records) == 4 * 2 + 4 * 2 + 4 * 3


def test_concentration_schedule_reaches_workers_and_learner_alike(ray_local, tmp_path):
    """The cap changes at its iteration on the workers (which draw) and in the learner (which
    recomputes log-probs) together: the update stays exactly on-policy throughout."""
    cfg = load_config(
        [],
        **tiny_overrides(
            tmp_path,
            policy={"max_concentration": 3.0, "concentration_schedule": {2: 1000.0}},
            learner={"iterations": 4},
        ),
    )
    res = train(cfg, final_eval=False)
    rows = [m for m in read_jsonl(res.run_dir / "metrics.jsonl") if "learner/pg_loss" in m]
    conc = [m["policy/concentration"] for m in rows]
    assert conc[0] == pytest.approx(3.0, rel=1e-5) and conc[1] == pytest.approx(3.0, rel=1e-5)
    assert min(conc[2:]) > 10.0  # the init's concentration (20), no longer capped
    assert max(m["learner/logp_drift"] for m in rows) < 1e-6
    assert SchedulePolicy.from_pretrained(res.run_dir / "policy").max_concentration == 1000.0


@pytest.mark.gpu
def test_learner_and_workers_run_the_policy_on_cuda(ray_local, tmp_path):
    """learner.device and rollout.policy_device on the GPU: the same run as on the CPU up to float
    differences between devices, still on-policy."""
    gpu = {"num_gpus": 0.25, "policy_device": "cuda"}
    cpu_cfg = load_config([], **tiny_overrides(tmp_path / "cpu"))
    gpu_cfg = load_config([], **tiny_overrides(tmp_path / "gpu", rollout=gpu, learner={"device": "cuda"}))
    a, b = train(cpu_cfg, final_eval=False), train(gpu_cfg, final_eval=False)
    assert next(b.policy.parameters()).is_cuda
    rows = [m for m in read_jsonl(b.run_dir / "metrics.jsonl") if "learner/pg_loss" in m]
    assert max(m["learner/logp_drift"] for m in rows) < 1e-3
    first = [r for r in read_records(a.run_dir / "rollouts.msgpack", RolloutRecord) if r.iteration == 0]
    again = [r for r in read_records(b.run_dir / "rollouts.msgpack", RolloutRecord) if r.iteration == 0]
    np.testing.assert_allclose([r.tau for r in first], [r.tau for r in again], rtol=1e-2, atol=1e-4)


def test_workers_build_their_samplers_while_the_rewards_load(ray_local, tmp_path):
    """A reward model that takes long to load does not hold the rollout workers back: they start
    with the reward servers and have built their samplers before the reward is loaded, so that a
    run starts in the longer of the two loads, not their sum (a Flux worker's weights and an HPS
    model each take their minute on a cluster). An evaluation of the run (``python -m
    learner.evaluate``) started its rewards, then its metrics, then its workers, one after the
    other: it starts them together too.

    Here the reward loads until it sees the sampler built (its stamp written), for at most 60 s:
    started in the old order, nothing is built while it loads, and it takes the whole 60 s."""
    sampler_stamp, reward_stamp = tmp_path / "sampler", tmp_path / "reward"

    def slow(stamp, samplers):
        return {"seconds": 60.0, "stamp": str(stamp), "until": str(sampler_stamp), "lines": samplers}

    over = tiny_overrides(
        tmp_path,
        sampler={"backend": "tests.integration.samplers_for_tests:StampedToy", "kwargs": {"stamp": str(sampler_stamp)}},
        rewards=[{"name": SLOW, "kwargs": slow(reward_stamp, 1), "num_cpus": 0.5}],
        learner={"iterations": 1},
    )
    res = train(load_config([], **over))
    assert [m["step"] for m in read_jsonl(res.run_dir / "metrics.jsonl") if "learner/pg_loss" in m] == [1]
    ((began, loaded),) = [tuple(map(float, line.split())) for line in reward_stamp.read_text().splitlines()]
    built = [float(t) for t in sampler_stamp.read_text().split()]
    assert len(built) == 1 and built[0] < loaded < began + 60.0, (began, built, loaded)

    again = tmp_path / "reward_again"
    spec = json.dumps([{"name": SLOW, "kwargs": slow(again, 2), "num_cpus": 0.5}])
    ev = ["--run", str(res.run_dir), "--seeds", "2", "--out", str(tmp_path / "ev"), "--", f"--rewards={spec}"]
    assert evaluate.main(ev) == 0
    ((began, loaded),) = [tuple(map(float, line.split())) for line in again.read_text().splitlines()]
    built = [float(t) for t in sampler_stamp.read_text().split()]
    assert len(built) == 2 and built[1] < loaded < began + 60.0, (began, built, loaded)
