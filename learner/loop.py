"""The training loop: one top-to-bottom loop, as the paper's pseudocode (docs/method.md, The system).

for it in range(start, iterations):
    contexts = the next C (prompt, seed) pairs of the deterministic stream
    rollouts = workers sample K schedules per context under the current weights   (fan-out)
    rewards  = reward servers score the images, refs straight from the workers    (fan-out)
    baseline = baselines.compute(name, rewards[C, K]);  advantage = r - baseline
    update   = REINFORCE step on log pi(tau | inputs) recomputed here
    push the new weights (ray.put once per version), log, checkpoint, evaluate

One step off policy (learner.pipeline), iteration t+1's rollouts are started, under the weights
update t starts from, before update t: the workers sample while the learner computes, and update
t+1 weights each rollout by pi / mu (learner.update).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import torch
from tqdm.auto import tqdm

from common.checkpoint import (
    CheckpointStore,
    check_policy_fits,
    fsync_path,
    load_checkpoint,
    load_run_config,
    load_tensors,
    replace_dir,
    storage,
    verify,
    write_atomic,
)
from common.codec import DecodeError, append_records, scan_records
from common.collective import FETCH_TIMEOUT_S, WeightsHandle
from common.config import (
    DEFAULT_REFERENCE_STEPS,
    RUN_FLAGS,
    Config,
    ConfigError,
    LearnerConfig,
    MetricSpec,
    RayConfig,
    RewardSpec,
    resume_conflicts,
    reward_keys,
    shape_changes,
)
from common.devices import resolve_device
from common.messages import Context, RolloutRecord
from common.policy import FlatState, PolicyInputs, SchedulePolicy, Weights, collate, describe, state_to_numpy
from common.rundir import EVALUATION, METRICS_TMP, ROLLOUTS_TMP, RunDir, artefacts, claim, local_checkpoint_dir
from common.signals import Terminated, held
from learner import baselines, plots
from learner.broadcast import CollectiveBroadcast
from learner.contexts import ContextStream, eval_contexts
from learner.evaluate import DEFAULT, EvalResult, Schedule, evaluate, learned_name, run_schedule
from learner.groups import (
    Dispatcher,
    InFlight,
    MetricGroup,
    RewardGroup,
    RolloutGroup,
    RunStopped,
    WorkersLost,
    actor_asks,
    answer,
    check_room,
    joined_cluster,
)
from learner.idle import IdleNote
from learner.metrics import JsonlLogger, Loggers, TensorBoardLogger, read_jsonl, scan_jsonl
from learner.update import optimizer_for, reinforce_step


@dataclass
class RunResult:
    run_dir: Path
    iterations: int
    version: int
    policy: SchedulePolicy
    evaluation: EvalResult | None


@dataclass
class _Sent:
    """One version of the weights as broadcast: its number, the arrays, and what requests carry:
    a ``WeightsHandle``, the object ref that a worker lacking the version reads itself (within its
    ``weights_s``, with a time-out, and once per version however many requests it gets), and
    whether the version went out over the collective as well."""

    version: int
    weights: Weights
    arg: WeightsHandle

    @property
    def collective(self) -> bool:
        """The version went out over the collective."""
        return self.arg.broadcast

    @classmethod
    def put(cls, version: int, weights: Weights, collective: CollectiveBroadcast | None = None) -> _Sent:
        ref = ray.put(weights)
        return cls(version, weights, WeightsHandle(ref, collective is not None and collective.send(version, weights)))


@dataclass
class _Plan:
    """One iteration's contexts, drawn but not sent: with its K, its concentration cap, and where
    the context stream stood before them. ``launch`` makes its requests."""

    cursor: int
    k: int
    cap: float | None
    contexts: list[Context]


@dataclass
class _Launch:
    """One iteration's rollouts, started: as planned (K, the concentration cap, and where the
    context stream stood before them: a checkpoint taken while they are under way resumes from
    there and draws them again), under which weights."""

    plan: _Plan
    sent: _Sent
    job: InFlight


def init_ray(cfg: RayConfig) -> bool:
    """Start or join Ray; True if this call started it. ray.init() with no address honours
    RAY_ADDRESS and a running cluster, else starts a local one (never address='auto')."""
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, **cfg.init_kwargs}
    if kwargs.get("address"):
        address, source = kwargs["address"], "ray.init_kwargs.address"
    elif os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    else:  # a cluster that ``ray start`` started on this machine, as ray.init finds it, or none: its own
        address, source = _running_cluster(), "the cluster `ray start` left running on this machine"
    if address in (None, "local"):  # resources only describe a cluster this call starts; a joined one has its own
        kwargs.update({k: v for k, v in (("num_cpus", cfg.num_cpus), ("num_gpus", cfg.num_gpus)) if v is not None})
    else:
        _check_answers(str(address), source)
    try:
        with held(signal.SIGINT, signal.SIGTERM) as stopped, _ray_leaves_sigterm():
            ray.init(**kwargs)
    except ConnectionError as e:  # e.g. it answered, but is not a Ray cluster's GCS, or wants a token
        raise ConfigError(
            f"cannot join the Ray cluster at {address} ({source}): {e}; a cluster with token authentication"
            " takes RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or ~/.ray/auth_token); a cluster of this"
            ' run\'s own: --ray.init_kwargs=\'{"address": "local"}\''
        ) from None
    except (ValueError, TypeError, AttributeError, AssertionError, OSError) as e:  # Ray's checks of its arguments
        if ray.is_initialized():
            ray.shutdown()
        why = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(
            f"Ray could not start (given ray.init_kwargs, ray.num_cpus, ray.num_gpus and the RAY_* environment"
            f" variables as they are): {type(e).__name__}: {why}"
        ) from None
    if stopped:  # Ctrl-C or SIGTERM while Ray started: it stops whole, as after any later stop
        ray.shutdown()
        raise Terminated if signal.SIGTERM in stopped else KeyboardInterrupt
    return True


def _running_cluster() -> str | None:
    """The address of the cluster that ``ray.init()`` with no address joins (one that ``ray start``
    started on this machine), as Ray finds it; None where it starts its own (or Ray cannot say)."""
    try:
        from ray._private import services

        find: Any = services.canonicalize_bootstrap_address  # typed for a str; None is what ray.init passes
        return find(None)
    except Exception:  # noqa: BLE001 - a private function: without it, ray.init decides alone
        return None


@contextlib.contextmanager
def _ray_leaves_sigterm() -> Iterator[None]:
    """Within: ``ray.init`` does not install its SIGTERM handler (``sys.exit(15)``, raised wherever
    it starts its cluster: processes left running, or a C++ abort). Ray's own hook for it, where
    this Ray has one; elsewhere Ray's handler stays and ``held`` still puts the one before back."""
    import ray._private.utils as ray_utils

    install = getattr(ray_utils, "set_sigterm_handler", None)
    if install is None:
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = install


#: Seconds a cluster's address has to accept a connection before joining it is given up.
JOIN_TIMEOUT_S = 10.0


def _check_answers(address: str, source: str) -> None:
    """Something accepts connections at ``address`` (host:port, or a URL with one), within
    ``JOIN_TIMEOUT_S``: Ray itself waits on an address where nothing listens forever, logging a
    retry every 30 s, and gives an unreachable one 25 s and a traceback. 'auto' and 'local' are
    left to Ray, as is a URL without a port; an address that is not one (``junk``, a port that is
    not a number or above 65535, on which Ray waited forever) is refused."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:  # a port that is not a number, or out of range
        raise ConfigError(
            f"{source} {address!r} is not a Ray cluster address ({e}): give host:port (a head node's GCS, e.g."
            " 10.0.0.1:6379), ray://host:port, 'auto' or 'local'"
        ) from None
    if not host or (port is None and "://" not in address):
        raise ConfigError(
            f"{source} {address!r} is not a Ray cluster address (no {'port' if host else 'host'}): give host:port"
            " (a head node's GCS, e.g. 10.0.0.1:6379), ray://host:port, 'auto' or 'local'"
        )
    if port is None:
        return
    try:
        socket.create_connection((host, port), timeout=JOIN_TIMEOUT_S).close()
    except OSError as e:
        why = f"no answer within {JOIN_TIMEOUT_S:g} s" if isinstance(e, TimeoutError) else e.strerror or e
        raise ConfigError(
            f"no Ray cluster answers at {address} ({source}): {why}; start one there (ray start --head), or unset"
            f" {source} to start one on this machine"
        ) from None


@dataclass
class Actors:
    """A run's reward servers, rollout workers and eval metrics' servers, started and serving
    (``start_actors``), with the settings they were built from. learner.main trains its global
    baseline and then its policy on the same ones: a sampler's weights and a reward model load
    once, not once per policy, and a metric that cannot start stops the run before either trains."""

    rewards: RewardGroup
    rollouts: RolloutGroup
    settings: dict
    metrics: MetricGroup | None = None  # None: the config has none, or they were not asked for

    def stop(self) -> None:
        """Kill every actor for good: the caller that started them calls it when it is done."""
        self.rollouts.stop()
        self.rewards.stop()
        if self.metrics is not None:
            self.metrics.stop()

    def check_fits(self, cfg: Config) -> None:
        """A ValueError unless these actors were built for ``cfg`` (its policy variant aside)."""
        if _actor_settings(cfg) != self.settings:
            raise ValueError(
                "the actors given to train() were started for another sampler, rollout, rewards, eval metrics or policy"
            )


def _actor_settings(cfg: Config) -> dict:
    """What a run's actors are built from: all but the policy's variant, which requests carry."""
    return {
        "sampler": cfg.sampler.model_dump(),
        "rollout": cfg.rollout.model_dump(),
        "rewards": [spec.model_dump() for spec in cfg.rewards],
        "policy": cfg.policy.model_dump(exclude={"variant"}),
        "seed": cfg.experiment.seed,
        "broadcast": cfg.learner.broadcast,
        "eval_metrics": [m.model_dump() for m in cfg.learner.eval_metrics],
    }


def start_actors(cfg: Config, metrics: bool = True) -> Actors:
    """Start the reward servers, the rollout workers and (``metrics``) the eval metrics' servers of
    ``cfg``, and wait until they serve.

    They start together (a sampler's weights load while the reward and metric models load); a
    reward that cannot start is still the first thing reported, then a metric. Then the workers
    are told what the rewards read (the reference sample, the image size). On a cluster this run
    started, they must fit in it together, or nothing starts (``check_room``)."""
    check_room(actor_asks(cfg))
    rewards = RewardGroup.from_config(cfg, wait=False)
    measures: MetricGroup | None = None
    try:
        if metrics and cfg.learner.eval_metrics:
            measures = MetricGroup(cfg.learner.eval_metrics, wait=False)
        rollouts = RolloutGroup(cfg, wait=False)
    except BaseException:  # the servers started so far are stopped
        rewards.stop()
        if measures is not None:
            measures.stop()
        raise
    actors = Actors(rewards, rollouts, _actor_settings(cfg), measures)
    try:
        rewards.wait_started()
        if measures is not None:
            measures.wait_started()
        actors.rollouts.wait_started()
        actors.rollouts.serve(reference_steps_for(cfg, rewards), rewards.input_size)
    except BaseException:  # nothing of a start that failed is left holding the cluster's resources
        actors.stop()
        raise
    return actors


def reference_steps_for(cfg: Config, rewards: RewardGroup) -> int:
    """NFE of the workers' many-step reference samples: what the config says, or (None) 64 where
    a reward compares with it and 0 where none does."""
    needing = [s.name for s, need in zip(cfg.rewards, rewards.needs_reference, strict=True) if need]
    steps = cfg.rollout.reference_steps
    if not needing:
        return steps or 0
    if steps == 0:
        raise ConfigError(
            f"reward {needing[0]!r} compares with a many-step reference sample, but rollout.reference_steps=0"
        )
    made = DEFAULT_REFERENCE_STEPS if steps is None else steps
    if made <= cfg.rollout.steps:  # a reference no better than what it judges: the reward would teach nothing
        given = "rollout.reference_steps" if steps is not None else "rollout.reference_steps (unset)"
        raise ConfigError(
            f"reward {needing[0]!r} compares with a many-step reference sample, but {given}={made} is not more"
            f" than the rollouts' rollout.steps={cfg.rollout.steps}: give reference_steps of more steps"
        )
    return made


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as e:
        raise ConfigError(f"learner.device: {e}") from None


def _learner_gpu_shared(device: torch.device) -> str | None:
    """A warning where the learner runs on a GPU of a node that this process joined (a cluster
    started before it: ``ray start``, a RayJob's head) and that offers GPUs to Ray (docs/deploy.md):
    the driver's GPU is outside Ray's accounting, so Ray may hand the same device to a rollout
    worker of this run or an actor of another job. A cluster the run started itself (one machine:
    the learner shares its GPUs by design), a Ray Client driver (on a machine of its own) and a
    CPU learner are fine."""
    if device.type != "cuda" or not joined_cluster():
        return None
    here = ray.get_runtime_context().get_node_id()
    gpus = sum(n["Resources"].get("GPU", 0) for n in ray.nodes() if n.get("Alive") and n.get("NodeID") == here)
    if gpus <= 0:
        return None
    return (
        f"warning: the learner runs on {device} of this node, whose {gpus:g} GPU(s) Ray also hands to actors (this"
        " run's rollout workers, or another job's): keep its GPU out of Ray's pool (ray start --num-gpus=0 on this"
        ' node, or num-gpus: "0" in its rayStartParams) or set learner.device=cpu (docs/deploy.md)'
    )


#: warnings given once per process (a run and its learned global baseline share the driver)
_SAID: set[str] = set()


class Diverged(RunStopped):
    """An update left the policy with non-finite weights or alphas out of range."""


def _diverged_line(iteration: int, problem: str, store: Any, optimizer: Any) -> str:
    """Why a run stopped at a diverged update, and how to go on from its last good checkpoint."""
    return (
        f"iteration {iteration}: the update diverged ({problem}); nothing of it was saved, the latest"
        f" checkpoint in {store} is the last good state. Lower learner.lr (now"
        f" {optimizer.param_groups[0]['lr']:g}) or learner.grad_clip, then continue with"
        " --resume auto --resume_changes=true"
    )


def train(
    cfg: Config,
    baselines_to_beat: dict[str, Schedule] | None = None,
    final_eval: bool = True,
    owner: RunDir | None = None,
    actors: Actors | None = None,
    resume: Resume | None | Literal["find"] = "find",
    within: RunDir | None = None,
) -> RunResult:
    """Train the policy of ``cfg``; at the end evaluate it against the default schedule and
    ``baselines_to_beat`` (e.g. a learned global schedule) on held-out contexts.

    The run dir is claimed first (``common.rundir``: one owner, no run started over another by
    mistake) unless the caller holds it (``owner``). The run starts its own actors, or trains on
    ``actors`` (``start_actors``, for the same config but the policy's variant), which the caller
    keeps. It resumes where ``cfg.resume`` says (``find_resume``), or from ``resume`` where the
    caller has found it already."""
    check_before_start(cfg)
    if actors is not None:
        actors.check_fits(cfg)
    rd = owner or claim(cfg)
    try:
        resumed = find_resume(cfg) if resume == "find" else resume
        return _train(cfg, resumed, baselines_to_beat, final_eval, actors, rd, within)
    finally:
        if owner is None:
            rd.release()


def check_before_start(cfg: Config) -> None:
    """What can be refused before the run dir is claimed (where ``--overwrite`` clears the earlier
    run) and Ray starts: the rewards and metrics (``check_scorers``), and the learner's device, a
    GPU this process does not see (it was found after the actors had started)."""
    check_scorers(cfg)
    _device(cfg.learner.device)


def check_scorers(cfg: Config) -> None:
    """A ConfigError where a built-in reward or evaluation metric of ``cfg`` cannot serve the run:
    an unknown name, kwargs its class does not take, or a backend whose samples it cannot read.
    Found before anything starts, not when its server starts (after Ray and the run dir) or, for
    a backend a metric cannot read, after the whole run."""
    from rewards.registry import spec_problem

    used: list[tuple[str, str, RewardSpec | MetricSpec]] = [
        ("reward", f"rewards[{i}]", r) for i, r in enumerate(cfg.rewards)
    ]
    used += [("metric", f"learner.eval_metrics[{i}]", m) for i, m in enumerate(cfg.learner.eval_metrics)]
    for kind, field, spec in used:
        problem = spec_problem(kind, spec.name, spec.kwargs, cfg.sampler.backend)
        if problem is not None:
            raise ConfigError(f"{field}: {problem}")


@dataclass
class Resume:
    """Where a run continues from: a verified local copy of a checkpoint and its state. A
    checkpoint of another run (``fork``: given by path, outside this run's checkpoint dir) starts
    a new run from it: the logs of ``source``, that run's directory, up to the checkpoint become
    this run's (None where it cannot be found: this run's logs begin at the checkpoint)."""

    checkpoint: Path
    state: dict
    fork: bool = False
    source: Path | None = None
    store: CheckpointStore | None = None  # keeps a downloaded copy for as long as it is read

    @property
    def global_checkpoints(self) -> str | None:
        """A fork's: where its run kept the learned global schedule's checkpoints."""
        saved = self.state["config"]["learner"].get("checkpoint_dir")
        if saved:
            return saved.rstrip("/") + "/global"
        return None if self.source is None else str(self.source / "global" / "checkpoints")


def find_resume(cfg: Config) -> Resume | None:
    """The checkpoint ``cfg`` resumes from, checked before anything starts: None for a fresh
    start. Refusals (a config that differs where it matters, a damaged checkpoint, no checkpoint
    where a run was, a fork into a directory that holds a run) are ConfigErrors."""
    if not cfg.resume:
        return None
    store = CheckpointStore(cfg.checkpoint_root)
    found = artefacts(cfg.run_dir, local_checkpoint_dir(cfg))
    if cfg.trains_global_first:  # its global baseline's run, trained first by the same command, resumes itself
        found = [f for f in found if f != "global"]
    if cfg.resume == "auto":
        origin, ckpt, fork = store, store.latest(), False
        if ckpt is None:
            _no_checkpoint(cfg, store, found)  # a refusal, or a fresh start
            return None
    else:
        fs, where = storage(cfg.resume)
        if not fs.isdir(where):  # a URL (a local path was checked with the config)
            raise ConfigError(f"--resume {cfg.resume}: no such checkpoint")
        origin = store if store.holds(cfg.resume) else CheckpointStore.containing(cfg.resume)
        ckpt = origin.fetch(cfg.resume)
    problem = verify(Path(ckpt))
    if problem is not None:
        raise ConfigError(f"--resume {cfg.resume}: checkpoint {ckpt} is damaged ({problem})")
    state = json.loads((Path(ckpt) / "state.json").read_text())
    saved = state["config"]
    # a checkpoint of another run starts a new run from it; this run's own may lie in the checkpoint
    # dir it had before (learner.checkpoint_dir may change on resume)
    fork = origin is not store and _recorded_run(saved).resolve() != cfg.run_dir.resolve()
    if state["iteration"] > cfg.learner.iterations:  # its table would say "after N iterations" of a longer run
        raise ConfigError(
            f"--resume {cfg.resume}: the checkpoint is of iteration {state['iteration']}, past"
            f" learner.iterations={cfg.learner.iterations}: give learner.iterations of {state['iteration']} or more"
        )
    if saved["policy"]["variant"] == "global" and cfg.policy.variant != "global":
        raise ConfigError(
            f"--resume {cfg.resume} is a checkpoint of the learned global schedule (the baseline trained"
            f" first), not of the run's {cfg.policy.variant} policy: give a checkpoint in {store},"
            " or --resume auto"
        )
    if fork and found and not _began_as(cfg, store):
        raise ConfigError(
            f"--resume {cfg.resume}: that checkpoint is another run's, so resuming from it starts a new run from its"
            f" iteration {state['iteration']}, but {cfg.run_dir} already holds a run ({', '.join(found)}):"
            " choose a new experiment.name, or --resume auto to continue the run there"
        )
    reshaped = shape_changes(saved, cfg)
    if reshaped:
        raise ConfigError(
            f"cannot resume from {ckpt}: {', '.join(reshaped)} changes the policy's shape, so its weights"
            " load into no policy of this config (not even with --resume_changes); start a new run without --resume"
        )
    conflicts = [c for c in resume_conflicts(saved, cfg) if not (fork and c == "experiment.name")]
    if conflicts and not cfg.resume_changes:
        raise ConfigError(
            f"refusing to resume from {ckpt}: the config differs in {', '.join(conflicts)}"
            " (pass --resume_changes=true to resume anyway)"
        )
    _warn_stretched_lr(cfg, saved, state["iteration"])
    resume = Resume(Path(ckpt), state, fork, _source_run(cfg.resume, saved) if fork else None, origin)
    if not (fork and resume.source is None):
        # damaged logs refused now, not after Ray started; they are read again when _train writes them, after
        # the run's config: a run dir never holds copied logs without the config that explains them
        _trim_logs(cfg.run_dir, state, resume.source, write=False)
    return resume


def _no_checkpoint(cfg: Config, store: CheckpointStore, found: list[str]) -> None:
    """``--resume auto`` where ``store`` has no usable checkpoint: a fresh start, unless a run is
    there whose work would be lost. A run that stopped before its first checkpoint starts again
    (the same iterations, to the same result: a preempted job re-submitted with --resume auto
    goes on); one whose checkpoints are all damaged, a finished one, or one whose checkpoints are
    in the checkpoint dir its config.yaml names is refused."""
    elsewhere = _recorded_store(cfg)
    if elsewhere is not None:
        raise ConfigError(
            f"--resume auto: no checkpoint in {store}, but the run's checkpoints are in {elsewhere} (its config.yaml's"
            " learner.checkpoint_dir): give that learner.checkpoint_dir, or --resume with one of its checkpoints"
        )
    if found and (store.names() or {"policy", "eval.json"} & set(found)):
        raise ConfigError(
            f"--resume auto: no usable checkpoint in {store}, but {cfg.run_dir} holds a run"
            f" ({', '.join(found)}); pass --overwrite to start it again, or choose a new experiment.name"
        )
    if found:
        print(f"--resume auto: {cfg.run_dir} stopped before its first checkpoint; starting it again")
    else:
        print(f"--resume auto: no checkpoint in {store}; starting fresh")


def _recorded_run(saved: dict) -> Path:
    """The run dir a checkpoint's config (``saved``) names."""
    return Path(saved["experiment"]["output_dir"]) / saved["experiment"]["name"]


def _recorded_store(cfg: Config) -> CheckpointStore | None:
    """The checkpoint store that the run dir's config.yaml names, where that is not ``cfg``'s and
    holds checkpoints (the run was started with another learner.checkpoint_dir); else None."""
    try:
        recorded = load_run_config(cfg.run_dir).learner.checkpoint_dir
    except ConfigError:  # no config.yaml yet, or one that cannot be read: nothing recorded to go by
        return None
    if recorded == cfg.learner.checkpoint_dir:
        return None
    other = CheckpointStore(recorded or cfg.run_dir / "checkpoints")
    return other if other.names() else None


def _began_as(cfg: Config, store: CheckpointStore) -> bool:
    """Whether the run dir holds what this very command began (its config, word for word) before
    its first checkpoint: a new run from another run's checkpoint, stopped while it started, that
    the same command starts again."""
    try:
        return not store.names() and (cfg.run_dir / "config.yaml").read_text() == cfg.to_yaml()
    except OSError:
        return False


def _source_run(checkpoint: str, saved: dict) -> Path | None:
    """The directory of the run that wrote ``checkpoint`` (its config ``saved``): the checkpoint's
    grandparent where it is in that run's own checkpoints/, else the run dir it recorded; None
    where neither holds that run (a run's config that differs where it matters is another run's:
    the name may have been taken by a new run since; the checkpoint was copied, or its run moved)."""
    candidates = [] if "://" in checkpoint else [Path(checkpoint).absolute().parent.parent]
    candidates.append(_recorded_run(saved))
    for c in candidates:
        try:
            if not resume_conflicts(saved, load_run_config(c)):
                return c
        except ConfigError:  # no run there, or a config this version cannot read
            continue
    return None


def _train(
    cfg: Config,
    resume: Resume | None,
    baselines_to_beat: dict[str, Schedule] | None,
    final_eval: bool,
    actors: Actors | None,
    rd: RunDir,
    within: RunDir | None,
) -> RunResult:
    """``rd``: the claim on the run dir; its earlier run is cleared once the run has started (its
    actors up, its checks passed, its checkpoint loaded), before it writes its run dir
    (--overwrite removes the earlier run then). It, and ``within`` (the claim on the dir that holds
    this run's, as the learned global baseline's run is within its run's), are checked still this
    process's before each write: a run dir another run took over is never written again."""

    def check_held() -> None:
        for claimed in (rd, within):
            if claimed is not None:
                claimed.check_held()

    run_dir = cfg.run_dir
    lc = cfg.learner
    store = CheckpointStore(cfg.checkpoint_root)

    started_ray = init_ray(cfg.ray)
    L, C = cfg.rollout.steps, cfg.rollout.contexts_per_iter
    # rollouts under way, in iteration order: the next iteration's (on policy), the next two (one
    # step off policy: each worker queues the second behind the first, so it never waits for the
    # learner between them)
    ahead: list[_Launch] = []
    collecting: _Launch | None = None  # the rollouts the learner waits for, until it has them
    collective: CollectiveBroadcast | None = None  # learner.broadcast: collective
    dispatcher: Dispatcher | None = None
    own_actors: Actors | None = None  # started here (not the caller's): stopped here
    try:
        if actors is None:
            actors = own_actors = start_actors(cfg, metrics=final_eval)
        rewards, rollouts = actors.rewards, actors.rollouts
        rollouts.draw_under(cfg.policy.variant)
        dispatcher = Dispatcher(rollouts, rewards, cfg.rollout.max_attempts)
        if final_eval and lc.eval_metrics and actors.metrics is None:  # theirs: stopped with them
            actors.metrics = MetricGroup(lc.eval_metrics)
        metrics = actors.metrics if final_eval and lc.eval_metrics else None
        spec = rollouts.spec()
        torch.set_num_threads(lc.torch_threads)
        torch.manual_seed(cfg.experiment.seed)
        device = _device(lc.device)
        shared = _learner_gpu_shared(device)
        if shared is not None and shared not in _SAID:
            _SAID.add(shared)
            print(shared)
        policy = SchedulePolicy(**rollouts.policy_kwargs()).to(device).eval()
        params = FlatState(policy)  # the parameters in one buffer: what each version sends, what AdamW steps
        optimizer = optimizer_for(params, lc.lr, lc.weight_decay)
        train_prompts, eval_prompts = lc.train_prompts or spec.train_prompts, lc.eval_prompts or spec.eval_prompts
        rollouts.check_prompts(  # every prompt read by the backend, before training
            {"learner.train_prompts": train_prompts, "learner.eval_prompts": eval_prompts}
        )
        stream = ContextStream(train_prompts, cfg.experiment.seed)
        held_out = eval_contexts(eval_prompts, lc.eval_seeds, cfg.experiment.seed)
        _warn_prompt_overlap(stream.prompts, [c.prompt for c in held_out])
        start, version = 0, 0
        if resume is not None:
            check_policy_fits(resume.checkpoint, rollouts.policy_kwargs())  # a sampler setting changed since: named
            state = load_checkpoint(resume.checkpoint, policy, optimizer)
            start, version, stream.cursor = state["iteration"], state["version"], state["cursor"]
            print(f"resumed from {resume.checkpoint} at iteration {start}")
            if resume.fork:
                logs = _copied_logs(resume.source)
                print(f"a new run from another run's checkpoint: {run_dir} starts at iteration {start}, {logs}")
        # the run dir is written from here, once the actors are up, the checks passed and the
        # checkpoint resumed from is loaded: a run that cannot start leaves it as it was (a resume
        # refused at the checkpoint's weights had its logs trimmed and config.yaml replaced)
        check_held()
        rd.clear_earlier()
        logged = 0  # rollouts in the log so far (a checkpoint records it: a resume checks the log)
        if resume is not None and not (resume.fork and resume.source is None):
            logged = _trim_logs(run_dir, resume.state, resume.source)
            if not resume.fork and resume.store is not None and str(resume.store) == str(store):
                # an earlier checkpoint: the line after it is left
                aside = store.set_aside_after(resume.checkpoint.name)
                if aside is not None:
                    moved = f"the later checkpoints of the run are moved to {aside}"
                    print(f"resuming from {resume.checkpoint.name}: {moved}")
        else:
            for stale in (run_dir / "tb", run_dir / "metrics.jsonl", run_dir / "rollouts.msgpack"):
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        write_atomic(run_dir / "config.yaml", cfg.to_yaml())  # the config is accepted
        print(f"{describe(policy)}; run dir {run_dir}")
        learned = learned_name(cfg.policy.variant)

        loggers = Loggers(JsonlLogger(run_dir / "metrics.jsonl"), TensorBoardLogger(run_dir / "tb"))
        if lc.broadcast == "collective":
            collective = CollectiveBroadcast(rollouts, device, lc.broadcast_timeout_s)
        current = _Sent.put(version, params.weights(lc.broadcast_dtype), collective)
        behaviour = current  # what the first rollouts are drawn under
        if resume is not None and lc.pipeline:  # the weights the checkpoint's next rollouts were drawn under
            saved = load_tensors(resume.checkpoint, "behaviour")
            if saved is not None:
                in_order = {k: saved[k] for k in policy.state_dict()}  # the buffer as it was broadcast
                behaviour = _Sent.put(resume.state["behaviour_version"], state_to_numpy(in_order, lc.broadcast_dtype))

        def plan(i: int) -> _Plan:
            """Iteration ``i``'s contexts (each a seeded draw: the costly part), K and cap."""
            cursor, contexts = stream.cursor, stream.next(C)
            k = cfg.rollout.k_at(i)  # functions of the iteration: a resumed run gets the same
            return _Plan(cursor, k, cfg.policy.max_concentration_at(i), contexts)

        def launch(i: int, sent: _Sent, planned: _Plan | None = None) -> _Launch:
            """Start iteration ``i``'s rollouts under ``sent`` (``planned``, or planned now), run by
            the dispatcher's thread. Its requests are made now, over the workers there are now:
            nodes that joined get workers first, and without rollout.micro_batch the contexts are
            split evenly over them (the rollouts do not change with the split)."""
            p = planned or plan(i)
            rollouts.grow()
            requests = rollouts.requests(p.contexts, p.k, L, i, sent.version, max_concentration=p.cap)
            return _Launch(p, sent, dispatcher.start(requests, sent.arg))

        def save(iteration: int, cursor: int, drawn_under: _Sent | None) -> str:
            """A checkpoint of the state after ``iteration`` iterations; ``drawn_under``: the weights
            the next rollouts are (or would be) drawn under, kept where they are not the policy's."""
            check_held()
            state = _checkpoint_state(cfg, iteration, version, cursor, logged)
            for log in (run_dir / "metrics.jsonl", run_dir / "rollouts.msgpack"):
                if log.exists():  # on the disk before the checkpoint that counts their records (a machine's crash)
                    fsync_path(log)
            extra = None
            if drawn_under is not None and drawn_under.version != version:
                state["behaviour_version"] = drawn_under.version
                extra = {"behaviour": drawn_under.weights.tensors()}
            return store.save(iteration, policy, optimizer, state, keep=lc.keep_checkpoints, extra=extra)

        def save_after(i: int, previous: _Sent) -> str:
            """The checkpoint of the state after iteration ``i`` (``previous``: the weights its update
            started from)."""
            if ahead:  # the next rollouts are under way: a resume draws them again, the same
                return save(i + 1, ahead[0].plan.cursor, ahead[0].sent)
            # one step off policy, a longer run would draw the next ones under the weights before this update
            return save(i + 1, stream.cursor, previous if lc.pipeline else None)

        if resume is not None and resume.fork:  # the new run's own first checkpoint: --resume auto continues it
            save(start, stream.cursor, behaviour)

        bar = tqdm(
            range(start, lc.iterations), initial=start, total=lc.iterations, disable=not lc.progress, desc="train"
        )
        last_put: float | None = None  # when the previous iteration's weights went out
        servers = {key: spec.num_servers for key, spec in zip(reward_keys(cfg.rewards), cfg.rewards, strict=True)}
        idle = None if lc.pipeline else IdleNote(servers, device.type)  # one step off policy nothing waits
        for it in bar:
            t0 = time.perf_counter() if last_put is None else last_put
            for group in optimizer.param_groups:  # a function of the iteration: a resumed run gets the same
                group["lr"] = learning_rate(lc, it)
            # SAMPLING: K schedules per context on the workers, scored by the reward servers, started
            # after the previous update, while its iteration logged (on policy, under its weights), or
            # after the update before it (one step off policy, under the weights the previous update
            # started from; the workers queued them behind the previous iteration's)
            now = collecting = ahead.pop(0) if ahead else launch(it, behaviour if it == start else current)
            if lc.pipeline and not ahead and it + 1 < lc.iterations:
                # one step off policy the next rollouts are drawn under the weights this update
                # starts from: they go out now, and each worker queues them behind these
                ahead.append(launch(it + 1, current))
            K = now.plan.k
            policy.set_max_concentration(now.plan.cap)  # the update's log-probs: the cap the rollouts were drawn under
            # the contexts of the rollouts that go out after this update (the next iteration's on
            # policy, the one after it one step off policy), drawn while these rollouts are under
            # way: the learner only waits for them here
            after = it + (2 if lc.pipeline else 1)
            planned = plan(after) if after < lc.iterations else None
            try:
                got = now.job.result()
                collecting = None  # collected: nothing of it is under way
            except WorkersLost as e:
                # too few actors left, or a unit that failed on every try: keep what was learned
                # (the state before this iteration)
                ckpt = save(it, now.plan.cursor, now.sent)
                print(f"stopping: {e.why}; checkpoint {ckpt} written, resume with --resume auto")
                raise
            batches = got.batches
            scores = rewards.combine(got.scored)
            r = scores.total.reshape(C, K)

            # BASELINE and ADVANTAGE (per-context and cross-context statistics, James-Stein)
            b, diag = baselines.compute(lc.baseline, r)
            adv = r - b
            if lc.adv_std_norm:
                adv = adv / (adv.std() + 1e-8)

            # TRAINING: REINFORCE on log pi recomputed from the inputs the rollouts carry (importance
            # weighted one step off policy)
            t_learn = time.perf_counter()
            log_tau = np.concatenate([bt.log_tau for bt in batches])
            inputs = collate(
                np.concatenate([bt.x for bt in batches]),
                [t for bt in batches for t in bt.tokens],
                None if batches[0].pooled is None else np.concatenate([bt.pooled for bt in batches]),
                device,
            )
            behaviour_logp = np.concatenate([bt.logp for bt in batches])
            try:
                m = reinforce_step(policy, optimizer, inputs, log_tau, adv, behaviour_logp, lc.grad_clip, lc.pipeline)
            except FloatingPointError as e:  # a non-finite gradient: the optimizer did not step
                raise Diverged(_diverged_line(it + 1, str(e), store, optimizer)) from None
            # the previous update's alphas on this batch (computed by the step itself), then this
            # update's weights; its alphas too where a checkpoint or an evaluation is about to use them
            problem, when = _alpha_problem(m["policy/alpha_min"], m["policy/alpha_max"]), it
            t_flat = time.perf_counter()
            weights = params.weights(lc.broadcast_dtype)  # what this version sends
            flat_s = time.perf_counter() - t_flat
            if problem is None:
                keep = (it + 1) % lc.checkpoint_every == 0 or it + 1 == lc.iterations
                evaluating = bool(lc.eval_every) and (it + 1) % lc.eval_every == 0
                problem, when = _diverged(policy, weights, inputs if keep or evaluating else None), it + 1
            if problem is not None:  # nothing of this update is saved: the latest checkpoint stays the last good one
                raise Diverged(_diverged_line(when, problem, store, optimizer))
            version += 1
            t_put = time.perf_counter()
            before, current = current, _Sent.put(version, weights, collective)
            last_put = time.perf_counter()
            broadcast_s, learner_s = flat_s + last_put - t_put, last_put - t_learn  # the check's time is the learner's
            if planned is not None:  # under the new weights, while this iteration logs
                ahead.append(launch(after, current, planned))

            # LOGGING
            step_s = last_put - t0  # from one broadcast to the next: what happened in between included
            sampled_s, tail_s = got.sampling_seconds(), got.scoring_tail()
            m.update(
                {
                    "rollout/reward_mean": float(r.mean()),
                    "learner/lr": optimizer.param_groups[0]["lr"],
                    "rollout/reward_std": float(r.std()),
                    "rollout/images_per_s": C * K / max(sampled_s, 1e-9),  # the workers' rate
                    "rollout/worker_seconds": float(sum(bt.seconds for bt in batches)),
                    "baseline/adv_std": float(adv.std()),
                    "system/step_seconds": step_s,
                    "system/workers_alive": float(len(rollouts.alive)),
                    "system/faults": float(got.faults),
                    "system/learner_seconds": learner_s,  # update, checks and the weights into the object store
                    "system/broadcast_seconds": broadcast_s,
                    "system/broadcast_bytes": float(current.weights.nbytes),
                    "system/broadcast_collective": float(current.collective),  # this version went over the group
                    # where the workers read the weights of the rollouts' version (loads, not requests)
                    "system/weights_from_collective": float(sum(bt.weights_from == "collective" for bt in batches)),
                    "system/weights_from_object_store": float(
                        sum(bt.weights_from in ("object_store", "argument") for bt in batches)
                    ),
                    # the slowest worker's read of that version (a wait for its broadcast included)
                    "system/weights_load_seconds": max(bt.weights_s for bt in batches),
                    "system/scoring_overlap": got.scoring_overlap(),  # share of scoring hidden behind sampling
                    "system/dispatch_skew_s": got.dispatch_skew(),
                    "system/scoring_tail_s": tail_s,  # scoring after the last image: workers idle on policy
                    "system/collect_latency_s": got.collect_latency(),  # last result on an actor to the learner
                    **{f"reward/{k}": float(v.mean()) for k, v in scores.per_reward.items()},
                    **{f"baseline/{k}": float(np.mean(v)) for k, v in diag.items()},
                }
            )
            check_held()  # a run that took the dir over while this process was stopped is never written over
            loggers.log(it + 1, m)
            bar.set_postfix(reward=f"{r.mean():.3f}")
            note = None if idle is None else idle.add(it + 1, step_s, sampled_s, tail_s, learner_s)
            if note is not None:
                tqdm.write(note)
            if lc.rollout_log:
                append_records(run_dir / "rollouts.msgpack", _records(batches, r, b, adv, scores.per_reward, K))
                logged += C * K

            # CHECKPOINT and EVALUATION
            checkpointed = None
            if (it + 1) % lc.checkpoint_every == 0 or it + 1 == lc.iterations:
                checkpointed = save_after(it, before)
            if lc.eval_every and (it + 1) % lc.eval_every == 0 and it + 1 < lc.iterations:
                for under_way in ahead:
                    under_way.job.wait()  # one run at a time on the dispatcher
                try:
                    res = evaluate(
                        dispatcher,
                        None,
                        held_out,
                        L,
                        version,
                        current.arg,
                        {DEFAULT: Schedule("default"), learned: Schedule("mean")},
                    )
                except WorkersLost as e:  # in the evaluation: what was learned is kept, as in a step
                    ckpt = checkpointed or save_after(it, before)
                    print(f"stopping in an evaluation: {e.why}; checkpoint {ckpt} written, resume with --resume auto")
                    raise
                check_held()  # an evaluation is a run's longest stretch without a write
                loggers.log(it + 1, _eval_metrics(res))
        bar.close()
        check_held()
        made = run_dir / f".policy.tmp-{os.getpid()}"
        policy.save_pretrained(made)  # whole, then in place: a crash leaves the earlier policy or none
        replace_dir(made, run_dir / "policy")
        if not final_eval:
            loggers.close()
            return RunResult(run_dir, lc.iterations, version, policy, None)

        schedules = {DEFAULT: Schedule("default"), **(baselines_to_beat or {}), learned: Schedule("mean")}
        result = evaluate(dispatcher, metrics, held_out, L, version, current.arg, schedules)
        n_prompts = len(lc.eval_prompts or spec.eval_prompts)
        title = (
            f"held-out evaluation after {lc.iterations} iterations: {n_prompts} prompts x {lc.eval_seeds} noises,"
            f" L={L}, reward {'+'.join(s.name for s in cfg.rewards)}"
        )
        print(result.table(title))
        check_held()
        loggers.log(lc.iterations, _eval_metrics(result))
        loggers.close()
        write_atomic(run_dir / "eval.json", json.dumps(result.summary(), indent=1))
        if lc.plots:
            with TensorBoardLogger(run_dir / "tb") as tb:  # the pictures also go to TensorBoard's Images tab
                _plot(
                    run_dir, dispatcher, spec.x_shape, held_out, result, schedules, learned, L, version, current.arg, tb
                )
        return RunResult(run_dir, lc.iterations, version, policy, result)
    finally:
        # in order: each run starts on the dispatcher's thread once the one before ends; the one the
        # learner was waiting for first (a stop while it waits ends it at once, not after its iteration)
        for under_way in ([collecting] if collecting is not None else []) + ahead:
            under_way.job.cancel()
        if dispatcher is not None:
            dispatcher.close()
        if collective is not None:
            collective.close()
        if own_actors is not None:
            own_actors.stop()
        if started_ray:
            ray.shutdown()


def learning_rate(lc: LearnerConfig, it: int) -> float:
    """The learning rate of iteration ``it`` (0-based) under ``lc.lr_schedule``."""
    if lc.lr_schedule == "constant" or lc.iterations <= 1:
        return lc.lr
    final = lc.lr * lc.lr_final_ratio
    return final + 0.5 * (lc.lr - final) * (1 + math.cos(math.pi * it / (lc.iterations - 1)))


def _warn_stretched_lr(cfg: Config, saved: dict, start: int) -> None:
    """A resume with another ``learner.iterations`` under a decaying learning rate stretches (or
    squeezes) the decay over the new length: the rate goes back up (or drops) from the checkpoint
    on. Allowed, as it is how a run is lengthened, but said, with the rates at the first iteration
    resumed."""
    was = saved.get("learner", {}).get("iterations")
    lc = cfg.learner
    if lc.lr_schedule == "constant" or was is None or was == lc.iterations or start >= lc.iterations:
        return
    at = min(start, was - 1)  # the run's own rate there, or its last one where it had ended
    before = learning_rate(lc.model_copy(update={"iterations": was}), at)
    print(
        f"warning: {cfg.run_dir}: learner.iterations is {lc.iterations} where the checkpoint's run had {was}: the"
        f" {lc.lr_schedule} learning rate is spread over the new length, {learning_rate(lc, start):.3g} at iteration"
        f" {start + 1} (the run's: {before:.3g} at iteration {at + 1})"
    )


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


def _plot(run_dir, dispatcher, x_shape, held_out, result, schedules, learned, steps, version, weights, tb) -> None:
    """schedules.png, reward_curve.png, and samples.png for image backends (first noise of each
    held-out prompt; these few images are fetched to the learner only to be drawn); each also
    into TensorBoard (``tb``) at the last step."""
    at = {"tb": tb, "step": version}
    plots.plot_schedules(run_dir / "schedules.png", [c.prompt for c in held_out], result.taus, learned, **at)
    plots.plot_reward_curve(run_dir / "reward_curve.png", read_jsonl(run_dir / "metrics.jsonl"), **at)
    if len(x_shape) < 3:
        return
    firsts: dict[str, Context] = {}
    for c in held_out:
        firsts.setdefault(c.prompt, c)
    grid = list(firsts.values())
    images = {}
    for name, sched in schedules.items():
        got = run_schedule(dispatcher, grid, steps, version, weights, sched)
        refs = [p.images for p in got.pending]
        images[name] = np.concatenate(answer(refs, FETCH_TIMEOUT_S, "the workers' sample images", "a fixed limit"))
    plots.plot_samples(run_dir / "samples.png", [c.prompt for c in grid], images, **at)


def _checkpoint_state(cfg: Config, iteration: int, version: int, cursor: int, logged: int) -> dict:
    """What a checkpoint records besides the weights: the counters, the rollouts logged so far
    (a resume checks the log against it), and the config it was trained with (a resume under a
    config that differs where it matters is refused)."""
    return {
        "iteration": iteration,
        "version": version,
        "cursor": cursor,
        "logged_rollouts": logged,
        "config": cfg.model_dump(mode="json", exclude=RUN_FLAGS),
    }


#: Largest alpha an update may leave (a Dirichlet with sum(alpha) ~ 1e8 is a point mass; beyond,
#: its samples and log-probs lose precision). The smallest is the policy's own alpha_min.
MAX_ALPHA = 1e8


def _diverged(policy: SchedulePolicy, weights: Weights, inputs: PolicyInputs | None) -> str | None:
    """What is wrong with the policy after an update (None if nothing): non-finite ``weights``
    (the policy's, as they are about to be sent), and with ``inputs`` alphas on the batch that
    are non-finite or out of range. The weights are checked after every update (one pass over
    the buffer); the alphas cost a forward pass, so the loop asks for them before a checkpoint or
    an evaluation, and otherwise reads them off the next update's own forward pass
    (``policy/alpha_min``, ``policy/alpha_max``)."""
    name = weights.nonfinite()
    if name is not None:
        return f"non-finite weights in {name}" + ("" if weights.dtype == "float32" else f" (sent as {weights.dtype})")
    if inputs is None:
        return None
    with torch.no_grad():
        alpha = policy(inputs)
    return _alpha_problem(float(alpha.min()), float(alpha.max()))


def _alpha_problem(lo: float, hi: float) -> str | None:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "non-finite alpha on the batch"
    if lo <= 0 or hi > MAX_ALPHA:
        return f"alpha on the batch in [{lo:.3g}, {hi:.3g}], outside (0, {MAX_ALPHA:g}]"
    return None


#: A run's logs, the ones a resume trims and a new run from another run's checkpoint copies.
LOGS = ("rollouts.msgpack", "metrics.jsonl")


def _copied_logs(source: Path | None) -> str:
    """What a new run from another run's checkpoint took of that run's logs, as its start says."""
    found = [name for name in LOGS if source is not None and (source / name).exists()]
    if not found:
        return "that run's logs not found"
    if len(found) == len(LOGS):
        return f"its logs up to there copied from {source}"
    (missing,) = set(LOGS) - set(found)
    return f"its {found[0]} up to there copied from {source} (its {missing} not found: the new run's begins here)"


def _trim_logs(run_dir: Path, state: dict, source: Path | None = None, write: bool = True) -> int:
    """On resume: keep the logged rollouts and metrics of the iterations the checkpoint holds,
    so that each appears once, and rebuild tb/ from the kept metrics. A run resumed from another
    run's checkpoint takes them from that run's logs (``source``), which are only read; one it no
    longer has begins at the checkpoint in the new run (``_copied_logs`` says so). A torn
    last record (a crash mid-write) is dropped with a warning; damage elsewhere, or fewer rollouts
    than the checkpoint recorded, is an error: a resumed run never silently lacks rollouts. Both
    logs are read and checked before either is written (atomically), so a refusal changes
    nothing; ``write=False`` only checks. Returns the number of rollouts kept."""
    iteration = state["iteration"]
    read_from = source or run_dir
    log, metrics = (read_from / name for name in LOGS)
    again = "--overwrite starts the run again" if source is None else "resume from an earlier checkpoint of that run"
    keep: list[RolloutRecord] = []
    rows: list[dict] = []
    try:
        scan = scan_records(log, RolloutRecord) if log.exists() else None
        found = scan_jsonl(metrics) if metrics.exists() else None
    except (DecodeError, ValueError) as e:
        raise ConfigError(f"cannot resume: a log is damaged ({e}); {again}") from None
    if scan is not None:
        if scan.torn_bytes and write:
            print(f"warning: {log}: dropped a torn last record ({scan.torn_bytes} bytes, a write cut short)")
        keep = [r for r in scan.records if r.iteration < iteration]
    expected = state.get("logged_rollouts") if scan is not None or source is None else None
    if expected is not None and len(keep) < expected:
        raise ConfigError(
            f"cannot resume: {log} holds {len(keep)} rollouts of the first {iteration} iterations, but the"
            f" checkpoint recorded {expected} (the log was truncated or replaced); {again}"
        )
    if found is not None:
        all_rows, _, torn = found
        if torn and write:
            print(f"warning: {metrics}: dropped a torn last line ({torn} bytes, a write cut short)")
        rows = [row for row in all_rows if row["step"] <= iteration]
    if not write:
        return len(keep)
    if scan is not None:
        tmp = run_dir / ROLLOUTS_TMP
        tmp.unlink(missing_ok=True)
        append_records(tmp, keep)
        os.replace(tmp, run_dir / "rollouts.msgpack")
    if found is not None:
        tmp = run_dir / METRICS_TMP
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, run_dir / "metrics.jsonl")
    tb = run_dir / "tb"
    if tb.exists() or (source is not None and rows):  # event files cannot be cut at a step: rebuilt from the metrics
        for old in tb.iterdir() if tb.is_dir() else []:
            if old.name != EVALUATION:  # the figures learner.evaluate logged: not the run's to rebuild
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        writer = TensorBoardLogger(tb)
        for row in rows:
            writer.log(row["step"], {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))})
        writer.close()
    return len(keep)


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
