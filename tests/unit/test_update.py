"""The learning signal: an exact estimator, an update that moves the right way, pinned numbers.

- The draws are made in log space and scored by their own log-prob, so every component's mean
  score is 0 (E[grad log pi] = 0) even at alpha = 0.01, where a plain draw underflows and must be
  floored; the floored point's score is biased (shown, so that the test can fail).
- ``reinforce_step``'s gradient is the docs/method.md estimator
  ``-1/(C*K) sum (r - b) grad log pi(tau | c)``, with the Dirichlet score written out by hand.
- One step on a one-context bandit moves the Dirichlet mean toward the better schedule, and a
  sign flip anywhere (advantage, loss, log-prob) fails one of these tests.
- One step off policy, the importance-weighted gradient equals the on-policy one where the
  behaviour is the current policy, and is unbiased where it is not: its mean over draws of the
  behaviour Dirichlet matches the on-policy gradient's mean over draws of the target, and the
  unweighted estimator on the same draws (what forgetting the ratio would do) does not.
- AdamW on the policy's flat buffer (``FlatAdamW``) leaves the same bits as the per-tensor
  AdamW, step after step, and its state dict is the per-tensor one's: checkpoints load either way.
- Advantages or behaviour log-probs of another shape than the draws are refused by name.
- The toy's loss and reward are pinned for 3 iterations of the real loop (as torchtune pins its
  recipes): any change to the maths, the draws or the order of work shows here.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy.special import digamma

from common.policy import FlatState, SchedulePolicy, collate, log_dirichlet, log_prob
from common.schedule import TAU_FLOOR, executed_tau, guard_tau
from learner import baselines
from learner.update import FlatAdamW, is_metrics, optimizer_for, pg_loss, reinforce_step

TINY = {"widths": [8, 8, 16, 16], "groups": 4, "attn_heads": 2, "head_hidden": 16, "input_kind": "vector"}


def _score(alpha: np.ndarray, log_tau: np.ndarray) -> np.ndarray:
    """d log Dir(tau | alpha) / d alpha for each draw, by autograd of ``log_prob``: [N, L+1]."""
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    lp = log_prob(a.expand(len(log_tau), -1), torch.from_numpy(log_tau))
    (g,) = torch.autograd.grad(lp.sum(), a, is_grads_batched=False, retain_graph=False, create_graph=False)
    # per-draw scores: the analytic form, checked against autograd's sum just above
    per = digamma(alpha.sum()) - digamma(alpha) + log_tau
    np.testing.assert_allclose(per.sum(0), g.numpy(), rtol=1e-9, atol=1e-6)
    return per


@pytest.mark.parametrize("alpha", [[0.01, 0.5, 0.5, 0.5], [0.02, 2.0, 3.0], [0.01, 0.01, 0.01], [5.0, 0.05, 1.0]])
def test_mean_score_is_zero_for_small_alpha(alpha):
    alpha = np.asarray(alpha)
    log_tau = log_dirichlet(alpha, np.random.default_rng(0), size=200_000)
    assert np.isfinite(log_tau).all()
    np.testing.assert_allclose(np.exp(log_tau).sum(-1), 1.0, atol=1e-12)
    score = _score(alpha, log_tau)
    mean, se = score.mean(0), score.std(0) / np.sqrt(len(score))
    assert np.all(np.abs(mean) < 4.5 * se), (mean, se)


def test_scoring_the_floored_point_is_biased():
    """What the exact draw avoids: at alpha = 0.01 most plain draws have a component floored at
    1e-6, and the score taken at the floored point averages far from 0."""
    alpha = np.array([0.01, 0.5, 0.5, 0.5])
    log_tau = log_dirichlet(alpha, np.random.default_rng(1), size=50_000)
    floored = np.log(guard_tau(np.exp(log_tau)))
    assert np.mean(np.exp(log_tau[:, 0]) < TAU_FLOOR) > 0.5
    score = _score(alpha, floored)[:, 0]
    assert score.mean() > 20 * score.std() / np.sqrt(len(score))


def test_log_dirichlet_matches_the_dirichlet_moments():
    alpha = np.array([0.3, 1.0, 4.0, 2.5])
    tau = np.exp(log_dirichlet(alpha, np.random.default_rng(2), size=100_000))
    a0 = alpha.sum()
    np.testing.assert_allclose(tau.mean(0), alpha / a0, atol=4e-3)
    np.testing.assert_allclose(tau.var(0), alpha * (a0 - alpha) / (a0**2 * (a0 + 1)), rtol=0.05)


def test_executed_tau_is_the_draw_floored():
    log_tau = log_dirichlet(np.array([0.01, 1.0, 1.0]), np.random.default_rng(3), size=100)
    tau = executed_tau(log_tau)
    np.testing.assert_allclose(tau.sum(-1), 1.0, atol=1e-12)
    assert tau.min() >= TAU_FLOOR / (1 + 3 * TAU_FLOOR)
    big = np.exp(log_tau) > 1e-3
    np.testing.assert_allclose(tau[big], np.exp(log_tau)[big], rtol=1e-5)


def _bandit_setup(seed: int, variant: str = "conditional"):
    torch.manual_seed(seed)
    steps = 2
    policy = SchedulePolicy(
        steps=steps,
        in_channels=3,
        token_dim=4,
        variant=variant,
        init="default",
        default_tau=[1 / 3] * 3,
        concentration=6.0,
        **TINY,
    ).eval()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3)).astype(np.float32)
    tokens = [rng.standard_normal((2, 4)).astype(np.float32)]
    return policy, collate(x, tokens, None)


def test_estimator_gradient_is_the_design_formula():
    """reinforce_step's parameter gradient equals -1/(C*K) sum_ci adv_ci grad log pi(tau_ci | c),
    with the Dirichlet score digamma(sum a) - digamma(a_i) + log tau_i written out by hand."""
    torch.manual_seed(0)
    c, k, steps = 3, 4, 3
    policy = SchedulePolicy(steps=steps, in_channels=3, token_dim=4, init="scratch", **TINY).eval()
    rng = np.random.default_rng(0)
    inputs = collate(
        rng.standard_normal((c, 3)).astype(np.float32), [rng.standard_normal((2, 4)).astype(np.float32)] * c, None
    )
    with torch.no_grad():
        alpha0 = policy(inputs).double().numpy()
    log_tau = np.stack([log_dirichlet(a, rng, size=k) for a in alpha0])
    adv = rng.standard_normal((c, k))

    alpha = policy(inputs)
    score = digamma(alpha0.sum(-1))[:, None, None] - digamma(alpha0)[:, None, :] + log_tau  # [C, K, L+1]
    v = -(adv[:, :, None] * score).sum(1) / (c * k)  # d loss / d alpha, [C, L+1]
    expected = torch.autograd.grad(alpha, list(policy.parameters()), grad_outputs=torch.from_numpy(v).float())

    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    reinforce_step(policy, opt, inputs, log_tau, adv, np.zeros((c, k)), grad_clip=1e9)
    for p, e in zip(policy.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("variant", ["conditional", "global"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_step_moves_the_mean_toward_the_better_schedule(variant, seed):
    """A one-context bandit: reward = -|tau - target|^2. One REINFORCE step (rloo baseline) moves the
    Dirichlet mean toward the target; the same step with the advantage's sign flipped moves it away."""
    target = np.array([0.05, 0.25, 0.7])
    k = 64

    def step(sign: float) -> tuple[float, float]:
        policy, inputs = _bandit_setup(seed, variant)
        with torch.no_grad():
            alpha = policy(inputs).double().numpy()
        log_tau = log_dirichlet(alpha[0], np.random.default_rng(seed), size=k)[None]  # [1, K, L+1]
        r = -((executed_tau(log_tau) - target) ** 2).sum(-1)  # [1, K]
        b, _ = baselines.compute("rloo", np.repeat(r, 2, axis=0))
        adv = sign * (r - b[:1])
        opt = torch.optim.Adam(policy.parameters(), lr=0.05)
        reinforce_step(policy, opt, inputs, log_tau, adv, np.zeros((1, k)), grad_clip=1.0)
        with torch.no_grad():
            after = policy(inputs).double().numpy()[0]
        dist = lambda a: float(np.linalg.norm(a / a.sum() - target))  # noqa: E731
        return dist(alpha[0]), dist(after)

    before, toward = step(+1.0)
    _, away = step(-1.0)
    assert toward < before < away, (before, toward, away)


@pytest.mark.ray
def test_toy_loss_and_reward_are_pinned_for_three_iterations(ray_local, tmp_path):
    """Three iterations of the real loop on the toy: pg loss and reward to 1e-6 (CPU, 1 thread)."""
    from common.config import load_config
    from learner.loop import train
    from tests.conftest import tiny_overrides

    cfg = load_config([], **tiny_overrides(tmp_path, learner={"iterations": 3, "lr": 1e-2}))
    train(cfg, final_eval=False)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    got = [(r["learner/pg_loss"], r["rollout/reward_mean"]) for r in rows]
    np.testing.assert_allclose(got, PINNED, rtol=1e-5, atol=1e-6)


def test_importance_weighted_step_is_the_on_policy_step_when_the_behaviour_is_current():
    """rho = 1: the same gradient, the same parameters after the step, and is_ess = 1."""
    torch.manual_seed(0)
    c, k = 3, 4
    rng = np.random.default_rng(4)
    inputs = collate(
        rng.standard_normal((c, 3)).astype(np.float32), [rng.standard_normal((2, 4)).astype(np.float32)] * c, None
    )
    adv = rng.standard_normal((c, k))
    after = {}
    for importance in (False, True):
        torch.manual_seed(0)
        policy = SchedulePolicy(steps=3, in_channels=3, token_dim=4, init="scratch", **TINY).eval()
        with torch.no_grad():
            alpha = policy(inputs).double()
        log_tau = np.stack([log_dirichlet(a, np.random.default_rng(5), size=k) for a in alpha.numpy()])
        behaviour = log_prob(alpha[:, None, :].expand(c, k, -1), torch.from_numpy(log_tau)).numpy()
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        m = reinforce_step(policy, opt, inputs, log_tau, adv, behaviour, grad_clip=1e9, importance=importance)
        after[importance] = [p.detach().clone() for p in policy.parameters()]
    for a, b in zip(after[False], after[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert m["learner/is_ess"] == pytest.approx(1.0) and m["learner/is_ratio_max"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("shift", [0.3, 1.0])
def test_importance_weighted_gradient_is_unbiased(shift):
    """d/d alpha of E_pi[f(tau)] two ways: on-policy draws of pi, and draws of a behaviour mu one
    update away (alpha_mu = alpha * exp(shift * noise)), weighted by pi / mu through ``pg_loss``'s own
    autograd. Their means agree within 4.5 s.e.; without the weights they do not (for the larger
    shift), so the test would catch a dropped ratio."""
    rng = np.random.default_rng(6)
    alpha = np.array([1.5, 4.0, 2.5])
    mu = alpha * np.exp(shift * np.array([0.6, -0.5, 0.2]))
    target = np.array([0.05, 0.6, 0.35])
    n = 200_000

    def per_draw_grads(log_tau: np.ndarray, behaviour: np.ndarray | None) -> np.ndarray:
        a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        lt = torch.from_numpy(log_tau)
        f = torch.from_numpy(-((np.exp(log_tau) - target) ** 2).sum(-1))
        logp = log_prob(a.expand(n, -1), lt)
        # each draw's gradient (jacobian of the per-draw surrogate): the sum of n of them, one at a time
        # via the closed-form score, checked against pg_loss's autograd of their mean
        score = digamma(alpha.sum()) - digamma(alpha) + log_tau
        weight = f.numpy() * (1.0 if behaviour is None else np.exp(logp.detach().numpy() - behaviour))
        grads = -weight[:, None] * score
        (g,) = torch.autograd.grad(pg_loss(logp, f, None if behaviour is None else torch.from_numpy(behaviour)), a)
        np.testing.assert_allclose(g.numpy(), grads.mean(0), rtol=1e-6, atol=1e-9)
        return grads

    on = per_draw_grads(log_dirichlet(alpha, rng, size=n), None)
    off_tau = log_dirichlet(mu, rng, size=n)
    off_logp = log_prob(torch.from_numpy(mu).expand(n, -1), torch.from_numpy(off_tau)).numpy()
    weighted = per_draw_grads(off_tau, off_logp)
    se = np.sqrt(on.var(0) / n + weighted.var(0) / n)
    assert np.all(np.abs(on.mean(0) - weighted.mean(0)) < 4.5 * se), (on.mean(0), weighted.mean(0), se)
    if shift >= 1.0:
        unweighted = per_draw_grads(off_tau, None)
        assert np.any(np.abs(on.mean(0) - unweighted.mean(0)) > 10 * se), (on.mean(0), unweighted.mean(0), se)


def test_is_metrics_report_the_ratios_spread():
    m = is_metrics(torch.log(torch.tensor([1.0, 1.0, 2.0, 0.5], dtype=torch.float64)))
    assert m["learner/is_ratio_mean"] == pytest.approx(1.125)
    assert m["learner/is_ratio_max"] == pytest.approx(2.0)
    assert m["learner/is_ess"] == pytest.approx(4.5**2 / (4 * 6.25))


#: (learner/pg_loss, rollout/reward_mean) of iterations 1..3 of ``tiny_overrides`` at lr 1e-2.
PINNED = [
    (70.84804153485459, -0.40960338711738586),
    (2.305475375048879, -0.7706156447529793),
    (-89.56330539152748, -2.028354372829199),
]


def test_cosine_learning_rate_runs_from_lr_to_the_final_ratio():
    from common.config import LearnerConfig
    from learner.loop import learning_rate

    lc = LearnerConfig(iterations=101, lr=2e-3, lr_schedule="cosine", lr_final_ratio=0.1)
    lrs = [learning_rate(lc, it) for it in range(101)]
    assert lrs[0] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-4) and lrs[50] == pytest.approx(1.1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert learning_rate(LearnerConfig(iterations=101, lr=2e-3), 70) == 2e-3  # constant


def _flat_and_per_tensor(seed: int = 0) -> tuple[SchedulePolicy, SchedulePolicy, FlatAdamW, torch.optim.AdamW]:
    """Two copies of one policy: one stepped by the learner's AdamW on its flat buffer, one by
    the per-tensor multi-tensor AdamW (what the learner used before)."""
    torch.manual_seed(seed)
    flat = SchedulePolicy(steps=3, in_channels=3, token_dim=4, init="scratch", **TINY).eval()
    per = SchedulePolicy(steps=3, in_channels=3, token_dim=4, init="scratch", **TINY).eval()
    per.load_state_dict(flat.state_dict())
    opt = optimizer_for(FlatState(flat), lr=1e-2, weight_decay=0.01)
    assert isinstance(opt, FlatAdamW)
    return flat, per, opt, torch.optim.AdamW(per.parameters(), lr=1e-2, weight_decay=0.01, foreach=True)


def _steps(policy, opt, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    c, k = 3, 4
    for _ in range(n):
        inputs = collate(
            rng.standard_normal((c, 3)).astype(np.float32), [rng.standard_normal((2, 4)).astype(np.float32)] * c, None
        )
        with torch.no_grad():
            alpha = policy(inputs).double().numpy()
        log_tau = np.stack([log_dirichlet(a, rng, size=k) for a in alpha])
        reinforce_step(policy, opt, inputs, log_tau, rng.standard_normal((c, k)), np.zeros((c, k)), grad_clip=0.5)


def _same(a: SchedulePolicy, b: SchedulePolicy) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_flat_adamw_leaves_the_per_tensor_adamws_bits():
    flat, per, opt_flat, opt_per = _flat_and_per_tensor()
    before = SchedulePolicy(steps=3, in_channels=3, token_dim=4, init="scratch", **TINY).eval()
    before.load_state_dict(per.state_dict())
    _steps(flat, opt_flat, 25)
    _steps(per, opt_per, 25)
    assert not _same(flat, before)  # the steps moved the weights
    assert _same(flat, per)
    saved_flat, saved_per = opt_flat.state_dict(), opt_per.state_dict()
    assert saved_flat["param_groups"] == saved_per["param_groups"]
    assert saved_flat["state"].keys() == saved_per["state"].keys() == set(range(len(list(per.parameters()))))
    for i, state in saved_per["state"].items():
        assert state.keys() == saved_flat["state"][i].keys()
        assert all(torch.equal(v, saved_flat["state"][i][k]) for k, v in state.items())


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipped, and left as it is
def test_flat_clip_is_clip_grad_norm_to_the_bit(max_norm):
    flat, per, opt_flat, _ = _flat_and_per_tensor()
    rng = np.random.default_rng(0)
    inputs = collate(
        rng.standard_normal((3, 3)).astype(np.float32), [rng.standard_normal((2, 4)).astype(np.float32)] * 3, None
    )
    for policy in (flat, per):
        policy(inputs).pow(2).sum().backward()
    norm = opt_flat.clip_grad_norm_(max_norm)
    stock = torch.nn.utils.clip_grad_norm_(per.parameters(), max_norm)
    assert torch.equal(norm, stock) and float(norm) > 1e-3
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(flat.parameters(), per.parameters(), strict=True))


def test_flat_adamw_resumes_from_a_per_tensor_checkpoint_and_back():
    """A per-tensor AdamW's state continues in FlatAdamW (and the reverse) to the same bits."""
    flat, per, opt_flat, opt_per = _flat_and_per_tensor()
    _steps(per, opt_per, 5)
    flat.load_state_dict(per.state_dict())
    opt_flat.load_state_dict(opt_per.state_dict())
    _steps(flat, opt_flat, 5, seed=1)
    _steps(per, opt_per, 5, seed=1)
    assert _same(flat, per)
    other = SchedulePolicy(steps=3, in_channels=3, token_dim=4, init="scratch", **TINY).eval()
    other.load_state_dict(flat.state_dict())
    opt_other = torch.optim.AdamW(other.parameters(), lr=1e-2, weight_decay=0.01, foreach=True)
    opt_other.load_state_dict(opt_flat.state_dict())
    _steps(other, opt_other, 3, seed=2)
    _steps(flat, opt_flat, 3, seed=2)
    assert _same(flat, other)


def test_flat_adamw_folds_back_a_gradient_set_to_none_and_refuses_replaced_parameters():
    flat, per, opt_flat, opt_per = _flat_and_per_tensor()
    _steps(flat, opt_flat, 2)
    _steps(per, opt_per, 2)
    flat.zero_grad(set_to_none=True)  # every parameter's grad None: the next backward makes new ones
    per.zero_grad(set_to_none=True)
    _steps(flat, opt_flat, 2, seed=1)
    _steps(per, opt_per, 2, seed=1)
    assert _same(flat, per)
    with pytest.raises(ValueError, match="in 1 groups; this policy has"):
        group = {**opt_per.state_dict()["param_groups"][0], "params": [0]}
        opt_flat.load_state_dict({"state": {}, "param_groups": [group]})
    flat.load_state_dict(per.state_dict(), assign=True)  # new storage: no longer the buffer
    with pytest.raises(RuntimeError, match="no longer live in the optimizer's flat buffer"):
        _steps(flat, opt_flat, 1)


def test_advantages_of_another_shape_than_the_draws_are_refused():
    """Not broadcast against the draws' [C, K], where a wrong shape would train on the wrong terms."""
    policy, inputs = _bandit_setup(0)
    log_tau = log_dirichlet(np.ones(3), np.random.default_rng(0), size=4)[None]  # [1, 4, 3]
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    shapes = r"advantages of shape \(1, 2\) and behaviour log-probs of shape \(1, 4\) for draws of shape \(1, 4, 3\)"
    with pytest.raises(ValueError, match=shapes):
        reinforce_step(policy, opt, inputs, log_tau, np.zeros((1, 2)), np.zeros((1, 4)), grad_clip=1.0)
    with pytest.raises(ValueError, match=r"behaviour log-probs of shape \(4,\)"):
        reinforce_step(policy, opt, inputs, log_tau, np.zeros((1, 4)), np.zeros(4), grad_clip=1.0)


def test_a_resume_that_changes_the_length_of_a_decaying_rate_says_so(capsys, tmp_path):
    """A cosine run of 4 iterations resumed with learner.iterations=8 went from 0.0001 (its end)
    back up to 0.00045, silently."""
    from common.config import load_config
    from learner.loop import _warn_stretched_lr
    from tests.conftest import REPO

    flags = [
        "--config",
        str(REPO / "configs" / "toy.yaml"),
        f"--experiment.output_dir={tmp_path}",
        "--learner.lr_schedule=cosine",
    ]
    saved = {"learner": {"iterations": 4}}
    _warn_stretched_lr(load_config([*flags, "--learner.iterations=8"]), saved, 4)
    assert capsys.readouterr().out.strip() == (
        f"warning: {tmp_path / 'toy'}: learner.iterations is 8 where the checkpoint's run had 4: the cosine learning"
        " rate is spread over the new length, 0.00045 at iteration 5 (the run's: 0.0001 at iteration 4)"
    )
    _warn_stretched_lr(load_config([*flags, "--learner.iterations=4"]), saved, 2)  # the same length
    _warn_stretched_lr(load_config([*flags[:-1], "--learner.iterations=8"]), saved, 4)  # a constant rate
    assert capsys.readouterr().out == ""
