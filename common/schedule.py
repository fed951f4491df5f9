"""Schedule maths: the simplex point tau <-> the L model-evaluation times (DESIGN.md section 1).

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

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)

#: Smallest component a sampled tau may have. A Dirichlet draw with small alpha can underflow to 0
#: (two equal times, a zero-length step and a log-density of -inf); components are floored here
#: and the point renormalised, and the floored point is both executed and scored.
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
