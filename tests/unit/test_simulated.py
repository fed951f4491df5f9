"""The simulated backend and reward: a real sampler's cost and shapes without a model."""

from __future__ import annotations

import time

import numpy as np
import pytest

from common.config import PolicyConfig
from common.policy import SchedulePolicy, policy_kwargs
from common.schedule import times_from_tau
from rewards.simulated import SimulatedReward
from rollout.backends.simulated import PRESETS, SimulatedSampler


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shapes_follow_the_backbone(preset):
    s = SimulatedSampler(preset=preset, image_size=32, seconds_per_image_step=0.0)
    spec = s.spec()
    assert spec.x_shape == PRESETS[preset]["x_shape"] and spec.token_dim == PRESETS[preset]["token_dim"]
    feats = s.encode(["a b c", "a b c"])
    assert feats[0].tokens.shape == (min(5, PRESETS[preset]["max_tokens"]), spec.token_dim)
    assert np.array_equal(feats[0].tokens, feats[1].tokens)
    assert s.initial_noise([1, 2]).shape == (2, *spec.x_shape)


def test_it_costs_what_it_is_told_and_is_deterministic():
    s = SimulatedSampler(preset="tiny", image_size=16, seconds_per_image_step=0.01, seconds_per_call=0.05)
    noise = s.initial_noise([3, 4])
    times = np.tile(times_from_tau(s.default_tau(5)), (2, 1))
    t0 = time.perf_counter()
    a = s.sample(["p", "q"], noise, times)
    took = time.perf_counter() - t0
    assert 0.15 <= took < 1.0  # 0.05 + 2 images x 5 steps x 0.01 (and not seconds more)
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.uint8 and s.nfe == 10
    assert np.array_equal(a, s.sample(["p", "q"], noise, times))
    later = times.copy()
    later[:, 0] = 0.7  # a schedule that skips the start changes the image
    assert not np.array_equal(a, s.sample(["p", "q"], noise, later))


def test_the_flux_preset_gives_a_flux_size_policy():
    s = SimulatedSampler(preset="flux", image_size=8, seconds_per_image_step=0.0)
    kw = policy_kwargs(PolicyConfig(), s.spec(), 5, s.default_tau(5))
    policy = SchedulePolicy(**kw).eval()
    assert kw["in_channels"] == 16 and kw["token_dim"] == 4096 and kw["pooled_dim"] == 768
    assert sum(p.numel() for p in policy.parameters()) > 500_000  # cross-attention over 4096-wide tokens


def test_the_simulated_reward_scores_brightness_at_its_cost():
    r = SimulatedReward(seconds_per_image=0.01)
    images = np.zeros((3, 8, 8, 3), np.uint8)
    images[1] = 255
    t0 = time.perf_counter()
    s = r(images, ["a", "b", "c"])
    assert time.perf_counter() - t0 >= 0.03
    assert s.tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="costs must be >= 0"):
        SimulatedReward(seconds_per_image=-1)
