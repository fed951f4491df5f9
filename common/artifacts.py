"""A cache of artifacts the project builds itself (the digits models), keyed by their settings.

An entry lives in ``<cache root>/<kind>/<key>/`` where the key hashes the settings that made
it (and ``FORMAT``, bumped when a builder changes). Builders of one entry are serialised by a
file lock. It is built into a temporary sibling and renamed into place, with a manifest of every file's
size and sha256 beside the settings; an entry whose manifest does not verify, or whose settings
differ (stale), is reported and rebuilt. The root is ``$STEINSCHED_CACHE`` if set, else the
user's cache directory (platformdirs).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from platformdirs import user_cache_dir

from common.checkpoint import verify, write_manifest

FORMAT = 2  # bump to invalidate every entry when a builder's output changes meaning


def cache_root() -> Path:
    return Path(os.environ.get("STEINSCHED_CACHE") or user_cache_dir("steinsched"))


def settings_key(settings: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached(kind: str, settings: dict[str, Any], build: Callable[[Path], None], log=print) -> Path:
    """The directory of the entry for (kind, settings), built by ``build(tmp_dir)`` if missing,
    damaged or stale. ``build`` writes its files into the directory it is given."""
    key = settings_key(settings)
    final = cache_root() / kind / key
    final.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time: several actors of a run start together and need the same entry;
    # the first builds it, the others wait and reuse it.
    with open(final.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _get_or_build(kind, settings, final, build, log)


def _get_or_build(kind: str, settings: dict[str, Any], final: Path, build: Callable[[Path], None], log) -> Path:
    key = final.name
    meta = {"format": FORMAT, "kind": kind, "settings": settings}
    if final.is_dir():
        problem = verify(final)
        if problem is None:
            try:
                saved = json.loads((final / "settings.json").read_text())
            except (OSError, ValueError) as e:
                problem = f"unreadable settings ({e})"
            else:
                if saved != json.loads(json.dumps(meta, default=str)):
                    problem = "stale: built with other settings"
        if problem is None:
            return final
        log(f"cache entry {final} is unusable ({problem}); rebuilding")
        shutil.rmtree(final, ignore_errors=True)
    # what builders of this entry left when they were killed mid-build (a run stopped while its
    # actors built the models: ray.kill runs no finally): this process holds the entry's lock, so
    # no one else is building it now
    for stale in final.parent.glob(f".{key}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{key}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        build(tmp)
        (tmp / "settings.json").write_text(json.dumps(meta, default=str, sort_keys=True))
        write_manifest(tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
