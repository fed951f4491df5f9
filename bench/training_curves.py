"""Training curves of js vs rloo vs xctx at K = 2 on the toy backend, mean over seeds.

    RAY_AUTH_MODE=disabled python bench/training_curves.py            # 3 baselines x 5 seeds
    RAY_AUTH_MODE=disabled python bench/training_curves.py --seeds 2 --iterations 100

Runs the real learner loop (one local Ray cluster for all runs), reads each run's
metrics.jsonl, prints the mean training reward over windows of iterations and the final held-out
gain over the default schedule (mean +- s.e. over seeds), and saves the curves as a PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from common.config import load_config  # noqa: E402
from learner.loop import train  # noqa: E402
from learner.metrics import read_jsonl  # noqa: E402

DIFF = "learned instance-level - default"


def run_one(config: str, out: Path, baseline: str, seed: int, k: int, iterations: int) -> tuple[np.ndarray, float]:
    cfg = load_config(
        ["--config", config],
        experiment={"name": f"{baseline}-s{seed}", "seed": seed, "output_dir": str(out)},
        rollout={"k": k},
        learner={
            "baseline": baseline,
            "iterations": iterations,
            "progress": False,
            "eval_seeds": 50,
            "rollout_log": False,
            "checkpoint_every": iterations,
        },
    )
    with contextlib.redirect_stdout(io.StringIO()):
        res = train(cfg)
    rows = [m for m in read_jsonl(res.run_dir / "metrics.jsonl") if "rollout/reward_mean" in m]
    gain = json.loads((res.run_dir / "eval.json").read_text())[DIFF]["mean"]
    return np.array([m["rollout/reward_mean"] for m in rows]), gain


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/toy.yaml")
    ap.add_argument("--baselines", nargs="+", default=["js", "rloo", "xctx"])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--window", type=int, default=50, help="iterations per row of the printed table")
    ap.add_argument("--out", default="bench/training_curves.png")
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    curves: dict[str, np.ndarray] = {}
    gains: dict[str, np.ndarray] = {}
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for b in args.baselines:
                runs = [run_one(args.config, Path(tmp), b, s, args.k, args.iterations) for s in range(args.seeds)]
                curves[b] = np.stack([r[0] for r in runs])  # [seeds, iterations]
                gains[b] = np.array([r[1] for r in runs])
                print(f"{b}: {args.seeds} runs done ({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        ray.shutdown()

    n = args.seeds
    edges = list(range(0, args.iterations, args.window))
    head = "".join(f"{f'it {e + 1}-{min(e + args.window, args.iterations)}':>16}" for e in edges)
    print(f"\ntraining reward, mean over {n} seeds (+- s.e. over seeds), K={args.k}, {args.config}")
    print(f"{'baseline':<10}{head}{'held-out gain vs default':>30}")
    for b, c in curves.items():
        cells = ""
        for e in edges:
            w = c[:, e : e + args.window].mean(axis=1)
            cells += f"{w.mean():>9.3f} +-{w.std(ddof=1) / np.sqrt(n) if n > 1 else 0:.3f}"
        g = gains[b]
        print(f"{b:<10}{cells}{g.mean():>21.3f} +- {g.std(ddof=1) / np.sqrt(n) if n > 1 else 0:.3f}")
    print(f"wall time {time.perf_counter() - start:.0f} s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    smooth = max(1, args.iterations // 30)
    kernel = np.ones(smooth) / smooth
    for b, c in curves.items():
        m = np.convolve(c.mean(0), kernel, mode="valid")
        se = np.convolve(c.std(0, ddof=1) / np.sqrt(n), kernel, mode="valid") if n > 1 else 0 * m
        x = np.arange(len(m)) + smooth
        ax.plot(x, m, label=b)
        ax.fill_between(x, m - se, m + se, alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"training reward (moving mean of {smooth})")
    ax.set_title(
        f"toy, K={args.k}, L={load_config(['--config', args.config]).rollout.steps}: mean +- s.e. over {n} seeds"
    )
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out}")
    return {"curves": curves, "gains": gains}


if __name__ == "__main__":
    main()
