"""`ray job submit --working-dir . -- python -m learner.main --config configs/toy.yaml` against a
local `ray start --head` cluster under token authentication (the session's token,
tests/conftest.py), on a tiny budget (3 iterations, 2 CPUs); a client without the token is refused.

The cluster is this test's own: its own temp dir (so `ray.init()` elsewhere never finds its
address file), its own ports, and a teardown that kills exactly its processes. It deliberately
does not run `ray stop --force`: that kills every Ray process on the machine, including the
in-process cluster of the session-scoped `ray_local` fixture and anyone else's cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="teardown walks /proc"),
    pytest.mark.skipif(shutil.which("ray") is None, reason="the `ray` CLI is not on PATH"),
]

START_TIMEOUT_S = 180  # `ray start --head`
READY_TIMEOUT_S = 120  # until the job server answers
JOB_TIMEOUT_S = 900  # `ray job submit` (blocks until the job ends)
CLI_TIMEOUT_S = 60  # any other CLI call


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # every call names its cluster explicitly
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")  # token auth: tests/conftest.py
    return env


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run(args: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw
    )


def _cluster_pids(temp_dir: str, gcs_port: int) -> set[int]:
    """Live processes of the cluster: those whose command line names ``temp_dir`` or the GCS
    address (the Ray client server names only the latter), and all their descendants."""
    pat = re.compile(re.escape(temp_dir) + r"(?![\w.-])|address=\S+:" + str(gcs_port) + r"(?!\d)")
    parent: dict[int, int] = {}
    roots: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state in ("Z", "X"):  # already dead (a zombie may never be reaped in a container)
            continue
        parent[pid] = int(ppid)
        if pat.search(cmd):
            roots.add(pid)
    roots.discard(os.getpid())
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def _kill_cluster(temp_dir: str, gcs_port: int, timeout: float = 30.0) -> set[int]:
    """SIGKILL the cluster's processes (all found before any dies, so none is re-parented away
    unseen); repeat until none is left or ``timeout``. Returns the pids still alive."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _cluster_pids(temp_dir, gcs_port)
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


@pytest.fixture
def ray_head():
    """A `ray start --head` cluster with the job server; yields its dashboard address."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Unix socket paths max ~107 chars
    gcs_port, dash_port, client_port, agent_port = _free_ports(4)
    address = f"http://127.0.0.1:{dash_port}"
    cmd = [
        "ray", "start", "--head",
        "--num-cpus=2", "--num-gpus=0",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
        f"--ray-client-server-port={client_port}",  # default 10001 may be taken
        f"--dashboard-agent-listen-port={agent_port}",  # default 52365 may be taken
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip
    try:
        start = _run(cmd, START_TIMEOUT_S)
        assert start.returncode == 0, f"`ray start` failed ({start.returncode}):\n{start.stdout}"
        # its address file is in temp_dir: a plain ray.init() elsewhere must not find this cluster
        default_file = Path("/tmp/ray/ray_current_cluster")
        assert f":{gcs_port}" not in (default_file.read_text() if default_file.is_file() else "")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                ls = _run(["ray", "job", "list", "--address", address], CLI_TIMEOUT_S)
                if ls.returncode == 0:
                    break
                last = ls.stdout
            except subprocess.TimeoutExpired:
                last = "`ray job list` timed out"
            if time.monotonic() > deadline:
                pytest.fail(f"the job server at {address} did not answer in {READY_TIMEOUT_S}s:\n{last}")
            time.sleep(1.0)
        yield address
    finally:
        left = _kill_cluster(temp_dir, gcs_port)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes of {temp_dir} survived teardown: {sorted(left)}"


def _authorised(url: str) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"})


def test_a_client_without_the_token_is_refused(ray_head: str):
    """The cluster runs with RAY_AUTH_MODE=token (tests/conftest.py): the job API answers 401
    without the token and 403 with another one, and the CLI with the wrong token fails."""
    for headers, status in (({}, 401), ({"Authorization": "Bearer " + "0" * 64}, 403)):  # none; a wrong one
        req = urllib.request.Request(f"{ray_head}/api/jobs/", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=CLI_TIMEOUT_S)
        assert e.value.code == status
    with urllib.request.urlopen(_authorised(f"{ray_head}/api/jobs/"), timeout=CLI_TIMEOUT_S) as r:
        assert r.status == 200
    env = {**_env(), "RAY_AUTH_TOKEN": "f" * 64}
    wrong = subprocess.run(
        ["ray", "job", "list", "--address", ray_head],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert wrong.returncode != 0 and re.search(r"(?i)unauthori[sz]ed|authentication|token", wrong.stdout), wrong.stdout


def test_job_submit_toy(ray_head: str, tmp_path: Path):
    out_dir = tmp_path.resolve()
    job_id = f"steinsched-test-{uuid.uuid4().hex[:8]}"
    # the config's own rewards (a list flag replaces the YAML's list), each on a quarter CPU
    toy_rewards = yaml.safe_load((REPO / "configs" / "toy.yaml").read_text())["rewards"]
    rewards = json.dumps([{**spec, "num_cpus": 0.25} for spec in toy_rewards])
    cmd = [
        "ray", "job", "submit", "--address", ray_head, "--submission-id", job_id, "--working-dir", ".",
        "--",
        "python", "-m", "learner.main", "--config", "configs/toy.yaml",
        f"--experiment.output_dir={out_dir}", "--experiment.name=job",
        "--learner.iterations=3", "--learner.checkpoint_every=2", "--learner.eval_seeds=4",
        "--learner.progress=false",
        "--rollout.num_workers=2", "--rollout.num_cpus=0.25", "--rollout.contexts_per_iter=4",
        f"--rewards={rewards}",
    ]  # fmt: skip
    t0 = time.monotonic()
    res = _run(cmd, JOB_TIMEOUT_S, cwd=REPO)
    elapsed = time.monotonic() - t0
    print(f"\n--- ray job submit ({elapsed:.1f}s, rc={res.returncode}) ---\n{res.stdout}")
    assert res.returncode == 0, f"`ray job submit` exited {res.returncode}:\n{res.stdout}"

    assert f"Job '{job_id}' succeeded" in res.stdout
    with urllib.request.urlopen(_authorised(f"{ray_head}/api/jobs/{job_id}"), timeout=CLI_TIMEOUT_S) as r:
        info = json.load(r)
    assert info["status"] == "SUCCEEDED", info

    # the held-out table, printed by the driver, reached the submitter
    assert "held-out evaluation after 3 iterations" in res.stdout
    assert re.search(r"learned instance-level - default\s+-?\d", res.stdout), "held-out table rows missing"

    run_dir = out_dir / "job"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_steps = [m["step"] for m in metrics if "rollout/reward_mean" in m]
    assert train_steps == [1, 2, 3], metrics
    ev = json.loads((run_dir / "eval.json").read_text())
    assert {"default", "learned instance-level", "learned instance-level - default"} <= set(ev)
    assert ev["default"]["n"] == ev["learned instance-level"]["n"] > 0
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*"))
    assert "ckpt-00000003" in ckpts, ckpts
    assert (run_dir / "checkpoints" / "ckpt-00000003" / "manifest.json").is_file()
    assert (run_dir / "config.yaml").is_file()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["learner"]["iterations"] == 3 and cfg["experiment"]["name"] == "job"
