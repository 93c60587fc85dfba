"""The solution editor's waypoint actions on the posted state (nothing is saved here).

`editor_action_apply` takes the editor's text, answer and waypoint list and one action (add a
selection, delete / move one, suggest, clear) and returns the new list with what to tell the
expert: an error (the list is unchanged) or a notice (what the action did besides).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from curation.models import WaypointOrigin
from curation.services.suggestions import waypoints_suggest
from curation.spans import Span, SpanError, add_span, quoted


@dataclass
class EditorOutcome:
    spans: list[Span]
    error: str = ""
    notices: list[str] = field(default_factory=list)


def editor_action_apply(
    *,
    body: str,
    answer: str,
    spans: list[Span],
    action: str,
    start: int | None = None,
    end: int | None = None,
    index: int | None = None,
    keep_text_order: bool = False,
) -> EditorOutcome:
    """The waypoint list after `action` (see the module docstring); never raises SpanError."""
    spans = list(spans)
    try:
        if action == "add":
            if start is None or end is None:
                raise SpanError("Select some text first.")
            added = add_span(body, spans, start, end, keep_text_order=keep_text_order)
            notices = []
            if added.replaced:
                texts = ", ".join(quoted(t) for t in added.replaced)
                notices.append(f"The new waypoint replaces the suggested {texts} inside it.")
            return EditorOutcome(added.spans, notices=notices)
        if action in {"delete", "up", "down"}:
            if index is None or not 0 <= index < len(spans):
                raise SpanError("That waypoint does not exist any more.")
            if action == "delete":
                spans.pop(index)
            else:
                other = index - 1 if action == "up" else index + 1
                if 0 <= other < len(spans):
                    spans[index], spans[other] = spans[other], spans[index]
            return EditorOutcome(spans)
        if action == "suggest":
            return _suggest(body=body, answer=answer, spans=spans)
        if action == "clear":
            return EditorOutcome([])
        if action == "refresh":
            return EditorOutcome(spans)
        raise SpanError(f"Unknown editor action {action!r}.")
    except SpanError as exc:
        return EditorOutcome(spans, error=str(exc))


def _suggest(*, body: str, answer: str, spans: list[Span]) -> EditorOutcome:
    experts = sum(1 for s in spans if s.origin == WaypointOrigin.EXPERT)
    if experts:
        # Suggestions only stand in for an expert's marks; they never replace them.
        return EditorOutcome(
            spans,
            notices=[
                f"Suggest adds nothing: this solution has {experts} expert waypoint"
                f"{'s' if experts != 1 else ''}, and suggestions are only offered where an "
                "expert has marked none. Clear or delete them to see the suggestions."
            ],
        )
    suggested = waypoints_suggest(body=body, answer=answer)
    if not suggested:
        return EditorOutcome(
            [],
            notices=[
                "No intermediate results found: no formula states one that is not the final answer."
            ],
        )
    return EditorOutcome(suggested)
