"""The Reward protocol, the registry of built-ins and the loader of plug-ins (docs/rewards.md).

A reward is a class whose ``__init__(**kwargs)`` loads its model once and whose
``__call__(images, prompts)`` returns a float32 array [N]; scoring is a pure function of its
inputs, so a retry or a restart is harmless. Built-ins register under a name (a duplicate name is
refused); a plug-in is named by import path, ``"my_pkg.mod:MyReward"``, with kwargs.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from common.plugins import import_object
from common.prompts import shown


@runtime_checkable
class Reward(Protocol):
    def __call__(self, images: Any, prompts: Sequence[str]) -> np.ndarray: ...


_REGISTRY: dict[str, type] = {}
_METRICS: dict[str, type] = {}
# the modules of the built-ins, those that load no model library first: a name is looked up by
# importing them in this order until it is registered, so that the toy's or an HTTP reward's
# server never loads torch (seconds, and hundreds of MB, per server)
_BUILTIN_MODULES = (
    "rewards.toy",
    "rewards.fidelity",
    "rewards.http",
    "rewards.simulated",
    "rewards.count",
    "rewards.clip",
    "rewards.hps",
    "rewards.ocr",
    "rewards.digits",
)


def _registrar(table: dict[str, type], kind: str, name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in table and table[name] is not cls:
            raise ValueError(f"a {kind} named {name!r} is already registered ({table[name].__qualname__})")
        table[name] = cls
        return cls

    return wrap


def register(name: str) -> Callable[[type], type]:
    """Class decorator: register a built-in reward under ``name``; a duplicate name is an error."""
    return _registrar(_REGISTRY, "reward", name)


def register_metric(name: str) -> Callable[[type], type]:
    """Class decorator for a set-level evaluation metric (not a reward): a class with
    ``features(images, prompts) -> [N, F]``, ``distance(*features) -> float`` and the class
    attribute ``lower_is_better`` (True for a distance such as the FD, False for a score)."""
    return _registrar(_METRICS, "metric", name)


def registered() -> dict[str, type]:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)
    return dict(_REGISTRY)


def spec_problem(kind: str, name: str, kwargs: dict[str, Any], backend: str) -> str | None:
    """Why the reward or metric ``name`` with ``kwargs`` cannot serve a run on ``backend``, or
    None: found on the driver before anything starts, where its server would say it only after Ray
    and the run had started. A built-in name must be registered, take ``kwargs`` and read the
    backend's samples (it declares those it reads as ``backends``); an import path is not imported
    here (its module may need what only its server has)."""
    if ":" in name:
        return None
    try:
        found = resolve(name) if kind == "reward" else _lookup(name, _METRICS, kind)
    except ValueError as e:
        return str(e)
    problem = _kwargs_problem(found, f"{kind} {name!r}", kwargs, {} if kind == "reward" else None)
    if problem is not None:
        return problem
    reads = getattr(found, "backends", None)
    if reads is None or backend in reads:
        return None
    which = " or ".join(reads)
    return (
        f"{kind} {name!r} reads only the samples of the {which} backend; this run samples with {backend}:"
        f" choose one that reads {backend}'s samples"
    )


def _kwargs_problem(cls: Any, label: str, kwargs: dict[str, Any], sampler: dict[str, Any] | None) -> str | None:
    """Why ``cls`` cannot be built with the config's ``kwargs`` (an unknown or a missing argument),
    or None (it can, or it has no signature to check: the call says). A class that declares
    ``uses_sampler_config`` gets ``sampler`` as well, never from the config."""
    if getattr(cls, "uses_sampler_config", False) and "sampler" in kwargs:
        return f"{label}: kwargs 'sampler' is given by the run (its sampler section); remove it"
    owned = sorted(set(kwargs) & set(getattr(cls, "sampler_owned", ())))
    if owned and sampler is not None:
        return f"{label}: kwargs {owned} are the sampler's settings (the reward scores its samples): set them there"
    try:
        inspect.signature(cls).bind(**_with_sampler(cls, kwargs, sampler))
    except TypeError as e:
        return f"{label}: bad kwargs {sorted(kwargs)}: {e}"
    except ValueError:
        pass
    return None


def _with_sampler(cls: Any, kwargs: dict[str, Any], sampler: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments ``cls`` is built with: the config's, and the run's sampler section
    for a class that declares ``uses_sampler_config``."""
    return {**kwargs, "sampler": sampler} if getattr(cls, "uses_sampler_config", False) else kwargs


def _lookup(name: str, table: dict[str, type], kind: str) -> Any:
    """A registered name in ``table`` or an import path 'pkg.module:Class' -> the object."""
    if ":" in name:
        return import_object(name, kind)
    for mod in _BUILTIN_MODULES:
        if name in table:
            break
        importlib.import_module(mod)
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}: use one of {sorted(table)} or an import path 'pkg.module:Class'")
    return table[name]


def build_metric(name: str, kwargs: dict[str, Any]) -> Any:
    """A registered metric name or an import path 'pkg.module:Class' -> the metric, checked."""
    cls = _lookup(name, _METRICS, "metric")
    for method in ("features", "distance"):
        if not callable(getattr(cls, method, None)):
            raise ValueError(f"metric {name!r} has no {method}() method")
    if not isinstance(getattr(cls, "lower_is_better", None), bool):
        raise ValueError(
            f"metric {name!r} does not say which way is better: give its class lower_is_better = True"
            " (a distance, such as the FD) or False (a score)"
        )
    problem = _kwargs_problem(cls, f"metric {name!r}", kwargs, None)
    if problem is not None:
        raise ValueError(problem)
    return cls(**kwargs)


def resolve(name: str) -> type:
    """A registered name or an import path 'pkg.module:Class' -> the reward class, checked."""
    cls = _lookup(name, _REGISTRY, "reward")
    if not callable(cls):
        raise ValueError(f"reward {name!r} is not a class or factory")
    if inspect.isclass(cls) and not any("__call__" in vars(k) for k in cls.__mro__[:-1]):
        raise ValueError(f"reward {name!r}: class {cls.__qualname__} has no __call__(images, prompts) method")
    call = cls.__call__ if inspect.isclass(cls) else cls
    try:
        params = inspect.signature(call).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None:
        positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if inspect.isclass(cls):
            positional = positional[1:]  # self
        if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
            raise ValueError(f"reward {name!r}: __call__ must take (images, prompts)")
    return cls


def build(name: str, kwargs: dict[str, Any], sampler: dict[str, Any] | None = None) -> Reward:
    """The reward ``name`` built with ``kwargs``; a class that declares ``uses_sampler_config``
    (it scores against the sampler's own model, as the toy reward does) also gets ``sampler``,
    the run's sampler section."""
    cls = resolve(name)
    if getattr(cls, "uses_sampler_config", False) and sampler is None:
        raise ValueError(f"reward {name!r} scores against the sampler's own model: it needs the sampler's config")
    problem = _kwargs_problem(cls, f"reward {name!r}", kwargs, sampler)  # a TypeError inside __init__ is its own bug
    if problem is not None:
        raise ValueError(problem)
    reward = cls(**_with_sampler(cls, kwargs, sampler))
    if not callable(reward):  # a factory that returned something else: found at startup, not at the first step
        raise ValueError(
            f"reward {name!r} built a value of type {type(reward).__name__}, which cannot be called on images and"
            " prompts (a reward is called as reward(images, prompts))"
        )
    return reward


def limit_torch_threads(n: int) -> None:
    """Cap torch's intra-op threads in this process at ``n`` without loading torch where nothing
    uses it (a reward over HTTP, the toy's): at once if torch is loaded, and through
    OMP_NUM_THREADS, which torch reads when it loads later (a reward that imports it when built or
    at its first call). A process that loads torch only for this pays seconds and hundreds of MB."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def shown_prompts(prompts: Sequence[str], n: int = 4) -> list[str]:
    prompts = list(prompts)
    return prompts if len(prompts) <= n else prompts[:n] + [f"... {len(prompts)} in all"]


def check_scores(name: str, scores: Any, prompts: Sequence[str]) -> np.ndarray:
    """A reward's output as float32 [N], or a ValueError naming the reward and the prompt.

    Strict: real numbers only (ints or floats: an array, a list or a CPU tensor). Strings, bools,
    complex numbers and objects are refused, never converted."""
    if hasattr(scores, "detach") and hasattr(scores, "cpu"):  # a torch tensor, wherever it lives
        scores = scores.detach().cpu().numpy()
    try:
        raw = np.asarray(scores)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"reward {name!r} returned {type(scores).__name__}, not numbers, for prompts {shown_prompts(prompts)}: {e}"
        ) from None
    if raw.dtype.kind not in "iuf":
        kind = {"b": "booleans", "c": "complex numbers", "U": "strings", "S": "bytes", "O": "objects"}.get(
            raw.dtype.kind, str(raw.dtype)
        )
        raise ValueError(f"reward {name!r} returned {kind}, not real numbers, for prompts {shown_prompts(prompts)}")
    with np.errstate(over="ignore"):  # beyond float32's range is inf: refused below
        arr = raw.astype(np.float32)
    if arr.shape != (len(prompts),):
        raise ValueError(
            f"reward {name!r} returned shape {arr.shape} for {len(prompts)} images (prompts {shown_prompts(prompts)}); "
            "expected [N]"
        )
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"reward {name!r} returned a non-finite score ({arr[i]}) for prompt {shown(prompts[i])} "
            f"({bad.size} of {len(prompts)} non-finite)"
        )
    return arr
