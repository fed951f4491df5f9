"""Rewards named by import path in the integration tests (a user's plug-in, in miniature)."""

from __future__ import annotations

import os
import time

import numpy as np


class NegativeNorm:
    """Prefers samples near the origin: a custom reward a user might plug in."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, images, prompts):
        return (-self.scale * np.linalg.norm(np.asarray(images), axis=1)).astype(np.float32)


class NanForClass3:
    """Returns NaN for prompts naming class 3: must stop the step, never reach the policy."""

    def __call__(self, images, prompts):
        return np.array([np.nan if p == "class 3" else 0.0 for p in prompts], dtype=np.float32)


class BadImageReward:
    """For the HTTP server tests: 0 per image, NaN for the prompt 'nan please', a crash for 'crash please'."""

    def __call__(self, images, prompts):
        if "crash please" in prompts:
            raise RuntimeError("deliberate crash")
        return np.array([np.nan if p == "nan please" else 0.0 for p in prompts], dtype=np.float32)


class EnvScale:
    """Scores every sample with the float in $STEINSCHED_TEST_SCALE: set only by its runtime_env."""

    def __call__(self, images, prompts):
        import os

        return np.full(len(prompts), float(os.environ["STEINSCHED_TEST_SCALE"]), dtype=np.float32)


class CrashOnClass7:
    """Raises on a batch holding 'class 7': the step must stop with the reward and prompts named."""

    def __call__(self, images, prompts):
        if "class 7" in prompts:
            raise KeyError("no model for class 7")
        return np.zeros(len(prompts), dtype=np.float32)


class HangInInit:
    """A reward whose __init__ never returns (a model download that stalls)."""

    def __init__(self, seconds: float = 3600.0):
        import time

        time.sleep(seconds)

    def __call__(self, images, prompts):
        return np.zeros(len(prompts), dtype=np.float32)


class HangOnce:
    """Stalls on its first call anywhere (a marker file says it happened), then scores 0: a
    timed-out unit must be re-sent to the restarted server and the run go on."""

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, images, prompts):
        import os
        import time

        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(3600)
        return -np.linalg.norm(np.asarray(images), axis=1).astype(np.float32)


class AlwaysHang:
    """Never returns: the second time-out of a unit must stop the run, naming reward and prompts."""

    def __call__(self, images, prompts):
        import time

        time.sleep(3600)


class NoCall:
    """A class that is not a reward: it has no __call__."""

    def score(self, images, prompts):
        return np.zeros(len(prompts), dtype=np.float32)


class ScaleJump:
    """Scores 1 on its first call, then 1e6: a change of units the learner must warn about."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts):
        self.calls += 1
        return np.full(len(prompts), 1.0 if self.calls == 1 else 1e6, dtype=np.float32)


class SideProbe:
    """Declares the side it reads (``input_size``, as HPS does) and scores each image with the
    longest side it received: shows that the workers downscaled the images before sending them."""

    def __init__(self, input_size: int | None = 16):
        self.input_size = input_size

    def __call__(self, images, prompts):
        a = np.asarray(images)
        return np.full(len(prompts), max(a.shape[1:3]), dtype=np.float32)


class SlowStart:
    """A reward whose model loads until the file ``until`` holds ``lines`` lines (the stamps of
    the samplers a test waits to see built: StampedToy's), or ``seconds`` have passed; it writes
    when its load began and ended (time.time()) to the file ``stamp``. It prefers samples near
    the origin."""

    def __init__(self, seconds: float, stamp: str, until: str, lines: int = 1):
        began = time.time()
        while time.time() - began < seconds and _lines(until) < lines:
            time.sleep(0.05)
        with open(stamp, "a") as f:
            f.write(f"{began} {time.time()}\n")

    def __call__(self, images, prompts):
        return (-np.linalg.norm(np.asarray(images), axis=1)).astype(np.float32)


def _lines(path: str) -> int:
    try:
        with open(path) as f:
            return len(f.read().splitlines())
    except FileNotFoundError:
        return 0


class RaisesOnCall:
    """Raises on every call after the first ``after`` (zeros until then): a reward's own error met
    during a step or an evaluation."""

    def __init__(self, after: int = 0):
        self.after, self.calls = after, 0

    def __call__(self, images, prompts):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("deliberate failure")
        return np.zeros(len(prompts))


class FailsToStart:
    """Its __init__ raises: a model that is not there."""

    def __init__(self):
        raise RuntimeError("no model at /models/x")

    def __call__(self, images, prompts):
        return np.zeros(len(prompts))


class BugInInit:
    """A TypeError of its own in __init__, given no kwargs: not a kwargs mistake."""

    def __init__(self):
        self.size = None + 1

    def __call__(self, images, prompts):
        return np.zeros(len(prompts))


class DiesWhenTold:
    """Its process exits on every call once the file ``told`` exists (zeros until then): a reward
    server that dies on every try of a unit, in training or in an evaluation."""

    def __init__(self, told: str):
        self.told = told

    def __call__(self, images, prompts):
        if os.path.exists(self.told):
            os._exit(1)
        return np.zeros(len(prompts))
