"""Models and files named by a hub id, when this machine has no copy and the hub cannot give one.

diffusers, transformers and huggingface_hub each say it their own way, and diffusers' way is
wrong (``X does not appear to have a file named model_index.json`` when the network is down). A
loader wraps its hub call in ``fetched``, which says it in one line: what was asked for, why the
hub did not give it, and the setting that gives a local copy instead.
"""

from __future__ import annotations

from collections.abc import Iterator
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
        if type(x).__module__.split(".")[0].rstrip("0123456789") in _NETWORK:
            return f"the hub cannot be reached ({type(x).__name__}: {' '.join(str(x).split())})"
    return "downloads are off (local_files_only, or HF_HUB_OFFLINE=1)"


@contextmanager
def fetched(what: str, instead: str) -> Iterator[None]:
    """Run a hub load: an error that is the hub giving no copy becomes one OSError, ``{what} is
    neither a local path nor in the hub cache, and {why}: {instead}``; any other passes as it is."""
    try:
        yield
    except Exception as e:
        why = hub_problem(e)
        if why is None:
            raise
        raise OSError(f"{what} is neither a local path nor in the hub cache, and {why}: {instead}") from e
