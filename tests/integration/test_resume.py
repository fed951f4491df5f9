"""Resume after the learner dies mid-checkpoint, and from damaged checkpoints: the final weights
equal those of an uninterrupted run, bit for bit."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys

import pytest

from common.codec import read_records
from common.config import ConfigError, load_config
from common.messages import RolloutRecord
from learner import loop
from learner.loop import find_resume, train
from learner.main import main
from learner.metrics import read_jsonl
from tests.conftest import REPO, actors_now, final_weights, interrupt_at, same_weights

pytestmark = pytest.mark.ray

ITERS = 6
FLAGS = [
    "--config",
    "configs/toy.yaml",
    "--experiment.name=r",
    f"--learner.iterations={ITERS}",
    "--learner.checkpoint_every=2",
    "--learner.eval_seeds=2",
    "--learner.progress=false",
    "--learner.global_baseline=false",
    "--learner.plots=false",
    "--ray.num_cpus=2",
    "--rollout.num_workers=1",
    "--rollout.contexts_per_iter=4",
    "--policy.widths=[8,8,16,16]",
    "--policy.groups=4",
    "--policy.attn_heads=2",
    "--policy.head_hidden=16",
]


def _cli(args, timeout=300):
    env = dict(os.environ)  # token auth, as tests/conftest.py set it
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the killed driver's local Ray cluster goes with its group
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = train(load_config(FLAGS + [f"--experiment.output_dir={out}"]))
    return final_weights(res.run_dir)


def test_learner_killed_while_writing_a_checkpoint_resumes_exactly(uninterrupted, tmp_path, capsys):
    flags = FLAGS + [f"--experiment.output_dir={tmp_path}"]
    code, out = _cli([sys.executable, "-m", "tests.integration.crash_in_checkpoint", "2", "KILL", *flags])
    assert code == -signal.SIGKILL, out[-2000:]
    ckdir = tmp_path / "r" / "checkpoints"
    assert (ckdir / "latest").read_text().strip() == "ckpt-00000002"
    assert [p for p in ckdir.iterdir() if ".tmp-" in p.name], "the torn checkpoint is a temporary, never renamed"
    print("\ninjected 1 SIGKILL of the learner while it wrote checkpoint 4")

    capsys.readouterr()
    assert main([*flags, "--resume=auto"]) == 0  # the re-submitted job (in this process: its Ray is up)
    out = capsys.readouterr().out
    assert "resumed from" in out and "ckpt-00000002" in out
    w = final_weights(tmp_path / "r")
    assert same_weights(uninterrupted, w)
    recs = list(read_records(tmp_path / "r" / "rollouts.msgpack", RolloutRecord))
    ids = [(r.iteration, r.context, r.k) for r in recs]
    assert len(ids) == ITERS * 4 * 2 and len(set(ids)) == len(ids), "a rollout was lost or logged twice"


def test_a_run_sent_sigterm_ends_in_one_line_releases_its_dir_and_resumes_exactly(uninterrupted, tmp_path, capsys):
    """SIGTERM (``ray job stop``, a pod evicted or preempted) used to meet Ray's handlers: a stack
    dump from its C++ core and exit 134. Now the run ends as on Ctrl-C, here half-way through its
    second checkpoint: its actors and Ray stopped, the lock released, one line saying what is kept,
    exit 143; ``--resume auto`` then ends with the uninterrupted run's weights."""
    flags = FLAGS + [f"--experiment.output_dir={tmp_path}"]
    code, out = _cli([sys.executable, "-m", "tests.integration.crash_in_checkpoint", "2", "TERM", *flags])
    run = tmp_path / "r"
    assert code == 143, out[-2000:]
    assert out.strip().splitlines()[-1] == (
        f"terminated: the run in {run} keeps its checkpoint ckpt-00000002; --resume auto continues it from there"
    )
    assert "SIGTERM received" not in out and "Traceback" not in out, out[-2000:]
    assert not (run / ".lock").exists(), "the run dir is released"
    capsys.readouterr()
    assert main([*flags, "--resume=auto"]) == 0
    out, err = capsys.readouterr()
    assert "warning: taking over" not in out + err and "resumed from" in out and "ckpt-00000002" in out
    assert same_weights(uninterrupted, final_weights(run))


def test_a_run_sent_sigterm_while_it_waits_for_its_rollouts_ends_within_seconds(ray_local, tmp_path):
    """The rollouts the learner waited for were not given up: the driver ended only once their
    iteration had (here a reward that never returns: its time-out, 600 s), past ``ray job stop``'s 3 s
    and Kubernetes' grace period before SIGKILL, which left the lock."""
    import time

    flags = FLAGS + [
        f"--experiment.output_dir={tmp_path}",
        "--rewards=[{name: 'tests.integration.rewards_for_tests:AlwaysHang', timeout_s: 600}]",
    ]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "learner.main", *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # the loop has started once the policy is described
            lines.append(line)
            if "parameters" in line:
                break
        time.sleep(4)  # the first rollouts sampled, their scoring hung
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + out
    assert proc.returncode == 143, out[-2000:]
    assert took < 20, f"{took:.0f} s from SIGTERM to exit"
    assert out.strip().splitlines()[-1].startswith("terminated: "), out[-2000:]
    assert not (tmp_path / "r" / ".lock").exists()


def test_a_resume_from_an_earlier_checkpoint_sets_the_later_ones_aside(uninterrupted, tmp_path, capsys):
    """--resume from ckpt-2 of a run that had reached ckpt-6 trims its logs to iteration 2, but the
    later checkpoints stayed: --resume auto then took ckpt-6 (the highest), whose logs were gone,
    and was refused with the advice to --overwrite a run that could be resumed."""
    flags = FLAGS + [f"--experiment.output_dir={tmp_path}"]
    train(load_config(flags))
    ckdir = tmp_path / "r" / "checkpoints"
    train(load_config(flags + [f"--resume={ckdir / 'ckpt-00000002'}", "--learner.iterations=4"]))
    (aside,) = ckdir.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["ckpt-00000004", "ckpt-00000006"]
    assert f"the later checkpoints of the run are moved to {aside}" in capsys.readouterr().out
    assert [p.name for p in sorted(ckdir.glob("ckpt-*"))] == ["ckpt-00000002", "ckpt-00000004"]
    res = train(load_config(flags + ["--resume=auto"]))  # continues the new line, from its ckpt-4
    assert same_weights(uninterrupted, final_weights(res.run_dir))


def test_damaged_latest_checkpoint_falls_back_to_the_previous(ray_local, uninterrupted, tmp_path):
    flags = FLAGS + [f"--experiment.output_dir={tmp_path}"]
    train(load_config(flags[:] + ["--learner.iterations=4"]))
    print("\ninjected 1 damaged checkpoint (truncated weights of the latest)")
    ckdir = tmp_path / "r" / "checkpoints"
    weights = ckdir / "ckpt-00000004" / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])  # truncated
    res = train(load_config(flags + ["--resume=auto"]))
    w = final_weights(res.run_dir)
    assert same_weights(uninterrupted, w)


def test_resume_refuses_a_config_that_matters(ray_local, tmp_path):
    flags = FLAGS + [f"--experiment.output_dir={tmp_path}", "--learner.iterations=2"]
    train(load_config(flags))
    with pytest.raises(ValueError, match=r"config differs in learner\.lr"):
        train(load_config(flags + ["--resume=auto", "--learner.lr=0.1", "--learner.iterations=4"]))
    # scale and evaluation may change; --resume_changes=true allows the rest
    train(load_config(flags + ["--resume=auto", "--rollout.num_workers=2", "--learner.iterations=3"]))
    train(load_config(flags + ["--resume=auto", "--learner.lr=0.1", "--learner.iterations=4", "--resume_changes=true"]))
    # but not across the policy's shape: refused before anything starts, the run left as it was
    before = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    reshaped = ["--resume=auto", "--rollout.steps=3", "--learner.iterations=6", "--resume_changes=true"]
    with pytest.raises(ConfigError, match=r"rollout\.steps \(4 -> 3\) changes the policy's shape"):
        find_resume(load_config(flags + reshaped))
    with pytest.raises(ConfigError, match=r"changes the policy's shape"):
        train(load_config(flags + reshaped))
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes() == before


def test_a_resume_across_a_sampler_setting_that_reshapes_the_policy_leaves_the_run_as_it_was(
    ray_local, tmp_path, capsys
):
    """A sampler setting that changes the policy's inputs (the toy's token_dim; digits' emb_dim; an
    SD model of another family) is no field a resume compares by name: with --resume_changes
    the global baseline trained on, then the checkpoint's weights were refused, after the logs
    had been trimmed and config.yaml replaced by the refused config (generate then failed in a
    traceback, a plain --resume auto was refused)."""
    flags = [*FLAGS, f"--experiment.output_dir={tmp_path}", "--learner.iterations=2", "--learner.global_baseline=true"]
    assert main(flags) == 0
    run = tmp_path / "r"
    before = {
        str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "tb" not in p.parts
    }
    capsys.readouterr()
    reshaped = ["--resume=auto", "--resume_changes=true", "--sampler.toy.token_dim=32", "--learner.iterations=4"]
    assert main([*flags, *reshaped]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    checkpoint = run / "checkpoints" / "ckpt-00000002"
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint {checkpoint} holds another policy's weights")
    assert "a sampler setting that shapes the policy's inputs changed since" in err[0]
    after = {
        str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "tb" not in p.parts
    }
    assert after == before, "nothing of the run changed: its logs, config, checkpoints, the global baseline's"
    assert main([*flags, "--resume=auto", "--learner.iterations=3"]) == 0  # the run goes on as it was


def test_resume_from_checkpoints_on_an_fsspec_url(uninterrupted, tmp_path):
    flags = FLAGS + [f"--experiment.output_dir={tmp_path}", f"--learner.checkpoint_dir=memory://ck-{tmp_path.name}"]
    train(load_config(flags + ["--learner.iterations=3"]))
    assert not (tmp_path / "r" / "checkpoints").exists()
    res = train(load_config(flags + ["--resume=auto"]))
    w = final_weights(res.run_dir)
    assert same_weights(uninterrupted, w)


def _logged(run):
    """A run's rollout log and its metrics rows, less the timings."""
    rows = [
        {k: v for k, v in row.items() if k.startswith(("learner/", "policy/", "rollout/reward"))}
        for row in read_jsonl(run / "metrics.jsonl")
    ]
    return list(read_records(run / "rollouts.msgpack", RolloutRecord)), rows


def test_a_named_checkpoint_resumes_its_run_or_starts_a_new_run_from_it(ray_local, tmp_path, capsys):
    """``--resume <checkpoint>`` with the global baseline on (the default) was refused, after Ray
    and the actors had started, as differing in experiment.name, learner.lr and policy.variant:
    the global baseline was sent the run's checkpoint (with --resume_changes it would have resumed
    the global schedule from it). Another run's checkpoint could not be resumed at all: the advised
    --resume_changes then failed on the rollout log, and refused runs left empty run dirs.

    Now a checkpoint of the run continues it (its global baseline from its own latest checkpoint),
    and another run's starts a new run from it: that run's logs up to the checkpoint copied, its
    global baseline too, the new run's first checkpoint written at once; both end with the
    uninterrupted run's weights and logs, bit for bit. Mistakes are one line before anything
    starts, and leave no directory behind."""
    flags = [*FLAGS, f"--experiment.output_dir={tmp_path}", "--learner.global_baseline=true", "--learner.iterations=4"]
    run, new = tmp_path / "r", tmp_path / "new"
    assert main(flags) == 0
    weights, global_weights, logged = final_weights(run), final_weights(run / "global"), _logged(run)
    ckpt = run / "checkpoints" / "ckpt-00000002"
    capsys.readouterr()

    assert main([*flags, f"--resume={ckpt}"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / 'global' / 'checkpoints' / 'ckpt-00000004'} at iteration 4" in out
    assert f"resumed from {ckpt} at iteration 2" in out
    assert same_weights(weights, final_weights(run)) and _logged(run) == logged

    assert main([*flags, "--experiment.name=new", f"--resume={ckpt}"]) == 0
    out = capsys.readouterr().out
    assert f"{new} starts at iteration 2, its logs up to there copied from {run}" in out
    assert same_weights(weights, final_weights(new)) and same_weights(global_weights, final_weights(new / "global"))
    assert _logged(new) == logged and (new / "tb").is_dir()
    assert sorted(p.name for p in (new / "checkpoints").glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000004"]
    assert same_weights(weights, final_weights(run)) and _logged(run) == logged, "the other run is only read"

    # a run whose rollout log was deleted (it is the large one): refused with "resume from an earlier
    # checkpoint of that run", which had no log either; now its metrics are copied, its rollouts begin here
    (run / "rollouts.msgpack").rename(tmp_path / "aside.msgpack")
    assert main([*flags, "--experiment.name=cut", f"--resume={ckpt}"]) == 0
    (tmp_path / "aside.msgpack").rename(run / "rollouts.msgpack")
    assert (
        f"{tmp_path / 'cut'} starts at iteration 2, its metrics.jsonl up to there copied from {run} (its"
        " rollouts.msgpack not found: the new run's begins here)"
    ) in capsys.readouterr().out
    cut = _logged(tmp_path / "cut")
    assert cut[1] == logged[1], "the metrics as the run's"
    assert cut[0] == [r for r in logged[0] if r.iteration >= 2], "the rollouts from the checkpoint on"
    assert same_weights(weights, final_weights(tmp_path / "cut"))

    actors = actors_now()
    for extra, needle in [
        (["--experiment.name=new", f"--resume={ckpt}"], f"but {new} already holds a run"),
        ([f"--resume={run / 'global' / 'checkpoints' / 'ckpt-00000004'}"], "a checkpoint of the learned global"),
        (["--experiment.name=other", "--experiment.seed=3", f"--resume={ckpt}"], "differs in experiment.seed"),
        (["--learner.iterations=1", f"--resume={ckpt}"], "the checkpoint is of iteration 2, past learner.iterations=1"),
        (["--resume=memory://nowhere/ckpt-00000002"], "--resume memory://nowhere/ckpt-00000002: no such checkpoint"),
    ]:
        assert main([*flags, *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert actors_now() == actors, "refused before any actor started"
    assert not (tmp_path / "other").exists(), "a refused run leaves no run dir"


def test_a_run_stopped_while_its_global_baseline_trains_continues_with_resume_auto(
    uninterrupted, tmp_path, capsys, monkeypatch
):
    """A job preempted while the learned global schedule trained (the first phase of every run
    with the global baseline, the default) left only ``global/`` in its run dir; the re-submitted
    job's ``--resume auto`` was refused ('no usable checkpoint ... holds a run (global); pass
    --overwrite'), and the interruption said '--overwrite starts it again'. Now both continue
    it: the global baseline from its checkpoint, then the run's policy, which ends with the
    weights of a run never stopped."""
    flags, run = [*FLAGS, f"--experiment.output_dir={tmp_path}", "--learner.global_baseline=true"], tmp_path / "r"
    interrupt_at(monkeypatch, loop, "reinforce_step", at=3)  # the global baseline's third update
    assert main(flags) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted: the run in {run} keeps its global baseline's checkpoint ckpt-00000002; --resume auto continues"
        " it from there"
    ]
    monkeypatch.undo()
    assert main([*flags, "--resume=auto"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / 'global' / 'checkpoints' / 'ckpt-00000002'} at iteration 2" in out
    assert same_weights(uninterrupted, final_weights(run))


def test_resume_auto_and_new_runs_from_checkpoints_take_what_they_find_for_what_it_is(
    uninterrupted, tmp_path, capsys, monkeypatch
):
    """What --resume meets in the run dir and beside it:
    - a run stopped before its first checkpoint: --resume auto (what a re-submitted job runs) was
      refused, advising --overwrite; it starts the run again;
    - a run resumed with another learner.checkpoint_dir: its own checkpoint, in the dir it had,
      was taken for another run's; --resume auto in the new dir would find none: it names the
      run's checkpoints instead;
    - a new run from a checkpoint copied out of a run whose name has since been taken by another
      run (--overwrite, another seed): the logs and global baseline of that other run were copied;
      they are not, and the new run ends with the first run's weights;
    - a new run from a checkpoint stopped before its first checkpoint: the same command (as the
      stop said) was refused as holding a run; it starts it again."""
    flags, run = [*FLAGS, f"--experiment.output_dir={tmp_path}"], tmp_path / "r"

    interrupt_at(monkeypatch, loop, "reinforce_step", at=2)  # iteration 1 logged, its checkpoint due after 2
    assert main(flags) == 130
    assert capsys.readouterr().err.strip().endswith("had written no checkpoint yet; --resume auto starts it again")
    assert main([*flags, "--resume=auto"]) == 0
    assert f"{run} stopped before its first checkpoint; starting it again" in capsys.readouterr().out
    assert same_weights(uninterrupted, final_weights(run))

    moved = [f"--learner.checkpoint_dir={tmp_path / 'ck'}"]
    assert main([*flags, *moved, "--resume=auto"]) == 2
    assert f"but the run's checkpoints are in {run / 'checkpoints'}" in capsys.readouterr().err
    assert main([*flags, *moved, f"--resume={run / 'checkpoints' / 'ckpt-00000004'}"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "a new run" not in out and (tmp_path / "ck" / "ckpt-00000006").is_dir()
    assert same_weights(uninterrupted, final_weights(run))

    loose = tmp_path / "loose" / "ckpt-00000002"
    shutil.copytree(run / "checkpoints" / "ckpt-00000002", loose)
    assert main([*flags, "--overwrite", "--experiment.seed=1", "--learner.iterations=2"]) == 0  # the name, retaken
    capsys.readouterr()
    assert main([*flags, "--experiment.name=f", f"--resume={loose}"]) == 0
    assert f"{tmp_path / 'f'} starts at iteration 2, that run's logs not found" in capsys.readouterr().out
    assert same_weights(uninterrupted, final_weights(tmp_path / "f"))
    assert [row["step"] for row in read_jsonl(tmp_path / "f" / "metrics.jsonl")][0] == 3

    new = [*flags, "--experiment.name=h", f"--resume={loose}"]
    interrupt_at(monkeypatch, loop, "load_checkpoint")  # the new run's logs and config written, not its checkpoint
    assert main(new) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith("had not reached its first checkpoint; the same command starts it again"), err
    assert main(new) == 0
    assert same_weights(uninterrupted, final_weights(tmp_path / "h"))


def test_a_resume_rebuilds_its_own_tensorboard_events_and_keeps_an_evaluations(tmp_path):
    """tb/ was removed whole on resume and rebuilt from metrics.jsonl: the figures learner.evaluate
    had logged into the run's TensorBoard (reward_vs_L, digits_fd_vs_L) were gone, silently."""
    (tmp_path / "tb" / "evaluation").mkdir(parents=True)
    (tmp_path / "tb" / "events.out.tfevents.old").write_text("the run's events, past the checkpoint")
    (tmp_path / "tb" / "evaluation" / "events.out.tfevents.ev").write_text("an evaluation's figures")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 1.0}\n{"step": 2, "x": 2.0}\n{"step": 3, "x": 3.0}\n')
    loop._trim_logs(tmp_path, {"iteration": 2})
    assert (tmp_path / "tb" / "evaluation" / "events.out.tfevents.ev").read_text() == "an evaluation's figures"
    assert not (tmp_path / "tb" / "events.out.tfevents.old").exists()
    (rebuilt,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    assert rebuilt.stat().st_size > 0 and [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
