"""Held-out evaluation: the learned schedules against the default schedule.

Every schedule runs on the same held-out contexts (prompts x never-trained noises) at the same
L, so the comparison is paired: the table reports each schedule's reward (mean +- standard
error), the paired difference to the default, and set-level metrics such as a Frechet distance
(lower is better), so that a reward that rises while the samples drift from the data (reward
hacking) is visible. Standard errors are clustered by prompt (``learner.stats``): the noises of
one prompt are not independent draws of what the table generalises over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.signals import end_on_sigterm, how_stopped, loading

with loading(__name__):
    import numpy as np
    import ray

    from common.checkpoint import load_run_config
    from common.config import (
        BUILTIN_BACKENDS,
        EVAL_SEEDS,
        MAX_STEPS,
        CommandLine,
        Config,
        ConfigError,
        changed_fields,
        given_path,
        int_at_least,
        ints_at_least,
    )
    from common.messages import Context, ScheduleMode
    from common.rundir import EVALUATION, hold
    from learner.groups import Collected, Dispatcher, MetricGroup, RewardGroup, RunStopped
    from learner.stats import mean_se

DEFAULT = "default"
GLOBAL, INSTANCE = "learned global", "learned instance-level"


def learned_name(variant: str) -> str:
    """The name the tables give a policy of ``variant``'s learned schedules."""
    return GLOBAL if variant == "global" else INSTANCE


@dataclass
class Schedule:
    """A schedule to evaluate: the backend default, the policy's Dirichlet mean, a fixed tau, or
    (``mode='sample'``, ``k`` > 1) the best of ``k`` draws from the policy (k times the NFE)."""

    mode: ScheduleMode
    tau: list[float] | None = None
    k: int = 1


@dataclass
class EvalResult:
    rewards: dict[str, np.ndarray]  # schedule -> [N] total reward, same contexts in the same order
    # schedule (or 'a - b': a paired difference of ``pairs``) -> metric -> value, and its noise as '<metric>_se'
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    taus: dict[str, np.ndarray] = field(default_factory=dict)  # schedule -> [N, L+1] executed schedules
    prompts: list[str] | None = None  # [N] each context's prompt: the clusters of the standard errors
    per_reward: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # schedule -> reward -> [N]
    lower_is_better: dict[str, bool] = field(default_factory=dict)  # set metric -> which way is better

    def pairs(self) -> list[tuple[str, str]]:
        """The paired differences reported, (a, b) for a - b: each schedule against the default,
        and the instance-level policy against the learned global schedule, the best fixed schedule
        training found (a gain a fixed schedule also gets is not instance-level)."""
        out = [(name, DEFAULT) for name in self.rewards if name != DEFAULT and DEFAULT in self.rewards]
        if INSTANCE in self.rewards and GLOBAL in self.rewards:
            out.append((INSTANCE, GLOBAL))
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        out = {name: {**mean_se(r, self.prompts), **self.metrics.get(name, {})} for name, r in self.rewards.items()}
        for a, b in self.pairs():
            diff = f"{a} - {b}"
            out[diff] = {**mean_se(self.rewards[a] - self.rewards[b], self.prompts), **self.metrics.get(diff, {})}
        return out

    def table(self, title: str) -> str:
        metric_names = sorted({m for v in self.metrics.values() for m in v if not m.endswith("_se")})
        head = f"{'schedule':<40}{'reward (mean +- s.e.)':>25}" + "".join(
            f"{labelled(m, self.lower_is_better.get(m)):>26}" for m in metric_names
        )
        rows = [title, head]
        for name, s in self.summary().items():
            cells = "".join(_metric_cell(s, m) for m in metric_names)
            rows.append(f"{name:<40}{s['mean']:>12.5g} +- {s['se']:<9.2g}{cells}".rstrip())
        rows.append(
            f"(+- one standard error, clustered by prompt{self._t_reference()}; differences are paired: same prompts"
            " and noises; a set metric's +- is a bootstrap of the noises within each prompt, paired for a difference)"
        )
        if self.prompts is not None and len(set(self.prompts)) < 2:
            rows.append("(no standard error: it is clustered by prompt and needs two held-out prompts or more)")
        return "\n".join(rows)

    def _t_reference(self) -> str:
        """What a ratio to a clustered standard error reads against: Student's t with one degree of
        freedom fewer than the prompts (at 10 prompts +- 1.96 s.e. covers about 92%, not 95%)."""
        g = len(set(self.prompts)) if self.prompts is not None else 0
        if g < 2:
            return ""
        from scipy.stats import t

        return f": {g} prompts, so t with {g - 1} degrees of freedom, 95% within +- {t.ppf(0.975, g - 1):.2f} s.e."


def labelled(measure: str, lower: bool | None) -> str:
    """``measure`` with which way is better, as the tables and plots say it (None: not known)."""
    return measure if lower is None else f"{measure} ({'lower' if lower else 'higher'} better)"


def _metric_cell(s: dict[str, float], m: str) -> str:
    if m not in s:
        return f"{'':>26}"
    text = f"{s[m]:.3f}" + (f" +- {s[m + '_se']:.2f}" if m + "_se" in s else "")
    return f"{text:>26}"


def run_schedule(
    dispatcher: Dispatcher,
    contexts: list[Context],
    steps: int,
    version: int,
    weights: Any,
    s: Schedule,
    progress: Callable[[int], None] | None = None,
) -> Collected:
    requests = dispatcher.rollouts.requests(contexts, s.k, steps, iteration=0, version=version, mode=s.mode, tau=s.tau)
    return dispatcher.run(requests, weights, progress=progress)


def evaluate(
    dispatcher: Dispatcher,
    metrics: MetricGroup | None,
    contexts: list[Context],
    steps: int,
    version: int,
    weights: Any,  # an object ref (learner.evaluate), or a WeightsHandle (the training loop's)
    schedules: dict[str, Schedule],
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Reward (and set metrics) of each schedule on ``contexts``, one sample per context (a
    best-of-k schedule: the best of its k samples by the total reward; no set metrics).
    ``progress``: told the number of samples of each unit as it is done."""
    prompts = [c.prompt for c in contexts]
    result = EvalResult({}, prompts=prompts)
    features = {}  # schedule -> each metric's features: its sets, and the paired differences of ``pairs``
    for name, sched in schedules.items():
        got = run_schedule(dispatcher, contexts, steps, version, weights, sched, progress)
        scores = dispatcher.rewards.combine(got.scored)
        tau = np.concatenate([b.tau for b in got.batches])  # [N, k, L+1]
        best = scores.total.reshape(-1, sched.k).argmax(axis=1)
        rows = np.arange(len(best)) * sched.k + best
        result.rewards[name] = scores.total[rows]
        result.per_reward[name] = {key: v[rows] for key, v in scores.per_reward.items()}
        result.taus[name] = tau[np.arange(len(best)), best]
        if metrics is not None and metrics.names and sched.k == 1:
            features[name] = metrics.features(got.pending)
            result.metrics[name] = metrics.measure(features[name], prompts)
    if metrics is not None:
        result.lower_is_better = dict(metrics.lower_is_better)
        for a, b in result.pairs():
            if a in features and b in features:
                result.metrics[f"{a} - {b}"] = metrics.difference(features[a], features[b], prompts)
    return result


# --- python -m learner.evaluate --run DIR: a finished or running run, evaluated again ----------

CLI_DOC = """Evaluate a run again: every method on the same held-out prompts x seeds, at matched NFE.

    python -m learner.evaluate --run runs/digits                        # the run's own L and held-out set
    python -m learner.evaluate --run runs/digits --steps 2,3,4,8        # baselines at every L
    python -m learner.evaluate --run runs/d2 --run runs/d4 --run runs/d8 --steps 2,4,8   # a run per L
    python -m learner.evaluate --run runs/digits --checkpoint ckpt-00000300 --prompt-file mine.txt --seeds 20

Methods, each at every L of ``--steps``: the backend's default schedule; uniform in t; Align Your
Steps where diffusers has it (SD1.5, SDXL: ``AysSchedules``, resampled to L log-linearly as the
AYS paper does); and, at each run's own L, the learned global schedule (``<run>/global``) and
the learned instance-level schedules (the Dirichlet mean); with ``--best-of K`` also the best of K
draws from the policy (K times the NFE: not matched, an upper reference). Every method sees the
same noises. Reported: each configured reward, their weighted total, and each set-level metric
(``learner.eval_metrics``, e.g. the FD) with its bootstrap noise.

Writes into ``--out`` (default ``<first run>/evaluation``): ``table.md`` (reward against L per
method, +- s.e. clustered by prompt: the paper's Figure 4 as a table), ``summary.csv`` (one row per
L, method and measure), ``contexts.csv`` (every context's rewards), and ``<measure>_vs_L.png``,
also logged to the run's TensorBoard. The same code the run ends with: the held-out table of a
run is reproduced exactly (same contexts, same weights)."""


@dataclass
class Sweep:
    """Evaluations of one held-out set at several L: ``results[L]`` (each with its schedules)."""

    results: dict[int, EvalResult]
    contexts: list[Context]

    def measures(self) -> list[str]:
        """'reward' (the weighted total), each reward where there are several, each set metric."""
        out = ["reward"]
        for res in self.results.values():
            out += [k for v in res.per_reward.values() if len(v) > 1 for k in v]
            out += [m for v in res.metrics.values() for m in v if not m.endswith("_se")]
        return list(dict.fromkeys(out))

    def label(self, measure: str) -> str:
        """``measure`` with which way is better: a reward's higher, a set metric's as its class says."""
        lower = any(res.lower_is_better.get(measure, False) for res in self.results.values())
        return labelled(measure, lower)

    def value(self, res: EvalResult, method: str, measure: str, minus: str | None = None) -> tuple[float, float] | None:
        """(mean, s.e.) of ``measure`` for ``method`` in ``res`` (a set metric: its bootstrap noise),
        or of its paired difference to ``minus``."""
        if measure == "reward" or measure in res.per_reward.get(method, {}):
            x = res.rewards if measure == "reward" else {k: v[measure] for k, v in res.per_reward.items()}
            s = mean_se(x[method] - (x[minus] if minus is not None else 0), res.prompts)
            return s["mean"], s["se"]
        m = res.metrics.get(method if minus is None else f"{method} - {minus}", {})
        return (m[measure], m.get(f"{measure}_se", float("nan"))) if measure in m else None

    def table(self, measure: str, differences: bool = False) -> dict[str, dict[int, tuple[float, float]]]:
        """``[row][L] = (mean, s.e.)``: a row per schedule, and (``differences``) per paired
        difference of ``EvalResult.pairs``."""
        out: dict[str, dict[int, tuple[float, float]]] = {}
        for steps, res in sorted(self.results.items()):
            rows: list[tuple[str, str, str | None]] = [(method, method, None) for method in res.rewards]
            rows += [(f"{a} - {b}", a, b) for a, b in res.pairs()] if differences else []
            for row, method, minus in rows:
                v = self.value(res, method, measure, minus)
                if v is not None:
                    out.setdefault(row, {})[steps] = v
        return out

    def markdown(self) -> str:
        ls = sorted(self.results)
        n_prompts = len({c.prompt for c in self.contexts})
        lines = [
            f"held-out: {n_prompts} prompts x {len(self.contexts) // max(n_prompts, 1)} seeds; +- one standard"
            " error, clustered by prompt (a set metric's: its bootstrap noise); every method on the same noises;"
            " a row 'a - b' is their paired difference (a set metric's +-: a paired bootstrap of the noises)"
        ]
        for measure in self.measures():
            lines += ["", f"**{self.label(measure)}**", "", "| method | " + " | ".join(f"L = {n}" for n in ls) + " |"]
            lines.append("| --- |" + " --- |" * len(ls))
            for method, by_l in self.table(measure, differences=True).items():
                cells = [f"{by_l[n][0]:.4g} +- {by_l[n][1]:.2g}" if n in by_l else "-" for n in ls]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write(self, out: Path, tb_dir: Path | None = None) -> None:
        import csv

        from learner import plots
        from learner.metrics import TensorBoardLogger

        out.mkdir(parents=True, exist_ok=True)
        (out / MARK).touch()  # before the files: a partial evaluation's dir is still an evaluation's
        (out / "table.md").write_text(self.markdown() + "\n")
        with open(out / "summary.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["L", "method", "measure", "mean", "se"])
            for measure in self.measures():
                for method, by_l in self.table(measure, differences=True).items():
                    for n, (mean, se) in sorted(by_l.items()):
                        w.writerow([n, method, measure, repr(mean), repr(se)])
        with open(out / "contexts.csv", "w", newline="") as f:
            w = csv.writer(f)
            keys = sorted({k for res in self.results.values() for v in res.per_reward.values() for k in v})
            w.writerow(["L", "method", "context", "prompt", "seed", "reward", *keys])
            for n, res in sorted(self.results.items()):
                for method, r in res.rewards.items():
                    for i, c in enumerate(self.contexts):
                        extra = [repr(float(res.per_reward[method][k][i])) for k in keys]
                        w.writerow([n, method, c.index, c.prompt, c.seed, repr(float(r[i])), *extra])
        now = {f"{measure}_vs_L.png" for measure in self.measures()}
        for old in out.glob("*_vs_L.png"):  # an earlier evaluation's plot of a measure this one has not
            if old.name not in now:
                old.unlink()
        tb = TensorBoardLogger(tb_dir) if tb_dir is not None else None
        try:
            for measure in self.measures():
                plots.plot_against_steps(
                    out / f"{measure}_vs_L.png", self.table(measure), measure, self.label(measure), tb=tb
                )
        finally:
            if tb is not None:
                tb.close()


def sweep(
    runs: list[Path],
    steps: list[int] | None = None,
    checkpoint: str | None = None,
    prompts: list[str] | None = None,
    seeds: int | None = None,
    best_of: int = 0,
    overrides: list[str] | None = None,
    prompts_from: str = "the prompts given",
) -> Sweep:
    """Evaluate ``runs`` (one per trained L) and the fixed baselines at every L of ``steps``.
    ``prompts_from``: where ``prompts`` came from, as a prompt the backend cannot read names it."""
    from tqdm.auto import tqdm

    from common.checkpoint import load_run_config, load_run_policy, read_policy
    from common.policy import state_to_numpy
    from learner.contexts import eval_contexts
    from learner.groups import RolloutGroup, actor_asks, answer, check_room
    from learner.loop import init_ray, reference_steps_for

    if len({r.resolve() for r in runs}) != len(runs):
        raise ConfigError("a run is given twice (--run): give each run once")
    flags = list(overrides or [])
    for i, flag in enumerate(flags):
        name, eq, value = flag.partition("=")
        if not eq and i + 1 < len(flags) and not flags[i + 1].startswith("--"):  # --rollout '{steps: 3}'
            flag, value = f"{flag} {flags[i + 1]}", flags[i + 1]
        if name == "--rollout.steps" or (name == "--rollout" and "steps" in _mapping_keys(value)):  # the run's L
            raise ConfigError(f"{flag}: the steps evaluated are --steps (e.g. --steps 2,4,8), not a config flag")
    cfgs = [load_run_config(r, overrides) for r in runs]
    if overrides:
        _check_read(load_run_config(runs[0]), cfgs[0])
    first = cfgs[0]
    for r, c in zip(runs[1:], cfgs[1:], strict=True):
        differ = [
            what
            for what, a, b in (
                ("sampler", c.sampler, first.sampler),
                ("rewards", c.rewards, first.rewards),
                ("experiment.seed", c.experiment.seed, first.experiment.seed),
                # a reward that compares with the many-step reference scores against another at each L
                ("rollout.reference_steps", c.rollout.reference_steps, first.rollout.reference_steps),
            )
            if a != b
        ]
        if differ:
            raise ConfigError(f"{r} differs from {runs[0]} in its {', '.join(differ)}: evaluate them apart")
    policies = [load_run_policy(r, checkpoint) for r in runs]
    by_l = {p.steps: (r, c, p) for r, c, p in zip(runs, cfgs, policies, strict=True)}
    if len(by_l) != len(runs):
        raise ConfigError("two runs share one L; give one run per L")
    all_l = sorted(set(steps or []) | set(by_l))

    def workers_config(cfg: Config, steps: int) -> Config:
        """The config of a run's workers: their policy copy is the run's (of L ``steps``), whatever
        L is evaluated."""
        cfg = cfg.model_copy(deep=True)
        cfg.rollout.steps = steps
        return cfg

    workers = [workers_config(c, p.steps) for c, p in zip(cfgs, policies, strict=True)]

    started = init_ray(first.ray)
    restore_sigterm = end_on_sigterm()
    rewards: RewardGroup | None = None
    metrics: MetricGroup | None = None
    rollouts: RolloutGroup | None = None
    bar = tqdm(total=0, unit="sample", desc="evaluate", disable=None)  # on a terminal: samples done of those known
    try:
        check_room(actor_asks(first))  # one run's workers at a time, with the rewards and metrics
        # the first run's workers build their samplers while the rewards and metrics load, as a run's
        # do (learner.loop.start_actors): the evaluation starts in the longest of the loads, not their sum
        rewards = RewardGroup.from_config(first, wait=False)
        if first.learner.eval_metrics:
            metrics = MetricGroup(first.learner.eval_metrics, wait=False)
        rollouts = RolloutGroup(workers[0], wait=False)
        rewards.wait_started()  # a reward that cannot start is said first, then a metric, then a worker
        _check_reference(first, rewards, all_l)
        if metrics is not None:
            metrics.wait_started()
        lc = first.learner
        out: dict[int, EvalResult] = {}
        contexts: list[Context] = []
        served = {i: [n for n in all_l if (by_l[n][0] if n in by_l else runs[0]) == r] for i, r in enumerate(runs)}
        for i, ls in served.items():  # one set of workers per run, for every L it serves
            run, cfg, policy = runs[i], workers[i], policies[i]
            if rollouts is None:
                rollouts = RolloutGroup(cfg)
            else:  # the first run's, started with the rewards
                rollouts.wait_started()
            rollouts.serve(reference_steps_for(cfg, rewards))  # evaluation images go as made
            try:
                dispatcher = Dispatcher(rollouts, rewards, cfg.rollout.max_attempts)
                spec = rollouts.spec()
                held_out = prompts or lc.eval_prompts or spec.eval_prompts
                source = (
                    prompts_from
                    if prompts
                    else "learner.eval_prompts"
                    if lc.eval_prompts
                    else "the backend's held-out prompts"
                )
                rollouts.check_prompts({source: held_out})  # every prompt read by the backend, before any sampling
                contexts = eval_contexts(held_out, seeds or lc.eval_seeds, cfg.experiment.seed)
                weights = ray.put(state_to_numpy(policy))
                worker = rollouts.workers[rollouts.alive[0]]
                for n in ls:
                    schedules: dict[str, Schedule] = {DEFAULT: Schedule("default")}
                    for label, name in (("uniform-in-t", "uniform"), ("AYS", "ays")):
                        tau = answer(
                            worker.named_tau.remote(name, n),
                            rollouts.timeout_s,
                            f"rollout worker {rollouts.alive[0]}",
                            "rollout.sample_timeout_s",
                        )
                        if tau is not None:
                            schedules[label] = Schedule("fixed", tau)
                    if n == policy.steps:
                        if (run / "global" / "policy").is_dir():
                            glob = read_policy(run / "global" / "policy")
                            schedules[GLOBAL] = Schedule("fixed", glob.global_mean_tau())
                        learned = learned_name(policy.variant)
                        schedules[learned] = Schedule("mean")
                        if best_of > 1:
                            schedules[f"best of {best_of} (x{best_of} NFE)"] = Schedule("sample", k=best_of)
                    bar.total += len(contexts) * sum(s.k for s in schedules.values())
                    bar.set_description(f"evaluate L={n}")
                    out[n] = evaluate(dispatcher, metrics, contexts, n, 0, weights, schedules, bar.update)
            finally:
                rollouts.stop()
                rollouts = None
        return Sweep(dict(sorted(out.items())), contexts)
    finally:
        bar.close()
        for group in (rewards, metrics, rollouts):  # a start that failed: what did start is stopped
            if group is not None:
                group.stop()
        if started:
            ray.shutdown()
        restore_sigterm()


#: What an evaluation reads of a run's config (its policy is the run's own): the sections and the
#: fields a config flag after ``--`` may change. The rest (the policy's shape, K, C, the
#: optimisation, the run's name) is how the run trained: an override of it would change nothing.
EVALUATION_READS = {"sampler", "rewards", "ray", "rollout"}
EVALUATION_FIELDS = {"experiment.seed", "learner.eval_prompts", "learner.eval_seeds", "learner.eval_metrics"}
TRAINING_ONLY = {"rollout.k", "rollout.k_schedule", "rollout.contexts_per_iter"}


def _check_read(run: Any, evaluated: Any) -> None:
    """Refuse the overrides that made ``evaluated`` differ from ``run`` where an evaluation does
    not read the config (``learner.lr``, ``policy.widths``): they were ignored, silently."""
    unread = [
        n
        for n in changed_fields(run.model_dump(mode="json"), evaluated.model_dump(mode="json"))
        if n in TRAINING_ONLY or (n.split(".")[0] not in EVALUATION_READS and n not in EVALUATION_FIELDS)
    ]
    if unread:
        raise ConfigError(
            f"{', '.join(unread)}: an evaluation does not read {'it' if len(unread) == 1 else 'them'} (how the run"
            " trained); it reads the sampler, the rewards, ray, the rollout workers, experiment.seed and learner.eval_*"
        )
    was, now = run.sampler.backend, evaluated.sampler.backend
    if now != was and (was in BUILTIN_BACKENDS or now in BUILTIN_BACKENDS):  # a plug-in's import path may move
        raise ConfigError(
            f"--sampler.backend={now}: the run's policy was trained for the {was} backend, and reads its noise and"
            f" prompts; an evaluation samples with it (its settings, sampler.{was}.*, may change)"
        )


def _mapping_keys(text: str) -> list[str]:
    """The keys of a flag's mapping value (``{num_workers: 1}``), read as the config reads it
    (YAML); none where it is not one (the config then names what is wrong)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    return [str(k) for k in value] if isinstance(value, dict) else []


def _check_reference(cfg: Config, rewards: RewardGroup, steps: list[int]) -> None:
    """No L evaluated reaches the many-step reference a reward compares with: there the reward
    measures a sample against itself, or against a worse one (training refuses such an L)."""
    from learner.loop import reference_steps_for

    needing = [s.name for s, need in zip(cfg.rewards, rewards.needs_reference, strict=True) if need]
    if not needing:
        return
    made = reference_steps_for(cfg, rewards)
    reached = [n for n in steps if n >= made]
    if reached:
        raise ConfigError(
            f"--steps {reached[0]}: reward {needing[0]!r} compares with the {made}-step reference sample"
            f" (rollout.reference_steps), which {reached[0]} steps reach: evaluate fewer steps than {made}"
        )


#: The file that marks a directory as an evaluation's ``--out`` (written first): a later evaluation
#: may replace what is in it.
MARK = ".steinsched-evaluation"
#: The files an evaluation writes into ``--out`` beside its ``<measure>_vs_L.png`` plots.
WRITTEN = ("table.md", "summary.csv", "contexts.csv")


def run_tb_dir(run: Path) -> Path | None:
    """Where the evaluation's figures also go: ``tb/evaluation`` in the run's TensorBoard
    directory (its own run there, kept when the run resumes and rebuilds its own events), or None
    (with a warning) where it cannot be written: a run on a read-only share, or another user's;
    the evaluation's own files go to --out all the same (found now, not after the evaluation)."""
    import tempfile

    tb = run / "tb" / EVALUATION
    try:
        tb.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".evaluate-probe-", dir=tb)).rmdir()
    except OSError as e:
        print(f"warning: {tb} cannot be written ({e.strerror or e}): the figures go to --out only, not to TensorBoard")
        return None
    return tb


def check_out_dir(out: Path, own: bool = False) -> None:
    """``out`` is a directory the evaluation can write, or one it can make: nothing on its way is
    a file, and a directory can be made in the nearest one that exists (a read-only place, /sys
    and /proc cannot). A directory that exists is an earlier evaluation's (its ``MARK``), empty,
    or the run's own (``own``: ``<run>/evaluation``): the evaluation replaces its table.md, CSVs
    and plots, and removes a plot it does not make, so a directory of the user's files (``--out
    .``, ``--out ~/results``) lost them."""
    import tempfile

    from common.rundir import LOCK

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the evaluation writes a directory")
    if out.is_dir() and not own and not (out / MARK).exists():
        theirs = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        shown = ", ".join(theirs[:3]) + (", ..." if len(theirs) > 3 else "")
        if theirs and all(n in WRITTEN or n.endswith("_vs_L.png") for n in theirs):  # written before the mark
            raise ConfigError(
                f"--out {out} holds an evaluation's files ({shown}) but not the mark an evaluation leaves ({MARK}):"
                " one written before evaluations marked their dirs, or files of the same names; delete them, or"
                " give a new or an empty directory"
            )
        if theirs:
            raise ConfigError(
                f"--out {out} holds files no evaluation wrote ({shown}): an evaluation writes table.md, summary.csv,"
                " contexts.csv and its plots there, replacing what it finds; give a new or an empty directory"
            )
    above = out
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"--out {out}: {above} is a file, not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".evaluate-probe-", dir=above)).rmdir()
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be written: {above}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = CommandLine(
        prog="python -m learner.evaluate",
        description=CLI_DOC.split("\n")[0],
        epilog=CLI_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--run", type=given_path, action="append", required=True, help="A run directory (repeat: one per L)."
    )
    p.add_argument("--steps", type=ints_at_least(1, MAX_STEPS), help="L values, e.g. 2,4,8 (default: the runs' own).")
    p.add_argument("--checkpoint", help="'latest', a checkpoint name or path (default: the run's final policy).")
    p.add_argument("--prompt-file", type=Path, help="Held-out prompts, one per line (default: the run's).")
    p.add_argument(
        "--seeds",
        type=int_at_least(*EVAL_SEEDS),
        help="Held-out seeds per prompt (default: the run's learner.eval_seeds).",
    )
    p.add_argument(
        "--best-of",
        type=int_at_least(2, 1000),
        default=0,
        help="Also the best of K policy draws (K x NFE), K from 2 (the best of one draw is one draw).",
    )
    p.add_argument("--out", type=given_path, help="Output directory (default: <first run>/evaluation).")
    p.add_argument(
        "overrides", nargs="*", help="Config flags for the evaluation, e.g. --rollout.num_workers=4 (after --)."
    )
    p.takes_config_flags = True
    args = p.parse_args(argv)
    out = args.out or args.run[0] / EVALUATION
    held = None
    try:
        try:
            for run in args.run:  # a run, before anything is made in it (tb/evaluation) or beside it
                load_run_config(run)
            check_out_dir(out, own=out.resolve() == (args.run[0] / EVALUATION).resolve())  # now, not after it all
            tb_dir = run_tb_dir(args.run[0])
            held = hold(out, "evaluation dir", "--out", "evaluation")  # one evaluation writes it at a time
            prompts = None
            if args.prompt_file is not None:
                from common.prompts import read_prompt_file

                prompts = read_prompt_file(args.prompt_file)
            result = sweep(
                args.run,
                args.steps,
                args.checkpoint,
                prompts,
                args.seeds,
                args.best_of,
                args.overrides,
                f"--prompt-file {args.prompt_file}",
            )
            held.check_held()  # --out is still this evaluation's after the sweep: never written over another's
        except (ConfigError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except RunStopped as e:  # a reward or sampler that raised, an actor that stalled twice
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (a job stopped): its actors stopped on the way out
            word, code = how_stopped(e)
            print(f"{word}: nothing of the evaluation was written", file=sys.stderr)
            return code
        try:
            result.write(out, tb_dir=tb_dir)
        except OSError as e:  # a full disk, a share gone: the evaluation is lost, its files in --out partial
            print(
                f"error: writing the evaluation into {out} failed: {e.strerror or e}; its files there are partial",
                file=sys.stderr,
            )
            return 1
        except KeyboardInterrupt as e:
            word, code = how_stopped(e)
            print(f"{word} while the evaluation was written: its files in {out} are partial", file=sys.stderr)
            return code
    finally:
        if held is not None:
            held.release()
    print(result.markdown())
    print(f"wrote {out}/table.md, summary.csv, contexts.csv and the plots")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
