"""Means and standard errors that respect how held-out contexts are drawn.

Held-out contexts are prompts x noises. Samples of one prompt are not independent draws (they
share the prompt's difficulty), so the standard error of a mean, or of a paired difference
between two schedules on the same contexts, is clustered by prompt: the cluster-robust (CR1)
estimator ``se^2 = G/(G-1) * sum_g (sum_{i in g} (x_i - xbar))^2 / n^2`` over G prompts. With one
context per prompt it is the usual ``std/sqrt(n)``. With fewer than 2 prompts no honest standard
error exists and it is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_se(x: np.ndarray, clusters: Sequence | None = None) -> dict[str, float]:
    """{"mean", "se", "n"} of ``x``; ``se`` clustered by ``clusters`` (one label per value) if given."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = len(x)
    if n == 0:
        raise ValueError("mean_se needs at least one value")
    mean = float(x.mean())
    if clusters is None:
        se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        return {"mean": mean, "se": se, "n": n}
    labels = np.asarray(list(clusters))
    if len(labels) != n:
        raise ValueError(f"{n} values but {len(labels)} cluster labels")
    _, idx = np.unique(labels, return_inverse=True)
    g = int(idx.max()) + 1
    if g < 2:
        return {"mean": mean, "se": float("nan"), "n": n}
    sums = np.bincount(idx, weights=x - mean, minlength=g)
    se = math.sqrt(g / (g - 1) * float((sums**2).sum())) / n
    return {"mean": mean, "se": se, "n": n}
