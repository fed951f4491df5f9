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
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from common.checkpoint import CheckpointStore, load_checkpoint
from common.codec import append_records, read_records
from common.config import Config, ConfigError, LearnerConfig, RayConfig, resume_conflicts
from common.messages import RolloutRecord
from common.policy import SchedulePolicy, collate, describe, state_to_numpy
from learner import baselines
from learner.contexts import ContextStream, eval_contexts
from learner import plots
from learner.evaluate import DEFAULT, EvalResult, Schedule, evaluate, run_schedule
from learner.groups import Dispatcher, MetricGroup, RewardGroup, RolloutGroup, WorkersLost
from learner.metrics import JsonlLogger, Loggers, TensorBoardLogger, read_jsonl
from learner.update import reinforce_step


#: Reference NFE when a reward needs a reference and the config leaves rollout.reference_steps unset.
DEFAULT_REFERENCE_STEPS = 64


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


def _reference_steps(cfg: Config, rewards: RewardGroup) -> int:
    """NFE of the workers' many-step reference samples: what the config says, or (None) 64 where
    a reward compares with it and 0 where none does."""
    needing = [s.name for s, need in zip(cfg.rewards, rewards.needs_reference) if need]
    steps = cfg.rollout.reference_steps
    if steps is None:
        return DEFAULT_REFERENCE_STEPS if needing else 0
    if needing and steps == 0:
        raise ConfigError(
            f"reward {needing[0]!r} compares with a many-step reference sample, but rollout.reference_steps=0"
        )
    return steps


def train(cfg: Config, baselines_to_beat: dict[str, Schedule] | None = None, final_eval: bool = True) -> RunResult:
    """Train the policy of ``cfg``; at the end evaluate it against the default schedule and
    ``baselines_to_beat`` (e.g. a learned global schedule) on held-out contexts."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    started_ray = init_ray(cfg.ray)
    L, C = cfg.rollout.steps, cfg.rollout.contexts_per_iter
    lc = cfg.learner
    try:
        rewards = RewardGroup(cfg.rewards, _reward_extras(cfg), cfg.rollout.max_restarts, cfg.rollout.restart_timeout_s)
        rollouts = RolloutGroup(cfg, _reference_steps(cfg, rewards))
        dispatcher = Dispatcher(rollouts, rewards, cfg.rollout.max_attempts)
        metrics = MetricGroup(lc.eval_metrics) if final_eval and lc.eval_metrics else None
        spec = rollouts.spec()
        torch.set_num_threads(lc.torch_threads)
        torch.manual_seed(cfg.experiment.seed)
        policy = SchedulePolicy(**rollouts.policy_kwargs()).eval()
        optimizer = torch.optim.AdamW(policy.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
        stream = ContextStream(lc.train_prompts or spec.train_prompts, cfg.experiment.seed)
        held_out = eval_contexts(lc.eval_prompts or spec.eval_prompts, lc.eval_seeds, cfg.experiment.seed)
        _warn_prompt_overlap(stream.prompts, [c.prompt for c in held_out])
        start, version = 0, 0
        store = CheckpointStore(lc.checkpoint_dir or run_dir / "checkpoints")
        if cfg.resume:
            ckpt = store.latest() if cfg.resume == "auto" else store.fetch(cfg.resume)
            if ckpt is None:
                print(f"--resume auto: no checkpoint in {store}; starting fresh")
            else:
                state = load_checkpoint(ckpt, policy, optimizer)
                conflicts = resume_conflicts(state["config"], cfg)
                if conflicts and not cfg.resume_changes:
                    raise ValueError(
                        f"refusing to resume from {ckpt}: the config differs in {', '.join(conflicts)}"
                        " (pass --resume_changes=true to resume anyway)"
                    )
                start, version, stream.cursor = state["iteration"], state["version"], state["cursor"]
                _drop_records_after(run_dir, start)
                print(f"resumed from {ckpt} at iteration {start}")
        print(f"{describe(policy)}; run dir {run_dir}")
        learned = "learned global" if cfg.policy.variant == "global" else "learned instance-level"

        loggers = Loggers(JsonlLogger(run_dir / "metrics.jsonl"), TensorBoardLogger(run_dir / "tb"))
        weights = ray.put(state_to_numpy(policy))
        bar = tqdm(range(start, lc.iterations), initial=start, total=lc.iterations, disable=not lc.progress, desc="train")
        for it in bar:
            t0 = time.perf_counter()
            cursor = stream.cursor
            for group in optimizer.param_groups:  # a function of the iteration: a resumed run gets the same
                group["lr"] = learning_rate(lc, it)
            contexts = stream.next(C)
            K = cfg.rollout.k_at(it)  # a function of the iteration: a resumed run gets the same

            # SAMPLING: K schedules per context on the workers, scored by the reward servers
            try:
                got = dispatcher.run(rollouts.requests(contexts, K, L, it, version), weights)
            except WorkersLost:
                # too few actors left: keep what was learned (the state before this iteration)
                state = {"iteration": it, "version": version, "cursor": cursor, **_static_state(cfg)}
                ckpt = store.save(it, policy, optimizer, state, keep=lc.keep_checkpoints)
                print(f"stopping: too few live actors; checkpoint {ckpt} written, resume with --resume auto")
                raise
            batches = got.batches
            scores = rewards.combine(got.scored)
            r = scores.total.reshape(C, K)

            # BASELINE and ADVANTAGE (per-context and cross-context statistics, James-Stein)
            b, diag = baselines.compute(lc.baseline, r)
            adv = r - b
            if lc.adv_std_norm:
                adv = adv / (adv.std() + 1e-8)

            # TRAINING: REINFORCE on log pi recomputed from the inputs the rollouts carry
            log_tau = np.concatenate([bt.log_tau for bt in batches])
            inputs = collate(
                np.concatenate([bt.x for bt in batches]),
                [t for bt in batches for t in bt.tokens],
                None if batches[0].pooled is None else np.concatenate([bt.pooled for bt in batches]),
            )
            m = reinforce_step(
                policy, optimizer, inputs, log_tau, adv, np.concatenate([bt.logp for bt in batches]), lc.grad_clip
            )
            version += 1
            weights = ray.put(state_to_numpy(policy))

            # LOGGING
            step_s = time.perf_counter() - t0
            m.update(
                {
                    "rollout/reward_mean": float(r.mean()),
                    "learner/lr": optimizer.param_groups[0]["lr"],
                    "rollout/reward_std": float(r.std()),
                    "rollout/images_per_s": C * K / max(got.seconds, 1e-9),
                    "rollout/worker_seconds": float(sum(bt.seconds for bt in batches)),
                    "baseline/adv_std": float(adv.std()),
                    "system/step_seconds": step_s,
                    "system/workers_alive": float(len(rollouts.alive)),
                    "system/faults": float(got.faults),
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
                state = {"iteration": it + 1, "version": version, "cursor": stream.cursor, **_static_state(cfg)}
                store.save(it + 1, policy, optimizer, state, keep=lc.keep_checkpoints)
            if lc.eval_every and (it + 1) % lc.eval_every == 0 and it + 1 < lc.iterations:
                res = evaluate(
                    dispatcher, None, held_out, L, version, weights, {DEFAULT: Schedule("default"), learned: Schedule("mean")}
                )
                loggers.log(it + 1, _eval_metrics(res))
        bar.close()
        policy.save_pretrained(run_dir / "policy")
        if not final_eval:
            loggers.close()
            return RunResult(run_dir, lc.iterations, version, policy, None)

        schedules = {DEFAULT: Schedule("default"), **(baselines_to_beat or {}), learned: Schedule("mean")}
        result = evaluate(dispatcher, metrics, held_out, L, version, weights, schedules)
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
            _plot(run_dir, dispatcher, spec.x_shape, held_out, result, schedules, learned, L, version, weights)
        return RunResult(run_dir, lc.iterations, version, policy, result)
    finally:
        if started_ray:
            ray.shutdown()


def learning_rate(lc: LearnerConfig, it: int) -> float:
    """The learning rate of iteration ``it`` (0-based) under ``lc.lr_schedule``."""
    if lc.lr_schedule == "constant" or lc.iterations <= 1:
        return lc.lr
    final = lc.lr * lc.lr_final_ratio
    return final + 0.5 * (lc.lr - final) * (1 + math.cos(math.pi * it / (lc.iterations - 1)))


def _warn_prompt_overlap(train_prompts: list[str], eval_prompts: list[str]) -> None:
    """Held-out prompts that are also training prompts make the held-out table a test of new
    noises only, not of new prompts: say so (the toy's prompts are its classes, so it always does)."""
    shared = set(train_prompts) & set(eval_prompts)
    if shared:
        print(
            f"warning: {len(shared)} of {len(set(eval_prompts))} held-out prompts are also training prompts"
            f" (e.g. {sorted(shared)[0]!r}): the held-out table measures new noises, not new prompts"
        )


def _eval_metrics(res: EvalResult) -> dict[str, float]:
    out = {}
    for name, s in res.summary().items():
        out[f"eval/{name}/reward"] = s["mean"]
        out.update({f"eval/{name}/{m}": v for m, v in s.items() if m not in ("mean", "se", "n")})
    return out


def _plot(run_dir, dispatcher, x_shape, held_out, result, schedules, learned, steps, version, weights) -> None:
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
        got = run_schedule(dispatcher, grid, steps, version, weights, sched)
        images[name] = np.concatenate(ray.get([p.images for p in got.pending]))
    plots.plot_samples(run_dir / "samples.png", [c.prompt for c in grid], images)


def _static_state(cfg: Config) -> dict:
    """What a checkpoint records besides the counters: the config it was trained with (a resume
    under a config that differs where it matters is refused)."""
    return {"config": cfg.model_dump(mode="json", exclude={"config", "resume", "resume_changes"})}


def _drop_records_after(run_dir: Path, iteration: int) -> None:
    """On resume, forget logged rollouts and metrics of iterations the checkpoint does not hold,
    so that each rollout appears once in the log; the files are rewritten atomically."""
    log = run_dir / "rollouts.msgpack"
    if log.exists():
        keep = [r for r in read_records(log, RolloutRecord) if r.iteration < iteration]
        tmp = log.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        append_records(tmp, keep)
        os.replace(tmp, log)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= iteration]
        tmp = metrics.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in rows))
        os.replace(tmp, metrics)


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
                        log_tau=bt.log_tau[ci, i].tolist(),
                        logp=float(bt.logp[ci, i]),
                        reward=float(r[row, i]),
                        rewards={name: float(v[row * k + i]) for name, v in per_reward.items()},
                        baseline=float(b[row, i]),
                        advantage=float(adv[row, i]),
                    )
                )
            row += 1
    return out
