"""Reference server of the HTTP reward protocol (rewards/http.py): any registered reward.

    python -m rewards.http_server --reward hps --kwargs '{"checkpoint": "/models/HPS_v2.1_compressed.pt"}' --port 8000

``--reward`` takes a registered name or an import path 'pkg.module:Class'. The model loads once,
at start; requests are scored one at a time (a lock), so a GPU holds one batch at a time. Every
request body is bounded (Content-Length required, ``--max-bytes``), decoded strictly (msgpack
with the codec's dtype whitelist and shape checks, then pydantic), and the scores are checked
(float32 [N], finite) before they are sent: a bad score is an error naming the reward and the
prompt. Binds 127.0.0.1 unless told otherwise; standard library http.server, no TLS: put it
behind a proxy to expose it beyond a trusted network.

Authentication: with ``--token-file`` every request (``/health`` too) must carry
``Authorization: Bearer <the file's token>``; others get 401 and a log line naming the client
address (the token is never logged). Without it the server is open: keep it on loopback. TLS
belongs to a reverse proxy in front (nginx, Envoy, a cloud load balancer), which also rate-limits.

Resource limits: a client has ``--client-timeout`` seconds to send a whole request (headers and
body: a trickling client is cut off, not waited for); at most ``--max-concurrent`` requests are
read and decoded at a time (others wait, until just before their client's time is up, then get
503), so memory is bounded by that many bodies (a body's lists hold at most ``MAX_ITEMS`` items);
a request whose client left while it waited is not scored; error bodies are cut to
``MAX_ERROR_CHARS`` (an error never echoes a large request back).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import math
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn

from common.codec import DecodeError, pack, unpack
from common.config import CommandLine, int_at_least, positive_float
from rewards.http import (
    CONTENT_TYPE,
    MAX_REQUEST_BYTES,
    ErrorResponse,
    Health,
    ScoreRequest,
    ScoreResponse,
    read_token,
)
from rewards.registry import build, check_scores, limit_torch_threads, shown_prompts

#: Longest error message sent back.
MAX_ERROR_CHARS = 1000
#: Seconds an error sent before the body was read (413, 503) waits, reading and dropping the body,
#: before the connection closes: a client still sending gets the answer, not a broken pipe.
LINGER_S = 2.0


class RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        name: str,
        reward: Any,
        max_bytes: int = MAX_REQUEST_BYTES,
        max_concurrent: int = 2,
        client_timeout: float = 60.0,
        queue_timeout: float = 300.0,
        token: str | None = None,
    ):
        """``token``: the bearer token every request must carry (None: no authentication)."""
        # the per-read socket timeout of this server's connections (StreamRequestHandler.timeout)
        super().__init__(address, type("_Handler", (_Handler,), {"timeout": client_timeout}))
        self.name, self.reward, self.max_bytes = name, reward, max_bytes
        self.lock = threading.Lock()  # one scoring at a time
        self.slots = threading.BoundedSemaphore(max_concurrent)  # requests read and decoded at a time
        self.client_timeout, self.queue_timeout = client_timeout, queue_timeout
        self.token = token


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self._watchdog: threading.Timer | None = None
        self._deadline = math.inf

    def _arm(self) -> None:
        """Cut the connection unless the request is read within client_timeout."""

        def expire() -> None:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        self._deadline = time.monotonic() + self.server.client_timeout
        self._watchdog = threading.Timer(self.server.client_timeout, expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def handle_one_request(self) -> None:
        self._arm()
        try:
            super().handle_one_request()
        finally:
            self._disarm()

    def log_message(self, fmt: str, *args: Any) -> None:  # one line per request on stderr
        line = fmt % args  # a client's path or header: its control characters escaped, not played
        line = "".join(f"\\x{ord(c):02x}" if c < " " or "\x7f" <= c <= "\x9f" else c for c in line)
        sys.stderr.write(f"{self.address_string()} {line}\n")

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: one line, not a traceback
            self.close_connection = True
            self.log_message("%s %s: the client left before its answer (%d)", self.command, self.path, status)

    def _client_gone(self) -> bool:
        """Whether the client closed its side while its request waited (it gave up: its time-out):
        then it is not scored, which would take the reward's time for an answer no one reads."""
        timeout = self.connection.gettimeout()
        self.connection.settimeout(0)  # a look, not a wait (a socket with a time-out waits for data)
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:  # nothing to read: still there
            return False
        except OSError:
            return True
        finally:
            self.connection.settimeout(timeout)

    def _refuse_unread(self, status: int, msg: str, length: int) -> None:
        """An error sent before the body was read; the body is then read and dropped for up to
        LINGER_S, so that a client still sending it reads the answer (its send failed on the
        closed socket: a broken pipe, which it retried as a connection error)."""
        self._error(status, msg)
        until = time.monotonic() + LINGER_S
        with contextlib.suppress(OSError):
            while length > 0 and time.monotonic() < until:
                self.connection.settimeout(max(0.05, until - time.monotonic()))
                chunk = self.rfile.read1(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)

    def _error(self, status: int, msg: str) -> None:
        self.close_connection = True
        if len(msg) > MAX_ERROR_CHARS:
            msg = msg[: MAX_ERROR_CHARS - 20] + f" ... ({len(msg)} chars)"
        self._send(status, pack(ErrorResponse(error=msg)))

    def _authorised(self) -> bool:
        """True without a token; else the request must carry it (compared in constant time). A
        refusal is answered 401 and logged with the client's address."""
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
        self.log_message("refused %s %s: %s", self.command, self.path, "bad token" if given else "no token")
        self._error(401, "unauthorised: send Authorization: Bearer <token>")
        return False

    def do_GET(self) -> None:
        self._disarm()
        if not self._authorised():
            return None
        if self.path != "/health":
            return self._error(404, f"no such path {self.path!r}: GET /health or POST /score")
        self._send(200, pack(Health(reward=self.server.name)))

    def do_POST(self) -> None:
        if not self._authorised():
            return None
        if self.path != "/score":
            return self._error(404, f"no such path {self.path!r}: POST /score")
        if self.headers.get_content_type() != CONTENT_TYPE:
            return self._error(415, f"Content-Type must be {CONTENT_TYPE}")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "Content-Length required")
        if length < 0 or length > self.server.max_bytes:
            limit = f"body of {length} bytes exceeds the limit of {self.server.max_bytes}"
            return self._refuse_unread(413, limit, max(length, 0))
        # a request waits for a slot until just before its client_timeout, so that it gets its 503
        # (the watchdog cut it at client_timeout: 'Remote end closed connection without response')
        wait = min(self.server.queue_timeout, self._deadline - time.monotonic() - 1.0)
        if wait <= 0 or not self.server.slots.acquire(timeout=wait):
            return self._refuse_unread(503, "busy: too many requests in flight, retry later", length)
        try:
            data = self.rfile.read(length)
            if len(data) != length:
                return self._error(400, f"body ended after {len(data)} of {length} bytes")
            self._disarm()  # the request is in: scoring may take its time
            try:
                req = unpack(data, ScoreRequest, self.server.max_bytes)
            except DecodeError as e:
                return self._error(400, str(e))
            del data
            self._score(req)
        finally:
            self.server.slots.release()

    def _score(self, req: ScoreRequest) -> None:
        try:
            with self.server.lock:
                if self._client_gone():  # it waited for the reward and gave up meanwhile
                    self.close_connection = True
                    self.log_message("%s %s: the client left before its turn; not scored", self.command, self.path)
                    return
                raw = self.server.reward(req.images, req.prompts)
            scores = check_scores(self.server.name, raw, req.prompts)
        except Exception as e:  # noqa: BLE001 - any failure of the reward goes back as a 500
            if isinstance(e, ValueError) and str(e).startswith(f"reward {self.server.name!r}"):
                return self._error(500, str(e))  # check_scores' message already names reward and prompt
            return self._error(
                500,
                f"reward {self.server.name!r} failed on prompts {shown_prompts(req.prompts)}: {type(e).__name__}: {e}",
            )
        self._send(200, pack(ScoreResponse(scores=scores)))


def _host(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: give an address (127.0.0.1, or 0.0.0.0 for every interface)")
    return text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: inf, which every score would then be
        raise ValueError(f"{text} is not a finite number")
    return value


def main(argv: list[str] | None = None) -> None:
    p = CommandLine(prog="python -m rewards.http_server", description=__doc__.split("\n")[0])
    p.add_argument("--reward", required=True, help="A registered reward name or an import path 'pkg.module:Class'.")
    p.add_argument("--kwargs", default="{}", help="JSON object of the reward's keyword arguments.")
    p.add_argument("--host", type=_host, default="127.0.0.1", help="Address to bind (default: loopback only).")
    p.add_argument(
        "--port", type=int_at_least(0, 65535), default=8000, help="Port (0: any free port; the chosen one is printed)."
    )
    p.add_argument(
        "--max-bytes", type=int_at_least(1), default=MAX_REQUEST_BYTES, help="Largest request body accepted."
    )
    p.add_argument(
        "--max-concurrent", type=int_at_least(1), default=2, help="Requests read and decoded at a time (memory bound)."
    )
    p.add_argument(
        "--client-timeout",
        type=positive_float(86400),
        default=60.0,
        help="Seconds a client has to send a whole request.",
    )
    p.add_argument(
        "--torch-threads", type=int_at_least(0, 4096), default=0, help="torch CPU threads (0: torch's default)."
    )
    p.add_argument("--token-file", help="A file holding the bearer token clients must send (default: none).")
    args = p.parse_args(argv)

    def fail(why: str) -> NoReturn:  # not a usage mistake: one line, without the usage
        p.exit(2, f"{p.prog}: error: {why}\n")

    token = None
    if args.token_file is not None:
        try:
            token = read_token(args.token_file)
        except ValueError as e:
            fail(str(e))
    try:
        kwargs = json.loads(args.kwargs, parse_constant=_no_constant, parse_float=_finite)
    except ValueError as e:
        fail(f"--kwargs is not JSON: {e}")
    if not isinstance(kwargs, dict):
        fail("--kwargs must be a JSON object")
    if args.torch_threads:
        limit_torch_threads(args.torch_threads)
    try:
        reward = build(args.reward, kwargs)
    except (ValueError, ImportError, FileNotFoundError) as e:
        fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C while a model loads
        p.exit(130, "interrupted: nothing was served\n")
    except Exception as e:  # noqa: BLE001 - the reward's own __init__ failed: one line, as a run's reward server says
        fail(f"reward {args.reward!r} could not start: {type(e).__name__}: {e}")
    if getattr(reward, "needs_reference", False):  # the protocol carries images and prompts only
        fail(
            f"reward {args.reward!r} compares each image with a many-step reference sample, which a request over"
            " HTTP cannot carry: run it in the training run's own reward servers (rewards: in the config)"
        )
    try:
        server = RewardHTTPServer(
            (args.host, args.port),
            args.reward,
            reward,
            args.max_bytes,
            args.max_concurrent,
            args.client_timeout,
            token=token,
        )
    except OSError as e:  # taken, an address not of this machine, a name that does not resolve
        fail(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}")
    host, port = server.server_address[0], server.server_address[1]
    host = host.decode() if isinstance(host, bytes) else host
    print(f"serving reward {args.reward!r} on http://{host}:{port}", flush=True)
    print("a bearer token is required" if token else "no authentication (--token-file): keep it on a trusted network")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
