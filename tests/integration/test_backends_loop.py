"""RolloutWorkers with each diffusers backend on a local Ray cluster feed a few iterations of the
full training loop. The tiny pipelines are saved as pipeline directories and loaded by the workers
exactly as a real model is (``sampler.<family>.model`` = the directory)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.codec import read_records
from common.config import load_config
from common.messages import RolloutRecord
from learner.loop import train
from learner.metrics import read_jsonl
from tests.conftest import tiny_overrides
from tests.fixtures.tiny_pipelines import SIZE, save_tiny

pytestmark = pytest.mark.ray

BACKEND = {"flux": "flux", "sd3": "sd3", "sd15": "sd", "sdxl": "sd"}


class MeanBrightness:
    """A simple image reward: mean pixel value in [0, 1]."""

    def __call__(self, images, prompts):
        images = np.asarray(images)
        assert images.dtype == np.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
        return images.reshape(len(images), -1).mean(axis=1).astype(np.float32) / 255.0


@pytest.mark.parametrize("family", list(BACKEND))
def test_workers_feed_the_training_loop(ray_local, tmp_path, family):
    backend = BACKEND[family]
    section = {
        "model": str(save_tiny(family, tmp_path / "model")),
        "local_files_only": True,
        "dtype": "float32",
        "device": "cpu",
        "height": SIZE,
        "width": SIZE,
    }
    if backend in ("flux", "sd3"):
        section["max_sequence_length"] = 32
    C, K, iters = 4, 2, 2
    overrides = tiny_overrides(
        tmp_path,
        sampler={"backend": backend, backend: section},
        # two workers for one family (the fan-out), one for the others (actor start-up is the cost here)
        rollout={"steps": 3, "contexts_per_iter": C, "k": K, "num_workers": 2 if family == "flux" else 1},
        rewards=[{"name": f"{__name__}:MeanBrightness", "num_cpus": 0.5}],
        learner={"iterations": iters, "checkpoint_every": iters, "eval_seeds": 2, "eval_prompts": ["a cat", "a dog"]},
    )
    res = train(load_config([], **overrides))

    rows = [m for m in read_jsonl(res.run_dir / "metrics.jsonl") if "learner/pg_loss" in m]
    assert [m["step"] for m in rows] == list(range(1, iters + 1))
    for key in ("rollout/reward_mean", "learner/grad_norm", "policy/entropy", "baseline/alpha"):
        assert all(np.isfinite(m[key]) for m in rows), key
    assert all(0 < m["rollout/reward_mean"] < 1 for m in rows)
    assert max(m["learner/logp_drift"] for m in rows) < 1e-4  # the learner recomputes the workers' log-probs
    recs = list(read_records(res.run_dir / "rollouts.msgpack", RolloutRecord))
    assert len(recs) == iters * C * K
    # K schedules of one context share prompt and noise: their rewards differ only through the schedule
    by_ctx = {}
    for r in recs:
        by_ctx.setdefault(r.context, []).append(r.reward)
    assert any(len(set(v)) > 1 for v in by_ctx.values())
    summary = json.loads((res.run_dir / "eval.json").read_text())
    assert summary["default"]["n"] == 2 * 2
