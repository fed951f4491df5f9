"""docs/backends.md's own sampler, run as the page shows it: the module is cut out of the page,
named by import path, shipped to the rollout workers by their runtime_env alone, and trained for
a few iterations; a sampler that misses a method fails at startup with one line."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from common.codec import read_records
from common.config import ConfigError, load_config
from common.messages import RolloutRecord
from learner.loop import train
from tests.conftest import REPO, tiny_overrides


def _example_module() -> str:
    page = (REPO / "docs" / "backends.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    (code,) = [b for b in blocks if b.startswith("# my_sampler.py")]
    return code


@pytest.fixture
def plugin_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugin")
    (d / "my_sampler.py").write_text(_example_module())
    (d / "broken_sampler.py").write_text(
        "from my_sampler import GaussianFlow\n\nclass NoSample(GaussianFlow):\n    sample = None\n"
    )
    return d


def _overrides(tmp_path, plugin_dir, backend: str, **extra):
    path = os.pathsep.join([str(plugin_dir), str(REPO), os.environ.get("PYTHONPATH", "")])
    return tiny_overrides(
        tmp_path,
        sampler={
            "backend": backend,
            "kwargs": {"dim": 3, "spread": 0.3},
            "runtime_env": {"env_vars": {"PYTHONPATH": path}},
        },
        rewards=[{"name": "fidelity", "num_cpus": 0.5}],
        rollout={"reference_steps": 16},
        **extra,
    )


def test_the_example_is_an_exact_flow(plugin_dir, monkeypatch):
    """Many Euler steps of the closed-form velocity land on the class's Gaussian."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    from my_sampler import GaussianFlow

    s = GaussianFlow(dim=3, spread=0.3)
    from common.schedule import times_from_tau

    noise = s.initial_noise(list(range(4000)))
    times = np.tile(times_from_tau(s.default_tau(64)), (len(noise), 1))
    x = s.sample(["class 2"] * len(noise), noise, times)
    assert np.allclose(x.mean(0), s.means[2], atol=0.03)
    assert np.allclose(x.std(0), 0.3, atol=0.02)


@pytest.mark.ray
def test_a_plugin_sampler_trains_through_the_real_loop(ray_local, tmp_path, plugin_dir):
    cfg = load_config([], **_overrides(tmp_path, plugin_dir, "my_sampler:GaussianFlow", learner={"iterations": 3}))
    res = train(cfg)
    recs = list(read_records(res.run_dir / "rollouts.msgpack", RolloutRecord))
    assert len(recs) == 3 * 4 * 2 and {r.prompt for r in recs} <= {f"class {c}" for c in range(5)}
    rewards = np.array([r.rewards["fidelity"] for r in recs])
    assert np.isfinite(rewards).all() and (rewards <= 0).all() and rewards.min() < 0
    table = res.evaluation.summary()
    assert table["default"]["n"] == 5 * 4 and table["default"]["mean"] < 0


@pytest.mark.ray
@pytest.mark.parametrize(
    ("backend", "needle"),
    [
        ("broken_sampler:NoSample", "does not implement the Sampler protocol: no sample()"),
        ("my_sampler:Nope", "module 'my_sampler' has no attribute 'Nope'"),
        ("no_such_module:X", "cannot import module 'no_such_module'"),
    ],
)
def test_a_bad_plugin_sampler_is_one_line_at_startup(ray_local, tmp_path, plugin_dir, backend, needle):
    cfg = load_config([], **_overrides(tmp_path, plugin_dir, backend))
    with pytest.raises(ConfigError, match=r"rollout worker \d could not start: ValueError: sampler .*") as e:
        train(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)
