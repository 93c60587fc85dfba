"""Reads for curation: the problem list (constant number of queries whatever the page), a
problem with its current version and waypoints, version history."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from django.db.models import OuterRef, Prefetch, Q, QuerySet, Subquery

from curation.models import Dataset, Problem, SolutionVersion, Waypoint


@dataclass(frozen=True)
class ProblemFilters:
    query: str = ""
    dataset_id: int | None = None
    has_answer: bool | None = None
    waypoint_status: str = ""
    author_id: int | None = None


def problem_list(filters: ProblemFilters) -> QuerySet[Problem]:
    problems = Problem.objects.select_related("dataset", "author").only(
        "id",
        "external_id",
        "statement",
        "answer",
        "updated_at",
        "current_version_number",
        "waypoint_status",
        "dataset__id",
        "dataset__name",
        "dataset__kind",
        "author__id",
        "author__username",
    )
    if filters.query:
        problems = problems.filter(
            Q(statement__icontains=filters.query)
            | Q(external_id__icontains=filters.query)
            | Q(source__icontains=filters.query)
        )
    if filters.dataset_id:
        problems = problems.filter(dataset_id=filters.dataset_id)
    if filters.has_answer is True:
        problems = problems.exclude(answer="")
    elif filters.has_answer is False:
        problems = problems.filter(answer="")
    if filters.waypoint_status:
        problems = problems.filter(waypoint_status=filters.waypoint_status)
    if filters.author_id:
        problems = problems.filter(author_id=filters.author_id)
    return problems.order_by("dataset__name", "external_id_order", "external_id")


def _current_versions(problem_ids: list[int]) -> dict[int, SolutionVersion]:
    current_number = Problem.objects.filter(pk=OuterRef("problem_id")).values(
        "current_version_number"
    )
    versions = (
        SolutionVersion.objects.filter(problem_id__in=problem_ids)
        .filter(number=Subquery(current_number))
        .select_related("author")
        .prefetch_related(
            Prefetch(
                "waypoints",
                queryset=Waypoint.objects.order_by("order"),
                to_attr="ordered_waypoints",
            )
        )
    )
    return {v.problem_id: v for v in versions}


def problems_with_current_versions(problems: Iterable[Problem]) -> list[Problem]:
    """The problems with `current_version` (and its `ordered_waypoints`) attached: 3 queries."""
    problems = list(problems)
    versions: dict[int, SolutionVersion] = {}
    ids = [p.pk for p in problems]
    for start in range(0, len(ids), 500):
        versions.update(_current_versions(ids[start : start + 500]))
    for problem in problems:
        problem.current_version = versions.get(problem.pk)
    return problems


def problem_detail(problem_id: int) -> Problem:
    problem = Problem.objects.select_related("dataset", "author").get(pk=problem_id)
    return problems_with_current_versions([problem])[0]


def solution_version_get(problem: Problem, number: int) -> SolutionVersion:
    return (
        problem.versions.select_related("author")
        .prefetch_related(
            Prefetch(
                "waypoints",
                queryset=Waypoint.objects.order_by("order"),
                to_attr="ordered_waypoints",
            )
        )
        .get(number=number)
    )


def solution_versions(problem: Problem) -> QuerySet[SolutionVersion]:
    return problem.versions.select_related("author").order_by("-number")


def datasets_all() -> QuerySet[Dataset]:
    return Dataset.objects.order_by("name")
