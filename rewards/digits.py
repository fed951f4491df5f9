"""Digits rewards: realism x p(prompted class), and the Frechet distance as a gold metric.

Three small models, trained by the project on the training digits (common/digits.py), once,
deterministically, and cached by their settings (common/artifacts.py):

- a classifier (MLP) gives p(class | image) and the feature space of the Frechet distance;
- a discriminator scores realism: real digits against degraded ones (Gaussian blur, the
  average of two digits of the same class, the class mean plus noise);
- the reward is ``realism * p(prompted class)``. Classifier confidence alone is about 1.0 even for
  a blurry one-step sample (it rewards blur), so it is never the reward on its own.

``DigitsFrechet`` is not a training reward: it compares a set of samples with the held-out real
digits in the classifier's feature space (lower is better), so that a reward that rises while
the samples drift from real digits (reward hacking) shows in the final table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn
from tqdm.auto import tqdm

from common import digits
from common.artifacts import cached
from rewards.registry import register, register_metric

SETTINGS: dict[str, Any] = {"seed": 0, "steps": 3000, "batch_size": 256, "lr": 1e-3, "hidden": 256, "features": 64}


def _classifier(hidden: int, features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, features), nn.SiLU(), nn.Linear(features, 10)
    )


def _discriminator(hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1)
    )


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of [N, 8, 8] images, one sigma per image (5x5 kernel, blank padding)."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    k2 = k1[:, :, None] * k1[:, None, :]  # [N, 5, 5]
    out = F.conv2d((x + 1)[None], k2[:, None], padding=2, groups=len(x))[0]  # blur in [0, 2] so padding is "blank"
    return out - 1


def degrade(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fake digits for the discriminator: blur, same-class averages of 2 to 6 digits (the look of
    a few-step sample, a posterior mean), and the (guided) class mean plus 0 to 0.4 noise."""
    n = len(x)
    kind = torch.randint(0, 3, (n,), generator=gen)
    blurred = _blur(x, 0.5 + torch.rand(n, generator=gen))
    # average each digit with up to 5 others of its class (random permutations within each class)
    m_max = 6
    partners = torch.empty(m_max, n, dtype=torch.long)
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        for j in range(m_max):
            partners[j, idx] = idx[torch.randperm(len(idx), generator=gen)] if j else idx
    count = torch.randint(2, m_max + 1, (n,), generator=gen)
    w = torch.rand(m_max, n, generator=gen) * 0.5 + 0.5
    w = w * (torch.arange(m_max)[:, None] < count[None]).float()
    w = w / w.sum(0, keepdim=True)
    mixed = (w[:, :, None, None] * x[partners]).sum(0)
    # the class mean, sharpened away from the mean of all digits as classifier-free guidance does
    # (w * mean_c - (w - 1) * mean: exactly a one-step guided sample), plus noise
    means = torch.stack([x[y == c].mean(0) if (y == c).any() else torch.zeros(8, 8) for c in range(10)])
    w_cfg = 1 + 2 * torch.rand(n, generator=gen)[:, None, None]
    noise = 0.4 * torch.rand(n, generator=gen)[:, None, None] * torch.randn(x.shape, generator=gen)
    noisy_mean = (w_cfg * means[y] - (w_cfg - 1) * x.mean(0) + noise).clamp(-1, 1)
    return torch.where((kind == 0)[:, None, None], blurred, torch.where((kind == 1)[:, None, None], mixed, noisy_mean))


def train_reward_models(out: Path, s: dict) -> None:
    x, y = (torch.from_numpy(a) for a in digits.split("train"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(s["seed"])
        torch.manual_seed(s["seed"])
        clf, disc = _classifier(s["hidden"], s["features"]), _discriminator(s["hidden"])
        opt = torch.optim.Adam([*clf.parameters(), *disc.parameters()], lr=s["lr"])
        for _ in tqdm(range(s["steps"]), desc="training the digits reward models (once, then cached)", mininterval=2):
            idx = torch.randint(0, len(x), (s["batch_size"],), generator=gen)
            # light augmentation (pixel noise) so that the classifier is not brittle on samples
            xb = (x[idx] + 0.1 * torch.randn(x[idx].shape, generator=gen)).clamp(-1, 1)
            fake = degrade(x, y, gen)[idx]
            logits = disc(torch.cat([x[idx], fake]))[:, 0]
            target = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))])
            loss = F.cross_entropy(clf(xb), y[idx]) + F.binary_cross_entropy_with_logits(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.save({"classifier": clf.state_dict(), "discriminator": disc.state_dict()}, out / "models.pt")
    finally:
        torch.set_num_threads(threads)


class DigitsModels:
    """The cached classifier and discriminator, in eval mode."""

    def __init__(self, settings: dict | None = None):
        unknown = sorted(set(settings or {}) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown digits reward settings {unknown}; the settings are {sorted(SETTINGS)}")
        s = {**SETTINGS, **(settings or {})}
        path = cached("digits-rewards", s, lambda out: train_reward_models(out, s))
        state = torch.load(path / "models.pt", map_location="cpu", weights_only=True)
        self.classifier = _classifier(s["hidden"], s["features"])
        self.classifier.load_state_dict(state["classifier"])
        self.discriminator = _discriminator(s["hidden"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.classifier.eval()
        self.discriminator.eval()

    @staticmethod
    def as_model_range(images: np.ndarray) -> torch.Tensor:
        """Images in [0, 1] ([N, 8, 8] or [N, 1, 8, 8]) -> [N, 8, 8] in [-1, 1]."""
        arr = np.asarray(images, dtype=np.float32)
        return torch.from_numpy(digits.from_unit(arr.reshape(len(arr), 8, 8)))

    @torch.no_grad()
    def class_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x).softmax(-1)

    def prompted_class_prob(self, x: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """p(the digit each prompt names | image), [N]."""
        labels = torch.tensor([digits.parse_digit(p) for p in prompts])
        return self.class_probs(x)[torch.arange(len(x)), labels]

    @torch.no_grad()
    def realism(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.discriminator(x)[:, 0])

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier[:-1](x)


class _DigitsScorer:
    """A scorer on the cached digit models; its keyword arguments are ``SETTINGS``' (the models'
    training), written out so that a misspelt one is refused before a run starts
    (``rewards.registry.spec_problem`` binds the config's kwargs to this signature)."""

    backends = ("digits",)  # 8x8 digit images

    def __init__(
        self,
        *,
        seed: int = SETTINGS["seed"],
        steps: int = SETTINGS["steps"],
        batch_size: int = SETTINGS["batch_size"],
        lr: float = SETTINGS["lr"],
        hidden: int = SETTINGS["hidden"],
        features: int = SETTINGS["features"],
    ):
        self.models = DigitsModels(
            {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "hidden": hidden, "features": features}
        )
        self.setup()

    def setup(self) -> None:
        """What a subclass builds on the models (its keyword arguments stay the settings')."""


@register("digits")
class DigitsReward(_DigitsScorer):
    """realism(image) x p(prompted digit | image), in [0, 1]."""

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        x = self.models.as_model_range(images)
        p = self.models.prompted_class_prob(x, prompts)
        return (self.models.realism(x) * p).numpy().astype(np.float32)


@register("digits_class")
class DigitsClassReward(_DigitsScorer):
    """p(prompted digit | image) alone: rewards blur; kept to show why it is not the reward."""

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        x = self.models.as_model_range(images)
        return self.models.prompted_class_prob(x, prompts).numpy().astype(np.float32)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of two feature sets [N, F] (Heusel et al. 2017)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: offset the diagonals (as pytorch-fid does)
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@register_metric("digits_fd")
class DigitsFrechet(_DigitsScorer):
    """Gold metric: Frechet distance to the held-out real digits in the classifier's features."""

    lower_is_better = True

    def setup(self) -> None:
        real, _ = digits.split("held_out")
        self.reference = self.models.features(torch.from_numpy(real)).numpy().astype(np.float64)

    def features(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return self.models.features(self.models.as_model_range(images)).numpy().astype(np.float64)

    def distance(self, *features: np.ndarray) -> float:
        return frechet_distance(np.concatenate(features), self.reference)
