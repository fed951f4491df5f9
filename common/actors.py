"""What the run's Ray actors (rollout workers, reward and metric servers) share: how a constructor
that fails reaches the user.

Ray prints an error raised in an actor's constructor, with its whole traceback, on the driver's
terminal (often a hundred lines: a model that cannot be downloaded) before the driver can say what
failed in one line. An error raised by a call only travels back as that call's result. So the first
construction of an actor keeps its error, and ``pid`` (the call the driver waits on to know that the
actor started) raises it, with its traceback; the driver says it in one line
(``learner.groups._wait_started``). A construction after Ray restarted the actor raises at once, as
any constructor does: the actor is dead, and the run handles it as a dead worker or server.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
A = TypeVar("A", bound="Actor")


class Actor:
    """Base of the run's actors: ``pid`` answers once the actor is built, or raises the error its
    constructor (wrapped in ``started``) kept."""

    _start_error: Exception | None = None

    def pid(self) -> int:
        if self._start_error is not None:
            raise self._start_error
        return os.getpid()


def started(init: Callable[Concatenate[A, P], None]) -> Callable[Concatenate[A, P], None]:
    """Wrap an ``Actor``'s ``__init__``: an error in a Ray actor's first construction is kept for
    ``pid`` to raise. Outside Ray, and after a restart, the constructor raises as usual."""

    @functools.wraps(init)
    def wrapped(self: A, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            init(self, *args, **kwargs)
        except Exception as e:
            if not _first_construction_of_an_actor():
                raise
            self._start_error = e

    return wrapped


def _first_construction_of_an_actor() -> bool:
    import ray

    if not ray.is_initialized():
        return False
    context: Any = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # Ray reads its own deprecated actor_id property here
        warnings.simplefilter("ignore")
        return not context.was_current_actor_reconstructed
