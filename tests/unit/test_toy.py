"""The toy backend: an exact flow, per-sample schedules, and something to learn at few steps; its
logsumexp and softmax are scipy's to the bit."""

from __future__ import annotations

from decimal import Decimal, localcontext

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import logsumexp as scipy_logsumexp
from scipy.special import softmax as scipy_softmax

from common.schedule import guard_tau, times_from_tau, uniform_flow_tau
from common.toy import ToyMixture, logsumexp, softmax
from rewards.toy import ToyReward
from rollout.backends.toy import ToySampler
from rollout.sampler import Sampler


def test_is_a_sampler_and_prompts_parse():
    s = ToySampler(dim=4)
    assert isinstance(s, Sampler)
    spec = s.spec()
    assert spec.x_shape == (4,) and spec.train_prompts[3] == "class 3"
    f = s.encode(["class 3", "class 3"])
    assert f[0].tokens.shape == (4, 16) and np.array_equal(f[0].tokens, f[1].tokens)
    for bad in ["a cat", "class x", "class 10"]:
        with pytest.raises(ValueError, match="class"):
            s.encode([bad])


def test_noise_is_a_function_of_the_seed():
    s = ToySampler(dim=4)
    a = s.initial_noise([1, 2, 1])
    assert a.dtype == np.float32 and np.array_equal(a[0], a[2]) and not np.array_equal(a[0], a[1])


def test_velocity_of_one_gaussian_is_exact():
    m = ToyMixture(dim=3, num_classes=1, modes_per_class=1, spread=0.5, seed=0)
    mu, s2 = m.means[0, 0], 0.25
    x, t = np.array([[0.3, -1.0, 2.0]]), np.array([0.4])
    var = 0.6**2 * s2 + 0.4**2
    expected = 0.4 / var * (x - 0.6 * mu) - (mu + 0.6 * s2 / var * (x - 0.6 * mu))
    np.testing.assert_allclose(m.velocity(x, t, np.array([0])), expected, rtol=1e-12)


def test_many_steps_reproduce_the_data_distribution():
    s = ToySampler(dim=2, num_classes=2, modes_per_class=3, spread=0.2, seed=5)
    n = 4000
    cls = np.arange(n) % 2
    prompts = [f"class {c}" for c in cls]
    x = s.sample(prompts, s.initial_noise(list(range(n))), np.tile(times_from_tau(uniform_flow_tau(200)), (n, 1)))
    rng = np.random.default_rng(0)
    modes = rng.integers(0, 3, n)
    real = s.mixture.means[cls, modes] + 0.2 * rng.standard_normal((n, 2))
    lp_gen = s.mixture.log_density(x, cls).mean()
    lp_real = s.mixture.log_density(real, cls).mean()
    assert abs(lp_gen - lp_real) < 0.1, (lp_gen, lp_real)


def test_every_sample_runs_its_own_schedule():
    s = ToySampler(dim=4)
    noise = s.initial_noise([0, 1, 2])
    prompts = ["class 0", "class 1", "class 2"]
    rng = np.random.default_rng(0)
    times = times_from_tau(guard_tau(rng.dirichlet(np.ones(5), size=3)))
    batched = s.sample(prompts, noise, times)
    one_by_one = np.concatenate([s.sample([p], noise[i : i + 1], times[i : i + 1]) for i, p in enumerate(prompts)])
    np.testing.assert_array_equal(batched, one_by_one)


def test_best_per_sample_schedule_beats_the_default_at_few_steps():
    """There is something to learn: at L = 4 a good schedule, and more so a per-sample one, wins."""
    steps, n, cands = 4, 128, 200
    s = ToySampler(dim=4)
    reward = ToyReward(floor=-10.0, dim=4)
    prompts = [f"class {i % 10}" for i in range(n)]
    noise = s.initial_noise(list(range(n)))
    taus = np.concatenate(
        [uniform_flow_tau(steps)[None], guard_tau(np.random.default_rng(1).dirichlet(np.full(steps + 1, 2.0), cands))]
    )
    r = np.stack([reward(s.sample(prompts, noise, np.tile(times_from_tau(t), (n, 1))), prompts) for t in taus])
    default, best_global, best_each = r[0].mean(), r.mean(1).max(), r.max(0).mean()
    assert best_global > default + 0.5, (default, best_global)
    assert best_each > best_global + 0.5, (best_global, best_each)


def _exact_logsumexp(values: list[float]) -> float:
    """log(sum(exp(values))) in decimal arithmetic, rounded once to a float: ``max + log(m) +
    log(1 + rest / m)`` (m terms at the max, ``rest`` the others' sum of exp(v - max)), with as many
    digits as a tiny ``rest / m`` needs to keep 60 of its own. Terms below exp(-780) ~ 1e-339 are
    left out: no float result can show them."""
    top = max(values)
    with localcontext() as ctx:
        ctx.prec = 60
        m = Decimal(values.count(top))
        rest = sum(((Decimal(v) - Decimal(top)).exp() for v in values if -780 < v - top < 0), Decimal(0))
        x = rest / m
        ctx.prec = 60 + (max(0, -x.adjusted()) if x else 0)
        return float(Decimal(top) + m.ln() + (1 + x).ln())


@settings(max_examples=200, deadline=None)
@given(
    a=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
        elements=st.one_of(
            st.floats(-1e4, 50.0),  # the toy's log-densities: far below 0 and a few above
            st.sampled_from([0.0, -1.0, -np.inf]),  # ties at the maximum, empty terms
        ),
    ),
    axis=st.sampled_from([0, 1]),
)
@example(a=np.array([[0.0], [-725.0], [-725.0]]), axis=0)  # a sum of subnormals: one ulp there is 5e-324
def test_logsumexp_is_scipys_to_the_bit(a, axis):
    """The toy's own logsumexp gives scipy's (>= 1.15) numbers bit for bit, ties and -inf terms
    included, and is within a few ulps of the sum taken in 50 digits."""
    ours = logsumexp(a, axis=axis)
    np.testing.assert_array_equal(ours, scipy_logsumexp(a, axis=axis))
    for row, got in zip(np.moveaxis(a, axis, -1), ours, strict=True):
        if np.isneginf(row).all():
            assert got == -np.inf
            continue
        top = float(row.max())
        exact = _exact_logsumexp([float(v) for v in row])
        # a few ulps of the terms added: max + log(sum of exp(a - max)); where the result is
        # subnormal, a few of the smallest steps a float64 can take
        f64 = np.finfo(np.float64)
        tolerance = 4 * f64.eps * (abs(top) + abs(exact - top)) + 4 * f64.smallest_subnormal
        assert abs(got - exact) <= tolerance, (got, exact)


@settings(max_examples=200, deadline=None)
@given(
    a=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=5),
        elements=st.one_of(st.floats(-1e4, 50.0), st.sampled_from([0.0, -1.0])),
    ),
    axis=st.sampled_from([0, 1, 2]),
)
def test_softmax_is_scipys_to_the_bit(a, axis):
    """The sampler's posterior over modes: scipy's numbers, bit for bit, summing to 1."""
    ours = softmax(a, axis=axis)
    np.testing.assert_array_equal(ours, scipy_softmax(a, axis=axis))
    np.testing.assert_allclose(ours.sum(axis=axis), 1.0, rtol=1e-12)
