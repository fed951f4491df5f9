"""What one rollout request costs a worker beside its sampler, at a real backbone's shapes: the
worker's own ``sample`` on the simulated backend with no sampling time, measured in one run.

    python bench/worker_request.py                      # Flux shapes, the paper's policy, on the CPU
    python bench/worker_request.py --device cuda        # the policy on a GPU, as a GPU worker holds it

Each request is one context, K images of 1024² (``rollout.micro_batch: 1``), as in
``bench/overhead.py``. Figures, in milliseconds per request: the whole request without
downscaling (the images sent as made: noise, the policy's forward, the draws, the simulated
images), then with the images downscaled to 224² (HPS's input) on ``rollout.image_threads`` of
1 and of ``--threads`` (as many at a time as a request has images: K), and the downscale alone
on each. A request of a real sampler costs
these on top of its sampling; the ratios are what compare across machines. The last line is
``downscale on <T> threads / on 1: X``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python bench/worker_request.py), not installed
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from common.config import load_config  # noqa: E402
from common.messages import Context, RolloutRequest  # noqa: E402
from rewards.images import downscale  # noqa: E402
from rollout.worker import RolloutWorker  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: the first call fills the worker's prompt cache
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return 1000 * statistics.median(out)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python bench/worker_request.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="The worker's policy device: cpu, cuda or cuda:N.")
    p.add_argument("--preset", default="flux", help="Backbone shapes of the simulated sampler (flux, sd3, sdxl, tiny).")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--reward-size", type=int, default=224, help="The side the rewards read (HPS: 224).")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=4, help="rollout.image_threads to compare with 1.")
    p.add_argument("--policy", choices=["small", "paper"], default="paper", help="paper: configs/flux_dev_hps.yaml's.")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    if args.threads < 2:
        p.error(f"--threads {args.threads}: compare 1 with 2 or more")
    torch.set_num_threads(1)  # as a worker holds it (RolloutWorker's torch_threads)

    if args.policy == "paper":
        policy = load_config(["--config", str(REPO / "configs" / "flux_dev_hps.yaml")]).policy.model_dump()
    else:
        policy = {"widths": [8, 8, 16, 16], "groups": 4, "attn_heads": 2, "head_hidden": 16}
    sampler = {
        "backend": "simulated",
        "simulated": {"preset": args.preset, "image_size": args.image_size, "seconds_per_image_step": 0.0},
    }
    workers = {
        t: RolloutWorker(0, sampler, policy, args.steps, 0, policy_device=args.device, image_threads=t)
        for t in (1, args.threads)
    }
    count = iter(range(10**9))

    def request(size: int | None) -> RolloutRequest:
        i = next(count)
        ctx = Context(index=i, prompt=f"simulated prompt {i % 64}", seed=i)
        return RolloutRequest(
            request_id=f"r{i}", iteration=0, version=0, contexts=[ctx], k=args.k, steps=args.steps, image_size=size
        )

    for w in workers.values():
        w.sample(request(None), w._weights.weights())  # version 0 loaded: the requests below read no weights
    one, many = workers[1], workers[args.threads]
    images = one.sampler.sample(
        [f"simulated prompt {i}" for i in range(args.k)],
        one.sampler.initial_noise(list(range(args.k))),
        torch.linspace(1, 0.2, args.steps).repeat(args.k, 1).numpy(),
    )
    out = {
        "request_ms": _median_ms(lambda: one.sample(request(None), None), args.repeats),
        "request_downscaled_1_ms": _median_ms(lambda: one.sample(request(args.reward_size), None), args.repeats),
        "request_downscaled_threads_ms": _median_ms(lambda: many.sample(request(args.reward_size), None), args.repeats),
        "downscale_1_ms": _median_ms(lambda: downscale(images, args.reward_size), args.repeats),
        "downscale_threads_ms": _median_ms(lambda: downscale(images, args.reward_size, args.threads), args.repeats),
    }
    side = f"{args.image_size}² to {args.reward_size}²"
    used = f"{args.threads} ({min(args.threads, args.k)} at a time: {args.k} images)"
    print(f"one request: 1 context, K={args.k}, L={args.steps}, {args.preset} shapes, policy on {args.device}")
    print("| per request (ms) | value |")
    print("| --- | --- |")
    print(f"| the images as made | {out['request_ms']:.1f} |")
    print(f"| downscaled {side}, image_threads 1 | {out['request_downscaled_1_ms']:.1f} |")
    print(f"| downscaled {side}, image_threads {used} | {out['request_downscaled_threads_ms']:.1f} |")
    print(f"| the downscale alone ({args.k} images), 1 thread | {out['downscale_1_ms']:.1f} |")
    print(f"| the downscale alone ({args.k} images), image_threads {used} | {out['downscale_threads_ms']:.1f} |")
    print(f"downscale on {args.threads} threads / on 1: {out['downscale_threads_ms'] / out['downscale_1_ms']:.2f}")
    return out


if __name__ == "__main__":
    main()
