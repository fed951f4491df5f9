"""One step off policy (``learner.pipeline``) on a real local Ray cluster with the toy backend.

Iteration t+1's rollouts are drawn under the weights update t starts from while the learner
computes it, and the update is importance weighted. It must keep every guarantee of the
on-policy loop: each rollout used once, a resume (mid-run or extending a finished run)
bit-identical to the uninterrupted run, killed actors changing nothing; and it must learn the
toy as the on-policy loop does.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from common.codec import read_records
from common.config import load_config
from common.messages import RolloutRecord
from common.policy import SchedulePolicy, state_to_numpy
from learner.groups import Dispatcher, InFlight
from learner.loop import train
from learner.metrics import read_jsonl
from tests.conftest import final_weights, same_weights, tiny_overrides
from tests.integration.test_faults import Killer, training_started

pytestmark = pytest.mark.ray

C, K = 4, 2


def _run(tmp_path, argv=(), **sections):
    learner = {"pipeline": True, **sections.pop("learner", {})}
    cfg = load_config(list(argv), **tiny_overrides(tmp_path, learner=learner, **sections))
    return train(cfg)


def _records(run_dir):
    return list(read_records(run_dir / "rollouts.msgpack", RolloutRecord))


def test_rollouts_are_one_version_behind_and_used_once(ray_local, tmp_path):
    res = _run(tmp_path, learner={"iterations": 4, "checkpoint_every": 2})
    recs = _records(res.run_dir)
    assert len({(r.iteration, r.context, r.k) for r in recs}) == len(recs) == 4 * C * K
    # iteration 0 and 1 under version 0 (1 was started before update 0), then t under t - 1
    assert [sorted({r.version for r in recs if r.iteration == it}) for it in range(4)] == [[0], [0], [1], [2]]
    rows = [m for m in read_jsonl(res.run_dir / "metrics.jsonl") if "learner/pg_loss" in m]
    assert rows[0]["learner/logp_drift"] < 1e-4 and rows[0]["learner/is_ess"] == pytest.approx(1.0)
    # off policy from iteration 1: the ratios move, but one update apart they stay near 1
    assert all(m["learner/logp_drift"] > 1e-6 for m in rows[1:])
    assert all(0.9 < m["learner/is_ess"] <= 1.0 and 0.5 < m["learner/is_ratio_mean"] < 2 for m in rows)
    # the last checkpoint keeps the weights the next rollouts would be drawn under: version 3
    ckpt = res.run_dir / "checkpoints" / "ckpt-00000004"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["version"] == 4 and state["behaviour_version"] == 3
    assert (ckpt / "behaviour.safetensors").is_file()


def test_the_next_rollouts_wait_on_the_workers_not_on_the_learner(ray_local, tmp_path, monkeypatch):
    """One step off policy, iteration t+2's requests go out as soon as update t is done, while
    t+1's are still under way: each worker queues them behind t+1's and goes straight on, where
    they used to go out only once t+1's had been scored and collected. With a reward that takes
    0.4 s a call, a worker then starts on t+1 before t's last scoring call ends. On policy
    nothing goes out ahead (the next rollouts need this update's weights)."""
    sent_ahead: list[int] = []  # at each send: the runs sent earlier and not yet collected
    collected = []
    start, result = Dispatcher.start, InFlight.result

    def spy_start(self, requests, weights):
        sent_ahead.append(len(self._sent))
        return start(self, requests, weights)

    def spy_result(self):
        collected.append(result(self))
        return collected[-1]

    monkeypatch.setattr(Dispatcher, "start", spy_start)
    monkeypatch.setattr(InFlight, "result", spy_result)
    sections = {
        "sampler": {"backend": "simulated", "simulated": {"preset": "tiny", "image_size": 8}},
        "rewards": [{"name": "simulated", "kwargs": {"seconds_per_image": 0.1}, "num_cpus": 0.5}],
    }
    for pipeline in (False, True):
        sent_ahead.clear()
        collected.clear()
        learner = {"iterations": 5, "rollout_log": False, "pipeline": pipeline}
        cfg = load_config([], **tiny_overrides(tmp_path / str(pipeline), learner=learner, **sections))
        train(cfg, final_eval=False)
        assert len(collected) == 5
        if not pipeline:
            assert sent_ahead == [0] * 5
            continue
        assert sent_ahead == [0, 1, 1, 1, 1]  # iteration 0 and 1 at once, then each one behind the one under way
        for before, after in zip(collected, collected[1:], strict=False):
            scored = max(end for _, end in before.scoring)
            assert min(b.started_at for b in after.batches) < scored - 0.1


def test_resume_is_exact_mid_run_and_extending(ray_local, tmp_path):
    """The uninterrupted run; a copy cut back to its mid-run checkpoint (taken while iteration 2's
    rollouts were under way) and resumed; a 2-iteration run extended to 4. All three end with the
    same weights and the same logged rollouts."""
    a = _run(tmp_path / "a", learner={"iterations": 4, "checkpoint_every": 2})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "t" / "checkpoints" / "ckpt-00000004")
    shutil.rmtree(tmp_path / "b" / "t" / "policy")
    b = _run(tmp_path / "b", ["--resume", "auto"], learner={"iterations": 4, "checkpoint_every": 2})
    _run(tmp_path / "c", learner={"iterations": 2, "checkpoint_every": 2})
    c = _run(tmp_path / "c", ["--resume", "auto"], learner={"iterations": 4, "checkpoint_every": 2})
    wa = final_weights(a.run_dir)
    for other in (b, c):
        assert same_weights(wa, final_weights(other.run_dir))
        got = [(r.iteration, r.context, r.k, r.version, r.logp, r.reward) for r in _records(other.run_dir)]
        assert got == [(r.iteration, r.context, r.k, r.version, r.logp, r.reward) for r in _records(a.run_dir)]
    # the behaviour weights matter: resumed without them, iteration 2 is drawn under version 2
    shutil.copytree(tmp_path / "b", tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "t" / "checkpoints" / "ckpt-00000004")
    (tmp_path / "d" / "t" / "checkpoints" / "ckpt-00000002" / "behaviour.safetensors").unlink()
    from common.checkpoint import write_manifest

    write_manifest(tmp_path / "d" / "t" / "checkpoints" / "ckpt-00000002")
    d = _run(tmp_path / "d", ["--resume", "auto"], learner={"iterations": 4, "checkpoint_every": 2})
    assert not same_weights(wa, final_weights(d.run_dir))


def test_killed_workers_change_nothing(ray_local, tmp_path):
    over = {"learner": {"iterations": 30, "checkpoint_every": 10}, "rollout": {"num_workers": 2, "max_restarts": 5}}
    ref = _run(tmp_path / "ref", **over)
    started = training_started(tmp_path / "faulty" / "t")
    killer = Killer("RolloutWorker", kills=2, every_s=0.5, first_after_s=0.0, when=started)
    killer.start()
    try:
        res = _run(tmp_path / "faulty", **over)
    finally:
        killer.stop.set()
        killer.join()
    assert len(killer.done) >= 1, "the faults were injected too late to matter"
    recs = _records(res.run_dir)
    assert len({(r.iteration, r.context, r.k) for r in recs}) == len(recs) == 30 * C * K
    assert same_weights(final_weights(ref.run_dir), final_weights(res.run_dir)), "faults changed the trained weights"


def test_learns_the_toy_as_the_on_policy_loop_does(ray_local, tmp_path):
    """configs/toy.yaml's policy and reward on a short budget (100 updates, K = 4, lr 5e-3), in
    both modes: the same held-out gain over the default schedule, above twice its noise."""
    gains = {}
    for pipeline in (False, True):
        cfg = load_config(
            ["--config", "configs/toy.yaml"],
            experiment={"name": f"pipeline-{pipeline}", "seed": 0, "output_dir": str(tmp_path)},
            rollout={"k": 4, "k_schedule": {}, "num_workers": 1},
            policy={"concentration_schedule": {}},
            learner={
                "iterations": 100,
                "lr": 5e-3,
                "pipeline": pipeline,
                "eval_seeds": 40,
                "global_baseline": False,
                "plots": False,
                "progress": False,
                "rollout_log": False,
                "checkpoint_every": 10**6,
            },
        )
        gains[pipeline] = train(cfg).evaluation.summary()["learned instance-level - default"]
    print(f"\ngain over the default: on policy {gains[False]}, one step off {gains[True]}")
    on, off = gains[False]["mean"], gains[True]["mean"]
    assert on > 2 * gains[False]["se"] and off > 2 * gains[True]["se"]
    assert abs(off - on) < 0.25 * on, gains


def test_behaviour_weights_round_trip_bit_exactly(tmp_path):
    """bf16 broadcast weights saved in a checkpoint and read back give the same wire bytes."""
    from common.checkpoint import load_tensors, save_checkpoint

    torch.manual_seed(0)
    policy = SchedulePolicy(steps=3, in_channels=4, token_dim=4, widths=[8, 8, 16, 16], groups=4, head_hidden=16)
    sent = state_to_numpy(policy, "bfloat16")
    opt = torch.optim.AdamW(policy.parameters())
    ckpt = save_checkpoint(tmp_path, 1, policy, opt, {"iteration": 1}, extra={"behaviour": sent.tensors()})
    saved = load_tensors(ckpt, "behaviour")
    back = state_to_numpy({k: saved[k] for k in policy.state_dict()}, "bfloat16")  # as the loop reads it back
    assert np.array_equal(back.flat, sent.flat) and back.layout == sent.layout
    assert load_tensors(ckpt, "absent") is None
