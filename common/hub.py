"""Models and files named by a hub id, when this machine has no copy and the hub cannot give one.

diffusers, transformers and huggingface_hub each say it their own way, and diffusers' way is
wrong (``X does not appear to have a file named model_index.json`` when the network is down). A
loader wraps its hub call in ``fetched``, which says it in one line: what was asked for, why the
hub did not give it, and the setting that gives a local copy instead. Meanwhile the hub client's
retries (two lines each, five per file, from every actor that loads a model) are counted, not
printed, and the line says how many there were and how long they waited.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

#: modules whose exceptions are the network failing (the hub's HTTP clients and the socket layer)
_NETWORK = ("httpx", "httpcore", "requests", "urllib3", "socket", "ssl")


def hub_problem(e: BaseException) -> str | None:
    """Why the hub gave no copy, where ``e`` (or an exception it was raised from) says a file is
    neither in the hub cache nor fetchable; None for any other error."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    chain: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    if not any(isinstance(x, LocalEntryNotFoundError) for x in chain):
        return None
    for x in chain:
        top = type(x).__module__.split(".")[0]  # a client's major version may end its name (httpx2)
        if top in _NETWORK or top.rstrip("0123456789") in _NETWORK:
            return f"the hub cannot be reached ({type(x).__name__}: {' '.join(str(x).split())})"
    return "downloads are off (local_files_only, or HF_HUB_OFFLINE=1)"


#: the loggers of huggingface_hub's retry loops (``http_backoff`` and the Xet/LFS upload's)
_RETRY_LOGGERS = ("huggingface_hub.utils._http", "huggingface_hub.hf_api")
_WAIT = re.compile(r"(?:Retrying in|Rate limited\. Waiting) ([0-9.]+)s")


@contextmanager
def dropping(loggers: Sequence[str], drop: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """While in the block, the records of ``loggers`` (names; "" is the root logger) for which
    ``drop`` is true are not printed: a library's lines that would be wrong or noise on every
    run's terminal (a model "initialized randomly" that is loaded right after)."""

    class Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not drop(record)

    f, named = Drop(), [logging.getLogger(name) for name in loggers]
    for logger in named:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger in named:
            logger.removeFilter(f)


@contextmanager
def fetched(what: str, instead: str) -> Iterator[None]:
    """Run a hub load: an error that is the hub giving no copy becomes one OSError, ``{what} is
    neither a local path nor in the hub cache, and {why}: {instead}``; any other passes as it is.
    The hub client's retry lines ("'<error>' thrown while requesting ...", "Retrying in 4s [Retry
    3/5].") are not printed (the error counts them and the seconds waited), nor diffusers' warning
    that it passes an argument the hub client no longer reads, on every load from the hub."""
    waits: list[float] = []

    def retry_line(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        wait = _WAIT.match(text)
        if wait:
            waits.append(float(wait.group(1)))
        return wait is not None or "thrown while requesting" in text

    try:
        with dropping(_RETRY_LOGGERS, retry_line), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*`local_dir_use_symlinks` argument is deprecated")
            yield
    except Exception as e:
        why = hub_problem(e)
        if why is None:
            raise
        if waits:
            why += f" after {len(waits)} retries over {sum(waits):.0f} s"
        raise OSError(f"{what} is neither a local path nor in the hub cache, and {why}: {instead}") from e
