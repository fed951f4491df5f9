"""Schedule maths (common/schedule.py) against docs/method.md.

tau in the simplex (L+1 components) <-> the L evaluation times t_k = 1 - sum_{j<=k} tau_j,
1 > t_1 > ... > t_L > 0; the sampler evaluates the model at t_1..t_L and steps t_k -> t_{k+1}
with t_{L+1} = 0: exactly L model evaluations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.schedule import (
    TAU_FLOOR,
    check_tau,
    guard_tau,
    interior,
    shifted_flow_tau,
    step_ends,
    tau_from_times,
    times_from_tau,
    uniform_flow_tau,
)
from rollout.backends.toy import ToySampler

FAST = settings(max_examples=80, deadline=None)
MAX_L = 12


@st.composite
def simplex_points(draw, min_l=1, max_l=MAX_L, batch=False):
    """A guarded Dirichlet draw: [L+1] (or [B, L+1]) with a hypothesis-drawn seed and concentration.

    Small concentrations make numpy's Dirichlet underflow to exact zeros, which guard_tau must fix.
    """
    steps = draw(st.integers(min_l, max_l))
    conc = draw(hnp.arrays(np.float64, steps + 1, elements=st.floats(0.005, 20.0)))
    seed = draw(st.integers(0, 2**32 - 1))
    size = (draw(st.integers(1, 4)),) if batch else None
    raw = np.random.default_rng(seed).dirichlet(conc, size=size)
    return steps, guard_tau(raw)


@st.composite
def decreasing_times(draw, min_l=1, max_l=MAX_L):
    """[L] strictly decreasing times in (0, 1)."""
    steps = draw(st.integers(min_l, max_l))
    vals = draw(hnp.arrays(np.float64, steps, elements=st.floats(1e-6, 1 - 1e-6), unique=True))
    return np.sort(vals)[::-1].copy()


# --- tau -> times ---------------------------------------------------------------------------------


@FAST
@given(point=simplex_points(batch=True))
def test_times_strictly_decreasing_inside_unit_interval(point):
    steps, tau = point
    for times in (times_from_tau(tau), times_from_tau(torch.from_numpy(tau)).numpy()):
        assert times.shape == tau.shape[:-1] + (steps,)
        assert np.all(times > 0.0) and np.all(times < 1.0), times
        assert np.all(np.diff(times, axis=-1) < 0.0), times
        # and the step ends t_2 .. t_L, 0 are strictly below the times: no zero-length step
        assert np.all(step_ends(times) < times)


@FAST
@given(point=simplex_points(batch=True))
def test_times_formula(point):
    """t_k = 1 - sum_{j<=k} tau_j, written as a loop."""
    steps, tau = point
    times = times_from_tau(tau)
    for b in range(tau.shape[0]):
        for k in range(steps):
            assert times[b, k] == pytest.approx(1.0 - sum(tau[b, : k + 1]), abs=1e-13)
        # tau_{L+1} = t_L: the last step, from t_L to 0
        assert times[b, -1] == pytest.approx(tau[b, -1], abs=1e-13)


@FAST
@given(point=simplex_points(batch=True))
def test_round_trip_tau_times_tau(point):
    _, tau = point
    back = tau_from_times(times_from_tau(tau))
    assert back.dtype == np.float64
    np.testing.assert_allclose(back, tau, rtol=0, atol=1e-12)
    t = torch.from_numpy(tau)
    back_t = tau_from_times(times_from_tau(t))
    assert isinstance(back_t, torch.Tensor) and back_t.dtype == torch.float64
    np.testing.assert_allclose(back_t.numpy(), tau, rtol=0, atol=1e-12)


@FAST
@given(times=decreasing_times())
def test_round_trip_times_tau_times(times):
    tau = tau_from_times(times)
    assert tau.shape == (times.shape[0] + 1,)
    assert np.all(tau > 0.0)
    assert tau.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(times_from_tau(tau), times, rtol=0, atol=1e-12)
    tt = torch.from_numpy(times)
    tau_t = tau_from_times(tt)
    assert isinstance(tau_t, torch.Tensor) and tau_t.dtype == torch.float64
    np.testing.assert_allclose(tau_t.numpy(), tau, rtol=0, atol=1e-15)
    np.testing.assert_allclose(times_from_tau(tau_t).numpy(), times, rtol=0, atol=1e-12)
    check_tau(tau, times.shape[0])


def test_step_ends():
    times = np.array([[0.9, 0.5, 0.2], [0.7, 0.3, 0.1]])
    np.testing.assert_array_equal(step_ends(times), [[0.5, 0.2, 0.0], [0.3, 0.1, 0.0]])
    np.testing.assert_array_equal(step_ends(torch.from_numpy(times)).numpy(), step_ends(times))


def test_shape_errors():
    with pytest.raises(ValueError, match="L\\+1"):
        times_from_tau(np.array([1.0]))
    with pytest.raises(ValueError, match="at least one"):
        tau_from_times(np.zeros((3, 0)))


# --- exactly L model evaluations -----------------------------------------------------------------

SAMPLER = ToySampler(dim=4, num_classes=3, modes_per_class=2)


@FAST
@given(point=simplex_points(batch=True), classes=st.lists(st.integers(0, 2), min_size=4, max_size=4))
def test_toy_sampler_makes_exactly_l_model_evaluations(point, classes):
    steps, tau = point
    n = tau.shape[0]
    times = times_from_tau(tau)
    prompts = [SAMPLER.mixture.prompt(c) for c in classes[:n]]
    noise = SAMPLER.initial_noise(list(range(n)))
    calls = []
    real = SAMPLER.mixture.velocity

    def counting(x, t, cls):
        calls.append(np.array(t, dtype=np.float64, copy=True))
        return real(x, t, cls)

    SAMPLER.mixture.velocity = counting
    try:
        x = SAMPLER.sample(prompts, noise, times)
    finally:
        del SAMPLER.mixture.velocity  # back to the class's method
    assert len(calls) == steps
    # evaluated at t_1 .. t_L, in that order, each sample at its own times
    np.testing.assert_array_equal(np.stack(calls, axis=1), times)
    assert x.shape == noise.shape and np.all(np.isfinite(x))


def test_toy_sampler_default_schedule_evaluations():
    steps = 7
    times = np.tile(times_from_tau(SAMPLER.default_tau(steps)), (2, 1))
    calls = []
    real = SAMPLER.mixture.velocity
    SAMPLER.mixture.velocity = lambda x, t, cls: (calls.append(np.array(t)), real(x, t, cls))[1]
    try:
        SAMPLER.sample(["class 0", "class 1"], SAMPLER.initial_noise([0, 1]), times)
    finally:
        del SAMPLER.mixture.velocity
    assert len(calls) == steps
    np.testing.assert_allclose(calls[0], [1.0, 1.0])


# --- default schedules ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 60))
def test_uniform_flow_tau_is_linspace(steps):
    tau = uniform_flow_tau(steps)
    assert tau.shape == (steps + 1,) and tau.dtype == np.float64
    np.testing.assert_allclose(times_from_tau(tau), np.linspace(1.0, 1.0 / steps, steps), rtol=0, atol=1e-12)
    assert tau[0] == pytest.approx(0.0, abs=1e-15)  # nothing skipped: the model starts at t = 1
    np.testing.assert_allclose(tau[1:], np.full(steps, 1.0 / steps), rtol=0, atol=1e-12)
    assert tau.sum() == pytest.approx(1.0, abs=1e-12)
    check_tau(tau, steps)


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 60))
def test_shifted_flow_tau_with_unit_shift_is_uniform(steps):
    np.testing.assert_allclose(shifted_flow_tau(steps, 1.0), uniform_flow_tau(steps), rtol=0, atol=1e-14)


@FAST
@given(steps=st.integers(1, 40), shift=st.floats(0.5, 20.0))
def test_shifted_flow_tau(steps, shift):
    tau = shifted_flow_tau(steps, shift)
    u = np.linspace(1.0, 1.0 / steps, steps)
    want = shift * u / (1.0 + (shift - 1.0) * u)
    times = times_from_tau(tau)
    np.testing.assert_allclose(times, want, rtol=0, atol=1e-12)
    assert times[0] == pytest.approx(1.0, abs=1e-12)
    assert np.all(times > 0) and np.all(np.diff(times) < 0)
    assert tau.sum() == pytest.approx(1.0, abs=1e-12)
    check_tau(tau, steps)


@pytest.mark.parametrize("shift", [0.1, 0.2, 0.3])
def test_shifted_flow_tau_small_shift_stays_on_simplex(shift):
    """An edge case: for a shift below 1/2, s*1 / (1 + (s-1)*1) rounds above 1, so t_1 > 1 and
    tau_1 < 0. The result should still be a point of the simplex (docs/method.md)."""
    for steps in (1, 5, 20):
        tau = shifted_flow_tau(steps, shift)
        assert np.all(tau >= 0.0), (steps, tau[:2])
        assert times_from_tau(tau)[0] <= 1.0
        check_tau(tau, steps)


# --- guard_tau, interior, check_tau ----------------------------------------------------------------


@FAST
@given(
    steps=st.integers(1, MAX_L),
    seed=st.integers(0, 2**32 - 1),
    zeros=st.integers(1, MAX_L),
    use_torch=st.booleans(),
)
def test_guard_tau_removes_zeros_keeps_sum(steps, seed, zeros, use_torch):
    rng = np.random.default_rng(seed)
    tau = rng.dirichlet(np.ones(steps + 1))
    tau[rng.choice(steps + 1, size=min(zeros, steps), replace=False)] = 0.0  # at least one stays > 0
    tau = tau / tau.sum()
    g = guard_tau(torch.from_numpy(tau)).numpy() if use_torch else guard_tau(tau)
    assert g.shape == tau.shape
    assert np.all(g > 0.0)
    assert np.min(g) >= TAU_FLOOR / (1 + (steps + 1) * TAU_FLOOR) * (1 - 1e-12)
    assert g.sum() == pytest.approx(1.0, abs=1e-12)
    times = times_from_tau(g)
    assert np.all(np.diff(times) < 0) and times[0] < 1.0 and times[-1] > 0.0
    check_tau(g, steps)


@FAST
@given(steps=st.integers(1, MAX_L), seed=st.integers(0, 2**32 - 1), use_torch=st.booleans())
def test_guard_tau_leaves_points_above_the_floor_alone(steps, seed, use_torch):
    raw = np.random.default_rng(seed).dirichlet(np.ones(steps + 1))
    tau = 0.5 * raw + 0.5 / (steps + 1)  # every component >= 1/(2(L+1)) > TAU_FLOOR
    g = guard_tau(torch.from_numpy(tau)).numpy() if use_torch else guard_tau(tau)
    np.testing.assert_allclose(g, tau, rtol=0, atol=1e-15)


@FAST
@given(point=simplex_points(batch=True))
def test_guard_tau_nearly_idempotent(point):
    """Guarding a guarded point moves it by no more than the floor's rounding (components may sit
    a hair below TAU_FLOOR after the renormalisation)."""
    steps, tau = point
    np.testing.assert_allclose(guard_tau(tau), tau, rtol=0, atol=2 * (steps + 1) ** 2 * TAU_FLOOR**2)


def test_guard_tau_batched_rows_independent():
    tau = np.array([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    g = guard_tau(tau)
    np.testing.assert_allclose(g.sum(-1), [1.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(g[1], tau[1], atol=1e-15)
    assert np.all(g > 0)


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 40))
def test_interior(steps):
    tau = uniform_flow_tau(steps)
    p = interior(tau)
    assert np.all(p >= 1e-3 / (1 + (steps + 1) * 1e-3) * (1 - 1e-12))
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.max(np.abs(p - tau)) <= 2e-3
    check_tau(p, steps)


@FAST
@given(point=simplex_points(batch=True))
def test_check_tau_accepts_guarded_draws(point):
    steps, tau = point
    check_tau(tau, steps)


def test_check_tau_rejects_bad_input():
    good = np.array([0.1, 0.2, 0.3, 0.4])  # L = 3
    check_tau(good, 3)
    check_tau(uniform_flow_tau(3), 3)  # tau_1 = 0 (start at t = 1) is the stock default: allowed
    with pytest.raises(ValueError, match="components"):
        check_tau(good, 4)
    with pytest.raises(ValueError, match="components"):
        check_tau(good, 2)
    with pytest.raises(ValueError, match="finite"):
        check_tau(np.array([0.1, np.nan, 0.3, 0.6]), 3)
    with pytest.raises(ValueError, match="finite"):
        check_tau(np.array([0.1, np.inf, 0.3, 0.4]), 3)
    with pytest.raises(ValueError, match="non-negative"):
        check_tau(np.array([-0.1, 0.4, 0.3, 0.4]), 3)
    with pytest.raises(ValueError, match="sum"):
        check_tau(np.array([0.1, 0.2, 0.3, 0.5]), 3)
    with pytest.raises(ValueError, match="sum"):
        check_tau(np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.3]]), 3)
    with pytest.raises(ValueError, match="coincide"):  # t_1 == t_2
        check_tau(np.array([0.1, 0.0, 0.5, 0.4]), 3)
    with pytest.raises(ValueError, match="coincide"):  # a zero inner component in one row of a batch
        check_tau(np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.6, 0.0, 0.3]]), 3)


@pytest.mark.parametrize(
    "tau,steps",
    [
        (np.array([0.1, 0.2, 0.7, 0.0]), 3),  # t_3 = 0: the last evaluation at t = 0, a zero-length step
        (np.array([1.0, 0.0]), 1),  # L = 1: t_1 = 0, the one evaluation does nothing
    ],
)
def test_check_tau_rejects_zero_last_component(tau, steps):
    """docs/method.md: 1 > t_1 > ... > t_L > 0 and tau_{L+1} = t_L is the last step to 0, so a zero
    last component (t_L = t_{L+1} = 0) is two coinciding times and a wasted evaluation."""
    with pytest.raises(ValueError):
        check_tau(tau, steps)


def test_ays_at_its_own_ten_steps_is_the_published_schedule():
    """Align Your Steps at L = 10 gives back diffusers' AysSchedules sigmas (through our time map),
    at other L a log-linear resampling that starts at t = 1 and keeps decreasing."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.schedulers import AysSchedules

    from common.schedule import ays_tau, epsilon_sigmas, loglinear_interp, times_from_tau

    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    train = (((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).numpy()
    for key in ("StableDiffusionSigmas", "StableDiffusionXLSigmas"):
        ays = np.asarray(AysSchedules[key])
        times = times_from_tau(ays_tau(ays, 10, train))
        # (the published 14.615 is the largest training sigma, 14.6146, rounded: it maps to t = 1)
        np.testing.assert_allclose(epsilon_sigmas(times, train), ays[:-1], rtol=1e-4)
        for steps in (2, 4, 7):
            t = times_from_tau(ays_tau(ays, steps, train))
            assert len(t) == steps and t[0] == pytest.approx(1.0) and np.all(np.diff(t) < 0)
    np.testing.assert_allclose(loglinear_interp(np.array([4.0, 2.0, 1.0]), 3), [4.0, 2.0, 1.0])
    np.testing.assert_allclose(loglinear_interp(np.array([4.0, 1.0]), 3), [4.0, 2.0, 1.0])
