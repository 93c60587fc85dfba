"""Scores recorded on the way: the fast engine keeps, for every view it consults, what scoring
would compute afterwards (temperature-1 log-prob of the chosen token and top-N alternatives),
and scoring then skips that view. The recorded numbers must be scoring's numbers, whatever the
rollout's temperature, top-k, forbidden tokens, tau or block size (tiny float64 models; the
adapter makes the learner a different view from the privileged one)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from expansion.engine import scoring
from expansion.engine.pipeline import expand_items
from expansion.engine.rollout import RolloutConfig, RolloutRequest
from expansion.engine.rollout_fast import fast_rollout
from expansion.engine.rollout_reference import ReferenceBackend
from expansion.engine.scoring import ScoringRequest, score_traces

from .test_pipeline import ITEMS, same

pytestmark = pytest.mark.usefixtures("single_torch_thread")

TOP_N = 4


def requests(count: int) -> list[RolloutRequest]:
    rng = np.random.default_rng(7)
    out = []
    for n in range(count):
        learner = rng.integers(0, 256, size=int(rng.integers(2, 9))).tolist()
        privileged = learner + rng.integers(0, 256, size=int(rng.integers(3, 15))).tolist()
        out.append(RolloutRequest(learner, privileged, 1000 + n))
    return out


def scoring_requests(reqs, results, *, known: bool) -> list[ScoringRequest]:
    return [
        ScoringRequest(
            r.learner_prompt_ids,
            r.privileged_prompt_ids,
            r.privileged_prompt_ids[:3],  # any third prompt: the negative view is never recorded
            result.token_ids.tolist(),
            known_scores=result.view_scores if known else {},
        )
        for r, result in zip(reqs, results, strict=True)
    ]


CONSULTED = {0.0: {"learner"}, 0.7: {"learner", "privileged"}, 1.0: {"privileged"}}


@pytest.mark.parametrize("tau", sorted(CONSULTED))
@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0, "top_k": 20},
        # at temperature 1 the engine writes -inf over forbidden tokens in the logits
        # themselves: scores must be taken before that
        {"temperature": 1.0, "top_k": 20, "forbidden_token_ids": (3, 17, 40)},
        # a temperature, a narrow top-k, top-p and forbidden tokens change the rollout's own
        # log-probs, never the recorded scores
        {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "forbidden_token_ids": (3, 17, 40)},
    ],
)
def test_recorded_scores_equal_scoring_of_the_same_traces(tiny_model_factory, tau, sampling):
    model = tiny_model_factory(adapter=True)
    reqs = requests(6)
    config = RolloutConfig(
        tau=tau,
        max_new_tokens=20,
        eos_token_ids=(257, 33),
        max_batch_size=4,
        block_size=3,
        seed=5,
        **sampling,
    )
    results = fast_rollout(model, reqs, config, score_top_n=TOP_N)
    scored = score_traces(model, scoring_requests(reqs, results, known=False), top_n=TOP_N)
    assert sum(len(r) for r in results) > 40
    for result, score in zip(results, scored, strict=True):
        assert set(result.view_scores) == CONSULTED[tau]
        for view, recorded in result.view_scores.items():
            expected = getattr(score, f"{view}_logprobs")
            np.testing.assert_allclose(recorded.logprobs, expected, atol=1e-9)
            assert recorded.top_ids.shape == recorded.top_logprobs.shape == (len(result), TOP_N)
            if view == "privileged":
                np.testing.assert_array_equal(recorded.top_ids, score.privileged_top_ids)
                np.testing.assert_allclose(
                    recorded.top_logprobs, score.privileged_top_logprobs, atol=1e-9
                )
        if "forbidden_token_ids" in sampling and "privileged" in result.view_scores:
            # the rollout's own log-probs renormalise without forbidden tokens; scores do not
            own = result.privileged_logprobs
            assert not np.allclose(own, result.view_scores["privileged"].logprobs, atol=1e-6)


@pytest.mark.parametrize("tau", [0.7, 1.0])
def test_no_alternatives_and_empty_traces_have_well_shaped_scores(tiny_model_factory, tau):
    model = tiny_model_factory()
    reqs = requests(4)
    first = fast_rollout(model, reqs, RolloutConfig(tau=tau, max_new_tokens=1), score_top_n=0)
    # every first token declared EOS: traces of length 0
    eos = tuple({int(r.token_ids[0]) for r in first})
    config = RolloutConfig(tau=tau, max_new_tokens=6, eos_token_ids=eos)
    for top_n in (0, 2):
        for result in fast_rollout(model, reqs, config, score_top_n=top_n):
            for scores in result.view_scores.values():
                assert scores.logprobs.shape == (len(result),)
                assert scores.top_ids.shape == scores.top_logprobs.shape == (len(result), top_n)
        assert any(len(r) == 0 for r in fast_rollout(model, reqs, config, score_top_n=top_n))


def test_without_score_top_n_nothing_is_recorded(tiny_model_factory):
    model = tiny_model_factory()
    results = fast_rollout(model, requests(2), RolloutConfig(tau=1.0, max_new_tokens=5))
    assert all(r.view_scores == {} for r in results)
    with pytest.raises(ValueError, match="score_top_n"):
        fast_rollout(model, requests(1), RolloutConfig(max_new_tokens=2), score_top_n=-1)


def spy_on_scored_views(monkeypatch) -> list[str]:
    views: list[str] = []
    real = scoring._score_batch

    def spy(model, reqs, batch, view, top_n):
        views.extend([view] * len(batch))
        return real(model, reqs, batch, view, top_n)

    monkeypatch.setattr(scoring, "_score_batch", spy)
    return views


def test_scoring_takes_known_views_as_they_are_and_reads_only_the_others(
    tiny_model_factory, monkeypatch
):
    model = tiny_model_factory(adapter=True)
    reqs = requests(5)
    results = fast_rollout(model, reqs, RolloutConfig(tau=1.0, max_new_tokens=12), score_top_n=6)
    with_known = scoring_requests(reqs, results, known=True)
    # one request's recorded scores are too short to use: it is scored like any other
    short = results[0].view_scores["privileged"]
    with_known[0] = dataclasses.replace(
        with_known[0],
        known_scores={"privileged": dataclasses.replace(short, logprobs=short.logprobs[:-1])},
    )
    views = spy_on_scored_views(monkeypatch)
    steps: list[tuple[int, int]] = []
    scores = score_traces(model, with_known, top_n=3, progress=lambda d, t: steps.append((d, t)))
    assert views.count("privileged") == 1 and views.count("learner") == views.count("negative") == 5
    assert steps[-1] == (15, 15)
    for result, score in zip(results[1:], scores[1:], strict=True):
        known = result.view_scores["privileged"]
        assert score.privileged_logprobs is known.logprobs
        np.testing.assert_array_equal(score.privileged_top_ids, known.top_ids[:, :3])
    # more alternatives than were recorded: the view is read again
    views.clear()
    score_traces(model, with_known, top_n=7)
    assert views.count("privileged") == 5


@pytest.mark.parametrize("tau", [0.0, 0.6, 1.0])
def test_expansion_scores_only_the_views_the_rollout_did_not_consult(
    tiny_model_factory, tiny_tokenizer, monkeypatch, tau
):
    model = tiny_model_factory(adapter=True)
    config = RolloutConfig(tau=tau, max_new_tokens=10, eos_token_ids=(257,), seed=2)
    from expansion.engine.rollout_fast import TransformersBackend

    views = spy_on_scored_views(monkeypatch)
    fast = expand_items(
        model, tiny_tokenizer, TransformersBackend(model), ITEMS[:3], config=config, samples=2
    )
    assert set(views) == {"learner", "privileged", "negative"} - CONSULTED.get(
        tau, {"learner", "privileged"}
    )
    # the same traces with every view scored afterwards (the reference engine records none)
    views.clear()
    reference = expand_items(
        model, tiny_tokenizer, ReferenceBackend(model), ITEMS[:3], config=config, samples=2
    )
    assert set(views) == {"learner", "privileged", "negative"}
    for a, b in zip(reference, fast, strict=True):
        same(a, b)
