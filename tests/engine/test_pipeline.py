"""Expanding many problems at once: the engine's batch holds samples of several problems, each
problem is scored and handed over as soon as its samples are done, and the traces equal those
of expanding every problem alone (tiny float64 models)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from expansion.engine.pipeline import ExpansionItem, expand_items
from expansion.engine.prompts import PromptError
from expansion.engine.rollout import RolloutConfig
from expansion.engine.rollout_fast import TransformersBackend
from expansion.engine.rollout_reference import ReferenceBackend

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ITEMS = [
    ExpansionItem(
        key=f"p{n}",
        problem=f"Compute {n} + {n + 1} times {n + 2}.",
        solution=f"{n} + {n + 1} = {2 * n + 1}; times {n + 2} gives {(2 * n + 1) * (n + 2)}.",
        partial_solution=f"{2 * n + 1}",
        answer=str((2 * n + 1) * (n + 2)),
    )
    for n in range(5)
]
# eos 257 (<|im_end|>) and a few byte tokens end traces at many lengths.
CONFIG = RolloutConfig(
    tau=0.6, max_new_tokens=24, eos_token_ids=(257, 33, 44, 55), max_batch_size=4, seed=3
)


def expand(model, tokenizer, items, config, **kwargs):
    return expand_items(
        model, tokenizer, TransformersBackend(model), items, config=config, samples=3, **kwargs
    )


def same(a, b) -> None:
    assert (a.item_index, a.sample_index) == (b.item_index, b.sample_index)
    assert a.arrays.token_ids.tolist() == b.arrays.token_ids.tolist()
    assert a.arrays.sources.tolist() == b.arrays.sources.tolist()
    assert a.finish_reason == b.finish_reason and a.kept == b.kept
    for name in ("learner_logprobs", "privileged_logprobs", "negative_logprobs"):
        np.testing.assert_allclose(getattr(a.arrays, name), getattr(b.arrays, name), atol=1e-5)
    for view in ("privileged", "negative"):
        ids_a, ids_b = getattr(a.arrays, f"{view}_top_ids"), getattr(b.arrays, f"{view}_top_ids")
        np.testing.assert_array_equal(ids_a, ids_b)
        lps_a = getattr(a.arrays, f"{view}_top_logprobs")
        np.testing.assert_allclose(lps_a, getattr(b.arrays, f"{view}_top_logprobs"), atol=1e-5)


@pytest.mark.parametrize("tau", [0.6, 1.0])
def test_problems_batched_together_equal_problems_expanded_alone(
    tiny_model_factory, tiny_tokenizer, tau
):
    model = tiny_model_factory()
    config = dataclasses.replace(CONFIG, tau=tau)
    handed: list[tuple[int, list]] = []
    rollout_done: list[int] = []
    together = expand(
        model,
        tiny_tokenizer,
        ITEMS,
        config,
        on_item=lambda index, traces: handed.append((index, traces)),
        progress=lambda stage, done, total: rollout_done.append(done) if stage == "rollout" else 0,
    )
    alone = []
    for index, item in enumerate(ITEMS):
        for trace in expand(model, tiny_tokenizer, [item], config):
            alone.append(dataclasses.replace(trace, item_index=index))
    assert len(together) == len(alone) == 15
    for a, b in zip(alone, together, strict=True):
        same(a, b)
    # Every problem handed over once, with its own traces, the first ones while the engine
    # still had sequences of other problems to decode.
    assert sorted(index for index, _ in handed) == list(range(len(ITEMS)))
    for index, traces in handed:
        assert [t.item_index for t in traces] == [index] * 3
        assert [t.sample_index for t in traces] == [0, 1, 2]
    assert len({len(t.arrays) for t in together}) > 2, "traces should end at many lengths"


def test_items_are_handed_over_before_the_rollout_ends(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    events: list[str] = []
    expand(
        model,
        tiny_tokenizer,
        ITEMS,
        CONFIG,
        on_item=lambda index, traces: events.append(f"item {index}"),
        progress=lambda stage, done, total: events.append(stage),
    )
    first_item = events.index(next(e for e in events if e.startswith("item")))
    assert "rollout" in events[first_item:], "no problem was stored while others decoded"


def test_other_backends_hand_over_per_batch(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    config = dataclasses.replace(CONFIG, max_new_tokens=8)
    handed: list[int] = []
    traces = expand_items(
        model,
        tiny_tokenizer,
        ReferenceBackend(model, batch_size=2),
        ITEMS[:3],
        config=config,
        samples=2,
        on_item=lambda index, _traces: handed.append(index),
    )
    assert sorted(handed) == [0, 1, 2] and len(traces) == 6
    fast = expand_items(
        model, tiny_tokenizer, TransformersBackend(model), ITEMS[:3], config=config, samples=2
    )
    for a, b in zip(traces, fast, strict=True):
        same(a, b)


def test_a_prompt_that_does_not_fit_names_its_problem(tiny_model_factory, tiny_tokenizer):
    model = tiny_model_factory()
    long_item = dataclasses.replace(ITEMS[1], label="problem 7b", problem="x" * 3000)
    with pytest.raises(PromptError, match="^problem 7b: "):
        expand(model, tiny_tokenizer, [ITEMS[0], long_item], CONFIG, max_prompt_tokens=2000)
