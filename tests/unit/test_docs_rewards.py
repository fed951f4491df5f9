"""docs/rewards.md's complete reward example, run as the page shows it: the module is cut out
of the page, plugged in by import path, scored through a RewardServer, and shipped to a Ray
RewardServer actor whose runtime_env alone makes it importable."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from common.config import ConfigError, RewardSpec
from rewards.actors import RewardServer
from tests.conftest import REPO


def _example_module() -> str:
    page = (REPO / "docs" / "rewards.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    (code,) = [b for b in blocks if b.startswith("# my_rewards.py")]
    return code


def _images() -> np.ndarray:
    red = np.zeros((2, 16, 16, 3), np.uint8)
    red[..., 0] = 230
    return red


@pytest.fixture
def my_rewards(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text(_example_module())
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def test_doc_example_scores_through_a_reward_server(my_rewards):
    server = RewardServer("my_rewards:ColourMatch", {"sharpness": 4.0})
    s = server.score(_images(), ["a red square", "a blue square"])
    assert s.dtype == np.float32 and s[0] > 0.8 and s[1] < 0.2
    with pytest.raises(
        RuntimeError,
        match=r"reward 'my_rewards:ColourMatch' failed on prompts \['a cat'\]: ValueError: no colour named in 'a cat'",
    ):
        server.score(_images()[:1], ["a cat"])


@pytest.mark.ray
def test_doc_example_in_a_ray_server_and_bad_specs_fail_at_startup(my_rewards, ray_local):
    from learner.groups import RewardGroup

    path = os.pathsep.join([str(my_rewards.parent), str(REPO), os.environ.get("PYTHONPATH", "")])
    spec = RewardSpec(
        name="my_rewards:ColourMatch",
        kwargs={"sharpness": 4.0},
        num_cpus=0.25,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    group = RewardGroup([spec])
    s = ray_local.get(group.servers[0][0].score.remote(_images(), ["a red square", "a green square"]))
    assert s[0] > 0.8 and s[1] < 0.2
    # the page's startup error: a misspelt class, one line naming the reward
    bad = spec.model_copy(update={"name": "my_rewards:ColourMach"})
    with pytest.raises(
        ConfigError,
        match=r"rewards\[0\] \('my_rewards:ColourMach'\) could not start: ValueError: .*has no attribute 'ColourMach'",
    ):
        RewardGroup([bad])
