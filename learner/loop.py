"""The training loop: one top-to-bottom loop, as the paper's pseudocode (DESIGN.md section 2).

    for it in range(start, iterations):
        contexts = the next C (prompt, seed) pairs of the deterministic stream
        rollouts = workers sample K schedules per context under the current weights   (fan-out)
        rewards  = reward servers score the images, refs straight from the workers    (fan-out)
        baseline = baselines.compute(name, rewards[C, K]);  advantage = r - baseline
        update   = REINFORCE step on log pi(tau | inputs) recomputed here
        push the new weights (ray.put once per version), log, checkpoint, evaluate
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from common.checkpoint import find_latest, load_checkpoint, save_checkpoint
from common.codec import append_records
from common.config import Config, RayConfig
from common.messages import RolloutRecord
from common.policy import SchedulePolicy, collate, describe, state_to_numpy
from learner import baselines
from learner.contexts import ContextStream, eval_contexts
from learner import plots
from learner.evaluate import DEFAULT, EvalResult, Schedule, evaluate, run_schedule
from learner.groups import MetricGroup, RewardGroup, RolloutGroup, collect
from learner.metrics import JsonlLogger, Loggers, TensorBoardLogger, read_jsonl
from learner.update import reinforce_step


@dataclass
class RunResult:
    run_dir: Path
    iterations: int
    version: int
    policy: SchedulePolicy
    evaluation: EvalResult | None


def init_ray(cfg: RayConfig) -> bool:
    """Start or join Ray; True if this call started it. ray.init() with no address honours
    RAY_ADDRESS and a running cluster, else starts a local one (never address='auto')."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, **cfg.init_kwargs}
    if "RAY_ADDRESS" not in os.environ and "address" not in kwargs:
        # resources only describe a cluster this call starts; a joined cluster has its own
        kwargs.update({k: v for k, v in (("num_cpus", cfg.num_cpus), ("num_gpus", cfg.num_gpus)) if v is not None})
    ray.init(**kwargs)
    return True


def _reward_extras(cfg: Config) -> dict[str, dict]:
    # The toy reward scores against the sampler's own mixture: hand it the mixture's settings.
    return {"toy": cfg.sampler.toy.model_dump(exclude={"token_len", "token_dim"})} if cfg.sampler.backend == "toy" else {}


def train(cfg: Config, baselines_to_beat: dict[str, Schedule] | None = None, final_eval: bool = True) -> RunResult:
    """Train the policy of ``cfg``; at the end evaluate it against the default schedule and
    ``baselines_to_beat`` (e.g. a learned global schedule) on held-out contexts."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    started_ray = init_ray(cfg.ray)
    L, K, C = cfg.rollout.steps, cfg.rollout.k, cfg.rollout.contexts_per_iter
    lc = cfg.learner
    try:
        rollouts = RolloutGroup(cfg)
        rewards = RewardGroup(cfg.rewards, _reward_extras(cfg))
        metrics = MetricGroup(lc.eval_metrics) if final_eval and lc.eval_metrics else None
        spec = rollouts.spec()
        torch.manual_seed(cfg.experiment.seed)
        policy = SchedulePolicy(**rollouts.policy_kwargs()).eval()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
        stream = ContextStream(lc.train_prompts or spec.train_prompts, cfg.experiment.seed)
        held_out = eval_contexts(lc.eval_prompts or spec.eval_prompts, lc.eval_seeds, cfg.experiment.seed)
        start, version = 0, 0
        ckpt_dir = run_dir / "checkpoints"
        if cfg.resume:
            ckpt = find_latest(ckpt_dir) if cfg.resume == "auto" else Path(cfg.resume)
            if ckpt is None:
                print(f"--resume auto: no checkpoint in {ckpt_dir}; starting fresh")
            else:
                state = load_checkpoint(ckpt, policy, optimizer)
                start, version, stream.cursor = state["iteration"], state["version"], state["cursor"]
                print(f"resumed from {ckpt} at iteration {start}")
        print(f"{describe(policy)}; run dir {run_dir}")
        learned = "learned global" if cfg.policy.variant == "global" else "learned instance-level"

        loggers = Loggers(JsonlLogger(run_dir / "metrics.jsonl"), TensorBoardLogger(run_dir / "tb"))
        weights = ray.put(state_to_numpy(policy))
        bar = tqdm(range(start, lc.iterations), initial=start, total=lc.iterations, disable=not lc.progress, desc="train")
        for it in bar:
            t0 = time.perf_counter()
            contexts = stream.next(C)

            # SAMPLING: K schedules per context on the workers, scored by the reward servers
            pending = rollouts.sample(contexts, K, L, it, version, weights)
            batches, scored, wait_s = collect(pending, rewards.score(pending))
            scores = rewards.combine(scored)
            r = scores.total.reshape(C, K)

            # BASELINE and ADVANTAGE (per-context and cross-context statistics, James-Stein)
            b, diag = baselines.compute(lc.baseline, r)
            adv = r - b
            if lc.adv_std_norm:
                adv = adv / (adv.std() + 1e-8)

            # TRAINING: REINFORCE on log pi recomputed from the inputs the rollouts carry
            tau = np.concatenate([bt.tau for bt in batches])
            inputs = collate(
                np.concatenate([bt.x for bt in batches]),
                [t for bt in batches for t in bt.tokens],
                None if batches[0].pooled is None else np.concatenate([bt.pooled for bt in batches]),
            )
            m = reinforce_step(
                policy, optimizer, inputs, tau, adv, np.concatenate([bt.logp for bt in batches]), lc.grad_clip
            )
            version += 1
            weights = ray.put(state_to_numpy(policy))

            # LOGGING
            step_s = time.perf_counter() - t0
            m.update(
                {
                    "rollout/reward_mean": float(r.mean()),
                    "rollout/reward_std": float(r.std()),
                    "rollout/images_per_s": C * K / max(wait_s, 1e-9),
                    "rollout/worker_seconds": float(sum(bt.seconds for bt in batches)),
                    "baseline/adv_std": float(adv.std()),
                    "system/step_seconds": step_s,
                    "system/workers_alive": float(len(rollouts.workers)),
                    **{f"reward/{k}": float(v.mean()) for k, v in scores.per_reward.items()},
                    **{f"baseline/{k}": float(np.mean(v)) for k, v in diag.items()},
                }
            )
            loggers.log(it + 1, m)
            bar.set_postfix(reward=f"{r.mean():.3f}")
            if lc.rollout_log:
                append_records(run_dir / "rollouts.msgpack", _records(batches, r, b, adv, scores.per_reward, K))

            # CHECKPOINT and EVALUATION
            if (it + 1) % lc.checkpoint_every == 0 or it + 1 == lc.iterations:
                state = {"iteration": it + 1, "version": version, "cursor": stream.cursor, "baseline": lc.baseline}
                save_checkpoint(ckpt_dir, it + 1, policy, optimizer, state, keep=lc.keep_checkpoints)
            if lc.eval_every and (it + 1) % lc.eval_every == 0 and it + 1 < lc.iterations:
                res = evaluate(rollouts, rewards, None, held_out, L, version, weights, {DEFAULT: Schedule("default"), learned: Schedule("mean")})
                loggers.log(it + 1, _eval_metrics(res))
        bar.close()
        policy.save_pretrained(run_dir / "policy")
        if not final_eval:
            loggers.close()
            return RunResult(run_dir, lc.iterations, version, policy, None)

        schedules = {DEFAULT: Schedule("default"), **(baselines_to_beat or {}), learned: Schedule("mean")}
        result = evaluate(rollouts, rewards, metrics, held_out, L, version, weights, schedules)
        n_prompts = len(lc.eval_prompts or spec.eval_prompts)
        title = (
            f"held-out evaluation after {lc.iterations} iterations: {n_prompts} prompts x {lc.eval_seeds} noises,"
            f" L={L}, reward {'+'.join(s.name for s in cfg.rewards)}"
        )
        print(result.table(title))
        loggers.log(lc.iterations, _eval_metrics(result))
        loggers.close()
        (run_dir / "eval.json").write_text(json.dumps(result.summary(), indent=1))
        if lc.plots:
            _plot(run_dir, rollouts, spec.x_shape, held_out, result, schedules, learned, L, version, weights)
        return RunResult(run_dir, lc.iterations, version, policy, result)
    finally:
        if started_ray:
            ray.shutdown()


def _eval_metrics(res: EvalResult) -> dict[str, float]:
    out = {}
    for name, s in res.summary().items():
        out[f"eval/{name}/reward"] = s["mean"]
        out.update({f"eval/{name}/{m}": v for m, v in s.items() if m not in ("mean", "se", "n")})
    return out


def _plot(run_dir, rollouts, x_shape, held_out, result, schedules, learned, steps, version, weights) -> None:
    """schedules.png, reward_curve.png, and samples.png for image backends (first noise of each
    held-out prompt; these few images are fetched to the learner only to be drawn)."""
    plots.plot_schedules(run_dir / "schedules.png", [c.prompt for c in held_out], result.taus, learned)
    plots.plot_reward_curve(run_dir / "reward_curve.png", read_jsonl(run_dir / "metrics.jsonl"))
    if len(x_shape) < 3:
        return
    firsts = {}
    for c in held_out:
        firsts.setdefault(c.prompt, c)
    grid = list(firsts.values())
    images = {}
    for name, sched in schedules.items():
        pending = run_schedule(rollouts, grid, steps, version, weights, sched)
        images[name] = np.concatenate(ray.get([p.images for p in pending]))
    plots.plot_samples(run_dir / "samples.png", [c.prompt for c in grid], images)


def _records(batches, r, b, adv, per_reward, k: int) -> list[RolloutRecord]:
    out = []
    row = 0
    for bt in batches:
        for ci, ctx in enumerate(bt.contexts):
            for i in range(k):
                out.append(
                    RolloutRecord(
                        iteration=bt.iteration,
                        context=ctx.index,
                        k=i,
                        prompt=ctx.prompt,
                        seed=ctx.seed,
                        version=bt.version,
                        tau=bt.tau[ci, i].tolist(),
                        logp=float(bt.logp[ci, i]),
                        reward=float(r[row, i]),
                        rewards={name: float(v[row * k + i]) for name, v in per_reward.items()},
                        baseline=float(b[row, i]),
                        advantage=float(adv[row, i]),
                    )
                )
            row += 1
    return out
