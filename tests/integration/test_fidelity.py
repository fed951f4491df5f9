"""The fidelity reward end to end: references made on the workers, scored on the reward servers."""

from __future__ import annotations

import numpy as np
import pytest

from common.codec import read_records
from common.config import ConfigError, load_config
from common.messages import RolloutRecord
from common.schedule import times_from_tau
from learner.loop import train
from rewards.fidelity import Fidelity
from rollout.backends.toy import ToySampler
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ray


def test_fidelity_scores_against_the_workers_reference(ray_local, tmp_path):
    """Every logged reward is -MSE between the rollout and the 16-step sample of its own prompt and
    noise, recomputed here from the log's ids alone."""
    over = tiny_overrides(tmp_path, rewards=[{"name": "fidelity", "num_cpus": 0.5}])
    over["rollout"]["reference_steps"] = 16
    cfg = load_config([], **over)
    train(cfg, final_eval=False)
    records = list(read_records(cfg.run_dir / "rollouts.msgpack", RolloutRecord))
    assert len(records) == 3 * 4 * 2
    sampler = ToySampler(**cfg.sampler.toy.model_dump())
    prompts = [r.prompt for r in records]
    noise = sampler.initial_noise([r.seed for r in records])
    images = sampler.sample(prompts, noise, times_from_tau(np.array([r.tau for r in records])))
    ref_times = np.tile(times_from_tau(sampler.default_tau(16)), (len(records), 1))
    refs = sampler.sample(prompts, noise, ref_times)
    expected = Fidelity()(images, prompts, references=refs)
    np.testing.assert_allclose([r.reward for r in records], expected, rtol=1e-5, atol=1e-7)
    assert all(r.reward <= 0 for r in records)


def test_reference_steps_zero_with_fidelity_is_a_config_error(ray_local, tmp_path):
    over = tiny_overrides(tmp_path, rewards=[{"name": "fidelity", "num_cpus": 0.5}])
    over["rollout"]["reference_steps"] = 0
    with pytest.raises(ConfigError, match="fidelity.*reference_steps=0"):
        train(load_config([], **over), final_eval=False)
    # a reference of no more steps than the rollouts it judges (L = 3 here) was taken, silently
    over["rollout"]["reference_steps"] = 3
    with pytest.raises(ConfigError) as e:
        train(load_config([], **over), final_eval=False)
    assert str(e.value) == (
        "reward 'fidelity' compares with a many-step reference sample, but rollout.reference_steps=3 is not more"
        " than the rollouts' rollout.steps=3: give reference_steps of more steps"
    )
