"""Entry point: ``python -m learner.main [--config PATH] [--section.field=value ...]``.

Also what ``ray job submit -- python -m learner.main ...`` runs on a cluster. A user's config
mistake exits with status 2 and one readable message; ``--help`` lists every field.

With ``learner.global_baseline`` (on by default) the run first trains a ``global`` policy (one
learned schedule for every context, the paper's "learned global schedule" baseline) in
``<run dir>/global``, then the configured policy, on the same rollout workers and reward servers
(each model loads once), and the final table compares the default schedule, the learned global
schedule and the learned instance-level schedules.
"""

from __future__ import annotations

import errno
import sys
from typing import TYPE_CHECKING

from common.signals import end_on_sigterm, how_stopped, loading

with loading(__name__):
    from common.config import Config, ConfigError, load_config
    from learner.groups import RunStopped

if TYPE_CHECKING:
    from common.checkpoint import CheckpointStore
    from learner.loop import Resume

#: What storage says when a run cannot go on writing (a full disk, a quota, a mount that became
#: read-only or failed): one line and what is kept, not a traceback.
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


def run(cfg: Config) -> None:
    import ray

    from common.checkpoint import check_policy_fits
    from common.rundir import claim
    from learner.evaluate import GLOBAL, Schedule
    from learner.loop import check_before_start, find_resume, init_ray, start_actors, train

    check_before_start(cfg)  # before the run dir is claimed (--overwrite clears it)
    owner = claim(cfg)  # the whole run dir, the global run's too, is this process's until it ends
    started = False
    actors = None
    restore_sigterm = None
    try:
        resume = find_resume(cfg)  # a refusal comes before Ray starts
        g = global_run(cfg)
        if g is not None:
            g.resume = _global_resume(cfg, g, resume)
            g_resume = find_resume(g)
        started = init_ray(cfg.ray)
        restore_sigterm = end_on_sigterm()
        to_beat = {}
        if g is not None:
            actors = start_actors(cfg)  # both policies are trained on them: each model loads once
            if resume is not None:  # the run's checkpoint fits its policy: found before the global baseline trains
                check_policy_fits(resume.checkpoint, actors.rollouts.policy_kwargs())
            owner.clear_earlier()  # --overwrite: the actors are up; the global baseline's dir is cleared for it
            print("training the learned global schedule (the baseline to beat) ...")
            res = train(g, final_eval=False, actors=actors, resume=g_resume, within=owner)
            to_beat[GLOBAL] = Schedule("fixed", res.policy.global_mean_tau())
        train(cfg, baselines_to_beat=to_beat, owner=owner, actors=actors, resume=resume)
    finally:
        if actors is not None:
            actors.stop()
        if started:
            ray.shutdown()
        owner.release()
        if restore_sigterm is not None:
            restore_sigterm()


def global_run(cfg: Config) -> Config | None:
    """The run of the learned global schedule that ``cfg`` trains first, in ``<run dir>/global``
    (None where it trains none): the same config but the policy's variant and learning rate."""
    if not cfg.trains_global_first:
        return None
    g = cfg.model_copy(deep=True)
    g.policy.variant = "global"
    g.learner.lr = cfg.learner.global_lr
    g.experiment.name = f"{cfg.experiment.name}/global"
    g.resume = None  # set by the caller: the global run resumes from its own checkpoints
    g.overwrite = False  # the run clears its run dir, the global one's too, where asked to (RunDir.clear_earlier)
    if cfg.learner.checkpoint_dir is not None:  # its checkpoints apart from the main run's
        g.learner.checkpoint_dir = cfg.learner.checkpoint_dir.rstrip("/") + "/global"
    return g


def _store(cfg: Config) -> CheckpointStore:
    """The store of ``cfg``'s own checkpoints."""
    from common.checkpoint import CheckpointStore

    return CheckpointStore(cfg.checkpoint_root)


def _global_resume(cfg: Config, g: Config, resume: Resume | None) -> str | None:
    """What the global baseline ``g`` of a resumed run resumes from: its own latest checkpoint (it
    is trained before the run's policy: a run stopped while it trained has only its checkpoints),
    or, where the run starts from another run's checkpoint, the latest of that run's global
    baseline (None where there is none: it is trained afresh)."""
    if cfg.resume is None:
        return None
    if resume is None or not resume.fork or _store(g).names():
        return "auto"
    where = resume.global_checkpoints
    from common.checkpoint import CheckpointStore

    names = CheckpointStore(where).names() if where is not None else []
    return f"{where}/{names[-1]}" if names else None


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in cfg.never_in_force():
        print(f"warning: {warning}")
    try:
        run(cfg)
    except ConfigError as e:  # found at startup: e.g. a reward that cannot be built in its server
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # stopped during training: what was learned is in the latest checkpoint
        print(f"error: {e}; {_what_is_kept(cfg)}", file=sys.stderr)
        return 1
    except OSError as e:
        from ray.exceptions import GetTimeoutError

        if isinstance(e, GetTimeoutError):  # an actor's answer awaited past its time where no call site says whose
            print(
                f"error: an actor did not answer in time ({e}); the run stopped: {_what_is_kept(cfg)}", file=sys.stderr
            )
            return 1
        if e.errno not in STORAGE_ERRORS:
            raise
        where = f"cannot write {e.filename}" if e.filename else "storage failed"
        print(f"error: {where}: {e.strerror}; the run stopped: {_what_is_kept(cfg)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ray shut down and the run dir released on the way out
        word, code = how_stopped(e)
        print(f"{word}: {_what_is_kept(cfg)}", file=sys.stderr)
        return code
    return 0


def _what_is_kept(cfg: Config) -> str:
    """What an interrupted run leaves to continue from, in one line."""
    try:
        names = _store(cfg).names()
        g = global_run(cfg)
        global_names = _store(g).names() if g is not None and not names else []
        forked = cfg.resume not in (None, "auto") and not _store(cfg).holds(str(cfg.resume))
    except Exception:  # noqa: BLE001 - storage out of reach: say what can be said without it
        names, global_names, forked = [], [], False
    if names:
        return f"the run in {cfg.run_dir} keeps its checkpoint {names[-1]}; --resume auto continues it from there"
    if forked:  # its first checkpoint, the other run's copied, was not written yet
        return f"the run in {cfg.run_dir} had not reached its first checkpoint; the same command starts it again"
    if global_names:  # stopped while the global baseline trained: it continues from its checkpoint
        return (
            f"the run in {cfg.run_dir} keeps its global baseline's checkpoint {global_names[-1]}; --resume auto"
            " continues it from there"
        )
    from common.rundir import artefacts

    if not artefacts(cfg.run_dir):  # stopped while starting: the same command starts it, no --overwrite needed
        return f"the run in {cfg.run_dir} had not begun; the same command starts it"
    return f"the run in {cfg.run_dir} had written no checkpoint yet; --resume auto starts it again"


if __name__ == "__main__":
    sys.exit(main())
