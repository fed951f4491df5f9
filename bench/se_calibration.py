"""Are the evaluation tables' +- what they say? Their estimators against a known truth, as ratios.

    cd <repo> && python bench/se_calibration.py                    # about 4 minutes on 2 cores
    python bench/se_calibration.py --fd-replicates 50 --mean-replicates 1000   # a minute

1. The clustered standard error of a mean (``learner.stats.mean_se``, CR1 by prompt) on G prompts
   x 100 noises, x = prompt effect + noise effect, 4000 replications with the truth known: its
   size against the estimates' real spread, and how often +- 1.96 s.e. and +- t(G-1) s.e. hold the
   truth (the share a reader of "N s.e." assumes is 95%).
2. The Frechet distance's +- (``rewards.actors.MetricServer``, as an evaluation calls it: 50
   resamples) on the digits sampler, which the project trains itself, at L = 4 on the held-out
   prompts x 100 fresh noises a replicate, under the default and another fixed schedule: each
   set's +- and the paired difference's against the spread of the FD over the replicates, each
   a fresh draw of the held-out noises (the prompts stay the held-out set's).

A ratio of 1 is an honest +-; a coverage near 0.95 an honest reading of 1.96 (or t) s.e.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python bench/se_calibration.py), not installed
    sys.path.insert(0, str(REPO))

from learner.stats import mean_se


def clustered_mean(prompts: int, noises: int, replicates: int, seed: int = 0) -> dict[str, float]:
    """mean_se on ``prompts`` x ``noises`` draws of prompt effect + noise effect (both sd 1)."""
    from scipy.stats import t

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(prompts), noises)
    means, ses = np.empty(replicates), np.empty(replicates)
    for r in range(replicates):
        x = np.repeat(rng.normal(size=prompts), noises) + rng.normal(size=prompts * noises)
        got = mean_se(x, labels)
        means[r], ses[r] = got["mean"], got["se"]
    q = t.ppf(0.975, prompts - 1)
    return {
        "se / spread": float(np.sqrt(np.mean(ses**2)) / means.std()),
        "within 1.96 s.e.": float(np.mean(np.abs(means) <= 1.96 * ses)),
        "within t s.e.": float(np.mean(np.abs(means) <= q * ses)),
        "t": float(q),
    }


def frechet(replicates: int, noises: int, steps: int = 4, seed: int = 12345) -> dict[str, float]:
    """The FD's +- on the digits sampler against its spread over fresh held-out noises."""
    import torch

    from common import digits
    from common.schedule import times_from_tau
    from rewards.actors import MetricServer
    from rollout.backends.digits import DigitsSampler

    torch.set_num_threads(1)
    sampler = DigitsSampler()
    server = MetricServer("digits_fd", {})
    prompts = [p for p in digits.EVAL_PROMPTS for _ in range(noises)]
    default = sampler.default_tau(steps)
    other = np.array([0.0, 0.45, 0.3, 0.17, 0.08])[: steps + 1]
    other = other / other.sum()

    def features(tau: np.ndarray, noise: np.ndarray) -> np.ndarray:
        images = sampler.sample(prompts, noise, np.repeat(times_from_tau(tau)[None], len(prompts), 0))
        return server.metric.features(images, prompts)

    rng = np.random.default_rng(seed)
    fd = {"default": [], "other": [], "difference": []}
    se = {"default": [], "other": [], "difference": []}
    for _ in range(replicates):
        noise = sampler.initial_noise([int(s) for s in rng.integers(0, 2**31, len(prompts))])
        fa, fb = features(default, noise), features(other, noise)
        for key, (value, noise_se) in (
            ("default", server.distance_with_se(fa, strata=prompts)),
            ("other", server.distance_with_se(fb, strata=prompts)),
            ("difference", server.difference_with_se(1, fa, fb, strata=prompts)),
        ):
            fd[key].append(value)
            se[key].append(noise_se)
    out = {}
    for key in fd:
        values, ses = np.asarray(fd[key]), np.asarray(se[key], dtype=float)
        out[f"{key}: FD"] = float(values.mean())
        out[f"{key}: spread"] = float(values.std(ddof=1))
        out[f"{key}: +- / spread"] = float(np.sqrt(np.mean(ses**2)) / values.std(ddof=1))
        out[f"{key}: within 1.96 +-"] = float(np.mean(np.abs(values - values.mean()) <= 1.96 * ses))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[2, 3, 5, 10, 30], help="Prompt counts (part 1).")
    p.add_argument("--mean-replicates", type=int, default=4000)
    p.add_argument("--fd-replicates", type=int, default=200, help="Fresh draws of the held-out noises (part 2).")
    p.add_argument("--noises", type=int, default=100, help="Noises a prompt.")
    args = p.parse_args(argv)
    start = time.monotonic()
    print(f"1. mean_se, clustered by prompt: G prompts x {args.noises} noises, {args.mean_replicates} replications")
    print("| prompts | s.e. / real spread | within 1.96 s.e. | t(G-1) | within t s.e. |")
    print("| --- | --- | --- | --- | --- |")
    for g in args.prompts:
        r = clustered_mean(g, args.noises, args.mean_replicates)
        cells = f"{r['se / spread']:.3f} | {r['within 1.96 s.e.']:.3f} | {r['t']:.2f} | {r['within t s.e.']:.3f}"
        print(f"| {g} | {cells} |")
    if args.fd_replicates >= 2:
        r = frechet(args.fd_replicates, args.noises)
        print(f"\n2. digits FD, L = 4, 10 held-out prompts x {args.noises} fresh noises, {args.fd_replicates} draws")
        print("| set | FD (mean) | real spread | +- / real spread | within 1.96 +- |")
        print("| --- | --- | --- | --- | --- |")
        for key in ("default", "other", "difference"):
            print(
                f"| {key} | {r[f'{key}: FD']:.3f} | {r[f'{key}: spread']:.3f} | {r[f'{key}: +- / spread']:.2f} |"
                f" {r[f'{key}: within 1.96 +-']:.3f} |"
            )
    print(f"({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
