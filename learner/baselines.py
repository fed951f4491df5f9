"""Reward baselines for a [C, K] reward matrix (docs/method.md; arXiv 2511.22177).

``compute(name, rewards) -> (baseline, diagnostics)``. The baseline has the type (numpy or
torch), dtype and shape of ``rewards``; diagnostics hold ``alpha`` (scalar for ``js``, one per
context for ``js_loco``), ``s2`` and ``d2`` as floats or float64 numpy arrays. Everything is
vectorised; the maths runs in float64.

- none:    0
- mean:    the batch mean
- rloo:    b_ci = sum_{j != i} r_cj / (K - 1)
- xctx:    b_ci = (sum of all r - r_ci) / (C*K - 1)
- js:      b_ci = (1 - alpha) rloo_ci + alpha xctx_ci, with the James-Stein weight
           alpha = (s2/(K-1)) / (s2/(K-1) + d2) from the pooled within-context variance s2 and
           the between-context variance d2 = max(0, var_c(rbar_c) - s2/K)  (paper, Sec. 3.2).
- js_loco: js where context c's weight and cross-context target (the mean of all rewards of
           the other contexts) come from the other contexts only, so b_ci never depends on
           r_ci: strictly unbiased. Needs C >= 3.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

Rewards = TypeVar("Rewards", np.ndarray, torch.Tensor)
NAMES = ("none", "mean", "rloo", "xctx", "js", "js_loco")
MIN_CONTEXTS = {"none": 1, "mean": 1, "rloo": 1, "xctx": 2, "js": 2, "js_loco": 3}


def _rloo(r: torch.Tensor) -> torch.Tensor:
    k = r.shape[1]
    return (r.sum(dim=1, keepdim=True) - r) / (k - 1)


def _xctx(r: torch.Tensor) -> torch.Tensor:
    return (r.sum() - r) / (r.numel() - 1)


def _shrinkage(s2: torch.Tensor, d2: torch.Tensor, k: int) -> torch.Tensor:
    """alpha = (s2/(K-1)) / (s2/(K-1) + d2), and 0 where both variances are 0."""
    noise = s2 / (k - 1)
    total = noise + d2
    return torch.where(total > 0, noise / torch.where(total > 0, total, 1.0), torch.zeros_like(total))


def _js(r: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    c, k = r.shape
    means = r.mean(dim=1)
    s2 = ((r - means[:, None]) ** 2).sum() / (c * (k - 1))
    d2 = torch.clamp(means.var(unbiased=True) - s2 / k, min=0.0)
    alpha = _shrinkage(s2, d2, k)
    b = (1 - alpha) * _rloo(r) + alpha * _xctx(r)
    return b, {"alpha": float(alpha), "s2": float(s2), "d2": float(d2)}


def _js_loco(r: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    c, k = r.shape
    means = r.mean(dim=1)  # [C]
    within = ((r - means[:, None]) ** 2).sum(dim=1)  # [C]
    others = 1.0 - torch.eye(c, dtype=r.dtype, device=r.device)  # [C, C]: row c masks out context c
    s2 = (others @ within) / ((c - 1) * (k - 1))
    target = (others @ means) / (c - 1)  # mean of the other contexts' rewards (equal K each)
    spread = ((means[None, :] - target[:, None]) ** 2 * others).sum(dim=1) / (c - 2)
    d2 = torch.clamp(spread - s2 / k, min=0.0)
    alpha = _shrinkage(s2, d2, k)
    b = (1 - alpha[:, None]) * _rloo(r) + alpha[:, None] * target[:, None]
    return b, {"alpha": alpha.numpy(), "s2": s2.numpy(), "d2": d2.numpy()}


_BASELINES: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]] = {
    "none": lambda r: (torch.zeros_like(r), {}),
    "mean": lambda r: (torch.full_like(r, float(r.mean())), {}),
    "rloo": lambda r: (_rloo(r), {}),
    "xctx": lambda r: (_xctx(r), {}),
    "js": _js,
    "js_loco": _js_loco,
}


def compute(name: str, rewards: Rewards) -> tuple[Rewards, dict[str, Any]]:
    """Baseline ``b`` (same type, dtype, shape as ``rewards``, [C, K]) and its diagnostics."""
    if name not in _BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(NAMES)}")
    if isinstance(rewards, torch.Tensor):
        r = rewards.detach().cpu().double()
    else:
        r = torch.from_numpy(np.asarray(rewards, dtype=np.float64))
    if r.dim() != 2:
        raise ValueError(f"rewards must be a [C, K] matrix, got shape {tuple(r.shape)}")
    c, k = r.shape
    if k < 2:
        raise ValueError(f"baselines need K >= 2 rollouts per context, got K={k}")
    if c < MIN_CONTEXTS[name]:
        raise ValueError(f"baseline {name!r} needs at least {MIN_CONTEXTS[name]} contexts, got C={c}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contain non-finite values")
    b, diag = _BASELINES[name](r)
    if isinstance(rewards, torch.Tensor):
        return b.to(dtype=rewards.dtype, device=rewards.device), diag
    return b.numpy().astype(np.asarray(rewards).dtype, copy=False), diag
