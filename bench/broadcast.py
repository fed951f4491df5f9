"""How long a new version of the weights takes to reach every rollout worker: the object store
against the collective (``learner.broadcast``), on the real actors and the real code paths.

    cd <repo> && python bench/broadcast.py                       # Flux-size policy, W = 1, 2, 4
    python bench/broadcast.py --workers 1 2 4 8 --dtypes bfloat16

The workers are ``RolloutWorker`` actors on the simulated backend (``flux`` preset: the paper's
20M-parameter policy, 8x8 images, no sampling cost). One trial publishes a version (the flat
buffer, ``ray.put``, and for the collective one ``torch.distributed`` broadcast: gloo here, NCCL
where the learner is on a GPU) and has every worker sample one context under it, which loads it.
A trial's time is the learner's publishing plus the slowest worker's read of the version (its
``weights_s``: the fetch from the object store or the staged broadcast, the copy into its
policy), both timed where they happen, so it never includes the sampling and is never below
zero. Per worker count and dtype it prints the median seconds of each path and their ratio; the
last line is ``collective / object store at W workers (bfloat16): X``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python bench/broadcast.py), not installed
    sys.path.insert(0, str(REPO))


def _measure(args: argparse.Namespace, w: int) -> list[dict]:
    """Both paths for each dtype with ``w`` workers (on a running Ray cluster)."""
    import ray
    import torch

    from common.collective import WeightsHandle
    from common.config import load_config
    from common.devices import resolve_device
    from common.messages import Context
    from common.policy import SchedulePolicy, state_to_numpy
    from learner.broadcast import CollectiveBroadcast
    from learner.groups import RolloutGroup

    rows = []
    with tempfile.TemporaryDirectory(prefix="steinsched-broadcast-") as out:
        cfg = load_config(
            [],
            experiment={"name": "broadcast", "output_dir": out},
            sampler={"backend": "simulated", "simulated": {"preset": args.preset, "image_size": 8}},
            policy=load_config(["--config", str(args.config)]).policy.model_dump(),
            rollout={"num_workers": w, "num_cpus": min(0.5, (args.cpus - 0.5) / w), "steps": 5},
            learner={"broadcast": "collective"},
        )
        rollouts = RolloutGroup(cfg)
        device = resolve_device("auto")
        torch.manual_seed(0)
        policy = SchedulePolicy(**rollouts.policy_kwargs()).to(device).eval()
        collective = CollectiveBroadcast(rollouts, device, cfg.learner.broadcast_timeout_s)
        contexts = [Context(index=i, prompt=rollouts.spec().train_prompts[0], seed=i) for i in range(w)]
        version = 0

        def trial(path: str, dtype: str) -> float:
            """Seconds from publishing a new version to every worker holding it: the learner's
            side, timed here, plus the slowest worker's read of it, timed on the worker."""
            nonlocal version
            version += 1
            with torch.no_grad():
                next(policy.parameters()).add_(1e-3)  # a new version
            t0 = time.perf_counter()
            weights = state_to_numpy(policy, dtype)
            ref = ray.put(weights)
            # in a handle either way, as the loop sends it: the worker fetches the ref itself, within its timing
            sent = path == "collective" and collective.send(version, weights)  # returns once every worker has it
            arg = WeightsHandle(ref, sent)
            published = time.perf_counter() - t0
            requests = rollouts.requests(contexts, 1, 5, 0, version)
            units = [rollouts.submit(r, arg, i) for i, r in enumerate(requests)]
            batches = ray.get([u.batch for u in units], timeout=600)
            got, want = {b.weights_from for b in batches}, path
            assert got == {want}, f"{path}: the workers read the weights from {got}"
            return published + max(b.weights_s for b in batches)

        for dtype in args.dtypes:
            secs = {}
            for path in ("object_store", "collective"):
                trial(path, dtype)  # warm-up: the group forms, the buffers are allocated
                secs[path] = statistics.median(trial(path, dtype) for _ in range(args.repeats))
            rows.append({"workers": w, "dtype": dtype, "mib": state_to_numpy(policy, dtype).nbytes / 2**20, **secs})
            print(
                f"W={w} {dtype}: object store {secs['object_store']:.3f} s, collective {secs['collective']:.3f} s"
                f" ({collective.backend})",
                flush=True,
            )
        collective.close()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/broadcast.py", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "flux_dev_hps.yaml", help="Its policy section.")
    p.add_argument("--preset", default="flux", help="The simulated backend's input shapes.")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpus", type=float, default=2.0, help="CPUs of the local Ray cluster.")
    args = p.parse_args(argv)

    import ray

    rows = []
    for w in args.workers:
        fresh = not ray.is_initialized()
        if fresh:
            ray.init(num_cpus=math.ceil(args.cpus), include_dashboard=False, log_to_driver=False)
        try:
            rows += _measure(args, w)
        finally:
            if fresh:
                ray.shutdown()
    print("| workers | dtype | MiB | object store (s) | collective (s) | collective / object store |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = r["collective"] / max(r["object_store"], 1e-9)
        print(
            f"| {r['workers']} | {r['dtype']} | {r['mib']:.1f} | {r['object_store']:.3f} | {r['collective']:.3f} |"
            f" {ratio:.2f} |"
        )
    last = rows[-1]
    print(
        f"collective / object store at {last['workers']} workers ({last['dtype']}):"
        f" {last['collective'] / max(last['object_store'], 1e-9):.2f}"
    )
    return rows


if __name__ == "__main__":
    main()
