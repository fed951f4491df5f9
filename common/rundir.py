"""A run directory has one owner.

``claim(cfg)`` is called before anything is written for a run. It

- refuses a run dir path that is a file, and output or checkpoint dirs that cannot be written;
- takes the lock ``<run dir>/.lock`` (host, pid, start time, and where the pid is a number: the
  machine's boot id, the pid namespace and when the process started), created atomically (and
  the same in a local ``learner.checkpoint_dir`` outside the run dir, and as an object
  ``<url>/.lock`` in one on an object store: two runs sharing one would write each other's
  checkpoints), and renews it (its mtime; a lock object is written again) every
  ``LEASE_RENEW_S`` while the run lives. A lock
  whose process is gone is stale and taken over with a warning: in this host's pid space, a pid
  not running; from another host, or a container of the same host name (a pod that was
  preempted, a node lost, a container with host networking: its pid cannot be asked), a lock not
  renewed for ``LEASE_S``, judged by the storage's clock, not this host's. Such a lock that has
  missed its renewals but not yet its lease is waited for. A stale lock is removed
  only while it still holds what was judged (a file is renamed aside, atomically, then checked),
  so of two runs that take one over at once, one holds the dir and the other is refused. Any
  other lock is a refusal that names its owner, and so is one whose very process (the same pid,
  started at the same time) is stopped (SIGSTOP, a suspended job) past its lease. A run whose lock
  another took over (it was stopped that long) finds it at its next renewal or write
  (``Held.check_held``) and stops without writing there again;
- refuses to start a run over one that is there (checkpoints, logs, a policy) unless the user
  says what to do with it: ``--resume auto`` to continue it, ``--overwrite`` to replace it, or a
  new ``experiment.name``;
- removes temporaries that an interrupted run left (a checkpoint's ``.ckpt-*.tmp-*``, a log's
  ``.tmp`` copy): with the lock held nobody else can be writing them.

The claim is released (the lock removed) when the run ends, however it ends; a SIGKILLed run
leaves a stale lock that the next claim takes over.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import Config, ConfigError

LOCK = ".lock"
#: A lock judged stale is renamed to this (and the host and pid) to be taken over; one older than
#: ``LEASE_S`` was left by a process killed in that instant and is removed when a run claims the dir.
TAKEOVER = ".lock.takeover-"
#: the locks this process holds (absolute paths, URLs): a lock naming this process's pid that is
#: not one of them was left by an earlier process that had the same pid (a restarted container's)
_HELD: set[str] = set()
#: Seconds between an owner's renewals of its lock.
LEASE_RENEW_S = 15.0
#: Seconds without a renewal after which a lock from another host is its run's end (a shared
#: filesystem may show an mtime a minute late: NFS caches attributes).
LEASE_S = 120.0
#: Seconds a run waits after writing a lock object (a URL has no exclusive create) before it reads
#: it back to see whether another run wrote it meanwhile.
SETTLE_S = 0.5
#: Seconds a release waits for a renewal under way (one a store holds up is not waited out).
RELEASE_WAIT_S = 5.0
#: Seconds a release that finds no lock file waits before it looks once more: a run taking over a
#: stale lock holds it renamed aside for a rename, a read and a link (``_LockFile.take_over``).
PUT_BACK_S = 0.5
#: What a run leaves in its directory; any of them (non-empty) means "a run is here".
ARTEFACTS = ("checkpoints", "policy", "eval.json", "metrics.jsonl", "rollouts.msgpack", "global")
#: A temporary of a run's writers: ``.<name>.tmp-<pid>`` (a file or a checkpoint being written),
#: ``.<name>.old-<pid>`` (a directory being replaced: ``common.checkpoint.replace_dir``).
_TEMPORARY = re.compile(r"\..+\.(tmp|old)-\d+")
#: The logs' temporaries in the run dir (a log rewritten without its torn tail: learner.loop).
ROLLOUTS_TMP, METRICS_TMP = "rollouts.tmp", "metrics.tmp"
_LOG_TEMPORARIES = (ROLLOUTS_TMP, METRICS_TMP)
#: Where ``learner.evaluate`` writes a run's evaluation unless told (``--out``).
EVALUATION = "evaluation"


#: Where Ray unpacks a job's working dir (``--working-dir``, a runtime_env's ``working_dir``): it
#: is deleted with the cluster's session, and every job of the same code runs in the same one.
_RAY_PACKAGE = re.compile(r"/runtime_resources/working_dir_files/_ray_pkg_[^/]+")


class RunDirInUse(ConfigError):
    """Another live process holds the run directory."""


class RunDirLost(RunDirInUse):
    """Another run took over this run's directory while this process did not renew its lock (it
    was stopped, suspended or frozen past the lease): this run writes nothing there again."""


@functools.cache
def _process_space() -> dict[str, str]:
    """What makes a pid name one process: the host name, and on Linux the kernel's boot id (two
    machines given one name) and the pid namespace (containers sharing the host's name, as with
    host networking, each number their pids from 1). A part that cannot be read is left out."""
    space = {"host": socket.gethostname()}
    with contextlib.suppress(OSError):
        space["boot"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with contextlib.suppress(OSError):
        space["pidns"] = os.readlink("/proc/self/ns/pid")
    return space


def _same_space(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two lock records' pids are numbers in one space (a part only one of them recorded
    is not compared: a lock written before it was)."""
    return a.get("host") == b.get("host") and all(a[k] == b[k] for k in ("boot", "pidns") if k in a and k in b)


def _same_owner(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("pid") == b.get("pid") and _same_space(a, b)


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start) of the process ``pid`` from Linux's /proc/<pid>/stat: its state letter
    (field 3: R running, S sleeping, T stopped, Z a zombie, ...) and when it started, in clock
    ticks after boot (field 22), which with the pid names one process where a pid alone may be
    another's after a reuse. None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return fields[0], fields[19]
    except (OSError, ValueError, IndexError):
        return None


def _start_ticks(pid: int) -> str | None:
    got = _stat(pid)
    return None if got is None else got[1]


def _stopped_owner(owner: dict[str, Any]) -> bool:
    """Whether the lock's own process (its pid, started when it recorded) lives here, stopped
    (SIGSTOP, a suspended job: state T, or t under a tracer): its run goes on when it is let go
    on, so its lock is not taken over, however long it has gone unrenewed. A zombie, a reused pid
    or a live process that stopped renewing it (a release that failed) is not."""
    got = _stat(int(owner.get("pid", -1)))
    return got is not None and owner.get("pid_start") == got[1] and got[0] in ("T", "t")


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process: a zombie (killed, not yet reaped by its parent) is not,
    though /proc still has it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    got = _stat(pid)
    return got is None or got[0] not in ("Z", "X")


def _nonempty(p: Path) -> bool:
    if p.is_dir():
        return any(p.iterdir())
    return p.is_file() and p.stat().st_size > 0


def artefacts(run_dir: Path, checkpoint_dir: Path | None = None) -> list[str]:
    """Names of the run artefacts present in ``run_dir`` (and checkpoints in ``checkpoint_dir``)."""
    found = [name for name in ARTEFACTS if _nonempty(run_dir / name)]
    if (
        checkpoint_dir is not None
        and "checkpoints" not in found
        and checkpoint_dir.is_dir()
        and any(p.name.startswith("ckpt-") for p in checkpoint_dir.iterdir())
    ):
        found.append(str(checkpoint_dir))
    return found


def _check_writable(d: Path, what: str) -> None:
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{what} {d} is not a directory")
    if d.is_symlink() and not d.exists():  # mkdir would say 'File exists'
        raise ConfigError(f"{what} {d} is a symbolic link to {os.readlink(d)}, which does not exist")
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} {d} cannot be written: {e.strerror or e}") from None


def _missing(d: Path) -> list[Path]:
    """``d`` and those of its parents that do not exist, deepest first."""
    d = d.absolute()
    return [p for p in (d, *d.parents) if not p.exists()]


def _remove_if_empty(dirs: list[Path]) -> None:
    """Remove the directories of ``dirs`` (deepest first) that are empty: a claim refused, or a run
    stopped before it wrote anything, leaves no empty run dir behind."""
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()


def _file_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _age(path: Path) -> float:
    """Seconds since ``path`` was last written or renewed, on its filesystem's clock (the mtime of
    a file written now beside it), which other hosts' renewals are stamped with too."""
    probe = path.parent / f".lease-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        now = probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)
    return now - path.stat().st_mtime


def _owner(record: bytes | None) -> dict[str, Any] | None:
    """What a lock's record says of its owner (host, pid, started), or None where it says nothing."""
    try:
        return None if record is None else json.loads(record)
    except ValueError:
        return None


def _lock_owner(lock: Path) -> dict[str, Any] | None:
    """What a lock file says of its owner, or None where it cannot be read."""
    return _owner(_file_bytes(lock))


class _LockFile:
    """The lock ``<directory>/.lock`` on a filesystem (local, or shared by NFS): created with
    O_EXCL, so of two runs that create it at once one gets it."""

    #: A lock file is created, then written: one that cannot be read is being written for this long
    #: (waited for), and abandoned after it.
    UNREADABLE_S = 10.0
    WAITS_WHILE_UNREADABLE = True
    #: errors of taking it that are the storage's own (a local filesystem's OSError: the caller's)
    STORAGE_ERRORS: tuple[type[Exception], ...] = ()

    def __init__(self, directory: Path):
        self.directory, self.path = directory, directory / LOCK
        self.record = b""  # what this run wrote, once it holds the lock

    def __str__(self) -> str:
        return str(self.path)

    def key(self) -> str:
        return str(self.path.absolute())

    def create(self, record: bytes) -> bool:
        """Write ``record`` as the lock where there is none: False where there is one. A record
        that cannot be written (a full disk) leaves no lock: an empty one refused the next run."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        made = os.fstat(fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(record)
        except BaseException as e:
            with contextlib.suppress(OSError):  # only the file made here: a stalled write's may be taken over
                now = os.stat(self.path)
                if (now.st_dev, now.st_ino) == (made.st_dev, made.st_ino):
                    self.path.unlink()
            if isinstance(e, OSError) and e.filename is None and e.errno is not None:
                e.filename = str(self.path)
            raise
        self.record = record
        return True

    def is_link(self) -> bool:
        """A symbolic link is never a lock this program wrote (O_EXCL will not follow it)."""
        return self.path.is_symlink()

    def read_bytes(self) -> bytes | None:
        """The lock's bytes, or None where there is none or it cannot be read."""
        return _file_bytes(self.path)

    def take_over(self, seen: bytes | None) -> bool:
        """Remove the lock judged stale from its bytes ``seen``, only where it still holds them:
        renamed aside first (one atomic step), so that of two runs taking over one stale lock only
        one removes it. A lock that the other created meanwhile is put back (linked: never over a
        lock a third created in that instant). False where there was nothing of ``seen`` to take."""
        aside = self.directory / f"{TAKEOVER}{socket.gethostname()}-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # taken over (or released) by another meanwhile
            return False
        try:
            if _file_bytes(aside) == seen:
                return True
            try:
                os.link(aside, self.path)  # the same file: its owner's renewals and release work on
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links
                if not self.path.exists():
                    os.rename(aside, self.path)
            return False
        finally:
            aside.unlink(missing_ok=True)

    def age(self) -> float:
        return _age(self.path)

    def renew(self) -> bytes | bool:
        """Renew the lock while it is still this run's (True); else the record of the run that took
        it over, or False where it could not be renewed now (gone, unreadable or unwritable for a
        moment: the next renewal tries again)."""
        found = self.read_bytes()
        if found is not None and found != self.record:
            return found
        try:
            os.utime(self.path)
        except OSError:
            return False
        return found is not None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def release(self, me: dict[str, Any]) -> None:
        """Remove the lock where it is still ``me``'s (or unreadable). One that is not there may be
        set aside for a moment by a run taking over a stale lock, which puts it back where it was not
        the stale one: it is looked for once more after PUT_BACK_S, so that it is not left put back
        (naming this run, until this process ends or, to another host, until its lease runs out)."""
        if not os.path.lexists(self.path):
            time.sleep(PUT_BACK_S)
        owner = _owner(self.read_bytes())
        if owner is None or _same_owner(owner, me):
            self.remove()


class _LockObject:
    """The lock object ``<url>/.lock`` of a checkpoint dir on an object store (s3://, gs://). It is
    created only where there is none (``pipe_file(mode="create")``: S3's and GCS's conditional
    writes, where s3fs and gcsfs have them) and read back ``SETTLE_S`` later (fsspec's fallback
    for that mode looks, then writes): of two runs that wrote it at once, the one that reads the
    other's record gives way. An object is written whole, so one that cannot be read is never a
    claim being written: it is refused until it has gone ``LEASE_S`` unrenewed. Its age is judged
    by the store's clock (the modification time of an object written now), and a renewal writes it
    again, only while it is still this run's."""

    UNREADABLE_S = LEASE_S
    WAITS_WHILE_UNREADABLE = False
    #: a store's errors are its SDK's (botocore's, google's): one line naming the lock
    STORAGE_ERRORS: tuple[type[Exception], ...] = (Exception,)

    def __init__(self, url: str):
        from common.checkpoint import storage

        self.url = url.rstrip("/")
        self.fs, root = storage(self.url)
        self.path = f"{root.rstrip('/')}/{LOCK}"
        self.record = b""

    def __str__(self) -> str:
        return f"{self.url}/{LOCK}"

    def key(self) -> str:
        return str(self)

    def create(self, record: bytes) -> bool:
        if self.read_bytes() is not None:
            return False
        try:
            self.fs.pipe_file(self.path, record, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # a filesystem without the mode: a plain write
            self.fs.pipe(self.path, record)
        except OSError as e:
            if e.errno != errno.ENOSYS:  # a conflict or an error of the store: never overwrite another's
                raise
            self.fs.pipe(self.path, record)
        try:  # fsspec's own fallback for the mode looks, then writes: read it back once another
            # run's write would have landed
            time.sleep(SETTLE_S)
            if self.read_bytes() != record:
                return False
        except BaseException:  # interrupted, or the store failed: the object written is nobody's
            with contextlib.suppress(Exception):
                if self.read_bytes() == record:
                    self.remove()
            raise
        self.record = record
        return True

    def read_bytes(self) -> bytes | None:
        """The lock's bytes, read from the store itself (never a listing cached by the filesystem
        object: s3fs caches them), or None where there is none; a store that cannot be read raises
        (one failed read is not evidence that a lock is abandoned)."""
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def is_link(self) -> bool:
        return False

    def take_over(self, seen: bytes | None) -> bool:
        """Remove the lock judged stale from its bytes ``seen`` where it still holds them (read
        again just before: a store has no delete-if-unchanged that fsspec reaches, so two runs
        taking over one stale lock at the same instant are told apart only by ``create``'s check)."""
        if self.read_bytes() != seen:
            return False
        self.remove()
        return True

    def age(self) -> float:
        folder = self.path.rsplit("/", 1)[0]
        probe = f"{folder}/.lease-probe-{socket.gethostname()}-{os.getpid()}"
        self.fs.invalidate_cache(folder)
        try:
            self.fs.pipe(probe, b"")
            now = self.fs.modified(probe)
            return (now - self.fs.modified(self.path)).total_seconds()
        except NotImplementedError:
            raise RunDirInUse(
                f"{self} is held, and this storage cannot say when it was last renewed; delete it if no run uses"
                " the checkpoint dir"
            ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(probe)

    def renew(self) -> bytes | bool:
        """As ``_LockFile.renew``: one taken over meanwhile (renewals failed for LEASE_S) is left."""
        try:
            found = self.read_bytes()
            if found is not None and found != self.record:
                return found
            if found is None:
                return False
            self.fs.pipe(self.path, self.record)
        except Exception:  # noqa: BLE001 - any store error: the next renewal tries again
            return False
        return True

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path)

    def release(self, me: dict[str, Any]) -> None:
        if self.read_bytes() == self.record:
            self.remove()


class _Lease:
    """The lock of one directory a run writes (``what``: "run dir", "checkpoint dir"): a lock file
    in a local directory, a lock object under a URL; taken, renewed by a thread of its own while
    held, judged stale and taken over as the module docstring says."""

    def __init__(self, directory: Path | str, what: str, instead: str, log: Callable[[str], None], holder: str = "run"):
        self.directory, self.what, self.instead, self.log, self.holder = directory, what, instead, log, holder
        self.lock = _LockObject(directory) if isinstance(directory, str) else _LockFile(directory)
        self.held = False
        self.me = {**_process_space(), "pid": os.getpid(), "pid_start": _start_ticks(os.getpid()), "started": ""}
        self._guard = threading.Lock()  # a renewal and the release never interleave
        self._stop = threading.Event()
        self.renewed = time.monotonic()  # when the lock was last found this run's
        self.lost: str | None = None  # why the lock is another run's now

    def acquire(self) -> None:
        try:
            self._acquire()
        except RunDirInUse:
            raise
        except self.lock.STORAGE_ERRORS as e:
            raise ConfigError(
                f"{self.what} {self.directory}: its lock {self.lock} cannot be taken: {type(e).__name__}: {e}"
            ) from None
        threading.Thread(target=self._renew, name="run-dir-lease", daemon=True).start()

    def _acquire(self) -> None:
        self.me["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        me, lock = self.me, self.lock
        for _ in range(3):
            if not lock.create(json.dumps(me).encode()):
                if lock.is_link():
                    raise RunDirInUse(
                        f"{lock} is a symbolic link, not a lock; delete it if no run uses the {self.what}"
                    )
                seen = lock.read_bytes()
                owner = _owner(seen)
                if owner is None:  # being written, left half-written by a process that died, or not ours
                    try:
                        age = lock.age()
                    except FileNotFoundError:  # released while we looked: the next attempt takes it
                        continue
                    if age < lock.UNREADABLE_S and lock.WAITS_WHILE_UNREADABLE:
                        time.sleep(1.0)  # a claim being written right now
                        continue
                    if age < lock.UNREADABLE_S:
                        raise RunDirInUse(
                            f"{lock} is not a lock this program wrote ({age:.0f} s old); delete it if no run uses"
                            f" the {self.what}"
                        )
                    if lock.take_over(seen):
                        self.log(f"warning: removed an unreadable lock file {lock} ({age:.0f} s old)")
                    continue
                why = self._gone(owner)
                if why is not None:
                    if lock.take_over(seen):  # else another run took it over first: the next attempt sees its lock
                        self.log(why)
                    continue
                raise RunDirInUse(
                    f"{self.what} {self.directory} is in use by pid {owner.get('pid')} on host {owner.get('host')}"
                    f" (since {owner.get('started')}); use another {self.instead}, or delete {lock} if that"
                    f" {self.holder} is gone"
                ) from None
            self.held = True
            _HELD.add(lock.key())
            return
        raise RunDirInUse(f"could not take the lock {lock}: others took and released it meanwhile; try again")

    def _gone(self, owner: dict[str, Any]) -> str | None:
        """The warning that takes over the lock of ``owner``, whose run is gone; None while it lives."""
        me, lock = self.me, self.lock
        pid = int(owner.get("pid", -1))
        here = _same_space(owner, me)  # its pid can be asked here
        earlier = here and pid == os.getpid() and lock.key() not in _HELD
        if here and not earlier and _stopped_owner(owner):
            return None  # its very process, stopped past its lease: its run, never taken over
        if here and (earlier or not _pid_alive(pid)):
            gone = "left by an earlier process with this one's pid" if earlier else "no longer running"
            return (
                f"warning: taking over the stale lock of pid {owner.get('pid')}"
                f" (started {owner.get('started')}, {gone}) on the {self.what}"
            )
        if here and pid != os.getpid() and self._ran_out(owner):
            # its pid is another process's now (reused; or a lock that did not record its pid namespace,
            # of a container since restarted in its pod: the host name kept, the pids numbered again)
            return (
                f"warning: taking over the lock of pid {owner.get('pid')} (started {owner.get('started')}): not"
                f" renewed for more than {LEASE_S:g} s, its run is gone (pid {pid} is another process)"
            )
        if not here and self._ran_out(owner):
            namesake = " (another machine or container of this name)" if owner.get("host") == me["host"] else ""
            return (
                f"warning: taking over the lock of pid {owner.get('pid')} on host {owner.get('host')}{namesake}"
                f" (started {owner.get('started')}): not renewed for more than {LEASE_S:g} s, its run is gone"
            )
        return None

    def _ran_out(self, owner: dict[str, Any]) -> bool:
        """Whether a lock whose pid cannot be asked here has gone ``LEASE_S`` without a renewal. One renewed lately
        is its live run's (False at once); one that has missed two renewals is waited for, until it
        is renewed (False) or its lease runs out (True)."""
        said = False
        while True:
            try:
                age = self.lock.age()
            except FileNotFoundError:  # released while we looked: the next attempt takes it
                return False
            if age > LEASE_S:
                return True
            if age < 2 * LEASE_RENEW_S:
                return False
            if not said:
                self.log(
                    f"the {self.what}'s lock, of pid {owner.get('pid')} on host {owner.get('host')}, has not been"
                    f" renewed for {age:.0f} s: waiting until {LEASE_S:g} s to take it over"
                )
                said = True
            time.sleep(min(LEASE_RENEW_S, LEASE_S - age) / 2)

    def _renew(self) -> None:
        """The lock renewed every LEASE_RENEW_S until the release (a thread per lease: a store that
        hangs a call delays no other lock's renewal)."""
        while not self._stop.wait(LEASE_RENEW_S):
            with self._guard:
                self._renew_once()

    def _renew_once(self) -> None:
        """One renewal (the guard held): a lock found another run's is this run's no more."""
        if not self.held:
            return
        taker = self.lock.renew()
        if taker is True:
            self.renewed = time.monotonic()
        if isinstance(taker, bool):  # renewed, or not now: the next renewal (or check) looks again
            return
        owner = _owner(taker) or {}
        self.held = False  # never renewed or removed again: the release leaves it to its new owner
        _HELD.discard(self.lock.key())
        self.lost = (
            f"the {self.what} {self.directory} was taken over by pid {owner.get('pid')} on host {owner.get('host')}"
            f" (since {owner.get('started')}): this process did not renew its lock for more than {LEASE_S:g} s"
            " (stopped or suspended?); it stops without writing there again"
        )

    def check(self) -> None:
        """Raise ``RunDirLost`` where the lock is another run's now. Where renewals were missed (the
        process was stopped, its clock still ran), the lock is read here and now, before anything
        more is written, not at the next renewal."""
        missed = self.held and time.monotonic() - self.renewed > 2 * LEASE_RENEW_S
        if missed and self._guard.acquire(blocking=False):  # else a renewal is looking (or stuck): not waited for
            try:
                self._renew_once()
            finally:
                self._guard.release()
        if self.lost is not None:
            raise RunDirLost(self.lost)

    def stop_renewing(self) -> None:
        self._stop.set()

    def release(self) -> None:
        self.stop_renewing()
        if not self.held:
            return
        # a renewal under way finishes first (so it never writes the lock after its removal); one
        # that a store holds up is not waited out: the lock is left to run out its lease
        guarded = self._guard.acquire(timeout=RELEASE_WAIT_S)
        try:
            if not self.held:
                return
            self.held = False
            _HELD.discard(self.lock.key())
            if not guarded:
                self.log(f"warning: the lock {self.lock} is left to run out its lease: its renewal did not return")
                return
            try:
                self.lock.release(self.me)
            except Exception as e:  # noqa: BLE001 - a store that cannot be reached now: its lease runs out
                self.log(
                    f"warning: the lock {self.lock} could not be removed ({type(e).__name__}: {e}); the next run"
                    " takes it over as a stale lock"
                )
        finally:
            if guarded:
                self._guard.release()


class Held:
    """Directories held under their locks (``<dir>/.lock``), each renewed by a thread of its own
    until the release; the directories the claim made are removed then if they are still empty (a
    context manager: the locks go on exit). ``dirs``: (directory or URL, what it is, the setting
    that chooses another, who holds such a lock)."""

    def __init__(
        self,
        dirs: list[tuple[Path | str, str, str, str]],
        log: Callable[[str], None] = print,
        made: list[Path] | None = None,
    ):
        self.dirs, self.log = dirs, log
        self.made = made or []
        self.leases: list[_Lease] = []

    def _acquire(self) -> None:
        try:
            for directory, what, instead, holder in self.dirs:
                lease = _Lease(directory, what, instead, self.log, holder)
                self.leases.append(lease)  # released with the others whatever happens from here
                lease.acquire()  # renewed from now on, while the next ones are taken
        except BaseException:
            self.release()
            raise

    def check_held(self) -> None:
        """``RunDirLost`` where another run took over one of the locks: called before the run
        writes its logs or a checkpoint."""
        for lease in self.leases:
            lease.check()

    def release(self) -> None:
        """Every lock released, even if one release is interrupted (its error raised after)."""
        for lease in self.leases:
            lease.stop_renewing()
        first: BaseException | None = None
        for lease in self.leases:
            try:
                lease.release()
            except BaseException as e:  # noqa: BLE001 - raised below, once the others are released
                first = first or e
        self.leases = [lease for lease in self.leases if lease.held]
        _remove_if_empty(self.made)
        if first is not None:
            raise first

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(directory: Path, what: str, instead: str, holder: str) -> Held:
    """``directory`` (made where missing) held by this process: a directory that is not a run's
    but that one process at a time writes (an evaluation's ``--out``); a ConfigError names its
    live owner."""
    made = _missing(directory)
    _check_writable(directory, what)
    held = Held([(directory, what, instead, holder)], made=made)
    held._acquire()
    return held


class RunDir(Held):
    """The claim on one run directory, and on its checkpoint directory where that is one of its
    own (a local path outside the run dir, or a URL): two runs that share a
    ``learner.checkpoint_dir`` would write each other's ckpt-* (an --overwrite would delete the
    other's)."""

    def __init__(
        self,
        path: Path,
        checkpoint_dir: Path | None,
        log: Callable[[str], None] = print,
        made: list[Path] | None = None,
        checkpoint_url: str | None = None,
    ):
        """``checkpoint_url``: a learner.checkpoint_dir on shared storage (s3://, gs://), whose
        checkpoints are the run's artefacts too, held by a lock object there."""
        dirs: list[tuple[Path | str, str, str, str]] = [(path, "run dir", "experiment.name", "run")]
        if checkpoint_dir is not None and not checkpoint_dir.resolve().is_relative_to(path.resolve()):
            dirs.append((checkpoint_dir, "checkpoint dir", "learner.checkpoint_dir", "run"))
        if checkpoint_url is not None:  # two runs on other hosts given one URL would write each other's checkpoints
            dirs.append((checkpoint_url, "checkpoint dir", "learner.checkpoint_dir", "run"))
        super().__init__(dirs, log, made)
        self.path, self.checkpoint_dir, self.checkpoint_url = path, checkpoint_dir, checkpoint_url
        #: --overwrite: the earlier run is here until this one has started (``clear_earlier``)
        self.earlier = False

    def __enter__(self) -> RunDir:
        return self

    # -- what is there ----------------------------------------------------------------------------

    def artefacts(self) -> list[str]:
        found = artefacts(self.path, self.checkpoint_dir)
        if self.checkpoint_url is not None and self._store().names():
            found.append(self.checkpoint_url)
        return found

    def _store(self, sub: str = "") -> Any:
        """The store of ``learner.checkpoint_dir`` (a local path or a URL), or of ``sub`` inside it."""
        from common.checkpoint import CheckpointStore

        root = (self.checkpoint_url or str(self.checkpoint_dir)).rstrip("/")
        return CheckpointStore(f"{root}/{sub}" if sub else root)

    def clean_temporaries(self) -> None:
        """Remove what an interrupted writer left: checkpoint and log temporaries, and a lock that a
        run killed while taking it over had renamed aside (once its lease has run out: a younger one
        is a live run's lock on its way back). Only the names a run writes: a checkpoint dir of a
        user's own may hold their ``notes.tmp`` or ``report.old-2023``."""
        roots = [self.path, self.path / "checkpoints", self.path / "global", self.path / "global" / "checkpoints"]
        if self.checkpoint_dir is not None:
            roots += [self.checkpoint_dir, self.checkpoint_dir / "global"]
        for root in roots:
            if not root.is_dir():
                continue
            for p in root.iterdir():
                if _TEMPORARY.fullmatch(p.name) or (root == self.path and p.name in _LOG_TEMPORARIES):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                elif p.name.startswith(TAKEOVER):  # a taker killed mid-way left it
                    with contextlib.suppress(FileNotFoundError):
                        if _age(p) > LEASE_S:
                            p.unlink(missing_ok=True)
        if self.checkpoint_url is not None:
            self._store().clean()

    def _check_evaluation_free(self) -> None:
        """A ConfigError naming the live evaluation that writes the earlier run's evaluation dir."""
        evaluation = self.path / EVALUATION
        if evaluation.is_dir():
            hold(evaluation, "the earlier run's evaluation dir", "experiment.name", "evaluation").release()

    def clear_earlier(self) -> None:
        """--overwrite: the earlier run is removed now, once this one has started (its actors up, its
        checks passed), so that a run that cannot start leaves it as it was (before, the claim
        removed it: a device, a GPU share or a reward that could not start cost the run it was to
        replace, and no run took its place). Nothing where there was no earlier run. The claim is
        checked first: the actors may have taken minutes to start, and the dir may be another's now."""
        self.check_held()
        if self.earlier:
            self.log(f"--overwrite: removing the earlier run in {self.path}")
            self.clear()
            self.earlier = False

    def clear(self) -> None:
        """--overwrite: remove every artefact of the earlier run (its checkpoints too, and its
        evaluation: refused, before anything is removed, while an evaluation writes it)."""
        self._check_evaluation_free()
        evaluation = self.path / EVALUATION
        if evaluation.is_dir():
            shutil.rmtree(evaluation)
        for name in (*ARTEFACTS, "config.yaml", "tb", "schedules.png", "reward_curve.png", "samples.png"):
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        # the checkpoints of the run and of its learned global schedule (``<checkpoint dir>/global``)
        if self.checkpoint_dir is not None or self.checkpoint_url is not None:
            self._store().clear()
            self._store("global").clear()


def _a_run(d: Path) -> bool:
    """Whether ``d`` is a run's directory: its config.yaml, and its lock or something it wrote;
    a run of this process (the training run whose global baseline is a run inside it) is not."""
    if not (d / "config.yaml").is_file() or not (artefacts(d) or (d / LOCK).exists()):
        return False
    owner = _lock_owner(d / LOCK)
    return not (owner and _same_owner(owner, {**_process_space(), "pid": os.getpid()}))


def _inside_a_run(d: Path, mine: Path) -> Path | None:
    """The directory of another run that ``d`` is (or lies inside), other than ``mine``; links
    followed (a name that is a link into another run's checkpoints/ is inside that run)."""
    d, mine = d.resolve(), mine.resolve()
    for above in (d, *d.parents):
        if above == mine:
            return None
        if _a_run(above):
            return above
    return None


def _a_run_inside(path: Path) -> Path | None:
    """The directory of another run below ``path`` (its own global baseline's run aside), or None."""
    if not path.is_dir():
        return None
    for config in sorted(path.rglob("config.yaml")):
        d = config.parent
        if d not in (path, path / "global") and _a_run(d):
            return d
    return None


def _check_not_anothers(cfg: Config, ckpt_dir: Path | None) -> None:
    """Refuse a run dir inside another run's directory (its checkpoints, its policy), and a
    checkpoint dir that is another run's (inside its run dir, or holding its checkpoints):
    --overwrite would delete or overwrite that run's files."""
    path = cfg.run_dir
    other = _inside_a_run(path.resolve().parent, path)
    if other is not None:
        raise ConfigError(
            f"run dir {path} is inside the run dir {other} of another run; choose an experiment.name outside it"
        )
    inner = _a_run_inside(path)
    if inner is not None:  # that run could not be continued or replaced after: it would be inside this one
        raise ConfigError(
            f"run dir {path} holds the run dir {inner} of another run; choose an experiment.name beside it"
        )
    url = checkpoint_url(cfg)
    if url is None and (ckpt_dir is None or ckpt_dir.absolute().is_relative_to(path.absolute())):
        return
    other = _inside_a_run(ckpt_dir, path) if ckpt_dir is not None else None
    if other is None and cfg.resume is None:  # the run that wrote its newest checkpoint (a run since gone)
        from common.checkpoint import CheckpointStore

        writer = CheckpointStore(url or str(ckpt_dir)).writer()
        other = writer if writer is not None and writer.absolute() != path.absolute() else None
    if other is not None:
        raise ConfigError(
            f"learner.checkpoint_dir {url or ckpt_dir} holds the checkpoints of another run ({other}); give this run"
            " a checkpoint dir of its own (--overwrite would delete that run's checkpoints)"
        )


def local_checkpoint_dir(cfg: Config) -> Path | None:
    d = cfg.learner.checkpoint_dir
    if d is None:
        return None
    return None if "://" in d and not d.startswith("file://") else Path(d.removeprefix("file://"))


def checkpoint_url(cfg: Config) -> str | None:
    """``learner.checkpoint_dir`` where it is on shared storage (s3://, gs://), not a local path."""
    return cfg.learner.checkpoint_dir if local_checkpoint_dir(cfg) is None else None


def claim(cfg: Config, log: Callable[[str], None] = print) -> RunDir:
    """Take ownership of ``cfg.run_dir`` for this process (see the module docstring)."""
    path = cfg.run_dir
    out = cfg.experiment.output_dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"experiment.output_dir {out} is a file, not a directory")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run dir {path} is a file, not a directory")
    ckpt_dir = local_checkpoint_dir(cfg)
    for setting, where in (("experiment.output_dir", out), ("learner.checkpoint_dir", ckpt_dir)):
        package = _RAY_PACKAGE.search(str(where.absolute())) if where is not None else None
        if package is not None:  # a relative path, in a job submitted with its working dir
            raise ConfigError(
                f"{setting} {where} is in Ray's copy of the job's working dir ({package.string[: package.end()]}),"
                " which Ray deletes with its session and shares with every job of the same code: give a path on"
                f" storage that outlives the job, e.g. --{setting}=/mnt/runs"
            )
    if ckpt_dir is None and cfg.learner.checkpoint_dir is not None:  # a URL: its filesystem can be opened
        from common.checkpoint import storage

        storage(cfg.learner.checkpoint_dir)
    _check_not_anothers(cfg, ckpt_dir)
    made = _missing(path) + (_missing(ckpt_dir) if ckpt_dir is not None else [])
    try:
        _check_writable(path, "run dir")
        if ckpt_dir is not None:
            _check_writable(ckpt_dir, "checkpoint dir")
    except ConfigError:
        _remove_if_empty(made)
        raise
    rd = RunDir(path, ckpt_dir, log, made, checkpoint_url(cfg))
    rd._acquire()
    try:
        found = rd.artefacts()
        if found and cfg.resume is None:
            if not cfg.overwrite:
                raise ConfigError(
                    f"run dir {path} already holds a run ({', '.join(found)}): pass --resume auto to continue it,"
                    " --overwrite to replace it, or choose a new experiment.name"
                )
            rd._check_evaluation_free()  # refused now, before anything starts
            log(f"--overwrite: the earlier run in {path} is removed once this run has started")
            rd.earlier = True
        rd.clean_temporaries()
    except BaseException:
        rd.release()
        raise
    return rd
