"""Nothing hangs and nothing diverged is kept: stalled rewards are timed out, restarted and
re-sent; a repeated stall, an actor that cannot start and a diverged update each stop the run
with one line."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.codec import read_records
from common.config import ConfigError, MetricSpec, load_config
from common.messages import RolloutRecord
from learner import groups, loop
from learner.groups import TimedOut
from learner.loop import Diverged, train
from learner.main import main
from learner.metrics import read_jsonl
from tests.conftest import REPO, actors_now, interrupt_at, left_alive, live_pids, tiny_overrides

pytestmark = pytest.mark.ray

HANG = "tests.integration.rewards_for_tests"
#: configs/toy.yaml with one rollout worker (a test of several says so)
TOY = [f"--config={REPO / 'configs' / 'toy.yaml'}", "--rollout.num_workers=1"]


def _cfg(tmp_path, reward: dict, **sections):
    over = tiny_overrides(tmp_path, rewards=[{"num_cpus": 0.5, **reward}], **sections)
    return load_config([], **over)


def test_a_reward_that_never_starts_is_one_line(ray_local, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"rewards\[0\] \('.*HangInInit'\) did not start within 3 s"):
        train(_cfg(tmp_path, {"name": f"{HANG}:HangInInit", "start_timeout_s": 3}))
    assert time.perf_counter() - t0 < 60


def test_a_stalled_scoring_call_is_restarted_and_resent_exactly_once(ray_local, tmp_path):
    marker = tmp_path / "stalled-once"
    cfg = _cfg(
        tmp_path,
        {"name": f"{HANG}:HangOnce", "kwargs": {"marker": str(marker)}, "timeout_s": 3, "timeout_per_image_s": 0.0},
        learner={"iterations": 3},
    )
    t0 = time.perf_counter()
    res = train(cfg)
    assert marker.exists(), "the reward did stall once"
    faults = sum(m.get("system/faults", 0) for m in read_jsonl(res.run_dir / "metrics.jsonl"))
    assert faults >= 1
    ids = [(r.iteration, r.context, r.k) for r in read_records(res.run_dir / "rollouts.msgpack", RolloutRecord)]
    assert len(ids) == 3 * 4 * 2 and len(set(ids)) == len(ids), "a rollout was lost or used twice"
    assert time.perf_counter() - t0 < 120


def test_a_reward_that_always_stalls_stops_the_run_naming_reward_and_prompts(ray_local, tmp_path):
    cfg = _cfg(tmp_path, {"name": f"{HANG}:AlwaysHang", "timeout_s": 2, "timeout_per_image_s": 0.0})
    t0, before = time.perf_counter(), actors_now()
    with pytest.raises(
        TimedOut, match=r"reward '.*AlwaysHang' did not finish scoring prompts \['class .*within 2 s, twice"
    ):
        train(cfg)
    assert time.perf_counter() - t0 < 120
    assert left_alive(before) == [], "the stalled server and the workers are stopped with the run"


def test_a_worker_that_cannot_start_is_one_line_with_its_own_message(ray_local, tmp_path, capsys):
    code = main(
        [
            f"--experiment.output_dir={tmp_path}",
            "--sampler.backend=sd",
            f"--sampler.sd.model={tmp_path / 'no-model'}",
            "--sampler.sd.local_files_only=true",
            '--rewards=[{"name": "tests.integration.rewards_for_tests:NegativeNorm"}]',
            "--learner.eval_metrics=[]",
            "--learner.global_baseline=false",
            "--rollout.num_workers=1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: rollout worker 0 could not start: ") and "no-model" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_grown_worker_that_finds_no_room_is_given_up_and_the_run_goes_on(ray_local, tmp_path, capsys, monkeypatch):
    """Scale-out (rollout.max_workers) started a worker where the cluster's free sum had room, then
    waited for it on the training thread for rollout.start_timeout_s (600 s) and stopped a healthy
    run when it was not placed (another job's actors took the room; a GPU share that fits the free
    sum but no device). Here the free room is overstated: the extra worker asks for more CPUs than
    are free, and is never placed."""
    real, grow = groups.ray.available_resources, groups.RolloutGroup.grow
    monkeypatch.setattr(groups.ray, "available_resources", lambda: {**real(), "CPU": 64.0})

    def quick(self):  # the first worker had its time; a grown one has 1 s
        self.start_timeout_s = 1.0
        time.sleep(0.2)  # the toy's iterations take less than the start time: let it run out
        return grow(self)

    monkeypatch.setattr(groups.RolloutGroup, "grow", quick)
    over = tiny_overrides(
        tmp_path,
        rollout={"num_workers": 1, "max_workers": 2, "num_cpus": 3.0, "contexts_per_iter": 4},
        learner={"iterations": 12, "checkpoint_every": 12},
    )
    t0 = time.monotonic()
    res = train(load_config([], **over), final_eval=False)
    out = capsys.readouterr().out
    assert res.iterations == 12 and time.monotonic() - t0 < 120
    assert re.search(
        r"warning: rollout worker 1 did not start within rollout.start_timeout_s=1 s \(.*\); given up, the run goes on"
        r" with 1 workers",
        out,
    ), out[-2000:]
    rows = [m for m in read_jsonl(res.run_dir / "metrics.jsonl") if "system/workers_alive" in m]
    assert {m["system/workers_alive"] for m in rows} == {1.0}
    assert out.count("did not start within") == 1, "its slot is kept: not started again every iteration"


def test_an_actor_that_does_not_answer_a_question_is_one_line(ray_local, tmp_path, capsys):
    """The control-plane calls (the workers' prompt check, a reward's needs, a metric's distance)
    let Ray's GetTimeoutError through: a 42-line traceback, exit 1."""
    slow = [  # a worker slow to answer: not a race with 1 ms, however idle the machine
        "--sampler.backend=tests.integration.samplers_for_tests:SlowToAnswer",
        '--rewards=[{"name": "tests.integration.rewards_for_tests:NegativeNorm"}]',
    ]
    flags = [*TOY, f"--experiment.output_dir={tmp_path}", *slow]
    code = main([*flags, "--rollout.sample_timeout_s=0.001", "--learner.global_baseline=false"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.match(
        r"error: rollout worker \d+ did not answer (\w+\(\) )?within 0.001 s \(rollout.sample_timeout_s\);", err
    )


def test_actors_that_cannot_start_are_one_line_on_the_terminal_not_rays_tracebacks(tmp_path):
    """Ray prints an error raised in an actor's constructor, with its whole traceback, on the
    driver's terminal (log_to_driver, on by default, unlike the tests' own cluster): the run's one
    line came after 20 lines here, and after a hundred for a model that cannot be downloaded. The
    run's actors keep that error for their first call (common.actors), and only the line is left.
    Here the worker (no such model) and the reward server (a reward given an argument it does not
    take) both fail."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "learner.main",
            *TOY,
            f"--experiment.output_dir={tmp_path}",
            "--sampler.backend=sd",
            f"--sampler.sd.model={tmp_path / 'no-model'}",
            "--sampler.sd.local_files_only=true",
            "--rewards=[{name: 'tests.integration.rewards_for_tests:NegativeNorm', kwargs: {shift: 1}}]",
            "--ray.num_cpus=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "Started a local Ray instance" not in ln]
    assert lines == [
        "error: rewards[0] ('tests.integration.rewards_for_tests:NegativeNorm') could not start: ValueError: reward"
        " 'tests.integration.rewards_for_tests:NegativeNorm': bad kwargs ['shift']: got an unexpected keyword argument"
        " 'shift'"
    ], res.stderr


def test_an_eval_metric_that_cannot_start_stops_the_run_before_the_global_baseline_trains(ray_local, tmp_path, capsys):
    """The eval metrics' servers start with the workers and rewards: a metric that cannot be built
    is one line at startup, not after the whole global baseline has trained; what did start is
    stopped."""
    before = actors_now()
    code = main(
        [
            *TOY,
            f"--experiment.output_dir={tmp_path}",
            "--learner.iterations=2",
            # an import path: its server imports it (an unknown registered name is refused before Ray starts)
            '--learner.eval_metrics=[{"name": "tests.integration.rewards_for_tests:NoSuchMetric"}]',
        ]
    )
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("error: eval metric 'tests.integration.rewards_for_tests:NoSuchMetric' could not start: "), (
        err
    )
    assert len(err.strip().splitlines()) == 1, err
    assert "training the learned global schedule" not in out, out
    assert not (tmp_path / "toy" / "global" / "metrics.jsonl").exists(), "the global baseline did not train"
    assert left_alive(before) == [], "the reward server and the workers that started are stopped"


def test_a_reward_that_raises_is_one_line_and_exit_1_not_a_ray_traceback(ray_local, tmp_path, capsys):
    """A reward's own error (here a kwarg of the wrong type, met at the first scoring call) stops
    the step: one line naming the reward, its exception and the prompts, exit status 1, not the
    RayTaskError traceback of the dispatcher's thread."""
    code = main(
        [
            *TOY,
            f"--experiment.output_dir={tmp_path}",
            "--learner.global_baseline=false",
            '--rewards=[{"name": "toy", "kwargs": {"floor": "x"}}]',
        ]
    )
    everything = capsys.readouterr().err
    err = everything.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in everything, everything
    assert err.startswith("error: reward 'toy' raised RuntimeError: reward 'toy' failed on prompts ['class "), err
    assert "UFuncTypeError" in err and "; the step stopped, nothing of it used; " in err, err
    assert err.endswith(f"the run in {tmp_path / 'toy'} had not begun; the same command starts it")
    assert not (tmp_path / "toy" / "checkpoints").exists()


def test_a_run_a_reward_stopped_says_what_it_keeps(ray_local, tmp_path, capsys):
    """A reward that fails after some checkpoints: its line said the step stopped, and nothing of
    the checkpoint the run keeps, which Ctrl-C, SIGTERM and a full disk all name."""
    reward = "[{name: toy, kwargs: {floor: -10.0}}, {name: 'tests.integration.rewards_for_tests:RaisesOnCall',"
    reward += " kwargs: {after: 6}, weight: 0.0}]"
    flags = [*TOY, f"--experiment.output_dir={tmp_path}"]
    flags += ["--learner.global_baseline=false", "--learner.iterations=8", "--learner.checkpoint_every=2"]
    assert main([*flags, f"--rewards={reward}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    kept = sorted(p.name for p in (tmp_path / "toy" / "checkpoints").glob("ckpt-*"))[-1]
    assert "raised RuntimeError" in err and err.endswith(
        f"; the step stopped, nothing of it used; the run in {tmp_path / 'toy'} keeps its checkpoint {kept};"
        " --resume auto continues it from there"
    ), err


def test_a_worker_a_joined_cluster_has_no_room_for_is_announced_and_named(ray_local, tmp_path, capsys, monkeypatch):
    """On a cluster the run joined (it may grow: an autoscaler, a node joining), a worker that
    asks for more than the cluster has waits for room: not silently, nor a constructor said to
    be running. Its wait is announced, and its timeout names what it asks for."""
    monkeypatch.setattr(groups, "UNPLACED_NOTICE_S", 1.0)
    monkeypatch.setattr(groups, "own_cluster", lambda: False)
    code = main(
        [
            *TOY,
            f"--experiment.output_dir={tmp_path}",
            "--learner.global_baseline=false",
            "--rollout.num_cpus=64",
            "--rollout.start_timeout_s=4",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 2, err
    room = "the cluster has no room for it (it asks for 64 CPU; the cluster has "
    assert f"rollout worker 0 is waiting: {room}" in out and "it gives up after 4 s" in out, out
    assert err.startswith(f"error: rollout worker 0 did not start within 4 s: {room}"), err
    assert re.search(r"the cluster has [\d.]+ of 4 CPU free\)$", err.strip()), err
    assert len(err.strip().splitlines()) == 1
    # an actor that would fit the cluster: taken resources, or a runtime_env being installed
    assert groups._no_room({"CPU": 0.5, "GPU": 0.0}).startswith(
        "it has no process yet: the cluster's free resources are taken, or its runtime_env is still being set up"
        " (it asks for 0.5 CPU; the cluster has "
    )


def test_actors_that_cannot_fit_in_the_runs_own_cluster_stop_it_at_once(ray_local, tmp_path, capsys):
    """A cluster the run started itself (this machine alone) never grows: an actor asking for more
    than it has, or actors that do not fit in it together, stop the run at once, before any actor
    starts, where they would wait their whole start timeout (600 s by default)."""
    assert groups.own_cluster(), "the tests' cluster is this process's own"
    flags = [*TOY, f"--experiment.output_dir={tmp_path}"]
    t0, before = time.perf_counter(), actors_now()
    code = main([*flags, "--rollout.num_gpus=1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() == (
        "error: the run's actors do not fit in the Ray cluster: they ask for 1 GPU of the 0 it has (1 x 1 GPU (rollout"
        " workers)); this run started its own Ray cluster (this machine alone): set ray.num_cpus and ray.num_gpus to"
        " what the machine has, ask for less, or join a cluster (RAY_ADDRESS)"
    ), err
    # each alone fits in 4 CPUs, not all together: 3 x 1.25 + 2 x 0.5 + 0.25
    code = main(
        [
            f"--config={REPO / 'configs' / 'digits.yaml'}",
            f"--experiment.output_dir={tmp_path}",
            "--rollout.num_workers=3",
            "--rollout.num_cpus=1.25",
            '--rewards=[{"name": "digits", "num_servers": 2, "num_cpus": 0.5}]',
            '--learner.eval_metrics=[{"name": "digits_fd", "num_cpus": 0.25}]',
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(
        "error: the run's actors do not fit in the Ray cluster: they ask for 5 CPU of the 4 it has (3 x 1.25 CPU"
        " (rollout workers), 2 x 0.5 CPU (rewards[0] ('digits')), 1 x 0.25 CPU (eval metric 'digits_fd')); "
    ), err
    assert time.perf_counter() - t0 < 30
    assert actors_now() == before, "nothing was started"
    # an actor started on its own (a metric's server) is checked as it starts
    room = r"the cluster has no room for it \(it asks for 8 CPU; the cluster has [\d.]+ of 4 CPU free\)"
    with pytest.raises(ConfigError, match=rf"^eval metric 'digits_fd' cannot start: {room}; this run started its own"):
        groups.MetricGroup([MetricSpec(name="digits_fd", num_cpus=8)])


def test_a_driver_that_joins_a_cluster_does_not_call_it_its_own(ray_local):
    """``own_cluster`` reads Ray's private node of this process: True where it started the
    cluster (the tests'), False for a driver that joined it, as ``ray job submit`` does."""
    import subprocess
    import sys

    address = ray_local.get_runtime_context().gcs_address
    code = (
        "import ray; from learner.groups import own_cluster; "
        f"ray.init(address={address!r}, log_to_driver=False); print(own_cluster()); ray.shutdown()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_an_interrupted_run_is_one_line_saying_what_it_keeps(ray_local, tmp_path, capsys, monkeypatch):
    """Ctrl-C (a KeyboardInterrupt in the loop) ends with exit 130 and one line naming the
    checkpoint to continue from, the run dir released; before any checkpoint, it says so."""
    from common.rundir import LOCK
    from learner.main import _what_is_kept

    interrupt_at(monkeypatch, loop, "reinforce_step", at=4)
    argv = [
        *TOY,
        f"--experiment.output_dir={tmp_path}",
        "--learner.global_baseline=false",
        "--learner.progress=false",
        "--learner.iterations=5",
        "--learner.checkpoint_every=2",
        "--learner.eval_seeds=2",
    ]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"interrupted: the run in {tmp_path / 'toy'} keeps its checkpoint ckpt-00000002; --resume auto continues"
        " it from there"
    ], err
    assert not (tmp_path / "toy" / LOCK).exists()  # released on the way out: --resume auto can take it
    early = load_config([*argv, "--experiment.name=early"])
    assert _what_is_kept(early) == f"the run in {tmp_path / 'early'} had not begun; the same command starts it"
    (tmp_path / "early").mkdir()  # stopped while starting: an empty run dir, or its config.yaml alone
    (tmp_path / "early" / "config.yaml").write_text("x: 1\n")
    assert _what_is_kept(early) == f"the run in {tmp_path / 'early'} had not begun; the same command starts it"
    (tmp_path / "early" / "metrics.jsonl").write_text('{"step": 0}\n')  # begun, no checkpoint yet
    assert _what_is_kept(early) == (
        f"the run in {tmp_path / 'early'} had written no checkpoint yet; --resume auto starts it again"
    )


@pytest.mark.parametrize("program", ["learner.main", "learner.evaluate", "rollout.generate"])
@pytest.mark.parametrize(
    ("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_ctrl_c_while_a_program_loads_its_libraries_is_one_line(program, sig, code, word):
    """Ctrl-C in the second or more a program spends importing torch, Ray and diffusers, before
    its main runs, was a KeyboardInterrupt traceback from inside whichever library was loading;
    SIGTERM there killed it without a word."""
    proc = subprocess.Popen(
        [sys.executable, "-m", program, "--help"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as a terminal sends it: a suite run in the background (``.ci/run &``) passes SIGINT on ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
        while "libtorch_cpu" not in maps.read_text():  # torch is loading: most of a second of imports is left
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code and err.strip().splitlines() == [f"{word}: nothing was started"], err


def test_an_eval_prompt_the_backend_cannot_read_fails_before_training(ray_local, tmp_path):
    cfg = load_config([], **tiny_overrides(tmp_path, learner={"eval_prompts": ["class 1", "class 99"]}))
    with pytest.raises(ConfigError, match=r"^learner.eval_prompts: .*prompt 'class 99' names class 99, but the toy"):
        train(cfg)
    assert not (tmp_path / "t" / "metrics.jsonl").exists(), "no training before the check"


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_diverged_update_is_never_checkpointed(ray_local, tmp_path, monkeypatch, pipeline):
    """Also one step off policy, where the next rollouts are under way when the update diverges:
    they are given up, and the run stops at once."""
    real = loop.reinforce_step
    calls = []

    def poisoned(policy, *args, **kwargs):
        out = real(policy, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the third update blows up (as a huge lr would)
            with torch.no_grad():
                next(policy.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(loop, "reinforce_step", poisoned)
    over = tiny_overrides(tmp_path, learner={"iterations": 6, "checkpoint_every": 2, "pipeline": pipeline})
    cfg = load_config([], **over)
    with pytest.raises(
        Diverged, match=r"iteration 3: the update diverged \(non-finite weights in .*\); nothing of it was saved"
    ):
        train(cfg)
    ck = tmp_path / "t" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "ckpt-00000002"
    assert sorted(p.name for p in ck.glob("ckpt-*")) == ["ckpt-00000002"]
    assert not (tmp_path / "t" / "policy").exists()
    state = json.loads((ck / "ckpt-00000002" / "state.json").read_text())
    assert state["iteration"] == 2 and state["logged_rollouts"] == 2 * 4 * 2
    # the last good state resumes (the poison is gone)
    monkeypatch.setattr(loop, "reinforce_step", real)
    over["learner"]["iterations"] = 4
    res = train(load_config(["--resume=auto"], **over))
    assert all(torch.isfinite(p).all() for p in res.policy.parameters())


def test_a_non_finite_gradient_stops_the_run_as_a_diverged_update_does(ray_local, tmp_path, monkeypatch):
    """A gradient of nan (the optimizer does not step): the run stopped with a bare
    FloatingPointError that said the update was skipped; it is the diverged update's line, with
    the last good checkpoint and how to go on from it."""
    real = loop.reinforce_step
    calls = []

    def poisoned(policy, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            next(policy.parameters()).register_hook(lambda g: g * float("nan"))
        return real(policy, *args, **kwargs)

    monkeypatch.setattr(loop, "reinforce_step", poisoned)
    cfg = load_config([], **tiny_overrides(tmp_path, learner={"iterations": 6, "checkpoint_every": 2}))
    with pytest.raises(
        Diverged,
        match=r"^iteration 3: the update diverged \(non-finite gradient norm nan: the optimizer did not step\);"
        r" nothing of it was saved, .* continue with --resume auto",
    ):
        train(cfg)
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text().strip() == "ckpt-00000002"


def test_alphas_out_of_range_stop_the_run_before_the_next_checkpoint(ray_local, tmp_path, monkeypatch):
    """Finite weights whose alphas leave (0, 1e8] (a head bias of 1e9): caught by the next
    update's own forward pass, between checkpoints, and never saved."""
    real = loop.reinforce_step
    calls = []

    def poisoned(policy, *args, **kwargs):
        out = real(policy, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                policy.head[-1].bias.fill_(1e9)
        return out

    monkeypatch.setattr(loop, "reinforce_step", poisoned)
    cfg = load_config([], **tiny_overrides(tmp_path, learner={"iterations": 6, "checkpoint_every": 2}))
    out_of_range = r"iteration 3: the update diverged \(alpha on the batch in \[.*outside \(0, 1e\+08\]"
    with pytest.raises(Diverged, match=out_of_range):
        train(cfg)
    ck = tmp_path / "t" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "ckpt-00000002"


def test_a_reward_whose_scale_jumps_gets_a_warning(ray_local, tmp_path, capsys):
    train(_cfg(tmp_path, {"name": f"{HANG}:ScaleJump"}, rollout={"num_workers": 1}))
    out = capsys.readouterr().out
    assert "changed scale from 1 to 1e+06" in out


def test_diverged_check_finds_alpha_out_of_range():
    from common.policy import SchedulePolicy, collate, state_to_numpy

    policy = SchedulePolicy(steps=3, in_channels=4, token_dim=2, variant="global").eval()
    inputs = collate(np.zeros((2, 4), np.float32), [np.zeros((1, 2), np.float32)] * 2, None)
    assert loop._diverged(policy, state_to_numpy(policy), inputs) is None
    with torch.no_grad():
        for p in policy.parameters():
            p.fill_(1e12)
    assert "outside (0, 1e+08]" in loop._diverged(policy, state_to_numpy(policy), inputs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_diverged_check_names_the_first_non_finite_weight_as_sent(dtype):
    from common.policy import SchedulePolicy, state_to_numpy

    policy = SchedulePolicy(steps=3, in_channels=4, token_dim=2, widths=(4, 4), head_hidden=8, input_kind="vector")
    policy.eval()
    assert loop._diverged(policy, state_to_numpy(policy, dtype), None) is None
    with torch.no_grad():
        policy.head[0].weight[1, 2] = float("inf")
        policy.head[-1].bias[0] = float("nan")
    sent = f" (sent as {dtype})" if dtype != "float32" else ""
    assert loop._diverged(policy, state_to_numpy(policy, dtype), None) == f"non-finite weights in head.0.weight{sent}"
    with torch.no_grad():
        policy.head[0].weight[1, 2] = policy.head[-1].bias[0] = 1e5  # finite, but not in float16
    expected = "non-finite weights in head.0.weight (sent as float16)" if dtype == "float16" else None
    assert loop._diverged(policy, state_to_numpy(policy, dtype), None) == expected


def test_a_frozen_worker_is_timed_out_restarted_and_its_unit_resent(ray_local, tmp_path):
    """SIGSTOP one rollout worker mid-run (a hung CUDA call looks the same from outside): its
    unit times out, Ray restarts it, the unit is re-sent, and every rollout is used once."""
    import os
    import signal
    import threading

    stopped = []
    before = actors_now()  # an earlier run's workers may still be alive: never the target

    def freeze():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "t" / "metrics.jsonl").exists():
            time.sleep(0.05)
        pids = live_pids("RolloutWorker", before)
        if pids:
            os.kill(pids[0], signal.SIGSTOP)
            stopped.append(pids[0])

    over = tiny_overrides(tmp_path, rollout={"sample_timeout_s": 3, "sample_timeout_per_nfe_s": 0.0})
    over["learner"] = {**over["learner"], "iterations": 6}
    t = threading.Thread(target=freeze, daemon=True)
    t.start()
    try:
        res = train(load_config([], **over))
    finally:
        t.join()
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert stopped, "no worker was frozen"
    faults = sum(m.get("system/faults", 0) for m in read_jsonl(res.run_dir / "metrics.jsonl"))
    assert faults >= 1
    ids = [(r.iteration, r.context, r.k) for r in read_records(res.run_dir / "rollouts.msgpack", RolloutRecord)]
    assert len(ids) == 6 * 4 * 2 and len(set(ids)) == len(ids)


def test_a_stop_while_a_failed_actor_is_asked_whether_it_is_back_ends_the_wait(ray_local):
    """After a fault the dispatcher asks the actor whether it came back, for up to
    rollout.restart_timeout_s; a stop (SIGTERM, Ctrl-C) in that moment waited it out, past a job
    stop's grace period. Now the wait ends within moments of the stop."""
    import threading

    import ray

    @ray.remote(num_cpus=0.1)
    class NeverAnswers:
        def pid(self) -> int:
            time.sleep(3600)
            return 0

    actor = NeverAnswers.remote()
    try:
        t0 = time.monotonic()
        assert groups._alive(actor, 1.0) is None, "no answer within the time: not back"
        assert 0.9 < time.monotonic() - t0 < 5
        stop = threading.Event()
        threading.Timer(0.5, stop.set).start()
        t0 = time.monotonic()
        with pytest.raises(groups.Cancelled, match="stopped while a failed actor was asked"):
            groups._alive(actor, 600.0, stop)
        assert time.monotonic() - t0 < 3
    finally:
        ray.kill(actor)


def test_a_restarted_actor_busy_with_what_was_queued_on_it_is_back(ray_local):
    """After a fault the dispatcher asks the actor whether it came back, and its answer comes after
    the calls queued on it. Two units of one worker failed at its death; the first was re-sent to
    it, restarted, and the question about the second waited behind that unit's sampling: past
    rollout.restart_timeout_s the worker was dropped as dead (alive, and idle for the rest of the
    run; with rollout.min_workers of them all, the run stopped). The cluster's actor table now
    says that it restarted."""
    import os

    import ray
    from ray.exceptions import RayActorError

    from common.actors import Actor

    @ray.remote(num_cpus=0.1, max_restarts=1, max_task_retries=0)
    class Samples(Actor):
        def sample(self, seconds: float) -> None:
            time.sleep(seconds)

    actor = Samples.remote()
    try:
        pid = ray.get(actor.pid.remote())
        first = actor.sample.remote(60.0)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RayActorError):
            ray.get(first, timeout=60)
        actor.sample.remote(60.0)  # a unit re-sent to it, ahead of the question
        t0 = time.monotonic()
        assert groups._alive(actor, 30.0) == 1, "back, after one restart"
        assert time.monotonic() - t0 < 15, "without waiting for the unit queued on it"
        os.kill(groups._entry(actor)["Pid"], signal.SIGKILL)  # again: its restarts are exhausted
        t0 = time.monotonic()
        assert groups._alive(actor, 30.0, restarts=1) is None
        assert time.monotonic() - t0 < 15
    finally:
        ray.kill(actor)
