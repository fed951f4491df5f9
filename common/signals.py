"""The programs' signals. SIGTERM as an interrupt: a job stopped (``ray job stop``), a pod evicted
or preempted ends a program that started or joined Ray as Ctrl-C does, cleaning up on its way
out, not as Ray's own handler ends it (a stack dump and an abort from its C++ core, exit 134).
Ctrl-C while a program still loads its libraries (torch, Ray, diffusers: two seconds or more)
is one line, not the traceback of whichever library was loading."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def loading(module: str) -> Iterator[None]:
    """Around a program's imports: Ctrl-C while they load ends it with ``interrupted: nothing was
    started`` and exit 130. Only where ``module`` (the caller's ``__name__``) is ``__main__``: a
    module imported by another program leaves Ctrl-C to that program."""
    if module != "__main__":
        yield
        return
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted: nothing was started", file=sys.stderr)
        raise SystemExit(130) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM. A training run ends as on Ctrl-C: its actors stopped, Ray shut down if it started
    it, the run dir released, and one line saying what is kept to resume from; an evaluation,
    one line saying nothing of it was written."""


def end_on_sigterm() -> Callable[[], None]:
    """From now on SIGTERM raises ``Terminated`` in the main thread, and a second one, during the
    clean-up, is ignored; returns what puts the handler before back. Called after ``ray.init``,
    whose own handlers it replaces (on a cluster the program started, Ray's handler would also
    leave its processes killed under it)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore
