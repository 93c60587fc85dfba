"""The expert's pages through the Django test client: list, detail, editor, preview actions,
import, export; query counts; XSS."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from curation.models import Dataset, Problem
from curation.spans import Span
from tests.factories import make_dataset, make_problem, make_user

pytestmark = pytest.mark.django_db

XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss=2">'


@pytest.fixture
def expert(client):
    user = make_user("expert", username="emmy")
    client.force_login(user)
    return user


def bulk_problems(count: int) -> Dataset:
    from curation.models import SolutionVersion

    dataset = make_dataset(name="bulk")
    problems = Problem.objects.bulk_create(
        Problem(
            dataset=dataset,
            external_id=f"q{i:05d}",
            statement=f"Problem {i}",
            answer=str(i),
            current_version_number=1,
        )
        for i in range(count)
    )
    SolutionVersion.objects.bulk_create(
        SolutionVersion(problem=p, number=1, body=f"Solution {p.external_id}") for p in problems
    )
    return dataset


def count_queries(client, url) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return len(queries)


def test_problem_list_queries_do_not_grow_with_page_number_or_size(client, expert, monkeypatch):
    bulk_problems(10_000)
    url = reverse("curation:list")
    first = count_queries(client, url)
    hundredth = count_queries(client, url + "?page=100")
    filtered = count_queries(client, url + "?q=Problem+99&answer=yes&page=2")
    assert first == hundredth == filtered
    import curation.views

    monkeypatch.setattr(curation.views, "PROBLEMS_PER_PAGE", 100)
    assert count_queries(client, url + "?page=7") == first


def test_list_filters(client, expert):
    dataset = make_dataset(name="algebra")
    make_problem(dataset=dataset, statement="Find the area of a triangle", author=expert)
    make_problem(dataset=dataset, statement="Prove something", answer="")
    body = client.get(reverse("curation:list") + "?q=triangle").content.decode()
    assert "Find the area" in body and "Prove something" not in body
    body = client.get(reverse("curation:list") + "?answer=no").content.decode()
    assert "Prove something" in body and "Find the area" not in body
    body = client.get(reverse("curation:list") + "?author=emmy").content.decode()
    assert "Find the area" in body and "Prove something" not in body
    partial = client.get(
        reverse("curation:list") + "?q=Prove", HTTP_HX_REQUEST="true"
    ).content.decode()
    assert "<html" not in partial and "Prove something" in partial


def test_detail_shows_rendered_math_waypoints_partial_solution_and_prompts(client, expert):
    problem = make_problem(author=expert, waypoints=[Span(38, 45)])
    body = client.get(reverse("curation:detail", args=[problem.pk])).content.decode()
    assert "<math" in body  # KaTeX rendered on the server
    assert (
        "The final answer is 3. Intermediate results used in the solution might include: $x = 3$."
        in body
    )
    assert "Reference Solution(s)" in body  # the privileged prompt
    assert "Begin your step-by-step thinking process." in body


def test_xss_in_every_text_field_is_shown_as_text(client, expert):
    problem = make_problem(
        author=expert, statement=XSS, solution=f"Look: {XSS} and $x$", answer=XSS
    )
    for url in (
        reverse("curation:detail", args=[problem.pk]),
        reverse("curation:edit", args=[problem.pk]),
        reverse("curation:list"),
        reverse("curation:versions", args=[problem.pk]),
    ):
        body = client.get(url).content.decode()
        assert "<script>window.__xss" not in body, url
        assert "<img src=x" not in body, url
        assert "&lt;script&gt;" in body, url


def test_editor_save_creates_version_two_and_carries_waypoints(client, expert):
    problem = make_problem(author=expert, waypoints=[Span(38, 45)])
    v1 = problem.versions.get()
    new_body = "Note first. " + v1.body
    response = client.post(
        reverse("curation:edit", args=[problem.pk]),
        {
            "body": new_body,
            "answer": "3",
            "note": "added a note",
            "waypoints": json.dumps([[38, 45, "expert"]]),
            "waypoints_body": v1.body,
        },
    )
    assert response.status_code == 302
    v2 = problem.versions.get(number=2)
    assert v2.body == new_body and v2.note == "added a note"
    assert [w.text for w in v2.waypoints.all()] == ["$x = 3$"]


def test_editor_saves_waypoints_only_on_the_same_version(client, expert):
    problem = make_problem(author=expert)
    body = problem.versions.get().body
    response = client.post(
        reverse("curation:edit", args=[problem.pk]),
        {
            "body": body,
            "answer": "3",
            "waypoints": json.dumps([[3, 15, "expert"]]),
            "waypoints_body": body,
        },
    )
    assert response.status_code == 302
    assert problem.versions.count() == 1
    assert problem.versions.get().waypoints.count() == 1


def test_other_experts_cannot_edit(client, expert):
    problem = make_problem(author=make_user("expert"))
    assert client.get(reverse("curation:edit", args=[problem.pk])).status_code == 403
    assert (
        client.post(reverse("curation:edit", args=[problem.pk]), {"body": "x"}).status_code == 403
    )
    assert problem.versions.count() == 1


def _preview(client, body, waypoints=(), marked_on=None, **extra):
    data = {
        "body": body,
        "answer": "3",
        "statement": "Find x.",
        "waypoints": json.dumps([list(w) for w in waypoints]),
        "waypoints_body": marked_on if marked_on is not None else body,
        **extra,
    }
    return client.post(reverse("curation:editor_preview"), data, HTTP_HX_REQUEST="true")


def test_preview_marks_a_selection_and_updates_partial_solution(client, expert):
    body = "So $2x = 6$ and then $x = 3$."
    start = body.index("$2x = 6$")
    response = _preview(client, body, action="add", start=start, end=start + 8)
    html = response.content.decode()
    assert response.status_code == 200
    assert "Intermediate results used in the solution might include: $2x = 6$." in html
    assert 'id="id_waypoints"' in html and json.dumps(
        [[start, start + 8, "expert"]]
    ) in html.replace("&quot;", '"')


def test_preview_refuses_overlapping_selection_with_message(client, expert):
    body = "So $2x = 6$ and then $x = 3$."
    html = _preview(
        client, body, waypoints=[(3, 11, "expert")], action="add", start=5, end=15
    ).content.decode()
    assert "overlap" in html


def test_preview_carries_waypoints_when_the_text_changes(client, expert):
    old = "So $2x = 6$ and then $x = 3$."
    new = "Hence: " + old
    html = _preview(client, new, waypoints=[(3, 11, "expert")], marked_on=old).content.decode()
    assert "$2x = 6$." in html
    assert json.dumps([[10, 18, "expert"]]) in html.replace("&quot;", '"')


def test_preview_suggests_waypoints_and_shows_latex_errors(client, expert):
    html = _preview(
        client, r"We get $x = 12.5$ and $\frac{1$ oops", action="suggest"
    ).content.decode()
    assert "12.5" in html and "suggested" in html
    assert "KaTeX cannot parse 1 formula" in html


def test_create_problem_through_the_form(client, expert):
    dataset = make_dataset()
    response = client.post(
        reverse("curation:create"),
        {
            "dataset": dataset.pk,
            "statement": "Find $y$.",
            "body": "Since $y=2$.",
            "answer": "2",
            "tags": "a, b",
        },
    )
    assert response.status_code == 302
    problem = Problem.objects.get(dataset=dataset)
    assert problem.author == expert and problem.tags == ["a", "b"]


def test_reviewer_reads_but_cannot_create(client):
    client.force_login(make_user("reviewer"))
    problem = make_problem()
    assert client.get(reverse("curation:detail", args=[problem.pk])).status_code == 200
    assert client.get(reverse("curation:create")).status_code == 403


def test_import_page_reports_bad_lines_and_imports_nothing(client, expert):
    from django.core.files.uploadedfile import SimpleUploadedFile

    data = b'{"problem": "p", "solution": "s"}\n{oops\n'
    response = client.post(
        reverse("curation:import"),
        {
            "file": SimpleUploadedFile("x.jsonl", data),
            "new_dataset_name": "fresh",
            "new_dataset_kind": "proof",
        },
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert "Nothing imported" in html and "<td>2</td>" in html
    assert Problem.objects.count() == 0


def test_export_downloads_jsonl(client, expert):
    make_problem(statement="Exported one")
    response = client.get(reverse("curation:export") + "?format=jsonl")
    assert response.status_code == 200
    lines = response.content.decode().splitlines()
    assert json.loads(lines[0])["problem"] == "Exported one"


def test_versions_page_shows_a_diff(client, expert):
    from curation.services.problems import solution_revise

    problem = make_problem(author=expert)
    solution_revise(problem=problem, body=problem.versions.get().body + "\nAn added line.")
    html = client.get(reverse("curation:versions", args=[problem.pk])).content.decode()
    assert "An&nbsp;added&nbsp;line." in html and "diff_add" in html


def test_a_stale_editor_save_is_refused_with_a_diff_link_and_keeps_what_was_typed(client, expert):
    problem = make_problem(author=expert, waypoints=[Span(38, 45)])
    v1 = problem.versions.get()
    edit_url = reverse("curation:edit", args=[problem.pk])
    opened = client.get(edit_url).content.decode()
    assert 'name="base_version" value="1"' in opened
    # Someone else (an admin) saves version 2 meanwhile.
    other = make_user("admin", username="otto")
    from curation.services.problems import solution_revise

    solution_revise(problem=problem, body=v1.body + " Checked.", author=other, base_version=1)

    mine = "My own careful rewrite. " + v1.body
    waypoints = json.dumps([[62, 69, "expert"]])
    response = client.post(
        edit_url,
        {
            "body": mine,
            "answer": "3",
            "note": "my note",
            "waypoints": waypoints,
            "waypoints_body": mine,
            "base_version": "1",
        },
    )
    assert response.status_code == 409
    html = response.content.decode()
    assert "otto saved version 2" in html and "were not saved" in html
    diff_url = reverse("curation:versions", args=[problem.pk]) + "?a=1&amp;b=2"
    assert f'href="{diff_url}"' in html
    assert problem.versions.count() == 2  # nothing silently became version 3
    # Nothing typed is lost: text, note and waypoints come back; the next save is on v2.
    assert "My own careful rewrite." in html and 'value="my note"' in html
    assert 'value="[[62, 69, &quot;expert&quot;]]"' in html  # the marked waypoint
    assert 'name="base_version" value="2"' in html
    assert client.get(diff_url.replace("&amp;", "&")).status_code == 200

    again = client.post(
        edit_url,
        {"body": mine, "answer": "3", "waypoints": waypoints, "waypoints_body": mine,
         "base_version": "2"},
    )  # fmt: skip
    assert again.status_code == 302
    assert problem.versions.get(number=3).body == mine


def test_statement_source_and_tags_are_discoverably_editable(client, expert):
    """Issue 16.9: the problem page links its author to the details form on the editor page,
    the editor says where that form is, and the form there saves the statement, source, tags."""
    problem = make_problem(author=expert)
    detail = client.get(reverse("curation:detail", args=[problem.pk])).content.decode()
    link = f'href="{reverse("curation:edit", args=[problem.pk])}#details"'
    assert link in detail and "Edit statement, source &amp; tags" in detail
    editor = client.get(reverse("curation:edit", args=[problem.pk])).content.decode()
    assert 'id="details"' in editor
    assert 'data-testid="details-pointer"' in editor and 'href="#details"' in editor
    assert f'action="{reverse("curation:details", args=[problem.pk])}"' in editor
    client.post(
        reverse("curation:details", args=[problem.pk]),
        {"statement": "Find $y$.", "source": "AMC 2001", "tags": "algebra, easy"},
    )
    problem.refresh_from_db()
    assert (problem.statement, problem.source, problem.tags) == (
        "Find $y$.",
        "AMC 2001",
        ["algebra", "easy"],
    )


def test_readers_get_no_details_link(client):
    """The link is offered only to those who may edit (a reviewer reads the problem)."""
    problem = make_problem(author=make_user("expert"))
    client.force_login(make_user("reviewer"))
    detail = client.get(reverse("curation:detail", args=[problem.pk])).content.decode()
    assert "#details" not in detail and "Edit statement" not in detail
