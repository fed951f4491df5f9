"""The system's own overhead: the real training loop on the simulated backend, against the time
the sampler alone needs, as the number of rollout workers grows.

    cd <repo> && python bench/overhead.py --png docs/img/overhead.png   # W = 1..32, Flux shapes, ~15 min on 2 cores
    python bench/overhead.py --workers 1 2 4 --iterations 3             # a quick look (its PNG: overhead.png)
    python bench/overhead.py --policy paper --worker-gpus 1             # the paper's 20.3M policy, workers on a GPU

Every worker sleeps ``--seconds-per-image-step`` per image per model evaluation and returns
images of ``--image-size`` (the simulated backend, `rollout/backends/simulated.py`); the
simulated reward sleeps ``--reward-seconds-per-image``. The ideal iteration is the busiest
worker's sampler time: C cut into requests as the loop cuts it and dealt round robin, each
request its contexts x K x L x cost plus ``--seconds-per-call`` (ceil(C / W) x K x L x cost with
one context per request or one request per worker); all else (dispatch, the object store,
scoring that does not overlap sampling, the learner's update and the weight broadcast) is
overhead. Sleep-based costs let 32 workers share 2 cores: each actor reserves a fraction of a
CPU. The policy is a small one by default (``--policy small``: 1.9M parameters on Flux shapes, a
tenth of the paper's); ``--policy paper`` is configs/flux_dev_hps.yaml's 20.3M, whose CPU update
takes seconds: for a GPU learner (``learner.device`` is cuda wherever one is seen), with
``--worker-gpus`` so the workers' forward runs on a GPU too. The timings compare clocks of the
learner, the workers and the reward servers: one machine, as here, or a cluster whose clocks
agree to well under a millisecond.

Per worker count it prints: wall / ideal (the mean over iterations after the first; one step off
policy, after the second); the same without the learner's update and broadcast (what the system
costs around a learner that takes no time, as a GPU learner nearly does); the learner side as a
share of the iteration; the share of scoring time that overlapped sampling; the scoring tail
(the last score's end minus the last image's: on policy every worker waits it out, and it is at
least the last wave's images x the reward's cost / reward servers, since every worker's last
request ends at once); the collect latency (the last result on an actor to the learner having
them all); the broadcast's bytes and seconds, and the slowest worker's read of the new version
(its copy into the worker's policy; on policy it delays that worker's sampling); and the
dispatch skew (the last worker's start minus the first's); and wall / ideal again one step off
policy (``learner.pipeline``: the next rollouts sample while the learner updates, so its time
hides behind sampling). It writes a PNG of the ratios. The last line is ``overhead ratio at 16
workers: X`` (on policy; or at the largest W if 16 is not measured).

    python bench/overhead.py --micro-batch 0 --broadcast-dtype float32   # one request per worker, fp32
    python bench/overhead.py                                              # micro-batches of 1, bf16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python bench/overhead.py), not installed
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from common.config import RolloutConfig, load_config  # noqa: E402
from learner.groups import request_size  # noqa: E402
from learner.metrics import read_jsonl  # noqa: E402


@dataclass
class Row:
    workers: int
    reward_servers: int
    wall_s: float  # mean iteration wall time after the first
    ideal_s: float  # the busiest worker's sampler time
    ratio: float  # wall / ideal
    outside_learner: float  # (wall - update and broadcast) / ideal
    learner_share: float  # update + broadcast, as a share of the iteration
    scoring_overlap: float  # share of scoring time during which a worker was sampling
    broadcast_mb: float  # MiB
    broadcast_s: float
    weights_load_s: float  # the slowest worker's read of a new version (0 where the workers held it)
    dispatch_skew_s: float
    scoring_tail_s: float  # scoring after the last image (on policy the workers wait it out)
    collect_latency_s: float  # the last result on an actor to the learner having them all
    iterations: int
    pipelined_ratio: float | None = None  # wall / ideal one step off policy (learner.pipeline)


def ideal_seconds(
    contexts: int, workers: int, micro_batch: int, k: int, steps: int, per_image_step: float, per_call: float
) -> float:
    """The busiest worker's sampler time: C cut into requests as the loop cuts it (micro-batches of
    ``micro_batch`` contexts, or 0: evenly, one request per worker; ``RolloutGroup.requests``) and
    dealt round robin over the workers (``Dispatcher._launch``), each request its fixed cost plus
    its contexts x K x L model evaluations. With micro-batches of 2 over 16 workers and C = 32 the
    first 16 requests fill every worker, so the busiest samples one request, not ceil(2 / 2)."""
    n = request_size(contexts, workers, micro_batch)
    load = [0.0] * workers
    for j, start in enumerate(range(0, contexts, n)):
        load[j % workers] += per_call + min(n, contexts - start) * k * steps * per_image_step
    return max(load)


def paper_policy() -> dict[str, Any]:
    """The paper's Flux policy (about 20M parameters): configs/flux_dev_hps.yaml's."""
    import yaml

    return dict(yaml.safe_load((REPO / "configs" / "flux_dev_hps.yaml").read_text())["policy"])


def run_one(args: argparse.Namespace, workers: int, out: Path, pipeline: bool = False) -> Row:
    from learner.loop import train

    servers = args.reward_servers or math.ceil(workers / 16)
    actors = workers + servers
    cpus = min(0.5, (args.cpus - 0.5) / actors)  # the learner keeps half a core
    over = {
        "experiment": {"name": f"W{workers}{'-pipelined' if pipeline else ''}", "output_dir": str(out), "seed": 0},
        "sampler": {
            "backend": "simulated",
            "simulated": {
                "preset": args.preset,
                "image_size": args.image_size,
                "seconds_per_image_step": args.seconds_per_image_step,
                "seconds_per_call": args.seconds_per_call,
            },
        },
        "policy": args.policy_settings,
        "rollout": {
            "num_workers": workers,
            "num_cpus": cpus,
            "num_gpus": args.worker_gpus and args.worker_gpus / workers,
            "k": args.k,
            "steps": args.steps,
            "contexts_per_iter": args.contexts,
            "reference_steps": 0,
            "micro_batch": args.micro_batch or None,
            "image_threads": args.image_threads,
        },
        "rewards": [
            {
                "name": "simulated",
                "kwargs": {"seconds_per_image": args.reward_seconds_per_image},
                "num_servers": servers,
                "num_cpus": cpus,
            }
        ],
        "learner": {
            "iterations": args.iterations,
            "checkpoint_every": 10**6,
            "eval_metrics": [],
            "global_baseline": False,
            "plots": False,
            "progress": False,
            "rollout_log": False,
            "broadcast_dtype": args.broadcast_dtype,
            "pipeline": pipeline,
        },
        "ray": {"num_cpus": args.cpus},
    }
    cfg = load_config([], **over)
    train(cfg, final_eval=False)
    # Warm-up off: the first iteration; one step off policy also the second, since a step there is
    # S + U(n) - U(n-1) (sampling, this update, minus the last one, which it overlapped), so the
    # mean telescopes to S + (U(last) - U(first)) / n and a slow first update would pull it down.
    skip = 2 if pipeline else 1
    rows = [m for m in read_jsonl(cfg.run_dir / "metrics.jsonl") if "system/step_seconds" in m][skip:]
    wall = float(np.mean([m["system/step_seconds"] for m in rows]))
    ideal = ideal_seconds(
        args.contexts, workers, args.micro_batch, args.k, args.steps, args.seconds_per_image_step, args.seconds_per_call
    )
    learner = float(np.mean([m["system/learner_seconds"] for m in rows]))
    return Row(
        workers=workers,
        reward_servers=servers,
        wall_s=wall,
        ideal_s=ideal,
        ratio=wall / ideal,
        outside_learner=(wall - learner) / ideal,
        learner_share=learner / wall,
        scoring_overlap=float(np.nanmean([m["system/scoring_overlap"] for m in rows])),
        broadcast_mb=float(rows[-1]["system/broadcast_bytes"]) / 2**20,
        broadcast_s=float(np.mean([m["system/broadcast_seconds"] for m in rows])),
        weights_load_s=float(np.mean([m["system/weights_load_seconds"] for m in rows])),
        dispatch_skew_s=float(np.mean([m["system/dispatch_skew_s"] for m in rows])),
        scoring_tail_s=float(np.mean([m["system/scoring_tail_s"] for m in rows])),
        collect_latency_s=float(np.mean([m["system/collect_latency_s"] for m in rows])),
        iterations=len(rows),
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| workers | reward servers | wall (s) | ideal (s) | wall / ideal | without the learner | learner share"
        " | scoring overlapped | scoring tail (ms) | collect (ms) | broadcast (MiB, s) | worker read (ms)"
        " | dispatch skew (ms) | one step off: wall / ideal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        off = "-" if r.pipelined_ratio is None else f"{r.pipelined_ratio:.3f}"
        lines.append(
            f"| {r.workers} | {r.reward_servers} | {r.wall_s:.3f} | {r.ideal_s:.3f} | {r.ratio:.3f} |"
            f" {r.outside_learner:.3f} | {r.learner_share:.1%} | {r.scoring_overlap:.0%} |"
            f" {1000 * r.scoring_tail_s:.0f} | {1000 * r.collect_latency_s:.0f} |"
            f" {r.broadcast_mb:.2f}, {r.broadcast_s:.3f} | {1000 * r.weights_load_s:.0f} |"
            f" {1000 * r.dispatch_skew_s:.0f} | {off} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r.workers for r in rows], [r.ratio for r in rows], "o-", label="wall / ideal")
    ax.plot([r.workers for r in rows], [r.outside_learner for r in rows], "s--", label="without the learner's step")
    off = [r for r in rows if r.pipelined_ratio is not None]
    if off:
        ax.plot([r.workers for r in off], [r.pipelined_ratio for r in off], "^-", label="one step off policy")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rollout workers")
    ax.set_ylabel("iteration wall / sampler time")
    ax.set_title("overhead on the simulated backend")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python bench/overhead.py", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument(
        "--reward-servers", type=int, default=0, help="Reward servers (0: one per 16 workers, at least one)."
    )
    p.add_argument(
        "--micro-batch", type=int, default=1, help="Contexts per request (rollout.micro_batch); 0: one per worker."
    )
    p.add_argument(
        "--image-threads",
        type=int,
        default=RolloutConfig.model_fields["image_threads"].default,
        help="Threads each worker downscales its images on (rollout.image_threads).",
    )
    p.add_argument("--broadcast-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false", help="Skip the one-step-off-policy runs.")
    p.add_argument(
        "--iterations",
        type=int,
        default=4,
        help="Iterations per worker count (the first is warm-up; one step off policy, the first two).",
    )
    p.add_argument("--contexts", type=int, default=32, help="C: contexts per iteration.")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="L: model evaluations per sample.")
    p.add_argument("--preset", default="flux", help="Backbone shapes of the simulated sampler (flux, sd3, sdxl, tiny).")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--seconds-per-image-step", type=float, default=0.025)
    p.add_argument("--seconds-per-call", type=float, default=0.0)
    p.add_argument("--reward-seconds-per-image", type=float, default=0.004, help="About 3%% of sampling by default.")
    p.add_argument(
        "--policy",
        choices=["small", "paper"],
        default="small",
        help="small: --widths and --head-hidden (1.9M parameters on Flux shapes by default, a tenth of the paper's);"
        " paper: configs/flux_dev_hps.yaml's policy, the paper's 20.3M (a learner step of seconds on a CPU).",
    )
    p.add_argument("--widths", type=int, nargs="+", default=[32, 32, 64, 64], help="The small policy's block widths.")
    p.add_argument("--head-hidden", type=int, default=128, help="The small policy's head width.")
    p.add_argument("--cpus", type=float, default=2.0, help="CPUs of the local Ray cluster.")
    p.add_argument(
        "--worker-gpus",
        type=float,
        default=0.0,
        help="GPUs shared by the rollout workers, each taking an equal share (rollout.num_gpus = this / W), so"
        " their policy forward runs there; 0: on the CPU.",
    )
    p.add_argument(
        "--png",
        type=Path,
        default=Path("overhead.png"),
        help="The scaling curve (docs/img/overhead.png is the README's); '' for none.",
    )
    p.add_argument("--json", type=Path, help="Write the rows here as JSON.")
    args = p.parse_args(argv)
    if args.iterations < 2 + args.pipeline:
        p.error(
            f"--iterations {args.iterations}: each run's first iteration is warm-up (one step off policy, its first"
            f" two), so at least {2 + args.pipeline} are needed{'' if not args.pipeline else ' (or --no-pipeline)'}"
        )
    if args.cpus < 1:
        p.error(f"--cpus {args.cpus}: the learner keeps half a core, every actor a share of the rest; give 1 or more")
    if args.worker_gpus < 0:
        p.error(f"--worker-gpus {args.worker_gpus}: must be 0 or more")
    if args.policy == "paper":
        args.policy_settings = paper_policy()
    else:
        divides = [g for g in range(1, 9) if all(w % g == 0 for w in args.widths)]  # GroupNorm's groups
        args.policy_settings = {"widths": args.widths, "groups": max(divides), "head_hidden": args.head_hidden}
    for w in args.workers:  # the requests an iteration is cut into
        requests = math.ceil(args.contexts / request_size(args.contexts, w, args.micro_batch))
        if requests < w:
            print(f"note: at W = {w} an iteration is {requests} requests: {w - requests} workers sit idle")

    import ray

    rows = []
    with tempfile.TemporaryDirectory(prefix="steinsched-overhead-") as tmp:
        for w in args.workers:
            start = time.perf_counter()
            for pipeline in (False, True) if args.pipeline else (False,):
                fresh = not ray.is_initialized()  # a fresh cluster per run, unless one is given
                if fresh:
                    ray.init(num_cpus=math.ceil(args.cpus), include_dashboard=False, log_to_driver=False)
                try:
                    row = run_one(args, w, Path(tmp), pipeline)
                finally:
                    if fresh:
                        ray.shutdown()
                if pipeline:
                    rows[-1].pipelined_ratio = row.ratio
                else:
                    rows.append(row)
            off = "" if rows[-1].pipelined_ratio is None else f", one step off {rows[-1].pipelined_ratio:.3f}"
            print(f"W={w}: wall/ideal {rows[-1].ratio:.3f}{off} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(table(rows))
    if args.png != Path(""):  # --png '': none
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, args.png)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    last = next((r for r in rows if r.workers == 16), max(rows, key=lambda r: r.workers))
    print(f"overhead ratio at {last.workers} workers: {last.ratio:.3f}")
    return rows


if __name__ == "__main__":
    main()
