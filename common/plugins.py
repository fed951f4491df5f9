"""User code named by import path, ``"pkg.module:Name"`` (a reward, a metric, a sampler)."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str, kind: str) -> Any:
    """The object at ``path`` ('pkg.module:Name'), or a ValueError naming the ``kind`` of plug-in
    and what is wrong (the module does not import, or has no such name)."""
    mod_name, sep, attr = path.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"{kind} {path!r}: an import path looks like 'pkg.module:Name'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"{kind} {path!r}: cannot import module {mod_name!r}: {e}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise ValueError(f"{kind} {path!r}: module {mod_name!r} has no attribute {attr!r}")
    return obj
