"""Waypoint suggestions (issue 16, items 4 and 5): whole intermediate results, never the final
answer or a piece of it, each a span of the solution; overlaps with suggested waypoints;
messages that name waypoints as the list shows them."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from curation.services.champ import champ_problems
from curation.services.editor import editor_action_apply
from curation.services.suggestions import waypoints_suggest
from curation.spans import Span, SpanError, add_span, validate_spans
from dailweb.rendering import render_source_with_math
from expansion.engine.answers import answer_alternatives, normalise_answer
from tests.factories import make_user

TELESCOPING = (
    "Each term splits into a difference:\n"
    "$$\\frac{1}{k(k+1)} = \\frac{1}{k} - \\frac{1}{k+1}.$$\n"
    "Summing from $k=1$ to $n$, the sum telescopes:\n"
    "$$\\sum_{k=1}^{n} \\frac{1}{k(k+1)} = 1 - \\frac{1}{n+1} = \\frac{n}{n+1}.$$\n"
    "So with $n = 99$ the sum is $\\frac{99}{100}$."
)
ANSWER = "\\frac{99}{100}"


def _texts(body: str, spans) -> list[str]:
    return [s.text_in(body) for s in spans]


def _contained_in_answer(text: str, answer: str) -> bool:
    return any(
        normalise_answer(text) in normalise_answer(form) for form in answer_alternatives(answer)
    )


def test_telescoping_sum_gives_whole_results_not_fragments():
    spans = waypoints_suggest(body=TELESCOPING, answer=ANSWER)
    assert _texts(TELESCOPING, spans) == [
        "\\frac{1}{k} - \\frac{1}{k+1}",
        "k=1",
        "\\frac{n}{n+1}",
        "n = 99",
    ]
    assert all(s.origin == "suggested" for s in spans)
    # The release's regex stays available by name: it gives the fragments of the issue.
    baseline = waypoints_suggest(body=TELESCOPING, answer=ANSWER, suggester="release-regex")
    assert {"1", "k+1", "n+1", "99", "100"} <= set(_texts(TELESCOPING, baseline))


def test_stated_value_whole_and_answer_never_suggested():
    body = "We find $2x = 6$, so $x = 3$. Hence $y = 2x + 1 = 7$ and the answer is $\\boxed{7}$."
    texts = _texts(body, waypoints_suggest(body=body, answer="7"))
    assert texts == ["6", "x = 3", "y = 2x + 1"]  # `y = … = 7` is cut before the answer


@pytest.mark.parametrize("problem", champ_problems()[:60], ids=lambda p: p.problem_id)
def test_champ_suggestions_are_spans_and_never_the_answer(problem):
    spans = waypoints_suggest(body=problem.solution, answer=problem.answer)
    validate_spans(problem.solution, spans)  # inside the text, disjoint
    for span in spans:
        text = span.text_in(problem.solution)
        assert text == text.strip() and text
        assert not _contained_in_answer(text, problem.answer), (text, problem.answer)


def test_champ_suggestions_are_found_for_most_problems():
    problems = champ_problems()[:60]
    with_suggestions = [p for p in problems if waypoints_suggest(body=p.solution, answer=p.answer)]
    assert len(with_suggestions) >= 45


def test_pane_highlights_exactly_a_mark_inside_a_formula():
    body = "So $y = 2x + 1 = 7$ here."
    start = body.index("2x + 1")
    html = render_source_with_math(body, [(start, start + 6)])
    assert f'class="src mark mark-1" data-start="{start}" data-end="{start + 6}">2x + 1<' in html
    # A mark covering the whole formula still shows it typeset.
    whole = render_source_with_math(body, [(3, body.index(" here"))])
    assert "src-math mark mark-1" in whole


def test_longer_span_replaces_the_suggested_waypoints_it_contains():
    body = "So $y = 2x + 1 = 7$ here, and $z = 4$."
    inner = body.index("2x + 1")
    spans = [
        Span(inner, inner + 6, "suggested"),
        Span(body.index("z = 4"), body.index("z = 4") + 5, "suggested"),
    ]
    outcome = editor_action_apply(
        body=body, answer="", spans=spans, action="add", start=3, end=body.index(" here")
    )
    assert not outcome.error
    assert [(s.text_in(body), s.origin) for s in outcome.spans] == [
        ("$y = 2x + 1 = 7$", "expert"),
        ("z = 4", "suggested"),
    ]
    assert outcome.notices == ["The new waypoint replaces the suggested “2x + 1” inside it."]


def test_refusals_name_waypoints_as_listed_without_doubled_backslashes():
    body = "We get $\\frac{n}{n+1}$ and $x = 3$ then $y$."
    frac = body.index("$\\frac")
    x = body.index("$x = 3$")
    spans = [Span(x, x + 7, "expert"), Span(frac, frac + len("$\\frac{n}{n+1}$"), "expert")]
    with pytest.raises(SpanError) as refused:
        add_span(body, spans, frac + 1, x + 3)
    message = str(refused.value)
    assert "overlaps waypoint 1 “$x = 3$” (expert)" in message
    assert "\\\\" not in message
    with pytest.raises(SpanError, match="overlap") as both:
        validate_spans(body, [spans[1], Span(frac + 2, frac + 6)])
    assert "Waypoints 1 “$\\frac{n}{n+1}$” and 2 “frac”" in str(both.value)
    with pytest.raises(SpanError, match="is already waypoint 2"):
        add_span(body, spans, frac, frac + len("$\\frac{n}{n+1}$"))


@pytest.fixture
def expert(client, db):
    user = make_user("expert", username="gauss")
    client.force_login(user)
    return user


def _preview(client, body, waypoints=(), **extra):
    data = {
        "body": body,
        "answer": ANSWER,
        "statement": "Sum it.",
        "waypoints": json.dumps([list(w) for w in waypoints]),
        "waypoints_body": body,
        **extra,
    }
    return client.post(reverse("curation:editor_preview"), data, HTTP_HX_REQUEST="true")


def test_suggest_says_why_it_adds_nothing_when_expert_waypoints_exist(client, expert):
    start = TELESCOPING.index("$n = 99$")
    marked = [(start, start + 8, "expert")]
    html = _preview(client, TELESCOPING, waypoints=marked, action="suggest").content.decode()
    assert "Suggest adds nothing: this solution has 1 expert waypoint" in html
    assert json.dumps(marked) in html.replace("&quot;", '"')  # the expert's list is kept
    fresh = _preview(client, TELESCOPING, action="suggest").content.decode()
    assert "Suggest adds nothing" not in fresh
    assert "\\frac{n}{n+1}</code>" in fresh  # listed with its exact source


def test_editor_marking_a_formula_replaces_the_suggestion_inside_and_says_so(client, expert):
    body = "So $y = 2x + 1 = 7$ here."
    inner = body.index("2x + 1")
    html = _preview(
        client,
        body,
        waypoints=[(inner, inner + 6, "suggested")],
        action="add",
        start=3,
        end=body.index(" here"),
    ).content.decode()
    assert "replaces the suggested “2x + 1” inside it" in html
    assert json.dumps([[3, body.index(" here"), "expert"]]) in html.replace("&quot;", '"')
