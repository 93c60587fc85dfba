"""Reading a JSONL import file into checked problems: the file stage, without the database.

Every line is decoded and checked on its own; a bad line gets exactly one `LineError` that
names every problem the line has (the first few, when there are many), so a report has one
entry per bad line. The module knows nothing of datasets' contents or of who imports: rights
and existing problems are the database stage's (`jsonl_import`).

Decisions, each for a file someone may have made carelessly or with intent:
- A UTF-8 byte order mark at the start of the file is skipped. Lines are split at `\\n`
  only (JSON strings may hold U+2028 and friends); a `\\r` before it (CRLF files) is JSON
  white space. Bytes that are not UTF-8 refuse the line, naming the byte's column.
- Numbers keep their text: `"answer": 0` is the answer `0`, `1.50` stays `1.50`, and a
  5,000-digit number is never turned into a Python int. NaN and Infinity are not JSON.
- Duplicate keys in an object, nesting deeper than Python's parser allows, unpaired
  surrogates (`"\\ud800"`) and NUL characters (neither can be stored) refuse the line.
- Line breaks inside the solution are stored as `\\n`, as the editor stores them. Waypoint
  offsets in the file refer to the solution as written in the file, so each `\\r\\n` before
  an offset moves it back by one; strings and `text` are compared after the same change.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass
from typing import Any

from curation.models import DatasetKind, Problem, WaypointOrigin
from curation.services.problems import (
    MAX_ANSWER_CHARS,
    MAX_SOLUTION_CHARS,
    MAX_STATEMENT_CHARS,
)
from curation.spans import Span, SpanError, validate_spans
from dailweb.errors import DomainError
from expansion.engine.answers import last_boxed_answer

# Limits of each field: the model's column sizes, the services' text limits, and the editor's
# answer field (2,000 characters); tags have no column size, so these are ours.
MAX_PROBLEM_ID_CHARS = Problem._meta.get_field("external_id").max_length
MAX_SOURCE_CHARS = Problem._meta.get_field("source").max_length
MAX_TAGS = 50
MAX_TAG_CHARS = 100
MAX_ISSUES_SHOWN = 5  # per line; the rest are counted
MAX_OFFSET_DIGITS = 12  # no solution is that long; longer numbers are refused before int()

EMPTY_FILE_MESSAGE = "The file is empty: it has no lines to import."
_BOM = b"\xef\xbb\xbf"
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True)
class LineError:
    """One bad line. `field` names the field when the line has one problem in one field."""

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
class ParsedFile:
    problems: list[ParsedProblem]
    errors: list[LineError]
    total_lines: int


@dataclass(frozen=True)
class JsonNumber:
    """A JSON number as written in the file."""

    text: str
    whole: bool  # written without a fraction or an exponent


class _LineRefused(ValueError):
    """The line cannot be read at all; the message says why."""


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _LineRefused(f"the key {_quote(key)} appears twice in one object")
        record[key] = value
    return record


def _refuse_constant(name: str) -> Any:
    raise _LineRefused(f"not valid JSON: {name} is not a JSON number")


def _decode(text: str) -> Any:
    try:
        return json.loads(
            text,
            parse_int=lambda digits: JsonNumber(digits, True),
            parse_float=lambda digits: JsonNumber(digits, False),
            parse_constant=_refuse_constant,
            object_pairs_hook=_pairs_without_duplicates,
        )
    except json.JSONDecodeError as exc:
        # Some of json's messages end in "at" ("Unterminated string starting at").
        reason = exc.msg.removesuffix(" at")
        raise _LineRefused(f"not valid JSON: {reason} at column {exc.colno}") from None
    except RecursionError:
        raise _LineRefused("not valid JSON here: nested too deeply") from None


def _quote(text: str, limit: int = 60) -> str:
    """User text for a message: repr escapes unpaired surrogates and control characters, so
    a message can always be shown and stored."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, JsonNumber):
        return "a number"
    if isinstance(value, bool):
        return "true/false"
    return "null"


def _unstorable(text: str) -> str:
    """Why `text` cannot be stored, or ''."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return ""
    position = found.start() + 1
    if found.group() == "\x00":
        return f"contains a NUL character (\\u0000) at character {position}, which cannot be stored"
    return (
        f"contains an unpaired surrogate ({found.group().encode('unicode_escape').decode()}) at "
        f"character {position}, which is not valid Unicode"
    )


class _Issues:
    """The problems found on one line, as (field, message) pairs."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field_name: str, message: str) -> None:
        self.items.append((field_name, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def error(self, line: int) -> LineError:
        if len(self.items) == 1:
            field_name, message = self.items[0]
            return LineError(line, message, field_name)
        shown = [
            (f"field '{name}': {message}" if name else message)
            for name, message in self.items[:MAX_ISSUES_SHOWN]
        ]
        more = len(self.items) - MAX_ISSUES_SHOWN
        if more > 0:
            shown.append(f"and {more} more")
        return LineError(line, "; ".join(shown))


def _text_field(
    record: dict,
    name: str,
    issues: _Issues,
    *,
    required: bool = False,
    numbers: str = "",  # "", "whole" or "any": which JSON numbers stand for their text
    limit: int,
    strip: bool = True,
) -> str | None:
    """The field as stored text ('' when absent), or None after recording an issue."""
    value = record.get(name)
    if value is None:
        if required:
            issues.add(name, "is missing" if name not in record else "is null, not a string")
            return None
        return ""
    if isinstance(value, JsonNumber) and (numbers == "any" or numbers == "whole" and value.whole):
        value = value.text
    if not isinstance(value, str):
        expected = {
            "": "a string",
            "whole": "a string or a whole number",
            "any": "a string or a number",
        }
        issues.add(name, f"must be {expected[numbers]}, not {json_type(value)}")
        return None
    reason = _unstorable(value)
    if reason:
        issues.add(name, reason)
        return None
    value = value.replace("\r\n", "\n")
    if strip:
        value = value.strip()
    if required and not value.strip():
        issues.add(name, "is empty")
        return None
    if len(value) > limit:
        issues.add(name, f"is {len(value):,} characters long; the limit is {limit:,}")
        return None
    return value


def _tags(record: dict, issues: _Issues) -> list[str] | None:
    raw = record.get("tags")
    if raw is None:
        return []
    if not isinstance(raw, list):
        issues.add("tags", f"must be an array of strings, not {json_type(raw)}")
        return None
    tags: set[str] = set()
    for number, tag in enumerate(raw, start=1):
        if not isinstance(tag, str):
            issues.add("tags", f"tag {number} must be a string, not {json_type(tag)}")
            return None
        reason = _unstorable(tag)
        if reason:
            issues.add("tags", f"tag {number} {reason}")
            return None
        if len(tag.strip()) > MAX_TAG_CHARS:
            issues.add("tags", f"tag {number} is longer than {MAX_TAG_CHARS} characters")
            return None
        if tag.strip():
            tags.add(tag.strip())
    if len(tags) > MAX_TAGS:
        issues.add("tags", f"has {len(tags)} tags; the limit is {MAX_TAGS}")
        return None
    return sorted(tags)  # as the services store them


def _offset(value: Any) -> int | None:
    if not isinstance(value, JsonNumber) or not value.whole:
        return None
    if len(value.text.lstrip("-")) > MAX_OFFSET_DIGITS:
        return -1  # out of range, whatever the solution
    return int(value.text)


class _SolutionText:
    """The solution as written in the file and as stored (`\\r\\n` → `\\n`), with the map
    from file offsets to stored offsets."""

    def __init__(self, written: str) -> None:
        self.written = written
        self.stored = written.replace("\r\n", "\n")
        self._removed = [m.start() for m in re.finditer("\r\n", written)]  # each '\r' dropped

    def stored_offset(self, offset: int) -> int:
        return offset - bisect.bisect_left(self._removed, offset)


def _free_occurrence(body: str, text: str, taken: list[Span]) -> int:
    """First occurrence of `text` in `body` that overlaps no span taken by an earlier waypoint."""
    position = body.find(text)
    while position != -1 and any(
        position < s.end and s.start < position + len(text) for s in taken
    ):
        position = body.find(text, position + 1)
    return position


def _waypoint(
    item: Any, number: int, solution: _SolutionText, taken: list[Span], issues: _Issues
) -> Span | None:
    where = f"waypoint {number}"
    if isinstance(item, str):
        reason = _unstorable(item)
        if reason:
            issues.add("waypoints", f"{where} {reason}")
            return None
        text = item.replace("\r\n", "\n")
        if not text.strip():
            issues.add("waypoints", f"{where} is empty")
            return None
        position = _free_occurrence(solution.stored, text, taken)
        if position == -1:
            issues.add("waypoints", f"{where} {_quote(item)} does not occur in the solution")
            return None
        return Span(position, position + len(text), WaypointOrigin.EXPERT)
    origin, text = WaypointOrigin.EXPERT, None
    if isinstance(item, dict):
        if "start" not in item or "end" not in item:
            issues.add("waypoints", f"{where}: an object needs 'start' and 'end'")
            return None
        start, end = item["start"], item["end"]
        origin = item.get("origin", WaypointOrigin.EXPERT)
        if origin not in WaypointOrigin.values:
            shown = _quote(origin) if isinstance(origin, str) else json_type(origin)
            issues.add("waypoints", f"{where}: origin must be 'expert' or 'suggested', not {shown}")
            return None
        text = item.get("text")
        if text is not None and not isinstance(text, str):
            issues.add("waypoints", f"{where}: text must be a string, not {json_type(text)}")
            return None
    elif isinstance(item, list) and len(item) == 2:
        start, end = item
    else:
        issues.add(
            "waypoints",
            f'{where} must be a string, {{"start": …, "end": …}} or [start, end], '
            f"not {json_type(item) if not isinstance(item, list) else f'an array of {len(item)}'}",
        )
        return None
    first, last = _offset(start), _offset(end)
    if first is None or last is None:
        issues.add("waypoints", f"{where}: start and end must be whole numbers")
        return None
    length = len(solution.written)
    if not 0 <= first < last <= length:
        issues.add(
            "waypoints",
            f"{where} [{start.text}, {end.text}] is outside the solution (0–{length}) or empty",
        )
        return None
    span = Span(solution.stored_offset(first), solution.stored_offset(last), origin)
    if text is not None and span.text_in(solution.stored) != text.replace("\r\n", "\n"):
        issues.add(
            "waypoints",
            f"{where}: the span [{start.text}, {end.text}] holds "
            f"{_quote(span.text_in(solution.stored))}, not {_quote(text)}",
        )
        return None
    return span


def _waypoints(raw: Any, solution: _SolutionText, issues: _Issues) -> list[Span] | None:
    if not isinstance(raw, list):
        issues.add("waypoints", f"must be an array, not {json_type(raw)}")
        return None
    spans: list[Span] = []
    count_before = len(issues.items)
    for number, item in enumerate(raw, start=1):
        span = _waypoint(item, number, solution, spans, issues)
        if span is not None:
            spans.append(span)
    if len(issues.items) > count_before:
        return None
    try:
        validate_spans(solution.stored, spans)
    except SpanError as exc:
        issues.add("waypoints", str(exc))
        return None
    return spans


def _problem(record: dict, number: int, dataset_kind: str, issues: _Issues) -> ParsedProblem | None:
    problem_id = _text_field(
        record, "problem_id", issues, numbers="whole", limit=MAX_PROBLEM_ID_CHARS
    )
    if problem_id and any(ch < " " or ch == "\x7f" for ch in problem_id):
        issues.add("problem_id", "must not contain line breaks or control characters")
    statement = _text_field(
        record, "problem", issues, required=True, limit=MAX_STATEMENT_CHARS, strip=False
    )
    written = _text_field(
        record, "solution", issues, required=True, limit=MAX_SOLUTION_CHARS, strip=False
    )
    answer = _text_field(record, "answer", issues, numbers="any", limit=MAX_ANSWER_CHARS)
    source = _text_field(record, "source", issues, numbers="any", limit=MAX_SOURCE_CHARS)
    tags = _tags(record, issues)
    waypoints = None
    if written is not None:
        # The limit applies to the stored text; the offsets to the text as written.
        solution = _SolutionText(record["solution"])
        if record.get("waypoints") is not None:
            waypoints = _waypoints(record["waypoints"], solution, issues)
        if answer == "" and dataset_kind == DatasetKind.VERIFIABLE:
            answer = last_boxed_answer(written) or ""
            if len(answer) > MAX_ANSWER_CHARS:
                issues.add(
                    "answer", f"the last \\boxed{{}} is longer than {MAX_ANSWER_CHARS:,} characters"
                )
    if issues:
        return None
    return ParsedProblem(
        line=number,
        problem_id=problem_id or "",
        statement=statement or "",
        solution=written or "",
        answer=answer or "",
        source=source or "",
        tags=tags or [],
        waypoints=waypoints,
    )


def parse_jsonl(data: bytes, *, dataset_kind: str) -> ParsedFile:
    """Check every line of a JSONL file; every bad line gets one error with its number.

    Raises DomainError when the file has no line to import at all."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    lines = data.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the file's final line break
    if not any(line.strip() for line in lines):
        raise DomainError(EMPTY_FILE_MESSAGE)
    problems: list[ParsedProblem] = []
    errors: list[LineError] = []
    first_line_of: dict[str, int] = {}
    for number, raw_line in enumerate(lines, start=1):
        if not raw_line.strip():
            continue  # blank lines separate nothing and are skipped
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(
                LineError(
                    number,
                    f"is not UTF-8 text (byte {raw_line[exc.start : exc.start + 1]!r} at "
                    f"column {exc.start + 1}); save the file as UTF-8",
                )
            )
            continue
        try:
            record = _decode(text)
        except _LineRefused as exc:
            errors.append(LineError(number, str(exc)))
            continue
        if not isinstance(record, dict):
            errors.append(
                LineError(number, f"a line must be a JSON object, not {json_type(record)}")
            )
            continue
        issues = _Issues()
        item = _problem(record, number, dataset_kind, issues)
        if item is not None and item.problem_id:
            if item.problem_id in first_line_of:
                issues.add(
                    "problem_id",
                    f"duplicate problem_id {_quote(item.problem_id)} "
                    f"(first on line {first_line_of[item.problem_id]})",
                )
            else:
                first_line_of[item.problem_id] = number
        if issues:
            errors.append(issues.error(number))
        elif item is not None:
            problems.append(item)
    return ParsedFile(problems=problems, errors=errors, total_lines=len(lines))
