"""The fast engine makes exactly the reference loop's decisions (tiny float64 models)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from expansion.engine import model_views, rollout_fast
from expansion.engine.rollout import (
    SOURCE_LEARNER,
    SOURCE_PRIVILEGED,
    RolloutConfig,
    RolloutError,
    RolloutRequest,
    RolloutResult,
    single_view,
)
from expansion.engine.rollout_fast import TransformersBackend, fast_rollout
from expansion.engine.rollout_reference import ReferenceBackend, reference_rollout, resolve_config
from tests.engine.conftest import TINY_VOCAB

EOS = 257

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make_requests(count: int, seed: int = 0, shared: int = 1) -> list[RolloutRequest]:
    """`count` requests; every `shared` consecutive ones share prompts (n samples)."""
    rng = np.random.default_rng(seed)
    requests = []
    for index in range(count):
        if index % shared == 0:
            learner = rng.integers(0, 256, size=int(rng.integers(1, 12))).tolist()
            privileged = rng.integers(0, 256, size=int(rng.integers(1, 30))).tolist()
        requests.append(RolloutRequest(learner, privileged, sequence_key=1000 + index))
    return requests


def assert_same_traces(
    expected: list[RolloutResult],
    actual: list[RolloutResult],
    views: tuple[str, ...] = ("learner", "privileged"),
) -> None:
    """Same tokens, sources, draws and endings; log-probs of `views` equal (a single-view run
    consults one view: the other's log-probs are NaN, never computed)."""
    assert len(expected) == len(actual)
    for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
        assert a.token_ids.tolist() == b.token_ids.tolist(), f"trace {index} tokens differ"
        assert a.sources.tolist() == b.sources.tolist(), f"trace {index} sources differ"
        assert a.draws.tolist() == b.draws.tolist(), f"trace {index} draws differ"
        assert (a.finish_reason, a.error) == (b.finish_reason, b.error)
        for view in ("learner", "privileged"):
            want, got = getattr(a, f"{view}_logprobs"), getattr(b, f"{view}_logprobs")
            if view in views:
                np.testing.assert_allclose(want, got, atol=1e-5)
            else:
                assert np.isnan(got).all(), f"trace {index}: the {view} view was consulted"


BASE = RolloutConfig(max_new_tokens=24, eos_token_ids=(EOS,), max_batch_size=5)


@pytest.mark.parametrize("proposer", ["learner", "privileged"])
@pytest.mark.parametrize("tau", [0.0, 0.3, 0.8, 1.0])
def test_fast_equals_reference(tiny_model_factory, proposer: str, tau: float):
    model = tiny_model_factory()
    requests = make_requests(7, shared=2)
    config = dataclasses.replace(BASE, tau=tau, proposer=proposer)
    expected = reference_rollout(model, requests, config)
    views = (single_view(config),) if single_view(config) else ("learner", "privileged")
    assert_same_traces(expected, fast_rollout(model, requests, config), views)
    # The traces exercise the rule: not all from one source unless tau forces it.
    sources = np.concatenate([r.sources for r in expected])
    if 0.0 < tau < 1.0:
        assert 0 < (sources == SOURCE_LEARNER).sum() < sources.size


@pytest.mark.parametrize(
    "engine",
    [
        {"draft_view": "proposer", "block_size": 1, "max_block_size": 1},
        {"draft_view": "verifier", "block_size": 3, "max_block_size": 3},
        {"draft_view": "proposer", "block_size": 5, "max_block_size": 40, "max_batch_size": 1},
        {"draft_view": "verifier", "block_size": 2, "max_block_size": 16, "max_batch_size": 7},
    ],
)
def test_speed_settings_do_not_change_traces(tiny_model_factory, engine: dict):
    model = tiny_model_factory()
    requests = make_requests(7, seed=1, shared=3)
    config = dataclasses.replace(BASE, tau=0.5, max_new_tokens=30)
    expected = reference_rollout(model, requests, config)
    assert_same_traces(
        expected, fast_rollout(model, requests, dataclasses.replace(config, **engine))
    )


def test_a_trace_does_not_depend_on_its_batch(tiny_model_factory):
    model = tiny_model_factory()
    requests = make_requests(6, seed=2)
    config = dataclasses.replace(BASE, tau=0.6, top_p=0.9, temperature=0.8, max_new_tokens=20)
    together = fast_rollout(model, requests, config)
    alone = [fast_rollout(model, [r], config)[0] for r in requests]
    assert_same_traces(alone, together)


def test_learner_view_uses_the_adapter_and_privileged_view_does_not(tiny_model_factory):
    model = tiny_model_factory(adapter=True)
    requests = make_requests(5, seed=3)
    config = dataclasses.replace(BASE, tau=0.4)
    expected = reference_rollout(model, requests, config)
    assert_same_traces(expected, fast_rollout(model, requests, config))
    # Without the adapter the learner view (same prompts) gives other traces.
    plain = tiny_model_factory()
    assert any(
        a.token_ids.tolist() != b.token_ids.tolist()
        for a, b in zip(expected, reference_rollout(plain, requests, config), strict=True)
    )


def test_adapter_only_moves_the_learner_log_probs(tiny_model_factory):
    with_adapter = tiny_model_factory(adapter=True)
    plain = tiny_model_factory()
    request = make_requests(1, seed=4)
    config = dataclasses.replace(BASE, tau=1.0, max_new_tokens=12)
    a = reference_rollout(with_adapter, request, config)[0]
    b = reference_rollout(plain, request, config)[0]
    # tau = 1: every token is sampled from the privileged view, identical without the adapter.
    assert a.token_ids.tolist() == b.token_ids.tolist()
    np.testing.assert_allclose(a.privileged_logprobs, b.privileged_logprobs, atol=1e-9)
    assert not np.allclose(a.learner_logprobs, b.learner_logprobs, atol=1e-3)


def test_eos_ends_a_trace_and_forbidden_tokens_never_appear(tiny_model_factory):
    model = tiny_model_factory()
    requests = make_requests(8, seed=5)
    pad = TINY_VOCAB - 1
    endless = dataclasses.replace(
        BASE, tau=0.3, max_new_tokens=40, eos_token_ids=(pad,), forbidden_token_ids=(pad,)
    )
    unbounded = fast_rollout(model, requests, endless)
    assert all(r.finish_reason == "length" and len(r) == 40 for r in unbounded)
    # Declare the most frequent token EOS: each trace stops right before its first occurrence.
    eos = int(np.bincount(np.concatenate([r.token_ids for r in unbounded])).argmax())
    stopping = fast_rollout(model, requests, dataclasses.replace(endless, eos_token_ids=(eos,)))
    for long, short in zip(unbounded, stopping, strict=True):
        hits = np.flatnonzero(long.token_ids == eos)
        if hits.size:
            assert short.finish_reason == "eos"
            assert short.token_ids.tolist() == long.token_ids[: hits[0]].tolist()
        else:
            assert short.finish_reason == "length"
    assert {r.finish_reason for r in stopping} == {"eos", "length"}
    # Forbidding it instead: it never appears, and the reference agrees.
    forbidding = dataclasses.replace(endless, forbidden_token_ids=(pad, eos))
    forbidden = fast_rollout(model, requests, forbidding)
    assert all(eos not in r.token_ids for r in forbidden)
    assert_same_traces(reference_rollout(model, requests, forbidding), forbidden)


def test_sources_draws_and_log_probs_are_consistent(tiny_model_factory):
    model = tiny_model_factory()
    config = dataclasses.replace(BASE, tau=0.5, max_draws=3)
    for result in fast_rollout(model, make_requests(6, seed=6), config):
        fallback = result.sources == SOURCE_PRIVILEGED
        assert np.array_equal(fallback, result.fallbacks)
        assert np.all(result.draws[fallback] == 3)
        assert np.all((result.draws >= 1) & (result.draws <= 3))
        assert np.all(result.learner_logprobs <= 0) and np.all(result.privileged_logprobs <= 0)
        # A fallback token is in the privileged top-k; a token accepted at tau = 0.5 has
        # privileged probability >= 0.5.
        assert np.all(np.exp(result.privileged_logprobs[~fallback]) >= 0.5 - 1e-6)


def test_non_finite_logits_fail_only_their_sequence(tiny_model_factory):
    model = tiny_model_factory(seed=7)
    poisoned = TINY_VOCAB - 1  # <pad>: in no prompt, and forbidden so no trace makes it
    requests = make_requests(4, seed=8)
    config = dataclasses.replace(BASE, tau=0.5, forbidden_token_ids=(poisoned,))
    clean = fast_rollout(model, requests, config)
    bad_learner = RolloutRequest([1, 2, poisoned], [3, 4], sequence_key=1)
    bad_privileged = RolloutRequest([1, 2], [poisoned, 4], sequence_key=2)
    mixed = [requests[0], bad_learner, requests[1], requests[2], bad_privileged, requests[3]]
    embedding = model.get_input_embeddings().weight
    saved = embedding[poisoned].clone()
    with torch.no_grad():
        embedding[poisoned] = float("nan")
    try:
        fast = fast_rollout(model, mixed, config)
        reference = reference_rollout(model, mixed, config)
    finally:
        with torch.no_grad():
            embedding[poisoned] = saved
    assert fast[1].finish_reason == "error" and "learner view" in (fast[1].error or "")
    assert fast[4].finish_reason == "error" and "privileged view" in (fast[4].error or "")
    assert "position 0" in (fast[1].error or "")
    assert_same_traces(clean, [fast[i] for i in (0, 2, 3, 5)])
    assert_same_traces(reference, fast)


def test_backends_share_the_protocol_and_report_progress(tiny_model_factory):
    model = tiny_model_factory()
    requests = make_requests(5, seed=9)
    config = dataclasses.replace(BASE, tau=0.7, max_new_tokens=16)
    for backend in (TransformersBackend(model), ReferenceBackend(model)):
        seen: list[tuple[int, int]] = []

        def record(done: int, total: int, seen: list = seen) -> None:
            seen.append((done, total))

        results = backend.rollout(requests, config, progress=record)
        assert len(results) == 5
        assert seen[-1] == (5 * 16, 5 * 16)
        assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))
        stats = backend.last_stats
        assert stats.tokens == sum(len(r) for r in results)
        assert stats.fallbacks == sum(int(r.fallbacks.sum()) for r in results)
        assert stats.forward_passes > 0


def test_fast_engine_reports_draft_statistics(tiny_model_factory):
    model = tiny_model_factory()
    backend = TransformersBackend(model)
    backend.rollout(make_requests(4, seed=10), dataclasses.replace(BASE, tau=0.5))
    stats = backend.last_stats
    assert stats.drafted >= stats.tokens > 0
    assert 0.0 < stats.draft_acceptance <= 1.0


@pytest.mark.parametrize(("tau", "proposer", "view"), [
    (1.0, "learner", "privileged"),
    (0.0, "learner", "learner"),
    (1.0, "privileged", "learner"),
    (0.0, "privileged", "privileged"),
])  # fmt: skip
def test_single_view_runs_consult_one_view_once_per_token(
    tiny_model_factory, monkeypatch, tau: float, proposer: str, view: str
):
    """tau = 1 never consults the proposer and tau = 0 never the verifier: one forward pass of
    one view per generated token, as plain sampling costs."""
    model = tiny_model_factory()
    consulted: list[str] = []
    real_forward = model_views.forward_logits

    def spy(model_, view_, *args, **kwargs):
        consulted.append(view_)
        return real_forward(model_, view_, *args, **kwargs)

    monkeypatch.setattr(model_views, "forward_logits", spy)
    config = dataclasses.replace(BASE, tau=tau, proposer=proposer, max_batch_size=8)
    requests = make_requests(6, seed=11)
    backend = TransformersBackend(model)
    results = backend.rollout(requests, config)
    assert set(consulted) == {view}
    longest = max(len(r) + (r.finish_reason == "eos") for r in results)
    assert backend.last_stats.forward_passes == len(consulted) == 1 + longest  # prefill + steps


def test_continuous_batching_refills_finished_slots(tiny_model_factory):
    """Requests of many prompts, fewer slots than requests, traces of many lengths: each
    finished trace's slot is taken by the next pending request, every request is reported
    once as it finishes, and the traces equal the reference's."""
    model = tiny_model_factory()
    pad = int(model.config.pad_token_id or 0)
    requests = make_requests(13, seed=12, shared=2)
    config = dataclasses.replace(
        BASE, tau=0.5, max_new_tokens=40, eos_token_ids=(EOS, pad, 3, 5, 7), max_batch_size=4
    )
    reported: list[tuple[int, RolloutResult]] = []
    admitted: list[int] = []
    real_admit = rollout_fast._Wave.admit

    def counting_admit(self, indexed):
        admitted.append(len(indexed))
        return real_admit(self, indexed)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rollout_fast._Wave, "admit", counting_admit)
        results = fast_rollout(
            model,
            requests,
            config,
            on_finished=reported.extend,
        )
    assert_same_traces(reference_rollout(model, requests, config), results)
    assert sorted(i for i, _ in reported) == list(range(len(requests)))  # each once
    assert all(result is results[i] for i, result in reported)
    lengths = {len(r) for r in results}
    assert len(lengths) > 2, "the traces should end at different lengths"
    assert sum(admitted) == len(requests) and max(admitted) <= 4
    assert len(admitted) > -(-len(requests) // 4), "slots were only refilled wave by wave"


def test_out_of_vocabulary_prompt_is_refused(tiny_model_factory):
    with pytest.raises(RolloutError, match="vocabulary"):
        fast_rollout(tiny_model_factory(), [RolloutRequest([TINY_VOCAB], [1], 0)], BASE)


def test_model_eos_is_used_when_config_names_none(tiny_model_factory):
    model = tiny_model_factory()
    assert resolve_config(model, dataclasses.replace(BASE, eos_token_ids=())).eos_token_ids == (
        EOS,
    )
    assert resolve_config(model, BASE) is BASE


@pytest.mark.parametrize("budget", [1, 20])
def test_prompts_read_in_length_groups_give_the_same_traces(
    tiny_model_factory, monkeypatch, budget
):
    """Distinct prompts are prefilled in groups of similar length (here: one prompt a group,
    or a few); the groups' caches are joined, and the traces do not change."""
    monkeypatch.setattr(rollout_fast, "PREFILL_TOKENS", budget)
    model = tiny_model_factory()
    requests = make_requests(9, seed=13, shared=2)
    config = dataclasses.replace(BASE, tau=0.5, max_new_tokens=16, max_batch_size=6)
    assert_same_traces(
        reference_rollout(model, requests, config), fast_rollout(model, requests, config)
    )


@pytest.mark.parametrize("budget", [1, None])
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_prompts_sharing_a_prefix_give_the_same_traces(
    tiny_model_factory, monkeypatch, budget, tau
):
    """Real prompts start alike (chat template, instruction): the engine reads that prefix
    once and copies its cache rows; the traces do not change."""
    monkeypatch.setattr(rollout_fast, "PREFILL_TOKENS", budget)
    model = tiny_model_factory()
    prefix = list(range(40, 60))
    requests = [
        RolloutRequest(
            prefix[:9] + list(r.learner_prompt_ids),
            prefix + list(r.privileged_prompt_ids),
            r.sequence_key,
        )
        for r in make_requests(9, seed=14, shared=2)
    ]
    config = dataclasses.replace(BASE, tau=tau, max_new_tokens=16, max_batch_size=6)
    views = (single_view(config),) if single_view(config) else ("learner", "privileged")
    assert_same_traces(
        reference_rollout(model, requests, config), fast_rollout(model, requests, config), views
    )
