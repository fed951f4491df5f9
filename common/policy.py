"""The schedule policy: (x_T, text tokens) -> Dirichlet(alpha) over the L+1 simplex (DESIGN.md 1).

``conditional``: 4 blocks of (conv3x3, GroupNorm, SiLU) x 2 with stride-2 downsampling between
blocks, each followed by cross-attention from the image features to the text tokens; the
mean-pooled output of every block is concatenated (a feature pyramid), optionally with the pooled
text embedding, and a 2-layer MLP head outputs L+1 values; ``alpha = softplus(h) + 1e-3``.
A vector-shaped x_T ([B, D]) is read as a 1x1 image with D channels.

``global``: no inputs, one learnable alpha (the "learned global schedule" baseline).

Saved and loaded with safetensors through huggingface_hub's PyTorchModelHubMixin:
``policy.save_pretrained(dir)`` / ``SchedulePolicy.from_pretrained(dir)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

if TYPE_CHECKING:
    from common.config import PolicyConfig
    from common.messages import SamplerSpec

ALPHA_MIN = 1e-3  # alpha = softplus(h) + ALPHA_MIN (DESIGN.md section 1)


@dataclass
class PolicyInputs:
    """A batch of policy inputs. ``mask`` is True on real tokens; ``pooled`` may be None."""

    x: torch.Tensor  # [B, C, H, W] or [B, D]
    tokens: torch.Tensor  # [B, T, E]
    mask: torch.Tensor  # [B, T] bool
    pooled: torch.Tensor | None = None  # [B, P]

    def __len__(self) -> int:
        return self.x.shape[0]


def inverse_softplus(y: np.ndarray) -> np.ndarray:
    return np.log(np.expm1(y))


class _Block(nn.Module):
    """(conv3x3, GroupNorm, SiLU) x 2, then cross-attention to the text tokens (residual)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, heads: int, token_dim: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.GroupNorm(groups, c_out),
            nn.SiLU(),
        )
        self.norm = nn.LayerNorm(c_out)
        self.attn = nn.MultiheadAttention(c_out, heads, kdim=token_dim, vdim=token_dim, batch_first=True)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.convs(h)
        b, c, hh, ww = h.shape
        q = h.flatten(2).transpose(1, 2)  # [B, HW, C]
        a, _ = self.attn(self.norm(q), tokens, tokens, key_padding_mask=~mask, need_weights=False)
        return (q + a).transpose(1, 2).reshape(b, c, hh, ww)


class SchedulePolicy(nn.Module, PyTorchModelHubMixin, library_name="steinsched", tags=["steinsched"]):
    """Dirichlet schedule policy. Every constructor argument is JSON-serialisable (saved config)."""

    def __init__(
        self,
        steps: int,
        in_channels: int,
        token_dim: int,
        pooled_dim: int = 0,
        variant: str = "conditional",
        widths: Sequence[int] = (32, 64, 128, 256),
        attn_heads: int = 4,
        groups: int = 8,
        head_hidden: int = 256,
        init: str = "scratch",
        default_tau: Sequence[float] | None = None,
        concentration: float = 20.0,
    ):
        super().__init__()
        if variant not in ("conditional", "global"):
            raise ValueError(f"unknown policy variant {variant!r}; expected 'conditional' or 'global'")
        if init not in ("scratch", "default"):
            raise ValueError(f"unknown policy init {init!r}; expected 'scratch' or 'default'")
        if init == "default" and (default_tau is None or len(default_tau) != steps + 1):
            raise ValueError(f"init='default' needs default_tau with L+1 = {steps + 1} components")
        self.steps, self.variant = steps, variant
        self.pooled_dim = pooled_dim
        n_out = steps + 1
        if variant == "global":
            self.h = nn.Parameter(torch.zeros(n_out))
            last_bias = self.h
        else:
            chans = [in_channels, *widths]
            self.blocks = nn.ModuleList(
                _Block(chans[i], chans[i + 1], 1 if i == 0 else 2, groups, attn_heads, token_dim)
                for i in range(len(widths))
            )
            feat = sum(widths) + pooled_dim
            self.head = nn.Sequential(nn.Linear(feat, head_hidden), nn.SiLU(), nn.Linear(head_hidden, n_out))
            last_bias = self.head[-1].bias
        if init == "default":
            # Dirichlet mean = default_tau at total concentration `concentration`: h = softplus^-1(alpha - 1e-3).
            # The last layer's weight starts at zero so the mean is the default for every input.
            mean = np.maximum(np.asarray(default_tau, dtype=np.float64), 1e-3)
            mean = mean / mean.sum()
            alpha = np.maximum(concentration * mean - ALPHA_MIN, 1e-6)
            with torch.no_grad():
                last_bias.copy_(torch.from_numpy(inverse_softplus(alpha)).float())
                if variant == "conditional":
                    self.head[-1].weight.zero_()

    def forward(self, inputs: PolicyInputs) -> torch.Tensor:
        """Return alpha, [B, L+1], float32."""
        if self.variant == "global":
            return (F.softplus(self.h) + ALPHA_MIN).expand(len(inputs), -1)
        x = inputs.x.float()
        h = x[:, :, None, None] if x.dim() == 2 else x
        tokens, mask = inputs.tokens.float(), inputs.mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every context needs at least one real text token (mask is all False)")
        feats = []
        for block in self.blocks:
            h = block(h, tokens, mask)
            feats.append(h.mean(dim=(2, 3)))
        if self.pooled_dim:
            if inputs.pooled is None:
                raise ValueError(f"this policy takes a pooled text embedding of width {self.pooled_dim}")
            feats.append(inputs.pooled.float())
        return F.softplus(self.head(torch.cat(feats, dim=1))) + ALPHA_MIN

    def global_mean_tau(self) -> list[float]:
        """The Dirichlet mean of a ``global`` policy: its one learned schedule."""
        if self.variant != "global":
            raise ValueError("only a global policy has one schedule for every context")
        with torch.no_grad():
            alpha = (F.softplus(self.h) + ALPHA_MIN).double()
        return (alpha / alpha.sum()).tolist()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def dirichlet(alpha: torch.Tensor) -> torch.distributions.Dirichlet:
    """The action distribution, in float64 so log-probs of near-boundary points stay exact."""
    return torch.distributions.Dirichlet(alpha.double())


def log_prob(alpha: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """log Dirichlet(tau | alpha) in float64, differentiable in alpha."""
    return dirichlet(alpha).log_prob(tau.double())


def entropy(alpha: torch.Tensor) -> torch.Tensor:
    return dirichlet(alpha).entropy()


def sample_tau(alpha: np.ndarray, key: Sequence[int]) -> np.ndarray:
    """One Dirichlet draw in float64, a pure function of ``alpha`` and the integer ``key``.

    The key is (run seed, iteration, context, k): a re-sent request draws the same schedule.
    """
    rng = np.random.default_rng([int(k) for k in key])
    return rng.dirichlet(np.asarray(alpha, dtype=np.float64))


def describe(policy: SchedulePolicy) -> str:
    n = policy.num_parameters()
    return f"{policy.variant} policy, L={policy.steps}, {n:,} parameters ({n * 4 / 2**20:.2f} MiB fp32)"



def collate(x: np.ndarray, tokens: Sequence[np.ndarray], pooled: np.ndarray | None) -> PolicyInputs:
    """Stack per-context policy inputs; text tokens of different lengths are padded and masked."""
    n, t_max = len(tokens), max(t.shape[0] for t in tokens)
    if n != len(x):
        raise ValueError(f"{len(x)} noises but {n} token sequences")
    dim = tokens[0].shape[1]
    padded = np.zeros((n, t_max, dim), dtype=np.float32)
    mask = np.zeros((n, t_max), dtype=bool)
    for i, t in enumerate(tokens):
        padded[i, : len(t)] = t
        mask[i, : len(t)] = True
    return PolicyInputs(
        x=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        tokens=torch.from_numpy(padded),
        mask=torch.from_numpy(mask),
        pooled=None if pooled is None else torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32)),
    )


def state_to_numpy(policy: nn.Module) -> dict[str, np.ndarray]:
    """The policy's weights as numpy arrays: what is ray.put once per version."""
    return {k: v.detach().cpu().numpy().copy() for k, v in policy.state_dict().items()}


def load_numpy_state(policy: nn.Module, state: dict[str, np.ndarray]) -> None:
    policy.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})


def policy_kwargs(cfg: "PolicyConfig", spec: "SamplerSpec", steps: int, default_tau: np.ndarray) -> dict:
    """Constructor arguments of the policy for a sampler: the learner and every worker agree."""
    return dict(
        steps=steps,
        in_channels=spec.x_shape[0],
        token_dim=spec.token_dim,
        pooled_dim=spec.pooled_dim if cfg.use_pooled else 0,
        variant=cfg.variant,
        widths=list(cfg.widths),
        attn_heads=cfg.attn_heads,
        groups=cfg.groups,
        head_hidden=cfg.head_hidden,
        init=cfg.init,
        default_tau=[float(v) for v in default_tau],
        concentration=cfg.concentration,
    )
