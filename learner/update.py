"""The REINFORCE update (DESIGN.md section 1).

g = 1/(C*K) sum_c sum_i (r_ci - b_ci) grad log pi(tau_ci | c), baseline detached; log pi is
recomputed here with gradients from the inputs each rollout carries. Plain REINFORCE: no std
normalisation (optional), no clipping of the ratio, no KL. AdamW and a gradient-norm clip.
"""

from __future__ import annotations

import numpy as np
import torch

from common.policy import PolicyInputs, SchedulePolicy, entropy, log_prob


def reinforce_step(
    policy: SchedulePolicy,
    optimizer: torch.optim.Optimizer,
    inputs: PolicyInputs,
    log_tau: np.ndarray,
    advantage: np.ndarray,
    behaviour_logp: np.ndarray,
    grad_clip: float,
) -> dict[str, float]:
    """One update on C contexts x K rollouts; returns the step's metrics.

    ``log_tau`` [C, K, L+1] is the log of each drawn point: its log-prob is that of the draw that
    produced the executed schedule, so the estimator is exactly unbiased (DESIGN.md section 1).
    """
    alpha = policy(inputs)  # [C, L+1]; the policy has no train-mode behaviour (no dropout, no batch norm)
    c, k = advantage.shape
    device = alpha.device  # the policy's: the learner's GPU if it has one (learner.device)
    logp = log_prob(alpha[:, None, :].expand(c, k, -1), torch.from_numpy(log_tau).to(device))  # [C, K] float64
    adv = torch.from_numpy(np.asarray(advantage, dtype=np.float64)).to(device)
    loss = -(adv * logp).mean()
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
            # on-policy: the recomputed log-prob must equal the worker's (a drift means stale weights)
            "learner/logp_drift": float((logp.detach().cpu() - torch.from_numpy(behaviour_logp)).abs().max()),
            "policy/entropy": float(entropy(alpha).mean()),
            "policy/concentration": float(conc.mean()),
            # of the policy before this update (after the previous one): the loop's divergence check
            "policy/alpha_min": float(alpha.min()),
            "policy/alpha_max": float(alpha.max()),
        }
