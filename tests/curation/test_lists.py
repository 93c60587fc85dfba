"""Lists (issue 16, item 7): formulas typeset in the problem list, waypoint lists and s~;
problem ids in natural order in lists and in a run's `--limit` selection; shortcut spans
listed with their text; the Runs link for reviewers; `/favicon.ico`."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from curation.models import Problem
from curation.services.problems import problem_create
from curation.spans import Span
from expansion.engine.trace_format import decode_trace
from expansion.services import review
from expansion.services.runs import run_problems_select
from tests.factories import make_dataset, make_problem, make_run, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def expert(client):
    user = make_user("expert", username="hilbert")
    client.force_login(user)
    return user


def test_problem_list_typesets_formulas(client, expert):
    make_problem(author=expert, statement="Find $x^2$ when $x = 3$, and the cost is \\$5.")
    html = client.get(reverse("curation:list")).content.decode()
    cell = re.search(r'<td class="statement-cell">(.*?)</td>', html, re.S).group(1)
    assert cell.count("<math") == 2 and "$x^2$" not in cell
    assert "$5" in cell  # an escaped dollar stays a dollar


def test_problem_list_excerpt_never_cuts_a_formula(client, expert):
    make_problem(author=expert, statement="A" * 130 + " $\\frac{a+b}{c+d} = 1$ and more text.")
    html = client.get(reverse("curation:list")).content.decode()
    cell = re.search(r'<td class="statement-cell">(.*?)</td>', html, re.S).group(1)
    assert "<math" in cell and "…" in cell and "\\frac" not in cell.split("<math")[0]


def _ids_on_page(html: str) -> list[str]:
    return re.findall(r'<td><a href="/problems/\d+/">([^<]+)</a></td>', html)


def test_problem_ids_sort_naturally_in_the_list_and_in_a_runs_limit(client, expert):
    dataset = make_dataset(name="Natural")
    for external_id in ["10", "2", "1", "11", "p-9", "p-10", "3"]:
        problem_create(
            dataset=dataset,
            statement="Find $x$.",
            solution="So $x = 1$.",
            answer="1",
            external_id=external_id,
            author=expert,
        )
    html = client.get(reverse("curation:list"), {"dataset": dataset.pk}).content.decode()
    assert _ids_on_page(html) == ["1", "2", "3", "10", "11", "p-9", "p-10"]
    # A run's selection (the launch form and `launch_expansion --limit`) uses the same order.
    chosen = run_problems_select(dataset=dataset, limit=4)
    assert [Problem.objects.get(pk=pk).external_id for pk in chosen] == ["1", "2", "3", "10"]


def test_waypoints_and_partial_solution_are_typeset(client, expert):
    body = "We get $x = 3$, then $y = 2x + 1 = 7$."
    inner = body.index("2x + 1")
    problem = make_problem(
        author=expert,
        solution=body,
        answer="7",
        waypoints=[Span(7, 14), Span(inner, inner + 6, "suggested")],
    )
    html = client.get(reverse("curation:detail", args=[problem.pk])).content.decode()
    items = re.findall(r'<span class="wp-typeset">(.*?)</span> <code class="wp-source">', html)
    assert len(items) == 2 and all("<math" in item for item in items)
    typeset = re.search(r'data-testid="partial-solution-typeset">(.*?)</p>', html, re.S).group(1)
    assert typeset.count("<math") == 2  # both waypoints; the answer 7 is plain text
    assert typeset.startswith("The final answer is 7. Intermediate results")


def test_shortcut_spans_are_listed_with_their_text(client):
    user = make_user("reviewer", username="rev-lists")
    client.force_login(user)
    run = make_run(problems=1, samples=1, tokens=20)
    trace = run.traces.get()
    review.shortcut_span_add(
        trace_id=trace.pk, reviewer=user, start_token=2, end_token=6, note="jumps", tokens=20
    )
    arrays = decode_trace(bytes(trace.data))
    expected = arrays.text[int(arrays.char_starts[2]) : int(arrays.char_ends[5])]
    html = client.get(reverse("expansion:trace", args=[trace.pk])).content.decode()
    assert f'tokens 2–5 <q class="span-text">{expected}</q></button>' in html


def test_reviewers_see_the_runs_link_they_may_open(client):
    client.force_login(make_user("reviewer", username="rev-nav"))
    html = client.get(reverse("home")).content.decode()
    nav = re.search(r'<nav aria-label="Main">(.*?)</nav>', html, re.S).group(1)
    assert f'href="{reverse("expansion:runs")}"' in nav
    assert client.get(reverse("expansion:runs")).status_code == 200


def test_favicon_is_served(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 302
    icon = client.get(response["Location"])
    assert icon.status_code == 200
    assert b"<svg" in b"".join(icon.streaming_content if icon.streaming else [icon.content])
