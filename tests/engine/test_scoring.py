"""Per-token scores: equal to a plain forward pass, batching-independent, shortcut summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expansion.engine.scoring import (
    SCORED_VIEWS,
    ScoringRequest,
    score_traces,
    shortcut_scores,
    summarise_shortcuts,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def make_requests(count: int, seed: int = 0) -> list[ScoringRequest]:
    rng = np.random.default_rng(seed)

    def ids(low: int, high: int) -> list[int]:
        return rng.integers(0, 256, size=int(rng.integers(low, high))).tolist()

    return [ScoringRequest(ids(1, 8), ids(3, 20), ids(2, 12), ids(1, 15)) for _ in range(count)]


def plain_logprobs(model, prompt, response, adapter: bool) -> torch.Tensor:
    """log p(response_i | prompt, response_<i) from one unpadded forward pass."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        if adapter or not hasattr(model, "disable_adapter"):
            logits = model(ids).logits[0]
        else:
            with model.disable_adapter():
                logits = model(ids).logits[0]
    lps = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)  # (T, V)
    return lps


def assert_views_equal_plain(model, request: ScoringRequest, score) -> None:
    """Each view's log-probs of the trace equal a plain forward pass of prompt + trace."""
    response = list(request.response_ids)
    picks = torch.arange(len(response)), torch.tensor(response)
    for view, adapter in (("learner", True), ("privileged", False), ("negative", False)):
        plain = plain_logprobs(model, request.prompt_ids(view), response, adapter=adapter)
        got = getattr(score, f"{view}_logprobs")
        np.testing.assert_allclose(got, plain[picks].numpy(), atol=1e-5, err_msg=view)


@pytest.mark.parametrize("adapter", [False, True])
def test_scores_equal_unbatched_forward_passes(tiny_model_factory, adapter: bool):
    model = tiny_model_factory(adapter=adapter)
    requests = make_requests(5)
    scores = score_traces(model, requests, top_n=3)
    for request, score in zip(requests, scores, strict=True):
        response = list(request.response_ids)
        picks = torch.arange(len(response)), torch.tensor(response)
        learner = plain_logprobs(model, request.learner_prompt_ids, response, adapter=True)
        privileged = plain_logprobs(model, request.privileged_prompt_ids, response, adapter=False)
        negative = plain_logprobs(model, request.negative_prompt_ids, response, adapter=False)
        np.testing.assert_allclose(score.learner_logprobs, learner[picks].numpy(), atol=1e-5)
        np.testing.assert_allclose(score.privileged_logprobs, privileged[picks].numpy(), atol=1e-5)
        np.testing.assert_allclose(score.negative_logprobs, negative[picks].numpy(), atol=1e-5)
        top = privileged.topk(3, dim=-1)
        np.testing.assert_array_equal(score.privileged_top_ids, top.indices.numpy())
        np.testing.assert_allclose(score.privileged_top_logprobs, top.values.numpy(), atol=1e-5)
        assert score.negative_top_ids.shape == (len(response), 3)
        assert np.all(np.diff(score.negative_top_logprobs, axis=1) <= 0)


def test_samples_sharing_a_prompt_equal_unbatched_forward_passes(tiny_model_factory):
    """A problem's samples share their prompts (one prefill, repeated cache rows): traces of
    0, 1, 2 and more tokens beside traces of other prompts score as if read alone."""
    model = tiny_model_factory(adapter=True)
    rng = np.random.default_rng(7)
    requests = []
    for _problem in range(3):
        prompts = [rng.integers(0, 256, size=int(rng.integers(2, 14))).tolist() for _ in range(3)]
        for length in (0, 1, 2, 9):
            response = rng.integers(0, 256, size=length).tolist()
            requests.append(ScoringRequest(*prompts, response))
    scores = score_traces(model, requests, top_n=2)
    for request, score in zip(requests, scores, strict=True):
        response = list(request.response_ids)
        assert score.negative_top_ids.shape == (len(response), 2)
        if not response:
            continue
        assert_views_equal_plain(model, request, score)


def test_prompts_sharing_a_prefix_equal_unbatched_forward_passes(tiny_model_factory):
    """Every view's prompts start alike in real runs (chat template, instruction): scoring
    reads that prefix once and equals plain forward passes, traces of 0-9 tokens included."""
    model = tiny_model_factory(adapter=True)
    rng = np.random.default_rng(9)
    shared = {view: rng.integers(0, 256, size=size).tolist()
              for view, size in (("learner", 8), ("privileged", 14), ("negative", 10))}  # fmt: skip
    requests = []
    for index in range(5):
        prompts = [
            shared[view] + rng.integers(0, 256, size=int(rng.integers(1, 9))).tolist()
            for view in SCORED_VIEWS
        ]
        for length in (0, 1, 9) if index % 2 else (4,):
            requests.append(ScoringRequest(*prompts, rng.integers(0, 256, size=length).tolist()))
    scores = score_traces(model, requests, top_n=2)
    for request, score in zip(requests, scores, strict=True):
        response = list(request.response_ids)
        if not response:
            continue
        assert_views_equal_plain(model, request, score)


def test_micro_batching_does_not_change_scores(tiny_model_factory):
    model = tiny_model_factory()
    requests = make_requests(7, seed=1)
    together = score_traces(model, requests)
    one_by_one = score_traces(model, requests, max_batch_tokens=1)
    small_logits = score_traces(model, requests, max_logit_elements=2000)
    for a, b, c in zip(together, one_by_one, small_logits, strict=True):
        np.testing.assert_allclose(a.negative_logprobs, b.negative_logprobs, atol=1e-6)
        np.testing.assert_allclose(a.learner_logprobs, c.learner_logprobs, atol=1e-6)


def test_adapter_moves_only_the_learner_scores(tiny_model_factory):
    requests = make_requests(3, seed=2)
    plain = score_traces(tiny_model_factory(), requests)
    adapted = score_traces(tiny_model_factory(adapter=True), requests)
    for a, b in zip(plain, adapted, strict=True):
        np.testing.assert_allclose(a.privileged_logprobs, b.privileged_logprobs, atol=1e-6)
        assert not np.allclose(a.learner_logprobs, b.learner_logprobs, atol=1e-4)


def test_empty_trace_and_progress(tiny_model_factory):
    requests = [ScoringRequest([1, 2], [3], [4, 5], [])] + make_requests(2, seed=3)
    seen = []
    scores = score_traces(
        tiny_model_factory(), requests, top_n=2, progress=lambda d, t: seen.append((d, t))
    )
    assert scores[0].learner_logprobs.shape == (0,) and scores[0].privileged_top_ids.shape == (0, 2)
    assert seen[-1] == (9, 9)


def test_shortcut_scores_and_summary():
    negative = np.array([-1.0, -0.5, -3.0, -0.1])
    privileged = np.array([-2.0, -0.5, -1.0, -4.1])
    delta = shortcut_scores(negative, privileged)
    np.testing.assert_allclose(delta, [1.0, 0.0, -2.0, 4.0])
    summary = summarise_shortcuts(delta, threshold=0.5)
    assert summary.max == pytest.approx(4.0)
    assert summary.mean_positive == pytest.approx(5.0 / 4)
    assert summary.share_above == pytest.approx(0.5)
    assert summarise_shortcuts(np.array([])).max == 0.0
