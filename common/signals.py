"""The programs' signals. SIGTERM as an interrupt: a job stopped (``ray job stop``), a pod evicted
or preempted ends a program that started or joined Ray as Ctrl-C does, cleaning up on its way
out, not as Ray's own handler ends it (a stack dump and an abort from its C++ core, exit 134).
Ctrl-C or SIGTERM while a program still loads its libraries (torch, Ray, diffusers: two seconds
or more) is one line, not the traceback of whichever library was loading, nor a silent death.
While Ray starts (``held``) both wait until it has: stopped half-way, it left processes running
with nobody to stop them, or aborted with a stack dump."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def loading(module: str) -> Iterator[None]:
    """Around a program's imports: Ctrl-C while they load ends it with ``interrupted: nothing was
    started`` and exit 130, SIGTERM with ``terminated: ...`` and 143; SIGTERM raises
    ``Terminated`` from here on (``end_on_sigterm``). Only where ``module`` (the caller's
    ``__name__``) is ``__main__``: a module imported by another program leaves its signals to it."""
    if module != "__main__":
        yield
        return
    end_on_sigterm()  # from the start: the program stops as it does on Ctrl-C, not killed outright
    try:
        yield
    except KeyboardInterrupt as e:
        word, code = how_stopped(e)
        print(f"{word}: nothing was started", file=sys.stderr)
        raise SystemExit(code) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM. A training run ends as on Ctrl-C: its actors stopped, Ray shut down if it started
    it, the run dir released, and one line saying what is kept to resume from; an evaluation,
    one line saying nothing of it was written."""


#: Whether SIGTERM was received under ``end_on_sigterm``: raised inside a blocking Ray call
#: (``ray.get``), ``Terminated`` comes out of it as a plain KeyboardInterrupt.
_sigterm_seen = False


def how_stopped(e: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped a program, in its last line's word, and its exit status: ``("terminated",
    143)`` for SIGTERM, ``("interrupted", 130)`` for Ctrl-C."""
    return ("terminated", 143) if isinstance(e, Terminated) or _sigterm_seen else ("interrupted", 130)


def end_on_sigterm() -> Callable[[], None]:
    """From now on SIGTERM raises ``Terminated`` in the main thread, and a second one, during the
    clean-up, is ignored; returns what puts the handler before back. Called again after
    ``ray.init``, whose C++ core installs a handler of its own (a stack dump, then Ray's exit) that
    would otherwise leave the processes of a cluster the program started killed under it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum: int, frame: object) -> None:
        global _sigterm_seen
        _sigterm_seen = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    global _sigterm_seen
    _sigterm_seen = False
    previous = signal.signal(signal.SIGTERM, terminate)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


@contextlib.contextmanager
def held(*signums: int) -> Iterator[list[int]]:
    """Within: the signals ``signums`` (SIGINT, SIGTERM) are only noted, in the list yielded, in
    the order they came; on the way out the handlers before are put back (over any a library
    installed meanwhile) and the caller acts on what was noted. For a step that must not stop
    half-way: ``ray.init`` stopped while it starts a cluster leaves some of its processes running
    with nobody to stop them. Main thread only (elsewhere nothing is held)."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def note(signum: int, frame: object) -> None:
        noted.append(signum)

    previous = {s: signal.signal(s, note) for s in signums}
    try:
        yield noted
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
