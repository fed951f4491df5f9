"""A run directory has one owner, and nothing of a run is overwritten, lost or doubled by
mistake: the lock, refusals that leave every file as it was, --overwrite, damaged logs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common import rundir
from common.codec import append_records, pack, read_records
from common.config import ConfigError, load_config
from common.messages import RolloutRecord
from common.rundir import LOCK, RunDirInUse, RunDirLost, claim
from learner.loop import train
from learner.main import main
from tests.conftest import actors_now, left_alive


def _snapshot(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
    }


def _flags(tmp_path, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/toy.yaml",
        f"--experiment.output_dir={tmp_path}",
        "--experiment.name=r",
        "--learner.iterations=4",
        "--learner.checkpoint_every=2",
        "--learner.eval_seeds=2",
        "--learner.progress=false",
        "--learner.global_baseline=false",
        "--learner.plots=false",
        "--rollout.contexts_per_iter=4",
        "--rollout.k_schedule={}",
        "--policy.widths=[8,8,16,16]",
        "--policy.groups=4",
        "--policy.attn_heads=2",
        "--policy.head_hidden=16",
        *extra,
    ]


def _fake_run(run_dir: Path) -> None:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "x": 1.0}\n')
    (run_dir / "config.yaml").write_text("experiment: {name: r}\n")


# -- no Ray: refusals at startup ------------------------------------------------------------------


def test_a_finished_run_is_not_overwritten_without_being_told(capsys, tmp_path):
    _fake_run(tmp_path / "r")
    before = _snapshot(tmp_path / "r")
    assert main(_flags(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "already holds a run (metrics.jsonl)" in err and "--resume auto" in err and "--overwrite" in err
    assert _snapshot(tmp_path / "r") == before and not (tmp_path / "r" / LOCK).exists()


def test_overwrite_with_a_device_this_process_does_not_see_keeps_the_earlier_run(capsys, tmp_path):
    """learner.device was resolved once the actors had started, after --overwrite had removed the
    earlier run: a mistyped device cost the run it was meant to replace only once the new one ran."""
    _fake_run(tmp_path / "r")
    before = _snapshot(tmp_path / "r")
    assert main(_flags(tmp_path, "--overwrite", "--learner.device=cuda:99")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: learner.device: device 'cuda:99': this process sees ") and err.count("\n") == 1
    assert _snapshot(tmp_path / "r") == before, "nothing removed"


def test_a_second_live_run_is_refused(capsys, tmp_path):
    (tmp_path / "r").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (tmp_path / "r" / LOCK).write_text(
            json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "t"})
        )
        assert main(_flags(tmp_path)) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {holder.pid}" in err and "delete" in err
        assert json.loads((tmp_path / "r" / LOCK).read_text())["pid"] == holder.pid, "the owner's lock stays"
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_removes_the_earlier_runs_evaluation_unless_one_is_writing_it(capsys, tmp_path):
    """--overwrite kept ``evaluation/`` (learner.evaluate's default --out): the earlier policy's
    table beside the new run, and a live evaluation's lock ignored."""
    run = tmp_path / "r"
    (run / "evaluation").mkdir(parents=True)
    (run / "config.yaml").write_text("x")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "evaluation" / "table.md").write_text("the earlier policy's table")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (run / "evaluation" / LOCK).write_text(
            json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "t"})
        )
        before = _snapshot(run)
        assert main(_flags(tmp_path, "--overwrite")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"error: the earlier run's evaluation dir {run / 'evaluation'} is in use by pid {holder.pid} on host"
            f" {socket.gethostname()} (since t); use another experiment.name, or delete {run / 'evaluation' / LOCK}"
            " if that evaluation is gone"
        ]
        assert _snapshot(run) == before, "nothing removed"
    finally:
        holder.kill()
        holder.wait()
    with claim(load_config(_flags(tmp_path, "--overwrite"))) as rd:  # its evaluation gone: the earlier run's with it
        assert (run / "metrics.jsonl").exists(), "kept until the run has started"
        rd.clear_earlier()
        assert not (run / "evaluation").exists() and not (run / "metrics.jsonl").exists()


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    (tmp_path / "r").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / "r" / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "t"}))
    said = []
    with claim(load_config(_flags(tmp_path)), log=said.append) as rd:
        assert json.loads((rd.path / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirInUse, match=f"in use by pid {os.getpid()}"):
            claim(load_config(_flags(tmp_path)))
    assert any("stale lock" in s for s in said)
    assert not (tmp_path / "r" / LOCK).exists()


def test_of_two_runs_taking_over_one_stale_lock_one_holds_the_dir(tmp_path, monkeypatch, capsys):
    """Both judged the lock of a dead pid stale. The first took it over and holds the dir; the
    second, coming after with what it judged, must not remove the first's fresh lock (it did:
    two runs held one run dir) but see it and be refused."""
    d = tmp_path / "ev"
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "t"}))
    alive, first, calls = rundir._pid_alive, [], []

    def judged(pid: int) -> bool:  # the second run's judgment of the stale lock ends after the first took it
        calls.append(pid)
        if len(calls) == 1:
            first.append(rundir.hold(d, "evaluation dir", "--out", "evaluation"))
        return alive(pid)

    monkeypatch.setattr(rundir, "_pid_alive", judged)
    with pytest.raises(RunDirInUse, match=f"in use by pid {os.getpid()}"):
        rundir.hold(d, "evaluation dir", "--out", "evaluation")
    try:
        assert json.loads((d / LOCK).read_text())["pid"] == os.getpid(), "the first run's lock was removed"
        assert capsys.readouterr().out.count("taking over the stale lock") == 1
        assert sorted(p.name for p in d.iterdir()) == [LOCK], "the lock taken aside was left"
    finally:
        first[0].release()
    assert not (d / LOCK).exists()


def test_a_stale_lock_is_taken_over_only_while_it_holds_what_was_judged(tmp_path):
    (tmp_path / LOCK).write_bytes(b'{"pid": 1}')
    lock = rundir._LockFile(tmp_path)
    inode = (tmp_path / LOCK).stat().st_ino
    assert lock.take_over(b'{"pid": 2}') is False  # another run's lock meanwhile: put back, the same file
    assert (tmp_path / LOCK).read_bytes() == b'{"pid": 1}' and (tmp_path / LOCK).stat().st_ino == inode
    assert lock.take_over(b'{"pid": 1}') is True and not (tmp_path / LOCK).exists()
    assert lock.take_over(b'{"pid": 1}') is False  # gone: taken over by another
    assert list(tmp_path.iterdir()) == []
    url = f"memory://ck-{tmp_path.name}"  # a lock object: read again just before it is removed
    on_store = rundir._LockObject(url)
    on_store.fs.pipe(on_store.path, b'{"pid": 1}')
    assert on_store.take_over(b'{"pid": 2}') is False and on_store.read_bytes() == b'{"pid": 1}'
    assert on_store.take_over(b'{"pid": 1}') is True and on_store.read_bytes() is None
    # one left aside by a run killed while taking it over goes with the next claim, once its lease ran out
    left = tmp_path / "r" / f"{rundir.TAKEOVER}a-host-7"
    left.parent.mkdir()
    left.write_bytes(b"{}")
    fresh = tmp_path / "r" / f"{rundir.TAKEOVER}a-host-8"
    fresh.write_bytes(b"{}")
    stamp = time.time() - rundir.LEASE_S - 30
    os.utime(left, (stamp, stamp))
    with claim(load_config(_flags(tmp_path))):
        assert not left.exists() and fresh.exists()


def test_a_lock_released_while_another_run_has_it_aside_is_not_left_put_back(tmp_path):
    """A run taking over a stale lock renames the lock aside, and puts it back where it is not the
    stale one (another run's, created meanwhile). Where that run released its lock in that moment,
    the released lock came back, naming it, and refused every run of another host for a lease."""
    run = tmp_path / "r"
    held = rundir.hold(run, "run dir", "--experiment.name", "run")
    aside = run / f"{rundir.TAKEOVER}a-taker-1"
    os.rename(run / LOCK, aside)  # the taker's rename; then it finds the lock is not the stale one
    releasing = threading.Thread(target=held.release)
    releasing.start()
    time.sleep(rundir.PUT_BACK_S / 5)
    os.link(aside, run / LOCK)  # put back, as the taker does
    aside.unlink()
    releasing.join()
    assert not (run / LOCK).exists(), "released, not left put back"


def _foreign_lock(run: Path, age_s: float) -> Path:
    """A lock another host's run wrote and last renewed ``age_s`` ago."""
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK
    lock.write_text(json.dumps({"host": "a-preempted-pod", "pid": 4242, "started": "t"}))
    stamp = lock.stat().st_mtime - age_s
    os.utime(lock, (stamp, stamp))
    return lock


def test_a_lock_from_another_host_is_taken_over_once_its_lease_runs_out(tmp_path):
    """A driver on a pod that was preempted or on a node that was lost leaves its lock, and its
    pid cannot be asked from here: its lease (the lock's mtime, renewed by a live run) says."""
    _foreign_lock(tmp_path / "r", rundir.LEASE_S + 30)
    said: list[str] = []
    t0 = time.monotonic()
    with claim(load_config(_flags(tmp_path)), log=said.append) as rd:
        assert json.loads((rd.path / LOCK).read_text())["pid"] == os.getpid()
    assert time.monotonic() - t0 < 5
    assert said == [
        f"warning: taking over the lock of pid 4242 on host a-preempted-pod (started t): not renewed for more than"
        f" {rundir.LEASE_S:g} s, its run is gone"
    ]


def test_a_lock_of_this_host_whose_pid_is_another_process_now_is_taken_over(tmp_path):
    """A container restarted inside its pod keeps the host name and numbers its pids again: the
    lock of the driver before named a pid that is alive (another process, or this one), and a
    resubmitted --resume auto was refused until someone deleted the lock by hand."""
    run = tmp_path / "r"
    for pid in (1, os.getpid()):  # a live process of this host; this very one, which does not hold it
        run.mkdir(parents=True, exist_ok=True)
        lock = run / LOCK
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "t"}))
        stamp = lock.stat().st_mtime - rundir.LEASE_S - 30  # its lease ran out a while ago
        os.utime(lock, (stamp, stamp))
        said: list[str] = []
        t0 = time.monotonic()
        with claim(load_config(_flags(tmp_path)), log=said.append) as rd:
            assert json.loads((rd.path / LOCK).read_text())["pid"] == os.getpid()
        assert time.monotonic() - t0 < 5 and len(said) == 1 and "taking over" in said[0], said
    # renewed lately by a live process of this host: its run, refused at once
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "started": "t"}))
    with pytest.raises(RunDirInUse, match="in use by pid 1 on host"):
        claim(load_config(_flags(tmp_path)))


def test_a_lock_of_a_namesake_machine_or_container_is_judged_by_its_lease(tmp_path, monkeypatch):
    """Containers with host networking share the node's host name and number their pids from 1;
    so may two machines given one name. A lock whose pid is not running here (or is this very
    process's number) was taken over at once, though it may be a live run's in another pid space:
    two runs held one dir. The boot id and the pid namespace say whose pids they are."""
    host = socket.gethostname()
    monkeypatch.setattr(rundir, "_process_space", lambda: {"host": host, "boot": "b1", "pidns": "pid:[41]"})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "r"
    run.mkdir()

    def lock(pid: int, boot: str, pidns: str, age_s: float = 0.0) -> None:
        (run / LOCK).write_text(json.dumps({"host": host, "boot": boot, "pidns": pidns, "pid": pid, "started": "t"}))
        stamp = (run / LOCK).stat().st_mtime - age_s
        os.utime(run / LOCK, (stamp, stamp))

    for pid, boot, pidns in [
        (dead.pid, "b1", "pid:[42]"),
        (os.getpid(), "b1", "pid:[42]"),
        (dead.pid, "b2", "pid:[41]"),
    ]:
        lock(pid, boot, pidns)  # renewed lately in another pid space: a live run's, refused at once
        with pytest.raises(RunDirInUse, match=f"in use by pid {pid} on host {host}"):
            claim(load_config(_flags(tmp_path)))
        assert json.loads((run / LOCK).read_text())["pidns"] == pidns, "the owner's lock stays"
    lock(dead.pid, "b1", "pid:[42]", rundir.LEASE_S + 30)  # its lease ran out: its run is gone
    said: list[str] = []
    with claim(load_config(_flags(tmp_path)), log=said.append):
        mine = json.loads((run / LOCK).read_text())
        assert (mine["pid"], mine["boot"], mine["pidns"]) == (os.getpid(), "b1", "pid:[41]")
    assert said == [
        f"warning: taking over the lock of pid {dead.pid} on host {host} (another machine or container of this"
        f" name) (started t): not renewed for more than {rundir.LEASE_S:g} s, its run is gone"
    ]
    lock(dead.pid, "b1", "pid:[41]")  # in this pid space, not running: stale at once
    with claim(load_config(_flags(tmp_path)), log=said.append):
        pass
    assert "no longer running" in said[-1]


def test_a_lock_renewed_lately_by_another_host_is_refused_at_once(tmp_path):
    lock = _foreign_lock(tmp_path / "r", 1.0)
    t0 = time.monotonic()
    with pytest.raises(RunDirInUse, match="in use by pid 4242 on host a-preempted-pod"):
        claim(load_config(_flags(tmp_path)))
    assert time.monotonic() - t0 < 5
    assert json.loads(lock.read_text())["pid"] == 4242, "the owner's lock stays"


def test_a_lock_that_missed_its_renewals_is_waited_for_then_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "LEASE_RENEW_S", 0.2)
    monkeypatch.setattr(rundir, "LEASE_S", 1.5)
    _foreign_lock(tmp_path / "r", 0.5)
    said: list[str] = []
    t0 = time.monotonic()
    with claim(load_config(_flags(tmp_path)), log=said.append):
        waited = time.monotonic() - t0
    assert 0.8 < waited < 5, waited
    assert said[0].startswith("the run dir's lock, of pid 4242 on host a-preempted-pod, has not been renewed for ")
    assert said[0].endswith("s: waiting until 1.5 s to take it over") and "taking over" in said[1]


def _aged(lock: Path, record: dict) -> None:
    lock.write_text(json.dumps(record))
    stamp = lock.stat().st_mtime - rundir.LEASE_S - 30  # its lease ran out a while ago
    os.utime(lock, (stamp, stamp))


def test_the_lock_of_a_stopped_run_is_its_own_past_its_lease_where_a_reused_pids_is_not(tmp_path):
    """A driver stopped past the lease (SIGSTOP, a suspended job, a frozen VM) lives: its lock was
    taken over ("pid N is another process", of the very same process) and, once it went on, two
    runs wrote one run dir. The lock records when its process started: the same pid started then
    is that process, never taken over; started at another time, the pid was reused."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        run = tmp_path / "r"
        run.mkdir()
        record = {**rundir._process_space(), "pid": sleeper.pid, "started": "t"}
        record["pid_start"] = rundir._start_ticks(sleeper.pid)
        assert record["pid_start"] is not None
        _aged(run / LOCK, record)
        with pytest.raises(RunDirInUse, match=f"in use by pid {sleeper.pid} on host"):
            claim(load_config(_flags(tmp_path)))
        _aged(run / LOCK, {**record, "pid_start": "1"})  # that pid, but another process's now
        with claim(load_config(_flags(tmp_path)), log=lambda _: None) as rd:
            assert json.loads((rd.path / LOCK).read_text())["pid_start"] == rundir._start_ticks(os.getpid())
        # its process, running but not renewing it (its release failed): the lease rules, as before
        os.kill(sleeper.pid, signal.SIGCONT)
        _aged(run / LOCK, record)
        said: list[str] = []
        claim(load_config(_flags(tmp_path)), log=said.append).release()
        assert len(said) == 1 and "not renewed for more than" in said[0], said
        # a zombie (killed, not yet reaped by its parent) is gone, though /proc still has it
        sleeper.kill()
        deadline = time.monotonic() + 10
        while rundir._stat(sleeper.pid)[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        _aged(run / LOCK, record)
        said.clear()
        claim(load_config(_flags(tmp_path)), log=said.append).release()
        assert len(said) == 1 and "no longer running" in said[0], said
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_run_whose_dir_was_taken_over_writes_there_no_more(tmp_path, monkeypatch):
    """Its renewals find another run's record: it neither renews nor removes that lock, and the
    next write it checks stops it with one line naming the run that has the dir. Where its
    renewals were missed (the process was stopped), the lock is read at that check, before the
    write, not at the next renewal."""
    monkeypatch.setattr(rundir, "LEASE_RENEW_S", 0.05)
    other = {"host": "elsewhere", "pid": 4242, "started": "later"}
    with claim(load_config(_flags(tmp_path))) as rd:
        rd.check_held()
        (rd.path / LOCK).write_text(json.dumps(other))
        time.sleep(0.5)
        with pytest.raises(
            RunDirLost, match=r"run dir .* was taken over by pid 4242 on host elsewhere \(since later\)"
        ):
            rd.check_held()
    assert json.loads((tmp_path / "r" / LOCK).read_text()) == other, "left to its new owner"
    (tmp_path / "r" / LOCK).unlink()
    with claim(load_config(_flags(tmp_path))) as rd:
        lease = rd.leases[0]
        lease.stop_renewing()
        time.sleep(0.2)  # a renewal under way is over
        (rd.path / LOCK).write_text(json.dumps(other))
        lease.renewed -= 60  # stopped for a minute: no renewal has looked since
        with pytest.raises(RunDirLost, match="taken over by pid 4242"):
            rd.check_held()

    # a renewal stuck in its storage call holds the guard: the check does not wait for it
    (tmp_path / "r" / LOCK).unlink()
    with claim(load_config(_flags(tmp_path))) as rd:
        lease = rd.leases[0]
        lease.renewed -= 60
        with lease._guard:
            t0 = time.monotonic()
            rd.check_held()
            assert time.monotonic() - t0 < 0.5


def test_a_run_dir_in_rays_copy_of_the_jobs_working_dir_is_refused(tmp_path, monkeypatch):
    """`ray job submit --working-dir . -- python -m learner.main` with the default, relative
    output dir wrote the run into Ray's unpacked copy of the code: deleted with the session, shared
    by every job of the same code (the next one was refused, a changed checkout's --resume auto
    started afresh)."""
    package = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_035b8c"
    package.mkdir(parents=True)
    relative = load_config(_flags(tmp_path, "--experiment.output_dir=runs"))
    with_ckpt = load_config(_flags(tmp_path, "--learner.checkpoint_dir=ck"))
    absolute = load_config(_flags(tmp_path))
    monkeypatch.chdir(package)
    with pytest.raises(ConfigError, match=rf"^experiment.output_dir runs is in Ray's copy .* \({package}\), which"):
        claim(relative)
    with pytest.raises(ConfigError, match=r"^learner.checkpoint_dir ck is in Ray's copy .* --learner.checkpoint_dir="):
        claim(with_ckpt)
    assert list(package.iterdir()) == []
    claim(absolute).release()  # an absolute path outside it


def test_a_lock_that_cannot_be_written_is_not_left_empty(tmp_path, monkeypatch):
    """A full disk at the claim left an empty lock, and the rerun the error line suggested was
    refused ("others took and released it meanwhile") until it had aged 10 s."""
    real = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.f = real(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fdopen", Full)
    with pytest.raises(OSError, match="No space left on device") as e:
        claim(load_config(_flags(tmp_path)))
    assert e.value.filename == str(tmp_path / "r" / LOCK)
    assert not (tmp_path / "r" / LOCK).exists()
    monkeypatch.setattr(rundir.os, "fdopen", real)
    claim(load_config(_flags(tmp_path))).release()  # the same command, at once

    # a write that stalled long enough for another run to take the empty lock over and make its
    # own: the failed claim removes only the file it made, never the other run's lock
    other = json.dumps({"host": "elsewhere", "pid": 4242, "started": "later"})

    class Stalled(Full):
        def write(self, data):
            lock = tmp_path / "r" / LOCK
            lock.unlink()
            lock.write_text(other)
            super().write(data)

    monkeypatch.setattr(rundir.os, "fdopen", Stalled)
    with pytest.raises(OSError, match="No space left on device"):
        claim(load_config(_flags(tmp_path)))
    assert (tmp_path / "r" / LOCK).read_text() == other


def test_a_live_owner_renews_its_lease_until_it_releases_the_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "LEASE_RENEW_S", 0.1)
    with claim(load_config(_flags(tmp_path))) as rd:
        lock = rd.path / LOCK
        old = lock.stat().st_mtime - 600
        os.utime(lock, (old, old))
        time.sleep(0.5)
        assert lock.stat().st_mtime > old + 590, "renewed"
        assert rd.leases[0].lock.age() < 1
    assert not lock.exists()
    threads = [t for t in threading.enumerate() if t.name == "run-dir-lease"]
    for t in threads:
        t.join(timeout=2)
    assert not any(t.is_alive() for t in threads), "the renewals stop with the release"


def test_two_runs_cannot_share_a_checkpoint_dir(tmp_path):
    """A learner.checkpoint_dir outside the run dir has a lock of its own: a second run given the
    same one would write its ckpt-* among the first's, and its --overwrite would delete them."""
    shared = tmp_path / "shared-checkpoints"
    first = load_config(_flags(tmp_path, f"--learner.checkpoint_dir={shared}"))
    second = load_config(_flags(tmp_path, "--experiment.name=other", f"--learner.checkpoint_dir={shared}"))
    with claim(first) as rd:
        assert [lease.lock.path for lease in rd.leases] == [first.run_dir / LOCK, shared / LOCK]
        with pytest.raises(RunDirInUse) as e:
            claim(second)
        assert str(e.value) == (
            f"checkpoint dir {shared} is in use by pid {os.getpid()} on host {socket.gethostname()} (since"
            f" {json.loads((shared / LOCK).read_text())['started']}); use another learner.checkpoint_dir, or delete"
            f" {shared / LOCK} if that run is gone"
        )
        assert not (second.run_dir / LOCK).exists(), "the second run's own lock is given back"
    assert not (shared / LOCK).exists() and not (first.run_dir / LOCK).exists()
    with claim(second) as rd:  # free once the first is done
        assert len(rd.leases) == 2
    inside = load_config(_flags(tmp_path, f"--learner.checkpoint_dir={tmp_path / 'r' / 'ck'}"))
    with claim(inside) as rd:  # one inside the run dir is the run dir's: one lock
        assert len(rd.leases) == 1


def _fake_checkpointed_run(out: Path, name: str, ckpt_dir: Path | None = None) -> Path:
    """A finished run's files, its checkpoint's state.json naming the run that wrote it."""
    run = out / name
    _fake_run(run)
    ckpt = (ckpt_dir or run / "checkpoints") / "ckpt-00000002"
    ckpt.mkdir(parents=True)
    state = {"iteration": 2, "config": {"experiment": {"output_dir": str(out), "name": name}}}
    (ckpt / "state.json").write_text(json.dumps(state))
    return run


def test_another_runs_files_are_never_this_runs_to_overwrite(tmp_path):
    """A checkpoint dir inside a finished run, or holding its checkpoints, was refused with the
    advice to pass --overwrite, which then deleted that run's checkpoints; a run named inside
    another run's directory (its checkpoints, a checkpoint) was written in among its files."""
    t1 = _fake_checkpointed_run(tmp_path, "t1")
    shared = tmp_path / "shared"
    a = _fake_checkpointed_run(tmp_path, "a", ckpt_dir=shared)
    before = _snapshot(tmp_path)
    for flags, message in [
        (
            ["--experiment.name=x", f"--learner.checkpoint_dir={t1 / 'checkpoints'}"],
            f"learner.checkpoint_dir {t1 / 'checkpoints'} holds the checkpoints of another run ({t1}); give this run"
            " a checkpoint dir of its own (--overwrite would delete that run's checkpoints)",
        ),
        (
            ["--experiment.name=b", f"--learner.checkpoint_dir={shared}"],
            f"learner.checkpoint_dir {shared} holds the checkpoints of another run ({a})",
        ),
        (
            ["--experiment.name=t1/checkpoints"],
            f"run dir {t1 / 'checkpoints'} is inside the run dir {t1} of another run; choose an experiment.name"
            " outside it",
        ),
        (["--experiment.name=t1/checkpoints/ckpt-00000002"], f"is inside the run dir {t1} of another run"),
    ]:
        for overwrite in ([], ["--overwrite"]):
            with pytest.raises(ConfigError) as e:
                claim(load_config(_flags(tmp_path, *flags, *overwrite)))
            assert message in str(e.value), (flags, str(e.value))
    assert _snapshot(tmp_path) == before, "nothing of the other runs changed"
    with claim(
        load_config(_flags(tmp_path, "--experiment.name=a", f"--learner.checkpoint_dir={shared}", "--overwrite"))
    ) as rd:
        rd.clear_earlier()  # its own checkpoints, elsewhere: replaced as asked, once the run has started
    assert not list(shared.glob("ckpt-*"))
    # the run dir of this process's own run holds its global baseline's run
    with claim(load_config(_flags(tmp_path, "--experiment.name=mine"))):
        (tmp_path / "mine" / "config.yaml").write_text("experiment: {name: mine}\n")
        with claim(load_config(_flags(tmp_path, "--experiment.name=mine/global"))) as rd:
            assert rd.leases[0].lock.path == tmp_path / "mine" / "global" / LOCK


def test_a_run_dir_neither_holds_another_run_nor_is_a_link_into_one(capsys, tmp_path):
    """A run dir around another run (that run could then neither be continued nor replaced: it
    was inside another run), or a name that is a link into another run's checkpoints/ (its
    config, checkpoints and logs went there): both ran."""
    _fake_run(tmp_path / "outer" / "inner")
    assert main(_flags(tmp_path, "--experiment.name=outer")) == 2
    err = capsys.readouterr().err
    assert f"run dir {tmp_path / 'outer'} holds the run dir {tmp_path / 'outer' / 'inner'} of another run" in err
    _fake_run(tmp_path / "target")
    (tmp_path / "link").symlink_to(tmp_path / "target" / "checkpoints")
    assert main(_flags(tmp_path, "--experiment.name=link")) == 2
    assert f"is inside the run dir {tmp_path / 'target'} of another run" in capsys.readouterr().err
    assert not any((tmp_path / "target" / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "what",
    [
        "run dir is a file",
        "output dir is a file",
        "output dir cannot be written",
        "checkpoint dir is a device",
        "the lock is a symbolic link",
        "run dir is a dangling link",
    ],
)
def test_run_dir_paths_that_cannot_work(capsys, tmp_path, what):
    out, extra = tmp_path, []
    if what == "run dir is a file":
        (tmp_path / "r").write_text("x")
        needle = "is a file, not a directory"
    elif what == "output dir is a file":
        (tmp_path / "o").write_text("x")
        out, needle = tmp_path / "o", "experiment.output_dir"
    elif what == "output dir cannot be written":
        out, needle = Path("/proc/steinsched-no-such-dir"), "cannot be written"
    elif what == "checkpoint dir is a device":  # was 'cannot be written: File exists'
        extra, needle = ["--learner.checkpoint_dir=/dev/null"], "error: checkpoint dir /dev/null is not a directory"
    elif what == "run dir is a dangling link":  # was 'cannot be written: File exists'
        (tmp_path / "r").symlink_to(tmp_path / "moved")
        needle = f"error: run dir {tmp_path / 'r'} is a symbolic link to {tmp_path / 'moved'}, which does not exist"
    else:  # a dangling link: was 'could not take the lock' after three seconds
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / LOCK).symlink_to(tmp_path / "nowhere")
        needle = f"error: {tmp_path / 'r' / LOCK} is a symbolic link, not a lock; delete it if no run uses the run dir"
    assert main([*_flags(tmp_path), f"--experiment.output_dir={out}", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_resume_auto_on_a_new_run_dir_starts_fresh(tmp_path):
    """A job that always passes --resume auto (a preemptible cluster's) starts fresh the first time."""
    with claim(load_config(_flags(tmp_path, "--resume=auto"))) as rd:
        assert rd.path.is_dir() and rd.artefacts() == []


def test_stale_temporaries_are_cleaned_when_claimed(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints" / ".ckpt-00000004.tmp-999").mkdir(parents=True)
    (run / "rollouts.tmp").write_bytes(b"x")
    with claim(load_config(_flags(tmp_path, "--resume=auto"))):
        pass
    assert not (run / "checkpoints" / ".ckpt-00000004.tmp-999").exists() and not (run / "rollouts.tmp").exists()
    # only the names a run writes: a checkpoint dir given by the user may hold files of theirs
    # (before, whatever had .tmp, .tmp- or .old- in its name went: notes.tmp, report.old-2023)
    shared = tmp_path / "shared"
    shared.mkdir()
    theirs = ["notes.tmp", "report.old-2023", "build.tmp-cache", "thesis.tex", "rollouts.tmp"]
    for name in theirs:
        (shared / name).write_text("theirs")
    (shared / ".ckpt-00000002.tmp-77").mkdir()  # an upload cut short: the run's
    with claim(load_config(_flags(tmp_path, "--experiment.name=s", f"--learner.checkpoint_dir={shared}"))):
        pass
    assert sorted(p.name for p in shared.iterdir()) == sorted(theirs)


# -- with Ray: runs, resumes, damage ------------------------------------------------------------------

ray_needed = pytest.mark.ray


@pytest.fixture(scope="module")
def finished(ray_local, tmp_path_factory):
    """A finished 4-iteration toy run, copied by each test that damages it."""
    out = tmp_path_factory.mktemp("finished")
    train(load_config(_flags(out)))
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src / "r", dst / "r")
    return dst


@ray_needed
def test_overwrite_replaces_the_run(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    (out / "r" / "tb" / "junk").write_text("old")
    assert main(_flags(out, "--overwrite=true", "--learner.iterations=2", "--ray.num_cpus=2")) == 0
    recs = list(read_records(out / "r" / "rollouts.msgpack", RolloutRecord))
    assert max(r.iteration for r in recs) == 1 and len(recs) == 2 * 4 * 2
    assert not (out / "r" / "tb" / "junk").exists()
    assert sorted(p.name for p in (out / "r" / "checkpoints").glob("ckpt-*")) == ["ckpt-00000002"]


@ray_needed
def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_started(finished, tmp_path, capsys):
    """--overwrite removed the earlier run as the run dir was claimed, before Ray and the actors
    started: a worker that could not start (a device it does not see, a GPU share, a sampler's
    model) cost the run it was to replace, and no run took its place."""
    out = _copy(finished, tmp_path)
    before = _snapshot(out / "r")
    flags = _flags(out, "--overwrite", "--learner.iterations=2", "--ray.num_cpus=2", "--rollout.policy_device=cuda:99")
    assert main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: rollout worker 0 could not start: ") and "cuda:99" in err[0]
    assert _snapshot(out / "r") == before, "the earlier run is as it was"


@ray_needed
def test_refused_resume_leaves_every_file_unchanged(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    before = _snapshot(out / "r")
    assert main(_flags(out, "--resume=auto", "--learner.lr=0.5", "--learner.iterations=6")) == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "learner.lr" in err and "Traceback" not in err
    assert _snapshot(out / "r") == before


@ray_needed
def test_no_usable_checkpoint_in_a_used_run_dir_is_an_error(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    for ck in (out / "r" / "checkpoints").glob("ckpt-*"):
        (ck / "state.json").write_text("{damaged")
    before = _snapshot(out / "r")
    assert main(_flags(out, "--resume=auto", "--learner.iterations=6")) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "--overwrite" in err
    assert _snapshot(out / "r") == before, "nothing is appended to the old logs"


@ray_needed
def test_torn_log_tails_are_dropped_with_a_warning_and_the_run_resumes(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    run = out / "r"
    with open(run / "rollouts.msgpack", "ab") as f:
        f.write(
            pack(
                RolloutRecord(
                    iteration=9,
                    context=0,
                    k=0,
                    prompt="class 1",
                    seed=1,
                    version=1,
                    tau=[1.0],
                    logp=0.0,
                    reward=0.0,
                    rewards={},
                    baseline=0.0,
                    advantage=0.0,
                )
            )[:17]
        )
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rollout/rew')
    train(load_config(_flags(out, "--resume=auto", "--learner.iterations=6")))
    said = capsys.readouterr().out
    assert "dropped a torn last record (17 bytes" in said and "dropped a torn last line" in said
    ids = [(r.iteration, r.context, r.k) for r in read_records(run / "rollouts.msgpack", RolloutRecord)]
    assert len(ids) == 6 * 4 * 2 and len(set(ids)) == len(ids)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == list(range(1, 7))


@ray_needed
@pytest.mark.parametrize("damage", ["middle", "truncated", "metrics"])
def test_a_damaged_or_truncated_log_blocks_resume_with_a_message(finished, tmp_path, capsys, damage):
    out = _copy(finished, tmp_path)
    log = out / "r" / "rollouts.msgpack"
    data = log.read_bytes()
    if damage == "middle":
        log.write_bytes(data[:300] + b"\xc1\xc1\xc1" + data[303:])
        needle = "damaged record at byte"
    elif damage == "metrics":
        m = out / "r" / "metrics.jsonl"
        lines = m.read_text().splitlines(keepends=True)
        m.write_text(lines[0] + "not json\n" + "".join(lines[1:]))
        needle = "line 2 is not JSON"
    else:
        recs = list(read_records(log, RolloutRecord))
        log.unlink()
        append_records(log, recs[:-5])  # complete records, but five missing
        needle = f"holds {len(recs) - 5} rollouts of the first 4 iterations, but the checkpoint recorded {len(recs)}"
    before, actors = _snapshot(out / "r"), actors_now()
    # with the global baseline on, the damage was found after the actors started and the baseline trained
    assert main(_flags(out, "--resume=auto", "--learner.iterations=6", "--learner.global_baseline=true")) == 2
    err = capsys.readouterr().err
    assert needle in err and "--overwrite" in err, err
    assert _snapshot(out / "r") == before, "a refused resume rewrites nothing"
    assert actors_now() == actors, "refused before any actor started"


@ray_needed
def test_resume_rebuilds_tensorboard_without_duplicate_steps(finished, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _copy(finished, tmp_path)
    run = out / "r"
    # the run went on to iteration 4 after checkpoint 4; pretend it died at 3 with checkpoint 2
    import shutil

    shutil.rmtree(run / "checkpoints" / "ckpt-00000004")
    (run / "checkpoints" / "latest").write_text("ckpt-00000002\n")
    train(load_config(_flags(out, "--resume=auto")))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("rollout/reward_mean")]
    assert steps == [1, 2, 3, 4], steps


def test_claim_refuses_resume_and_overwrite_together(tmp_path):
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(_flags(tmp_path, "--resume=auto", "--overwrite=true"))


@ray_needed
def test_a_run_whose_dir_is_taken_over_mid_run_stops_before_its_next_write(ray_local, tmp_path, capsys, monkeypatch):
    """The real entry point: the lock is another run's after the third update (as after this
    process was stopped past its lease); the run stops with one line, exit 2, and writes no log
    line, checkpoint or policy after it; the other run's lock stays."""
    import learner.loop as loop

    monkeypatch.setattr(rundir, "LEASE_RENEW_S", 0.05)
    real, calls = loop.reinforce_step, []
    other = {"host": "elsewhere", "pid": 4242, "started": "later"}

    def taken_over_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            (tmp_path / "r" / LOCK).write_text(json.dumps(other))
            time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "reinforce_step", taken_over_at_the_third)
    assert main(_flags(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: the run dir {tmp_path / 'r'} was taken over by pid 4242 on host elsewhere"), err
    run = tmp_path / "r"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000002", "latest"]
    assert not (run / "policy").exists()
    assert json.loads((run / LOCK).read_text()) == other


@ray_needed
@pytest.mark.parametrize("during", ["the final evaluation", "the global baseline"])
def test_a_run_dir_taken_over_during_its_longest_stretches_is_not_written_after(
    ray_local, tmp_path, capsys, monkeypatch, during
):
    """Taken over while the final evaluation ran, the run wrote its row, eval.json and plots into
    the other run's dir and exited 0; while the learned global baseline trained (a claim of its
    own, in <run>/global), the run's own lock was not looked at."""
    import learner.loop as loop

    monkeypatch.setattr(rundir, "LEASE_RENEW_S", 0.05)
    other = {"host": "elsewhere", "pid": 4242, "started": "later"}
    lock = tmp_path / "r" / LOCK

    def take_over() -> None:
        lock.write_text(json.dumps(other))
        time.sleep(0.3)

    extra: list[str] = []
    if during == "the final evaluation":
        real_eval = loop.evaluate

        def evaluated(*args, **kwargs):
            out = real_eval(*args, **kwargs)
            take_over()
            return out

        monkeypatch.setattr(loop, "evaluate", evaluated)
    else:
        extra = ["--learner.global_baseline=true"]
        real, calls = loop.reinforce_step, []

        def step(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                take_over()
            return real(*args, **kwargs)

        monkeypatch.setattr(loop, "reinforce_step", step)
    assert main(_flags(tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: the run dir {tmp_path / 'r'} was taken over by pid 4242"), err
    assert not (tmp_path / "r" / "eval.json").exists() and json.loads(lock.read_text()) == other
    assert not (tmp_path / "r" / "global" / "policy").exists()  # the global baseline stopped at its next write


@ray_needed
def test_a_full_disk_stops_the_run_in_one_line_saying_what_is_kept(ray_local, tmp_path, capsys, monkeypatch):
    """Storage that stops taking writes (a full disk, a quota, a mount gone read-only) is one line
    naming the file, exit 1, and what --resume auto continues from: the actors stopped, the lock
    released; before, a traceback."""
    import common.checkpoint as ckpt

    real, calls = ckpt.write_manifest, []

    def full_at_the_second(directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "manifest.json"))
        real(directory)

    monkeypatch.setattr(ckpt, "write_manifest", full_at_the_second)
    before = actors_now()
    assert main(_flags(tmp_path)) == 1
    run = tmp_path / "r"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write {calls[1] / 'manifest.json'}: No space left on device; the run stopped: the run in"
        f" {run} keeps its checkpoint ckpt-00000002; --resume auto continues it from there"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-00000002", "latest"], "freed"
    assert not (run / LOCK).exists() and left_alive(before) == []


def test_a_checkpoint_dir_on_shared_storage_is_owned_by_its_run(tmp_path):
    """learner.checkpoint_dir as a URL (s3://, gs://; memory:// here) was no run's: --overwrite left
    its checkpoints (the next pruning then deleted the new run's own, which have lower names), a
    fresh run started over them without a word, and another run's checkpoints there were taken."""
    import fsspec

    url = f"memory://ck-{tmp_path.name}"
    fs = fsspec.filesystem("memory")

    def checkpoint(name: str, run: Path) -> None:
        state = {"config": {"experiment": {"output_dir": str(run.parent), "name": run.name}}}
        fs.pipe(f"/ck-{tmp_path.name}/{name}/state.json", json.dumps(state).encode())

    other = tmp_path / "other"
    checkpoint("ckpt-00000004", other)
    with pytest.raises(
        ConfigError, match=rf"learner.checkpoint_dir {url} holds the checkpoints of another run \({other}\)"
    ):
        claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={url}")))
    fs.rm(f"/ck-{tmp_path.name}", recursive=True)
    mine = tmp_path / "r"
    for name in ("ckpt-00000002", "ckpt-00000006", "superseded-1/ckpt-00000008", ".ckpt-00000008.tmp-99"):
        checkpoint(name, mine)
    checkpoint("global/ckpt-00000004", tmp_path / "r" / "global")  # its learned global schedule's
    fs.pipe(f"/ck-{tmp_path.name}/latest", b"ckpt-00000006\n")
    with pytest.raises(ConfigError, match=rf"run dir {mine} already holds a run \({url}\): pass --resume auto"):
        claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={url}")))
    with claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={url}", "--resume=auto"))):
        assert not fs.exists(f"/ck-{tmp_path.name}/.ckpt-00000008.tmp-99"), "an upload cut short is removed"
        assert fs.exists(f"/ck-{tmp_path.name}/ckpt-00000006/state.json")
    with claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={url}", "--overwrite"))) as rd:
        rd.clear_earlier()
        root = f"/ck-{tmp_path.name}"
        left = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
        assert left == [LOCK], "the earlier run's checkpoints are removed; the run's lock is there"
    assert not fs.exists(f"{root}/{LOCK}"), "and released with the run"


def _foreign_lock_object(url: str) -> None:
    """A lock object another host's run wrote under ``url`` (its modification time: now)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe(f"{root}/{LOCK}", json.dumps({"host": "a-pod-of-another-job", "pid": 4242, "started": "t"}).encode())


def test_two_live_runs_cannot_share_a_checkpoint_url(tmp_path, monkeypatch):
    """Two jobs on other clusters (a RayJob submitted again while the first still ran; each head
    with a run dir of its own) given one learner.checkpoint_dir URL, both with --resume auto: the
    run dir locks are on different disks, an object store takes no lock, and both wrote ckpt-* into
    one line. The URL now holds a lock object, renewed while the run lives and taken over once its
    lease runs out, judged by the store's clock."""
    import fsspec

    url = f"memory://ck-{tmp_path.name}"
    fs, root = fsspec.core.url_to_fs(url)
    _foreign_lock_object(url)
    t0 = time.monotonic()
    with pytest.raises(
        RunDirInUse,
        match=rf"^checkpoint dir {url} is in use by pid 4242 on host a-pod-of-another-job \(since t\); use another"
        rf" learner.checkpoint_dir, or delete {url}/{LOCK} if that run is gone$",
    ):
        claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={url}", "--resume=auto")))
    assert time.monotonic() - t0 < 5
    assert json.loads(fs.cat(f"{root}/{LOCK}"))["pid"] == 4242, "the owner's lock stays"
    assert not (tmp_path / "r" / LOCK).exists(), "and the run dir's lock is released"

    # the other run was preempted: its lock is no longer renewed, and is taken over once its lease runs out
    monkeypatch.setattr(rundir, "LEASE_RENEW_S", 0.1)
    monkeypatch.setattr(rundir, "LEASE_S", 0.6)
    time.sleep(0.7)
    said: list[str] = []
    with claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={url}")), log=said.append) as rd:
        assert any(s.startswith("warning: taking over the lock of pid 4242 on host a-pod-of-another-job") for s in said)
        mine = json.loads(fs.cat(f"{root}/{LOCK}"))
        assert (mine["pid"], mine["host"]) == (os.getpid(), socket.gethostname())
        stamp = fs.modified(f"{root}/{LOCK}")
        time.sleep(0.5)
        assert fs.modified(f"{root}/{LOCK}") > stamp, "renewed while the run lives"
        assert rd.leases[-1].lock.age() < 0.5
        # a second run of this process's host is refused at once while this one renews it
        with pytest.raises(RunDirInUse, match=rf"checkpoint dir {url} is in use by pid {os.getpid()}"):
            claim(load_config(_flags(tmp_path, "--experiment.name=s", f"--learner.checkpoint_dir={url}")))
    assert not fs.exists(f"{root}/{LOCK}"), "released with the run"


def test_of_two_runs_that_write_a_checkpoint_url_s_lock_at_once_one_gives_way(tmp_path, monkeypatch):
    """An object store has no exclusive create: each run writes the lock where there is none and
    reads it back; the one that finds the other's record there gives way."""
    url = f"memory://ck-{tmp_path.name}"
    real_sleep = time.sleep

    def the_other_writes_meanwhile(seconds: float) -> None:
        _foreign_lock_object(url)
        real_sleep(seconds)

    monkeypatch.setattr(rundir.time, "sleep", the_other_writes_meanwhile)
    with pytest.raises(RunDirInUse, match="is in use by pid 4242 on host a-pod-of-another-job"):
        claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={url}")))


def test_overwrite_clears_the_global_schedule_s_checkpoints_in_a_checkpoint_dir_of_its_own(tmp_path):
    """learner.checkpoint_dir outside the run dir: the learned global schedule keeps its
    checkpoints in <checkpoint dir>/global, which --overwrite left; the global run's own claim then
    refused the run ('already holds a run') after the actors had started."""
    ck = tmp_path / "ck"
    for d in (ck / "ckpt-00000002", ck / "global" / "ckpt-00000004"):
        d.mkdir(parents=True)
    (ck / "global" / "latest").write_text("ckpt-00000004\n")
    with claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={ck}", "--overwrite"))) as rd:
        rd.clear_earlier()
        assert not list(ck.rglob("ckpt-*")) and not (ck / "global" / "latest").exists()


def test_a_checkpoint_url_s_lock_survives_a_failed_read_and_its_store_s_errors_are_one_line(tmp_path, monkeypatch):
    """A store's error (S3's 503 SlowDown, an OSError) on reading a live run's lock was read as
    "unreadable lock": one renewed 20 s ago was removed and taken. Any other error (a bucket that
    is not there, no credentials) was a traceback."""
    from datetime import timedelta

    from fsspec.implementations.memory import MemoryFileSystem

    url = f"memory://ck-{tmp_path.name}"
    _foreign_lock_object(url)
    path = f"/ck-{tmp_path.name}/{LOCK}"
    MemoryFileSystem.store[path].modified -= timedelta(seconds=20)  # renewed 20 s ago: its run lives
    real_cat = MemoryFileSystem.cat_file
    reads = []

    def slow_down(self, p, *args, **kwargs):
        if p.endswith(LOCK):
            reads.append(p)
            if len(reads) > 1:  # the first read sees the lock; the next one meets the store's error
                raise OSError(16, "Please reduce your request rate (SlowDown)")
        return real_cat(self, p, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "cat_file", slow_down)
    with pytest.raises(ConfigError, match=rf"^checkpoint dir {url}: its lock {url}/{LOCK} cannot be taken: OSError: "):
        claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={url}")))
    monkeypatch.setattr(MemoryFileSystem, "cat_file", real_cat)
    assert json.loads(real_cat(MemoryFileSystem(), path))["pid"] == 4242, "still the owner's"
    assert not (tmp_path / "r").exists(), "the run dir it made is removed"

    # an object that is not a lock's record, written lately: never taken for a claim being written
    MemoryFileSystem().pipe(path, b"\x00garbage")
    with pytest.raises(RunDirInUse, match=rf"{url}/{LOCK} is not a lock this program wrote \(0 s old\)"):
        claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={url}")))


def test_a_checkpoint_url_s_lock_is_never_renewed_after_its_release(tmp_path, monkeypatch):
    """The renewals ran on a thread the release did not wait for: one under way as the run ended
    wrote the lock object again after it was removed, and a job submitted again elsewhere was
    refused, then waited out the lease."""
    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.setattr(rundir, "LEASE_RENEW_S", 0.05)
    real_pipe = MemoryFileSystem.pipe_file

    def slow_pipe(self, path, value, *args, **kwargs):
        if path.endswith(LOCK):
            time.sleep(0.3)  # a PUT to a far store
        return real_pipe(self, path, value, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", slow_pipe)
    url = f"memory://ck-{tmp_path.name}"
    said: list[str] = []
    with claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={url}")), log=said.append):
        time.sleep(0.1)  # a renewal is writing it now
    time.sleep(0.6)
    assert not MemoryFileSystem().exists(f"/ck-{tmp_path.name}/{LOCK}"), "released, and left released"

    # a store that cannot be reached as the run ends: a warning, and every other lock released
    monkeypatch.setattr(MemoryFileSystem, "rm", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError("denied")))
    with claim(load_config(_flags(tmp_path, f"--learner.checkpoint_dir={url}")), log=said.append) as rd:
        pass
    assert said[-1] == (
        f"warning: the lock {url}/{LOCK} could not be removed (PermissionError: denied); the next run takes it"
        " over as a stale lock"
    )
    assert not (rd.path / LOCK).exists()
