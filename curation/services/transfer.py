"""Import and export of problems: JSONL (our schema, which also accepts the paper's e1 field
names), the CHAMP package, and a Parquet file that Hugging Face `datasets` loads.

Schema of one JSONL line (export writes all fields; import needs `problem` and `solution`):

    {"problem_id": "P_1", "problem": "...", "solution": "...", "answer": "239",
     "source": "AIME 1999 #5", "tags": ["algebra"],
     "waypoints": ["x=239", {"start": 10, "end": 15}, [20, 24]],
     "dataset": "aime", "solution_version": 2}

- `waypoints`: strings (found in the solution, first free occurrence), `{"start","end"}`
  objects or `[start, end]` pairs, in order. An exported waypoint carries `text` and `origin`
  too; on import the span wins and the text must match it.
- e1 files (`problem_id`, `problem`, `solution` with the answer in `\\boxed{}`): when
  `answer` is absent in a verifiable dataset, the last `\\boxed{}` of the solution is used.

Re-importing a problem id that the dataset already has UPDATES it: a changed solution or
answer becomes a new solution version (waypoints from the file, else carried forward), a
changed statement/source/tags is updated in place, and an identical line is counted as
unchanged. Nothing is ever duplicated.

An import with any bad line imports nothing, unless the caller explicitly asks to import
only the valid lines; either way every bad line is reported with its line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from curation.models import Dataset, DatasetKind, Problem, WaypointOrigin
from curation.services.problems import problem_create, problem_update_details, solution_revise
from curation.spans import Span, SpanError, spans_for_strings, validate_spans
from dailweb.errors import DomainError
from expansion.engine.answers import last_boxed_answer

TEXT_FIELDS = ("problem", "solution", "answer", "source", "problem_id")


@dataclass(frozen=True)
class LineError:
    line: int
    message: str
    field: str = ""

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.message}"


@dataclass
class ParsedProblem:
    line: int
    problem_id: str
    statement: str
    solution: str
    answer: str
    source: str
    tags: list[str]
    waypoints: list[Span] | None  # None: the line gave no waypoints


@dataclass
class ImportReport:
    total_lines: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    errors: list[LineError] = field(default_factory=list)
    imported: bool = False
    dropped_waypoints: dict[str, list[str]] = field(default_factory=dict)

    @property
    def valid_lines(self) -> int:
        return self.total_lines - len({e.line for e in self.errors})

    def summary(self) -> str:
        if not self.imported:
            return (
                f"Nothing imported: {len({e.line for e in self.errors})} of {self.total_lines} "
                "lines have errors."
            )
        return (
            f"Imported {self.created + self.updated + self.unchanged} problems: "
            f"{self.created} new, {self.updated} updated, {self.unchanged} unchanged"
            + (f"; {len({e.line for e in self.errors})} bad lines skipped." if self.errors else ".")
        )


def upload_limit_bytes() -> int:
    return settings.DAIL_UPLOAD_MAX_MB * 1024 * 1024


def _parse_waypoints(
    raw: Any, solution: str, line: int
) -> tuple[list[Span] | None, list[LineError]]:
    if raw is None:
        return None, []
    if not isinstance(raw, list):
        return None, [LineError(line, "must be a list", "waypoints")]
    spans: list[Span] = []
    errors: list[LineError] = []
    for number, item in enumerate(raw, start=1):
        origin = WaypointOrigin.EXPERT
        if isinstance(item, dict) and item.get("origin") in WaypointOrigin.values:
            origin = item["origin"]
        if isinstance(item, str):
            found, missing = spans_for_strings(solution, [item], origin)
            if missing:
                errors.append(
                    LineError(
                        line,
                        f"waypoint {number} {item!r} does not occur in the solution",
                        "waypoints",
                    )
                )
            spans.extend(found)
            continue
        if isinstance(item, dict) and "start" in item and "end" in item:
            start, end = item["start"], item["end"]
        elif isinstance(item, list | tuple) and len(item) == 2:
            start, end = item
        else:
            errors.append(
                LineError(
                    line,
                    f"waypoint {number} must be a string, {{start,end}} or [start,end]",
                    "waypoints",
                )
            )
            continue
        if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool):
            errors.append(
                LineError(line, f"waypoint {number}: start and end must be integers", "waypoints")
            )
            continue
        span = Span(start, end, origin)
        text = item.get("text") if isinstance(item, dict) else None
        if (
            text is not None
            and 0 <= start < end <= len(solution)
            and span.text_in(solution) != text
        ):
            errors.append(
                LineError(
                    line,
                    f"waypoint {number}: the span {start}–{end} does not hold {text!r}",
                    "waypoints",
                )
            )
            continue
        spans.append(span)
    if not errors:
        try:
            validate_spans(solution, spans)
        except SpanError as exc:
            errors.append(LineError(line, str(exc), "waypoints"))
    return spans, errors


def parse_jsonl(
    data: bytes, *, dataset_kind: str
) -> tuple[list[ParsedProblem], list[LineError], int]:
    """Parse and validate every line; returns (valid problems, errors, number of lines)."""
    problems: list[ParsedProblem] = []
    errors: list[LineError] = []
    seen_ids: dict[str, int] = {}
    lines = data.split(b"\n")
    if lines and lines[-1].strip() == b"":
        lines.pop()
    for number, raw_line in enumerate(lines, start=1):
        if not raw_line.strip():
            continue
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(
                LineError(
                    number, f"not UTF-8 (byte {exc.start}: {raw_line[exc.start : exc.start + 1]!r})"
                )
            )
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            errors.append(LineError(number, f"not valid JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(record, dict):
            errors.append(LineError(number, "a line must be a JSON object"))
            continue
        line_errors: list[LineError] = []
        for name in TEXT_FIELDS:
            value = record.get(name)
            if value is not None and not isinstance(value, str | int) or isinstance(value, bool):
                line_errors.append(
                    LineError(number, f"must be a string, not {type(value).__name__}", name)
                )
        for name in ("problem", "solution"):
            if not isinstance(record.get(name), str) or not record[name].strip():
                line_errors.append(LineError(number, "is missing or empty", name))
        tags = record.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            line_errors.append(LineError(number, "must be a list of strings", "tags"))
        if line_errors:
            errors.extend(line_errors)
            continue
        solution = record["solution"].replace("\r\n", "\n")
        answer = str(record.get("answer") or "").strip()
        if not answer and dataset_kind == DatasetKind.VERIFIABLE:
            answer = last_boxed_answer(solution) or ""
        problem_id = str(record.get("problem_id") or "").strip()
        if problem_id:
            if problem_id in seen_ids:
                errors.append(
                    LineError(
                        number,
                        f"duplicate problem_id {problem_id!r} (first on line {seen_ids[problem_id]})",
                        "problem_id",
                    )
                )
                continue
            seen_ids[problem_id] = number
        waypoints, waypoint_errors = _parse_waypoints(record.get("waypoints"), solution, number)
        if waypoint_errors:
            errors.extend(waypoint_errors)
            continue
        problems.append(
            ParsedProblem(
                line=number,
                problem_id=problem_id,
                statement=record["problem"].replace("\r\n", "\n"),
                solution=solution,
                answer=answer,
                source=str(record.get("source") or ""),
                tags=list(tags),
                waypoints=waypoints,
            )
        )
    return problems, errors, len(lines)


def problem_upsert(dataset: Dataset, item: ParsedProblem, author, report: ImportReport) -> None:
    existing = (
        Problem.objects.filter(dataset=dataset, external_id=item.problem_id).first()
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
    changed = False
    if (existing.statement, existing.source, sorted(existing.tags)) != (
        item.statement,
        item.source.strip(),
        sorted(set(item.tags)),
    ):
        problem_update_details(
            problem=existing, statement=item.statement, source=item.source, tags=item.tags
        )
        changed = True
    current = existing.versions.order_by("-number").first()
    same_waypoints = item.waypoints is None or [
        (w.start, w.end, w.origin) for w in current.waypoints.order_by("order")
    ] == [(s.start, s.end, s.origin) for s in item.waypoints]
    if current.body != item.solution or existing.answer != item.answer or not same_waypoints:
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
        changed = True
    if changed:
        report.updated += 1
    else:
        report.unchanged += 1


def problems_import_jsonl(
    *, dataset: Dataset, data: bytes, author=None, only_valid_lines: bool = False
) -> ImportReport:
    """Import a JSONL file into `dataset` (all or nothing unless `only_valid_lines`)."""
    if len(data) > upload_limit_bytes():
        raise DomainError(
            f"The file is {len(data) / 1e6:.1f} MB; the upload limit is "
            f"{settings.DAIL_UPLOAD_MAX_MB} MB (setting DAIL_UPLOAD_MAX_MB)."
        )
    problems, errors, total = parse_jsonl(data, dataset_kind=dataset.kind)
    report = ImportReport(total_lines=total, errors=errors)
    if errors and not only_valid_lines:
        return report
    with transaction.atomic():
        for item in problems:
            try:
                with transaction.atomic():
                    problem_upsert(dataset, item, author, report)
            except DomainError as exc:
                report.errors.append(LineError(item.line, exc.message))
                if not only_valid_lines:
                    transaction.set_rollback(True)
                    report.created = report.updated = report.unchanged = 0
                    return report
    report.imported = True
    return report


def _export_record(problem: Problem) -> dict[str, Any]:
    version = problem.current_version
    return {
        "problem_id": problem.external_id,
        "problem": problem.statement,
        "solution": version.body,
        "answer": problem.answer,
        "source": problem.source,
        "tags": list(problem.tags),
        "waypoints": [
            {"start": w.start, "end": w.end, "text": w.text_in(version.body), "origin": w.origin}
            for w in version.ordered_waypoints
        ],
        "dataset": problem.dataset.name,
        "solution_version": version.number,
    }


def export_records(problems: Iterable[Problem]) -> list[dict[str, Any]]:
    from curation.selectors import problems_with_current_versions

    return [_export_record(p) for p in problems_with_current_versions(problems)]


def problems_export_jsonl(problems: Iterable[Problem]) -> bytes:
    return "".join(
        json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        for record in export_records(problems)
    ).encode("utf-8")


def problems_export_parquet(problems: Iterable[Problem], path: Path) -> Path:
    """Write a Parquet file that `datasets.load_dataset("parquet", data_files=...)` loads."""
    import datasets

    records = export_records(problems)
    features = datasets.Features(
        {
            "problem_id": datasets.Value("string"),
            "problem": datasets.Value("string"),
            "solution": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "source": datasets.Value("string"),
            "tags": datasets.Sequence(datasets.Value("string")),
            "waypoints": [
                {
                    "start": datasets.Value("int32"),
                    "end": datasets.Value("int32"),
                    "text": datasets.Value("string"),
                    "origin": datasets.Value("string"),
                }
            ],
            "dataset": datasets.Value("string"),
            "solution_version": datasets.Value("int32"),
        }
    )
    datasets.Dataset.from_list(records, features=features).to_parquet(str(path))
    return path
