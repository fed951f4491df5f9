"""Sampler backends: the built-ins by name from their config section (heavy imports stay lazy),
a user's sampler by import path ``pkg.module:Class`` with ``sampler.kwargs``, checked against
the ``Sampler`` protocol when it is built (on the worker, at startup)."""

from __future__ import annotations

import inspect

from common.config import SamplerConfig
from common.plugins import import_object
from rollout.sampler import Sampler, missing_methods


def load_plugin(path: str) -> type:
    """'pkg.module:Class' -> the class, or a ValueError naming what is wrong."""
    cls = import_object(path, "sampler")
    if not inspect.isclass(cls):
        raise ValueError(f"sampler {path!r} is not a class")
    missing = missing_methods(cls)
    if missing:
        raise ValueError(f"sampler {path!r} does not implement the Sampler protocol: no {', '.join(missing)}")
    return cls


def build_sampler(cfg: SamplerConfig) -> Sampler:
    if ":" in cfg.backend:
        cls = load_plugin(cfg.backend)
        try:
            return cls(**cfg.kwargs)
        except TypeError as e:
            raise ValueError(f"sampler {cfg.backend!r}: bad kwargs {sorted(cfg.kwargs)}: {e}") from None
    if cfg.backend == "simulated":
        from rollout.backends.simulated import SimulatedSampler

        return SimulatedSampler(**cfg.simulated.model_dump())
    if cfg.backend == "toy":
        from rollout.backends.toy import ToySampler

        return ToySampler(**cfg.toy.model_dump())
    if cfg.backend == "digits":
        from rollout.backends.digits import DigitsSampler

        return DigitsSampler(**cfg.digits.model_dump())
    if cfg.backend == "flux":
        from rollout.backends.flux import flux_sampler

        return flux_sampler(cfg.flux)
    if cfg.backend == "sd3":
        from rollout.backends.sd3 import sd3_sampler

        return sd3_sampler(cfg.sd3)
    if cfg.backend == "sd":
        from rollout.backends.sd import sd_sampler

        return sd_sampler(cfg.sd)
    raise ValueError(f"unknown sampler backend {cfg.backend!r}")
