"""Run by tests/integration/test_elastic.py in a process of its own (it owns a multi-node
``ray.cluster_utils.Cluster``): a toy run with one rollout worker throughout, then the same run
that may grow to two (``rollout.max_workers``), with a node joining mid-run. Writes what the test
checks as JSON: the workers per iteration and whether the final weights are the same."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

from common.config import load_config
from learner import groups
from learner.loop import train
from learner.metrics import read_jsonl
from tests.conftest import tiny_overrides

JOIN_AT = 3  # the node joins before the 3rd iteration's dispatch


def main(out: Path) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})  # one worker and one reward server fit
    ray.init(address=cluster.address)
    common = {
        "rollout": {"num_workers": 1, "micro_batch": 2, "num_cpus": 0.5, "contexts_per_iter": 4},
        "rewards": [{"name": "toy", "num_cpus": 0.5}],
        "learner": {"iterations": 6, "checkpoint_every": 3},
    }
    fixed = train(load_config([], **tiny_overrides(out / "fixed", **common)), final_eval=False)

    real_grow, calls = groups.RolloutGroup.grow, []

    def grow(self):  # a node joins before the JOIN_AT-th check, as one added by an operator or an autoscaler
        calls.append(len(self.alive))
        if len(calls) == JOIN_AT:
            cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            deadline = time.monotonic() + 60
            while ray.available_resources().get("CPU", 0) < 0.5 and time.monotonic() < deadline:
                time.sleep(0.2)
            joined = real_grow(self)  # the worker is started, not waited for: it joins at the next launch
            ray.get(self.workers[-1].pid.remote(), timeout=120)  # here, that one (a fast start, made certain)
            return joined
        return real_grow(self)

    groups.RolloutGroup.grow = grow
    elastic_over = {**common, "rollout": {**common["rollout"], "max_workers": 2}}
    elastic = train(load_config([], **tiny_overrides(out / "elastic", **elastic_over)), final_eval=False)
    rows = [m for m in read_jsonl(elastic.run_dir / "metrics.jsonl") if "system/workers_alive" in m]
    a, b = fixed.policy.state_dict(), elastic.policy.state_dict()
    result = {
        "workers": [m["system/workers_alive"] for m in rows],
        "same_weights": all(torch.equal(a[k], b[k]) for k in a),
    }
    (out / "elastic.json").write_text(json.dumps(result))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
