"""Reference server of the HTTP reward protocol (rewards/http.py): any registered reward.

    python -m rewards.serve --reward hps --kwargs '{"checkpoint": "/models/HPS_v2.1_compressed.pt"}' --port 8000

``--reward`` takes a registered name or an import path 'pkg.module:Class'. The model loads once,
at start; requests are scored one at a time (a lock), so a GPU holds one batch at a time. Every
request body is bounded (Content-Length required, ``--max-bytes``), decoded strictly (msgpack
with the codec's dtype whitelist and shape checks, then pydantic), and the scores are checked
(float32 [N], finite) before they are sent: a bad score is an error naming the reward and the
prompt. Binds 127.0.0.1 unless told otherwise; standard library http.server, no TLS: put it
behind a proxy to expose it beyond a trusted network.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from common.codec import DecodeError, pack, unpack
from rewards.base import _shown, build, check_scores
from rewards.http import CONTENT_TYPE, MAX_REQUEST_BYTES, ErrorResponse, Health, ScoreRequest, ScoreResponse


class RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], name: str, reward: Any, max_bytes: int = MAX_REQUEST_BYTES):
        super().__init__(address, _Handler)
        self.name, self.reward, self.max_bytes = name, reward, max_bytes
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may take to send its request

    def log_message(self, fmt: str, *args: Any) -> None:  # one line per request on stderr
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, msg: str) -> None:
        self.close_connection = True
        self._send(status, pack(ErrorResponse(error=msg)))

    def do_GET(self) -> None:
        if self.path != "/health":
            return self._error(404, f"no such path {self.path!r}: GET /health or POST /score")
        self._send(200, pack(Health(reward=self.server.name)))

    def do_POST(self) -> None:
        if self.path != "/score":
            return self._error(404, f"no such path {self.path!r}: POST /score")
        if self.headers.get_content_type() != CONTENT_TYPE:
            return self._error(415, f"Content-Type must be {CONTENT_TYPE}")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(411, "Content-Length required")
        if length < 0 or length > self.server.max_bytes:
            return self._error(413, f"body of {length} bytes exceeds the limit of {self.server.max_bytes}")
        data = self.rfile.read(length)
        try:
            req = unpack(data, ScoreRequest, self.server.max_bytes)
        except DecodeError as e:
            return self._error(400, str(e))
        try:
            with self.server.lock:
                raw = self.server.reward(req.images, req.prompts)
            scores = check_scores(self.server.name, raw, req.prompts)
        except Exception as e:  # noqa: BLE001 - any failure of the reward goes back as a 500
            if isinstance(e, ValueError) and str(e).startswith(f"reward {self.server.name!r}"):
                return self._error(500, str(e))  # check_scores' message already names reward and prompt
            return self._error(500, f"reward {self.server.name!r} failed on prompts {_shown(req.prompts)}: {type(e).__name__}: {e}")
        self._send(200, pack(ScoreResponse(scores=scores)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rewards.serve", description=__doc__.split("\n")[0])
    p.add_argument("--reward", required=True, help="A registered reward name or an import path 'pkg.module:Class'.")
    p.add_argument("--kwargs", default="{}", help="JSON object of the reward's keyword arguments.")
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default: loopback only).")
    p.add_argument("--port", type=int, default=8000, help="Port (0: any free port; the chosen one is printed).")
    p.add_argument("--max-bytes", type=int, default=MAX_REQUEST_BYTES, help="Largest request body accepted.")
    p.add_argument("--torch-threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    args = p.parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--kwargs is not JSON: {e}")
    if not isinstance(kwargs, dict):
        p.error("--kwargs must be a JSON object")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    try:
        reward = build(args.reward, kwargs)
    except (ValueError, ImportError, FileNotFoundError) as e:
        p.error(str(e))
    server = RewardHTTPServer((args.host, args.port), args.reward, reward, args.max_bytes)
    host, port = server.server_address[:2]
    print(f"serving reward {args.reward!r} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
