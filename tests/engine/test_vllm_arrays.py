"""The vLLM backend's array side, without vLLM: top-N log-probs -> the rule's decisions.

With the top-N of raw (temperature 1) log-probs that vLLM returns, the backend must make the
decisions the transformers engines make from full logits: exactly at temperature 1, closely
otherwise (the normaliser's tail is estimated).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from expansion.engine.rollout import RolloutConfig, RolloutError
from expansion.engine.sampling import (
    keyed_uniforms,
    mixed_policy_decisions,
    next_token_distributions,
)
from expansion.engine.vllm_backend.backends import VllmBackend
from expansion.engine.vllm_backend.decisions import (
    chosen_logprobs_from_top,
    decide_positions,
    single_view_decisions,
    view_distributions,
)
from expansion.engine.vllm_backend.engine import DRAFT_PROCESSOR
from expansion.engine.vllm_backend.outputs import TopLogprobs, top_logprobs_from_flat

VOCAB = 64


def fake_flat(ids: np.ndarray, values: np.ndarray) -> SimpleNamespace:
    """A vLLM `FlatLogprobs` with the given (P, W) rows (W = actual token + top-N)."""
    rows, width = ids.shape
    return SimpleNamespace(
        start_indices=[r * width for r in range(rows)],
        end_indices=[(r + 1) * width for r in range(rows)],
        token_ids=ids.reshape(-1).tolist(),
        logprobs=values.reshape(-1).tolist(),
    )


def top_of(logits: torch.Tensor, top_n: int, actual: np.ndarray) -> TopLogprobs:
    """What vLLM returns for these logits: raw log-probs of the actual token and the top-N."""
    raw = torch.log_softmax(logits.double(), dim=-1)  # (M, V)
    values, ids = raw.topk(top_n, dim=-1)
    actual_t = torch.from_numpy(actual)
    return TopLogprobs(
        actual_ids=actual.astype(np.int64),
        actual_logprobs=raw.gather(1, actual_t[:, None])[:, 0].numpy(),
        top_ids=ids.numpy(),
        top_logprobs=values.numpy(),
    )


def random_logits(rows: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, VOCAB), generator=generator, dtype=torch.float64) * scale


def full_rule(logits: dict[str, torch.Tensor], keys, positions, config: RolloutConfig):
    """The transformers engines' decisions from full logits."""
    forbidden = torch.tensor(config.forbidden_token_ids, dtype=torch.long)
    dists = {
        view: next_token_distributions(
            logits[view].clone(),
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            forbidden_token_ids=forbidden,
        )
        for view in logits
    }
    uniforms = keyed_uniforms(config.seed, keys, positions[:, None], config.max_draws + 1)
    return dists, mixed_policy_decisions(
        dists[config.proposer],
        dists[config.verifier],
        torch.from_numpy(uniforms[:, 0]),
        tau=config.tau,
        acceptance=config.acceptance,
    )


def test_flat_log_probs_become_arrays():
    ids = np.array([[5, 7, 5, 9], [3, 3, 8, 1]])
    values = np.array([[-1.0, -0.5, -1.0, -2.0], [-0.2, -0.2, -2.5, -3.0]])
    top = top_logprobs_from_flat(fake_flat(ids, values), 0, 2, top_n=3)
    assert top.actual_ids.tolist() == [5, 3]
    assert top.top_ids.tolist() == [[7, 5, 9], [3, 8, 1]]
    np.testing.assert_array_equal(top.top_logprobs, values[:, 1:])
    one = top_logprobs_from_flat(fake_flat(ids, values), 1, 1, top_n=3)
    assert one.actual_ids.tolist() == [3] and one.top_ids.tolist() == [[3, 8, 1]]
    with pytest.raises(RolloutError):
        top_logprobs_from_flat(fake_flat(ids, values), 1, 2, top_n=3)


@pytest.mark.parametrize("proposer", ["learner", "privileged"])
@pytest.mark.parametrize("tau", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_top_n_decisions_equal_full_logits_decisions(proposer: str, tau: float, top_p: float):
    config = RolloutConfig(
        tau=tau, proposer=proposer, top_k=8, top_p=top_p, forbidden_token_ids=(3, 11)
    )
    rows = 400
    logits = {"learner": random_logits(rows, 1), "privileged": random_logits(rows, 2)}
    keys = np.arange(rows, dtype=np.int64) // 7
    positions = np.arange(rows, dtype=np.int64) % 7
    dists, expected = full_rule(logits, keys, positions, config)
    top_n = config.top_k + len(config.forbidden_token_ids)
    actual = np.asarray(expected.token_ids)
    tops = {view: top_of(logits[view], top_n, actual) for view in logits}
    got = decide_positions(tops, keys, positions, config)
    assert got.token_ids.tolist() == expected.token_ids.tolist()
    assert got.accepted.tolist() == expected.accepted.tolist()
    assert got.draws.tolist() == expected.draws.tolist()
    for view in logits:
        assert got.finite[view].all()
        # Forbidden tokens leave the normaliser when vLLM returned them (in the top-N).
        raw = torch.log_softmax(logits[view], dim=-1).numpy()  # (M, V)
        returned = np.zeros_like(raw, dtype=bool)
        np.put_along_axis(returned, tops[view].top_ids, True, axis=1)
        forbidden = list(config.forbidden_token_ids)
        removed = np.where(returned[:, forbidden], np.exp(raw[:, forbidden]), 0.0).sum(axis=1)
        want = raw[np.arange(rows), actual] - np.log1p(-removed)
        np.testing.assert_allclose(got.logprobs[view], want, atol=1e-9)


@pytest.mark.parametrize("proposer", ["learner", "privileged"])
@pytest.mark.parametrize("tau", [0.0, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_single_view_decisions_are_the_rules(proposer: str, tau: float, temperature: float):
    """tau = 0 / 1: the one consulted view's generated tokens are the rule's decisions; the
    outcome reports what the two-view rule reports and the other view is left NaN."""
    config = RolloutConfig(tau=tau, proposer=proposer, top_k=20, temperature=temperature)
    view = config.proposer if tau == 0.0 else config.verifier
    other = config.verifier if tau == 0.0 else config.proposer
    rows = 300
    logits = {"learner": random_logits(rows, 6), "privileged": random_logits(rows, 7)}
    keys = np.arange(rows, dtype=np.int64) // 5
    positions = np.arange(rows, dtype=np.int64) % 5
    _, expected = full_rule(logits, keys, positions, config)
    generated = np.asarray(expected.token_ids)  # what the drafting processor makes it emit
    got = single_view_decisions(top_of(logits[view], config.top_k, generated), view, config)
    assert got.token_ids.tolist() == generated.tolist()
    assert got.accepted.tolist() == expected.accepted.tolist() == [tau == 0.0] * rows
    assert got.draws.tolist() == expected.draws.tolist()
    assert got.finite[view].all() and got.finite[other].all()
    assert np.isnan(got.logprobs[other]).all()
    # The consulted view's full-softmax log-prob at the temperature, from its top-N alone.
    want = torch.log_softmax(logits[view] / temperature, dim=-1).numpy()[np.arange(rows), generated]
    atol = 1e-9 if temperature == 1.0 else 0.05  # the tail estimate at other temperatures
    np.testing.assert_allclose(got.logprobs[view], want, atol=atol)


def test_other_temperatures_are_close_and_decide_alike():
    config = RolloutConfig(tau=0.5, top_k=20, temperature=0.6)
    rows = 300
    logits = {"learner": random_logits(rows, 3), "privileged": random_logits(rows, 4)}
    keys = np.arange(rows, dtype=np.int64)
    positions = np.zeros(rows, dtype=np.int64)
    _, expected = full_rule(logits, keys, positions, config)
    actual = np.asarray(expected.token_ids)
    tops = {view: top_of(logits[view], config.top_k, actual) for view in logits}
    got = decide_positions(tops, keys, positions, config)
    assert np.mean(got.token_ids == actual) >= 0.98
    for view in logits:
        scaled = torch.log_softmax(logits[view] / config.temperature, dim=-1).numpy()
        want = scaled[np.arange(rows), actual]
        np.testing.assert_allclose(got.logprobs[view], want, atol=0.05)


def test_non_finite_rows_and_unreturned_tokens():
    config = RolloutConfig(top_k=4)
    logits = random_logits(3, 5)
    top = top_of(logits, 4, np.array([0, 1, 2]))
    poisoned = dataclasses.replace(top, top_logprobs=top.top_logprobs.copy())
    poisoned.top_logprobs[1, 2] = np.nan
    dist = view_distributions(poisoned, config)
    assert dist.finite.tolist() == [True, False, True]
    outside = int(np.setdiff1d(np.arange(VOCAB), top.top_ids[0])[0])
    values = chosen_logprobs_from_top(
        top, np.zeros(3), np.array([top.top_ids[0, 1], outside, top.actual_ids[2]]), 1.0
    )
    assert values[0] == pytest.approx(top.top_logprobs[0, 1])
    assert np.isnan(values[1])
    assert values[2] == pytest.approx(top.actual_logprobs[2])


def fake_engine(mode: str = "raw_logprobs", processors: tuple = (DRAFT_PROCESSOR,)) -> Any:
    model_config = SimpleNamespace(
        logprobs_mode=mode,
        logits_processors=list(processors),
        max_logprobs=24,
        max_model_len=128,
        get_vocab_size=lambda: VOCAB,
        try_get_generation_config=lambda: {"eos_token_id": 2},
        hf_config=SimpleNamespace(eos_token_id=2),
    )
    return SimpleNamespace(
        llm_engine=SimpleNamespace(
            model_config=model_config,
            vllm_config=SimpleNamespace(
                lora_config=None,
                cache_config=SimpleNamespace(block_size=32, enable_prefix_caching=True),
            ),
        )
    )


def test_backend_refuses_processed_log_probs_and_bad_settings(tmp_path: Path):
    with pytest.raises(RolloutError, match="raw log-probs"):
        VllmBackend(fake_engine("processed_logprobs"))
    with pytest.raises(RolloutError, match="drafting logits processor"):
        VllmBackend(fake_engine(processors=()))
    with pytest.raises(RolloutError, match="verify"):
        VllmBackend(fake_engine(), verify="sometimes")
    backend = VllmBackend(fake_engine())
    from expansion.engine.rollout import RolloutRequest

    good = RolloutRequest([1, 2], [3, 4], 0)
    config = backend.resolve_config(RolloutConfig(max_new_tokens=16))
    assert config.eos_token_ids == (2,)
    backend.validate([good], config)
    with pytest.raises(RolloutError, match="max_logprobs"):
        backend.validate([good], RolloutConfig(top_k=20, forbidden_token_ids=(5, 6, 7, 8, 9)))
    with pytest.raises(RolloutError, match="vocabulary"):
        backend.validate([RolloutRequest([VOCAB], [1], 0)], config)
    with pytest.raises(RolloutError, match="max_model_len"):
        backend.validate([RolloutRequest([1] * 120, [1], 0)], config)
    with pytest.raises(RolloutError, match="adapter"):
        backend.set_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(RolloutError, match="without LoRA"):
        backend.set_adapter(tmp_path)
