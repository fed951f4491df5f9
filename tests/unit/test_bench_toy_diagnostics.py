"""bench/toy_diagnostics.py on a tiny budget: both checks run and the regression fits."""

from __future__ import annotations

import numpy as np
import torch

from common.config import load_config
from common.policy import SchedulePolicy, policy_kwargs
from rollout.backends.toy import ToySampler
from tests.conftest import REPO, load_bench

TINY_POLICY = {"widths": [8, 8, 16, 16], "groups": 4, "attn_heads": 2, "head_hidden": 16}


def test_tiny_budget_checks(tmp_path):
    cfg = load_config(["--config", str(REPO / "configs" / "toy.yaml")], policy=TINY_POLICY)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    sampler = ToySampler(**cfg.sampler.toy.model_dump())
    L = cfg.rollout.steps
    torch.manual_seed(0)
    SchedulePolicy(**policy_kwargs(cfg.policy, sampler.spec(), L, sampler.default_tau(L))).save_pretrained(
        run / "policy"
    )
    out = load_bench("toy_diagnostics.py").main(
        [
            "--run",
            str(run),
            "--draws",
            "2",
            "--fit-steps",
            "150",
            "--candidates",
            "20",
            "--train-contexts",
            "300",
            "--eval-seeds",
            "5",
        ]
    )
    for name in (
        "at the mean: learned - best fixed",
        "under the policy's noise: learned - best fixed",
        "per-(prompt, mode) table - best fixed",
        "regressed policy - best fixed",
    ):
        assert np.isfinite(out[name]["mean"]) and out[name]["n"] == 50
    assert out["fit loss"]["last"] < 0.5 * out["fit loss"]["first"]
