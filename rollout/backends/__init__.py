"""Sampler backends, built by name from the sampler config section."""

from __future__ import annotations

from common.config import SamplerConfig
from rollout.sampler import Sampler


def build_sampler(cfg: SamplerConfig) -> Sampler:
    if cfg.backend == "toy":
        from rollout.backends.toy import ToySampler

        return ToySampler(**cfg.toy.model_dump())
    if cfg.backend == "digits":
        from rollout.backends.digits import DigitsSampler

        return DigitsSampler(**cfg.digits.model_dump())
    raise ValueError(f"unknown sampler backend {cfg.backend!r}")
