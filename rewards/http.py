"""A reward scored by a remote service over HTTP, with msgpack bodies (docs/method.md, The system).

Protocol (served by ``python -m rewards.http_server``):

    POST /score   Content-Type: application/msgpack
        request   {"images": uint8 [N, H, W, 3], "prompts": [N strings]}
        200       {"scores": float32 [N]}
        4xx, 5xx  {"error": "message"}
    GET /health   200 {"reward": name}

Arrays travel as ``common.codec``'s ext type (dtype, shape, raw little-endian bytes). Both
sides decode strictly: a size limit first, then the codec's dtype whitelist and shape/size
agreement, then pydantic validation of the message (dtype, rank, sizes, N agreeing with the
prompts). Nothing is ever unpickled.

The client retries a bounded number of times, with exponential backoff, on what a retry can
cure (connection refused or reset, a timeout, 429, 502, 503, 504); a 4xx or a 500 (the reward
itself failed) is raised at once with the server's message. Scoring is a pure function of its
inputs, so a retried request is harmless.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from common.codec import DecodeError, pack, unpack
from common.messages import ArrayMessage, Message
from common.prompts import MAX_PROMPT_CHARS
from rewards.images import stack_uint8
from rewards.registry import register

CONTENT_TYPE = "application/msgpack"
MAX_REQUEST_BYTES = 256 * 2**20
MAX_RESPONSE_BYTES = 2**20
MAX_SIDE = 8192
RETRY_STATUS = {429, 502, 503, 504}
#: The longest wait between two attempts, unless ``backoff`` itself is longer: the doubling waits
#: of 20 retries at 0.5 s came to six days (and past sixty, an OverflowError of time.sleep).
MAX_BACKOFF_S = 60.0


class ScoreRequest(ArrayMessage):
    images: np.ndarray = Field(description="uint8 [N, H, W, 3]")
    prompts: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> ScoreRequest:
        a = self.images
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {a.dtype} {list(a.shape)}")
        if not (1 <= a.shape[1] <= MAX_SIDE and 1 <= a.shape[2] <= MAX_SIDE):
            raise ValueError(f"image sides must be 1..{MAX_SIDE}, got {a.shape[1]}x{a.shape[2]}")
        if a.shape[0] != len(self.prompts):
            raise ValueError(f"{a.shape[0]} images for {len(self.prompts)} prompts")
        if any(len(p) > MAX_PROMPT_CHARS for p in self.prompts):
            raise ValueError(f"a prompt is longer than {MAX_PROMPT_CHARS} characters")
        return self


class ScoreResponse(ArrayMessage):
    scores: np.ndarray = Field(description="float32 [N]")

    @model_validator(mode="after")
    def _check(self) -> ScoreResponse:
        if self.scores.dtype != np.float32 or self.scores.ndim != 1:
            raise ValueError(f"scores must be float32 [N], got {self.scores.dtype} {list(self.scores.shape)}")
        return self


class ErrorResponse(Message):
    error: str


class Health(Message):
    reward: str


#: The largest token file read (a token is one line of a few dozen characters).
MAX_TOKEN_BYTES = 4096


def read_token(path: str) -> str:
    """The bearer token in the file ``path`` (surrounding whitespace stripped): a ValueError naming
    the file if it cannot be read or holds no token."""
    from common.prompts import read_capped

    try:  # a regular file of a few bytes: /dev/zero or a FIFO would never end the read
        token = read_capped(Path(path), "token file", MAX_TOKEN_BYTES).decode("utf-8").strip()
    except OSError as e:
        raise ValueError(f"token file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"token file {path} is not UTF-8 text (byte {e.start})") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"token file {path} holds no token (one line, no spaces)")
    return token


class RemoteRewardError(RuntimeError):
    """The service answered with an error, or did not answer within the retries."""


@register("http")
class HttpReward:
    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 0.5,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        token_file: str | None = None,
    ):
        """
        url: the service's base URL (``http://host:port``); requests go to ``{url}/score``.
        token_file: a file holding the bearer token the service requires (its ``--token-file``);
        read once, here, and sent as ``Authorization: Bearer``. A 401 is not retried.
        timeout: seconds for each attempt as a whole (connect, send, the complete answer).
        retries: further attempts after the first, on connection errors, timeouts, 429/502/503/504.
        backoff: seconds before the first retry, doubling after each.
        """
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"http reward: url must start with http:// or https://, got {url!r}")
        parts = urllib.parse.urlsplit(url)
        try:
            parts.port  # noqa: B018 - read now (a port that is not a number), not at a run's first scoring call
        except ValueError as e:
            raise ValueError(f"http reward: url {url!r}: {e}") from None
        if not parts.hostname:
            raise ValueError(f"http reward: url {url!r} names no host")
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 86_400:  # nan, inf and 0 too
            raise ValueError(f"http reward: timeout must be a number above 0 and at most 86400 s, got {timeout!r}")
        if not isinstance(backoff, (int, float)) or not 0 <= backoff <= 3600:
            raise ValueError(f"http reward: backoff must be a number at least 0 and at most 3600 s, got {backoff!r}")
        if not isinstance(retries, int) or not 0 <= retries <= 100:
            raise ValueError(f"http reward: retries must be an integer from 0 to 100, got {retries!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_response_bytes = max_response_bytes
        self._headers = {"Content-Type": CONTENT_TYPE}
        if token_file is not None:
            self._headers["Authorization"] = f"Bearer {read_token(token_file)}"
        self.attempts = 0  # total HTTP attempts made (for tests and logs)

    def _post(self, body: bytes) -> tuple[int, bytes]:
        """One attempt, bounded as a whole by ``timeout``: a watchdog shuts the socket at the
        deadline, so a server that trickles its answer byte by byte cannot hold the client (a
        socket timeout alone bounds each read, not the request)."""
        u = urllib.parse.urlsplit(self.url)
        conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(u.hostname or "", u.port, timeout=self.timeout)
        expired = threading.Event()

        def abort() -> None:
            expired.set()
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(self.timeout, abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()  # the name lookup and the connection, before the watchdog has a socket to cut
            if expired.is_set():
                raise TimeoutError(f"no complete answer within {self.timeout:g} s")
            conn.request("POST", f"{u.path}/score", body=body, headers=self._headers)
            resp = conn.getresponse()
            data = resp.read(self.max_response_bytes + 1)
            if expired.is_set():  # the watchdog cut the answer short
                raise TimeoutError(f"no complete answer within {self.timeout:g} s")
            declared = resp.getheader("Content-Length")
            if (
                declared is not None
                and declared.isdigit()
                and len(data) < min(int(declared), self.max_response_bytes + 1)
            ):
                raise ConnectionResetError(f"answer ended after {len(data)} of {declared} bytes")
            return resp.status, data
        except (OSError, http.client.HTTPException) as e:
            # the socket's own timeout and the watchdog race at the same deadline: one message
            if expired.is_set() or isinstance(e, TimeoutError):
                raise TimeoutError(f"no complete answer within {self.timeout:g} s") from None
            if isinstance(e, http.client.HTTPException) and not isinstance(e, ConnectionError):
                raise ConnectionResetError(f"{type(e).__name__}: {e}") from None
            raise
        finally:
            watchdog.cancel()
            conn.close()

    def __call__(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        body = pack(ScoreRequest(images=stack_uint8(images), prompts=list(prompts)))
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:  # doubling, up to MAX_BACKOFF_S (or backoff, if longer) a wait
                time.sleep(min(self.backoff * 2.0 ** (attempt - 1), max(self.backoff, MAX_BACKOFF_S)))
            self.attempts += 1
            try:
                status, data = self._post(body)
            except OSError as e:  # refused, reset, timed out (TimeoutError): a retry may cure it
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            if len(data) > self.max_response_bytes:
                raise RemoteRewardError(f"{self.url}: response exceeds {self.max_response_bytes} bytes")
            if status == 200:
                try:
                    scores = unpack(data, ScoreResponse, self.max_response_bytes).scores
                except DecodeError as e:
                    raise RemoteRewardError(f"{self.url}: bad response: {e}") from None
                if scores.shape != (len(prompts),):
                    raise RemoteRewardError(f"{self.url}: {scores.shape[0]} scores for {len(prompts)} prompts")
                return scores
            try:
                msg = unpack(data, ErrorResponse, self.max_response_bytes).error
            except DecodeError:
                msg = data[:200].decode("utf-8", "replace")
            last = f"HTTP {status}: {msg}"
            if status not in RETRY_STATUS:
                raise RemoteRewardError(f"{self.url}: {last}")
        raise RemoteRewardError(f"{self.url}: no answer after {self.retries + 1} attempts ({last})")
