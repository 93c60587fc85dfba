"""Character spans of waypoints: validation, and carrying them into an edited text.

Plain Python (no Django): used by the services, the importers and the tests alike.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
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


def quoted(text: str, limit: int = 60) -> str:
    """A span's text for a message, as the list shows it (no escaping; long ones shortened)."""
    text = " ".join(text.split())
    return f"“{text if len(text) <= limit else text[: limit - 1] + '…'}”"


def validate_spans(body: str, spans: Iterable[Span]) -> list[Span]:
    """Spans in their given order, checked: inside `body`, non-empty, not overlapping.

    Messages number the waypoints as the list shows them (1-based, in the given order)."""
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
                f"Waypoints {first_no} {quoted(first.text_in(body))} and {second_no} "
                f"{quoted(second.text_in(body))} overlap."
            )
    return checked


@dataclass(frozen=True)
class SpanAdded:
    spans: list[Span]  # the new list
    replaced: list[str]  # texts of the suggested waypoints the new span replaced


def add_span(
    body: str, spans: Sequence[Span], start: int, end: int, *, keep_text_order: bool = False
) -> SpanAdded:
    """Add an expert span (white space at its edges trimmed) to the list.

    Suggested waypoints inside the new span are replaced by it (it takes the place of the
    first of them in the list); any other overlap, or the same span again, is refused with a
    message that names the waypoint as the list shows it."""
    while start < end and body[start].isspace():
        start += 1
    while end > start and body[end - 1].isspace():
        end -= 1
    new = Span(start, end, "expert")
    validate_spans(body, [new])
    kept: list[Span] = []
    replaced: list[str] = []
    position = None
    for number, span in enumerate(spans, start=1):
        if (span.start, span.end) == (start, end):
            raise SpanError(f"{quoted(new.text_in(body))} is already waypoint {number}.")
        if not (span.start < end and start < span.end):
            kept.append(span)
            continue
        if span.origin == "suggested" and start <= span.start and span.end <= end:
            replaced.append(span.text_in(body))
            position = len(kept) if position is None else position
            continue
        raise SpanError(
            f"The selection {quoted(new.text_in(body))} overlaps waypoint {number} "
            f"{quoted(span.text_in(body))} ({span.origin}): delete that waypoint first, "
            "or select text that does not overlap it."
        )
    if position is not None:
        kept.insert(position, new)
    else:
        kept.append(new)
    if keep_text_order:
        kept.sort(key=lambda s: s.start)
    return SpanAdded(validate_spans(body, kept), replaced)


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
