"""Pictures of a run, written into its run directory (matplotlib, no display needed).

- ``schedules.png``: the learned schedules' step positions per prompt (one row of dots per
  held-out noise) beside the default schedule, and the density of the evaluation times t along
  the time axis (as in the paper's Figure 1).
- ``samples.png``: samples of the default and the learned schedules, same prompts and noises.
- ``reward_curve.png``: the training reward per iteration and the held-out evaluations.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.schedule import times_from_tau  # noqa: E402

COLORS = {
    "default": "black",
    "learned global": "tab:orange",
    "learned instance-level": "tab:blue",
    "uniform-in-t": "tab:gray",
    "AYS": "tab:green",
}


def _finish(fig, path: Path, tb: Any = None, tag: str = "", step: int = 0) -> None:
    """Write ``fig`` to ``path`` and, given a ``TensorBoardLogger``, to TensorBoard as ``tag``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    if tb is not None:
        tb.figure(tag, fig, step)
    plt.close(fig)


def plot_schedules(
    path: Path,
    prompts: list[str],
    taus: dict[str, np.ndarray],
    learned: str,
    per_prompt: int = 8,
    tb: Any = None,
    step: int = 0,
) -> None:
    """``taus[name]``: [N, L+1] schedules of the held-out contexts, ``prompts`` [N] their prompts."""
    names = sorted(set(prompts), key=prompts.index)
    fig, (ax, axd) = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 2), gridspec_kw={"width_ratios": [3, 2]})
    times = {k: times_from_tau(v) for k, v in taus.items()}
    for row, p in enumerate(names):
        idx = [i for i, q in enumerate(prompts) if q == p][:per_prompt]
        for j, i in enumerate(idx):
            y = row + (j - len(idx) / 2) * 0.6 / max(len(idx), 1)
            ax.scatter(
                times[learned][i],
                np.full(times[learned].shape[1], y),
                s=10,
                color="tab:blue",
                alpha=0.8,
                label=f"{learned} (one row per noise)" if row == j == 0 else None,
            )
        for k, color in COLORS.items():
            if k in times and k != learned:
                ax.scatter(
                    times[k][idx[0]],
                    np.full(times[k].shape[1], row + 0.4),
                    marker="|",
                    s=120,
                    color=color,
                    label=k if row == 0 else None,
                )
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlim(1.02, -0.02)
    ax.set_xlabel("t (1 = noise, 0 = data): where the model is evaluated")
    ax.set_title("evaluation times per prompt")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    bins = np.linspace(0, 1, 41)
    axd.hist(times[learned].ravel(), bins=bins, density=True, alpha=0.6, color="tab:blue", label=learned)
    for k, color in COLORS.items():
        if k in times and k != learned:
            for t in times[k][0]:
                axd.axvline(t, color=color, lw=1.5, ls="--", label=k if t == times[k][0][0] else None)
    axd.set_xlim(1, 0)
    axd.set_xlabel("t")
    axd.set_ylabel("density of evaluation times")
    axd.set_title("where the steps go")
    axd.legend(fontsize=8)
    _finish(fig, path, tb, "pictures/schedules", step)


def plot_samples(path: Path, prompts: list[str], images: dict[str, np.ndarray], tb: Any = None, step: int = 0) -> None:
    """``images[name]``: [N, H, W] (or [N, H, W, 3]) in [0, 1] or uint8, same contexts per name."""
    n = len(prompts)
    fig, axs = plt.subplots(len(images), n, figsize=(1.1 * n, 1.3 * len(images) + 0.6), squeeze=False)
    for r, (name, imgs) in enumerate(images.items()):
        for c in range(n):
            a = axs[r, c]
            img = np.asarray(imgs[c])
            a.imshow(
                img.squeeze(),
                cmap="gray_r" if img.squeeze().ndim == 2 else None,
                vmin=0,
                vmax=255 if img.dtype == np.uint8 else 1,
            )
            a.set_xticks([])
            a.set_yticks([])
            if c == 0:
                a.set_ylabel(name, fontsize=8)
            if r == 0:
                a.set_title(textwrap.fill(prompts[c], 14), fontsize=6)
    fig.suptitle("same prompts, same noises; rows: schedule", fontsize=9)
    _finish(fig, path, tb, "pictures/samples", step)


def plot_reward_curve(path: Path, rows: list[dict], tb: Any = None, step: int = 0) -> None:
    train = [(m["step"], m["rollout/reward_mean"]) for m in rows if "rollout/reward_mean" in m]
    evals = {k for m in rows for k in m if k.startswith("eval/") and k.endswith("/reward") and " - " not in k}
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        x, y = map(np.asarray, zip(*train, strict=True))
        ax.plot(x, y, color="tab:blue", alpha=0.3, lw=0.8, label="training reward")
        w = max(1, len(y) // 25)
        if len(y) >= w:
            ax.plot(
                x[w - 1 :], np.convolve(y, np.ones(w) / w, mode="valid"), color="tab:blue", label=f"moving mean ({w})"
            )
    for k in sorted(evals):
        pts = [(m["step"], m[k]) for m in rows if k in m]
        ax.plot(*zip(*pts, strict=True), marker="o", ls="--", label=k)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    _finish(fig, path, tb, "pictures/reward_curve", step)


def plot_against_steps(
    path: Path,
    table: dict[str, dict[int, tuple[float, float]]],
    measure: str,
    label: str,
    tb: Any = None,
    step: int = 0,
) -> None:
    """``table[method][L] = (mean, s.e.)``: one line per method against L, with +- 1 s.e. bars
    (the paper's Figure 4); ``label``: the measure with which way is better."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_l in table.items():
        ls = sorted(by_l)
        mean = [by_l[n][0] for n in ls]
        se = [by_l[n][1] for n in ls]
        ax.errorbar(ls, mean, yerr=se, marker="o", capsize=3, label=name, color=COLORS.get(name))
    ax.set_xlabel("L (model evaluations per sample)")
    ax.set_ylabel(label)
    ax.set_xticks(sorted({n for by_l in table.values() for n in by_l}))
    ax.legend(fontsize=8)
    ax.set_title(f"held-out {measure} against L")
    _finish(fig, path, tb, f"pictures/{measure}_vs_L", step)
