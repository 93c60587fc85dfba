"""Waypoint suggesters: which spans of a solution to offer the expert as waypoints.

Two suggesters, chosen by name (`SUGGESTERS`, default `DEFAULT_SUGGESTER`):

- `"release-regex"`: the release's five regular expressions (`partial_solution`), kept as the
  baseline. On LaTeX it proposes fragments (`1`, `k+1`, `n+1`, pieces of the answer).
- `"math-results"` (the default): whole intermediate results, read from the formulas:
  * in each formula (each row of an aligned environment, each comma-separated statement of an
    inline formula) the top-level relations are found (outside braces, brackets and
    parentheses); for a chain ending in an equality (`=`, `\\approx`, `\\equiv`, `:=`, `\\cong`)
    the suggestion is its last side (`\\sum … = 1 - \\frac{1}{n+1} = \\frac{n}{n+1}` gives
    `\\frac{n}{n+1}`); rows of an `align` that start with a relation continue the chain above;
  * a stated value (every side before the last is a plain symbol: `x`, `a_n`, `f(2)`,
    `x_1 = y_1`) is suggested whole: "so $x = 5$" gives `x = 5`, not `5`, because the name
    says what the number is and `5` alone reads as a fragment in `s~`;
  * a displayed formula without an equality is suggested whole (an inline one is a mention);
  * edges are trimmed (spaces, `&`, `\\\\`, trailing punctuation, spacing commands, `\\tag`,
    `\\label`, `\\end{…}`), so every suggestion is a span of the solution: its text is
    exactly `solution[start:end]`;
  * never the final answer or a piece of it: a chain is cut before a side equal to the answer
    (`C(n,2)-n = n(n-1)/2-n = n(n-3)/2` gives `n(n-1)/2-n`); a suggestion whose normalised
    form equals or is contained in the answer's (any of its alternatives), and one with a
    `\\boxed{}`, are dropped; single letters (names, not results) too;
  * de-duplicated by normalised form, in order of appearance.

The module does not parse Markdown: the caller says where the formulas' TeX lies
(`formulas`, (start, end) offsets of the TeX between the delimiters), so the suggestion reads
the same formulas the page typesets. Plain Python: nothing here knows about Django.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from expansion.engine.answers import answer_alternatives, last_boxed_answer, normalise_answer
from expansion.engine.partial_solution import suggest_waypoint_spans

Formula = tuple[int, int, bool]  # TeX start, TeX end (without delimiters), displayed?
Suggester = Callable[[str, str | None, Sequence[Formula]], list[tuple[int, int]]]

EQUALITIES = ("=", ":=", "\\approx", "\\equiv", "\\cong")
_RELATION = re.compile(
    r":=|=|<|>|\\(?:approx|equiv|cong|leq?|geq?|neq?|lt|gt|sim|simeq|leqslant|geqslant)(?![a-zA-Z])"
)
_OPEN, _CLOSE = "{[(", "}])"
# A plain symbol: a letter or command, with sub/superscripts, primes, or one call `f(2)`.
_SYMBOL = re.compile(
    r"(?:[A-Za-z]|\\[A-Za-z]+)(?:'|_\{[^{}]*\}|_\([^()]*\)|_\w|\^\{[^{}]*\}|\^\w)*"
    r"(?:\([^()=]*\))?"
)
_TRAILING = re.compile(
    r"(?:\s|&|\\\\|[.,;:]|\\[,;:! ]|\\q?quad|~|\\(?:tag|label)\*?\{[^{}]*\}|\\nonumber"
    r"|\\notag|\\end\{[^{}]*\})+$"
)
_LEADING = re.compile(r"^(?:\s|&|\\begin\{[^{}]*\}(?:\{[^{}]*\})?)+")
_SINGLE_BRACED = re.compile(r"\{(\\?\w)\}")


def _top_level(tex: str, pattern: re.Pattern[str]) -> list[re.Match[str]]:
    """Matches of `pattern` outside every (), [], {} group (and outside `\\left … \\right`)."""
    depth, found, i = 0, [], 0
    while i < len(tex):
        char = tex[i]
        if char == "\\" and i + 1 < len(tex) and tex[i + 1] in "{}":
            depth += 1 if tex[i + 1] == "{" else -1
            i += 2
            continue
        if char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth = max(0, depth - 1)
        elif depth == 0:
            match = pattern.match(tex, i)
            if match and match.end() > i:
                found.append(match)
                i = match.end()
                continue
        i += 1
    return found


def _trimmed(solution: str, start: int, end: int) -> tuple[int, int]:
    piece = solution[start:end]
    lead = _LEADING.match(piece)
    start += lead.end() if lead else 0
    tail = _TRAILING.search(solution[start:end])
    end = start + tail.start() if tail else end
    return start, max(start, end)


def _pieces(tex: str, pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    """`tex` cut at the top-level matches of `pattern`: (start, end) of each piece."""
    cuts = [(m.start(), m.end()) for m in _top_level(tex, pattern)]
    edges = [0, *[e for cut in cuts for e in cut], len(tex)]
    return [(edges[k], edges[k + 1]) for k in range(0, len(edges), 2)]


def _compact(text: str) -> str:
    text = normalise_answer(text)
    boxed = last_boxed_answer(text)
    if boxed is not None and text.startswith("\\boxed"):
        text = normalise_answer(boxed)
    return _SINGLE_BRACED.sub(r"\1", text)


def _answer_forms(solution: str, answer: str | None) -> list[str]:
    final = answer if answer and answer.strip() else last_boxed_answer(solution)
    if not final:
        return []
    return [form for form in {_compact(a) for a in answer_alternatives(final)} if form]


def _is_answer_piece(text: str, answers: Sequence[str]) -> bool:
    compact = _compact(text)
    return not compact or any(compact in form for form in answers)


def _chains(tex: str) -> list[list[tuple[int, int, str]]]:
    """Each chain of relations of a formula as its sides [(start, end, relation before)].

    Statements are rows (`\\\\`) and comma-separated parts; a row that starts with a
    relation continues the chain of the row above (`&= …` in an `align`)."""
    chains: list[list[tuple[int, int, str]]] = []
    for row_start, row_end in _pieces(tex, re.compile(r"\\\\")):
        row = tex[row_start:row_end]
        for part_start, part_end in _pieces(row, re.compile(r",")):
            part = row[part_start:part_end]
            relations = _top_level(part, _RELATION)
            if not relations:
                chains.append([(row_start + part_start, row_start + part_end, "")])
                continue
            edges = [(0, "")] + [(m.end(), m.group(0)) for m in relations]
            ends = [m.start() for m in relations] + [len(part)]
            sides = [
                (row_start + part_start + s, row_start + part_start + e, rel)
                for (s, rel), e in zip(edges, ends, strict=True)
            ]
            first = part[: relations[0].start()]
            if not _LEADING.sub("", first).strip() and chains and len(chains[-1]) > 1:
                chains[-1].extend(sides[1:])  # `&= …`: the row continues the chain above
            else:
                chains.append(sides)
    return chains


def suggest_result_spans(
    solution: str, answer: str | None, formulas: Sequence[Formula]
) -> list[tuple[int, int]]:
    """The `"math-results"` suggester: spans of whole intermediate results (module doc)."""
    answers = _answer_forms(solution, answer)
    found: list[tuple[int, int]] = []
    seen: set[str] = set()

    def offer(start: int, end: int) -> None:
        start, end = _trimmed(solution, start, end)
        text = solution[start:end]
        if not text.strip() or "\\boxed" in text or re.fullmatch(r"[A-Za-z]", text):
            return
        key = _compact(text)
        if key in seen or _is_answer_piece(text, answers):
            return
        seen.add(key)
        found.append((start, end))

    for tex_start, tex_end, displayed in formulas:
        tex = solution[tex_start:tex_end]
        chains = _chains(tex)
        for chain in chains:
            if len(chain) == 1:
                if displayed and len(chains) == 1:
                    offer(tex_start + chain[0][0], tex_start + chain[0][1])
                continue
            sides = [_trimmed(tex, s, e) for s, e, _ in chain]
            for k, (s, e) in enumerate(sides):
                if _compact(tex[s:e]) in answers:  # the chain reaches the final answer:
                    chain, sides = chain[:k], sides[:k]  # what led to it is the result
                    break
            if len(chain) < 2 or chain[-1][2] not in EQUALITIES:
                continue
            leading = [tex[s:e] for s, e in sides[:-1]]
            if all(_SYMBOL.fullmatch(side.replace(" ", "")) for side in leading):
                offer(tex_start + chain[0][0], tex_start + chain[-1][1])  # a stated value
            else:
                offer(tex_start + chain[-1][0], tex_start + chain[-1][1])
    return found


def _release_regex(
    solution: str, answer: str | None, formulas: Sequence[Formula]
) -> list[tuple[int, int]]:
    return sorted(suggest_waypoint_spans(solution, answer))


SUGGESTERS: dict[str, Suggester] = {
    "math-results": suggest_result_spans,
    "release-regex": _release_regex,
}
DEFAULT_SUGGESTER = "math-results"


def suggest_spans(
    solution: str,
    answer: str | None,
    formulas: Iterable[Formula],
    suggester: str = DEFAULT_SUGGESTER,
) -> list[tuple[int, int]]:
    """Suggested waypoint spans of `solution` by the named suggester, in text order."""
    try:
        chosen = SUGGESTERS[suggester]
    except KeyError:
        raise ValueError(f"Unknown waypoint suggester {suggester!r}.") from None
    return chosen(solution, answer, list(formulas))
