"""The learner's own time at the paper's Flux policy size: one REINFORCE step, the workers'
policy forward, and the weight broadcast, on the CPU or a GPU, measured in one run.

    python bench/learner_step.py                      # CPU, C = 32, K = 2 (about 2 min on 2 cores)
    python bench/learner_step.py --device cuda        # the same on a GPU (bench/gpu_check.sh runs it)

The policy is configs/flux_dev_hps.yaml's (widths 80-640, 8 heads, head 1024: about 20M
parameters) on Flux-shaped inputs at 1024² (x_T [16, 128, 128], a pooled 768, and T5 tokens of
4096: a simulated prompt's words + 2, as the real backends pass a prompt's own tokens, not the 512
T5 pads to), built by the simulated backend's ``flux`` preset. Figures: seconds per learner step
(forward, backward, AdamW) and its peak memory; seconds per worker forward of ``--worker-batch``
contexts; AdamW's step alone, on the learner's flat buffer against one tensor per parameter; for
each broadcast dtype, the bytes and the seconds from the learner's parameters to a worker's
loaded copy (``FlatState.weights`` then ``FlatState.load``, the object store aside).
The last line is ``learner step at C=<C>, K=<K> on <device>: X s``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python bench/learner_step.py), not installed
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config import load_config  # noqa: E402
from common.devices import resolve_device  # noqa: E402
from common.policy import (  # noqa: E402
    FlatState,
    SchedulePolicy,
    policy_kwargs,
    sample_log_taus,
)
from learner.update import adamw_kernel, optimizer_for, reinforce_step  # noqa: E402
from rollout.backends.simulated import SimulatedSampler  # noqa: E402
from rollout.sampler import policy_inputs  # noqa: E402


def _timed(fn, repeats: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python bench/learner_step.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "flux_dev_hps.yaml", help="Its policy section.")
    p.add_argument("--preset", default="flux", help="Input shapes (the simulated backend's presets).")
    p.add_argument("--contexts", type=int, default=32, help="C of the learner step.")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="L.")
    p.add_argument("--worker-batch", type=int, default=4, help="Contexts per worker forward.")
    p.add_argument("--repeats", type=int, default=3, help="Timed repeats after one warm-up.")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="Torch CPU threads.")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = load_config(["--config", str(args.config)])
    sampler = SimulatedSampler(preset=args.preset, image_size=8, seconds_per_image_step=0.0)
    torch.manual_seed(0)
    policy = SchedulePolicy(**policy_kwargs(cfg.policy, sampler.spec(), args.steps, sampler.default_tau(args.steps)))
    policy = policy.to(device).eval()
    n_params = policy.num_parameters()
    print(f"policy: {n_params / 1e6:.1f}M parameters ({args.preset} inputs), device {device}", flush=True)

    prompts = sampler.train_prompts[: args.contexts]
    feats = sampler.encode(prompts)
    x = sampler.initial_noise(list(range(args.contexts)))
    inputs = policy_inputs(x, feats, device)
    with torch.no_grad():
        alpha = policy(inputs).double().cpu().numpy()
    keys = [(0, 0, c, j) for c in range(args.contexts) for j in range(args.k)]  # as a worker draws them
    log_tau = sample_log_taus(np.repeat(alpha, args.k, axis=0), keys).reshape(args.contexts, args.k, -1)
    rng = np.random.default_rng(0)
    adv = rng.standard_normal((args.contexts, args.k))
    logp = np.zeros((args.contexts, args.k))
    own = FlatState(policy)  # as the learner keeps it: what it sends, what AdamW steps
    optimizer = optimizer_for(own, 1e-5, 1e-4)  # the learner's

    def step() -> None:
        reinforce_step(policy, optimizer, inputs, log_tau, adv, logp, grad_clip=1.0)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = _timed(step, 1 + args.repeats, device)[1:]
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on the GPU"
    else:
        peak = f"{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20:.2f} GiB more RSS"

    # AdamW alone, with the last step's gradients: on the flat buffer (the learner's) against a
    # copy of the parameters, one tensor each (the same kernel: fused on a GPU, multi-tensor else)
    copies = [p.detach().clone().requires_grad_() for p in policy.parameters()]
    for c, p in zip(copies, policy.parameters(), strict=True):
        c.grad = p.grad.detach().clone()
    foreach, fused = adamw_kernel(copies)
    per_tensor = torch.optim.AdamW(copies, lr=1e-5, weight_decay=1e-4, foreach=foreach, fused=fused)
    adam_flat = statistics.median(_timed(optimizer.step, 1 + args.repeats, device)[1:])
    adam_per = statistics.median(_timed(per_tensor.step, 1 + args.repeats, device)[1:])
    del copies, per_tensor

    wb = min(args.worker_batch, args.contexts)
    worker_inputs = policy_inputs(x[:wb], feats[:wb], device)

    def forward() -> None:
        with torch.no_grad():
            policy(worker_inputs)

    forward_s = _timed(forward, 1 + args.repeats, device)[1:]
    worker = SchedulePolicy(**policy_kwargs(cfg.policy, sampler.spec(), args.steps, sampler.default_tau(args.steps)))
    kept = FlatState(worker.to(device).eval())  # as a rollout worker keeps it
    broadcast = {}
    for dtype in ("float32", "bfloat16", "float16"):
        sent = own.weights(dtype)
        secs = _timed(lambda dtype=dtype: kept.load(own.weights(dtype)), args.repeats, device)
        broadcast[dtype] = (sent.nbytes, statistics.median(secs))

    step_med, fwd_med = statistics.median(step_s), statistics.median(forward_s)
    print(f"| measure ({device}) | value |")
    print("| --- | --- |")
    print(f"| learner step, C={args.contexts}, K={args.k} | {step_med:.3f} s (peak: {peak}) |")
    print(f"| worker forward, {wb} contexts | {fwd_med:.3f} s |")
    print(
        f"| AdamW step, one flat buffer / a tensor per parameter | {adam_flat:.4f} s / {adam_per:.4f} s"
        f" ({adam_flat / adam_per:.2f} x) |"
    )
    for dtype, (nbytes, secs) in broadcast.items():
        print(f"| broadcast {dtype} | {nbytes / 2**20:.1f} MiB, {secs:.3f} s |")
    f32 = broadcast["float32"]
    print(
        f"bfloat16 / float32 broadcast: {broadcast['bfloat16'][0] / f32[0]:.2f} x the bytes,"
        f" {broadcast['bfloat16'][1] / f32[1]:.2f} x the time"
    )
    print(f"learner step at C={args.contexts}, K={args.k} on {device.type}: {step_med:.3f} s")
    return {
        "parameters": float(n_params),
        "step_s": step_med,
        "forward_s": fwd_med,
        "adamw_flat_s": adam_flat,
        "adamw_per_tensor_s": adam_per,
        **{f"broadcast_{d}_bytes": float(b) for d, (b, _) in broadcast.items()},
        **{f"broadcast_{d}_s": s for d, (_, s) in broadcast.items()},
    }


if __name__ == "__main__":
    main()
