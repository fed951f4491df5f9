"""RewardServer actors on a real local Ray cluster: each reward's own runtime_env is honoured,
rewards combine by weight with each one's scores kept apart, a crash names reward and prompts."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from common.config import RewardSpec
from learner.groups import RewardGroup

MOD = "tests.integration.rewards_for_tests"


@pytest.mark.ray
def test_runtime_env_weights_and_crash(ray_local):
    ray = ray_local
    assert "STEINSCHED_TEST_SCALE" not in os.environ
    specs = [
        RewardSpec(
            name=f"{MOD}:EnvScale",
            weight=2.0,
            num_cpus=0.25,
            runtime_env={"env_vars": {"STEINSCHED_TEST_SCALE": "1.5"}},
        ),
        RewardSpec(name=f"{MOD}:NegativeNorm", weight=0.5, num_cpus=0.25, num_servers=2),
        RewardSpec(name=f"{MOD}:CrashOnClass7", num_cpus=0.25),
    ]
    group = RewardGroup(specs)
    x = np.array([[3.0, 4.0], [0.0, 1.0]], np.float32)
    requests = [SimpleNamespace(images=ray.put(x), prompts=["class 1", "class 2"], references=None) for _ in range(2)]
    for p in requests:  # two requests: NegativeNorm's two servers take one each
        group.chain(p)  # at launch: the rewards with one server are sent the images
        group.score(p)
    scores = group.combine([[got[0] for got in ray.get(p.scores)] for p in requests])  # (scores, start, end)
    np.testing.assert_allclose(scores.per_reward[f"{MOD}:EnvScale"], [1.5, 1.5] * 2)  # the env var was seen
    np.testing.assert_allclose(scores.per_reward[f"{MOD}:NegativeNorm"], [-5.0, -1.0] * 2)
    np.testing.assert_allclose(scores.total, 2.0 * 1.5 + 0.5 * np.array([-5.0, -1.0] * 2))

    bad = SimpleNamespace(images=ray.put(x), prompts=["class 3", "class 7"], references=None)
    with pytest.raises(
        ray.exceptions.RayTaskError,
        match=r"reward '.*CrashOnClass7' failed on prompts \['class 3', 'class 7'\]: KeyError",
    ):
        group.chain(bad)
        ray.get(bad.scores[2])
