"""What the expert sees of the method while editing: suggested waypoints, the partial
solution `s~`, and the exact prompts of the three views (through `expansion.engine`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from curation.models import WaypointOrigin
from curation.spans import Span
from dailweb.rendering import find_math_spans, render_inline, render_spans_of, render_tex
from expansion.engine.partial_solution import (
    ANSWER_SENTENCE,
    WAYPOINTS_SENTENCE,
    render_partial_solution,
)
from expansion.engine.waypoint_suggestions import DEFAULT_SUGGESTER, Formula, suggest_spans


def solution_formulas(body: str) -> list[Formula]:
    """Where the TeX of each formula lies (inside its delimiters), as the page's parse finds
    the formulas: the suggester reads the formulas the preview typesets."""
    formulas: list[Formula] = []
    for math in find_math_spans(body):
        start = body.find(math.tex, math.start, math.end)
        if start != -1 and math.tex:
            formulas.append((start, start + len(math.tex), math.display))
    return formulas


def waypoints_suggest(*, body: str, answer: str, suggester: str = DEFAULT_SUGGESTER) -> list[Span]:
    """Suggested waypoints (by default whole intermediate results, never the final answer:
    `expansion.engine.waypoint_suggestions`), as spans, in text order."""
    found = suggest_spans(body, answer, solution_formulas(body), suggester)
    spans = [Span(s, e, WaypointOrigin.SUGGESTED) for s, e in found]
    return sorted(spans, key=lambda span: span.start)


def partial_solution_text(*, body: str, answer: str, spans: Sequence[Span]) -> str:
    """`s~` exactly as the negative-reference prompt will contain it."""
    return render_partial_solution(answer, [span.text_in(body) for span in spans])


def _typeset_answer(answer: str) -> SafeString:
    if "$" in answer or not any(c in answer for c in "\\^_{}"):
        return render_inline(answer)
    rendered, error = render_tex(answer)  # an answer written as bare TeX
    return format_html("<code>{}</code>", answer) if error else SafeString(rendered)


def partial_solution_html(*, body: str, answer: str, spans: Sequence[Span]) -> SafeString:
    """`s~` with its answer and waypoints typeset (the same sentences; the exact text is
    `partial_solution_text`)."""
    parts = []
    if answer.strip():
        parts.append(format_html(ANSWER_SENTENCE, answer=_typeset_answer(answer.strip())))
    pieces = [
        piece
        for span, piece in zip(
            spans, render_spans_of(body, [(s.start, s.end) for s in spans]), strict=True
        )
        if span.text_in(body).strip()
    ]
    if pieces:
        joined = format_html_join(", ", "{}", ((piece,) for piece in pieces))
        parts.append(format_html(WAYPOINTS_SENTENCE, waypoints=joined))
    return format_html_join(" ", "{}", ((part,) for part in parts))


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
