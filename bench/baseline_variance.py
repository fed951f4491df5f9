"""Variance of the policy-gradient estimate under each reward baseline (the paper's Figure 2a).

    cd <repo> && python bench/baseline_variance.py     # K in {2,4,8,16}, C=16, 200 trials, ~1 min
    python bench/baseline_variance.py --warmup 0 --trials 400 --out /tmp/variance.png

The toy problem of ``configs/toy.yaml`` (sampler, reward, policy, L), in-process: no Ray.

Method. The policy parameters are fixed: at init, and (``--warmup N``, default 50; 0 skips it)
also after N REINFORCE steps with the config's baseline, K and optimiser, so that alpha is no
longer the init point and every layer receives gradient (the default init zeroes the head's last
weight, so at init only the head's last layer does). A trial draws C contexts (prompt uniformly
from the train prompts, a fresh noise seed) and K schedules per context from the policy, runs
the sampler and scores the samples. From the SAME samples every baseline gives one estimate
(docs/method.md)

    g = 1/(C*K) sum_c sum_i (r_ci - b_ci) grad_theta log pi(tau_ci | c)

flattened over all policy parameters. Its variance is the trace of its covariance over trials,
E||g - E g||^2, estimated unbiasedly from the sums of g and of ||g||^2, and reported as a ratio
to RLOO's with a delete-a-group jackknife standard error: the trials are dealt into
``JACKKNIFE_GROUPS`` groups and the ratio is recomputed with each group left out (sums of g are
kept per group, never one g per trial: 214k parameters x trials x baselines would not fit).
Variance only: the small bias of xctx and js (their baseline depends on r_ci) is not counted.
Draws are made in log space and scored by their own log-prob, as the workers do, so every
estimate is that of the exact estimator.
A trial's contexts depend on (seed, trial) only, so every K sees the same contexts.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python bench/baseline_variance.py), not installed
    sys.path.insert(0, str(REPO))

from common.config import Config, load_config  # noqa: E402
from common.policy import FlatState, SchedulePolicy, collate, describe, log_dirichlet, log_prob, policy_kwargs  # noqa: E402
from common.schedule import executed_tau, times_from_tau  # noqa: E402
from learner import baselines  # noqa: E402
from learner.update import optimizer_for, reinforce_step  # noqa: E402
from rewards.toy import ToyReward  # noqa: E402
from rollout.backends.toy import ToySampler  # noqa: E402

BASELINES = ("none", "rloo", "xctx", "js", "js_loco")
REFERENCE = "rloo"
JACKKNIFE_GROUPS = 10
_CONTEXTS, _SCHEDULES, _WARMUP = 0xC0, 0x7A, 0x3A  # tags that keep the random streams apart


@dataclass
class Toy:
    """The frozen sampler, the reward and the policy inputs of every train prompt."""

    sampler: ToySampler
    reward: ToyReward
    prompts: list[str]
    tokens: dict[str, np.ndarray]
    pooled: dict[str, np.ndarray]
    steps: int

    @classmethod
    def from_config(cls, cfg: Config) -> Toy:
        if cfg.sampler.backend != "toy" or [r.name for r in cfg.rewards] != ["toy"]:
            raise ValueError("this bench runs the toy sampler with the single 'toy' reward")
        sampler = ToySampler(**cfg.sampler.toy.model_dump())
        # the toy reward scores against the sampler's own mixture: it takes the sampler section, as in a run
        reward = ToyReward(sampler=cfg.sampler.model_dump(mode="json"), **cfg.rewards[0].kwargs)
        prompts = sampler.spec().train_prompts
        feats = sampler.encode(prompts)
        return cls(
            sampler=sampler,
            reward=reward,
            prompts=prompts,
            tokens={p: f.tokens for p, f in zip(prompts, feats, strict=True)},
            pooled={p: f.pooled for p, f in zip(prompts, feats, strict=True)},
            steps=cfg.rollout.steps,
        )

    def contexts(self, rng: np.random.Generator, count: int):
        """``count`` contexts: prompts drawn uniformly, fresh noise seeds; returns (prompts, inputs)."""
        prompts = [self.prompts[i] for i in rng.integers(0, len(self.prompts), count)]
        x = self.sampler.initial_noise([int(s) for s in rng.integers(0, 2**31, count)])
        inputs = collate(x, [self.tokens[p] for p in prompts], np.stack([self.pooled[p] for p in prompts]))
        return prompts, inputs

    def rollouts(self, alpha: np.ndarray, prompts: list[str], x: np.ndarray, k: int, rng: np.random.Generator):
        """K draws per context from Dirichlet(alpha), run and scored: (log tau [C,K,L+1], r [C,K]).

        As the rollout workers do: the draw is made in log space and scored by its own log-prob;
        the executed schedule is the draw floored (``executed_tau``)."""
        c = len(prompts)
        log_tau = np.stack([log_dirichlet(a, rng, size=k) for a in alpha])
        tau = executed_tau(log_tau)
        rep = [p for p in prompts for _ in range(k)]
        samples = self.sampler.sample(rep, np.repeat(x, k, axis=0), times_from_tau(tau.reshape(c * k, -1)))
        return log_tau, self.reward(samples, rep).astype(np.float64).reshape(c, k)


@dataclass
class VarianceTable:
    """Gradient variance per baseline (rows) and K (columns) for one set of policy parameters."""

    label: str
    ks: list[int]
    names: tuple[str, ...]
    trials: int
    contexts: int
    variance: np.ndarray  # [baselines, K]: trace of the covariance of g
    ratio: np.ndarray  # [baselines, K]: variance / variance of rloo
    ratio_se: np.ndarray  # [baselines, K]: jackknife standard error of the ratio
    js_alpha: np.ndarray  # [K]: mean James-Stein weight of js
    loco_alpha: np.ndarray  # [K]: mean weight of js_loco (over trials and contexts)
    seconds: float

    def ratios(self) -> dict[str, dict[int, float]]:
        return {n: {k: float(self.ratio[i, j]) for j, k in enumerate(self.ks)} for i, n in enumerate(self.names)}

    def format(self) -> str:
        head = f"{'baseline':<10}" + "".join(f"{f'K={k}':>18}" for k in self.ks)
        rule = "-" * len(head)
        lines = [
            f"gradient variance / variance with {REFERENCE}  [{self.label}; C={self.contexts}, "
            f"{self.trials} trials, +- jackknife s.e.; {self.seconds:.1f} s]",
            rule,
            head,
            rule,
        ]
        for i, name in enumerate(self.names):
            cells = "".join(
                f"{f'{q:.4g} +- {se:.2g}':>18}" for q, se in zip(self.ratio[i], self.ratio_se[i], strict=True)
            )
            lines.append(f"{name:<10}{cells}")
        lines.append(rule)
        ref = self.names.index(REFERENCE)
        lines.append(f"{'var rloo':<10}" + "".join(f"{v:>18.4g}" for v in self.variance[ref]))
        lines.append(f"{'js alpha':<10}" + "".join(f"{a:>18.3f}" for a in self.js_alpha))
        lines.append(f"{'loco alpha':<10}" + "".join(f"{a:>18.3f}" for a in self.loco_alpha))
        return "\n".join(lines)


def _trace_cov(sum_g: np.ndarray, sum_sq: float, n: int) -> float:
    """Unbiased E||g - E g||^2 from sum_t g_t and sum_t ||g_t||^2 over n trials."""
    return float((sum_sq - sum_g @ sum_g / n) / (n - 1))


def policy_gradients(
    alpha: torch.Tensor, log_tau: np.ndarray, adv: np.ndarray, params: list[torch.Tensor]
) -> np.ndarray:
    """g for each advantage matrix ``adv`` [B, C, K]: [B, P] float64, flattened over ``params``.

    g_b = 1/(C*K) sum_ci adv_bci grad_theta log pi(tau_ci | c) = J^T v_b, with J = d alpha / d theta
    and v_b = 1/(C*K) sum_i adv_bci d log pi(tau_ci | c) / d alpha_c. The v_b are cheap (alpha
    space); one batched backward through the policy then gives every g_b, three times faster on a
    CPU than one backward of the surrogate per baseline (the unit test checks they agree).
    """
    k = log_tau.shape[1]
    a = alpha.detach().double().requires_grad_()
    logp = log_prob(a[:, None, :].expand(-1, k, -1), torch.from_numpy(log_tau))  # [C, K] float64
    v = torch.stack([torch.autograd.grad((torch.from_numpy(ab) * logp).mean(), a, retain_graph=True)[0] for ab in adv])
    grads = torch.autograd.grad(alpha, params, grad_outputs=v.to(alpha.dtype), is_grads_batched=True)
    return torch.cat([g.reshape(len(adv), -1) for g in grads], dim=1).double().numpy()


def measure(
    toy: Toy, policy: SchedulePolicy, ks: list[int], contexts: int, trials: int, seed: int, label: str
) -> VarianceTable:
    """The variance of g under every baseline, for every K, at the policy's current parameters."""
    start = time.perf_counter()
    params = [p for p in policy.parameters() if p.requires_grad]
    size = sum(p.numel() for p in params)
    groups = min(JACKKNIFE_GROUPS, trials)
    nb, nk = len(BASELINES), len(ks)
    variance, ratio, ratio_se = (np.zeros((nb, nk)) for _ in range(3))
    js_alpha, loco_alpha = np.zeros(nk), np.zeros(nk)
    policy.eval()
    for j, k in enumerate(ks):
        sum_g = np.zeros((nb, groups, size))  # per baseline and jackknife group: sum of g
        sum_sq = np.zeros((nb, groups))  # ... and of ||g||^2
        count = np.zeros(groups)
        alphas: dict[str, list[float]] = {"js": [], "js_loco": []}
        for t in range(trials):
            prompts, inputs = toy.contexts(np.random.default_rng([seed, _CONTEXTS, t]), contexts)
            alpha = policy(inputs)  # [C, L+1], with the graph to every parameter
            rng = np.random.default_rng([seed, _SCHEDULES, k, t])
            log_tau, r = toy.rollouts(alpha.detach().double().numpy(), prompts, inputs.x.numpy(), k, rng)
            adv = []
            for name in BASELINES:
                b, diag = baselines.compute(name, r)  # the same rewards for every baseline
                adv.append(r - b)
                if name in alphas:
                    alphas[name].append(float(np.mean(diag["alpha"])))
            g = policy_gradients(alpha, log_tau, np.stack(adv), params)  # [baselines, P]
            grp = t % groups
            count[grp] += 1
            sum_g[:, grp] += g
            sum_sq[:, grp] += (g * g).sum(1)
        tot_g, tot_sq, n = sum_g.sum(1), sum_sq.sum(1), int(count.sum())
        full = np.array([_trace_cov(tot_g[i], tot_sq[i], n) for i in range(nb)])
        # delete-a-group jackknife: every variance with group h left out, then the ratio's s.e.
        loo = np.array(
            [
                [_trace_cov(tot_g[i] - sum_g[i, h], tot_sq[i] - sum_sq[i, h], n - int(count[h])) for h in range(groups)]
                for i in range(nb)
            ]
        )  # [baselines, groups]
        ref = BASELINES.index(REFERENCE)
        loo_ratio = loo / loo[ref]
        variance[:, j] = full
        ratio[:, j] = full / full[ref]
        ratio_se[:, j] = np.sqrt((groups - 1) / groups * ((loo_ratio - loo_ratio.mean(1, keepdims=True)) ** 2).sum(1))
        js_alpha[j], loco_alpha[j] = np.mean(alphas["js"]), np.mean(alphas["js_loco"])
    return VarianceTable(
        label=label,
        ks=list(ks),
        names=BASELINES,
        trials=trials,
        contexts=contexts,
        variance=variance,
        ratio=ratio,
        ratio_se=ratio_se,
        js_alpha=js_alpha,
        loco_alpha=loco_alpha,
        seconds=time.perf_counter() - start,
    )


def warm_up(toy: Toy, policy: SchedulePolicy, cfg: Config, steps: int, seed: int) -> None:
    """``steps`` REINFORCE updates with the config's baseline, K, C and optimiser (as learner/loop.py)."""
    lc, k, c = cfg.learner, cfg.rollout.k, cfg.rollout.contexts_per_iter
    optimizer = optimizer_for(FlatState(policy), lc.lr, lc.weight_decay)
    for step in range(steps):
        prompts, inputs = toy.contexts(np.random.default_rng([seed, _WARMUP, step]), c)
        with torch.no_grad():
            alpha = policy(inputs).double()
        rng = np.random.default_rng([seed, _WARMUP, step, 1])
        log_tau, r = toy.rollouts(alpha.numpy(), prompts, inputs.x.numpy(), k, rng)
        behaviour = log_prob(alpha[:, None, :].expand(-1, k, -1), torch.from_numpy(log_tau)).numpy()
        b, _ = baselines.compute(lc.baseline, r)
        reinforce_step(policy, optimizer, inputs, log_tau, r - b, behaviour, lc.grad_clip)


def plot(tables: list[VarianceTable], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 4.2), squeeze=False, sharey=True)
    markers = dict(zip(BASELINES, "osD^v", strict=True))
    for ax, tab in zip(axes[0], tables, strict=True):
        for i, name in enumerate(tab.names):
            ls = "--" if name == REFERENCE else "-"
            ax.errorbar(tab.ks, tab.ratio[i], yerr=tab.ratio_se[i], marker=markers[name], ls=ls, capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_locator(LogLocator(base=2))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(tab.ks, [str(k) for k in tab.ks])
        ax.set_xlabel("K (rollouts per context)")
        ax.set_title(f"{tab.label}\nC={tab.contexts}, L={steps}, {tab.trials} trials", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"gradient variance / variance with {REFERENCE}")
    axes[0][-1].legend(title="baseline")
    fig.suptitle("Variance of the policy-gradient estimate (toy)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", type=Path, default=REPO / "configs" / "toy.yaml", help="Toy config (sampler, reward, policy, L)."
    )
    p.add_argument("--trials", type=int, default=200, help="Independent gradient estimates per K.")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16], help="Rollouts per context to compare.")
    p.add_argument("--contexts", type=int, default=16, help="C: contexts per estimate (js_loco needs 3).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the policy init and of every draw.")
    p.add_argument("--warmup", type=int, default=50, help="Also measure after N REINFORCE steps (0: init only).")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "baseline_variance.png", help="Where the PNG goes.")
    args = p.parse_args(argv)
    if args.trials < 3:
        p.error("--trials must be at least 3")
    if args.contexts < baselines.MIN_CONTEXTS["js_loco"]:
        p.error(f"--contexts must be at least {baselines.MIN_CONTEXTS['js_loco']} (js_loco leaves one context out)")
    if min(args.ks) < 2:
        p.error("every K must be at least 2 (rloo leaves one rollout out)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> list[VarianceTable]:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cfg = load_config(["--config", str(args.config)])
    toy = Toy.from_config(cfg)
    torch.manual_seed(args.seed)
    kwargs = policy_kwargs(cfg.policy, toy.sampler.spec(), toy.steps, toy.sampler.default_tau(toy.steps))
    policy = SchedulePolicy(**kwargs).eval()
    print(f"{describe(policy)}; baselines {', '.join(BASELINES)}")

    tables = [measure(toy, policy, args.ks, args.contexts, args.trials, args.seed, "policy at init")]
    print(tables[-1].format(), flush=True)
    if args.warmup:
        warm_up(toy, policy, cfg, args.warmup, args.seed)
        label = f"after {args.warmup} REINFORCE steps ({cfg.learner.baseline}, K={cfg.rollout.k})"
        tables.append(measure(toy, policy, args.ks, args.contexts, args.trials, args.seed, label))
        print(tables[-1].format(), flush=True)
    plot(tables, args.out, toy.steps)
    print(f"wrote {args.out}; {time.perf_counter() - start:.1f} s in all")
    return tables


if __name__ == "__main__":
    main()
