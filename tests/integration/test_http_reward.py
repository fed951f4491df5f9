"""The HTTP scorer against the reference server (python -m rewards.http_server) on loopback only.

Round trip: HPS (the tiny parity architecture) served over HTTP scores as it does in-process.
Strictness: oversized, malformed, wrongly typed and mis-shaped bodies are refused with 4xx;
a bad reward behind the server is an error naming the reward and the prompt. Retries are
bounded, timeouts honoured.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest

from common.codec import pack, unpack
from rewards.actors import RewardServer
from rewards.http import ErrorResponse, Health, HttpReward, RemoteRewardError
from rewards.registry import build
from tests.conftest import REPO
from tests.fixtures.hps.make_fixture import make_images

FIXTURE = REPO / "tests" / "fixtures" / "hps"
HPS_KWARGS = {"checkpoint": str(FIXTURE / "tiny-hps.pt"), "arch": str(FIXTURE / "tiny-hps.json")}


def _serve(reward: str, kwargs: dict, *extra: str) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "rewards.http_server",
        "--reward",
        reward,
        "--kwargs",
        json.dumps(kwargs),
        "--port",
        "0",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True), reward


def _url(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()  # "serving reward 'x' on http://127.0.0.1:PORT"
    assert "serving reward" in line, f"server did not start (exit {proc.poll()})"
    return line.split(" on ")[-1].strip()


@pytest.fixture(scope="module")
def servers():
    procs = [
        _serve("hps", HPS_KWARGS, "--torch-threads", "1"),
        _serve("tests.integration.rewards_for_tests:BadImageReward", {}, "--max-bytes", "200000"),
    ]  # both start at once: their imports overlap
    try:
        yield {name: _url(p) for p, name in procs}
    finally:
        for p, _ in procs:
            p.terminate()
            p.wait(timeout=10)


def _post(url: str, body: bytes, content_type: str = "application/msgpack") -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/score", body=body, headers={"Content-Type": content_type})
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_hps_round_trip_matches_in_process(servers):
    url = servers["hps"]
    images = np.stack([make_images()[0]] * 2 + [make_images()[1][:224, :224]])  # one batch, one size
    prompts = ["a photo of an astronaut riding a horse on the moon", "abstract painting", "abstract painting"]
    remote = build("http", {"url": url, "timeout": 30})
    local = build("hps", HPS_KWARGS)
    np.testing.assert_allclose(remote(images, prompts), local(images, prompts), atol=1e-6)
    # the HTTP reward inside a RewardServer, as a run hosts it
    served = RewardServer("http", {"url": url})
    assert served.score(images, prompts).shape == (3,)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/health")
    assert unpack(conn.getresponse().read(), Health).reward == "hps"


def test_strict_decoding_refuses_bad_bodies(servers):
    url = servers["hps"]
    ok = {"images": np.zeros((1, 8, 8, 3), np.uint8), "prompts": ["a"]}

    def refused(body: bytes, status: int, match: str, **kw) -> None:
        code, data = _post(url, body, **kw)
        assert code == status
        assert match in unpack(data, ErrorResponse).error

    refused(pack({**ok, "images": np.zeros((1, 8, 8, 3), np.float32)}), 400, "must be uint8 [N, H, W, 3]")
    refused(pack({**ok, "images": np.zeros((1, 8, 8), np.uint8)}), 400, "must be uint8 [N, H, W, 3]")
    refused(pack({**ok, "prompts": ["a", "b"]}), 400, "1 images for 2 prompts")
    refused(pack({**ok, "extra": 1}), 400, "Extra inputs are not permitted")
    refused(b"\x93\x01\x02", 400, "truncated")
    refused(
        msgpack.packb({"images": msgpack.ExtType(1, msgpack.packb(["object", [1]]) + b"x"), "prompts": ["a"]}),
        400,
        "dtype 'object' is not allowed",
    )
    refused(
        msgpack.packb({"images": msgpack.ExtType(1, msgpack.packb(["uint8", [1, 8, 8, 3]]) + b"xx"), "prompts": ["a"]}),
        400,
        "needs 192 bytes, got 2",
    )
    refused(msgpack.packb({"images": msgpack.ExtType(7, b""), "prompts": ["a"]}), 400, "unknown msgpack ext type 7")
    refused(pickle_bytes(), 400, "")  # a pickle is just malformed msgpack here: never unpickled
    refused(pack(ok), 415, "Content-Type must be", content_type="application/octet-stream")
    # the size limit, before any decoding (this server: --max-bytes 200000)
    big = pack({"images": np.zeros((3, 200, 200, 3), np.uint8), "prompts": ["a"] * 3})
    code, data = _post(servers["tests.integration.rewards_for_tests:BadImageReward"], big)
    assert code == 413 and "exceeds the limit of 200000" in unpack(data, ErrorResponse).error


def pickle_bytes() -> bytes:
    import pickle

    return pickle.dumps({"images": [1, 2, 3]})


def test_bad_remote_reward_names_reward_and_prompt(servers):
    r = HttpReward(servers["tests.integration.rewards_for_tests:BadImageReward"], timeout=10, retries=3, backoff=0.01)
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(
        RemoteRewardError, match=r"HTTP 500: reward .*BadImageReward.* non-finite .* prompt 'nan please'"
    ):
        r(images, ["fine", "nan please"])
    with pytest.raises(
        RemoteRewardError, match=r"HTTP 500: reward .*BadImageReward.* failed on prompts \['crash please'"
    ):
        r(images[:1], ["crash please"])
    assert r.attempts == 2  # a 500 is the reward's own failure: not retried
    assert r(images, ["fine", "fine"]).tolist() == [0.0, 0.0]


def test_retries_are_bounded_and_timeouts_honoured():
    with socket.socket() as s:  # a free port with nobody listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = HttpReward(f"http://127.0.0.1:{port}", timeout=1, retries=2, backoff=0.01)
    with pytest.raises(RemoteRewardError, match="no answer after 3 attempts"):
        r(np.zeros((1, 4, 4, 3), np.uint8), ["a"])
    assert r.attempts == 3

    with _silent_server() as port:
        r = HttpReward(f"http://127.0.0.1:{port}", timeout=0.3, retries=1, backoff=0.01)
        start = time.perf_counter()
        with pytest.raises(RemoteRewardError, match="no answer after 2 attempts.*no complete answer within 0.3 s"):
            r(np.zeros((1, 4, 4, 3), np.uint8), ["a"])
        assert time.perf_counter() - start < 3
        assert r.attempts == 2


class _NeverFires:
    """A watchdog timer that never fires, so the socket's own timeout ends the read."""

    daemon = False

    def __init__(self, *_args):
        pass

    def start(self):
        pass

    def cancel(self):
        pass


def test_the_socket_timeout_and_the_watchdog_give_the_same_message(monkeypatch):
    # Both fire at the same deadline; whichever wins, the caller reads one message.
    monkeypatch.setattr("rewards.http.threading.Timer", _NeverFires)
    with _silent_server() as port:
        r = HttpReward(f"http://127.0.0.1:{port}", timeout=0.2, retries=0)
        with pytest.raises(
            RemoteRewardError, match=r"no answer after 1 attempts \(TimeoutError: no complete answer within 0.2 s\)"
        ):
            r(np.zeros((1, 4, 4, 3), np.uint8), ["a"])


@contextlib.contextmanager
def _silent_server():
    """A port that accepts connections and never answers."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        silent.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(silent.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield silent.getsockname()[1]
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        silent.close()


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"url": "http://127.0.0.1:80OO"}, "url 'http://127.0.0.1:80OO': Port could not be cast to integer value"),
        ({"url": "http://:8000"}, "names no host"),
        ({"url": "http://h:1", "timeout": float("nan")}, "timeout must be a number above 0 and at most 86400 s"),
        ({"url": "http://h:1", "timeout": float("inf")}, "timeout must be a number above 0"),
        ({"url": "http://h:1", "timeout": 0}, "timeout must be a number above 0"),
        ({"url": "http://h:1", "backoff": -1}, "backoff must be a number at least 0"),
        ({"url": "http://h:1", "retries": 2.5}, "retries must be an integer from 0 to 100"),
    ],
)
def test_the_http_rewards_settings_are_checked_when_it_is_built(kwargs, why):
    """Each of these was built, and failed at a run's first scoring call (exit 1, after training
    started; inf as an OverflowError from a thread), not as the reward server started."""
    with pytest.raises(ValueError, match=re.escape(why)):
        HttpReward(**kwargs)
