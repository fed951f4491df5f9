"""The deploy files are validated, not just parsed.

- deploy/cluster.yaml against the cluster-config JSON schema that ships inside the installed
  ``ray`` package (ray/autoscaler/ray-schema.json, draft-07);
- the KubeRay RayJob and RayCluster against deploy/schema/kuberay-v1.5.1.json, the project's
  schema written from the KubeRay v1.5.1 API reference (every object closed: an unknown or
  misspelt field fails), with token authentication set;
- every ``python -m learner.main`` command line in them (entrypoints and the command each file
  starts with) through the project's own config loader;
- the Dockerfile: Ray's CUDA image at the manifests' Ray version, the package installed at
  build time, a non-root user; the manifests run the image the docs build.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from common.config import ConfigError, load_config
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
KUBE = ["rayjob.yaml", "raycluster.yaml"]  # deploy/storage.yaml is core v1 (a PVC): parsed below
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
KUBERAY_SCHEMA = DEPLOY / "schema" / "kuberay-v1.5.1.json"
IMAGE = "ghcr.io/steinsched/steinsched:0.1.0"


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _kuberay(kind: str | None = None) -> jsonschema.Draft202012Validator:
    """The project's KubeRay schema (for one ``kind``: its errors then name the field at fault)."""
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    if kind is not None:
        schema = {"$ref": f"#/$defs/{kind}", "$defs": schema["$defs"]}
    return jsonschema.Draft202012Validator(schema)


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def test_cluster_yaml_fits_rays_own_schema_with_token_auth():
    schema = json.loads(RAY_SCHEMA.read_text())
    doc = _load("cluster.yaml")
    jsonschema.validate(doc, schema)
    starts = doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if c.startswith(("ray start", "RAY_AUTH")))
    assert "--dashboard-host=127.0.0.1" in " ".join(doc["head_start_ray_commands"])
    assert "0.0.0.0" not in (DEPLOY / "cluster.yaml").read_text()
    assert doc["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token: a file, never the YAML
    # the schema bites: a field ray does not know fails
    with pytest.raises(jsonschema.ValidationError, match="min_workers"):
        jsonschema.validate({**doc, "min_workers": 2}, schema)


@pytest.mark.parametrize("name", KUBE)
def test_kuberay_manifests_fit_the_v1_5_1_schema_with_token_auth(name):
    doc = _load(name)
    _kuberay().validate(doc)
    spec = _cluster_spec(doc)
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["rayVersion"] == ray.__version__  # the Ray the image has and the tests run
    assert {c["image"] for c in _containers(spec)} == {IMAGE}
    text = (DEPLOY / name).read_text()
    assert "0.0.0.0" not in text and "RAY_AUTH_TOKEN:" not in text and "serviceType" not in text


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        (["spec", "entrypont"], "python -m learner.main", "entrypont"),
        (["spec", "shutdownAfterJobFinishes"], "yes", "is not of type 'boolean'"),
        (["spec", "rayClusterSpec", "authOptions", "mode"], "tokens", "is not one of"),
        (["spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"], -1, "less than the minimum"),
        (["spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"], 2, "is not of type 'string'"),
        (["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "imag"], "x", "imag"),
        (["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "securityContext", "fsGrop"], 1, "fsGrop"),
    ],
)
def test_the_kuberay_schema_refuses_what_the_operator_would(path, value, error):
    doc = copy.deepcopy(_load("rayjob.yaml"))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = [e.message for e in _kuberay("RayJob").iter_errors(doc)]
    assert any(error in e for e in errors), errors
    with pytest.raises(jsonschema.ValidationError):
        _kuberay().validate(doc)


def _commands() -> list[tuple[str, str]]:
    """Every `python -m learner.main ...` command line in the deploy files."""
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        text = path.read_text()
        out += [(path.name, m) for m in re.findall(r"python -m learner\.main[^\n&|)`]*", text)]
    return out


@pytest.mark.parametrize(("name", "command"), _commands(), ids=lambda v: v if v.endswith(".yaml") else "")
def test_every_command_line_is_a_valid_learner_main_call(name, command):
    argv = shlex.split(command)[3:]
    try:
        cfg = load_config(argv)
    except ConfigError as e:
        pytest.fail(f"{name}: `{command}` is not a valid config: {e}")
    assert cfg.rollout.steps >= 1


def test_each_file_starts_with_the_command_that_uses_it():
    for path in sorted(DEPLOY.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "learner.main" in first, path.name
        assert path.name in first or path.name == "runtime_env.yaml" or "ray up" in first, path.name
    assert {n for n, _ in _commands()} >= {"cluster.yaml", "rayjob.yaml", "raycluster.yaml", "runtime_env.yaml"}


def test_the_volume_the_runs_are_written_to():
    pvc = _load("storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "steinsched-runs"
    for name in KUBE:
        spec = _cluster_spec(_load(name))
        head = spec["headGroupSpec"]["template"]["spec"]
        assert head["volumes"][0]["persistentVolumeClaim"]["claimName"] == "steinsched-runs"
        # the image runs as ray (group users, gid 100): a provisioner's fresh volume is root's, and the
        # run stopped at its claim with "run dir /mnt/runs/toy cannot be written: Permission denied"
        assert head["securityContext"]["fsGroup"] == 100
        assert all("volumes" not in g["template"]["spec"] for g in spec["workerGroupSpecs"])  # one writer


def test_the_dockerfile_builds_what_the_manifests_run():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=" + re.escape(ray.__version__) + "$", text, flags=re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-cu\d+$", text, flags=re.M)  # CUDA base
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users[-1] == "ray"  # the package is installed, and the image runs, as the non-root user
    assert text.index("pip install") > text.rindex("USER ray")
    assert "pip install --no-cache-dir" in text and "COPY --chown=ray:users learner ./learner" in text
    deploy_doc = (REPO / "docs" / "deploy.md").read_text()
    assert f"docker build -t {IMAGE} ." in deploy_doc and f"docker push {IMAGE}" in deploy_doc
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", "runs", ".test-cache"} <= set(ignored)


def test_a_learner_on_a_gpu_ray_also_hands_out_is_warned_about(monkeypatch):
    """The learner runs in the driver, outside Ray's accounting: on a node of a cluster the driver
    joined, which offers its GPUs to Ray, the learner's GPU may be given to a rollout worker or
    another job's actor (docs/deploy.md said so, and nothing told the operator)."""
    import types

    import ray._private.worker as ray_worker
    import torch

    from learner import loop

    nodes = [
        {"NodeID": "head", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
        {"NodeID": "gpu-node", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 8.0}},
    ]
    monkeypatch.setattr(loop.ray, "nodes", lambda: nodes)
    here = types.SimpleNamespace(get_node_id=lambda: "head")
    monkeypatch.setattr(loop.ray, "get_runtime_context", lambda: here)
    cuda = torch.device("cuda")
    monkeypatch.setattr(ray_worker, "_global_node", types.SimpleNamespace(head=False))  # joined: ray start, a RayJob

    line = loop._learner_gpu_shared(cuda)
    assert line is not None and line.startswith(
        "warning: the learner runs on cuda of this node, whose 2 GPU(s) Ray also hands to actors"
    )
    assert "ray start --num-gpus=0" in line and "learner.device=cpu" in line
    assert loop._learner_gpu_shared(torch.device("cpu")) is None, "a CPU learner takes no GPU"
    nodes[0]["Resources"]["GPU"] = 0.0  # the head started with --num-gpus=0, as docs/deploy.md says
    assert loop._learner_gpu_shared(cuda) is None
    nodes[0]["Resources"]["GPU"] = 2.0
    monkeypatch.setattr(ray_worker, "_global_node", types.SimpleNamespace(head=True))
    assert loop._learner_gpu_shared(cuda) is None, "a cluster this run started: one machine, shared by design"
    monkeypatch.setattr(ray_worker, "_global_node", None)
    assert loop._learner_gpu_shared(cuda) is None, "a Ray Client driver: the learner is on a machine of its own"
