"""What-if waypoints on the real embedded model: one prefill under edited waypoints gives the
same log p_NR as the scoring engine, and the page's endpoint returns it."""

from __future__ import annotations

import numpy as np
import pytest
from django.urls import reverse

from expansion.engine.models import load_model
from expansion.engine.pipeline import ExpansionItem, rescore_negative, view_prompts_for
from expansion.engine.prompts import PromptTemplates
from expansion.engine.scoring import ScoringRequest, score_traces
from tests.factories import make_run, make_user

pytestmark = pytest.mark.slow


def test_rescore_matches_the_scoring_engine(embedded_model_dir):
    model, tokenizer = load_model(embedded_model_dir, device="cpu")
    item = ExpansionItem(
        key="k",
        problem="Find $x$ if $2x + 1 = 7$.",
        solution="We have $2x = 6$, so $x = 3$.",
        partial_solution="The final answer is 3. Intermediate results used in the solution might include: $2x = 6$.",
        answer="3",
    )
    response = tokenizer("Subtract 1: 2x = 6. Divide by 2: x = 3.", add_special_tokens=False)[
        "input_ids"
    ]
    prompts = view_prompts_for(
        tokenizer, [item], PromptTemplates(), reasoning=False, max_prompt_tokens=None
    )[0]
    reference = score_traces(
        model,
        [
            ScoringRequest(
                prompts.learner_ids, prompts.privileged_ids, prompts.negative_ids, response
            )
        ],
        top_n=0,
    )[0].negative_logprobs
    mine = rescore_negative(model, tokenizer, item, response)
    assert mine.shape == (len(response),)
    np.testing.assert_allclose(mine, reference, atol=2e-3)
    # Different waypoints change the scores.
    other = ExpansionItem(**{**item.__dict__, "partial_solution": "The final answer is 3."})
    assert not np.allclose(rescore_negative(model, tokenizer, other, response), mine, atol=1e-3)


@pytest.mark.django_db
def test_whatif_endpoint_returns_new_scores(client, embedded_model_dir):
    client.force_login(make_user("reviewer"))
    run = make_run(problems=1, samples=1, tokens=24, model_path=str(embedded_model_dir))
    trace = run.traces.get()
    response = client.post(
        reverse("expansion:whatif", args=[trace.pk]), {"waypoints": "$2x = 6$\n$x = 3$"}
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert len(body["negative_logprobs"]) == 24
    assert body["partial_solution"].endswith("might include: $2x = 6$, $x = 3$.")
    assert set(body["after"]) == {"max", "mean_positive", "share_above"}


@pytest.mark.django_db
def test_whatif_without_the_model_says_so(client):
    client.force_login(make_user("reviewer"))
    run = make_run(problems=1, samples=1, tokens=8, model_path="/no/such/model")
    response = client.post(
        reverse("expansion:whatif", args=[run.traces.get().pk]), {"waypoints": "x"}
    )
    assert response.status_code == 400
    assert "not on this server" in response.json()["error"]
