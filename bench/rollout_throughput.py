"""Rollout throughput of each tiny backend: our batched per-sample loop vs the stock pipeline called
once per schedule, on the same machine, in the same run, for the same images.

    cd <repo> && python bench/rollout_throughput.py          # 4 families, 8 contexts x K=2, L=5, ~1 min
    python bench/rollout_throughput.py --families flux sdxl --contexts 16 --steps 10

What a rollout worker does for one request: C contexts (prompt, seed), K schedules each (Dirichlet
draws), N = C*K images. Ours: one ``sampler.sample`` call (prompts encoded once each, on a cold
cache; all N samples in one batch, every one on its own schedule). Stock: the diffusers pipeline
called N times, once per schedule, made to execute that schedule exactly
(``tests/fixtures/stock_reference.py``: shift off for flows, custom timesteps for Euler). Both return
uint8 images; the table reports the largest difference between the two sets (float images, before
rounding) and the ratio of images per second (ours / stock). Times: the best of ``--repeats`` runs
after one warm-up, float32 on the CPU with the tiny random pipelines of ``tests/fixtures/tiny_pipelines.py``.

    python bench/rollout_throughput.py --arch real --families flux sd3 --device cuda --dtype bfloat16 \
        --size 1024 --contexts 2          # FLUX.1-dev and SD3.5 Large transformers at 1024² (bench/gpu_check.sh)

``--arch real`` builds the real transformer architectures with random weights from their configs
(``real_transformer_pipeline``: nothing downloaded; tiny text encoders of the real widths, a tiny
8x VAE): the denoising loop at its real cost. ``--layers N`` cuts the depth for a smoke test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python bench/rollout_throughput.py), not installed
    sys.path.insert(0, str(REPO))

from common.config import FluxConfig, SD3Config, SDConfig  # noqa: E402
from common.schedule import guard_tau, times_from_tau  # noqa: E402
from rollout.backends.diffusers_common import DiffusersSampler  # noqa: E402
from rollout.backends.prompts import TRAIN_PROMPTS  # noqa: E402
from tests.fixtures.stock_reference import stock_generate, stock_pipeline_for_schedules  # noqa: E402
from tests.fixtures.tiny_pipelines import FAMILIES, SIZE, real_transformer_pipeline, tiny_pipeline  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_sampler(
    family: str,
    batch: int,
    arch: str = "tiny",
    size: int = SIZE,
    device: str = "cpu",
    dtype: str = "float32",
    layers: int | None = None,
):
    if arch == "real":
        pipe = real_transformer_pipeline(family, layers, device=device).to(DTYPES[dtype])
    else:
        pipe = tiny_pipeline(family).to(DTYPES[dtype])
    common = {
        "model": arch,
        "device": device,
        "dtype": dtype,
        "height": size,
        "width": size,
        "max_batch_size": batch,
    }
    if family == "flux":
        from rollout.backends.flux import FluxFamily

        cfg = FluxConfig(max_sequence_length=32, **common)
        return (
            pipe,
            DiffusersSampler(FluxFamily, pipe, cfg),
            {"guidance_scale": cfg.guidance_scale, "max_sequence_length": 32},
        )
    if family == "sd3":
        from rollout.backends.sd3 import SD3Family

        cfg = SD3Config(max_sequence_length=32, **common)
        return (
            pipe,
            DiffusersSampler(SD3Family, pipe, cfg),
            {"guidance_scale": cfg.guidance_scale, "max_sequence_length": 32},
        )
    from rollout.backends.sd import SDFamily

    cfg = SDConfig(guidance_scale=5.0 if family == "sdxl" else 7.5, **common)
    return pipe, DiffusersSampler(SDFamily, pipe, cfg), {"guidance_scale": cfg.guidance_scale}


def bench_family(family: str, contexts: int, k: int, steps: int, repeats: int, seed: int = 0, **build: Any) -> dict:
    n = contexts * k
    size = build.get("size", SIZE)
    pipe, sampler, stock_kwargs = make_sampler(family, batch=n, **build)
    stock = stock_pipeline_for_schedules(pipe)
    prompts = [TRAIN_PROMPTS[c % len(TRAIN_PROMPTS)] for c in range(contexts) for _ in range(k)]
    noise = np.repeat(sampler.initial_noise([seed + c for c in range(contexts)]), k, axis=0)
    rng = np.random.default_rng(seed)
    times = times_from_tau(guard_tau(rng.dirichlet(np.full(steps + 1, 2.0), size=n)))

    def ours():
        sampler._cache._items.clear()  # cold prompt cache: encoding is part of the cost
        return sampler.generate(prompts, noise, times)

    def theirs():
        return np.stack(
            [stock_generate(stock, prompts[i], noise[i], times[i], size, size, **stock_kwargs) for i in range(n)]
        )

    out = {}
    for name, fn in (("ours", ours), ("stock", theirs)):
        images = fn()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            _sync()
            t0 = time.perf_counter()
            images = fn()
            _sync()
            best = min(best, time.perf_counter() - t0)
        out[name] = (best, images)
    (t_ours, a), (t_stock, b) = out["ours"], out["stock"]
    return {
        "family": family,
        "images": n,
        "ours_s": t_ours,
        "stock_s": t_stock,
        "ours_ips": n / t_ours,
        "stock_ips": n / t_stock,
        "ratio": t_stock / t_ours,
        "max_diff": float(np.abs(a - b).max()),
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def table(rows: list[dict], contexts: int, k: int, steps: int, what: str = "") -> str:
    what = what or f"tiny pipelines ({SIZE}x{SIZE}, float32, CPU, {torch.get_num_threads()} threads)"
    lines = [
        f"rollout throughput, {what}: {contexts} contexts x K={k} = {contexts * k} images, L={steps}",
        f"{'family':<8}{'ours img/s':>12}{'stock img/s':>13}{'ratio':>8}{'max |diff|':>12}",
    ]
    for r in rows:
        lines.append(
            f"{r['family']:<8}{r['ours_ips']:>12.1f}{r['stock_ips']:>13.1f}{r['ratio']:>7.2f}x{r['max_diff']:>12.1e}"
        )
    lines.append("ratio = (ours images/s) / (stock images/s); max |diff| between the two sets of float images")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--contexts", type=int, default=8, help="C: contexts per request")
    p.add_argument("--k", type=int, default=2, help="K: schedules per context")
    p.add_argument("--steps", type=int, default=5, help="L: model evaluations per sample")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (best is kept)")
    # one thread: on a shared or small machine, OpenMP threads competing for cores make timings erratic
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--arch", choices=["tiny", "real"], default="tiny", help="real: FLUX.1-dev, SD3.5 Large")
    p.add_argument("--layers", type=int, help="With --arch real: transformer blocks (default: the real depth).")
    p.add_argument("--size", type=int, default=SIZE, help="Image side in pixels.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = p.parse_args(argv)
    if args.arch == "real" and not set(args.families) <= {"flux", "sd3"}:
        p.error("--arch real builds flux and sd3 only: pass --families flux sd3")
    torch.set_num_threads(args.threads)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    build = {"arch": args.arch, "size": args.size, "device": args.device, "dtype": args.dtype, "layers": args.layers}
    rows = [bench_family(f, args.contexts, args.k, args.steps, args.repeats, **build) for f in args.families]
    what = (
        f"{args.arch} transformers ({args.size}x{args.size}, {args.dtype}, {args.device}"
        + (f", {args.layers} layers" if args.layers else "")
        + ")"
    )
    print(table(rows, args.contexts, args.k, args.steps, what if args.arch == "real" or args.size != SIZE else ""))
    return rows


if __name__ == "__main__":
    main()
