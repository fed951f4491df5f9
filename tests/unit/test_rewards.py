"""Reward registry, plug-in loading and the checks that keep a bad reward out of an update."""

from __future__ import annotations

import re

import numpy as np
import pytest

from rewards.actors import RewardServer
from rewards.registry import build, check_scores, register, registered, resolve
from rewards.toy import ToyReward


class GoodReward:
    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, images, prompts):
        return np.full(len(prompts), self.scale, dtype=np.float32)


class NoPromptsReward:
    def __call__(self, images):
        return np.zeros(len(images))


class Agreement:
    """A set metric where higher is better: the share of features above zero."""

    lower_is_better = False

    def features(self, images, prompts):
        return np.asarray(images, dtype=np.float64).reshape(len(prompts), -1)

    def distance(self, *features):
        return float((np.concatenate(features) > 0).mean())


class MeanOfFeatures(Agreement):
    """A set metric whose value is the mean of its one feature: its paired difference is a mean
    of per-context differences, whose clustered standard error is known in closed form."""

    def distance(self, *features):
        return float(np.concatenate(features).mean())


class NoDirection(Agreement):
    lower_is_better = None  # says nothing: a table would have to guess which way is better


class NanReward:
    def __call__(self, images, prompts):
        out = np.zeros(len(prompts), dtype=np.float32)
        out[-1] = np.nan
        return out


def test_builtins_registered_and_duplicates_refused():
    assert registered()["toy"] is ToyReward
    with pytest.raises(ValueError, match="already registered"):
        register("toy")(GoodReward)


def test_import_path_plugins():
    r = build("tests.unit.test_rewards:GoodReward", {"scale": 2.0})
    assert r([0, 0], ["a", "b"]).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="cannot import module"):
        resolve("no_such_pkg.mod:Thing")
    with pytest.raises(ValueError, match="has no attribute"):
        resolve("tests.unit.test_rewards:Missing")
    with pytest.raises(ValueError, match=r"\(images, prompts\)"):
        resolve("tests.unit.test_rewards:NoPromptsReward")
    with pytest.raises(ValueError, match="unknown reward 'hpsv9'"):
        resolve("hpsv9")
    with pytest.raises(ValueError, match="bad kwargs"):
        build("tests.unit.test_rewards:GoodReward", {"colour": 1})


def test_a_metric_says_which_way_is_better_or_is_refused_naming_the_fix():
    from rewards.registry import build_metric

    assert build_metric("tests.unit.test_rewards:Agreement", {}).lower_is_better is False
    assert build_metric("digits_fd", {}).lower_is_better is True
    with pytest.raises(ValueError, match=r"'tests.unit.test_rewards:NoDirection' does not say which way is better"):
        build_metric("tests.unit.test_rewards:NoDirection", {})


@pytest.mark.parametrize("per_prompt", [2, 3, 40])
def test_a_metric_difference_is_paired_with_the_noises_resampled_within_each_prompt(per_prompt):
    """The difference of two schedules' metric on the same contexts: its bootstrap resamples the
    same rows of both, each prompt's noises among its own. For a mean it is the standard error of
    the per-context differences stratified by prompt, sqrt(sum_h n_h s_h^2) / n (up to the
    bootstrap's own noise; at 2 noises a prompt the plain bootstrap gave 0.71 of it), far below
    the two sets' own noises, which count what a noise does under both schedules twice; and the
    prompt mix of a resample is the set's (a mean over a resampled mix would move with the prompt
    effect)."""
    from rewards.actors import MetricServer

    rng = np.random.default_rng(per_prompt)
    prompts = 400 // per_prompt
    n = prompts * per_prompt
    strata = [f"prompt {i}" for i in range(prompts) for _ in range(per_prompt)]
    prompt_effect = np.repeat(10 * rng.normal(size=prompts), per_prompt)
    noise_effect = rng.normal(size=n)  # the same noise under both schedules
    a = (prompt_effect + noise_effect + 0.3 + 0.1 * rng.normal(size=n))[:, None]
    b = (prompt_effect + noise_effect + 0.1 * rng.normal(size=n))[:, None]
    server = MetricServer("tests.unit.test_rewards:MeanOfFeatures", {})
    value, se = server.difference_with_se(2, a[:150], a[150:], b, strata=strata, resamples=3000)
    assert value == pytest.approx(float(a.mean() - b.mean()), abs=1e-12)
    d = (a - b).reshape(prompts, per_prompt)
    expected = np.sqrt((per_prompt * d.var(axis=1, ddof=1)).sum()) / n
    assert se == pytest.approx(expected, rel=0.06)
    unpaired = np.hypot(*(server.distance_with_se(x, strata=strata, resamples=200)[1] for x in (a, b)))
    assert se < unpaired / 5
    assert server.difference_with_se(1, a, b, strata=strata, resamples=0) == (value, None)
    assert server.difference_with_se(1, a, b, strata=list(range(n)))[1] is None  # one noise a prompt
    with pytest.raises(ValueError, match=f"one row per context of both: {n} and {n - 1} rows, {n} contexts"):
        server.difference_with_se(1, a, b[1:], strata=strata)


@pytest.mark.parametrize("per_prompt", [2, 5, 100])
def test_a_sets_metric_noise_resamples_the_noises_within_each_prompt(per_prompt):
    """One set's bootstrap noise, as the tables give it beside each schedule's FD: each resample
    draws every prompt's noises among its own, so the prompt mix stays the held-out set's. The
    pool resampled as one changed the mix, and its +- moved with how far apart the prompts are:
    the digits FD's came out 3.8 times its spread over fresh noises. For a mean it is the
    stratified standard error sqrt(sum_h n_h s_h^2) / n, whatever the prompt effect."""
    from rewards.actors import MetricServer

    rng = np.random.default_rng(per_prompt)
    prompts = 400 // per_prompt
    n = prompts * per_prompt
    strata = [f"prompt {i}" for i in range(prompts) for _ in range(per_prompt)]
    within = rng.normal(size=n)
    server = MetricServer("tests.unit.test_rewards:MeanOfFeatures", {})
    got = {}
    for scale in (0.0, 10.0, 1000.0):  # how far apart the prompts' means are
        x = (np.repeat(scale * rng.normal(size=prompts), per_prompt) + within)[:, None]
        value, got[scale] = server.distance_with_se(x[:100], x[100:], strata=strata, resamples=3000)
        assert value == pytest.approx(float(x.mean()), rel=1e-12)
    w = within.reshape(prompts, per_prompt)
    expected = np.sqrt((per_prompt * w.var(axis=1, ddof=1)).sum()) / n
    assert got[0.0] == pytest.approx(expected, rel=0.06)
    assert got[1000.0] == pytest.approx(got[0.0], rel=1e-6)  # the same draws: the prompt effect is no noise
    assert server.distance_with_se(x, strata=strata, resamples=0)[1] is None
    assert server.distance_with_se(x, strata=list(range(n)))[1] is None  # one noise a prompt
    with pytest.raises(ValueError, match=f"one row per context: {n - 1} rows, {n} contexts"):
        server.distance_with_se(x[1:], strata=strata)


def test_non_finite_and_wrong_shape_name_reward_and_prompt():
    with pytest.raises(ValueError, match=r"reward 'nan'.*non-finite.*'class 5'"):
        check_scores("nan", NanReward()(None, ["class 1", "class 5"]), ["class 1", "class 5"])
    with pytest.raises(ValueError, match=r"reward 'x' returned shape \(3,\) for 2 images \(prompts \['a', 'b'\]\)"):
        check_scores("x", np.zeros(3), ["a", "b"])
    with pytest.raises(ValueError, match=r"reward 'x' returned strings, not real numbers, for prompts \['a'\]"):
        check_scores("x", "oops", ["a"])
    server = RewardServer("tests.unit.test_rewards:NanReward", {})
    with pytest.raises(ValueError, match="non-finite"):
        server.score(np.zeros((2, 4)), ["class 0", "class 1"])


def test_toy_reward_is_the_floored_log_density():
    r = ToyReward(floor=-10.0, dim=4, seed=3)
    on_mode = r.mixture.means[2, 0][None]
    far = np.full((1, 4), 50.0)
    s = r(np.concatenate([on_mode, far]), ["class 2", "class 2"])
    assert s.dtype == np.float32
    assert s[1] == -10.0
    assert s[0] == pytest.approx(r.mixture.log_density(on_mode, np.array([2]))[0], rel=1e-6)
    with pytest.raises(ValueError, match="class 99"):
        r(on_mode, ["class 99"])


def test_the_toy_reward_takes_its_mixture_from_the_sampler_section():
    """A reward that declares uses_sampler_config is built with the run's sampler section: the
    toy reward scores against the very mixture the sampler samples, whatever its settings."""
    from common.config import SamplerConfig
    from rewards.registry import build

    sampler = SamplerConfig(backend="toy", toy={"dim": 3, "seed": 7}).model_dump(mode="json")
    r = build("toy", {"floor": -5.0}, sampler=sampler)
    direct = ToyReward(floor=-5.0, dim=3, seed=7)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    prompts = ["class 1", "class 2", "class 3", "class 4"]
    assert np.array_equal(r(x, prompts), direct(x, prompts))
    with pytest.raises(ValueError, match=r"kwargs \['seed', 'spread'\] are the sampler's settings"):
        build("toy", {"spread": 0.3, "seed": 1}, sampler=sampler)  # another mixture than the one sampled
    with pytest.raises(ValueError, match=r"against the sampler's own mixture: set \['spread'\] in sampler.toy"):
        ToyReward(sampler=sampler, spread=0.3)  # built directly, as the bench scripts do
    with pytest.raises(ValueError, match="needs the sampler's config"):
        build("toy", {})
    with pytest.raises(ValueError, match="scores the toy backend's samples; sampler.backend is 'digits'"):
        build("toy", {}, sampler=SamplerConfig().model_dump(mode="json"))


def test_downscale_keeps_layout_dtype_and_aspect():
    from rewards.images import downscale

    u8 = np.full((2, 64, 32, 3), 200, np.uint8)
    out = downscale(u8, 16)
    assert out.shape == (2, 16, 8, 3) and out.dtype == np.uint8 and (out == 200).all()
    chw = np.full((1, 3, 48, 48), 0.25, np.float32)
    out = downscale(chw, 12)
    assert out.shape == (1, 3, 12, 12) and out.dtype == np.float32 and np.allclose(out, 0.25, atol=1e-6)
    assert downscale(u8, 64) is u8  # already small enough: untouched
    vectors = np.zeros((4, 8), np.float32)
    assert downscale(vectors, 2) is vectors  # not images (the toy's samples)


def _resizing_threads(monkeypatch, together: int) -> set[str]:
    """The names of the threads PIL's resize runs on from now on; the first ``together`` calls
    each wait for the others (a BrokenBarrierError unless that many resize at once)."""
    import itertools
    import threading

    from PIL import Image

    seen: set[str] = set()
    resize, barrier, calls = Image.Image.resize, threading.Barrier(together, timeout=10), itertools.count()

    def recorded(self, *args, **kwargs):
        seen.add(threading.current_thread().name)
        if next(calls) < together:
            barrier.wait()
        return resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    return seen


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_downscale_on_threads_gives_the_same_images(monkeypatch, threads):
    from rewards.images import downscale

    images = np.random.default_rng(0).integers(0, 256, (5, 96, 64, 3), dtype=np.uint8)
    alone = downscale(images, 24)
    seen = _resizing_threads(monkeypatch, together=min(threads, len(images)))
    together = downscale(images, 24, threads)
    np.testing.assert_array_equal(together, alone)  # each image by the same call: bit for bit
    assert together.shape == (5, 24, 16, 3)
    assert len(seen) == min(threads, len(images)) and all(name.startswith("downscale") for name in seen)


def test_a_worker_downscales_on_its_image_threads(monkeypatch):
    # a GPU node's cores sit idle while it samples; at 1024² the resize is most of a request's
    # CPU work (32 of 47 ms per two images on an H200 node's core): rollout.image_threads spreads it
    import inspect

    from common.config import PolicyConfig, RolloutConfig, SamplerConfig
    from common.messages import Context, RolloutRequest
    from learner.groups import worker_kwargs
    from rollout.worker import RolloutWorker

    rollout = RolloutConfig(image_threads=3)
    kwargs = worker_kwargs(rollout)
    assert kwargs["image_threads"] == 3 and set(kwargs) <= set(inspect.signature(RolloutWorker).parameters)
    sampler = SamplerConfig(backend="simulated", simulated={"preset": "tiny", "image_size": 64})
    policy = PolicyConfig(widths=[8, 8, 16, 16], groups=4, attn_heads=2, head_hidden=16)
    w = RolloutWorker(0, sampler.model_dump(), policy.model_dump(), 3, 0, **kwargs)
    contexts = [Context(index=i, prompt=f"simulated prompt {i}", seed=i) for i in range(2)]
    request = RolloutRequest(request_id="r", iteration=0, version=0, contexts=contexts, k=2, steps=3, image_size=16)
    seen = _resizing_threads(monkeypatch, together=3)
    _, images, _ = w.sample(request, w._weights.weights())
    assert images.shape == (4, 16, 16, 3) and len(seen) == 3


def test_a_reward_declares_the_side_it_reads():
    assert RewardServer("simulated", {}).input_size() == 224
    assert RewardServer("simulated", {"input_size": None}).input_size() is None
    assert RewardServer("tests.unit.test_rewards:GoodReward", {}).input_size() is None


@pytest.mark.parametrize(
    ("kind", "name", "kwargs", "backend", "expected"),
    [
        ("reward", "clip", {"batchsize": 4}, "sd", r"reward 'clip': bad kwargs \['batchsize'\]: .*'batchsize'"),
        ("reward", "pickscore", {"dtype": "bfloat16", "devise": "cuda"}, "flux", r"bad kwargs \['devise', 'dtype'\]"),
        ("reward", "http", {}, "sd", r"reward 'http': bad kwargs \[\]: missing a required argument: 'url'"),
        ("reward", "hsp", {}, "sd", r"unknown reward 'hsp': use one of \[.*'hps'"),
        ("metric", "digits_fd", {}, "toy", r"reads only the samples of the digits backend; this run samples with toy"),
        ("reward", "toy", {"sampler": {"backend": "toy"}}, "toy", r"kwargs 'sampler' is given by the run"),
        ("reward", "toy", {"sprad": 0.2}, "toy", r"reward 'toy': bad kwargs \['sprad'\]: .*'sprad'"),
        ("reward", "toy", {"floor": -5.0, "spread": 0.2}, "toy", r"kwargs \['spread'\] are the sampler's settings"),
        ("reward", "toy", {"floor": -5.0}, "toy", None),
        ("reward", "clip", {"batch_size": 4, "dtype": "float16"}, "sd", None),
        ("reward", "my_pkg.rewards:Mine", {"anything": 1}, "sd", None),  # its server imports and checks it
    ],
)
def test_a_reward_or_metric_is_checked_on_the_driver_without_being_built(kind, name, kwargs, backend, expected):
    from rewards.registry import spec_problem

    problem = spec_problem(kind, name, kwargs, backend)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and re.search(expected, problem), problem


def test_every_registered_reward_resolves_as_its_server_resolves_it():
    """The digits reward's registration once sat on the base class of its scorers, which has no
    __call__: every run naming it failed when its server started, and the driver's check said
    nothing (it looked the name up without resolving it)."""
    from rewards.registry import spec_problem

    for name in registered():
        assert resolve(name) is not None
        assert "no __call__" not in (spec_problem("reward", name, {}, "digits") or "")
    assert resolve("digits").__name__ == "DigitsReward"


def builds_a_number(images=None, prompts=None):
    """A plug-in factory whose call builds no reward (it returns a number)."""
    return 0


def test_a_factory_that_builds_no_reward_is_refused_when_built():
    """It passed the startup check and failed at the first step, after Ray and the workers."""
    from rewards.registry import build

    with pytest.raises(ValueError, match=r"^reward 'tests.unit.test_rewards:builds_a_number' built a value of type"):
        build("tests.unit.test_rewards:builds_a_number", {})
