"""HPS scoring throughput: the real ViT-H-14 architecture (random weights) on this machine.

    PYTHONPATH=$PWD python bench/reward_throughput.py   # ~150 s of CPU time: ~1.5-2 min on 2 idle cores
    PYTHONPATH=$PWD python bench/reward_throughput.py --reps 3 --size 1024 --json out.json

Measures images per second of ``rewards.hps.HPSReward`` (preprocessing, image tower, cosine) at
batch 1 and batch 8, with the prompts' text features already cached (a run sees its prompts
again and again) and with the cache off (the text tower runs for every call). Weights are
random: throughput does not depend on their values, and no checkpoint is needed. One warm-up
call precedes the timings; each figure is the median over ``--reps`` calls. The time spent in
the text tower is measured inside each call (what the cache saves).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="Side of the square input images (resized to 224).")
    p.add_argument("--reps", type=int, default=1, help="Timed calls per setting (median reported).")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available).")
    p.add_argument("--arch", default="ViT-H-14", help="open_clip architecture (the HPS one by default).")
    p.add_argument("--json", default=None, help="Also write the figures to this file.")
    args = p.parse_args()

    import torch

    from rewards.hps import HPSReward

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    reward = HPSReward(arch=args.arch, random_weights=True, device=args.device, batch_size=8)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in reward.model.parameters())
    print(
        f"{args.arch}: {n_params / 1e6:.0f}M parameters, built in {build_s:.1f} s on {reward.device} "
        f"({args.threads} threads), images {args.size}x{args.size}"
    )

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, args.size, args.size, 3), dtype=np.uint8)
    prompts = [f"a photo of object number {i}, highly detailed" for i in range(8)]
    cache = reward.text_features

    def timed(n: int, cached: bool) -> dict:
        cache.max_prompts = 4096 if cached else 0
        if cached:
            cache(prompts[:n])  # the prompts were seen before
        times, text = [], []
        for _ in range(args.reps):
            before = cache.encode_seconds
            t = time.perf_counter()
            scores = reward(images[:n], prompts[:n])
            times.append(time.perf_counter() - t)
            text.append(cache.encode_seconds - before)
            assert scores.shape == (n,) and np.isfinite(scores).all()
        sec = statistics.median(times)
        return {
            "batch": n,
            "text_cached": cached,
            "images_per_s": n / sec,
            "s_per_call": sec,
            "text_s_per_call": statistics.median(text),
        }

    reward(images[:1], ["warm-up"])
    rows = []
    for n in (1, 8):
        for cached in (True, False):
            r = timed(n, cached)
            rows.append(r)
            print(
                f"batch {n}, text features {'cached  ' if cached else 'computed'}: {r['images_per_s']:.3f} images/s "
                f"({r['s_per_call']:.1f} s per call, of which text tower {r['text_s_per_call']:.1f} s)"
            )
    by = {(r["batch"], r["text_cached"]): r["images_per_s"] for r in rows}
    print(
        f"batch 8 vs batch 1: {by[8, True] / by[1, True]:.2f}x (cached),"
        f" {by[8, False] / by[1, False]:.2f}x (computed); "
        f"cached vs computed: {by[1, True] / by[1, False]:.2f}x at batch 1,"
        f" {by[8, True] / by[8, False]:.2f}x at batch 8"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "arch": args.arch,
                    "params": n_params,
                    "build_s": build_s,
                    "size": args.size,
                    "threads": args.threads,
                    "device": str(reward.device),
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
