"""bench/baseline_variance.py on a tiny budget: the figure is written and the ratios are sane."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from common.config import load_config
from common.policy import SchedulePolicy, log_prob, policy_kwargs
from tests.conftest import load_bench

REPO = Path(__file__).resolve().parents[2]


def _bench():
    return load_bench("baseline_variance.py")


def test_tiny_budget_writes_png_and_sane_ratios(tmp_path):
    bench = _bench()
    out = tmp_path / "variance.png"
    # --warmup 2 also runs the warm-up path (REINFORCE steps) and a second table
    tables = bench.main(["--trials", "8", "--ks", "2", "4", "--seed", "0", "--warmup", "2", "--out", str(out)])
    assert out.is_file() and out.stat().st_size > 0
    assert len(tables) == 2
    for tab in tables:
        ratios = tab.ratios()
        assert set(ratios) == {"none", "rloo", "xctx", "js", "js_loco"}
        assert all(v == 1.0 for v in ratios["rloo"].values())  # exactly: var(rloo) / var(rloo)
        for name, by_k in ratios.items():
            assert list(by_k) == [2, 4]
            assert all(np.isfinite(v) and v > 0 for v in by_k.values()), (name, by_k)
        # 8 trials only: the ratios are too noisy to order the baselines (the full bench does that)
        assert np.all(tab.variance > 0)
        assert np.all((tab.js_alpha >= 0) & (tab.js_alpha <= 1))


def test_batched_gradients_equal_one_backward_per_baseline():
    """policy_gradients' single batched backward gives the surrogate's gradient for each baseline."""
    bench = _bench()
    policy_cfg = {"init": "scratch", "widths": [8, 8, 16, 16], "groups": 4, "attn_heads": 2, "head_hidden": 16}
    cfg = load_config(["--config", str(REPO / "configs" / "toy.yaml")], policy=policy_cfg)
    toy = bench.Toy.from_config(cfg)
    torch.manual_seed(0)
    L = toy.steps
    policy = SchedulePolicy(**policy_kwargs(cfg.policy, toy.sampler.spec(), L, toy.sampler.default_tau(L))).eval()
    params = list(policy.parameters())
    k = 3
    prompts, inputs = toy.contexts(np.random.default_rng(0), 5)
    alpha = policy(inputs)
    log_tau, r = toy.rollouts(alpha.detach().double().numpy(), prompts, inputs.x.numpy(), k, np.random.default_rng(1))
    adv = np.stack([r, r - r.mean(), r - r.mean(1, keepdims=True)])  # [3, C, K]

    logp = log_prob(alpha[:, None, :].expand(-1, k, -1), torch.from_numpy(log_tau))
    direct = []
    for a in adv:
        grads = torch.autograd.grad((torch.from_numpy(a) * logp).mean(), params, retain_graph=True)
        direct.append(torch.cat([g.reshape(-1) for g in grads]).double().numpy())
    direct = np.stack(direct)
    assert np.all(np.abs(direct).max(1) > 0)

    batched = bench.policy_gradients(alpha, log_tau, adv, params)  # frees the graph: last
    np.testing.assert_allclose(batched, direct, rtol=1e-4, atol=1e-6 * np.abs(direct).max())
