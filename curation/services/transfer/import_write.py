"""The database stage of an import: rights and existing problems, then the writes.

Rights are the editor's (`problem_can_edit`): a line that would change a problem the importer
may not edit is a bad line; creating problems is every expert's right, and a line identical to
the stored problem is "unchanged" and allowed for anyone (re-importing a whole export must not
fail on other people's problems that it leaves as they are). `author=None` is the system (the
CLI without `--as`, the CHAMP loader): every right, no author.

Writes upsert by problem id, so a line written twice is "unchanged" the second time:
- `write_all`: one transaction (an import of up to DAIL_IMPORT_INLINE_MAX_LINES lines);
- `write_in_batches`: one transaction per DAIL_IMPORT_BATCH_LINES lines, a callback inside
  each batch's transaction (a job records its progress there, so the progress it keeps is
  exactly what was committed) and a stop check between batches.
Everything is checked before the first write, so a write can only be refused by a change made
meanwhile by someone else; the line is then reported like any other bad line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from django.conf import settings
from django.db import transaction

from curation.models import Dataset, Problem
from curation.selectors import problems_with_current_versions
from curation.services.problems import (
    dataset_create,
    problem_can_edit,
    problem_create,
    problem_update_details,
    solution_revise,
)
from curation.services.transfer.jsonl_read import LineError, ParsedFile, ParsedProblem
from curation.spans import Span
from dailweb.errors import DomainError
from dailweb.roles import Role, has_role

DETAIL_FIELDS = ("statement", "source", "tags")
SOLUTION_FIELDS = ("solution", "answer", "waypoints")
MAX_ERRORS_KEPT = 1000  # in a job's stored result; the count is always exact


@dataclass(frozen=True)
class NewDataset:
    """A dataset the import creates, only when the import goes ahead."""

    name: str
    kind: str
    licence: str = ""


@dataclass
class ImportReport:
    total_lines: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[LineError] = field(default_factory=list)
    imported: bool = False
    dropped_waypoints: dict[str, list[str]] = field(default_factory=dict)
    to_write: int = 0  # lines that passed every check
    dataset_name: str = ""
    job_id: int | None = None  # the write was handed to this job
    resumed_lines: int = 0  # lines written by an earlier attempt of the job (skipped)
    stopped_at_line: int = 0  # batched writes: a line refused while writing stopped it
    cancelled: bool = False  # batched writes: stopped between batches when asked
    errors_total: int = 0  # set when a stored report keeps only the first errors

    @property
    def bad_lines(self) -> int:
        return max(self.errors_total, len({e.line for e in self.errors}))

    @property
    def valid_lines(self) -> int:
        return self.total_lines - self.bad_lines

    def add_counts(self, other: ImportReport) -> None:
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.dropped_waypoints.update(other.dropped_waypoints)

    def summary(self) -> str:
        counts = f"{self.created} new, {self.updated} updated, {self.unchanged} unchanged"
        skipped = f"; {self.bad_lines} bad lines skipped" if self.errors else ""
        if self.job_id and not self.imported and not self.cancelled and not self.stopped_at_line:
            return (
                f"Checked {self.total_lines} lines: {self.to_write} to import{skipped}. "
                f"The import runs as job #{self.job_id}."
            )
        if self.stopped_at_line:
            return (
                f"Stopped at line {self.stopped_at_line} (see its error); the lines before it "
                f"were kept ({counts}). Fix that line and import the file again: nothing is "
                "duplicated."
            )
        if self.cancelled:
            return f"Cancelled between batches; what was written so far is kept ({counts})."
        if not self.imported:
            return f"Nothing imported: {self.bad_lines} of {self.total_lines} lines have errors."
        resumed = (
            f" ({self.resumed_lines} lines were written by an earlier attempt)"
            if self.resumed_lines
            else ""
        )
        total = self.created + self.updated + self.unchanged
        return f"Imported {total} problems: {counts}{skipped}{resumed}."

    def text_lines(self) -> list[str]:
        """The report as the command line prints it: every bad line, then the summary."""
        lines = [str(error) for error in self.errors]
        if self.errors_total > len(self.errors):
            lines.append(f"… and {self.errors_total - len(self.errors)} more bad lines")
        return [*lines, self.summary()]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = [asdict(e) for e in self.errors[:MAX_ERRORS_KEPT]]
        data["errors_total"] = self.bad_lines if len(self.errors) > MAX_ERRORS_KEPT else 0
        data["summary"] = self.summary()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImportReport:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        known["errors"] = [LineError(**e) for e in data.get("errors", [])]
        return cls(**known)


def import_require_right(author) -> None:
    """Importing is for experts and admins (None: the system)."""
    if author is not None and not has_role(author, Role.EXPERT, Role.ADMIN):
        raise DomainError(
            f"{author.get_username()} may not import problems: importing needs the expert or "
            "admin role."
        )


def new_dataset_check(new: NewDataset) -> None:
    """`dataset_create`'s own checks (name given and free, kind known), run before anything
    is written: created and rolled back at once."""
    with transaction.atomic():
        dataset_create(name=new.name, kind=new.kind, licence=new.licence)
        transaction.set_rollback(True)


def _may_edit(author, problem: Problem) -> bool:
    return author is None or problem_can_edit(author, problem)


def problem_changes(
    problem: Problem, body: str, spans: list[Span], item: ParsedProblem
) -> list[str]:
    """What the line would change in the stored problem ([] when it is identical)."""
    changes = []
    if problem.statement != item.statement:
        changes.append("statement")
    if problem.source != item.source.strip():
        changes.append("source")
    if sorted(problem.tags) != sorted({t.strip() for t in item.tags if t.strip()}):
        changes.append("tags")
    if body != item.solution:
        changes.append("solution")
    if problem.answer != item.answer:
        changes.append("answer")
    if item.waypoints is not None and [(s.start, s.end, s.origin) for s in spans] != [
        (s.start, s.end, s.origin) for s in item.waypoints
    ]:
        changes.append("waypoints")
    return changes


def _refusal(problem: Problem, changes: list[str]) -> str:
    owner = (
        f"belongs to {problem.author.get_username()}"
        if problem.author
        else "has no author (the system loaded it)"
    )
    return (
        f"problem {problem.external_id!r} {owner}; only its author or an admin may change it, "
        f"and this line changes its {', '.join(changes)}"
    )


def _current_state(problem: Problem, version) -> tuple[str, list[Span]]:
    if version is None:
        return "", []
    waypoints = getattr(version, "ordered_waypoints", None)
    if waypoints is None:
        waypoints = list(version.waypoints.order_by("order"))
    return version.body, [Span(w.start, w.end, w.origin) for w in waypoints]


def import_check(
    parsed: ParsedFile, *, dataset: Dataset | None, author
) -> tuple[ImportReport, list[ParsedProblem]]:
    """The database stage, reading only: every line that would change a problem the
    importer may not edit becomes a bad line. Returns the report so far and the lines to write."""
    report = ImportReport(total_lines=parsed.total_lines, errors=list(parsed.errors))
    items = parsed.problems
    if dataset is not None:
        report.dataset_name = dataset.name
        ids = [item.problem_id for item in items if item.problem_id]
        existing: dict[str, Problem] = {}
        for start in range(0, len(ids), 500):
            chunk = Problem.objects.filter(
                dataset=dataset, external_id__in=ids[start : start + 500]
            ).select_related("author")
            existing.update((problem.external_id, problem) for problem in chunk)
        problems_with_current_versions(existing.values())
        allowed = []
        for item in items:
            problem = existing.get(item.problem_id) if item.problem_id else None
            if problem is not None and not _may_edit(author, problem):
                body, spans = _current_state(problem, problem.current_version)
                changes = problem_changes(problem, body, spans, item)
                if changes:
                    report.errors.append(
                        LineError(item.line, _refusal(problem, changes), "problem_id")
                    )
                    continue
            allowed.append(item)
        items = allowed
    report.errors.sort(key=lambda error: error.line)
    report.to_write = len(items)
    return report, items


def problem_upsert(
    dataset: Dataset,
    item: ParsedProblem,
    author,
    report: ImportReport,
    *,
    enforce_rights: bool = False,
) -> None:
    """Create the problem, or update the one with its id (counted as new / updated /
    unchanged in `report`). With `enforce_rights`, refuses (DomainError) to change a problem
    that `author` may not edit."""
    existing = (
        Problem.objects.filter(dataset=dataset, external_id=item.problem_id)
        .select_related("author")
        .first()
        if item.problem_id
        else None
    )
    if existing is None:
        problem_create(
            dataset=dataset,
            statement=item.statement,
            solution=item.solution,
            answer=item.answer,
            external_id=item.problem_id,
            source=item.source,
            tags=item.tags,
            author=author,
            waypoints=item.waypoints or [],
            note="imported",
        )
        report.created += 1
        return
    body, spans = _current_state(existing, existing.versions.order_by("-number").first())
    changes = problem_changes(existing, body, spans, item)
    if changes and enforce_rights and not _may_edit(author, existing):
        raise DomainError(_refusal(existing, changes))
    if set(changes) & set(DETAIL_FIELDS):
        problem_update_details(
            problem=existing, statement=item.statement, source=item.source, tags=item.tags
        )
    if set(changes) & set(SOLUTION_FIELDS):
        revision = solution_revise(
            problem=existing,
            body=item.solution,
            answer=item.answer,
            author=author,
            note="re-imported",
            waypoints=item.waypoints,
        )
        if revision.dropped:
            report.dropped_waypoints[item.problem_id] = revision.dropped
    if changes:
        report.updated += 1
    else:
        report.unchanged += 1


def import_dataset(dataset: Dataset | None, new: NewDataset | None, author) -> Dataset:
    """The dataset to write into: the given one, or the new one, created now."""
    if dataset is not None:
        return dataset
    assert new is not None
    return dataset_create(name=new.name, kind=new.kind, licence=new.licence, created_by=author)


def write_all(
    *,
    items: Iterable[ParsedProblem],
    dataset: Dataset | None,
    new_dataset: NewDataset | None,
    author,
    only_valid_lines: bool,
    report: ImportReport,
) -> None:
    """Write in one transaction (the new dataset included): all or nothing, unless
    `only_valid_lines`, where a line refused while writing is skipped and reported."""
    counts = ImportReport()
    with transaction.atomic():
        target = import_dataset(dataset, new_dataset, author)
        for item in items:
            try:
                with transaction.atomic():
                    problem_upsert(target, item, author, counts, enforce_rights=True)
            except DomainError as exc:
                report.errors.append(LineError(item.line, exc.message))
                if not only_valid_lines:
                    transaction.set_rollback(True)
                    report.errors.sort(key=lambda error: error.line)
                    return
    report.dataset_name = target.name
    report.add_counts(counts)
    report.errors.sort(key=lambda error: error.line)
    report.imported = True


def batch_lines() -> int:
    return max(1, int(settings.DAIL_IMPORT_BATCH_LINES))


def write_in_batches(
    *,
    items: list[ParsedProblem],
    dataset: Dataset,
    author,
    only_valid_lines: bool,
    report: ImportReport,
    on_batch_committed: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Write one transaction per batch of lines. `on_batch_committed(done_lines, total_lines)`
    runs inside each batch's transaction; `should_stop()` is asked before each batch.
    A line refused while writing stops the import (all or nothing) or is skipped
    (`only_valid_lines`); batches committed before are kept either way."""
    size = batch_lines()
    report.dataset_name = dataset.name
    for start in range(0, len(items), size):
        if should_stop is not None and should_stop():
            report.cancelled = True
            break
        batch = items[start : start + size]
        last = start + size >= len(items)
        done = report.total_lines if last else batch[-1].line
        counts, refused = ImportReport(), []
        with transaction.atomic():
            for item in batch:
                try:
                    with transaction.atomic():
                        problem_upsert(dataset, item, author, counts, enforce_rights=True)
                except DomainError as exc:
                    refused.append(LineError(item.line, exc.message))
                    if not only_valid_lines:
                        transaction.set_rollback(True)
                        break
            else:
                if on_batch_committed is not None:
                    on_batch_committed(done, report.total_lines)
        report.errors.extend(refused)
        if refused and not only_valid_lines:
            report.stopped_at_line = refused[0].line
            break
        report.add_counts(counts)
    report.errors.sort(key=lambda error: error.line)
    report.imported = not (report.cancelled or report.stopped_at_line)
