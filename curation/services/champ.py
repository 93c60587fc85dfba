"""Load CHAMP (the PyPI package `champ-dataset`, MIT): 270 competition problems with final
answers, step-by-step solutions and hints.

- CHAMP marks math with `@@…@@`; it becomes `$…$` (KaTeX renders it; CHAMP's math is
  plain-text-like, e.g. `u^2 mod 9∈{0, 1, 4, 7}`, so a few formulas render loosely).
- The solution steps are joined into the body, one paragraph per step.
- The answer keeps CHAMP's free-form text without the `@@` markers ("2^(n-1)", "No").
- Hints become *suggested* waypoints: each formula of a problem's hints (three characters or
  more) that occurs in its solution, in solution order.
Re-loading updates rather than duplicates (same rules as the JSONL import).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from curation.models import Dataset, DatasetKind, WaypointOrigin
from curation.services.problems import dataset_create
from curation.services.transfer import ImportReport, ParsedProblem, problem_upsert
from curation.spans import Span, validate_spans

CHAMP_VERSION = "v0"
CHAMP_LICENCE = "MIT (champ-dataset 1.0.0)"
_MARKED_MATH = re.compile(r"@@(.+?)@@", re.DOTALL)
MIN_HINT_FORMULA_CHARS = 3


def champ_to_latex(raw: str) -> str:
    """`@@x^2@@` → `$x^2$`."""
    return _MARKED_MATH.sub(lambda m: f"${m.group(1).strip()}$", raw or "")


def champ_answer(raw: str) -> str:
    return (raw or "").replace("@@", "").strip()


def _hint_waypoints(solution: str, hint_texts: list[str]) -> list[Span]:
    formulas: list[str] = []
    for text in hint_texts:
        for formula in _MARKED_MATH.findall(text or ""):
            candidate = f"${formula.strip()}$"
            if len(formula.strip()) >= MIN_HINT_FORMULA_CHARS and candidate not in formulas:
                formulas.append(candidate)
    spans: list[Span] = []
    for formula in formulas:
        position = solution.find(formula)
        if position == -1:
            continue
        span = Span(position, position + len(formula), WaypointOrigin.SUGGESTED)
        if not any(span.start < s.end and s.start < span.end for s in spans):
            spans.append(span)
    spans.sort(key=lambda s: s.start)
    validate_spans(solution, spans)
    return spans


def champ_problems() -> list[ParsedProblem]:
    """All CHAMP problems as parsed import items (no database)."""
    import champ_dataset

    data = champ_dataset.load(CHAMP_VERSION)
    items: list[ParsedProblem] = []
    for line, (identifier, problem) in enumerate(sorted(data.problems.items()), start=1):
        solution = "\n\n".join(champ_to_latex(step._raw_text) for step in problem.solution.steps)
        hints = [data[ch]._raw_text for ch in problem.ch_list if ch.startswith("H_")]
        items.append(
            ParsedProblem(
                line=line,
                problem_id=identifier,
                statement=champ_to_latex(problem._raw_text),
                solution=solution,
                answer=champ_answer(problem._raw_answer),
                source=f"CHAMP {CHAMP_VERSION}, {problem.category}",
                tags=[problem.category],
                waypoints=_hint_waypoints(solution, hints),
            )
        )
    return items


def champ_load(
    *,
    dataset_name: str = "CHAMP",
    author=None,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Create (or update) the CHAMP dataset with all its problems, in one transaction."""
    from django.db import transaction

    items = champ_problems()
    report = ImportReport(total_lines=len(items))
    with transaction.atomic():
        dataset = Dataset.objects.filter(name=dataset_name).first() or dataset_create(
            name=dataset_name,
            kind=DatasetKind.VERIFIABLE,
            licence=CHAMP_LICENCE,
            description="Concept and Hint-Annotated Math Problems: 270 competition problems "
            "(number theory, inequalities, polynomials, sequences, combinatorics) with "
            "answers, step-by-step solutions and hints.",
            created_by=author,
        )
        existing = set(dataset.problems.values_list("external_id", flat=True))
        for done, item in enumerate(items, start=1):
            if item.problem_id in existing:
                item.waypoints = None  # keep (carry) what experts marked since the first load
            problem_upsert(dataset, item, author, report)
            if progress:
                progress(done, len(items))
    report.imported = True
    return report
