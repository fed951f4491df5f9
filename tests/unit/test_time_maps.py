"""Time maps of the diffusers backends (common/schedule.py) against diffusers' own schedulers.

Flow models execute sigma = t: the stock schedules are shifted grids (Flux: resolution-dependent
``mu``; SD3: static shift on the scheduler's own grid). Epsilon models map t to the timestep
t*T - 1 and interpolate sigma in the training schedule (t = 0: sigma = 0).
"""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from common.schedule import (
    check_tau,
    dynamic_shift,
    epsilon_model_timesteps,
    epsilon_sigmas,
    epsilon_tau,
    resolution_mu,
    static_shift,
    tau_from_times,
    times_from_tau,
)

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("size", [256, 1024])
def test_flux_default_is_the_dynamic_shift_of_a_uniform_grid(steps, size):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    seq_len = (size // 16) ** 2  # 8x VAE, 2x2 packing
    mu = resolution_mu(seq_len)
    grid = np.linspace(1.0, 1 / steps, steps)
    sched.set_timesteps(sigmas=grid, mu=mu)
    ours = dynamic_shift(grid, mu)
    np.testing.assert_allclose(ours, sched.sigmas[:-1].numpy(), atol=1e-6)
    tau = tau_from_times(ours)
    check_tau(tau, steps)
    assert tau[0] == 0.0  # the stock sampler starts at t = 1
    assert resolution_mu(256) == pytest.approx(0.5) and resolution_mu(4096) == pytest.approx(1.15)


@pytest.mark.parametrize("steps", [1, 5, 28])
def test_sd3_default_is_the_static_shift_of_the_schedulers_grid(steps):
    shift, n = 3.0, 1000
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    # the scheduler's grid runs from its own (already shifted) sigma_max to sigma_min, then shifts again
    grid = np.linspace(1.0, static_shift(1 / n, shift), steps)
    np.testing.assert_allclose(static_shift(grid, shift), sched.sigmas[:-1].numpy(), atol=1e-6)


def test_dynamic_shift_kinds():
    t = np.array([1.0, 0.5, 0.1])
    np.testing.assert_allclose(dynamic_shift(t, 0.0), t)  # mu = 0: no shift (exponential)
    np.testing.assert_allclose(dynamic_shift(t, 1.0, "linear"), t)  # mu = 1: no shift (linear)
    with pytest.raises(ValueError):
        dynamic_shift(t, 1.0, "cubic")


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 5, 30])
def test_epsilon_map_reproduces_euler_grids(spacing, steps):
    sched = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    n = sched.config.num_train_timesteps
    train = (((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).numpy()
    tau = epsilon_tau(sched.timesteps.double().numpy(), n)
    check_tau(tau, steps)
    times = times_from_tau(tau)
    np.testing.assert_allclose(epsilon_model_timesteps(times, n), sched.timesteps.numpy(), atol=1e-6)
    t_all = np.concatenate([times, [0.0]])
    np.testing.assert_allclose(epsilon_sigmas(t_all, train).astype(np.float32), sched.sigmas.numpy(), rtol=1e-6)


def test_epsilon_map_ends():
    sched = EulerDiscreteScheduler(**SD_BETAS)
    train = (((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).numpy()
    n = len(train)
    assert epsilon_sigmas(np.array([0.0]), train)[0] == 0.0  # clean
    assert epsilon_sigmas(np.array([1.0]), train)[0] == pytest.approx(train[-1])  # noisiest
    assert epsilon_sigmas(np.array([1 / n]), train)[0] == pytest.approx(train[0])  # timestep 0
    t = np.linspace(0, 1, 2001)
    assert np.all(np.diff(epsilon_sigmas(t, train)) > 0)  # strictly increasing: distinct times, distinct sigmas
    assert epsilon_model_timesteps(np.array([0.5 / n]), n)[0] == 0.0  # the denoiser never sees t < 0
    with pytest.raises(ValueError):
        epsilon_tau(np.array([500.0, 600.0]), n)
