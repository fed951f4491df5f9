"""The real entry point, `python -m learner.main --config configs/toy.yaml`, on a tiny budget."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from common.config import ConfigError
from common.policy import SchedulePolicy
from learner.loop import _check_answers
from tests.conftest import REPO

pytestmark = pytest.mark.ray


def _entry(*flags: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -m learner.main <flags>`` as a user runs it, from the repository root."""
    env = dict(os.environ)  # token auth, as tests/conftest.py set it
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "learner.main", *flags, "--learner.progress=false", "--ray.num_cpus=2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_entry_point_trains_and_prints_the_table(tmp_path):
    res = _entry(
        "--config",
        "configs/toy.yaml",
        f"--experiment.output_dir={tmp_path}",
        "--experiment.name=e2e",
        "--learner.iterations=4",
        "--learner.eval_seeds=8",
        "--learner.checkpoint_every=2",
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "held-out evaluation after 4 iterations" in res.stdout
    assert "learned instance-level - default" in res.stdout
    run = tmp_path / "e2e"
    summary = json.loads((run / "eval.json").read_text())
    assert summary["default"]["n"] == 80
    assert SchedulePolicy.from_pretrained(run / "policy").steps == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["ckpt-00000002", "ckpt-00000004"]


def test_embedded_default_digits_run_ends_with_table_and_pictures(tmp_path):
    """`python -m learner.main` (the README's first command) on a tiny budget: the digits demo
    with the learned global schedule, the held-out table with the Frechet distance, and PNGs."""
    res = _entry(f"--experiment.output_dir={tmp_path}", "--learner.iterations=3", "--learner.eval_seeds=6", timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "training the learned global schedule" in out
    rows = ("default", "learned global", "learned instance-level", "learned instance-level - default")
    for row in (*rows, "learned instance-level - learned global"):
        assert f"\n{row} " in out, row
    assert "digits_fd (lower better)" in out
    run = tmp_path / "digits"
    summary = json.loads((run / "eval.json").read_text())
    assert summary["default"]["n"] == 60 and summary["default"]["digits_fd"] > 0
    assert summary["learned global"]["digits_fd"] > 0 and summary["learned instance-level"]["digits_fd"] > 0
    pairs = [("learned global", "default"), ("learned instance-level", "default")]
    for a, b in [*pairs, ("learned instance-level", "learned global")]:  # the gold metric's paired differences
        diff = summary[f"{a} - {b}"]
        assert diff["digits_fd"] == pytest.approx(summary[a]["digits_fd"] - summary[b]["digits_fd"])
        assert 0 < diff["digits_fd_se"] < summary[a]["digits_fd_se"] + summary[b]["digits_fd_se"]
    for png in ("schedules.png", "samples.png", "reward_curve.png"):
        assert (run / png).stat().st_size > 10_000, png
    assert (run / "global" / "policy" / "model.safetensors").is_file()
    glob = SchedulePolicy.from_pretrained(run / "global" / "policy")
    assert glob.variant == "global" and len(glob.global_mean_tau()) == 5


def test_a_cluster_address_where_no_cluster_answers_is_one_line_at_once(tmp_path):
    """Ray waits forever on an address where nothing listens (a retry logged every 30 s) and gives
    an unreachable one 25 s and a traceback: the run checks that the address answers first."""
    with socket.socket() as s:  # a port nothing listens on once it is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for flags, env, source in (
        ([], {"RAY_ADDRESS": f"127.0.0.1:{port}"}, "RAY_ADDRESS"),
        ([f"--ray.init_kwargs={{address: 'ray://127.0.0.1:{port}'}}"], {}, "ray.init_kwargs.address"),
    ):
        address = env.get("RAY_ADDRESS") or f"ray://127.0.0.1:{port}"
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "learner.main", "--config=configs/toy.yaml", f"--experiment.output_dir={tmp_path}"]
            + flags,
            cwd=REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines() == [
            f"error: no Ray cluster answers at {address} ({source}): Connection refused; start one there (ray start"
            f" --head), or unset {source} to start one on this machine"
        ]
        assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("junk", "no port"),
        ("127.0.0.1:notaport", "Port could not be cast to integer value as 'notaport'"),
        ("127.0.0.1:99999", "Port out of range 0-65535"),  # Ray waited on it forever
        ("http://", "no host"),
    ],
)
def test_an_address_that_is_not_one_is_one_line(address, why):
    """`RAY_ADDRESS=junk` was Ray's 23-line ValueError traceback; a port above 65535 hung."""
    with pytest.raises(ConfigError) as e:
        _check_answers(address, "RAY_ADDRESS")
    assert str(e.value) == (
        f"RAY_ADDRESS {address!r} is not a Ray cluster address ({why}): give host:port (a head node's GCS, e.g."
        " 10.0.0.1:6379), ray://host:port, 'auto' or 'local'"
    )
