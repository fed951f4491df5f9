"""The REINFORCE update (docs/method.md).

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

from typing import Any

import numpy as np
import torch

from common.policy import FlatState, PolicyInputs, SchedulePolicy, entropy, log_prob


def optimizer_for(state: FlatState, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The learner's AdamW for the policy ``state`` holds. Where its flat buffer is exactly the
    parameters, AdamW steps the buffer whole (``FlatAdamW``: the same bits, a few operations in
    all instead of a few per tensor); otherwise one tensor per parameter.

    On a GPU the fused kernel; elsewhere the multi-tensor one. The fused step is not bit-identical
    to the multi-tensor one, and the CPU runs and their documented tables are kept to the bit. A
    checkpoint keeps the choice it was written with (``Optimizer.load_state_dict`` restores it)."""
    foreach, fused = adamw_kernel(state.parameters)
    if state.holds_parameters:
        return FlatAdamW(state, lr=lr, weight_decay=weight_decay, foreach=foreach, fused=fused)
    return torch.optim.AdamW(state.parameters, lr=lr, weight_decay=weight_decay, foreach=foreach, fused=fused)


def adamw_kernel(params: list[torch.nn.Parameter]) -> tuple[bool | None, bool | None]:
    """AdamW's (foreach, fused) for ``params``: fused where they are all on a GPU, else the
    multi-tensor step; the one not set is left to torch."""
    on_gpu = bool(params) and all(p.device.type == "cuda" for p in params)
    return (None, True) if on_gpu else (True, None)


class FlatAdamW(torch.optim.AdamW):
    """AdamW on one flat buffer that holds every parameter of the policy (``FlatState``), its
    gradient one flat buffer too: a step is a handful of operations on the buffer where the
    per-tensor AdamW makes a handful per tensor (the toy's 68 tensors: 1.7 ms a step on a CPU
    core, 0.3 ms flat). Element for element it is the same arithmetic, so the same bits.

    ``state_dict`` and ``load_state_dict`` speak the per-tensor AdamW's format (one entry per
    parameter), so a checkpoint of either loads into the other. A parameter whose gradient was set
    to None or replaced (``policy.zero_grad()``, a hook) is folded back into the buffer at the next
    step; a parameter replaced, or given other storage (``load_state_dict(assign=True)``, ``.to()``
    another device), is no longer in the buffer, and the step refuses to run (a per-tensor AdamW
    would go on stepping the parameters it was given, which the policy no longer uses)."""

    def __init__(self, state: FlatState, **kwargs: Any):
        if state.flat is None or not state.holds_parameters:
            raise ValueError("FlatAdamW needs a FlatState whose buffer holds exactly the parameters")
        self._module, self._params = state.module, state.parameters
        whole = torch.nn.Parameter(state.flat)  # shares the buffer
        whole.grad = torch.zeros_like(whole)
        self._grads: list[torch.Tensor] = []
        self._where: list[tuple[int, int]] = []  # (offset, size) of each parameter in the buffer
        offset = 0
        for p in self._params:
            self._grads.append(whole.grad[offset : offset + p.numel()].view_as(p))
            self._where.append((offset, p.numel()))
            offset += p.numel()
        self._ptrs = [p.data_ptr() for p in self._params]
        self._attach()
        super().__init__([whole], **kwargs)

    def _attach(self) -> None:
        """Every parameter's gradient is its view of the flat gradient (copied in where it is not)."""
        for p, g in zip(self._params, self._grads, strict=True):
            if p.grad is not g:
                if p.grad is None:
                    g.zero_()
                else:
                    g.copy_(p.grad)
                p.grad = g

    @torch.no_grad()
    def step(self, closure=None):
        now = list(self._module.parameters())
        if (
            len(now) != len(self._params)
            or any(a is not b for a, b in zip(now, self._params, strict=False))
            or [p.data_ptr() for p in self._params] != self._ptrs
        ):
            raise RuntimeError(
                "the policy's parameters no longer live in the optimizer's flat buffer (replaced by"
                " load_state_dict(assign=True) or moved with .to()?): build the optimizer again"
            )
        self._attach()
        return super().step(closure)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the policy's parameters, bit for bit: the same
        norm of the per-tensor norms, then one multiply of the flat gradient where the stock call
        makes one per tensor (0.6 ms a step on the toy where it took 0.9). Returns the total norm."""
        self._attach()
        total = torch.nn.utils.get_total_norm(self._grads)
        torch.nn.utils.clip_grads_with_norm_(self.param_groups[0]["params"], max_norm, total)
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient (the parameters keep their views of it, whatever ``set_to_none``)."""
        self._attach()
        self.param_groups[0]["params"][0].grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The per-tensor AdamW's state dict: one entry per parameter, in ``parameters()`` order."""
        flat = super().state_dict()
        group = {**flat["param_groups"][0], "params": list(range(len(self._params)))}
        one = flat["state"].get(0)
        per: dict[int, dict[str, Any]] = {}
        if one is not None:
            for i, ((offset, n), p) in enumerate(zip(self._where, self._params, strict=True)):
                per[i] = {
                    k: v.clone() if k == "step" else v[offset : offset + n].view_as(p).clone() for k, v in one.items()
                }
        return {"state": per, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a per-tensor AdamW's state dict (``state_dict``'s format) of the same parameters."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self._params):
            raise ValueError(
                f"optimizer state for {sum(len(g['params']) for g in groups)} parameters in {len(groups)} groups;"
                f" this policy has {len(self._params)} parameters in one group"
            )
        saved = state_dict["state"]
        states = [saved[i] for i in groups[0]["params"] if i in saved]
        one: dict[str, Any] = {}
        if states:
            if len(states) != len(self._params) or len({float(s["step"]) for s in states}) != 1:
                raise ValueError("optimizer state of some parameters only, or of different step counts")
            # copies, never the caller's tensors (a live optimizer's state dict holds its own)
            one = {
                k: v.clone() if k == "step" else torch.cat([s[k].reshape(-1) for s in states])
                for k, v in states[0].items()
            }
        super().load_state_dict({"state": {0: one} if one else {}, "param_groups": [{**groups[0], "params": [0]}]})


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
    produced the executed schedule, so the estimator is exactly unbiased (docs/method.md).
    ``importance``: the rollouts come from the behaviour policy whose log-probs are
    ``behaviour_logp`` (one step off policy), and each term is weighted by pi / mu.
    """
    if np.shape(advantage) != log_tau.shape[:2] or np.shape(behaviour_logp) != log_tau.shape[:2]:
        raise ValueError(
            f"advantages of shape {np.shape(advantage)} and behaviour log-probs of shape"
            f" {np.shape(behaviour_logp)} for draws of shape {log_tau.shape}: both must be [C, K]"
        )
    alpha = policy(inputs)  # [C, L+1]; the policy has no train-mode behaviour (no dropout, no batch norm)
    c, k = advantage.shape
    device = alpha.device  # the policy's: the learner's GPU if it has one (learner.device)
    logp = log_prob(alpha[:, None, :].expand(c, k, -1), torch.from_numpy(log_tau).to(device))  # [C, K] float64
    adv = torch.from_numpy(np.asarray(advantage, dtype=np.float64)).to(device)
    behaviour = torch.from_numpy(np.asarray(behaviour_logp, dtype=np.float64)).to(device)
    loss = pg_loss(logp, adv, behaviour if importance else None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if isinstance(optimizer, FlatAdamW):
        grad_norm = optimizer.clip_grad_norm_(grad_clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm {float(grad_norm)}: the optimizer did not step")
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
