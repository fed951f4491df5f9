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

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from common.config import Config, ConfigError, MetricSpec, RewardSpec
from common.messages import Context, RolloutBatch, RolloutRequest, SamplerSpec, ScheduleMode
from rewards.actors import MetricServer, RewardServer
from rewards.registry import shown_prompts
from rollout.worker import RolloutWorker

#: What a dead or restarting actor looks like to its caller. A RayTaskError (an exception raised
#: by our own code in the actor, e.g. a non-finite reward) is not among them: it stops the step.
ACTOR_FAULTS = (RayActorError, ObjectLostError)


class RunStopped(RuntimeError):
    """The run cannot go on; the message says why and what was kept (exit status 1)."""


class WorkersLost(RunStopped):
    """Fewer live rollout workers (or reward servers) than the run needs."""


class TimedOut(RunStopped):
    """A unit of work stalled twice on an actor: the message names the actor and the prompts."""


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b(:|$)")


def actor_error_line(e: BaseException) -> str:
    """An actor's own exception, ``Type: message``, as one line (a message of several lines
    joined), without Ray's traceback and colours."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    starts = [i for i, ln in enumerate(lines) if _EXC_LINE.match(ln)]
    if not starts:
        return lines[-1] if lines else type(e).__name__
    return " ".join(lines[starts[-1] :])


def _wait_started(actors: list[Any], timeout_s: float, what: list[str]) -> None:
    """Every actor of ``actors`` has run its constructor, within ``timeout_s``: else one line
    naming the actor with its own message (ConfigError: exit 2)."""
    deadline = time.monotonic() + timeout_s
    for actor, name in zip(actors, what, strict=True):
        try:
            ray.get(actor.pid.remote(), timeout=max(0.0, deadline - time.monotonic()))
        except GetTimeoutError:
            raise ConfigError(
                f"{name} did not start within {timeout_s:g} s (its constructor is still running)"
            ) from None
        except RayActorError as e:
            raise ConfigError(f"{name} could not start: {actor_error_line(e)}") from None


def _alive(actor: Any, timeout_s: float) -> bool:
    """True once ``actor`` answers (after a restart if it had one); False if it is dead for good
    (restarts exhausted) or not back within ``timeout_s``. Right after a death, calls fail for a
    while even when a restart is coming, so a failed call is retried until the deadline unless
    the cluster already reports the actor DEAD."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.pid.remote(), timeout=max(0.1, deadline - time.monotonic()))
            return True
        except GetTimeoutError:
            return False
        except RayActorError:
            if _dead_for_good(actor) or time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def _dead_for_good(actor: Any) -> bool:
    try:  # the GCS's view of the actor: DEAD only once its restarts are exhausted
        from ray._private import state

        return state.actors(actor_id=actor._actor_id.hex()).get("State") == "DEAD"
    except Exception:  # noqa: BLE001 - an unanswerable query is not evidence of death
        return False


@dataclass
class Pending:
    """One in-flight request: its metadata ref, its image and reference refs, and its score refs
    (one per reward)."""

    request: RolloutRequest
    worker: int
    batch: ray.ObjectRef
    images: ray.ObjectRef
    references: ray.ObjectRef
    scores: list[ray.ObjectRef] = field(default_factory=list)
    servers: list[int] = field(default_factory=list)  # per reward: the server that scores it
    launched: float = field(default_factory=time.monotonic)

    @property
    def prompts(self) -> list[str]:
        return [c.prompt for c in self.request.contexts for _ in range(self.request.k)]


class RolloutGroup:
    def __init__(self, cfg: Config, reference_steps: int = 0):
        r = cfg.rollout
        actor = ray.remote(RolloutWorker).options(
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
            max_restarts=r.max_restarts,
            max_task_retries=0,
            runtime_env=cfg.sampler.runtime_env,  # a plug-in sampler's own dependencies
        )
        self.workers: list[Any] = [
            actor.remote(
                i,
                cfg.sampler.model_dump(),
                cfg.policy.model_dump(),
                r.steps,
                cfg.experiment.seed,
                reference_steps=reference_steps,
                prompt_cache=r.prompt_cache,
            )
            for i in range(r.num_workers)
        ]
        self.alive = list(range(r.num_workers))
        self.min_workers, self.restart_timeout_s = r.min_workers, r.restart_timeout_s
        self.reference_steps = reference_steps
        self.timeout_s, self.timeout_per_nfe_s = r.sample_timeout_s, r.sample_timeout_per_nfe_s
        _wait_started(self.workers, r.start_timeout_s, [f"rollout worker {i}" for i in range(r.num_workers)])

    def timeout(self, request: RolloutRequest) -> float:
        """Seconds a worker has for ``request``: a fixed part plus a share per model evaluation."""
        n = len(request.contexts)
        nfe = n * request.k * request.steps + (n * self.reference_steps if self.reference_steps else 0)
        return self.timeout_s + self.timeout_per_nfe_s * nfe

    def check_prompts(self, *prompt_lists: list[str]) -> None:
        """Every prompt is one the backend reads (e.g. the toy's 'class 3' within its classes):
        checked on a worker before training, as one ConfigError naming the prompt."""
        prompts = list(dict.fromkeys(p for ps in prompt_lists for p in ps))
        problem = ray.get(self.workers[self.alive[0]].check_prompts.remote(prompts), timeout=self.timeout_s)
        if problem is not None:
            raise ConfigError(problem)

    def restart(self, worker: int) -> None:
        """Kill a stalled worker; Ray restarts it (its restarts permitting)."""
        ray.kill(self.workers[worker], no_restart=False)

    def _ask(self, method: str) -> Any:
        """The answer of the first worker that gives one (a worker may die during start-up)."""
        for i in list(self.alive):
            try:
                return ray.get(getattr(self.workers[i], method).remote(), timeout=self.timeout_s)
            except RayActorError:
                self.check(i)
        raise WorkersLost("no rollout worker answered")

    def spec(self) -> SamplerSpec:
        return self._ask("spec")

    def policy_kwargs(self) -> dict[str, Any]:
        return self._ask("policy_kwargs")

    def pids(self) -> list[int]:
        return ray.get([self.workers[i].pid.remote() for i in self.alive])

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
        """Split ``contexts`` evenly, one request per live worker, in context order."""
        chunks = [c for c in np.array_split(np.arange(len(contexts)), len(self.alive)) if len(c)]
        return [
            RolloutRequest(
                request_id=uuid.uuid4().hex,
                iteration=iteration,
                version=version,
                contexts=[contexts[i] for i in idx],
                k=k,
                steps=steps,
                mode=mode,
                tau=tau,
                max_concentration=max_concentration,
            )
            for idx in chunks
        ]

    def submit(self, request: RolloutRequest, weights: ray.ObjectRef | None, worker: int) -> Pending:
        batch, images, references = self.workers[worker].sample.options(num_returns=3).remote(request, weights)
        return Pending(request, worker, batch, images, references)

    def check(self, worker: int) -> None:
        """After a fault on ``worker``: keep it if it came back, else drop it from the group."""
        if worker in self.alive and not _alive(self.workers[worker], self.restart_timeout_s):
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
    ):
        """``sampler``: the run's sampler section, for rewards that score against the sampler's own
        model (``uses_sampler_config``, e.g. the toy reward)."""
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
            )
            self.servers.append(
                [actor.remote(spec.name, spec.kwargs, sampler=sampler) for _ in range(spec.num_servers)]
            )
        self.alive = [list(range(len(s))) for s in self.servers]
        self._wait_started()
        #: per reward: whether it compares with the many-step reference (rollout.reference_steps)
        self.needs_reference = [
            ray.get(servers[0].needs_reference.remote(), timeout=spec.timeout_s)
            for spec, servers in zip(specs, self.servers, strict=True)
        ]
        names = [s.name for s in specs]
        # metric keys: the reward's name, numbered where the same reward appears twice
        self.keys = [n if names.count(n) == 1 else f"{n}#{j}" for j, n in enumerate(names)]
        self._turn = 0

    def _wait_started(self) -> None:
        """Every server has built its reward (module, class, call signature, kwargs, model load).

        The reward is resolved inside its server, in its own runtime_env (its module may not even
        import in the learner's environment), so a bad spec shows here, at startup, as one line
        naming the reward: not as an actor traceback at the first scoring call.
        """
        for j, (spec, servers) in enumerate(zip(self.specs, self.servers, strict=True)):
            _wait_started(servers, spec.start_timeout_s, [f"rewards[{j}] ({spec.name!r})"] * len(servers))

    def score(self, p: Pending) -> None:
        """Start scoring ``p``'s images with every reward (round robin over each reward's servers)."""
        p.scores, p.servers = [], []
        for j, servers in enumerate(self.servers):
            alive = self.alive[j]
            i = alive[self._turn % len(alive)]
            p.scores.append(servers[i].score.remote(p.images, p.prompts, p.references))
            p.servers.append(i)
        self._turn += 1

    def restart(self, reward: int, server: int) -> None:
        """Kill a stalled reward server; Ray restarts it (its restarts permitting)."""
        ray.kill(self.servers[reward][server], no_restart=False)

    def check(self) -> None:
        """After a scoring fault: drop servers that stay dead; stop if a reward has none left."""
        for j, servers in enumerate(self.servers):
            self.alive[j] = [i for i in self.alive[j] if _alive(servers[i], self.restart_timeout_s)]
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

    def __init__(self, specs: list[MetricSpec]):
        self.names = [m.name for m in specs]
        self.resamples = [m.noise_resamples for m in specs]
        self.timeouts = [m.timeout_s for m in specs]
        self.servers: list[Any] = [
            ray.remote(MetricServer).options(num_cpus=m.num_cpus, num_gpus=m.num_gpus).remote(m.name, m.kwargs)
            for m in specs
        ]
        # built at startup, not first met at the final evaluation after the whole training
        _wait_started(
            self.servers,
            max(m.start_timeout_s for m in specs) if specs else 1.0,
            [f"eval metric {m.name!r}" for m in specs],
        )

    def measure(self, pending: list[Pending]) -> dict[str, float]:
        """Each metric over the images of ``pending``, and its bootstrap noise as ``<name>_se``."""
        refs = {}
        for name, server, resamples in zip(self.names, self.servers, self.resamples, strict=True):
            feats = [server.features.remote(p.images, p.prompts) for p in pending]
            refs[name] = server.distance_with_se.remote(*feats, resamples=resamples)
        out = {}
        try:
            got = [ray.get(ref, timeout=t) for ref, t in zip(refs.values(), self.timeouts, strict=True)]
        except GetTimeoutError:
            raise TimedOut(
                f"an eval metric of {self.names} did not finish within its timeout_s ({self.timeouts} s)"
            ) from None
        for name, (value, se) in zip(refs, got, strict=True):
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


class _Stalled(Exception):
    """A unit past its time on one actor: ``kind`` 'worker' (``who``: its index) or 'reward'
    (``who``: the reward's index), after ``limit`` seconds."""

    def __init__(self, kind: str, who: int, limit: float):
        super().__init__(kind, who, limit)
        self.kind, self.who, self.limit = kind, who, limit


class Dispatcher:
    """Runs requests as units of work (sample, then score) with re-sends on actor faults and
    time-outs."""

    def __init__(self, rollouts: RolloutGroup, rewards: RewardGroup, max_attempts: int = 5):
        self.rollouts, self.rewards, self.max_attempts = rollouts, rewards, max_attempts
        self.faults = 0  # actor faults survived over the run

    def _launch(self, request: RolloutRequest, weights: ray.ObjectRef | None, turn: int) -> Pending:
        alive = self.rollouts.alive
        p = self.rollouts.submit(request, weights, alive[turn % len(alive)])
        self.rewards.score(p)
        return p

    def _wait(self, p: Pending, queued_on_worker: int) -> tuple[RolloutBatch, list[np.ndarray]]:
        """The unit's batch and scores, or ``_Stalled`` naming the actor past its time.

        Sampling may take the worker's time for each unit queued on it up to this one; scoring,
        its own time from when the images are there (the reward servers score in submission
        order, and every earlier unit's scores have been collected by then)."""
        limit = self.rollouts.timeout(p.request) * queued_on_worker
        try:
            batch = ray.get(p.batch, timeout=max(0.0, p.launched + limit - time.monotonic()))
        except GetTimeoutError:
            raise _Stalled("worker", p.worker, limit) from None
        scores = []
        for j, ref in enumerate(p.scores):
            limit = self.rewards.specs[j].score_timeout(len(p.prompts))
            try:
                scores.append(ray.get(ref, timeout=limit))
            except GetTimeoutError:
                raise _Stalled("reward", j, limit) from None
        return batch, scores

    def run(self, requests: list[RolloutRequest], weights: ray.ObjectRef | None) -> Collected:
        start, faults = time.perf_counter(), 0
        units = [self._launch(r, weights, i) for i, r in enumerate(requests)]
        done: dict[str, tuple[RolloutBatch, list[np.ndarray], Pending]] = {}
        attempts = {r.request_id: 1 for r in requests}
        timeouts = {r.request_id: 0 for r in requests}
        i = 0
        while i < len(units):
            p = units[i]
            rid = p.request.request_id
            # units sent to the same worker before this one and not yet collected run first
            queued = 1 + sum(
                1
                for u in units
                if u is not p and u.worker == p.worker and u.launched < p.launched and u.request.request_id not in done
            )
            try:
                batch, scores = self._wait(p, queued)
            except _Stalled as e:
                kind, who, limit = e.kind, e.who, e.limit
                timeouts[rid] += 1
                name = f"rollout worker {who}" if kind == "worker" else f"reward {self.rewards.specs[who].name!r}"
                doing = "sampling" if kind == "worker" else "scoring"
                setting = "rollout.sample_timeout_s" if kind == "worker" else f"rewards[{who}].timeout_s"
                if timeouts[rid] >= 2:
                    raise TimedOut(
                        f"{name} did not finish {doing} prompts {shown_prompts(p.prompts)} within {limit:.0f} s, twice"
                        f" (request {rid}); if that is its normal time raise {setting}, else look for a hang in it"
                    ) from None
                print(
                    f"warning: {name} did not finish {doing} within {limit:.0f} s: restarting it and re-sending"
                    " the unit"
                )
                faults += 1
                if kind == "worker":
                    self.rollouts.restart(who)
                    self.rollouts.check(who)
                else:
                    self.rewards.restart(who, p.servers[who])
                    self.rewards.check()
                attempts[rid] += 1
                units[i] = self._launch(p.request, weights, p.worker + attempts[rid])
                continue
            except ACTOR_FAULTS as e:
                faults += 1
                if attempts[rid] >= self.max_attempts:
                    raise WorkersLost(f"request {rid} failed {attempts[rid]} times; last error: {e}") from e
                self.rollouts.check(p.worker)
                self.rewards.check()
                attempts[rid] += 1
                units[i] = self._launch(p.request, weights, p.worker + attempts[rid])
                continue
            if rid not in done:  # a request's results are used once, whatever Ray reported
                done[rid] = (batch, scores, p)
            i += 1
        self.faults += faults
        kept = [done[r.request_id] for r in requests]
        return Collected(
            batches=[b for b, _, _ in kept],
            scored=[s for _, s, _ in kept],
            pending=[p for _, _, p in kept],
            seconds=time.perf_counter() - start,
            faults=faults,
        )
