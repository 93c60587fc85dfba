"""Writes on datasets, problems and solution versions (every edit is a new version)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from curation.models import (
    Dataset,
    DatasetKind,
    Problem,
    SolutionVersion,
    Waypoint,
    WaypointOrigin,
    WaypointStatus,
)
from curation.ordering import natural_sort_key
from curation.spans import Span, SpanError, carry_spans, validate_spans
from dailweb.errors import ConflictError, DomainError
from dailweb.roles import Role, user_roles

MAX_STATEMENT_CHARS = 50_000
MAX_SOLUTION_CHARS = 200_000
MAX_ANSWER_CHARS = 2_000


def problem_can_edit(user, problem: Problem) -> bool:
    """Experts edit their own problems; admins edit everything."""
    roles = user_roles(user)
    if Role.ADMIN in roles:
        return True
    return Role.EXPERT in roles and problem.author_id == user.pk


def problem_require_edit(user, problem: Problem) -> None:
    from django.core.exceptions import PermissionDenied

    if not problem_can_edit(user, problem):
        raise PermissionDenied("Only the problem's author or an admin can edit it.")


def _clean_text(value: str, field_name: str, *, required: bool, limit: int) -> str:
    value = (value or "").replace("\r\n", "\n")
    if required and not value.strip():
        raise DomainError(f"The {field_name} is empty.", field_errors={field_name: "required"})
    if len(value) > limit:
        raise DomainError(
            f"The {field_name} is longer than {limit:,} characters.",
            field_errors={field_name: "too long"},
        )
    return value


def _clean_tags(tags: Iterable[str]) -> list[str]:
    return sorted({str(tag).strip() for tag in tags if str(tag).strip()})


@transaction.atomic
def dataset_create(
    *, name: str, kind: str, licence: str = "", description: str = "", created_by=None
) -> Dataset:
    name = (name or "").strip()
    if not name:
        raise DomainError("A dataset needs a name.", field_errors={"name": "required"})
    if kind not in DatasetKind.values:
        raise DomainError(f"Unknown dataset kind {kind!r}.", field_errors={"kind": "invalid"})
    if Dataset.objects.filter(name=name).exists():
        raise ConflictError(
            f"A dataset named {name!r} exists already.", field_errors={"name": "taken"}
        )
    return Dataset.objects.create(
        name=name, kind=kind, licence=licence, description=description, created_by=created_by
    )


def _next_external_id(dataset: Dataset) -> str:
    count = dataset.problems.count()
    while True:
        count += 1
        candidate = f"p{count:04d}"
        if not dataset.problems.filter(external_id=candidate).exists():
            return candidate


def _refresh_summary(problem: Problem) -> None:
    """Keep the problem's denormalised list fields in step with its newest version."""
    version = problem.versions.order_by("-number").first()
    origins = set(version.waypoints.values_list("origin", flat=True)) if version else set()
    if WaypointOrigin.EXPERT in origins:
        status = WaypointStatus.EXPERT
    elif origins:
        status = WaypointStatus.SUGGESTED
    else:
        status = WaypointStatus.NONE
    Problem.objects.filter(pk=problem.pk).update(
        current_version_number=version.number if version else 0,
        waypoint_status=status,
        updated_at=timezone.now(),
    )
    problem.current_version_number = version.number if version else 0
    problem.waypoint_status = status


def _save_waypoints(version: SolutionVersion, spans: Sequence[Span]) -> None:
    try:
        validate_spans(version.body, spans)
    except SpanError as exc:
        raise DomainError(str(exc), field_errors={"waypoints": str(exc)}) from exc
    version.waypoints.all().delete()
    Waypoint.objects.bulk_create(
        Waypoint(version=version, start=s.start, end=s.end, order=i, origin=s.origin)
        for i, s in enumerate(spans)
    )


@transaction.atomic
def problem_create(
    *,
    dataset: Dataset,
    statement: str,
    solution: str,
    answer: str = "",
    external_id: str = "",
    source: str = "",
    tags: Iterable[str] = (),
    author=None,
    waypoints: Sequence[Span] = (),
    note: str = "",
) -> Problem:
    """Create a problem with its first solution version (and waypoints, if given)."""
    statement = _clean_text(statement, "statement", required=True, limit=MAX_STATEMENT_CHARS)
    solution = _clean_text(solution, "solution", required=True, limit=MAX_SOLUTION_CHARS)
    answer = _clean_text(answer or "", "answer", required=False, limit=MAX_ANSWER_CHARS).strip()
    external_id = (external_id or "").strip() or _next_external_id(dataset)
    if len(external_id) > 200:
        raise DomainError("The problem id is longer than 200 characters.")
    try:
        with transaction.atomic():
            problem = Problem.objects.create(
                dataset=dataset,
                external_id=external_id,
                external_id_order=natural_sort_key(external_id),
                statement=statement,
                answer=answer,
                source=(source or "").strip()[:500],
                tags=_clean_tags(tags),
                author=author,
            )
    except IntegrityError as exc:
        raise ConflictError(
            f"Dataset {dataset.name!r} already has a problem with id {external_id!r}.",
            field_errors={"external_id": "taken"},
        ) from exc
    version = SolutionVersion.objects.create(
        problem=problem, number=1, body=solution, answer=answer, author=author, note=note
    )
    _save_waypoints(version, list(waypoints))
    _refresh_summary(problem)
    return problem


@dataclass
class Revision:
    version: SolutionVersion
    created: bool  # False when nothing changed (no new version)
    carried: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _refuse_stale_base(current: SolutionVersion | None, base_version: int | None) -> None:
    """ConflictError when the problem's current version is not the one an edit started from
    (call with the problem row locked)."""
    if base_version is None or current is None or current.number == base_version:
        return
    who = current.author.username if current.author else "an import"
    when = timezone.localtime(current.created_at).strftime("%Y-%m-%d %H:%M %Z")
    raise ConflictError(
        f"While you were editing version {base_version}, {who} saved version "
        f"{current.number} ({when}). Your changes were not saved; they are still in the "
        f"editor. Compare the versions, then save again to make your text version "
        f"{current.number + 1}."
    )


@transaction.atomic
def solution_revise(
    *,
    problem: Problem,
    body: str,
    answer: str | None = None,
    author=None,
    note: str = "",
    waypoints: Sequence[Span] | None = None,
    base_version: int | None = None,
) -> Revision:
    """Save an edited solution as a new version.

    Waypoints: when `waypoints` is given they are used as they are; otherwise each waypoint of
    the previous version is carried forward where its text still occurs, and the ones that
    could not be carried are reported.

    `base_version` is the version number the editor was opened on: if another version was
    saved since, the save is refused (`ConflictError` naming who saved which version when),
    so nobody's edit silently replaces another's. None (the import) skips the check.
    """
    problem = Problem.objects.select_for_update().get(pk=problem.pk)
    body = _clean_text(body, "solution", required=True, limit=MAX_SOLUTION_CHARS)
    if answer is None:
        answer = problem.answer
    else:
        answer = _clean_text(answer, "answer", required=False, limit=MAX_ANSWER_CHARS).strip()
    current = problem.versions.select_related("author").order_by("-number").first()
    _refuse_stale_base(current, base_version)
    old_spans = (
        [Span(w.start, w.end, w.origin) for w in current.waypoints.order_by("order")]
        if current
        else []
    )
    if current and current.body == body and problem.answer == answer and waypoints is None:
        return Revision(version=current, created=False)
    if waypoints is not None:
        spans, dropped = list(waypoints), []
    elif current:
        spans, dropped = carry_spans(current.body, body, old_spans)
    else:
        spans, dropped = [], []
    number = (problem.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    version = SolutionVersion.objects.create(
        problem=problem, number=number, body=body, answer=answer, author=author, note=note
    )
    _save_waypoints(version, spans)
    if answer != problem.answer:
        Problem.objects.filter(pk=problem.pk).update(answer=answer)
        problem.answer = answer
    _refresh_summary(problem)
    return Revision(
        version=version,
        created=True,
        carried=[s.text_in(body) for s in spans],
        dropped=dropped,
    )


@transaction.atomic
def problem_update_details(
    *, problem: Problem, statement: str, source: str = "", tags: Iterable[str] = ()
) -> Problem:
    """Edit the statement, source and tags (the solution has its own versions)."""
    problem.statement = _clean_text(
        statement, "statement", required=True, limit=MAX_STATEMENT_CHARS
    )
    problem.source = (source or "").strip()[:500]
    problem.tags = _clean_tags(tags)
    problem.updated_at = timezone.now()
    problem.save(update_fields=["statement", "source", "tags", "updated_at"])
    return problem


@transaction.atomic
def waypoints_save(
    *, version: SolutionVersion, spans: Sequence[Span], base_version: int | None = None
) -> list[Waypoint]:
    """Replace the waypoints of a version (they are annotations; the body never changes).
    `base_version`: as in `solution_revise` (refused when a newer version exists)."""
    if base_version is not None:
        Problem.objects.select_for_update().filter(pk=version.problem_id).first()
        current = (
            SolutionVersion.objects.filter(problem_id=version.problem_id)
            .select_related("author")
            .order_by("-number")
            .first()
        )
        _refuse_stale_base(current, base_version)
    _save_waypoints(version, list(spans))
    _refresh_summary(version.problem)
    return list(version.waypoints.order_by("order"))
