"""The digits backend and rewards: prompts, data split, the cache, sampling, and the rewards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common import digits
from common.artifacts import cached, settings_key
from common.schedule import guard_tau, times_from_tau, uniform_flow_tau

TINY = {"hidden": 32, "depth": 2, "emb_dim": 8, "train_steps": 20, "batch_size": 32}


@pytest.mark.parametrize(
    "prompt, digit",
    [("a handwritten seven", 7), ("the digit 7", 7), ("7", 7), ("A picture of the number ZERO", 0), ("nine.", 9)],
)
def test_prompts_name_a_digit(prompt, digit):
    assert digits.parse_digit(prompt) == digit


@pytest.mark.parametrize("prompt", ["a cat", "", "the digit 12", "one or two"])
def test_prompts_without_exactly_one_digit_are_errors(prompt):
    with pytest.raises(ValueError, match="digit"):
        digits.parse_digit(prompt)


def test_split_is_fixed_and_disjoint():
    xt, yt = digits.split("train")
    xh, yh = digits.split("held_out")
    assert len(xt) + len(xh) == 1797 and xt.dtype == np.float32
    assert xt.min() >= -1 and xt.max() <= 1
    flat_t = {r.tobytes() for r in xt}
    assert sum(r.tobytes() in flat_t for r in xh) < 20  # the dataset has a few exact duplicates
    assert np.array_equal(digits.split("held_out")[0], xh)
    assert set(yh) == set(range(10))


def test_cache_builds_once_and_rebuilds_damaged_or_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("STEINSCHED_CACHE", str(tmp_path))
    calls = []

    def build(out):
        calls.append(1)
        (out / "w.bin").write_bytes(b"abc" * 10)

    a = cached("thing", {"x": 1}, build)
    assert cached("thing", {"x": 1}, build) == a and len(calls) == 1
    (a / "w.bin").write_bytes(b"abc")  # damaged (truncated)
    logs = []
    assert cached("thing", {"x": 1}, build, log=logs.append) == a and len(calls) == 2
    assert "unusable" in logs[0]
    settings = json.loads((a / "settings.json").read_text())
    settings["settings"]["x"] = 2  # stale: settings changed under the same key
    (a / "settings.json").write_text(json.dumps(settings))
    cached("thing", {"x": 1}, build, log=logs.append)
    assert len(calls) == 3 and "unusable" in logs[1]
    assert settings_key({"x": 1}) != settings_key({"x": 2})
    # a builder killed mid-build (ray.kill runs no finally) left its temporary: the next build removes it
    left = a.parent / f".{settings_key({'x': 3})}.tmp-424242"
    left.mkdir()
    (left / "w.bin").write_bytes(b"partial")
    cached("thing", {"x": 3}, build)
    assert not left.exists() and not list(a.parent.glob(".*.tmp-*"))


def test_training_is_deterministic(tmp_path, monkeypatch):
    from rollout.backends.digits import DigitsSampler

    weights = []
    for d in ("a", "b"):
        monkeypatch.setenv("STEINSCHED_CACHE", str(tmp_path / d))
        s = DigitsSampler(**TINY)
        weights.append({k: v.clone() for k, v in s.model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_sampler_shapes_features_and_per_sample_schedules(tmp_path, monkeypatch):
    from rollout.backends.digits import DigitsSampler

    monkeypatch.setenv("STEINSCHED_CACHE", str(tmp_path))
    s = DigitsSampler(**TINY)
    spec = s.spec()
    assert spec.x_shape == (1, 8, 8) and spec.token_dim == 8
    f = s.encode(["a handwritten seven", "7"])
    assert f[0].tokens.shape == (3, 8) and f[1].tokens.shape == (1, 8)
    # the digit's token is the model's own class embedding: the policy sees the conditioning
    np.testing.assert_array_equal(f[0].tokens[2], f[1].tokens[0])
    with pytest.raises(ValueError, match="names no digit"):
        s.encode(["a cat"])
    prompts = ["the digit 1", "the digit 2", "the digit 3"]
    noise = s.initial_noise([5, 6, 7])
    times = times_from_tau(guard_tau(np.random.default_rng(0).dirichlet(np.ones(5), size=3)))
    batched = s.sample(prompts, noise, times)
    assert batched.shape == (3, 8, 8) and batched.min() >= 0 and batched.max() <= 1
    single = np.concatenate([s.sample([p], noise[i : i + 1], times[i : i + 1]) for i, p in enumerate(prompts)])
    np.testing.assert_allclose(batched, single, atol=1e-6)
    np.testing.assert_array_equal(s.default_tau(4), uniform_flow_tau(4))


@pytest.fixture(scope="module")
def trained():
    """The real (default-settings) models, trained once per machine and cached."""
    from rewards.digits import DigitsClassReward, DigitsFrechet, DigitsReward
    from rollout.backends.digits import DigitsSampler

    return DigitsSampler(), DigitsReward(), DigitsClassReward(), DigitsFrechet()


def _samples(sampler, prompts, steps):
    noise = sampler.initial_noise(list(range(len(prompts))))
    return sampler.sample(prompts, noise, np.tile(times_from_tau(uniform_flow_tau(steps)), (len(prompts), 1)))


def test_rewards_tell_real_from_degraded_and_few_step_from_many(trained):
    from rewards.digits import degrade

    sampler, reward, class_only, fd = trained
    xh, yh = digits.split("held_out")
    prompts = [f"the digit {c}" for c in yh]
    real = reward(digits.to_unit(xh), prompts)
    fake = reward(
        digits.to_unit(degrade(torch.from_numpy(xh), torch.from_numpy(yh), torch.Generator().manual_seed(0)).numpy()),
        prompts,
    )
    assert real.mean() > 0.8 and fake.mean() < 0.2
    wrong = reward(digits.to_unit(xh), [f"the digit {(c + 1) % 10}" for c in yh])
    assert wrong.mean() < 0.1  # the prompted class matters
    one, many = _samples(sampler, prompts, 1), _samples(sampler, prompts, 30)
    # classifier confidence alone is ~1.0 even for one-step samples: it rewards blur ...
    assert class_only(one, prompts).mean() > 0.95
    # ... while realism x class separates them, and so does the gold metric
    assert reward(one, prompts).mean() < 0.3 < 0.6 < reward(many, prompts).mean()
    assert fd.distance(fd.features(one, prompts)) > 2 * fd.distance(fd.features(many, prompts))
    real_train = digits.to_unit(digits.split("train")[0][:359])
    assert fd.distance(fd.features(real_train, prompts)) < 0.5 * fd.distance(fd.features(one, prompts))


def test_frechet_noise_is_small_against_a_real_difference(trained):
    """MetricServer.distance_with_se: the bootstrap noise of the FD is far below the gap between
    one-step and 30-step samples, and the value is the plain distance."""
    from rewards.actors import MetricServer

    sampler, _, _, fd = trained
    _, yh = digits.split("held_out")
    prompts = [f"the digit {c}" for c in yh]
    server = MetricServer("digits_fd", {})
    one, many = (fd.features(_samples(sampler, prompts, n), prompts) for n in (1, 30))
    v1, se1 = server.distance_with_se(one, strata=prompts, resamples=20)
    v30, se30 = server.distance_with_se(many[:180], many[180:], strata=prompts, resamples=20)
    assert v1 == server.distance(one) and v30 == server.distance(many)
    assert 0 < se30 < 0.5 * v30 and 0 < se1 < 0.5 * v1
    assert v1 - v30 > 3 * (se1 + se30)
    assert server.distance_with_se(one, strata=prompts, resamples=0) == (v1, None)  # metrics[].noise_resamples = 0


def test_a_misspelt_setting_is_refused_not_ignored():
    """The settings were merged into the defaults unchecked: a typo trained with the default."""
    from rewards.digits import DigitsModels, DigitsReward

    with pytest.raises(ValueError, match=r"unknown digits reward settings \['hiden'\]; the settings are \["):
        DigitsModels({"hiden": 32})
    with pytest.raises(TypeError, match="hiden"):
        DigitsReward(hiden=32)
