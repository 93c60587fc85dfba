"""The commit rules (`rollout.token_ending`, `length_ending`, `adapted_block_size`) on their own,
and the fast and reference engines ending sequences the same way through them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from expansion.engine.rollout import (
    RolloutConfig,
    RolloutRequest,
    RolloutResult,
    adapted_block_size,
    length_ending,
    non_finite_message,
    token_ending,
)
from expansion.engine.rollout_fast import fast_rollout
from expansion.engine.rollout_reference import reference_rollout
from tests.engine.conftest import TINY_VOCAB, make_tiny_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")

EOS = 257
PAD = TINY_VOCAB - 1  # in no prompt below; forbidden where a run must not end by EOS


# --- token_ending -----------------------------------------------------------------------


def test_a_plain_token_does_not_end_its_sequence():
    assert token_ending(42, [], 3, {EOS}) is None


def test_eos_ends_the_sequence_and_is_not_kept():
    assert token_ending(EOS, [], 3, {EOS, 7}) == ("eos", None)
    assert token_ending(7, [], 0, (EOS, 7)) == ("eos", None)


def test_non_finite_logits_end_with_an_error_before_eos_is_looked_at():
    ending = token_ending(EOS, ["privileged"], 5, {EOS})
    assert ending == ("error", non_finite_message(["privileged"], 5))
    assert ending[1] == "non-finite logits (NaN or inf) from the privileged view at position 5"


def test_the_error_names_every_failed_view_in_a_fixed_order():
    ending = token_ending(42, ["privileged", "learner"], 0, {EOS})
    assert ending == (
        "error",
        "non-finite logits (NaN or inf) from the learner and privileged views at position 0",
    )


# --- length_ending ----------------------------------------------------------------------


def test_length_ends_a_sequence_once_it_holds_max_new_tokens():
    config = RolloutConfig(max_new_tokens=4)
    assert length_ending(0, config) is None
    assert length_ending(3, config) is None
    assert length_ending(4, config) == ("length", None)
    assert length_ending(5, config) == ("length", None)


# --- adapted_block_size -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "share", "maximum", "expected"),
    [
        (4, 1.0, 32, 8),  # doubled
        (4, 0.9, 32, 8),  # doubled from 90 % on
        (12, 1.0, 16, 16),  # doubled, clamped to the maximum
        (16, 0.95, 16, 16),  # already at the maximum
        (8, 0.49, 32, 4),  # halved below one half
        (5, 0.0, 32, 2),  # halved, rounded down
        (1, 0.0, 32, 1),  # never below 1
        (8, 0.5, 32, 8),  # the unchanged band: [0.5, 0.9)
        (8, 0.89, 32, 8),
    ],
)
def test_block_size_adapts_to_the_share_of_fully_matched_drafts(
    block: int, share: float, maximum: int, expected: int
):
    assert adapted_block_size(block, share, maximum) == expected


# --- both engines end sequences the same way ----------------------------------------------


def prompt_requests(count: int, seed: int) -> list[RolloutRequest]:
    rng = np.random.default_rng(seed)
    return [
        RolloutRequest(
            rng.integers(0, 256, size=int(rng.integers(1, 10))).tolist(),
            rng.integers(0, 256, size=int(rng.integers(1, 20))).tolist(),
            sequence_key=500 + index,
        )
        for index in range(count)
    ]


def assert_same_endings(expected: list[RolloutResult], actual: list[RolloutResult]) -> None:
    assert len(expected) == len(actual)
    for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
        assert a.token_ids.tolist() == b.token_ids.tolist(), f"trace {index} tokens differ"
        assert (a.finish_reason, a.error) == (b.finish_reason, b.error), f"trace {index}"


# Two views (drafted blocks that do not divide max_new_tokens) and a single view (tau = 1).
ENGINES = {
    "two-view": {"tau": 0.5, "block_size": 3, "max_block_size": 8},
    "single-view": {"tau": 1.0},
}
BASE = RolloutConfig(
    max_new_tokens=13, eos_token_ids=(PAD,), forbidden_token_ids=(PAD,), max_batch_size=3
)


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
def test_engines_end_by_length_alike(tiny_model_factory, engine: dict):
    model = tiny_model_factory()
    requests = prompt_requests(5, seed=1)
    config = dataclasses.replace(BASE, **engine)
    fast = fast_rollout(model, requests, config)
    assert_same_endings(reference_rollout(model, requests, config), fast)
    assert all(r.finish_reason == "length" and len(r) == 13 for r in fast)


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
def test_engines_end_by_eos_alike(tiny_model_factory, engine: dict):
    model = tiny_model_factory()
    requests = prompt_requests(6, seed=2)
    config = dataclasses.replace(BASE, max_new_tokens=30, **engine)
    # Every token EOS: every trace ends at its first position, empty.
    everything = dataclasses.replace(config, eos_token_ids=tuple(range(TINY_VOCAB - 1)))
    fast = fast_rollout(model, requests, everything)
    assert_same_endings(reference_rollout(model, requests, everything), fast)
    assert all(r.finish_reason == "eos" and len(r) == 0 for r in fast)
    # The model's most frequent token as EOS: traces end at different lengths, by EOS or
    # length, and the EOS token is never kept.
    unbounded = reference_rollout(model, requests, config)
    likely = int(np.bincount(np.concatenate([r.token_ids for r in unbounded])).argmax())
    stopping = dataclasses.replace(config, eos_token_ids=(likely,))
    fast = fast_rollout(model, requests, stopping)
    assert_same_endings(reference_rollout(model, requests, stopping), fast)
    assert "eos" in {r.finish_reason for r in fast}
    for long, short in zip(unbounded, fast, strict=True):
        hits = np.flatnonzero(long.token_ids == likely)
        expected = ("eos", hits[0]) if hits.size else ("length", 30)
        assert (short.finish_reason, len(short)) == expected
        assert likely not in short.token_ids


def poisoned_traces(
    config: RolloutConfig,
) -> tuple[list[RolloutResult], list[RolloutResult], list[RolloutResult], int]:
    """Clean reference traces, then fast and reference traces after the embedding of a token
    the model generates (and no prompt holds) is set to NaN: (clean, fast, reference, token)."""
    model = make_tiny_model(seed=7)  # own copy: its embedding is poisoned below
    requests = prompt_requests(6, seed=3)
    clean = reference_rollout(model, requests, config)
    assert all(r.finish_reason == "length" for r in clean)  # its EOS is forbidden
    in_prompts = [t for r in requests for t in r.learner_prompt_ids + r.privileged_prompt_ids]
    generated = np.concatenate([r.token_ids[:-1] for r in clean])  # each followed by a position
    poisoned = int(np.bincount(generated[~np.isin(generated, in_prompts)]).argmax())
    with torch.no_grad():
        model.get_input_embeddings().weight[poisoned] = float("nan")
    return (
        clean,
        fast_rollout(model, requests, config),
        reference_rollout(model, requests, config),
        poisoned,
    )


def assert_ended_after_the_poisoned_token(
    clean: list[RolloutResult], poisoned_run: list[RolloutResult], token: int, views: list[str]
) -> None:
    """Each trace keeps its clean tokens up to and including the first poisoned one; the next
    position's logits are non-finite in `views` and end it with that error."""
    errors = 0
    for before, after in zip(clean, poisoned_run, strict=True):
        hits = np.flatnonzero(before.token_ids == token)
        if not hits.size or hits[0] + 1 == len(before):
            assert after.token_ids.tolist() == before.token_ids.tolist()
            assert (after.finish_reason, after.error) == (before.finish_reason, before.error)
            continue
        position = int(hits[0]) + 1
        assert after.token_ids.tolist() == before.token_ids[:position].tolist()
        assert (after.finish_reason, after.error) == (
            "error",
            non_finite_message(views, position),
        )
        errors += 1
    assert errors > 0, "no trace met the poisoned token"


def test_engines_end_on_non_finite_logits_alike():
    """Both views read the poisoned token, so both views' next logits are NaN: the token is
    kept and the next position ends the trace, in the reference and the fast engine alike."""
    two_views = ["learner", "privileged"]
    config = dataclasses.replace(BASE, max_new_tokens=24, tau=0.5, block_size=1, max_block_size=1)
    clean, fast, reference, token = poisoned_traces(config)
    assert_ended_after_the_poisoned_token(clean, reference, token, two_views)
    assert_ended_after_the_poisoned_token(clean, fast, token, two_views)


def test_a_single_view_run_names_only_the_view_it_consulted():
    """tau = 1 consults the privileged view alone: same tokens and position as the reference,
    but the error names the one view whose logits were read."""
    config = dataclasses.replace(BASE, max_new_tokens=24, tau=1.0)
    clean, fast, reference, token = poisoned_traces(config)
    assert_ended_after_the_poisoned_token(clean, reference, token, ["learner", "privileged"])
    assert_ended_after_the_poisoned_token(clean, fast, token, ["privileged"])


def test_drafted_blocks_end_a_poisoned_trace_at_most_one_block_early():
    """A documented difference (engine docstring): with blocks > 1 the checker reads a drafted
    block in one pass, and a poisoned token's NaN keys/values reach the block's earlier
    positions through masked attention weights (0 x NaN). The fast engine then ends such a
    trace with the same kind of error, keeping a prefix of the reference's tokens, at most one
    block earlier; traces that never meet the token are untouched."""
    config = dataclasses.replace(BASE, max_new_tokens=24, **ENGINES["two-view"])
    clean, fast, reference, token = poisoned_traces(config)
    assert_ended_after_the_poisoned_token(clean, reference, token, ["learner", "privileged"])
    earlier = 0
    for ref, got in zip(reference, fast, strict=True):
        if ref.finish_reason != "error":
            assert got.token_ids.tolist() == ref.token_ids.tolist()
            continue
        assert got.finish_reason == "error" and "non-finite logits" in got.error
        assert got.token_ids.tolist() == ref.token_ids[: len(got)].tolist()
        assert len(ref) - config.max_block_size <= len(got) <= len(ref)
        earlier += int(len(got) < len(ref))
    assert earlier > 0, "the difference this test documents did not show: update the docstring"
