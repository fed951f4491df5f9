"""Oracle gap: does the learned instance-level schedule beat the best fixed schedule a search finds?

    cd <repo> && python bench/oracle_gap.py --backend toy -- --learner.iterations=100   # trains first
    python bench/oracle_gap.py --backend both --run-toy runs/toy --run-digits runs/digits   # ~4 min
    python bench/oracle_gap.py --backend digits --run-digits runs/digits --candidates 64 --out runs/gap.json

For the ``toy`` and ``digits`` backends, in-process (no Ray for the evaluation), at the run's L,
every schedule method below runs on the SAME held-out contexts (``learner.contexts.eval_contexts``:
the eval prompts x odd, never-trained noise seeds), one sample per context:

  default                  the sampler's ``default_tau(L)``.
  best fixed (search)      random search over N candidate simplex points: the default, and guarded
                           Dirichlet draws around it at several concentrations and flat ones. Each is
                           scored on training contexts (``ContextStream``: even seeds); the best mean
                           training reward wins, then runs on the held-out contexts.
  best per prompt          the same candidates, the best chosen per prompt on that prompt's training
                           contexts. Prompts are grouped by the class they name: digits' held-out
                           prompts are worded unlike its training prompts ("a picture of the number
                           seven" against "a handwritten seven", "the digit 7").
  best per (prompt, mode)  toy only. A context's mode is the Gaussian mode of the prompted class that
                           its noise flows to (the mode centre nearest a 256-step exact-flow sample).
                           The best candidate per (prompt, mode) on training contexts, applied with the
                           held-out context's own mode: what a policy that reads the noise can reach.
  oracle (per instance)    for each held-out context the best candidate on that very context
                           (best-of-N chosen on the instance itself). Every fixed row above picks
                           among the same candidates, so the oracle is at least as good on every
                           context.
  learned global           ``<run>/global/policy``: one learned schedule (its Dirichlet mean).
  learned instance-level   ``<run>/policy``: the Dirichlet mean ``alpha / sum(alpha)`` of each context.

``--run-toy DIR`` / ``--run-digits DIR`` read a finished run (its ``config.yaml`` fixes the sampler,
L and the seed); without one the bench first trains one with the real entry point
(``learner.main.run``, a local Ray with 2 CPUs) under ``--train-dir``; flags after ``--`` go to it.

Rewards. toy: the config's toy reward (log-density of the prompted class, floored). digits: the
fidelity reward, -MSE to the R-step reference sample of the same prompt and noise (R =
``rollout.reference_steps``, or 64 if that is 0); its gold metric is the Frechet distance to the
held-out real digits (lower is better; the references' own FD is the floor), and realism x
p(class) is an extra column.

Statistics. Paired differences to the default on the held-out contexts, standard errors clustered
by prompt (``learner.stats.mean_se``); the share of the oracle's gain a method captures is its
mean gain over the oracle's mean gain. Noise dependence: the share of the variance of a method's
executed schedules over the held-out contexts (summed over the components of tau) that lies
within a prompt, across noises: 0 for a schedule that depends on the prompt only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (python bench/oracle_gap.py), not installed
    sys.path.insert(0, str(REPO))

from common import digits
from common.config import DEFAULT_REFERENCE_STEPS, Config, load_config
from common.messages import Context
from common.policy import SchedulePolicy, collate
from common.schedule import guard_tau, interior, times_from_tau
from learner.contexts import ContextStream, eval_contexts
from learner.stats import mean_se

DEFAULT, FIXED, PER_PROMPT, PER_MODE = "default", "best fixed (search)", "best per prompt", "best per (prompt, mode)"
ORACLE, GLOBAL, INSTANCE = "oracle (per instance best-of-N)", "learned global", "learned instance-level"
#: Candidate kinds, dealt in turn: a flat Dirichlet(1, ..., 1), then Dirichlet(c * default) at total
#: concentration c (the default is first moved inside the simplex: its tau_1 is 0).
CONCENTRATIONS = (None, 4.0, 16.0, 64.0, 256.0)
MODE_STEPS = 256  # NFE of the exact-flow sample that tells a toy context's mode
_CANDIDATES = 0xCA  # tag of the candidates' random stream
#: Default search budget per backend: (candidates, training contexts). The toy is cheap enough for
#: a search far larger than anything the policy sees (about a minute); digits about two minutes.
SEARCH = {"toy": (2000, 4000), "digits": (300, 600)}


# --- the frozen sampler, its reward and the contexts -----------------------------------------


@dataclass
class Contexts:
    """Contexts with what running and scoring them needs."""

    prompts: list[str]
    seeds: list[int]
    noise: np.ndarray  # [N, *x_shape]
    labels: np.ndarray  # [N] the class each prompt names
    references: np.ndarray | None = None  # digits: [N, 8, 8] R-step samples of the same prompt and noise
    modes: np.ndarray | None = None  # toy: [N] the mode of the class the noise flows to

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Backend:
    """A frozen sampler with its reward (and, for digits, the extra column and the gold metric)."""

    name: str
    sampler: Any
    steps: int
    train_prompts: list[str]
    eval_prompts: list[str]
    seed: int
    label: Callable[[str], int]
    reward: Callable[[np.ndarray, list[str], np.ndarray | None], np.ndarray]
    reward_name: str
    reference_steps: int = 0
    mode_steps: int = 0
    extra: Any = None  # digits: rewards.digits.DigitsReward (realism x p(class))
    frechet: Any = None  # digits: rewards.digits.DigitsFrechet
    chunk: int = 8192  # samples per sampler call

    @classmethod
    def from_config(cls, cfg: Config) -> Backend:
        b = cfg.sampler.backend
        shared = {"steps": cfg.rollout.steps, "seed": cfg.experiment.seed}
        if b == "toy":
            from rewards.toy import ToyReward
            from rollout.backends.toy import ToySampler

            if [r.name for r in cfg.rewards] != ["toy"]:
                raise ValueError("the toy bench scores with the single 'toy' reward")
            sampler = ToySampler(**cfg.sampler.toy.model_dump())
            # The toy reward scores against the sampler's own mixture (as learner/loop.py hands it).
            toy = ToyReward(sampler=cfg.sampler.model_dump(mode="json"), **cfg.rewards[0].kwargs)
            spec = sampler.spec()
            return cls(
                name="toy",
                sampler=sampler,
                label=sampler.mixture.parse,
                reward=lambda images, prompts, refs: toy(images, prompts),
                reward_name=f"toy log-density (floor {toy.floor:g})",
                mode_steps=MODE_STEPS,
                chunk=65536,
                train_prompts=cfg.learner.train_prompts or spec.train_prompts,
                eval_prompts=cfg.learner.eval_prompts or spec.eval_prompts,
                **shared,
            )
        if b == "digits":
            from rewards.digits import DigitsFrechet, DigitsReward
            from rewards.fidelity import Fidelity
            from rollout.backends.digits import DigitsSampler

            sampler = DigitsSampler(**cfg.sampler.digits.model_dump())
            fidelity = Fidelity()
            spec = sampler.spec()
            return cls(
                name="digits",
                sampler=sampler,
                label=digits.parse_digit,
                reward=lambda images, prompts, refs: fidelity(images, prompts, references=refs),
                reward_name="fidelity (-MSE to the reference)",
                reference_steps=cfg.rollout.reference_steps or DEFAULT_REFERENCE_STEPS,
                extra=DigitsReward(),
                frechet=DigitsFrechet(),
                chunk=4096,
                train_prompts=cfg.learner.train_prompts or spec.train_prompts,
                eval_prompts=cfg.learner.eval_prompts or spec.eval_prompts,
                **shared,
            )
        raise ValueError(f"this bench runs the toy or the digits backend, not {b!r}")


def _chunks(idx: np.ndarray, size: int) -> list[np.ndarray]:
    return [idx[s : s + size] for s in range(0, len(idx), size)]


def sample(backend: Backend, prompts: Sequence[str], noise: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """One sample per row of ``tau`` [N, L+1], in chunks of ``backend.chunk``."""
    parts = [
        backend.sampler.sample([prompts[j] for j in i], noise[i], times_from_tau(tau[i]))
        for i in _chunks(np.arange(len(tau)), backend.chunk)
    ]
    return np.concatenate(parts)


def make_contexts(backend: Backend, contexts: list[Context]) -> Contexts:
    """Noise, class labels and (digits) reference samples or (toy) modes of ``contexts``."""
    prompts, seeds = [c.prompt for c in contexts], [c.seed for c in contexts]
    noise = backend.sampler.initial_noise(seeds)
    out = Contexts(prompts, seeds, noise, np.array([backend.label(p) for p in prompts]))
    if backend.reference_steps:
        tau = np.tile(backend.sampler.default_tau(backend.reference_steps), (len(prompts), 1))
        out.references = sample(backend, prompts, noise, tau)
    if backend.mode_steps:
        tau = np.tile(backend.sampler.default_tau(backend.mode_steps), (len(prompts), 1))
        x = sample(backend, prompts, noise, tau).astype(np.float64)  # [N, D], on a mode of its class
        centres = backend.sampler.mixture.means[out.labels]  # [N, M, D]
        out.modes = ((x[:, None, :] - centres) ** 2).sum(-1).argmin(1)
    return out


def rollout(backend: Backend, ctxs: Contexts, idx: np.ndarray, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run the contexts ``idx`` under the schedules ``tau`` (a row each) and score them: (reward, images)."""
    prompts = [ctxs.prompts[i] for i in idx]
    images = sample(backend, prompts, ctxs.noise[idx], tau)
    refs = None if ctxs.references is None else ctxs.references[idx]
    return np.asarray(backend.reward(images, prompts, refs), dtype=np.float64), images


# --- the search ---------------------------------------------------------------------------------


def draw_candidates(default_tau: np.ndarray, count: int, seed: int) -> np.ndarray:
    """[count, L+1] simplex points: the exact default first, then guarded Dirichlet draws, the
    kinds of ``CONCENTRATIONS`` dealt in turn (flat, then ever tighter around the default)."""
    if count < 1:
        raise ValueError(f"the search needs at least one candidate (the default), got {count}")
    rng = np.random.default_rng([seed, _CANDIDATES])
    centre = interior(default_tau)
    alphas = [np.ones_like(centre) if c is None else c * centre for c in CONCENTRATIONS]
    draws = [rng.dirichlet(alphas[i % len(alphas)]) for i in range(count - 1)]
    return np.concatenate(
        [np.asarray(default_tau, dtype=np.float64)[None], guard_tau(np.array(draws).reshape(-1, len(centre)))]
    )


def score_matrix(backend: Backend, candidates: np.ndarray, ctxs: Contexts) -> np.ndarray:
    """[candidates, contexts] reward of every candidate on every context, in big batches."""
    n = len(ctxs)
    flat = np.arange(len(candidates) * n)
    parts = [rollout(backend, ctxs, f % n, candidates[f // n])[0] for f in _chunks(flat, backend.chunk)]
    return np.concatenate(parts).reshape(len(candidates), n)


def best_by_group(scores: np.ndarray, keys: Sequence[Hashable]) -> dict[Hashable, int]:
    """For each group of contexts (equal key), the candidate with the highest mean score on it
    (a tie goes to the lower index: candidate 0, the default, keeps a tie)."""
    keys = list(keys)
    return {
        k: int(np.argmax(scores[:, [i for i, kk in enumerate(keys) if kk == k]].mean(1))) for k in dict.fromkeys(keys)
    }


def pick(choice: dict[Hashable, int], keys: Sequence[Hashable], fallback: np.ndarray) -> tuple[np.ndarray, int]:
    """The chosen candidate of each context's group, or ``fallback[i]`` for a group never seen in
    training: (candidate index per context, number of fallbacks)."""
    idx = np.array([choice.get(k, int(f)) for k, f in zip(keys, fallback, strict=True)])
    return idx, sum(k not in choice for k in keys)


# --- the learned policies -----------------------------------------------------------------------


def policy_tau(backend: Backend, path: Path, ctxs: Contexts, batch: int = 512) -> np.ndarray:
    """The schedule a saved policy executes on each context: its Dirichlet mean, [N, L+1] float64."""
    policy = SchedulePolicy.from_pretrained(path).eval()
    if policy.steps != backend.steps:
        raise ValueError(f"the policy in {path} has L={policy.steps}, the bench runs L={backend.steps}")
    unique = list(dict.fromkeys(ctxs.prompts))
    feats = dict(zip(unique, backend.sampler.encode(unique), strict=True))
    out = []
    with torch.no_grad():
        for i in _chunks(np.arange(len(ctxs)), batch):
            f = [feats[ctxs.prompts[j]] for j in i]
            pooled = None if any(x.pooled is None for x in f) else np.stack([x.pooled for x in f])
            alpha = policy(collate(ctxs.noise[i], [x.tokens for x in f], pooled)).double().numpy()
            out.append(alpha / alpha.sum(-1, keepdims=True))
    return np.concatenate(out)


# --- summaries ----------------------------------------------------------------------------------


def within_prompt_share(tau: np.ndarray, prompts: Sequence[str]) -> float:
    """Share of the schedules' variance over contexts (summed over tau's components) that lies
    within a prompt, across noises: 1 - the between-prompt share; NaN if all are one schedule."""
    tau = np.asarray(tau, dtype=np.float64)
    _, g = np.unique(np.asarray(prompts), return_inverse=True)
    means = np.stack([tau[g == j].mean(0) for j in range(g.max() + 1)])
    if (tau == tau[0]).all():
        return float("nan")
    return float(((tau - means[g]) ** 2).sum()) / float(((tau - tau.mean(0)) ** 2).sum())


def oracle_share(gain: float, oracle_gain: float) -> float:
    """The share of the oracle's gain over the default that a method's gain captures."""
    return gain / oracle_gain if oracle_gain > 0 else float("nan")


@dataclass
class Method:
    """One schedule method on the held-out contexts."""

    reward: np.ndarray  # [N]
    tau: np.ndarray  # [N, L+1] the executed schedules
    images: np.ndarray | None = None  # digits: for the Frechet distance and the extra column


@dataclass
class GapResult:
    backend: str
    steps: int
    reward_name: str
    prompts: list[str]  # the held-out contexts' prompts (the clusters)
    candidates: np.ndarray  # [M, L+1]
    train_scores: np.ndarray  # [M, train contexts]
    eval_scores: np.ndarray  # [M, held-out contexts]
    methods: dict[str, Method]
    notes: dict[str, Any] = field(default_factory=dict)  # search, fallbacks, FD floor, run dir
    fd: dict[str, float] = field(default_factory=dict)  # digits: method -> Frechet distance
    extra: dict[str, float] = field(default_factory=dict)  # digits: method -> mean realism x p(class)
    seconds: dict[str, float] = field(default_factory=dict)

    def rows(self) -> dict[str, dict[str, float]]:
        """Per method: reward mean +- s.e., paired gain over the default +- s.e., share of the oracle's gain."""
        base = self.methods[DEFAULT].reward
        oracle_gain = float((self.methods[ORACLE].reward - base).mean())
        out = {}
        for name, m in self.methods.items():
            r, g = mean_se(m.reward, clusters=self.prompts), mean_se(m.reward - base, clusters=self.prompts)
            out[name] = {
                "mean": r["mean"],
                "se": r["se"],
                "n": r["n"],
                "gain": g["mean"],
                "gain_se": g["se"],
                "oracle_share": oracle_share(g["mean"], oracle_gain),
            }
            if name in self.fd:
                out[name]["fd"] = self.fd[name]
            if name in self.extra:
                out[name]["realism_x_pclass"] = self.extra[name]
        return out

    def paired(self, a: str, b: str) -> dict[str, float] | None:
        """Method ``a`` minus method ``b``, paired and clustered by prompt, with its z (mean / s.e.)."""
        if a not in self.methods or b not in self.methods:
            return None
        d = mean_se(self.methods[a].reward - self.methods[b].reward, clusters=self.prompts)
        return {**d, "z": d["mean"] / d["se"] if d["se"] > 0 else float("nan")}

    def learned_vs_fixed(self) -> dict[str, float] | None:
        """learned instance-level - best fixed."""
        return self.paired(INSTANCE, FIXED)

    def within_prompt(self) -> dict[str, float]:
        """Noise dependence of the learned instance-level schedules and of the oracle's picks."""
        return {
            n: within_prompt_share(self.methods[n].tau, self.prompts) for n in (INSTANCE, ORACLE) if n in self.methods
        }

    def summary(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "steps": self.steps,
            "reward": self.reward_name,
            "held_out": {"contexts": len(self.prompts), "prompts": len(set(self.prompts))},
            "rows": self.rows(),
            "learned_minus_best_fixed": self.learned_vs_fixed(),
            "instance_minus_global": self.paired(INSTANCE, GLOBAL),
            "within_prompt_share": self.within_prompt(),
            "schedules": {n: self.methods[n].tau[0].tolist() for n in (DEFAULT, FIXED, GLOBAL) if n in self.methods},
            **self.notes,
            "seconds": self.seconds,
        }

    def format(self) -> str:
        n, g = len(self.prompts), len(set(self.prompts))
        s = self.notes["search"]
        lines = [
            (
                f"### {self.backend}: L={self.steps}, {g} held-out prompts x {n // g} noises = {n} contexts;"
                f" reward {self.reward_name}"
            ),
            "",
            (
                f"search budget: {s['candidates']} candidates x {s['train_contexts']} training contexts"
                f" = {s['candidates'] * s['train_contexts']:,} samples; the oracle scores"
                f" {s['candidates']} x {n} = {s['candidates'] * n:,} more"
            ),
            "",
        ]
        digits_cols = bool(self.fd)
        head = ["method", "reward +- s.e.", "gain over default +- s.e.", "% of oracle gain"]
        if digits_cols:
            head += ["FD (lower better)", "realism x p(class)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in self.rows().items():
            cells = [
                name,
                f"{r['mean']:.4g} +- {r['se']:.2g}",
                f"{r['gain']:+.4g} +- {r['gain_se']:.2g}",
                f"{100 * r['oracle_share']:.0f}%",
            ]
            if digits_cols:
                cells += [
                    f"{r['fd']:.1f}" if "fd" in r else "",
                    f"{r['realism_x_pclass']:.3f}" if "realism_x_pclass" in r else "",
                ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for b in (FIXED, GLOBAL):
            d = self.paired(INSTANCE, b)
            if d is not None:
                lines.append(f"{INSTANCE} - {b}: {d['mean']:+.4g} +- {d['se']:.2g} ({d['z']:+.1f} s.e.)")
        shares = self.within_prompt()
        lines.append(
            "within-prompt share of schedule variance (noise dependence): "
            + ", ".join(f"{k} {v:.2f}" for k, v in shares.items())
        )
        fixed = {n: self.methods[n].tau[0] for n in (DEFAULT, FIXED, GLOBAL) if n in self.methods}
        lines.append(
            "schedules (tau): " + "; ".join(f"{k} {np.array2string(t, precision=3)}" for k, t in fixed.items())
        )
        if "fd_reference" in self.notes:
            lines.append(
                f"FD of the {self.notes['reference_steps']}-step references (the floor):"
                f" {self.notes['fd_reference']:.1f}"
            )
        if self.notes.get("fallbacks"):
            lines.append(f"groups never seen in training (fell back to the coarser choice): {self.notes['fallbacks']}")
        lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


# --- one backend, end to end --------------------------------------------------------------------


def oracle_gap(
    backend: Backend,
    run_dir: Path | None,
    candidates: int,
    train_contexts: int,
    eval_seeds: int,
    held_out_seed: int | None = None,
) -> GapResult:
    """Every method of the module docstring on the same held-out contexts of ``backend``: the
    run's (its seed's), or those of ``held_out_seed`` (noises no config was chosen on)."""
    clock, seconds = time.perf_counter(), {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    seed = backend.seed if held_out_seed is None else held_out_seed
    held = make_contexts(backend, eval_contexts(backend.eval_prompts, eval_seeds, seed))
    train = make_contexts(backend, ContextStream(backend.train_prompts, backend.seed).next(train_contexts))
    lap("contexts")

    cands = draw_candidates(backend.sampler.default_tau(backend.steps), candidates, backend.seed)
    train_scores = score_matrix(backend, cands, train)
    lap("search")
    eval_scores = score_matrix(backend, cands, held)
    lap("held-out candidates")

    # The fixed methods pick among the candidates (chosen on training contexts); the oracle picks
    # on the held-out context itself. Their held-out rewards are read from the same score matrix.
    n = len(held)
    best = int(np.argmax(train_scores.mean(1)))
    idx = {DEFAULT: np.zeros(n, dtype=int), FIXED: np.full(n, best)}
    idx[PER_PROMPT], fb_prompt = pick(best_by_group(train_scores, train.labels), held.labels, idx[FIXED])
    fallbacks = {PER_PROMPT: fb_prompt}
    if held.modes is not None:
        keys = list(zip(train.labels, train.modes, strict=True))
        idx[PER_MODE], fallbacks[PER_MODE] = pick(
            best_by_group(train_scores, keys), list(zip(held.labels, held.modes, strict=True)), idx[PER_PROMPT]
        )
    idx[ORACLE] = eval_scores.argmax(0)
    methods = {name: Method(eval_scores[i, np.arange(n)], cands[i]) for name, i in idx.items()}

    if run_dir is not None:
        for name, path in ((GLOBAL, run_dir / "global" / "policy"), (INSTANCE, run_dir / "policy")):
            if path.is_dir():
                tau = policy_tau(backend, path, held)
                reward, images = rollout(backend, held, np.arange(n), tau)
                methods[name] = Method(reward, tau, images)
    lap("learned")

    notes: dict[str, Any] = {
        "search": {
            "candidates": candidates,
            "train_contexts": train_contexts,
            "best": best,
            "best_train_mean": float(train_scores[best].mean()),
            "default_train_mean": float(train_scores[0].mean()),
        },
        "fallbacks": {k: v for k, v in fallbacks.items() if v},
        "run_dir": None if run_dir is None else str(run_dir),
    }
    result = GapResult(
        backend.name, backend.steps, backend.reward_name, held.prompts, cands, train_scores, eval_scores, methods, notes
    )
    if backend.frechet is not None:
        for name, m in methods.items():
            if m.images is None:
                _, m.images = rollout(backend, held, np.arange(n), m.tau)
            result.fd[name] = backend.frechet.distance(backend.frechet.features(m.images, held.prompts))
            result.extra[name] = float(np.mean(backend.extra(m.images, held.prompts)))
        notes["reference_steps"] = backend.reference_steps
        notes["fd_reference"] = backend.frechet.distance(backend.frechet.features(held.references, held.prompts))
        lap("metrics")
    result.seconds = {**seconds, "total": sum(seconds.values())}
    return result


def train_run(config: Path, flags: list[str], output_dir: Path) -> Path:
    """Train the global and the conditional policy with the real entry point, in-process (it starts
    a local Ray itself); returns the run directory."""
    from learner.main import run

    cfg = load_config(
        [
            "--config",
            str(config),
            f"--experiment.output_dir={output_dir}",
            "--learner.plots=false",
            "--learner.progress=false",
            "--ray.num_cpus=2",
            *flags,
        ]
    )
    run(cfg)
    return cfg.run_dir


def run_config(run_dir: Path) -> Config:
    """The config a run was trained with (sampler, L, seed, prompts)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.yaml")
    return load_config(["--config", str(path)])


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("toy", "digits", "both"), default="both", help="Which backend(s) to run.")
    p.add_argument("--run-toy", type=Path, help="A finished toy run directory (else one is trained first).")
    p.add_argument("--run-digits", type=Path, help="A finished digits run directory (else one is trained first).")
    p.add_argument(
        "--config-toy", type=Path, default=REPO / "configs" / "toy.yaml", help="Config to train the toy run."
    )
    p.add_argument(
        "--config-digits", type=Path, default=REPO / "configs" / "digits.yaml", help="Config to train the digits run."
    )
    p.add_argument("--train-dir", type=Path, help="Where trained runs go (default: a new directory under runs/).")
    p.add_argument(
        "--candidates",
        type=int,
        help=f"N: candidate schedules of the search, the default included (default per backend: {SEARCH})",
    )
    p.add_argument(
        "--train-contexts", type=int, help="Training contexts that score each candidate (default per backend)."
    )
    p.add_argument(
        "--eval-seeds", type=int, help="Held-out noises per eval prompt (default: the run's learner.eval_seeds)."
    )
    p.add_argument(
        "--held-out-seed",
        type=int,
        help="Draw the held-out noises from this seed, not the run's: noises that no config or setting was chosen"
        " on (the shipped configs were picked on their runs' own held-out contexts).",
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "runs" / "oracle_gap.json", help="Where the JSON of every figure goes."
    )
    args = p.parse_args(argv)
    if (args.candidates is not None and args.candidates < 1) or (
        args.train_contexts is not None and args.train_contexts < 1
    ):
        p.error("--candidates and --train-contexts must be at least 1")
    if args.eval_seeds is not None and args.eval_seeds < 1:
        p.error("--eval-seeds must be at least 1")
    return args, flags


def main(argv: list[str] | None = None) -> dict[str, GapResult]:
    args, flags = parse_args(argv)
    torch.set_num_threads(1)  # deterministic, and what the budgets are sized for
    backends = ["toy", "digits"] if args.backend == "both" else [args.backend]
    results = {}
    for name in backends:
        run_dir = getattr(args, f"run_{name}")
        if run_dir is None:
            out = args.train_dir or Path(tempfile.mkdtemp(prefix="oracle_gap_", dir=_mkdir(REPO / "runs")))
            print(f"training the {name} policies in {out} (pass --run-{name} to reuse a run) ...", flush=True)
            start = time.perf_counter()
            run_dir = train_run(getattr(args, f"config_{name}"), flags, out)
            print(f"trained in {time.perf_counter() - start:.0f} s: {run_dir}", flush=True)
        cfg = run_config(run_dir)
        torch.manual_seed(cfg.experiment.seed)
        backend = Backend.from_config(cfg)
        eval_seeds = args.eval_seeds or cfg.learner.eval_seeds
        candidates, train_contexts = SEARCH[name]
        results[name] = oracle_gap(
            backend,
            run_dir,
            args.candidates or candidates,
            args.train_contexts or train_contexts,
            eval_seeds,
            args.held_out_seed,
        )
        print(results[name].format() + "\n", flush=True)
    _mkdir(args.out.parent)
    args.out.write_text(json.dumps({k: r.summary() for k, r in results.items()}, indent=1, default=_json_default))
    print(f"wrote {args.out}")
    return results


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


if __name__ == "__main__":
    main()
