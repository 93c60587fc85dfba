"""Character spans of waypoints: validation, and carrying them into an edited text.

Plain Python (no Django): used by the services, the importers and the tests alike.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    origin: str = "expert"

    def text_in(self, body: str) -> str:
        return body[self.start : self.end]


class SpanError(ValueError):
    """A span is empty, outside the text, or overlaps another; the message says which."""


def validate_spans(body: str, spans: Iterable[Span]) -> list[Span]:
    """Spans in their given order, checked: inside `body`, non-empty, not overlapping."""
    checked = list(spans)
    for number, span in enumerate(checked, start=1):
        if not (0 <= span.start < span.end <= len(body)):
            raise SpanError(
                f"Waypoint {number} ({span.start}–{span.end}) is outside the solution text "
                f"(0–{len(body)}) or empty."
            )
        if not body[span.start : span.end].strip():
            raise SpanError(f"Waypoint {number} ({span.start}–{span.end}) is only white space.")
    ordered = sorted(enumerate(checked, start=1), key=lambda item: item[1].start)
    for (first_no, first), (second_no, second) in zip(ordered, ordered[1:], strict=False):
        if second.start < first.end:
            raise SpanError(
                f"Waypoints {first_no} ({first.text_in(body)!r}) and {second_no} "
                f"({second.text_in(body)!r}) overlap."
            )
    return checked


def spans_for_strings(body: str, texts: Iterable[str], origin: str) -> tuple[list[Span], list[str]]:
    """Turn waypoint strings into spans at their first free occurrence in `body`.

    Returns (spans, texts that do not occur). A string occurring several times takes the
    first occurrence not already used by an earlier waypoint.
    """
    spans: list[Span] = []
    missing: list[str] = []
    for text in texts:
        if not text or not text.strip():
            continue
        position = body.find(text)
        while position != -1 and any(
            position < s.end and s.start < position + len(text) for s in spans
        ):
            position = body.find(text, position + 1)
        if position == -1:
            missing.append(text)
        else:
            spans.append(Span(position, position + len(text), origin))
    return spans, missing


def _mapped_offset(matcher: difflib.SequenceMatcher, position: int) -> int:
    """Where `position` of the old text lands in the new text (by the diff's opcodes)."""
    for tag, i1, i2, j1, _j2 in matcher.get_opcodes():
        if i1 <= position < i2 or (position == i2 and tag == "equal"):
            if tag == "equal":
                return j1 + (position - i1)
            return j1
    return len(matcher.b)


def carry_spans(
    old_body: str, new_body: str, spans: Iterable[Span]
) -> tuple[list[Span], list[str]]:
    """Carry waypoints into an edited text: each goes to the occurrence of its text nearest to
    where the diff moved its old position; returns (carried, dropped texts)."""
    matcher = difflib.SequenceMatcher(a=old_body, b=new_body, autojunk=False)
    carried: list[Span] = []
    dropped: list[str] = []
    for span in spans:
        text = span.text_in(old_body)
        candidates = []
        position = new_body.find(text)
        while position != -1:
            if not any(position < s.end and s.start < position + len(text) for s in carried):
                candidates.append(position)
            position = new_body.find(text, position + 1)
        if not candidates:
            dropped.append(text)
            continue
        expected = _mapped_offset(matcher, span.start)
        best = min(candidates, key=lambda p: (abs(p - expected), p))
        carried.append(Span(best, best + len(text), span.origin))
    return carried, dropped
