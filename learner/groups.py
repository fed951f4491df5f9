"""Actor groups the learner drives as if they were local objects (verl's worker groups).

``RolloutGroup`` holds the rollout workers, ``RewardGroup`` the reward servers (one set per
configured reward), ``MetricGroup`` the evaluation-metric servers. ``Dispatcher.run`` fans a
list of contexts out as requests: each request is one unit of work (a worker samples, the
reward servers score its images, which travel as object refs and never through the learner).

Faults: the actors restart when they die (Ray ``max_restarts``). A unit whose worker or reward
server died is re-sent whole, under the same request id, to a live worker; since every random
draw is a function of ids, the re-sent unit gives the same rollouts. Results are kept once per
request id, so each (iteration, context, k) rollout is used exactly once even when Ray reports
an actor error for a call that did finish. A worker that stays dead (restarts exhausted, or not
back within ``restart_timeout_s``) leaves the group; below ``min_workers`` the run stops with
``WorkersLost``.

Time-outs: every remote call is bounded. Actors have ``start_timeout_s`` to start; a unit has
``sample_timeout_s`` (plus a share per model evaluation) on its worker and ``timeout_s`` (plus a
share per image) on each reward server, measured from when it could start. A unit past its time
counts as a fault: the stalled actor is killed, Ray restarts it, the unit is re-sent. A second
time-out of the same unit stops the run with a message naming the actor and the prompts.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

from common.collective import WeightsHandle
from common.config import Config, ConfigError, MetricSpec, RewardSpec, RolloutConfig, reward_keys
from common.messages import Context, RolloutBatch, RolloutRequest, SamplerSpec, ScheduleMode
from rewards.actors import MetricServer, RewardServer
from rewards.registry import shown_prompts
from rollout.worker import RolloutWorker

#: What a dead or restarting actor looks like to its caller. A RayTaskError (an exception raised
#: by our own code in the actor, e.g. a non-finite reward) is not among them: it stops the step
#: (``StepFailed``).
ACTOR_FAULTS = (RayActorError, ObjectLostError)


class RunStopped(RuntimeError):
    """The run cannot go on; the message says why and what was kept (exit status 1)."""


class WorkersLost(RunStopped):
    """Fewer live rollout workers (or reward servers) than the run needs."""

    #: why the run stops, as the line that names its checkpoint says it
    why = "too few live actors"


class AttemptsSpent(WorkersLost):
    """A unit of work failed on dead actors ``rollout.max_attempts`` times: the message names the
    actor, the prompts and the last error, in one line."""

    why = "a unit failed on every try"


class TimedOut(RunStopped):
    """A unit of work stalled twice on an actor: the message names the actor and the prompts."""


class NoAnswer(RunStopped):
    """An actor asked a question outside the steps (its sampler's spec, a reward's needs, a
    metric's distance) did not answer in its time, or died: the message names it and the setting."""


def request_size(contexts: int, workers: int, micro_batch: int | None) -> int:
    """Contexts per request: ``rollout.micro_batch``, or (None, 0) C split evenly, one request per
    worker (``RolloutGroup.requests``; ``bench/overhead.py`` models the same split)."""
    return micro_batch or math.ceil(contexts / workers)


def answer(ref: Any, timeout_s: float, who: str, setting: str) -> Any:
    """``ray.get(ref)`` of a call to the actor ``who``, within ``timeout_s`` (the ``setting`` that
    gives it): a time-out or a dead actor is a ``NoAnswer`` of one line, not Ray's traceback; its
    own code's error (a RayTaskError) goes on as it is."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except GetTimeoutError:
        raise NoAnswer(f"{who} did not answer within {timeout_s:g} s ({setting})") from None
    except ACTOR_FAULTS as e:
        raise NoAnswer(f"{who} died: {actor_error_line(e)}") from None


class StepFailed(RunStopped):
    """An actor's own code raised during a step (a reward that failed or scored non-finite, a
    sampler's error): re-sending would raise again, so the step stops before its update. The
    message names the actor and gives its exception in one line."""


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b(:|$)")


def actor_error_line(e: BaseException) -> str:
    """An actor's own exception, ``Type: message``, as one line (a message of several lines
    joined), without Ray's traceback and colours."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if _EXC_LINE.match(ln)]
    if not starts:
        return lines[-1] if lines else type(e).__name__
    return " ".join(lines[starts[-1] :])


#: Seconds an actor may wait for room on the cluster before the wait is announced (its start
#: timeout can be many minutes: a model's weights take that long to load).
UNPLACED_NOTICE_S = 20.0


def _wait_started(actors: list[Any], timeout_s: float, what: list[str], needs: list[dict[str, float]]) -> None:
    """Every actor of ``actors`` has run its constructor, within ``timeout_s``: else one line
    naming the actor with its own message (ConfigError: exit 2). ``needs``: each actor's resources
    ({'CPU': 0.5, 'GPU': 1}). An actor the cluster has no room for is never started at all: its
    wait is announced after ``UNPLACED_NOTICE_S``, and its timeout says so, with what it asks for
    and what the cluster has."""
    if actors and own_cluster():  # its resources are all it will ever have: no waiting for room
        total = ray.cluster_resources()
        for name, need in zip(what, needs, strict=True):
            if any(v > total.get(k, 0.0) for k, v in need.items()):
                raise ConfigError(f"{name} cannot start: {_no_room(need)}; {_OWN_CLUSTER}")
    deadline = time.monotonic() + timeout_s
    notice = time.monotonic() + UNPLACED_NOTICE_S
    refs = [a.pid.remote() for a in actors]
    for i, (actor, name, need) in enumerate(zip(actors, what, needs, strict=True)):
        ref = refs[i]
        while not ray.wait([ref], timeout=max(0.0, min(deadline, notice) - time.monotonic()))[0]:
            if time.monotonic() >= deadline:
                if _placed(actor) is False:
                    raise ConfigError(f"{name} did not start within {timeout_s:g} s: {_no_room(need)}")
                raise ConfigError(f"{name} did not start within {timeout_s:g} s (its constructor is still running)")
            for a, n, nd in zip(actors[i:], what[i:], needs[i:], strict=True):
                if _placed(a) is False:
                    print(f"{n} is waiting: {_no_room(nd)}; it gives up after {timeout_s:g} s")
            notice = math.inf
        try:
            ray.get(ref)
        except (RayActorError, RayTaskError) as e:  # its constructor raised (common.actors)
            ray.kill(actor, no_restart=True)
            raise ConfigError(f"{name} could not start: {actor_error_line(e)}") from None


_OWN_CLUSTER = (
    "this run started its own Ray cluster (this machine alone): set ray.num_cpus and ray.num_gpus to what the"
    " machine has, ask for less, or join a cluster (RAY_ADDRESS)"
)


def _this_node() -> Any | None:
    """This process's Ray node: None for a Ray Client driver (on no node of the cluster), or where
    Ray has no such private attribute."""
    try:
        from ray._private import worker

        return worker._global_node
    except Exception:  # noqa: BLE001 - a private attribute
        return None


def own_cluster() -> bool:
    """Whether this process started the Ray cluster it is connected to (``ray.init`` with no
    cluster to join): this machine alone, with no autoscaler and no node joining it, so the
    resources it started with are all it will ever have. A joined cluster (``RAY_ADDRESS``,
    ``ray start``, ``ray job submit``, KubeRay) may grow: there an actor waits for room."""
    node = _this_node()
    return bool(node is not None and node.head)


def joined_cluster() -> bool:
    """Whether this process runs on a node of a cluster it joined (one started before it), not on
    the head of one it started nor as a Ray Client driver."""
    node = _this_node()
    return bool(node is not None and not node.head)


def check_room(asks: list[tuple[str, int, dict[str, float]]]) -> None:
    """On a cluster this process started (``own_cluster``), the actors of ``asks`` (what they are,
    how many, what each one asks for: {'CPU': 0.5, 'GPU': 1}) must fit in it together, else a
    ConfigError at once naming what they ask for and what the cluster has: otherwise the actors
    that do not fit wait their whole start timeout for room that never comes. On a joined cluster
    nothing is checked. Fitting in the sum is necessary, not sufficient (fractional GPUs are packed
    per GPU); an actor still unplaced is then announced as on any cluster."""
    if not asks or not own_cluster():
        return
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0.0)
    shares = [(what, need.get("GPU", 0.0)) for what, n, need in asks for _ in range(n) if need.get("GPU")]
    left = _pack_gpus(gpus, [s for _, s in shares])
    if left and sum(s for _, s in shares) <= gpus + 1e-9:  # they fit in the sum, not device by device
        each = ", ".join(f"{n} x {need['GPU']:g} GPU ({what})" for what, n, need in asks if n and need.get("GPU"))
        raise ConfigError(
            f"the run's actors do not fit in the Ray cluster: their GPU shares ({each}) fit in its {gpus:g} GPUs"
            f" together but not one device at a time (a share is placed on one GPU: {left[0]:g} GPU does not fit"
            f" beside the others); {_OWN_CLUSTER}"
        )
    sums: dict[str, float] = {}
    for _, n, need in asks:
        for k, v in need.items():
            sums[k] = sums.get(k, 0.0) + n * v
    short = [k for k, v in sums.items() if v > total.get(k, 0.0) + 1e-9]
    if short:
        each = ", ".join(
            f"{n} x {' + '.join(f'{need[k]:g} {k}' for k in short if need.get(k))} ({what})"
            for what, n, need in asks
            if n and any(need.get(k) for k in short)
        )
        has = ", ".join(f"{sums[k]:g} {k} of the {total.get(k, 0.0):g} it has" for k in short)
        why = f"they ask for {has} ({each})"
        raise ConfigError(f"the run's actors do not fit in the Ray cluster: {why}; {_OWN_CLUSTER}")


def _place(free: list[float], share: float) -> bool:
    """Place one actor's GPU ``share`` on the devices' free room ``free`` (first fit: a fraction on
    one device, a whole number on as many free devices); False where it does not fit."""
    if share <= 0:
        return True
    if share >= 1:
        whole = [i for i, f in enumerate(free) if f >= 1 - 1e-9][: int(round(share))]
        if len(whole) < round(share):
            return False
        for i in whole:
            free[i] = 0.0
        return True
    for i, f in enumerate(free):
        if f >= share - 1e-9:
            free[i] = f - share
            return True
    return False


def _pack_gpus(gpus: float, shares: list[float], free: list[float] | None = None) -> list[float]:
    """The shares of ``shares`` that do not fit on ``gpus`` devices (or their room ``free``, which
    is updated), packed as Ray packs them: each fractional share on one device, largest first."""
    room = free if free is not None else [1.0] * int(gpus + 1e-9)
    return [s for s in sorted(shares, reverse=True) if not _place(room, s)]


def auto_workers(num_gpus: float, reserved: list[float] | None = None) -> int:
    """rollout.num_workers='auto': as many workers of ``num_gpus`` each as the cluster's GPUs hold,
    device by device, beside the ``reserved`` GPU shares of the run's other actors (its reward and
    metric servers: on a cluster that cannot grow, a worker in their room would leave them none)."""
    gpus = ray.cluster_resources().get("GPU", 0.0)
    free = [1.0] * int(gpus + 1e-9)
    _pack_gpus(gpus, reserved or [], free)
    n = 0
    while _place(free, num_gpus):
        n += 1
    if n < 1:
        beside = f" beside the {sum(reserved or []):g} its reward and metric servers reserve" if reserved else ""
        raise ConfigError(
            f"rollout.num_workers='auto': the cluster has {gpus:g} GPUs, not one share of"
            f" rollout.num_gpus={num_gpus:g}{beside}"
        )
    return n


def reserved_gpus(cfg: Config) -> list[float]:
    """The GPU shares of a run's reward and metric servers, one per server."""
    shares = [s.num_gpus for s in cfg.rewards for _ in range(s.num_servers)]
    return [g for g in shares + [m.num_gpus for m in cfg.learner.eval_metrics] if g]


def actor_asks(cfg: Config) -> list[tuple[str, int, dict[str, float]]]:
    """What the actors of a run of ``cfg`` ask for together, as ``check_room`` takes it: its rollout
    workers (as many as it starts with: an elastic run grows only into free room), its reward
    servers and its eval metrics' servers."""
    r = cfg.rollout
    n = auto_workers(r.num_gpus, reserved_gpus(cfg)) if r.num_workers == "auto" else r.num_workers
    if n < r.min_workers:  # 'auto' resolved below it: the first fault would stop the run
        raise ConfigError(
            f"rollout.min_workers={r.min_workers} exceeds the {n} workers rollout.num_workers='auto' starts on"
            " this cluster"
        )
    asks = [("rollout workers", n, {"CPU": r.num_cpus, "GPU": r.num_gpus})]
    asks += [
        (f"rewards[{j}] ({s.name!r})", s.num_servers, {"CPU": s.num_cpus, "GPU": s.num_gpus})
        for j, s in enumerate(cfg.rewards)
    ]
    asks += [(f"eval metric {m.name!r}", 1, {"CPU": m.num_cpus, "GPU": m.num_gpus}) for m in cfg.learner.eval_metrics]
    return asks


def _entry(actor: Any) -> dict[str, Any] | None:
    """``actor``'s row of the cluster's actor table (the GCS's: its State, Pid, NumRestarts); None
    where it cannot be read (a private table: what reads it is only less precise without it)."""
    try:
        from ray._private import state

        return state.actors(actor_id=actor._actor_id.hex())
    except Exception:  # noqa: BLE001 - a private table
        return None


def _placed(actor: Any) -> bool | None:
    """Whether the cluster has given ``actor`` a process (its constructor may still be running);
    None where the cluster's actor table cannot be read."""
    entry = _entry(actor)
    return None if entry is None else bool(entry.get("Pid"))


def _no_room(need: dict[str, float]) -> str:
    """Why an actor that asks for ``need`` has no process yet, with what it asks for and what the
    cluster has: no room for it where it asks for more than the whole cluster has; otherwise its
    resources are taken, or its runtime_env is still being installed (Ray places an actor before
    it builds its environment, so the two look the same from here)."""
    asks = {k: v for k, v in need.items() if v}
    total, free = ray.cluster_resources(), ray.available_resources()
    has = ", ".join(f"{free.get(k, 0.0):g} of {total.get(k, 0.0):g} {k} free" for k in asks)
    numbers = f"it asks for {', '.join(f'{v:g} {k}' for k, v in asks.items())}; the cluster has {has}"
    if any(v > total.get(k, 0.0) for k, v in asks.items()):
        return f"the cluster has no room for it ({numbers})"
    return (
        "it has no process yet: the cluster's free resources are taken, or its runtime_env is still being"
        f" set up ({numbers})"
    )


def _request_resources(workers: int, num_cpus: float, num_gpus: float) -> None:
    """Ask the cluster's autoscaler for room for ``workers`` rollout workers (nodes to launch);
    without an autoscaler the request is kept by the GCS and changes nothing."""
    from ray.autoscaler.sdk import request_resources

    bundle = {k: v for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v}
    if bundle:
        try:
            request_resources(bundles=[bundle] * workers)
        except Exception as e:  # noqa: BLE001 - an autoscaler that cannot be asked is not a reason to stop
            print(f"warning: could not ask the autoscaler for {workers} rollout workers: {e}")


def _alive(actor: Any, timeout_s: float, stop: threading.Event | None = None, restarts: int = 0) -> int | None:
    """Whether ``actor`` is back after a fault: the restarts it has had, once it answers (after a
    restart if it had one); None if it is dead for good (restarts exhausted) or not back within
    ``timeout_s``. Its answer comes only after the calls queued on it (a worker's sampling: a unit
    re-sent to it, the next iteration's requests), so the cluster's actor table is read while it
    is awaited: an actor the table shows alive after more than ``restarts`` (those it had when it
    was last seen back) is back. Right after a death, calls fail for a while even when a restart is
    coming, so a failed call is retried until the deadline unless the cluster already reports the
    actor DEAD. ``stop``: set while it waits (SIGTERM, Ctrl-C), the wait is given up
    (``Cancelled``) within ``STOP_POLL_S``, not at the deadline."""
    deadline = time.monotonic() + timeout_s
    ref = actor.pid.remote()
    while True:
        if stop is not None and stop.is_set():
            raise Cancelled("the run was stopped while a failed actor was asked whether it is back")
        left = deadline - time.monotonic()
        try:
            ray.get(ref, timeout=max(0.1, min(left, STOP_POLL_S if stop is not None else RESTART_POLL_S)))
            entry = _entry(actor)
            return restarts if entry is None else int(entry.get("NumRestarts", restarts))
        except GetTimeoutError:
            entry = _entry(actor)
            if entry is not None and entry.get("State") == "ALIVE" and entry.get("NumRestarts", 0) > restarts:
                return int(entry["NumRestarts"])  # restarted, and busy with what was queued on it since
            if time.monotonic() >= deadline:
                return None
        except RayActorError:
            if _dead_for_good(actor) or time.monotonic() > deadline:
                return None
            if stop is not None:
                stop.wait(0.5)
            else:
                time.sleep(0.5)
            ref = actor.pid.remote()


def _kept_if_back(
    actor: Any, key: Any, restarts: dict[Any, int], timeout_s: float, stop: threading.Event | None
) -> bool:
    """After a fault: whether ``actor`` is back (``_alive``), its restarts recorded under ``key``
    in ``restarts``; one that is not back is killed for good (one still restarting would hold its
    CPUs and GPUs)."""
    back = _alive(actor, timeout_s, stop, restarts.get(key, 0))
    if back is None:
        stop_actors([actor])
        return False
    restarts[key] = back
    return True


def _dead_for_good(actor: Any) -> bool:
    entry = _entry(actor)  # the GCS's view of the actor: DEAD only once its restarts are exhausted
    return entry is not None and entry.get("State") == "DEAD"  # an unanswerable query is no evidence of death


def stop_actors(actors: list[Any]) -> None:
    """Kill ``actors`` for good (no restart): what a run started is released when it ends, not
    when Python gets round to collecting its handles (on a shared cluster, the GPUs a finished
    run's workers hold; in one process, the CPUs the next run needs)."""
    for a in actors:
        with contextlib.suppress(Exception):  # already dead, or Ray going down: nothing left to release
            ray.kill(a, no_restart=True)


@dataclass
class Pending:
    """One in-flight request: its metadata ref, its image and reference refs, and its score refs
    (one per reward) with the server that scores each: sent at launch for a reward with one live
    server, once the images exist for the others (``RewardGroup.chain``, ``RewardGroup.score``)."""

    request: RolloutRequest
    worker: int
    batch: ray.ObjectRef
    images: ray.ObjectRef
    references: ray.ObjectRef
    scores: list[ray.ObjectRef | None] = field(default_factory=list)  # per reward; None: not sent yet
    servers: list[int] = field(default_factory=list)  # per reward: the server that scores it (-1: not chosen yet)
    launched: float = field(default_factory=time.monotonic)
    deadline: float = math.inf  # sampling must be done by then (time.monotonic())
    sampled: RolloutBatch | None = None  # the batch, once the worker is done
    score_deadlines: list[float] = field(default_factory=list)
    got: list[np.ndarray | None] = field(default_factory=list)  # per reward: its scores once collected

    @property
    def prompts(self) -> list[str]:
        return [c.prompt for c in self.request.contexts for _ in range(self.request.k)]

    def waiting(self) -> list[tuple[ray.ObjectRef, int, float]]:
        """What the unit waits for: (ref, -1 for sampling or the reward's index, deadline)."""
        if self.sampled is None:
            return [(self.batch, -1, self.deadline)]
        return [
            (ref, j, d)
            for j, (ref, d, got) in enumerate(zip(self.scores, self.score_deadlines, self.got, strict=True))
            if got is None and ref is not None
        ]


#: Requests sent: their units by request id, and when they went out (time.perf_counter()).
Launched = tuple[dict[str, Pending], float]


def worker_kwargs(r: RolloutConfig) -> dict[str, Any]:
    """The keyword arguments of every ``RolloutWorker`` a run starts, from ``rollout``."""
    return {"prompt_cache": r.prompt_cache, "policy_device": r.policy_device, "image_threads": r.image_threads}


class RolloutGroup:
    def __init__(self, cfg: Config, wait: bool = True):
        """The run's rollout workers. ``wait=False`` starts them without waiting for them
        (``wait_started``), so that they build their samplers while the reward servers build their
        rewards. What the rewards read is set by ``serve`` once the rewards are up; until then the
        requests ask for no reference and send the images as made."""
        r = cfg.rollout
        # a thread beside sampling for the collective weight broadcast (learner.broadcast)
        if cfg.learner.broadcast == "collective":
            # concurrency_groups is a documented keyword of ray.remote that its type stubs leave out
            actor: Any = ray.remote(concurrency_groups={"weights": 1})(RolloutWorker)  # type: ignore[call-overload]
        else:
            actor = ray.remote(RolloutWorker)
        self._actor = actor.options(
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
            max_restarts=r.max_restarts,
            max_task_retries=0,
            runtime_env=cfg.sampler.runtime_env,  # a plug-in sampler's own dependencies
        )
        self._args = (cfg.sampler.model_dump(), cfg.policy.model_dump(), r.steps, cfg.experiment.seed)
        self._kwargs = worker_kwargs(r)
        self.num_cpus, self.num_gpus, self.start_timeout_s = r.num_cpus, r.num_gpus, r.start_timeout_s
        self.min_workers, self.restart_timeout_s = r.min_workers, r.restart_timeout_s
        self.reference_steps, self.micro_batch = 0, r.micro_batch
        self.image_size: int | None = None
        self.variant: str = cfg.policy.variant  # the policy the requests are drawn under (draw_under)
        self.timeout_s, self.timeout_per_nfe_s = r.sample_timeout_s, r.sample_timeout_per_nfe_s
        self.workers: list[Any] = []
        self.alive: list[int] = []
        self._restarts: dict[int, int] = {}  # each worker's restarts when it was last seen back (``_alive``)
        self._starting: list[int] = []  # started, not yet waited for
        # grown workers (``grow``) not yet answering: the ref of their first answer, and when they give up
        self._joining: dict[int, tuple[Any, float]] = {}
        self._reserved = reserved_gpus(cfg)
        n = self.auto_count() if r.num_workers == "auto" else r.num_workers
        self.max_workers = max(r.max_workers or n, n)
        if self.max_workers > n:  # ask an autoscaler (KubeRay, ray up) for the nodes; a no-op without one
            _request_resources(self.max_workers, self.num_cpus, self.num_gpus)
        self._start(n, wait)

    def serve(self, reference_steps: int, image_size: int | None = None) -> None:
        """What the rewards read, sent with every request from now on. ``reference_steps``: NFE of
        the many-step reference each request makes per context (``RewardGroup.needs_reference``).
        ``image_size``: the longest side every reward reads (``RewardGroup.input_size``): training
        images are downscaled to it on the workers; evaluation images, which metrics and plots read
        too, are sent as made."""
        self.reference_steps, self.image_size = reference_steps, image_size

    def draw_under(self, variant: str) -> None:
        """Requests from now on are drawn under the policy ``variant`` (the workers' own, or the
        other with the same settings: learner.main trains the global baseline on these workers)."""
        self.variant = variant

    def auto_count(self) -> int:
        """rollout.num_workers='auto': as many workers as the cluster's GPUs hold beside the rewards'."""
        return auto_workers(self.num_gpus, self._reserved)

    def _start(self, n: int, wait: bool = True) -> None:
        """Start ``n`` more workers, and (``wait``) wait until each has built its sampler."""
        first = len(self.workers)
        self.workers += [self._actor.remote(first + i, *self._args, **self._kwargs) for i in range(n)]
        self._starting += range(first, first + n)
        if wait:
            self.wait_started()

    def wait_started(self) -> None:
        """Every worker started has built its sampler, each within ``rollout.start_timeout_s`` of
        this call (one line naming the worker if one cannot)."""
        new, self._starting = self._starting, []
        _wait_started(
            [self.workers[i] for i in new],
            self.start_timeout_s,
            [f"rollout worker {i}" for i in new],
            [{"CPU": self.num_cpus, "GPU": self.num_gpus}] * len(new),
        )
        self.alive += new

    def grow(self) -> int:
        """Elastic scale-out, between iterations: workers started earlier that answer now join the
        pool, and as many more are started as the cluster has free CPUs and GPUs for, up to
        ``rollout.max_workers`` started in all. Nothing waits for them: a new worker builds its
        sampler while the run goes on, and joins at the first launch after it answers; one that
        has not within ``rollout.start_timeout_s`` (its node's room taken by another job meanwhile,
        a GPU share that fits the cluster's free sum but no device) is given up with a warning, and
        the run goes on without it. A worker that died for good, or was given up, keeps its place:
        it is not replaced, so its restarts stay what ``rollout.max_restarts`` allows (a worker that
        dies on every call would otherwise be started again forever). Returns how many joined."""
        joined = self._adopt()
        room = self.max_workers - len(self.workers)
        if room <= 0 or self._joining:  # none while others are still joining: an unplaced one holds no room
            return joined
        free = ray.available_resources()  # a call to the cluster: only where a worker may be started
        fits = [free.get("CPU", 0.0) / self.num_cpus if self.num_cpus else room]
        if self.num_gpus:
            fits.append(free.get("GPU", 0.0) / self.num_gpus)
        n = min(room, int(min(fits) + 1e-9))
        if n > 0:
            first = len(self.workers)
            self.workers += [self._actor.remote(first + i, *self._args, **self._kwargs) for i in range(n)]
            deadline = time.monotonic() + self.start_timeout_s
            self._joining.update({i: (self.workers[i].pid.remote(), deadline) for i in range(first, first + n)})
        return joined

    def _adopt(self) -> int:
        """Grown workers that have answered join the pool; those past their start time are given up."""
        joined = 0
        for i, (ref, deadline) in list(self._joining.items()):
            if ray.wait([ref], timeout=0)[0]:
                del self._joining[i]
                try:
                    ray.get(ref, timeout=0)
                except (RayActorError, RayTaskError) as e:  # its constructor raised: its own words
                    ray.kill(self.workers[i], no_restart=True)
                    why = actor_error_line(e)
                    print(f"warning: rollout worker {i} could not start: {why}; the run goes on without it")
                    continue
                self.alive.append(i)
                joined += 1
                up_to = f"up to rollout.max_workers={self.max_workers}"
                print(f"rollout workers: {len(self.alive)} (worker {i} joined; {up_to})")
            elif time.monotonic() >= deadline:
                del self._joining[i]
                placed = _placed(self.workers[i])
                ray.kill(self.workers[i], no_restart=True)
                why = _no_room({"CPU": self.num_cpus, "GPU": self.num_gpus}) if placed is False else "still starting"
                print(
                    f"warning: rollout worker {i} did not start within rollout.start_timeout_s={self.start_timeout_s:g}"
                    f" s ({why}); given up, the run goes on with {len(self.alive)} workers"
                )
        return joined

    def timeout(self, request: RolloutRequest) -> float:
        """Seconds a worker has for ``request``: a fixed part plus a share per model evaluation."""
        n = len(request.contexts)
        nfe = n * request.k * request.steps + (n * self.reference_steps if self.reference_steps else 0)
        return self.timeout_s + self.timeout_per_nfe_s * nfe

    def check_prompts(self, named: dict[str, list[str]]) -> None:
        """Every prompt is one the backend reads (e.g. the toy's 'class 3' within its classes):
        checked on a worker before training, as one ConfigError naming the prompt and where it
        came from (``named``: {a setting or a file: its prompts})."""
        for source, prompts in named.items():
            ask = self.workers[self.alive[0]].check_prompts.remote(list(dict.fromkeys(prompts)))
            problem = answer(ask, self.timeout_s, f"rollout worker {self.alive[0]}", "rollout.sample_timeout_s")
            if problem is not None:
                raise ConfigError(f"{source}: {problem}")

    def restart(self, worker: int) -> None:
        """Kill a stalled worker; Ray restarts it (its restarts permitting)."""
        ray.kill(self.workers[worker], no_restart=False)

    def stop(self) -> None:
        """Kill every worker for good (the run is over)."""
        stop_actors(self.workers)

    def _ask(self, method: str, *args: Any) -> Any:
        """The answer of the first worker that gives one (a worker may die during start-up)."""
        for i in list(self.alive):
            try:
                return ray.get(getattr(self.workers[i], method).remote(*args), timeout=self.timeout_s)
            except RayActorError:
                self.check(i)
            except GetTimeoutError:
                limit = f"{self.timeout_s:g} s (rollout.sample_timeout_s)"
                raise NoAnswer(f"rollout worker {i} did not answer {method}() within {limit}") from None
        raise WorkersLost("no rollout worker answered")

    def spec(self) -> SamplerSpec:
        return self._ask("spec")

    def policy_kwargs(self) -> dict[str, Any]:
        """The constructor arguments of the policy the requests are drawn under."""
        return self._ask("policy_kwargs", self.variant)

    def requests(
        self,
        contexts: list[Context],
        k: int,
        steps: int,
        iteration: int,
        version: int,
        mode: ScheduleMode = "sample",
        tau: list[float] | None = None,
        max_concentration: float | None = None,
    ) -> list[RolloutRequest]:
        """Split ``contexts`` into requests, in context order: micro-batches of ``rollout.micro_batch``
        contexts, or (None) evenly, one request per live worker."""
        n = request_size(len(contexts), len(self.alive), self.micro_batch)
        return [
            RolloutRequest(
                request_id=uuid.uuid4().hex,
                iteration=iteration,
                version=version,
                contexts=contexts[i : i + n],
                k=k,
                steps=steps,
                mode=mode,
                tau=tau,
                max_concentration=max_concentration,
                image_size=self.image_size if mode == "sample" else None,
                reference_steps=self.reference_steps,
                variant=self.variant,
            )
            for i in range(0, len(contexts), n)
        ]

    def submit(self, request: RolloutRequest, weights: ray.ObjectRef | WeightsHandle | None, worker: int) -> Pending:
        batch, images, references = self.workers[worker].sample.options(num_returns=3).remote(request, weights)
        return Pending(request, worker, batch, images, references)

    def check(self, worker: int, stop: threading.Event | None = None) -> None:
        """After a fault on ``worker``: keep it if it came back, else drop it from the group and
        kill it for good (one still restarting holds its CPUs and GPUs otherwise) (``stop``: as
        ``_alive``'s)."""
        if worker in self.alive and not _kept_if_back(
            self.workers[worker], worker, self._restarts, self.restart_timeout_s, stop
        ):
            self.alive.remove(worker)
        if len(self.alive) < self.min_workers:
            raise WorkersLost(
                f"only {len(self.alive)} of {len(self.workers)} rollout workers are alive "
                f"(rollout.min_workers={self.min_workers}); their restarts are exhausted"
            )


@dataclass
class Scores:
    total: np.ndarray  # [N] weighted sum, float64
    per_reward: dict[str, np.ndarray]  # name -> [N] float32


#: A reward whose typical size changes by more than this factor from one call to the next gets
#: a warning in the log (a unit mix-up, a broken model): the run goes on.
SCALE_JUMP = 100.0


class RewardGroup:
    def __init__(
        self,
        specs: list[RewardSpec],
        sampler: dict[str, Any] | None = None,
        max_restarts: int = 3,
        restart_timeout_s: float = 120.0,
        wait: bool = True,
    ):
        """``sampler``: the run's sampler section, for rewards that score against the sampler's own
        model (``uses_sampler_config``, e.g. the toy reward). ``wait=False``: the servers are
        started and not waited for; ``wait_started`` waits and reads what each reward declares."""
        self.specs = specs
        self.servers: list[list[Any]] = []
        self.restart_timeout_s = restart_timeout_s
        self._scale: dict[str, float] = {}
        for spec in specs:
            actor = ray.remote(RewardServer).options(
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus,
                runtime_env=spec.runtime_env,
                max_restarts=max_restarts,
                max_task_retries=0,
                # calls run as their images come to exist, not in the order they were sent: a call
                # sent at launch (``chain``) never holds back one whose worker finished first
                allow_out_of_order_execution=True,
            )
            self.servers.append(
                [actor.remote(spec.name, spec.kwargs, sampler=sampler) for _ in range(spec.num_servers)]
            )
        self.alive = [list(range(len(s))) for s in self.servers]
        self._restarts: dict[tuple[int, int], int] = {}  # (reward, server): restarts when last seen back
        self.keys = reward_keys(specs)
        #: per reward: whether it compares with the many-step reference (rollout.reference_steps)
        self.needs_reference: list[bool] = []
        #: the longest image side every reward reads (None: one reads images as made)
        self.input_size: int | None = None
        self._turn = 0
        if wait:
            self.wait_started()

    @classmethod
    def from_config(cls, cfg: Config, wait: bool = True) -> RewardGroup:
        """The run's rewards, restarted as its rollout workers are."""
        r = cfg.rollout
        return cls(cfg.rewards, cfg.sampler.model_dump(mode="json"), r.max_restarts, r.restart_timeout_s, wait)

    def wait_started(self) -> None:
        """Every server has built its reward (module, class, call signature, kwargs, model load);
        then what each reward declares: ``needs_reference`` and ``input_size``.

        The reward is resolved inside its server, in its own runtime_env (its module may not even
        import in the learner's environment), so a bad spec shows here, at startup, as one line
        naming the reward: not as an actor traceback at the first scoring call.
        """
        self.needs_reference = []
        sizes: list[int | None] = []
        for j, (spec, servers) in enumerate(zip(self.specs, self.servers, strict=True)):
            need = {"CPU": spec.num_cpus, "GPU": spec.num_gpus}
            _wait_started(
                servers, spec.start_timeout_s, [f"rewards[{j}] ({spec.name!r})"] * len(servers), [need] * len(servers)
            )
            who, setting = f"reward {spec.name!r}", f"rewards[{j}].timeout_s"
            self.needs_reference.append(answer(servers[0].needs_reference.remote(), spec.timeout_s, who, setting))
            sizes.append(answer(servers[0].input_size.remote(), spec.timeout_s, who, setting))
        self.input_size = None if not sizes or None in sizes else max(s for s in sizes if s is not None)

    def chain(self, p: Pending) -> None:
        """At ``p``'s launch: a reward with one live server is sent ``p``'s image refs at once. Ray
        starts the call the moment the images exist (the servers run calls as their inputs become
        ready), with no round trip through the learner between the worker and the server. A reward
        with several servers waits for the images (``score``): which server is least loaded is
        known only then. Sets ``p.scores`` (refs of (scores, started, finished); None: not sent
        yet), ``p.servers`` (-1: not chosen yet), ``p.got``; deadlines start with ``score``."""
        p.scores, p.servers, p.score_deadlines, p.got = [], [], [], []
        for j, servers in enumerate(self.servers):
            one = self.alive[j][0] if len(self.alive[j]) == 1 else None
            p.scores.append(None if one is None else servers[one].score_timed.remote(p.images, p.prompts, p.references))
            p.servers.append(-1 if one is None else one)
            p.score_deadlines.append(math.inf)
            p.got.append(None)

    def score(self, p: Pending, load: list[list[int]] | None = None) -> None:
        """``p``'s images exist: send them to every reward not sent them at launch (``chain``), on
        its least loaded live server (``load[j][i]``: calls in flight on server i of reward j, None:
        none; ties go round robin), and start every call's deadline: its time for each call queued
        ahead of it on its server, and its own."""
        now = time.monotonic()
        for j, servers in enumerate(self.servers):
            queued = load[j] if load is not None else [0] * len(servers)
            if p.scores[j] is None:
                i = min(self.alive[j], key=lambda s: (queued[s], (s - self._turn) % len(servers)))
                p.scores[j], p.servers[j] = servers[i].score_timed.remote(p.images, p.prompts, p.references), i
            p.score_deadlines[j] = now + self.specs[j].score_timeout(len(p.prompts)) * (1 + queued[p.servers[j]])
        self._turn += 1

    def restart(self, reward: int, server: int) -> None:
        """Kill a stalled reward server; Ray restarts it (its restarts permitting)."""
        ray.kill(self.servers[reward][server], no_restart=False)

    def stop(self) -> None:
        """Kill every server for good (the run is over)."""
        stop_actors([server for servers in self.servers for server in servers])

    def check(self, stop: threading.Event | None = None) -> None:
        """After a scoring fault: drop the servers that are not back, and kill them for good; stop
        if a reward has none left (``stop``: as ``_alive``'s)."""
        for j, servers in enumerate(self.servers):
            self.alive[j] = [
                i
                for i in self.alive[j]
                if _kept_if_back(servers[i], (j, i), self._restarts, self.restart_timeout_s, stop)
            ]
            if not self.alive[j]:
                raise WorkersLost(f"every reward server of {self.specs[j].name!r} is dead; restarts are exhausted")

    def combine(self, scored: list[list[np.ndarray]]) -> Scores:
        """Concatenate per-request scores and weight them into the total reward."""
        per_reward = {}
        total: float | np.ndarray = 0.0
        for j, spec in enumerate(self.specs):
            s = np.concatenate([row[j] for row in scored])
            per_reward[self.keys[j]] = s
            total = total + spec.weight * s.astype(np.float64)
            self._watch_scale(self.keys[j], s)
        return Scores(total=np.asarray(total), per_reward=per_reward)

    def _watch_scale(self, key: str, s: np.ndarray) -> None:
        """Warn when a reward's typical size (root mean square) jumps by orders of magnitude."""
        scale = float(np.sqrt(np.mean(np.square(s.astype(np.float64)))))
        before = self._scale.get(key)
        if before and scale and max(scale / before, before / scale) > SCALE_JUMP:
            print(
                f"warning: reward {key!r} changed scale from {before:.3g} to {scale:.3g} (root mean square) since the"
                " previous batch: a reward that returns different units or a broken model?"
            )
        if scale:
            self._scale[key] = scale


class MetricGroup:
    """One MetricServer per evaluation metric: features per request (from the image refs), then
    one distance over the whole set, computed on the server."""

    def __init__(self, specs: list[MetricSpec], wait: bool = True):
        self.specs = specs
        self.names = [m.name for m in specs]
        self.resamples = [m.noise_resamples for m in specs]
        self.timeouts = [m.timeout_s for m in specs]
        self.lower_is_better: dict[str, bool] = {}  # metric -> which way is better, its class's word
        self.servers: list[Any] = [
            ray.remote(MetricServer).options(num_cpus=m.num_cpus, num_gpus=m.num_gpus).remote(m.name, m.kwargs)
            for m in specs
        ]
        if wait:
            self.wait_started()

    def stop(self) -> None:
        """Kill every server for good (the run is over)."""
        stop_actors(self.servers)

    def wait_started(self) -> None:
        """Every server has built its metric: at startup, not first met at the final evaluation
        after the whole training (one line naming the metric if one cannot)."""
        _wait_started(
            self.servers,
            max(m.start_timeout_s for m in self.specs) if self.specs else 1.0,
            [f"eval metric {m.name!r}" for m in self.specs],
            [{"CPU": m.num_cpus, "GPU": m.num_gpus} for m in self.specs],
        )
        self.lower_is_better = {
            m.name: answer(
                server.lower_is_better.remote(),
                m.start_timeout_s,
                f"eval metric {m.name!r}",
                "learner.eval_metrics[].start_timeout_s",
            )
            for m, server in zip(self.specs, self.servers, strict=True)
        }

    def features(self, pending: list[Pending]) -> dict[str, list[Any]]:
        """Each metric's features of the images of ``pending``: one ref per unit, on its server."""
        return {
            name: [server.features.remote(p.images, p.prompts) for p in pending]
            for name, server in zip(self.names, self.servers, strict=True)
        }

    def measure(self, features: dict[str, list[Any]], prompts: list[str]) -> dict[str, float]:
        """Each metric over a set (its ``features``; ``prompts``: each context's), and its bootstrap
        noise, the noises resampled within each prompt, as ``<name>_se``."""
        return self._answers(
            {
                name: server.distance_with_se.remote(*features[name], strata=prompts, resamples=resamples)
                for name, server, resamples in zip(self.names, self.servers, self.resamples, strict=True)
            }
        )

    def difference(self, a: dict[str, list[Any]], b: dict[str, list[Any]], prompts: list[str]) -> dict[str, float]:
        """Each metric of set ``a`` minus that of set ``b`` (the same contexts, in the same order,
        under two schedules; ``prompts``: each context's), and its paired bootstrap noise, the
        noises resampled within each prompt, as ``<name>_se``."""
        return self._answers(
            {
                name: server.difference_with_se.remote(len(a[name]), *a[name], *b[name], strata=prompts, resamples=n)
                for name, server, n in zip(self.names, self.servers, self.resamples, strict=True)
            }
        )

    def _answers(self, refs: dict[str, Any]) -> dict[str, float]:
        """``{name: value, name_se: noise}`` from each metric's (value, noise or None) call."""
        out = {}
        for (name, ref), t in zip(refs.items(), self.timeouts, strict=True):
            value, se = answer(ref, t, f"eval metric {name!r}", "learner.eval_metrics[].timeout_s")
            out[name] = value
            if se is not None:
                out[f"{name}_se"] = se
        return out


@dataclass
class Collected:
    batches: list[RolloutBatch]  # in request order
    scored: list[list[np.ndarray]]  # [request][reward]
    pending: list[Pending]  # the units whose results were kept (image refs for metrics and plots)
    seconds: float
    faults: int
    scoring: list[tuple[float, float]] = field(default_factory=list)  # kept scoring calls: (start, end), time.time()
    finished_at: float = math.nan  # when the learner had every result (time.time())

    def dispatch_skew(self) -> float:
        """Seconds between the first worker to start on this iteration and the last one (each
        worker's first request, on the workers' clocks): how long the dispatch kept one waiting.
        Requests queued behind another on the same worker are not counted."""
        first: dict[int, float] = {}
        for b in self.batches:
            first[b.worker] = min(first.get(b.worker, math.inf), b.started_at)
        return max(first.values()) - min(first.values()) if first else 0.0

    def scoring_overlap(self) -> float:
        """The share of scoring time during which a worker was still sampling (1: scoring is
        hidden behind sampling; 0: it all came after). NaN without scoring time."""
        sampling = _union([(b.started_at, b.started_at + b.seconds) for b in self.batches])
        total = sum(e - s for s, e in self.scoring)
        if total <= 0:
            return math.nan
        covered = sum(max(0.0, min(e, se) - max(s, ss)) for s, e in self.scoring for ss, se in sampling)
        return covered / total

    def sampling_seconds(self) -> float:
        """Seconds from the first request's start on a worker to the last image (the workers'
        clocks): the time the rollout workers took to sample this iteration, whatever it waited in
        a queue first (one step off policy, it was launched while the learner updated). NaN
        without batches."""
        if not self.batches:
            return math.nan
        return self._last_image() - min(b.started_at for b in self.batches)

    def _last_image(self) -> float:
        return max(b.started_at + b.seconds for b in self.batches)

    def scoring_tail(self) -> float:
        """Seconds from the last image sampled to the last score: the scoring no sampling hid (on
        policy the workers wait it out). 0 when the last score came first or there was none."""
        if not self.batches or not self.scoring:
            return 0.0
        return max(0.0, max(e for _, e in self.scoring) - self._last_image())

    def collect_latency(self) -> float:
        """Seconds from the last result on an actor (an image or a score) to the learner having
        them all: the hops back to the learner. NaN where the run did not say when it finished."""
        ends = [b.started_at + b.seconds for b in self.batches] + [e for _, e in self.scoring]
        return max(0.0, self.finished_at - max(ends)) if ends else math.nan


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint intervals covering ``spans``."""
    out: list[tuple[float, float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


class Cancelled(RuntimeError):
    """A background run given up (``InFlight.cancel``): the learner is stopping."""


#: How often a background run looks at its stop event (seconds).
STOP_POLL_S = 0.2
#: How often the cluster's actor table is read while a failed actor is asked whether it is back.
RESTART_POLL_S = 0.5


class InFlight:
    """Requests a ``Dispatcher`` runs on its own thread while the learner goes on with other work:
    the next iteration's rollouts during this one's logging (on policy), the next two during its
    update (one step off policy). ``result()`` waits for them (and raises what the run raised:
    ``WorkersLost``, ``TimedOut``, a reward's own error); ``cancel()`` gives them up. The requests
    of several go out at once (each worker queues them in order; a unit's time to stall counts
    the units ahead of it there, of every run), but their results are collected one run at a
    time, in the order they were started: the dispatcher's state (live workers, server loads) is
    not shared."""

    def __init__(self, dispatcher: Dispatcher, requests: list[RolloutRequest], weights: Any, launched: Launched):
        """``launched``: the requests' units, already sent, and when (time.perf_counter())."""
        self._stop = threading.Event()
        self._future = dispatcher.thread().submit(dispatcher.run, requests, weights, self._stop, launched)

    def wait(self) -> None:
        """Until the run is over (its result kept for ``result``)."""
        futures.wait([self._future])

    def result(self) -> Collected:
        return self._future.result()

    def cancel(self) -> None:
        """Give the run up (the learner is stopping); its actors' calls finish or die on their own."""
        self._stop.set()
        self.wait()


@dataclass
class _Stalled:
    """A unit past its time on one actor: ``kind`` 'worker' (``who``: its index) or 'reward'
    (``who``: the reward's index), after ``limit`` seconds."""

    kind: str
    who: int
    limit: float


class Dispatcher:
    """Runs requests as units of work (sample, then score) with re-sends on actor faults and
    time-outs.

    Every request goes out at once; workers take theirs in order. Results are collected in
    completion order (``ray.wait``): a unit's images go to a reward server the moment they exist,
    on the server with the fewest calls in flight, so with micro-batches (``rollout.micro_batch``)
    scoring runs while the workers sample the next ones."""

    def __init__(self, rollouts: RolloutGroup, rewards: RewardGroup, max_attempts: int = 5):
        self.rollouts, self.rewards, self.max_attempts = rollouts, rewards, max_attempts
        self.faults = 0  # actor faults survived over the run
        self._thread: futures.ThreadPoolExecutor | None = None
        # the units of runs sent and not yet over (``start``): a unit sent later waits behind theirs on its worker
        self._sent: list[dict[str, Pending]] = []
        self._sent_lock = threading.Lock()
        # the scoring calls of attempts given up (re-sent): their results, errors mostly (their
        # images died with a worker), are read and dropped, or Ray prints each as an "Unhandled
        # error" traceback on the terminal, over a fault the run survived
        self._abandoned: list[ray.ObjectRef] = []

    def _abandon(self, p: Pending) -> None:
        """``p``'s attempt is given up: its scoring calls' results are read as they come (``_drop``)."""
        self._abandoned += [ref for ref, got in zip(p.scores, p.got, strict=True) if ref is not None and got is None]
        self._drop()

    def _drop(self, timeout_s: float = 0.0) -> None:
        """Read, and drop, the results of the abandoned calls that are over (within ``timeout_s``)."""
        if not self._abandoned:
            return
        over, self._abandoned = ray.wait(self._abandoned, num_returns=len(self._abandoned), timeout=timeout_s)
        for ref in over:
            with contextlib.suppress(Exception):  # whatever it is, it is not used
                ray.get(ref, timeout=0)

    def thread(self) -> futures.ThreadPoolExecutor:
        """The one thread that runs ``start``'s requests, kept for the dispatcher's life: handing
        it a run costs a queue put, where starting a thread per iteration waits for the OS to
        schedule it (about half a millisecond on a busy machine, every iteration of the toy)."""
        if self._thread is None:
            self._thread = futures.ThreadPoolExecutor(1, thread_name_prefix="steinsched-dispatch")
        return self._thread

    def close(self) -> None:
        """End the thread (after the run on it, if one is under way), and drop what is left of the
        abandoned calls (those over within a second: the rest are the actors')."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        with contextlib.suppress(Exception):  # Ray going down
            self._drop(timeout_s=1.0)

    def _launch(self, request: RolloutRequest, weights: Any, turn: int, live: dict[str, Pending]) -> Pending:
        """Send ``request`` to a live worker (its sampling call only: the caller chains the scoring
        calls, ``RewardGroup.chain``); it has its time for each unit queued ahead of it there."""
        alive = self.rollouts.alive
        worker = alive[turn % len(alive)]
        with self._sent_lock:
            runs = [live, *(units for units in self._sent if units is not live)]
        # list(): a run's units change on the dispatcher's thread; copying them is one step for Python
        queued = sum(1 for units in runs for u in list(units.values()) if u.worker == worker and u.sampled is None)
        p = self.rollouts.submit(request, weights, worker)
        p.deadline = p.launched + self.rollouts.timeout(request) * (1 + queued)
        return p

    def _launch_all(self, requests: list[RolloutRequest], weights: Any) -> dict[str, Pending]:
        """Every request at once (each worker queues its own): all the sampling calls first, then
        the scoring calls chained to them. A submission costs about half a millisecond of the
        learner's time; with each scoring call sent right after its request, the last of W
        workers also waited for W - 1 scoring calls to be submitted before it could start."""
        live: dict[str, Pending] = {}
        for i, r in enumerate(requests):
            live[r.request_id] = self._launch(r, weights, i, live)
        for p in live.values():
            self.rewards.chain(p)
        return live

    def _load(self, live: dict[str, Pending], but: Pending) -> list[list[int]]:
        """Scoring calls in flight per reward server, ``[reward][server]``, besides ``but``'s (the
        unit to be placed, whose images just came): those whose images exist (a call sent at launch
        waits for them and holds back no other)."""
        load = [[0] * len(servers) for servers in self.rewards.servers]
        for u in live.values():
            if u.sampled is not None and u is not but:
                for j, (i, got) in enumerate(zip(u.servers, u.got, strict=True)):
                    load[j][i] += got is None
        return load

    def _stalled(self, p: Pending, now: float) -> _Stalled | None:
        if p.sampled is None:
            if now > p.deadline:
                return _Stalled("worker", p.worker, p.deadline - p.launched)
            return None
        for j, (deadline, got) in enumerate(zip(p.score_deadlines, p.got, strict=True)):
            if got is None and now > deadline:
                return _Stalled("reward", j, self.rewards.specs[j].score_timeout(len(p.prompts)))
        return None

    def start(self, requests: list[RolloutRequest], weights: Any) -> InFlight:
        """Send the requests now, then ``run`` them to the end on the dispatcher's thread while the
        learner goes on with other work."""
        start = time.perf_counter()
        live = self._launch_all(requests, weights)
        with self._sent_lock:
            self._sent.append(live)
        return InFlight(self, requests, weights, (live, start))

    def run(
        self,
        requests: list[RolloutRequest],
        weights: Any,
        stop: threading.Event | None = None,
        launched: Launched | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Collected:
        """Sample and score ``requests`` under ``weights``; every unit's results, in request order.
        ``stop``: an event that makes the run give up (``Cancelled``) within ``STOP_POLL_S``.
        ``launched``: the requests were sent already (``start``): their units and when.
        ``progress``: told the number of samples of each unit as it is done (sampled and scored)."""
        live, start = launched or (self._launch_all(requests, weights), time.perf_counter())
        try:
            return self._run(requests, weights, live, start, stop, progress)
        finally:
            with self._sent_lock:
                self._sent = [units for units in self._sent if units is not live]

    def _run(
        self,
        requests: list[RolloutRequest],
        weights: Any,
        live: dict[str, Pending],
        start: float,
        stop: threading.Event | None,
        progress: Callable[[int], None] | None,
    ) -> Collected:
        faults = 0
        done: dict[str, tuple[RolloutBatch, list[np.ndarray], Pending]] = {}
        spans: dict[str, list[tuple[float, float]]] = {}
        attempts = {r.request_id: 1 for r in requests}
        timeouts = {r.request_id: 0 for r in requests}

        def resend(p: Pending) -> None:
            rid = p.request.request_id
            self._abandon(p)
            attempts[rid] += 1
            del live[rid]
            spans.pop(rid, None)
            live[rid] = self._launch(p.request, weights, p.worker + attempts[rid], live)
            self.rewards.chain(live[rid])

        while live:
            waits = [(ref, u, j, d) for u in live.values() for ref, j, d in u.waiting()]
            waiting = {ref: (u, j) for ref, u, j, _ in waits}  # ref -> (unit, -1 sampling or reward j)
            deadline = min(d for *_, d in waits)
            wait_s = max(0.0, deadline - time.monotonic())
            if stop is not None:
                if stop.is_set():
                    raise Cancelled(f"{len(live)} of {len(requests)} requests were still under way")
                wait_s = min(wait_s, STOP_POLL_S)
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=wait_s)
            if ready:  # and whatever else is ready by now, in one sweep
                rest = [r for r in waiting if r not in ready]
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0] if rest else []
            for ref in ready:
                p, j = waiting[ref]
                rid = p.request.request_id
                if live.get(rid) is not p:  # re-sent meanwhile: this attempt's results are dropped
                    continue
                try:
                    got = ray.get(ref)
                except ACTOR_FAULTS as e:  # a dead worker or reward server: the unit is re-sent whole
                    faults += 1
                    if attempts[rid] >= self.max_attempts:
                        who = f"rollout worker {p.worker}" if j < 0 else f"reward {self.rewards.specs[j].name!r}"
                        said = " ".join(str(e).split("\n", 1)[0].split())  # Ray's first line: the rest is ids
                        raise AttemptsSpent(
                            f"prompts {shown_prompts(p.prompts)} failed {attempts[rid]} times (rollout.max_attempts;"
                            f" request {rid}), the last on {who}: {type(e).__name__}: {said}"
                        ) from e
                    if j < 0:
                        self.rollouts.check(p.worker, stop)
                    else:
                        self.rewards.check(stop)
                    resend(p)
                    continue
                except RayTaskError as e:  # our own code raised in the actor: the same unit would again
                    who = f"rollout worker {p.worker}" if j < 0 else f"reward {self.rewards.specs[j].name!r}"
                    raise StepFailed(f"{who} raised {actor_error_line(e)}; the step stopped, nothing of it used") from e
                if j < 0:  # the worker is done: its images go to the least loaded reward servers
                    p.sampled = got
                    self.rewards.score(p, self._load(live, p))
                else:
                    scores, began, ended = got
                    p.got[j] = scores
                    spans.setdefault(rid, []).append((began, ended))
                if p.sampled is not None and all(g is not None for g in p.got):
                    del live[rid]
                    if rid not in done:  # a request's results are used once, whatever Ray reported
                        done[rid] = (p.sampled, [g for g in p.got if g is not None], p)
                        if progress is not None:
                            progress(len(p.request.contexts) * p.request.k)
            now = time.monotonic()
            for p in list(live.values()):
                stalled = self._stalled(p, now)
                if stalled is not None:
                    self._on_stalled(p, stalled, timeouts, stop)
                    faults += 1
                    resend(p)
        self.faults += faults
        self._drop()
        kept = [done[r.request_id] for r in requests]
        return Collected(
            batches=[b for b, _, _ in kept],
            scored=[s for _, s, _ in kept],
            pending=[p for _, _, p in kept],
            seconds=time.perf_counter() - start,
            faults=faults,
            scoring=[span for r in requests for span in spans.get(r.request_id, [])],
            finished_at=time.time(),
        )

    def _on_stalled(self, p: Pending, e: _Stalled, timeouts: dict[str, int], stop: threading.Event | None) -> None:
        """A unit past its time: the second time for this unit stops the run (``TimedOut``, naming
        the actor and the prompts); the first restarts the stalled actor (the caller re-sends) and
        waits for it to come back (``stop``: as ``_alive``'s)."""
        rid = p.request.request_id
        timeouts[rid] += 1
        name = f"rollout worker {e.who}" if e.kind == "worker" else f"reward {self.rewards.specs[e.who].name!r}"
        doing = "sampling" if e.kind == "worker" else "scoring"
        setting = "rollout.sample_timeout_s" if e.kind == "worker" else f"rewards[{e.who}].timeout_s"
        if timeouts[rid] >= 2:
            raise TimedOut(
                f"{name} did not finish {doing} prompts {shown_prompts(p.prompts)} within {e.limit:.0f} s, twice"
                f" (request {rid}); if that is its normal time raise {setting}, else look for a hang in it"
            )
        print(f"warning: {name} did not finish {doing} within {e.limit:.0f} s: restarting it and re-sending the unit")
        if e.kind == "worker":
            self.rollouts.restart(e.who)
            self.rollouts.check(e.who, stop)
        else:
            self.rewards.restart(e.who, p.servers[e.who])
            self.rewards.check(stop)
