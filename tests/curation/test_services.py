"""Problems and versioned solutions: creation, revisions, waypoints, rights."""

from __future__ import annotations

import pytest

from curation.models import SolutionVersion, WaypointStatus
from curation.services.problems import (
    dataset_create,
    problem_can_edit,
    problem_create,
    solution_revise,
    waypoints_save,
)
from curation.spans import Span
from dailweb.errors import ConflictError, DomainError
from tests.factories import make_dataset, make_problem, make_user

pytestmark = pytest.mark.django_db

SOLUTION = "Since $2x+1=7$, we get $x=3$. Then $x^2 = 9$. The answer is $9$."


def spans_of(version):
    return [(w.start, w.end, w.origin) for w in version.waypoints.order_by("order")]


def test_create_problem_makes_version_one_with_waypoints():
    author = make_user("expert")
    x3 = SOLUTION.index("$x=3$")
    problem = problem_create(
        dataset=make_dataset(),
        statement="Find $x^2$.",
        solution=SOLUTION,
        answer="9",
        author=author,
        waypoints=[Span(x3, x3 + 5)],
    )
    version = problem.versions.get()
    assert version.number == 1 and version.body == SOLUTION and version.author == author
    assert problem.external_id == "p0001"
    assert problem.current_version_number == 1
    assert problem.waypoint_status == WaypointStatus.EXPERT
    assert [w.text for w in version.waypoints.all()] == ["$x=3$"]


def test_empty_statement_or_solution_is_refused():
    dataset = make_dataset()
    with pytest.raises(DomainError, match="statement is empty"):
        problem_create(dataset=dataset, statement="  ", solution="s")
    with pytest.raises(DomainError, match="solution is empty"):
        problem_create(dataset=dataset, statement="x", solution="")


def test_duplicate_id_in_a_dataset_is_a_conflict():
    dataset = make_dataset()
    problem_create(dataset=dataset, statement="a", solution="b", external_id="P1")
    with pytest.raises(ConflictError, match="already has a problem with id 'P1'"):
        problem_create(dataset=dataset, statement="c", solution="d", external_id="P1")


def test_overlapping_waypoints_are_refused_and_nothing_is_saved():
    dataset = make_dataset()
    with pytest.raises(DomainError, match="overlap"):
        problem_create(
            dataset=dataset, statement="a", solution=SOLUTION, waypoints=[Span(0, 10), Span(5, 12)]
        )
    assert dataset.problems.count() == 0


def test_revision_is_a_new_version_and_carries_waypoints():
    x3 = SOLUTION.index("$x=3$")
    sq = SOLUTION.index("$x^2 = 9$")
    problem = make_problem(
        solution=SOLUTION, answer="9", waypoints=[Span(x3, x3 + 5), Span(sq, sq + 9)]
    )
    new_body = "First, note that " + SOLUTION.replace("$x^2 = 9$", "$x^2 = 3^2 = 9$")
    revision = solution_revise(problem=problem, body=new_body, author=make_user("expert"))
    assert revision.created and revision.version.number == 2
    assert revision.carried == ["$x=3$"]
    assert revision.dropped == ["$x^2 = 9$"]
    v1 = problem.versions.get(number=1)
    assert v1.body == SOLUTION  # a saved version never changes
    assert [w.text for w in v1.waypoints.all()] == ["$x=3$", "$x^2 = 9$"]
    problem.refresh_from_db()
    assert problem.current_version_number == 2


def test_unchanged_revision_makes_no_version():
    problem = make_problem()
    body = problem.versions.get().body
    revision = solution_revise(problem=problem, body=body)
    assert not revision.created
    assert SolutionVersion.objects.filter(problem=problem).count() == 1


def test_changing_only_the_answer_is_a_new_version():
    problem = make_problem(answer="3")
    revision = solution_revise(problem=problem, body=problem.versions.get().body, answer="x = 3")
    assert revision.created and revision.version.answer == "x = 3"
    problem.refresh_from_db()
    assert problem.answer == "x = 3"


def test_waypoints_on_a_version_can_be_replaced():
    problem = make_problem(solution=SOLUTION)
    version = problem.versions.get()
    waypoints_save(version=version, spans=[Span(0, 5, "suggested")])
    problem.refresh_from_db()
    assert spans_of(version) == [(0, 5, "suggested")]
    assert problem.waypoint_status == WaypointStatus.SUGGESTED


def test_rights_experts_edit_their_own_admins_everything():
    owner, other, admin, reviewer = (
        make_user("expert"),
        make_user("expert"),
        make_user("admin"),
        make_user("reviewer"),
    )
    problem = make_problem(author=owner)
    assert problem_can_edit(owner, problem)
    assert not problem_can_edit(other, problem)
    assert problem_can_edit(admin, problem)
    assert not problem_can_edit(reviewer, problem)


def test_dataset_names_are_unique():
    dataset_create(name="AIME", kind="verifiable")
    with pytest.raises(ConflictError):
        dataset_create(name="AIME", kind="proof")
    with pytest.raises(DomainError, match="Unknown dataset kind"):
        dataset_create(name="X", kind="essay")


def test_a_save_based_on_an_older_version_is_refused_naming_who_saved_what():
    problem = make_problem(solution=SOLUTION, answer="9")
    ada = make_user("expert", username="ada")
    solution_revise(problem=problem, body=SOLUTION + " Done.", author=ada, base_version=1)
    with pytest.raises(ConflictError, match=r"version 1, ada saved version 2 \(20\d\d-"):
        solution_revise(problem=problem, body=SOLUTION + " Mine.", base_version=1)
    with pytest.raises(ConflictError, match="ada saved version 2"):
        waypoints_save(version=problem.versions.get(number=1), spans=[Span(0, 5)], base_version=1)
    assert problem.versions.count() == 2
    assert not problem.versions.get(number=1).waypoints.exists()
    # On the current version (after looking at the diff) the save goes through.
    revision = solution_revise(problem=problem, body=SOLUTION + " Mine.", base_version=2)
    assert revision.version.number == 3
    # No base version (the import): no check, as before.
    assert solution_revise(problem=problem, body=SOLUTION).version.number == 4
