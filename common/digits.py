"""The digits problem shared by the digits sampler and the digits rewards.

scikit-learn's bundled 8x8 handwritten digits (1797 images, no download), scaled to [-1, 1],
split once into a training part (the sampler and the reward models learn from it) and a
held-out part (the reference set of the Frechet distance). Prompts name a digit in words.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from common.prompts import shown

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED = 2024
HELD_OUT = 0.2


@lru_cache(maxsize=1)
def load() -> tuple[np.ndarray, np.ndarray]:
    """All digits as float32 [N, 8, 8] in [-1, 1] and their labels [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 8.0 - 1.0).astype(np.float32), d.target.astype(np.int64)


def split(part: str) -> tuple[np.ndarray, np.ndarray]:
    """'train' or 'held_out': a fixed split, stratified by nothing but a fixed permutation."""
    x, y = load()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_held = int(round(HELD_OUT * len(x)))
    idx = {"held_out": order[:n_held], "train": order[n_held:]}[part]
    return x[idx], y[idx]


def parse_digit(prompt: str) -> int:
    """'a handwritten seven', 'the digit 7', '7' -> 7. A prompt must name exactly one digit."""
    tokens = re.findall(r"[a-z]+|\d+", prompt.lower())
    found = {WORDS.index(t) for t in tokens if t in WORDS} | {int(t) for t in tokens if t.isdigit() and len(t) == 1}
    if len(found) != 1:
        what = "names no digit" if not found else f"names several digits {sorted(found)}"
        raise ValueError(
            f"digits prompt {shown(prompt)} {what}; name one digit, e.g. 'a handwritten seven', 'the digit 7' or '7'"
        )
    return found.pop()


def to_unit(images: np.ndarray) -> np.ndarray:
    """Model range [-1, 1] -> picture range [0, 1] (clipped), float32."""
    return np.clip((np.asarray(images, dtype=np.float32) + 1.0) / 2.0, 0.0, 1.0)


def from_unit(images: np.ndarray) -> np.ndarray:
    return np.asarray(images, dtype=np.float32) * 2.0 - 1.0


TRAIN_PROMPTS = [
    *(f"a handwritten {w}" for w in WORDS),
    *(f"the digit {i}" for i in range(10)),
]
EVAL_PROMPTS = [
    *(f"a picture of the number {w}" for w in WORDS),
]
