"""Samplers named by import path in the integration tests."""

from __future__ import annotations

import time

from rollout.backends.toy import ToySampler


class StampedToy(ToySampler):
    """The toy sampler, appending when it was built (time.time()) to the file ``stamp``: one line
    per rollout worker."""

    def __init__(self, stamp: str, **problem):
        super().__init__(**problem)
        with open(stamp, "a") as f:
            f.write(f"{time.time()}\n")


class SlowToAnswer(ToySampler):
    """The toy sampler, a second slow to say what it is (its spec): a question to its worker
    outlives a short rollout.sample_timeout_s however idle the machine."""

    def spec(self):
        time.sleep(1.0)
        return super().spec()
