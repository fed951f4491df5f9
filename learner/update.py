"""The REINFORCE update (DESIGN.md section 1).

g = 1/(C*K) sum_c sum_i (r_ci - b_ci) grad log pi(tau_ci | c), baseline detached; log pi is
recomputed here with gradients from the inputs each rollout carries. Plain REINFORCE: no std
normalisation (optional), no clipping of the ratio, no KL. AdamW and a gradient-norm clip.

One step off policy (``learner.pipeline``) the rollouts were drawn under the weights before the
previous update (the behaviour policy mu, whose log-prob each rollout records), so the update is
importance weighted: ``g = 1/(C*K) sum (r - b) rho grad log pi(tau)`` with
``rho = pi(tau) / mu(tau)``, the gradient of ``-mean((r - b) * rho)``. The ratio is not truncated:
the estimator stays unbiased for the gradient at the current weights; one update apart, rho is
close to 1 (the step logs its spread and effective sample size).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from common.policy import PolicyInputs, SchedulePolicy, entropy, log_prob


def optimizer_for(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The learner's AdamW. On a GPU the fused kernel (one launch per step for all the parameters,
    where the multi-tensor one makes several per group of tensors: the step of a large policy);
    elsewhere the multi-tensor one. The fused step is not bit-identical to the multi-tensor one,
    and the CPU runs and their documented tables are kept to the bit (on the toy's CPU the fused
    step would save 0.8 ms of an iteration). A checkpoint keeps the choice it was written with
    (``Optimizer.load_state_dict`` restores it)."""
    params = list(params)
    if params and all(p.device.type == "cuda" for p in params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def reinforce_step(
    policy: SchedulePolicy,
    optimizer: torch.optim.Optimizer,
    inputs: PolicyInputs,
    log_tau: np.ndarray,
    advantage: np.ndarray,
    behaviour_logp: np.ndarray,
    grad_clip: float,
    importance: bool = False,
) -> dict[str, float]:
    """One update on C contexts x K rollouts; returns the step's metrics.

    ``log_tau`` [C, K, L+1] is the log of each drawn point: its log-prob is that of the draw that
    produced the executed schedule, so the estimator is exactly unbiased (DESIGN.md section 1).
    ``importance``: the rollouts come from the behaviour policy whose log-probs are
    ``behaviour_logp`` (one step off policy), and each term is weighted by pi / mu.
    """
    alpha = policy(inputs)  # [C, L+1]; the policy has no train-mode behaviour (no dropout, no batch norm)
    c, k = advantage.shape
    device = alpha.device  # the policy's: the learner's GPU if it has one (learner.device)
    logp = log_prob(alpha[:, None, :].expand(c, k, -1), torch.from_numpy(log_tau).to(device))  # [C, K] float64
    adv = torch.from_numpy(np.asarray(advantage, dtype=np.float64)).to(device)
    behaviour = torch.from_numpy(np.asarray(behaviour_logp, dtype=np.float64)).to(device)
    loss = pg_loss(logp, adv, behaviour if importance else None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm ({float(grad_norm)}); the update is skipped")
    optimizer.step()
    with torch.no_grad():
        conc = alpha.sum(-1)
        return {
            "learner/pg_loss": float(loss),
            "learner/grad_norm": float(grad_norm),
            # on-policy: the recomputed log-prob must equal the worker's (a drift means stale weights);
            # one step off policy it is the largest |log rho|
            "learner/logp_drift": float((logp.detach() - behaviour).abs().max()),
            **(is_metrics(logp.detach() - behaviour) if importance else {}),
            "policy/entropy": float(entropy(alpha).mean()),
            "policy/concentration": float(conc.mean()),
            # of the policy before this update (after the previous one): the loop's divergence check
            "policy/alpha_min": float(alpha.min()),
            "policy/alpha_max": float(alpha.max()),
        }


def pg_loss(logp: torch.Tensor, advantage: torch.Tensor, behaviour_logp: torch.Tensor | None = None) -> torch.Tensor:
    """The REINFORCE surrogate whose gradient is the estimator: ``-mean(A * log pi)`` on policy;
    with the behaviour's log-probs, ``-mean(A * pi / mu)`` (its gradient is ``A * rho * grad log pi``,
    with rho = pi / mu evaluated at the current weights, and equal to the on-policy one where
    pi = mu)."""
    if behaviour_logp is None:
        return -(advantage * logp).mean()
    return -(advantage * torch.exp(logp - behaviour_logp)).mean()


def is_metrics(log_rho: torch.Tensor) -> dict[str, float]:
    """The importance ratios' spread: mean (1 in expectation), max, and the effective sample size
    as a share of the batch, ``(sum rho)^2 / (N sum rho^2)`` (1: on policy; small: the behaviour
    policy is too far off for the batch to say much)."""
    rho = torch.exp(log_rho.double().reshape(-1))
    return {
        "learner/is_ratio_mean": float(rho.mean()),
        "learner/is_ratio_max": float(rho.max()),
        "learner/is_ess": float(rho.sum() ** 2 / (rho.numel() * (rho**2).sum())),
    }
