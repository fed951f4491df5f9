"""The deterministic context stream: context n -> (prompt, seed), a pure function of (run seed, n).

The cursor (the next n) is the only state, so a resumed run draws exactly the contexts the
uninterrupted run would have. Training seeds are even and held-out seeds odd: no evaluation noise
is ever a training noise.
"""

from __future__ import annotations

import numpy as np

from common.messages import Context

_TRAIN, _EVAL = 0x7124, 0xE7A1


def _seed(run_seed: int, tag: int, n: int, parity: int) -> int:
    return 2 * int(np.random.default_rng([run_seed, tag, n]).integers(0, 2**30)) + parity


class ContextStream:
    def __init__(self, prompts: list[str], run_seed: int, cursor: int = 0):
        if not prompts:
            raise ValueError("the context stream needs at least one prompt")
        self.prompts, self.run_seed, self.cursor = list(prompts), run_seed, cursor
        self._order: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))  # the last epoch's, kept

    def context(self, n: int) -> Context:
        # Each epoch visits every prompt once, in an order fixed by (run seed, epoch).
        epoch, pos = divmod(n, len(self.prompts))
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.run_seed, _TRAIN, epoch]).permutation(len(self.prompts)))
        return Context(index=n, prompt=self.prompts[self._order[1][pos]], seed=_seed(self.run_seed, _TRAIN, n, 0))

    def next(self, count: int) -> list[Context]:
        out = [self.context(n) for n in range(self.cursor, self.cursor + count)]
        self.cursor += count
        return out


def eval_contexts(prompts: list[str], seeds_per_prompt: int, run_seed: int) -> list[Context]:
    """Held-out contexts: every eval prompt with ``seeds_per_prompt`` odd (never-trained) seeds."""
    out = []
    for p_i, prompt in enumerate(prompts):
        for s in range(seeds_per_prompt):
            n = p_i * seeds_per_prompt + s
            out.append(Context(index=n, prompt=prompt, seed=_seed(run_seed, _EVAL, n, 1)))
    return out
