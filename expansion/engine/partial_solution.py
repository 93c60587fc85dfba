"""The partial solution `s~` of the negative-reference prompt, and the paper's default
waypoint suggestion.

Pure functions on strings: nothing here knows about Django, tokenizers or models. The
curation app calls them to show the expert `s~` exactly as the prompt will contain it.

- `render_partial_solution(answer, waypoints)` gives
  `The final answer is {a}. Intermediate results used in the solution might include: {w1}, {w2}.`
- `suggest_waypoints(solution, answer)` is the release's default: five regular expressions pull
  math entities out of `s` (numbers with decimals or scientific notation, powers like `a^{b}`,
  terms like `3x`, `x+1`, `2x+1`); they are sorted as strings (as the release sorts them),
  de-duplicated, and the final answer is removed (compared without spaces).
  `suggest_waypoint_spans` gives the same entities as character spans of `s` (first
  occurrence), so the curation UI can show them as marks.

Departures from the release:
- The release always writes the second sentence, even with no entities ("... might include: .");
  here it is omitted when there are no waypoints, and the first when there is no answer.
- The release takes the final answer from `\\boxed{...}` with a regex that stops at the first
  `}`; here the expert's answer is used, else the last boxed answer with nested braces.
- Here the entities are only suggestions that an expert accepts, edits or replaces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from expansion.engine.answers import last_boxed_answer

ANSWER_SENTENCE = "The final answer is {answer}."
WAYPOINTS_SENTENCE = "Intermediate results used in the solution might include: {waypoints}."

# The release's five patterns, verbatim.
ENTITY_PATTERNS = (
    re.compile(r"(?<!\w)[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?(?!\w)"),  # 12, -3.5, 1e-3
    re.compile(r"[a-zA-Z0-9\.]+\^\{?[a-zA-Z0-9\+\-\.]+\}?"),  # a^{b}, 2^10
    re.compile(r"(?<!\w)\d+[a-zA-Z](?!\w)"),  # 3x
    re.compile(r"(?<!\w)[a-zA-Z][\+\-]\d+(?!\w)"),  # x+1
    re.compile(r"(?<!\w)\d+[a-zA-Z][\+\-]\d+(?!\w)"),  # 2x+1
)


def render_partial_solution(answer: str | None, waypoints: Iterable[str]) -> str:
    """`s~` from the final answer (None for proofs) and the waypoints, in the given order."""
    parts: list[str] = []
    if answer and answer.strip():
        parts.append(ANSWER_SENTENCE.format(answer=answer.strip()))
    marks = [w.strip() for w in waypoints if w and w.strip()]
    if marks:
        parts.append(WAYPOINTS_SENTENCE.format(waypoints=", ".join(marks)))
    return " ".join(parts)


def _final_answer(solution: str, answer: str | None) -> str | None:
    if answer is not None and answer.strip():
        return answer.strip()
    return last_boxed_answer(solution)


def suggest_waypoint_spans(solution: str, answer: str | None) -> list[tuple[int, int]]:
    """Spans (start, end) of the suggested entities in `solution`, in `suggest_waypoints`
    order: one per distinct entity, at its first occurrence."""
    first: dict[str, tuple[int, int]] = {}
    for pattern in ENTITY_PATTERNS:
        for match in pattern.finditer(solution):
            entity = match.group(0)
            if entity not in first or match.start() < first[entity][0]:
                first[entity] = (match.start(), match.end())
    final = _final_answer(solution, answer)
    if final is not None:
        cleaned = final.replace(" ", "")
        first = {e: span for e, span in first.items() if e.replace(" ", "") != cleaned}
    return [first[entity] for entity in sorted(first)]


def suggest_waypoints(solution: str, answer: str | None = None) -> list[str]:
    """The release's suggested waypoints: sorted, de-duplicated, final answer removed."""
    return [solution[start:end] for start, end in suggest_waypoint_spans(solution, answer)]


def waypoints_from_spans(solution: str, spans: Iterable[tuple[int, int]]) -> list[str]:
    """The texts of expert-marked spans, in text order (empty or out-of-range spans refused)."""
    texts = []
    for start, end in sorted(spans):
        if not 0 <= start < end <= len(solution):
            raise ValueError(f"waypoint span ({start}, {end}) is outside the solution")
        texts.append(solution[start:end])
    return texts
