"""Schedule maths: the simplex point tau <-> the L model-evaluation times (docs/method.md).

Execution convention (ours). ``tau`` has L+1 components on the simplex. The times are
``t_k = 1 - sum_{j<=k} tau_j`` for k = 1..L, so ``1 >= t_1 > ... > t_L > 0``. The initial noise
x_T is taken as the state at ``t_1``; the model is evaluated at ``t_1 .. t_L``; solver step k goes
from ``t_k`` to ``t_{k+1}`` with ``t_{L+1} = 0``. Hence ``tau_1`` is the skipped start and
``tau_{L+1} = t_L`` is the length of the last step to 0: exactly L evaluations, and every
component of tau matters.

Everything here runs in float64 (numpy or torch): schedules and log-probs never drop below
float32, and ``guard_tau`` keeps two times from coinciding.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)

#: Smallest component an executed tau may have. A Dirichlet draw with small alpha can underflow
#: to 0 (two equal times, a zero-length step); the executed schedule is the draw floored here and
#: renormalised, while the log-prob of the update stays that of the draw itself (``executed_tau``).
TAU_FLOOR = 1e-6


def times_from_tau(tau: Array) -> Array:
    """[..., L+1] simplex points -> [..., L] evaluation times ``t_k = 1 - sum_{j<=k} tau_j``."""
    if tau.shape[-1] < 2:
        raise ValueError(f"tau needs L+1 >= 2 components, got shape {tuple(tau.shape)}")
    if isinstance(tau, torch.Tensor):
        return 1.0 - torch.cumsum(tau, dim=-1)[..., :-1]
    return 1.0 - np.cumsum(tau, axis=-1)[..., :-1]


def tau_from_times(times: Array) -> Array:
    """[..., L] decreasing times in (0, 1] -> [..., L+1] simplex points (inverse of times_from_tau)."""
    if times.shape[-1] < 1:
        raise ValueError("times needs at least one evaluation")
    if isinstance(times, torch.Tensor):
        one = torch.ones_like(times[..., :1])
        padded = torch.cat([one, times, torch.zeros_like(one)], dim=-1)
        return padded[..., :-1] - padded[..., 1:]
    one = np.ones_like(times[..., :1])
    padded = np.concatenate([one, times, np.zeros_like(one)], axis=-1)
    return padded[..., :-1] - padded[..., 1:]


def step_ends(times: Array) -> Array:
    """[..., L] times -> [..., L] targets of each solver step: ``t_2 .. t_L, 0``."""
    if isinstance(times, torch.Tensor):
        return torch.cat([times[..., 1:], torch.zeros_like(times[..., :1])], dim=-1)
    return np.concatenate([times[..., 1:], np.zeros_like(times[..., :1])], axis=-1)


def guard_tau(tau: Array, floor: float = TAU_FLOOR) -> Array:
    """Floor every component at ``floor`` and renormalise, so the times are strictly decreasing."""
    if isinstance(tau, torch.Tensor):
        tau = tau.clamp_min(floor)
        return tau / tau.sum(dim=-1, keepdim=True)
    tau = np.maximum(tau, floor)
    return tau / tau.sum(axis=-1, keepdims=True)


def executed_tau(log_tau: np.ndarray, floor: float = TAU_FLOOR) -> np.ndarray:
    """The schedule that runs for a draw given as ``log tau`` (``common.policy.sample_log_tau``).

    ``guard_tau(exp(log tau))``: a deterministic function of the draw, so the estimator that uses
    the draw's own log-prob is unbiased for the reward of the executed schedule (docs/method.md).
    """
    log_tau = np.asarray(log_tau, dtype=np.float64)
    tau = np.exp(log_tau - log_tau.max(axis=-1, keepdims=True))
    return guard_tau(tau / tau.sum(axis=-1, keepdims=True), floor)


def check_tau(tau: np.ndarray, steps: int) -> None:
    """Raise if ``tau`` is not a [..., steps+1] point of the simplex with strictly decreasing times."""
    if tau.shape[-1] != steps + 1:
        raise ValueError(f"tau has {tau.shape[-1]} components, expected L+1 = {steps + 1}")
    if not np.all(np.isfinite(tau)) or np.any(tau < 0):
        raise ValueError("tau must be finite and non-negative")
    if not np.allclose(tau.sum(-1), 1.0, atol=1e-6):
        raise ValueError("tau must sum to 1")
    if np.any(tau[..., 1:] <= 0):
        # tau_1 = 0 is the stock start (t_1 = 1); any later zero makes two times coincide or t_L = 0
        raise ValueError("two evaluation times coincide or t_L = 0 (a zero component of tau after the first)")


# --- default schedules, as points of the simplex ---------------------------------------------


def uniform_flow_tau(steps: int) -> np.ndarray:
    """The stock Euler schedule of a rectified-flow sampler with no shift.

    diffusers' flow pipelines evaluate at ``sigmas = linspace(1, 1/L, L)`` and step to 0, which
    is ``tau = (0, 1/L, ..., 1/L)``: the model starts at t = 1 (tau_1 = 0, nothing skipped).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    times = np.linspace(1.0, 1.0 / steps, steps, dtype=np.float64)
    return tau_from_times(times)


def shifted_flow_tau(steps: int, shift: float) -> np.ndarray:
    """The uniform flow schedule after the static time shift ``s*t / (1 + (s-1)*t)`` (SD3, Flux)."""
    times = np.linspace(1.0, 1.0 / steps, steps, dtype=np.float64)
    times = np.minimum(shift * times / (1.0 + (shift - 1.0) * times), 1.0)  # rounding can pass 1
    return tau_from_times(times)


def interior(tau: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """A point strictly inside the simplex next to ``tau`` (for a Dirichlet mean at init)."""
    return guard_tau(np.asarray(tau, dtype=np.float64), floor)


# --- time maps of the diffusers backends (docs/method.md and docs/backends.md) -------------------------
# Flow models (Flux, SD3) execute sigma = t with the scheduler's own shift switched off; their
# stock schedules are shifted grids, reproduced below as points of the simplex. Epsilon models
# (SD1.5, SDXL) map t to their own noise levels and run Euler in sigma.


def static_shift(times: np.ndarray, shift: float) -> np.ndarray:
    """The static time shift ``s*t / (1 + (s-1)*t)`` of FlowMatchEulerDiscreteScheduler (SD3: s = 3)."""
    times = np.asarray(times, dtype=np.float64)
    return shift * times / (1.0 + (shift - 1.0) * times)


def resolution_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent shift parameter: linear in the number of latent tokens.

    Mirrors ``diffusers.pipelines.flux.pipeline_flux.calculate_shift`` (diffusers 0.42).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def dynamic_shift(times: np.ndarray, mu: float, kind: str = "exponential") -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler's resolution-dependent shift of ``times`` (t = 1 stays 1).

    exponential: ``e^mu / (e^mu + (1/t - 1))``; linear: ``mu / (mu + (1/t - 1))``.
    """
    times = np.asarray(times, dtype=np.float64)
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1.0 / times - 1.0))
    if kind == "linear":
        return mu / (mu + (1.0 / times - 1.0))
    raise ValueError(f"unknown time shift type {kind!r}; expected 'exponential' or 'linear'")


def epsilon_timesteps(times: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """Time map of an epsilon model: ``t`` in [0, 1] -> the continuous training timestep ``t*T - 1``.

    t = 1 is the noisiest training timestep T-1, t = 1/T the least noisy one (0), and t = 0 the
    clean sample, a virtual timestep -1 with sigma = 0. This affine map (rather than ``t * (T-1)``)
    makes every stock Euler grid a point of the simplex: 'linspace' grids evaluate the model at
    timestep 0, which must be a time t > 0. The denoiser is never given a timestep below 0 (see
    ``epsilon_model_timesteps``).
    """
    return np.asarray(times, dtype=np.float64) * num_train_timesteps - 1.0


def epsilon_model_timesteps(times: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """The timestep the denoiser is given at ``t``: ``t*T - 1`` floored at 0, its least noisy level
    (only times t < 1/T, below the stock grids' last evaluation, are floored)."""
    return np.maximum(epsilon_timesteps(times, num_train_timesteps), 0.0)


def epsilon_sigmas(times: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Time map of an epsilon model: ``t`` -> its noise level sigma (float64).

    sigma is linearly interpolated at the timestep ``t*T - 1`` in the training schedule
    ``train_sigmas[j] = sqrt((1 - abar_j) / abar_j)`` (as diffusers' EulerDiscreteScheduler
    interpolates its timesteps), extended by sigma = 0 at timestep -1: t = 0 is the clean sample,
    where the stock Euler schedule's last step ends.
    """
    n = len(train_sigmas)
    grid = np.arange(-1, n, dtype=np.float64)
    table = np.concatenate([[0.0], np.asarray(train_sigmas, dtype=np.float64)])
    return np.interp(epsilon_timesteps(times, n), grid, table)


def epsilon_tau(timesteps: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    """A discrete timestep grid (e.g. the stock scheduler's [801, 601, ..., 1]) as a simplex point.

    Inverse of ``epsilon_timesteps``: ``t = (timestep + 1) / T``. A grid that does not start at
    T-1 skips the start: ``tau_1 = 1 - t_1 > 0``.
    """
    times = (np.asarray(timesteps, dtype=np.float64) + 1.0) / num_train_timesteps
    if np.any(np.diff(times) >= 0) or times[0] > 1 or times[-1] <= 0:
        raise ValueError(f"timesteps must decrease strictly within [0, {num_train_timesteps - 1}], got {timesteps}")
    return tau_from_times(times)


def loglinear_interp(values: np.ndarray, steps: int) -> np.ndarray:
    """A decreasing schedule of noise levels resampled to ``steps`` points, linearly in log
    space (how the Align Your Steps paper brings its 10-step schedules to other step counts)."""
    values = np.asarray(values, dtype=np.float64)
    if np.any(values <= 0) or np.any(np.diff(values) >= 0):
        raise ValueError("loglinear_interp needs strictly decreasing positive values")
    xs = np.linspace(0.0, 1.0, len(values))
    return np.exp(np.interp(np.linspace(0.0, 1.0, steps), xs, np.log(values[::-1])))[::-1]


def ays_tau(ays_sigmas: np.ndarray, steps: int, train_sigmas: np.ndarray) -> np.ndarray:
    """An Align Your Steps schedule (diffusers' ``AysSchedules`` sigmas, ending in 0) at ``steps``
    NFE, as a point of the simplex of an epsilon model with training noise levels ``train_sigmas``.

    Its non-zero sigmas are resampled log-linearly to ``steps`` (the AYS paper's interpolation),
    then each sigma is mapped back to a time through the inverse of ``epsilon_sigmas``.
    """
    sig = np.asarray(ays_sigmas, dtype=np.float64)
    sig = loglinear_interp(sig[sig > 0], steps)
    n = len(train_sigmas)
    table = np.concatenate([[0.0], np.asarray(train_sigmas, dtype=np.float64)])  # increasing in the timestep
    timesteps = np.interp(np.minimum(sig, table[-1]), table, np.arange(-1, n, dtype=np.float64))
    return tau_from_times((timesteps + 1.0) / n)
