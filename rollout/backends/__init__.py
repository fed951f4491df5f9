"""Sampler backends, built by name from the sampler config section (heavy imports stay lazy)."""

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
    if cfg.backend == "flux":
        from rollout.backends.flux import FluxSampler

        return FluxSampler.from_config(cfg.flux)
    if cfg.backend == "sd3":
        from rollout.backends.sd3 import SD3Sampler

        return SD3Sampler.from_config(cfg.sd3)
    if cfg.backend == "sd":
        from rollout.backends.sd import SDSampler

        return SDSampler.from_config(cfg.sd)
    raise ValueError(f"unknown sampler backend {cfg.backend!r}")
