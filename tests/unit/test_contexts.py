"""The deterministic context stream and the held-out contexts."""

from __future__ import annotations

from learner.contexts import ContextStream, eval_contexts

PROMPTS = [f"class {i}" for i in range(5)]


def test_stream_is_a_function_of_seed_and_index():
    a, b = ContextStream(PROMPTS, 0), ContextStream(PROMPTS, 0)
    assert a.next(12) == b.next(12)
    resumed = ContextStream(PROMPTS, 0, cursor=7)
    assert resumed.next(5) == ContextStream(PROMPTS, 0).next(12)[7:]
    assert ContextStream(PROMPTS, 1).next(12) != ContextStream(PROMPTS, 0).next(12)
    jumping = ContextStream(PROMPTS, 0)  # read in any order: the same contexts (an epoch's order is cached)
    assert [jumping.context(n) for n in (11, 3, 4, 0, 9, 7, 2, 10, 1, 5, 8, 6)] == [
        ContextStream(PROMPTS, 0).next(12)[n] for n in (11, 3, 4, 0, 9, 7, 2, 10, 1, 5, 8, 6)
    ]


def test_each_epoch_visits_every_prompt_once():
    ctx = ContextStream(PROMPTS, 3).next(15)
    for e in range(3):
        assert sorted(c.prompt for c in ctx[5 * e : 5 * e + 5]) == PROMPTS
    assert [c.index for c in ctx] == list(range(15))


def test_held_out_seeds_are_never_training_seeds():
    train = {c.seed for c in ContextStream(PROMPTS, 0).next(2000)}
    held = eval_contexts(PROMPTS, 50, 0)
    assert len(held) == 250 and all(c.seed % 2 == 1 for c in held)
    assert not train & {c.seed for c in held}
