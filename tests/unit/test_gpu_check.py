"""bench/gpu_check.sh, without a GPU: its dry run (GPU_CHECK_DRY_RUN=1) prints each step's command.

The steps chosen on the command line run, in that order; an unknown step stops it before any
runs; the time limits of all steps together fit a 10-minute command; where Ray cannot be
imported, the test files and the step that need it are skipped by name and the rest still run.
"""

from __future__ import annotations

import os
import re
import subprocess

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"


def _run(*steps: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *steps],
        cwd=REPO,
        env={**os.environ, "GPU_CHECK_DRY_RUN": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_step_runs_within_ten_minutes_and_logs_to_its_folder(tmp_path):
    res = _run(env={"GPU_CHECK_OUT": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    limits = [int(n) for n in re.findall(r"^timeout (\d+) ", res.stdout, re.M)]
    assert len(limits) == 6 and sum(limits) <= 600, limits
    assert "-m gpu" in res.stdout and "tests/unit/test_backends.py" in res.stdout
    assert "tests/integration/test_loop.py" in res.stdout  # Ray is installed here
    assert "bench/learner_step.py --device cuda" in res.stdout
    assert "bench/rollout_throughput.py --arch real" in res.stdout
    assert "bench/overhead.py --workers 16 32" in res.stdout
    summary = (tmp_path / "summary.log").read_text().splitlines()
    assert [line.split(" (")[0] for line in summary] == ["step 1", "step 2", "step 2c", "step 2w", "step 3", "step 4"]
    assert "bench/learner_step.py --device cuda" in (tmp_path / "step2.log").read_text()


def test_only_the_steps_asked_for_run_and_an_unknown_one_runs_none():
    res = _run("3", "2")
    assert res.returncode == 0, res.stderr
    heads = re.findall(r"^== (\w+)\.", res.stdout, re.M)
    assert heads == ["3", "2", "2c", "2w"]
    bad = _run("2", "5")
    assert bad.returncode == 2
    assert "no step '5'" in bad.stderr and "== 2." not in bad.stdout


def test_without_ray_what_needs_it_is_skipped_by_name(tmp_path):
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["ray"] = None  # import ray fails\n')
    res = _run("1", "4", env={"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "tests/unit/test_backends.py" in res.stdout
    assert "test_loop.py" not in res.stdout
    assert "skipped tests/integration/test_loop.py" in res.stderr
    assert "step 4 (overhead at the goal settings): skipped (needs ray)" in res.stdout
