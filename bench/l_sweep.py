"""Reward and gold metric against the step budget L (the shape of the paper's Figure 4).

    cd <repo> && python bench/l_sweep.py                          # digits, L in 2 3 4 8, ~12 min on 2 cores
    python bench/l_sweep.py --steps 2 4 --out runs/l_sweep.png -- --learner.iterations=200
    python bench/l_sweep.py --reuse          # table and figure again from the runs already made

For each L, one run of the real entry point (``learner.main.run``: the learned global schedule,
then the instance-level policy, then the held-out table), all with the same config, seed and
held-out contexts. The table and the figure come from each run's own ``eval.json``: held-out
reward (mean +- standard error clustered by prompt) and the set-level gold metric (the Frechet
distance for digits) of the default, the learned global and the learned instance-level
schedules at every L. Flags after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python bench/l_sweep.py), not installed
    sys.path.insert(0, str(REPO))

from common.config import load_config
from learner.main import run

METHODS = ("default", "learned global", "learned instance-level")


def sweep(config: Path, steps: list[int], output_dir: Path, extra: list[str], reuse: bool = False) -> dict[int, dict]:
    """eval.json of one run per L: {L: {method: {"mean", "se", metric, metric_se...}}}. With
    ``reuse``, a run whose eval.json exists is read, not trained again."""
    out = {}
    for L in steps:
        start = time.perf_counter()
        cfg = load_config(
            [
                "--config",
                str(config),
                f"--rollout.steps={L}",
                f"--experiment.output_dir={output_dir}",
                f"--experiment.name=L{L}",
                "--learner.progress=false",
                "--learner.plots=false",
                *extra,
            ]
        )
        if not (reuse and (cfg.run_dir / "eval.json").exists()):
            cfg.overwrite = True  # the sweep owns its run dirs: a re-run replaces them
            run(cfg)
        out[L] = json.loads((cfg.run_dir / "eval.json").read_text())
        print(f"L={L}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


def _metrics(results: dict[int, dict]) -> list[str]:
    """The set-level metrics of the runs (each with its bootstrap noise under ``<name>_se``: the noises
    resampled within each prompt, paired for a difference row)."""
    skip = ("mean", "se", "n")
    return sorted(
        {m for r in results.values() for s in r.values() for m in s if m not in skip and not m.endswith("_se")}
    )


def table(results: dict[int, dict]) -> str:
    metrics = _metrics(results)
    head = "| L | method | reward (mean +- s.e.) |" + "".join(f" {m} |" for m in metrics)
    rows = [head, "|" + " --- |" * (3 + len(metrics))]
    for L, res in results.items():
        # each method, then the run's paired rows (same prompts and noises: 'a - b'), which tell apart
        # what the sets' +-s cannot
        for name in [n for n in METHODS if n in res] + [n for n in res if " - " in n]:
            if name in res:
                s = res[name]
                cells = "".join(
                    (f" {s[m]:.2f} +- {s[m + '_se']:.2g} |" if m + "_se" in s else f" {s[m]:.2f} |") if m in s else " |"
                    for m in metrics
                )
                rows.append(f"| {L} | {name} | {s['mean']:.5g} +- {s['se']:.2g} |{cells}")
    return "\n".join(rows)


def plot(results: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _metrics(results)
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(5 * (1 + len(metrics)), 4), squeeze=False)
    ls = list(results)
    for name in METHODS:
        rows = [results[L].get(name) for L in ls]
        if any(r is None for r in rows):
            continue
        axes[0][0].errorbar(
            ls, [r["mean"] for r in rows], yerr=[r["se"] for r in rows], marker="o", capsize=3, label=name
        )
        for ax, m in zip(axes[0][1:], metrics, strict=True):
            ax.errorbar(
                ls, [r[m] for r in rows], yerr=[r.get(m + "_se", 0.0) for r in rows], marker="o", capsize=3, label=name
            )
    axes[0][0].set_ylabel("held-out reward (+- s.e., clustered by prompt)")
    for ax, m in zip(axes[0][1:], metrics, strict=True):
        ax.set_ylabel(f"{m} (lower is better; +- bootstrap noise)")
    for ax in axes[0]:
        ax.set_xlabel("L (NFE)")
        ax.set_xticks(ls)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("Held-out reward and gold metric against the step budget")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[int, dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "digits.yaml", help="Config of every run.")
    p.add_argument("--steps", type=int, nargs="+", default=[2, 3, 4, 8], help="The step budgets L.")
    p.add_argument("--output-dir", type=Path, default=REPO / "runs" / "l_sweep", help="Where the runs go.")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "l_sweep.png", help="Where the PNG goes.")
    p.add_argument("--reuse", action="store_true", help="Read the runs that already have an eval.json.")
    args = p.parse_args(argv)
    results = sweep(args.config, args.steps, args.output_dir, extra, args.reuse)
    print(table(results))
    plot(results, args.out)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
