"""The digits backend: a class-conditional flow-matching sampler the project trains itself.

A ~1M-parameter MLP velocity model on scikit-learn's 8x8 digits, rectified flow
``x_t = (1 - t) x0 + t eps`` with target ``eps - x0`` (diffusers' flow-matching convention:
sigma = t, the model sees the timestep ``1000 t``), classifier-free guidance by label dropout.
Trained once, deterministically (one thread, fixed seed), and cached by its settings
(common/artifacts.py). Sampling is Euler from ``t_k`` to ``t_{k+1}`` with every sample on its own
schedule, as FlowMatchEulerDiscreteScheduler.step does with a per-sample sigma.

Prompts name a digit ("a handwritten seven", "the digit 7", "7"). The text encoder maps the
prompt to the model's class label; the policy's tokens are one vector per word, the digit's
word being the model's own class embedding (its conditioning), the others fixed random vectors.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from tqdm.auto import tqdm

from common import digits
from common.artifacts import cached
from common.messages import SamplerSpec
from common.schedule import step_ends, uniform_flow_tau
from rollout.sampler import PromptFeatures


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the timestep 1000 t (as diffusers' get_timestep_embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DigitsFlowModel(ModelMixin, ConfigMixin):
    """v(x_t, t, label): an MLP on [x, emb(t), emb(label)]; label 10 is the unconditional one."""

    @register_to_config
    def __init__(self, hidden: int = 512, depth: int = 4, emb_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.emb_dim = emb_dim
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim)
        layers: list[nn.Module] = [nn.Linear(64 + 2 * emb_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, 64))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x.reshape(len(x), 64), timestep_embedding(t, self.emb_dim), self.label_emb(labels)], dim=-1)
        return self.net(h).reshape(x.shape)


def train_flow_model(out: Path, settings: dict) -> None:
    """Train the velocity model on the training digits and save it (diffusers format) in ``out``."""
    x_np, y_np = digits.split("train")
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic: the same weights for the same settings
    try:
        gen = torch.Generator().manual_seed(settings["seed"])
        torch.manual_seed(settings["seed"])
        model = DigitsFlowModel(settings["hidden"], settings["depth"], settings["emb_dim"]).train()
        opt = torch.optim.Adam(model.parameters(), lr=settings["lr"])
        steps = settings["train_steps"]
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        for _ in tqdm(range(steps), desc="training the digits flow model (once, then cached)", mininterval=2):
            idx = torch.randint(0, len(x), (settings["batch_size"],), generator=gen)
            x0, labels = x[idx], y[idx].clone()
            labels[torch.rand(len(idx), generator=gen) < settings["label_dropout"]] = 10
            eps = torch.randn(x0.shape, generator=gen)
            t = torch.rand(len(idx), generator=gen)
            xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
            loss = (model(xt, t, labels) - (eps - x0)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval().save_pretrained(out)
    finally:
        torch.set_num_threads(threads)


class DigitsSampler:
    def __init__(
        self,
        hidden: int = 512,
        depth: int = 4,
        emb_dim: int = 64,
        train_steps: int = 2500,
        batch_size: int = 256,
        lr: float = 2e-3,
        label_dropout: float = 0.1,
        seed: int = 0,
        guidance_scale: float = 2.0,
    ):
        settings = {
            "hidden": hidden,
            "depth": depth,
            "emb_dim": emb_dim,
            "train_steps": train_steps,
            "batch_size": batch_size,
            "lr": lr,
            "label_dropout": label_dropout,
            "seed": seed,
        }
        path = cached("digits-flow", settings, lambda out: train_flow_model(out, settings))
        self.model = DigitsFlowModel.from_pretrained(path, low_cpu_mem_usage=False).eval()
        self.guidance_scale = guidance_scale
        self.emb_dim = emb_dim

    def spec(self) -> SamplerSpec:
        return SamplerSpec(
            backend="digits",
            x_shape=(1, 8, 8),
            token_dim=self.emb_dim,
            pooled_dim=self.emb_dim,
            train_prompts=digits.TRAIN_PROMPTS,
            eval_prompts=digits.EVAL_PROMPTS,
        )

    def default_tau(self, steps: int) -> np.ndarray:
        # FlowMatchEulerDiscreteScheduler with shift 1: sigmas linspace(1, 1/L, L), then 0
        return uniform_flow_tau(steps)

    def _word_token(self, word: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(word.encode()))
        return (rng.standard_normal(self.emb_dim) / math.sqrt(self.emb_dim)).astype(np.float32)

    def check_prompt(self, prompt: str) -> None:
        digits.parse_digit(prompt)

    def encode(self, prompts: list[str]) -> list[PromptFeatures]:
        table = self.model.label_emb.weight.detach().numpy()
        out = []
        for p in prompts:
            label = digits.parse_digit(p)
            words = p.lower().split()
            tokens = [
                table[label] if (w in digits.WORDS or (w.isdigit() and len(w) == 1)) else self._word_token(w)
                for w in words
            ]
            out.append(PromptFeatures(tokens=np.stack(tokens).astype(np.float32), pooled=table[label].copy()))
        return out

    def initial_noise(self, seeds: list[int]) -> np.ndarray:
        return np.stack([np.random.default_rng(s).standard_normal((1, 8, 8), dtype=np.float32) for s in seeds])

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Classifier-free guided velocity: v_u + g (v_c - v_u), one batched model call."""
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, 10)]))
        v_c, v_u = both.chunk(2)
        return v_u + self.guidance_scale * (v_c - v_u)

    def sample(self, prompts: list[str], noise: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Images [N, 8, 8] float32 in [0, 1]."""
        labels = torch.tensor([digits.parse_digit(p) for p in prompts])
        x = torch.from_numpy(np.asarray(noise, dtype=np.float32)[:, 0])
        t_now = torch.from_numpy(np.asarray(times, dtype=np.float64))
        t_next = torch.from_numpy(step_ends(np.asarray(times, dtype=np.float64)))
        for k in range(times.shape[1]):
            v = self.velocity(x, t_now[:, k].float(), labels)
            x = x + (t_next[:, k] - t_now[:, k]).float()[:, None, None] * v
        return digits.to_unit(x.numpy())
