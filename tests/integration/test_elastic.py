"""Elastic scale-out: a node joins a ``ray.cluster_utils.Cluster`` mid-run and the run starts a
second rollout worker on it (``rollout.max_workers``). Every random draw is keyed by ids and the
requests are fixed micro-batches (``rollout.micro_batch``), so the run gives the same rollouts,
and the same final weights bit for bit, as the run that kept one worker. The run is in a
process of its own: it owns a multi-node cluster (tests/integration/elastic_run.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray


def test_a_node_joining_mid_run_gets_a_worker_and_changes_nothing(tmp_path):
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(
        [sys.executable, "-m", "tests.integration.elastic_run", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads((tmp_path / "elastic.json").read_text())
    workers = got["workers"]
    assert len(workers) == 6 and workers[0] == 1 and workers[-1] == 2, workers  # metrics: workers per iteration
    # the second was started with the node (before the third dispatch, which starts while the
    # second iteration logs its row) without the run waiting for it, and joined at the launch after
    # it answered (the fourth), not before
    assert workers.index(2) == 2, workers
    assert got["same_weights"]
    assert "rollout workers: 2 (worker 1 joined; up to rollout.max_workers=2)" in res.stdout
