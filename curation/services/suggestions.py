"""What the expert sees of the method while editing: suggested waypoints, the partial
solution `s~`, and the exact prompts of the three views (through `expansion.engine`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from curation.models import WaypointOrigin
from curation.spans import Span
from expansion.engine.partial_solution import render_partial_solution, suggest_waypoint_spans


def waypoints_suggest(*, body: str, answer: str) -> list[Span]:
    """The paper's default suggestion (math entities of the solution), as spans, in text order."""
    spans = [Span(s, e, WaypointOrigin.SUGGESTED) for s, e in suggest_waypoint_spans(body, answer)]
    return sorted(spans, key=lambda span: span.start)


def partial_solution_text(*, body: str, answer: str, spans: Sequence[Span]) -> str:
    """`s~` exactly as the negative-reference prompt will contain it."""
    return render_partial_solution(answer, [span.text_in(body) for span in spans])


@dataclass(frozen=True)
class PromptPreview:
    view: str
    label: str
    text: str


def prompt_previews(
    *, statement: str, body: str, answer: str, spans: Sequence[Span]
) -> tuple[list[PromptPreview], str]:
    """The three prompts as the configured model will see them (chat template applied).

    Returns (previews, note): the note explains what is shown when the model is not prepared.
    """
    from expansion.services import prompt_texts_for_preview

    partial = partial_solution_text(body=body, answer=answer, spans=spans)
    texts, note = prompt_texts_for_preview(
        problem=statement, solution=body, partial_solution=partial
    )
    labels = {
        "learner": "Learner  M_θ(· | x)",
        "privileged": "Privileged student  M_PS(· | x, s)",
        "negative": "Negative reference  M_NR(· | x, s~)",
    }
    return [PromptPreview(view, labels[view], texts[view]) for view in labels], note
