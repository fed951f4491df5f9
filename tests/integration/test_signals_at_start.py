"""A run stopped while its own Ray cluster starts (SIGTERM from ``ray job stop`` or a preempted
pod, Ctrl-C from a user who changed their mind) ends in one line with every process it started
gone, as a run stopped later does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO


def _processes_naming(text: str) -> dict[int, str]:
    """The live processes whose command line names ``text``, by pid."""
    found = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (d / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue
        if text in cmdline:
            found[int(d.name)] = cmdline[:120]
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize(("sig", "code", "word"), [("TERM", 143, "terminated"), ("INT", 130, "interrupted")])
def test_a_run_stopped_while_its_ray_cluster_starts_leaves_no_process_behind(tmp_path, sig, code, word):
    """Ray's own SIGTERM handler (``sys.exit(15)`` wherever ``ray.init`` was) ended the run with
    exit 15 and no line, and the raylet's agents (DashboardAgent, RuntimeEnvAgent) were left
    running under init, for good; Ctrl-C there could end in a segfault. Now the signal waits until
    Ray has started, then Ray is shut down whole."""
    ray_dir = tempfile.mkdtemp(prefix="ss-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.integration.stop_while_ray_starts",
                sig,
                "--config",
                "configs/toy.yaml",
                f"--experiment.output_dir={tmp_path}",
                "--learner.iterations=2",
                "--learner.progress=false",
                "--ray.num_cpus=2",
                f'--ray.init_kwargs={{"_temp_dir": "{ray_dir}"}}',
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        )
        deadline = time.monotonic() + 20  # ray.shutdown stops its processes; give them time to exit
        while (left := _processes_naming(ray_dir)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"left running: {list(left.values())}"
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == code, proc.stderr[-3000:]
        assert err[-1] == f"{word}: the run in {tmp_path / 'toy'} had not begun; the same command starts it"
        assert "Traceback" not in proc.stderr and "SIGTERM received" not in proc.stderr, proc.stderr[-3000:]
        assert not (tmp_path / "toy" / ".lock").exists(), "the run dir is released"
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
