"""Why the learned instance-level schedule only ties the best fixed one on the toy: two checks.

    cd <repo> && python bench/toy_diagnostics.py --run runs/toy       # about 2 minutes on 2 cores

Both use bench/oracle_gap.py's search (the best fixed schedule of 2000 candidates on 4000
training contexts) and its held-out contexts, with standard errors clustered by prompt.

1. Exploration against evaluation. REINFORCE maximises the reward under the policy's own
   Dirichlet noise, while the table evaluates the Dirichlet mean. If that were the gap, the policy
   would beat the best fixed schedule under the same noise (a Dirichlet of the policy's own
   concentration around the best fixed schedule) by more than at the mean.
2. Capacity. A fresh policy of the run's architecture is fitted by regression (its Dirichlet mean
   to the per-(prompt, mode) best schedule of each training context), then evaluated on the
   held-out contexts: how much of the per-(prompt, mode) gain the network can represent at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "bench"):  # run as a script; oracle_gap is a sibling script
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import oracle_gap as og

from common.policy import SchedulePolicy, collate, log_dirichlet, policy_kwargs
from common.schedule import executed_tau
from learner.contexts import ContextStream, eval_contexts
from learner.stats import mean_se


def _features(backend: og.Backend, *ctxs: og.Contexts) -> dict:
    """Policy features of every prompt of ``ctxs``, encoded once."""
    prompts = list(dict.fromkeys(p for c in ctxs for p in c.prompts))
    return dict(zip(prompts, backend.sampler.encode(prompts), strict=True))


def _inputs(feats: dict, ctxs: og.Contexts, idx: np.ndarray):
    return collate(
        ctxs.noise[idx],
        [feats[ctxs.prompts[j]].tokens for j in idx],
        np.stack([feats[ctxs.prompts[j]].pooled for j in idx]),
    )


def noisy_reward(backend, ctxs, alpha: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Mean reward of ``draws`` schedules per context from Dirichlet(alpha[i]), [N]."""
    idx = np.arange(len(ctxs))
    runs = [
        og.rollout(backend, ctxs, idx, executed_tau(np.stack([log_dirichlet(a, rng) for a in alpha])))[0]
        for _ in range(draws)
    ]
    return np.mean(runs, axis=0)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="A finished toy run (config.yaml, policy/).")
    p.add_argument("--draws", type=int, default=8, help="Dirichlet draws per context for check 1.")
    p.add_argument("--fit-steps", type=int, default=3000, help="Regression steps of check 2.")
    p.add_argument("--candidates", type=int, default=2000, help="Candidates of the search (oracle_gap's).")
    p.add_argument("--train-contexts", type=int, default=4000, help="Training contexts of the search.")
    p.add_argument("--eval-seeds", type=int, help="Held-out noises per prompt (default: the run's).")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    cfg = og.run_config(args.run)
    b = og.Backend.from_config(cfg)
    if b.name != "toy":
        raise SystemExit("these checks need the toy's modes: pass a toy run")
    held = og.make_contexts(b, eval_contexts(b.eval_prompts, args.eval_seeds or cfg.learner.eval_seeds, b.seed))
    train = og.make_contexts(b, ContextStream(b.train_prompts, b.seed).next(args.train_contexts))
    cands = og.draw_candidates(b.sampler.default_tau(b.steps), args.candidates, b.seed)
    scores = og.score_matrix(b, cands, train)
    best = cands[int(np.argmax(scores.mean(1)))]
    n, idx = len(held), np.arange(len(held))
    feats = _features(b, held, train)
    fixed = og.rollout(b, held, idx, np.tile(best, (n, 1)))[0]
    out = {}

    # 1. the policy and the best fixed schedule, at the mean and under the same exploration noise
    policy = SchedulePolicy.from_pretrained(args.run / "policy").eval()
    with torch.no_grad():
        alpha = policy(_inputs(feats, held, idx)).double().numpy()
    conc = alpha.sum(-1, keepdims=True)
    at_mean = og.rollout(b, held, idx, alpha / conc)[0]
    rng = np.random.default_rng(0)
    centre = np.maximum(best, 1e-3) / np.maximum(best, 1e-3).sum()
    out["at the mean: learned - best fixed"] = mean_se(at_mean - fixed, held.prompts)
    out["under the policy's noise: learned - best fixed"] = mean_se(
        noisy_reward(b, held, alpha, args.draws, rng) - noisy_reward(b, held, centre * conc, args.draws, rng),
        held.prompts,
    )

    # 2. the same architecture fitted to the per-(prompt, mode) best schedules by regression
    keys = list(zip(train.prompts, train.modes, strict=True))
    choice = og.best_by_group(scores, keys)
    target = torch.from_numpy(np.stack([cands[choice[k]] for k in keys])).float()
    torch.manual_seed(cfg.experiment.seed)
    spec = b.sampler.spec()
    fitted = SchedulePolicy(**policy_kwargs(cfg.policy, spec, b.steps, b.sampler.default_tau(b.steps)))
    opt = torch.optim.AdamW(fitted.parameters(), lr=1e-3)
    losses = []
    for step in range(args.fit_steps):
        i = np.random.default_rng([cfg.experiment.seed, step]).integers(0, len(train), 256)
        a = fitted(_inputs(feats, train, i))
        loss = ((a / a.sum(-1, keepdim=True) - target[i]) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    out["fit loss"] = {"first": losses[0], "last": float(np.mean(losses[-20:]))} if losses else {}
    fitted.eval()
    with torch.no_grad():
        a = fitted(_inputs(feats, held, idx)).double().numpy()
    table = np.stack(
        [
            cands[choice.get((pr, m), int(np.argmax(scores.mean(1))))]
            for pr, m in zip(held.prompts, held.modes, strict=True)
        ]
    )
    out["per-(prompt, mode) table - best fixed"] = mean_se(og.rollout(b, held, idx, table)[0] - fixed, held.prompts)
    out["regressed policy - best fixed"] = mean_se(
        og.rollout(b, held, idx, a / a.sum(-1, keepdims=True))[0] - fixed, held.prompts
    )

    for name, s in out.items():
        if "mean" in s:
            print(f"{name:<50} {s['mean']:+.3f} +- {s['se']:.3f}")
    print(
        f"regression loss {out['fit loss'].get('first', float('nan')):.4f}"
        f" -> {out['fit loss'].get('last', float('nan')):.4f}"
    )
    print(f"{time.perf_counter() - start:.0f} s")
    return out


if __name__ == "__main__":
    main()
