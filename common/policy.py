"""The schedule policy: (x_T, text tokens) -> Dirichlet(alpha) over the L+1 simplex (docs/method.md).

``conditional``: 4 blocks of (conv3x3, GroupNorm, SiLU) x 2 with stride-2 downsampling between
blocks, each followed by cross-attention from the image features to the text tokens; the
mean-pooled output of every block is concatenated (a feature pyramid), optionally with the pooled
text embedding, and a 2-layer MLP head outputs L+1 values; ``alpha = softplus(h) + 1e-3``.
A vector-shaped x_T ([B, D], ``input_kind='vector'``) goes through MLP blocks of the same widths,
each followed by the same cross-attention.

``global``: no inputs, one learnable alpha (the "learned global schedule" baseline).

Saved and loaded with safetensors through huggingface_hub's PyTorchModelHubMixin:
``policy.save_pretrained(dir)`` / ``SchedulePolicy.from_pretrained(dir)``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, constants
from torch import nn

if TYPE_CHECKING:
    from common.config import PolicyConfig
    from common.messages import SamplerSpec

ALPHA_MIN = 1e-3  # alpha = softplus(h) + ALPHA_MIN (docs/method.md); ``alpha_min`` overrides it


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
    """softplus^-1(y) = log(exp(y) - 1), written as y + log(1 - exp(-y)): finite for every y > 0,
    where exp(y) overflows past y ~ 710 (a default init at concentration 5000 got alphas of inf)."""
    y = np.asarray(y, dtype=np.float64)
    return y + np.log(-np.expm1(-y))


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


class _VectorBlock(nn.Module):
    """The block for a vector-shaped x_T ([B, D], e.g. the toy's): (Linear, LayerNorm, SiLU) x 2,
    then cross-attention from the one feature vector to the text tokens (residual). A 3x3 conv on
    a 1x1 "image" would see only its centre weight, and GroupNorm over one pixel would normalise
    away the noise's scale within each group: the noise would barely reach the head."""

    def __init__(self, c_in: int, c_out: int, heads: int, token_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(c_in, c_out),
            nn.LayerNorm(c_out),
            nn.SiLU(),
            nn.Linear(c_out, c_out),
            nn.LayerNorm(c_out),
            nn.SiLU(),
        )
        self.norm = nn.LayerNorm(c_out)
        self.attn = nn.MultiheadAttention(c_out, heads, kdim=token_dim, vdim=token_dim, batch_first=True)

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.mlp(h)[:, None, :]  # [B, 1, C]
        a, _ = self.attn(self.norm(q), tokens, tokens, key_padding_mask=~mask, need_weights=False)
        return (q + a)[:, 0]


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
        input_kind: str = "image",
        alpha_min: float = ALPHA_MIN,
        max_concentration: float | None = None,
        backbone: str | None = None,
        pipeline: str | None = None,
        time_convention: str | None = None,
        x_shape: Sequence[int] | None = None,
        call_kwargs: dict[str, Any] | None = None,
        reads: dict[str, Any] | None = None,
    ):
        """``backbone``, ``pipeline``, ``time_convention``, ``x_shape``, ``call_kwargs``, ``reads``:
        what the policy was trained for (the sampler backend, the diffusers pipeline class, what its
        times mean, the shape of the noise it read: the image size, the pipeline's call settings its
        images were made under: the guidance, and the pipeline's settings its inputs and images
        were made of: SD's scheduler betas, SD3's T5 tokens), recorded in the saved config so that
        an export refuses a pipeline it was not trained for, says so at another size, and runs the
        pipeline as training did (``rollout.export``)."""
        super().__init__()
        if input_kind not in ("image", "vector"):
            raise ValueError(f"unknown input_kind {input_kind!r}; expected 'image' ([C, H, W] noise) or 'vector' ([D])")
        if variant not in ("conditional", "global"):
            raise ValueError(f"unknown policy variant {variant!r}; expected 'conditional' or 'global'")
        if init not in ("scratch", "default"):
            raise ValueError(f"unknown policy init {init!r}; expected 'scratch' or 'default'")
        if init == "default" and (default_tau is None or len(default_tau) != steps + 1):
            raise ValueError(f"init='default' needs default_tau with L+1 = {steps + 1} components")
        if not alpha_min > 0:
            raise ValueError(f"alpha_min must be > 0, got {alpha_min}")
        if max_concentration is not None and not max_concentration > 0:
            raise ValueError(f"max_concentration must be > 0 or None, got {max_concentration}")
        self.steps, self.variant, self.input_kind, self.alpha_min = steps, variant, input_kind, alpha_min
        self.max_concentration = max_concentration
        self.token_dim, self.pooled_dim = token_dim, pooled_dim
        self.backbone, self.pipeline, self.time_convention = backbone, pipeline, time_convention
        self.x_shape = [int(d) for d in x_shape] if x_shape is not None else None
        self.call_kwargs = dict(call_kwargs or {})
        self.reads = dict(reads) if reads else None  # None: a policy saved before it was recorded
        n_out = steps + 1
        if variant == "global":
            self.h = nn.Parameter(torch.zeros(n_out))
            last_bias = self.h
        else:
            chans = [in_channels, *widths]
            self.blocks = nn.ModuleList(
                _VectorBlock(chans[i], chans[i + 1], attn_heads, token_dim)
                if input_kind == "vector"
                else _Block(chans[i], chans[i + 1], 1 if i == 0 else 2, groups, attn_heads, token_dim)
                for i in range(len(widths))
            )
            feat = sum(widths) + pooled_dim
            hidden = nn.Linear(feat, head_hidden)  # built before head_out: the init draws in this order
            head_out = nn.Linear(head_hidden, n_out)
            self.head = nn.Sequential(hidden, nn.SiLU(), head_out)
            last_bias = head_out.bias
        if init == "default":
            # Dirichlet mean = default_tau at total concentration `concentration`: h = softplus^-1(alpha - alpha_min),
            # each alpha kept above alpha_min. The last layer's weight starts at zero so the mean is the
            # default for every input.
            mean = np.maximum(np.asarray(default_tau, dtype=np.float64), 1e-3)
            mean = mean / mean.sum()
            alpha = np.maximum(concentration * mean, alpha_min + 1e-6)
            with torch.no_grad():
                last_bias.copy_(torch.from_numpy(inverse_softplus(alpha - alpha_min)).float())
                if variant == "conditional":
                    head_out.weight.zero_()

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = False, **kwargs: Any):
        """A local directory is read here, as the mixin reads it but without its print of "Loading
        weights from local directory" on every command's output; a hub id goes to the mixin.

        Always strictly (``strict`` is the mixin's, whose default is not): a weights file without
        some of the policy's tensors would leave them at their initial values, and the untrained
        schedule would be used without a word. Weights that are not finite are refused too."""
        if not os.path.isdir(model_id):
            model = super()._from_pretrained(model_id=model_id, map_location=map_location, strict=True, **kwargs)
        else:
            hub = ("revision", "cache_dir", "force_download", "local_files_only", "token")
            model = cls._load_as_safetensor(
                cls(**{k: v for k, v in kwargs.items() if k not in hub}),
                os.path.join(model_id, constants.SAFETENSORS_SINGLE_FILE),
                map_location,
                True,
            )
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise ValueError(f"the weights of {model_id} are not finite in {len(bad)} tensors ({', '.join(bad[:3])})")
        return model

    def set_max_concentration(self, cap: float | None) -> None:
        """Change the cap on sum(alpha) (a schedule of it over training); ``save_pretrained``
        records the cap in force, so a loaded policy samples as the trained one last did."""
        if cap is not None and not cap > 0:
            raise ValueError(f"max_concentration must be > 0 or None, got {cap}")
        self.max_concentration = cap
        saved = getattr(self, "_hub_mixin_config", None)  # the constructor kwargs the hub mixin saves
        if isinstance(saved, dict):
            saved["max_concentration"] = cap

    def forward(self, inputs: PolicyInputs) -> torch.Tensor:
        """Return alpha, [B, L+1], float32 (its sum capped at ``max_concentration`` if set)."""
        return self._cap(self._alpha(inputs))

    def _cap(self, alpha: torch.Tensor) -> torch.Tensor:
        """Scale alpha down to ``max_concentration`` where its sum exceeds it: the Dirichlet mean is
        unchanged, the spread never collapses (a schedule's evaluation uses the mean; the spread is
        exploration, and a collapsed one leaves K rollouts of a context nothing to compare)."""
        if self.max_concentration is None:
            return alpha
        return alpha * torch.clamp(self.max_concentration / alpha.sum(-1, keepdim=True), max=1.0)

    def _alpha(self, inputs: PolicyInputs) -> torch.Tensor:
        if self.variant == "global":
            return (F.softplus(self.h.float()) + self.alpha_min).expand(len(inputs), -1)
        dtype = next(self.head.parameters()).dtype  # float32, or what the policy was cast to (.to(torch.bfloat16))
        x = inputs.x.to(dtype)
        if (x.dim() == 2) != (self.input_kind == "vector"):
            raise ValueError(f"this policy reads {self.input_kind} noise; got x of shape {tuple(x.shape)}")
        h = x
        tokens, mask = inputs.tokens.to(dtype), inputs.mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every context needs at least one real text token (mask is all False)")
        feats = []
        for block in self.blocks:
            h = block(h, tokens, mask)
            feats.append(h if h.dim() == 2 else h.mean(dim=(2, 3)))
        if self.pooled_dim:
            if inputs.pooled is None:
                raise ValueError(f"this policy takes a pooled text embedding of width {self.pooled_dim}")
            feats.append(inputs.pooled.to(dtype))
        return F.softplus(self.head(torch.cat(feats, dim=1)).float()) + self.alpha_min

    def global_mean_tau(self) -> list[float]:
        """The Dirichlet mean of a ``global`` policy: its one learned schedule."""
        if self.variant != "global":
            raise ValueError("only a global policy has one schedule for every context")
        with torch.no_grad():
            alpha = (F.softplus(self.h.float()) + self.alpha_min).double()
        return (alpha / alpha.sum()).tolist()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _save_pretrained(self, save_directory: Path) -> None:
        """The weights as ``model.safetensors`` (what the hub mixin writes), each tensor copied
        out first: a learner's parameters are views of one flat buffer (``FlatState``), which
        safetensors refuses to save as they are."""
        from safetensors.torch import save_file

        own = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(own, str(save_directory / constants.SAFETENSORS_SINGLE_FILE), metadata={"format": "pt"})


def dirichlet(alpha: torch.Tensor) -> torch.distributions.Dirichlet:
    """The action distribution, in float64 (used for its entropy)."""
    return torch.distributions.Dirichlet(alpha.double())


def log_prob(alpha: torch.Tensor, log_tau: torch.Tensor) -> torch.Tensor:
    """log Dirichlet(tau | alpha) in float64, differentiable in alpha, from the LOG of the point.

    ``lgamma(sum a) - sum lgamma(a_i) + sum (a_i - 1) log tau_i``. Taking ``log tau`` rather than
    ``tau`` keeps the density exact where a component underflows float64 (alpha ~ 0.01 gives
    components like exp(-500)): the log-prob is always that of the draw itself, never of a point
    floored for execution, so E[grad log pi] = 0 holds exactly (see ``sample_log_tau``).
    """
    a = alpha.double()
    log_tau = log_tau.to(torch.float64)
    return torch.lgamma(a.sum(-1)) - torch.lgamma(a).sum(-1) + ((a - 1.0) * log_tau).sum(-1)


def entropy(alpha: torch.Tensor) -> torch.Tensor:
    """The Dirichlet's entropy, float64. ``alpha`` is a policy's (positive by construction), so
    the distribution's argument checks are skipped: they took a third of the call."""
    return torch.distributions.Dirichlet(alpha.double(), validate_args=False).entropy()


def log_dirichlet(alpha: np.ndarray, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """log of Dirichlet(alpha) draws, float64 ([L+1], or [size, L+1]), exact for any alpha.

    Drawn in log space: ``G_i ~ Gamma(a_i)`` as ``Gamma(a_i + 1) * U^(1/a_i)`` (the small-shape
    boost of Marsaglia and Tsang, 2000), so ``log G_i = log Gamma(a_i + 1) + log(U) / a_i`` never
    underflows, and ``log tau = log G - logsumexp(log G)``. A plain draw (numpy's ``dirichlet``)
    rounds components below ~1e-308 to 0, which then must be floored: its log-prob is no longer
    that of a draw, and E[grad log pi] = 0 breaks. ``common.schedule.executed_tau`` turns a draw
    into the schedule that runs.
    """
    a = np.asarray(alpha, dtype=np.float64)
    shape = a.shape if size is None else (size, *a.shape)
    return _log_dirichlet_of(a, rng.standard_gamma(a + 1.0, size=shape), rng.random(shape))


def _log_dirichlet_of(a: np.ndarray, gamma: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """``log_dirichlet``'s arithmetic on its draws ``gamma`` ~ Gamma(a + 1) and ``uniform`` ~ U[0, 1),
    elementwise and row by row, so a batch of draws gives each row's own bits."""
    log_g = np.log(gamma) + np.log1p(-uniform) / a  # 1 - U in (0, 1]
    top = log_g.max(axis=-1, keepdims=True)  # logsumexp, in numpy (scipy's costs 0.2 ms a call)
    return log_g - (top + np.log(np.exp(log_g - top).sum(axis=-1, keepdims=True)))


def sample_log_tau(alpha: np.ndarray, key: Sequence[int]) -> np.ndarray:
    """One ``log_dirichlet`` draw, a pure function of ``alpha`` and the integer ``key``.

    The key is (run seed, iteration, context, k): a re-sent request draws the same schedule.
    """
    return sample_log_taus(np.asarray(alpha)[None], [key])[0]


def sample_log_taus(alpha: np.ndarray, keys: Sequence[Sequence[int]]) -> np.ndarray:
    """``sample_log_tau(alpha[i], keys[i])`` for every row i of ``alpha`` [N, L+1], bit for bit:
    each row's random numbers come from a generator of its own key, and the arithmetic runs once
    over the batch (a worker's C x K draws: about 60 us a draw where one at a time took 80)."""
    a = np.asarray(alpha, dtype=np.float64)
    if a.ndim != 2 or len(keys) != len(a):
        raise ValueError(f"expected alpha [N, L+1] and N keys; got alpha of shape {a.shape} and {len(keys)} keys")
    gamma, uniform, shape = np.empty_like(a), np.empty_like(a), a.shape[1:]
    for i, (a1, key) in enumerate(zip(a + 1.0, keys, strict=True)):
        rng = np.random.default_rng([int(k) for k in key])
        gamma[i] = rng.standard_gamma(a1, size=shape)  # the order of log_dirichlet's draws
        uniform[i] = rng.random(shape)
    return _log_dirichlet_of(a, gamma, uniform)


def describe(policy: SchedulePolicy) -> str:
    n = policy.num_parameters()
    return f"{policy.variant} policy, L={policy.steps}, {n:,} parameters ({n * 4 / 2**20:.2f} MiB fp32)"


def dirichlet_mean(policy: SchedulePolicy, inputs: PolicyInputs) -> np.ndarray:
    """The policy's deterministic schedule for each input: its Dirichlet mean ``alpha / sum(alpha)``,
    float64 [B, L+1] on the CPU."""
    with torch.inference_mode():
        alpha = policy(inputs).double().cpu().numpy()
    return alpha / alpha.sum(-1, keepdims=True)


def collate(
    x: np.ndarray, tokens: Sequence[np.ndarray], pooled: np.ndarray | None, device: torch.device | str = "cpu"
) -> PolicyInputs:
    """Stack per-context policy inputs on ``device``; text tokens of different lengths are padded and masked."""
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
        x=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device),
        tokens=torch.from_numpy(padded).to(device),
        mask=torch.from_numpy(mask).to(device),
        pooled=None if pooled is None else torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32)).to(device),
    )


#: Wire dtypes of a weight broadcast. numpy has no bfloat16: its bits travel as uint16.
_WIRE = {"float32": (torch.float32, None), "float16": (torch.float16, None), "bfloat16": (torch.bfloat16, torch.int16)}


def wire_storage(dtype: str) -> torch.dtype:
    """The dtype a broadcast's flat buffer is stored in for wire dtype ``dtype`` (bfloat16: its bits)."""
    wire, bits = _WIRE[dtype]
    return bits or wire


@dataclass
class Weights:
    """One version of the policy's weights as it is broadcast (ray.put once per version): every
    floating tensor in one flat buffer of ``dtype`` (bfloat16 as its raw 16 bits), so the object
    store moves one array, not one per tensor; ``layout`` names each tensor's (name, shape) in
    order; tensors of other dtypes travel as they are in ``other``. ``flat`` is a numpy array as
    the object store carries it, or a tensor as a collective delivers it (``common.collective``)."""

    flat: np.ndarray | torch.Tensor
    layout: list[tuple[str, tuple[int, ...]]]
    dtype: str = "float32"
    other: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.flat.nbytes + sum(a.nbytes for a in self.other.values())

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.layout} | set(self.other)

    def flat_tensor(self) -> torch.Tensor:
        """``flat`` as a tensor of its storage dtype (bfloat16: its bits), sharing its memory
        (read-only: an array from the object store is; copy before writing)."""
        if isinstance(self.flat, torch.Tensor):
            return self.flat
        with warnings.catch_warnings():  # torch warns about a read-only array; it is only read
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self.flat)

    def wire_tensor(self) -> torch.Tensor:
        """``flat`` as a tensor of the wire dtype (bfloat16 read from its bits), sharing its memory
        (read-only, as ``flat_tensor``)."""
        wire, bits = _WIRE[self.dtype]
        flat = self.flat_tensor()
        return flat.view(wire) if bits is not None else flat

    def nonfinite(self) -> str | None:
        """The first tensor holding a non-finite value, as sent (None: every value is finite): one
        pass over ``flat``. In float16 a finite weight past 65504 is sent as inf and counts."""
        if self._all_finite():
            return None
        return next(name for name, t in self.tensors().items() if t.is_floating_point() and not torch.isfinite(t).all())

    def _all_finite(self) -> bool:
        """Every value of ``flat`` is finite. A numpy buffer is checked by numpy, in one vectorised
        pass (20 times faster than ``torch.isfinite`` on one CPU thread: 16 us against 340 us for
        the toy's 74k weights, on every update's critical path); bfloat16, which numpy lacks, by
        its bits: an exponent of all ones is inf or nan."""
        if isinstance(self.flat, torch.Tensor):
            return bool(torch.isfinite(self.wire_tensor()).all())
        if self.dtype == "bfloat16":
            return not bool(np.any((self.flat.view(np.uint16) & 0x7F80) == 0x7F80))
        return bool(np.isfinite(self.flat).all())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by name, floating ones in the wire dtype as views of ``flat`` (read-only,
        as ``flat_tensor``)."""
        flat, out, offset = self.wire_tensor(), {}, 0
        for name, shape in self.layout:
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].view(shape)
            offset += n
        return out | {name: torch.from_numpy(np.asarray(a)) for name, a in self.other.items()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Weights:
        """Full-precision weights from a plain dict of arrays."""
        return state_to_numpy({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


def state_to_numpy(policy: nn.Module | dict[str, torch.Tensor], dtype: str = "float32") -> Weights:
    """The policy's weights for the workers, in ``dtype`` ('float32', 'bfloat16', 'float16')."""
    wire, bits = _WIRE[dtype]
    state = policy.state_dict() if isinstance(policy, nn.Module) else policy
    floats = {k: v.detach() for k, v in state.items() if v.is_floating_point()}
    other = {k: v.detach().cpu().numpy().copy() for k, v in state.items() if not v.is_floating_point()}
    flat = torch.cat([v.reshape(-1).to(wire) for v in floats.values()]) if floats else torch.zeros(0, dtype=wire)
    if bits is not None:
        flat = flat.view(bits)
    layout = [(k, tuple(v.shape)) for k, v in floats.items()]
    return Weights(flat.cpu().numpy(), layout, dtype, other)


def load_numpy_state(policy: nn.Module | dict[str, torch.Tensor], state: Weights | dict[str, np.ndarray]) -> None:
    """Copy broadcast weights (or a plain dict of arrays) into ``policy``, cast to its own dtype and
    device. ``policy`` may be its ``state_dict()``, kept by a worker that loads every version:
    its tensors share the parameters' storage, and copying into them skips ``load_state_dict``'s
    walk over the modules (milliseconds per version for a small policy)."""
    if isinstance(state, dict):
        state = Weights.from_arrays(state)
    own = policy.state_dict() if isinstance(policy, nn.Module) else policy
    if set(own) != state.names:
        missing, extra = sorted(set(own) - state.names), sorted(state.names - set(own))
        raise ValueError(f"broadcast weights do not fit the policy: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, t in state.tensors().items():
            target = own[name]
            if target.shape != t.shape:
                raise ValueError(f"broadcast weight {name}: shape {tuple(t.shape)}, the policy's {tuple(target.shape)}")
            copy_cast(target, t)


def copy_cast(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``, with the cast done where ``target`` lives: across devices with
    another dtype, ``source`` moves to ``target``'s device first, as it is. ``copy_`` from the CPU
    to a GPU with another dtype casts on the CPU and sends the cast bytes, so a bfloat16 version
    loading into a GPU worker's float32 policy would cast 20M weights on one CPU thread and send
    twice the bytes. Of one dtype, or on one device, the copy is direct (no temporary)."""
    if source.device != target.device and source.dtype != target.dtype:
        source = source.to(target.device)
    target.copy_(source)


class FlatState:
    """A policy whose floating tensors are views of one flat buffer, in state-dict order (the order
    ``state_to_numpy`` sends them).

    A worker keeps one: a broadcast version of the same layout loads with one copy, cast from the
    wire dtype, instead of a view and a copy per tensor; anything else (other names or shapes,
    non-floating tensors, mixed dtypes) loads tensor by tensor through ``load_numpy_state``, with
    its checks. The learner keeps one too: each version goes out as one copy of the buffer
    (``weights``), and where the buffer holds exactly the parameters (``holds_parameters``) the
    optimizer steps the buffer whole (``learner.update.FlatAdamW``)."""

    def __init__(self, policy: nn.Module):
        own = policy.state_dict(keep_vars=True)  # the parameters and buffers themselves
        floats = {k: v for k, v in own.items() if v.is_floating_point()}
        self.flat: torch.Tensor | None = None
        if floats and len({(v.dtype, v.device) for v in floats.values()}) == 1:
            self.flat = torch.cat([v.detach().reshape(-1) for v in floats.values()])
            offset = 0
            for v in floats.values():
                v.data = self.flat[offset : offset + v.numel()].view_as(v)
                offset += v.numel()
        self.layout = [(k, tuple(v.shape)) for k, v in floats.items()]
        self.state = policy.state_dict()  # views of the same storage
        self.module = policy
        self.parameters = list(policy.parameters())
        # the buffer is the parameters, in order, and nothing else (no buffers, no tied weights)
        tensors = list(floats.values())
        self.holds_parameters = (
            self.flat is not None
            and len(self.parameters) == len(tensors)
            and all(p is t for p, t in zip(self.parameters, tensors, strict=True))
        )

    def weights(self, dtype: str = "float32") -> Weights:
        """This version of the weights as ``state_to_numpy`` makes it, from one copy of the buffer
        (cast to ``dtype``): the bytes are the same."""
        if self.flat is None or len(self.layout) != len(self.state):
            return state_to_numpy(self.state, dtype)
        wire, bits = _WIRE[dtype]
        flat = self.flat.detach().to(wire)  # cast where the buffer lives: on a GPU, fewer bytes to move
        if flat.device.type != "cpu":
            flat = flat.cpu()
        elif flat.data_ptr() == self.flat.data_ptr():
            flat = flat.clone()  # a copy: the next update changes the buffer, not a version sent
        return Weights((flat if bits is None else flat.view(bits)).numpy(), list(self.layout), dtype)

    def load(self, weights: Weights | dict[str, np.ndarray]) -> None:
        """Copy broadcast weights into the policy."""
        if (
            self.flat is not None
            and isinstance(weights, Weights)
            and not weights.other
            and [(k, tuple(shape)) for k, shape in weights.layout] == self.layout
        ):
            with torch.no_grad():
                copy_cast(self.flat, weights.wire_tensor())
            return
        load_numpy_state(self.state, weights)


def policy_kwargs(cfg: PolicyConfig, spec: SamplerSpec, steps: int, default_tau: np.ndarray) -> dict:
    """Constructor arguments of the policy for a sampler: the learner and every worker agree."""
    return {
        "steps": steps,
        "in_channels": spec.x_shape[0],
        "token_dim": spec.token_dim,
        "pooled_dim": spec.pooled_dim if cfg.use_pooled else 0,
        "variant": cfg.variant,
        "widths": list(cfg.widths),
        "attn_heads": cfg.attn_heads,
        "groups": cfg.groups,
        "head_hidden": cfg.head_hidden,
        "init": cfg.init,
        "default_tau": [float(v) for v in default_tau],
        "concentration": cfg.concentration,
        "input_kind": "vector" if len(spec.x_shape) == 1 else "image",
        "alpha_min": cfg.alpha_min,
        "max_concentration": cfg.max_concentration,
        "backbone": spec.backend,
        "pipeline": spec.pipeline,
        "time_convention": spec.time_convention,
        "x_shape": list(spec.x_shape),
        "call_kwargs": dict(spec.call_kwargs) or None,
        "reads": dict(spec.reads) or None,
    }
