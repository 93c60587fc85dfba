"""The trace page shows the run's pinned s~ with its formulas typeset, as the problem editor
shows it (issue 16, item 7, on the trace page), and the exact prompt text beside it."""

from __future__ import annotations

import html
import re

import pytest
from django.urls import reverse

from curation.services.suggestions import partial_solution_text
from curation.spans import Span
from tests.factories import make_problem, make_run, make_user

pytestmark = pytest.mark.django_db

BODY = "We get $x = 3$, then $y = 2x + 1 = 7$."


def _trace_with_waypoints(*, pinned: str | None = None):
    """A trace whose run problem is pinned to a solution with two waypoints: the formula
    `$x = 3$` whole, and `2x + 1` inside the second formula (bare TeX)."""
    inner = BODY.index("2x + 1")
    spans = [Span(7, 14), Span(inner, inner + 6, "suggested")]
    problem = make_problem(solution=BODY, answer="$7$", waypoints=spans)
    run = make_run(problems=1, samples=1)
    run_problem = run.run_problems.get()
    run_problem.problem = problem
    run_problem.solution_version = problem.versions.get()
    run_problem.answer = problem.answer
    run_problem.partial_solution = (
        pinned
        if pinned is not None
        else partial_solution_text(body=BODY, answer="$7$", spans=spans)
    )
    run_problem.save()
    return run.traces.get()


def _s_tilde(client, trace) -> tuple[str, str]:
    client.force_login(make_user("reviewer"))
    page = client.get(reverse("expansion:trace", args=[trace.pk])).content.decode()
    typeset = re.search(r'data-testid="partial-solution-typeset">(.*?)</p>', page, re.S)
    exact = re.search(r'data-testid="partial-solution">(.*?)</pre>', page, re.S)
    assert typeset is not None and exact is not None
    return typeset.group(1), html.unescape(exact.group(1))


def test_trace_page_typesets_the_pinned_partial_solution(client):
    trace = _trace_with_waypoints()
    typeset, exact = _s_tilde(client, trace)
    assert "$" not in typeset  # no raw TeX delimiters in the s~ line
    assert typeset.count("<math") == 3  # the answer and both waypoints, the bare TeX one too
    assert typeset.startswith("The final answer is ")
    # The exact text the prompt contained is still there, as the prompt has it.
    assert exact == trace.run_problem.partial_solution and "$x = 3$" in exact


def test_an_s_tilde_edited_after_the_run_still_has_its_formulas_typeset(client):
    pinned = (
        "The final answer is $7$. Intermediate results used in the solution might include: $x = 3$."
    )
    trace = _trace_with_waypoints(pinned=pinned)  # differs from what the waypoints give today
    typeset, exact = _s_tilde(client, trace)
    assert "$" not in typeset and typeset.count("<math") == 2
    assert exact == pinned
