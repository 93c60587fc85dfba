"""Seeded generator of short one- and two-step problems that the embedded model can partly
solve.

CHAMP is the real dataset; it is far beyond SmolLM2-135M, so base, SFT and DAIL all score
about zero on it and no difference can show. These problems are meant to be easy enough that
the base model sometimes solves them (pass@1 roughly 5-50 %) and hard enough that it often
does not. Which families reach that, and under which evaluation settings (it needs the
`worked-example` prompt template: under the default one the model almost never writes a
boxed answer), is measured by `python -m bench generated_difficulty` and recorded in
`docs/benchmarks/generated_difficulty.json`.

Each family (`FAMILIES`) draws its numbers from its own random stream, seeded by (seed, family
name), so the same seed gives the same problems whatever the other families or sizes are, and
adding problems to a family does not change its first ones. A family never repeats a
statement (a held-out copy of a training problem would leak it), so the one-step families
(`add2`, `mul2`, `sub2`, `linear1`: 64 distinct problems each) refuse larger sizes. Every problem has:

- an id `<family>-0001`, a statement in Markdown + LaTeX, a final answer (an integer);
- a terse expert-style solution (results stated with little derivation, as in competition
  write-ups) that ends with "The answer is $\\boxed{…}$." (the evaluation prompt asks for the
  answer in `\\boxed{}`, and `judge_completion` reads the last box);
- waypoints (two-step families; a one-step family has no intermediate result, so its
  problems have none and a negative reference gets only the final answer): character spans
  of the solution on its intermediate results (`42` in
  `$23 + 19 = 42$`; a stated value whole, `3x = 15`, as the `math-results` suggester proposes
  it), never the final answer nor a piece of it (the suggester's rule: a waypoint whose
  normalised text is contained in the answer's is not drawn; the numbers are drawn again).

This module knows nothing about Django or models: problems are plain data. The curation
service `curation.services.generated` stores them through the import's upsert.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from expansion.engine.answers import normalise_answer

DEFAULT_SEED = 0
DEFAULT_PER_FAMILY = 60
MAX_PER_FAMILY = 9999  # ids have four digits
MAX_DRAWS = 1000  # redraws of one problem whose intermediate result reads as the answer


@dataclass(frozen=True)
class GeneratedProblem:
    problem_id: str
    family: str
    statement: str
    solution: str
    answer: str
    waypoints: tuple[tuple[int, int], ...]  # (start, end) in `solution`, in order

    def waypoint_texts(self) -> list[str]:
        return [self.solution[start:end] for start, end in self.waypoints]


@dataclass
class _SolutionWriter:
    """Builds a solution from pieces, recording the spans of the marked ones."""

    parts: list[str] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    length: int = 0

    def text(self, piece: str) -> _SolutionWriter:
        self.parts.append(piece)
        self.length += len(piece)
        return self

    def mark(self, piece: str) -> _SolutionWriter:
        self.spans.append((self.length, self.length + len(piece)))
        return self.text(piece)

    def answer(self, value: int) -> str:
        self.text(f" The answer is $\\boxed{{{value}}}$.")
        return "".join(self.parts)


@dataclass(frozen=True)
class Draft:
    """One problem before it is checked and numbered."""

    statement: str
    solution: str
    answer: int
    waypoints: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    draw: Callable[[random.Random], Draft]
    steps: int = 2  # a one-step family states its result directly: its solutions have no waypoint


def _draft(statement: str, writer: _SolutionWriter, answer: int) -> Draft:
    solution = writer.answer(answer)
    return Draft(statement, solution, answer, tuple(writer.spans))


def _digits(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


# --- Families ----------------------------------------------------------------------------------


def _add_then_multiply(rng: random.Random) -> Draft:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 5)
    total = a + b
    result = total * c
    writer = _SolutionWriter().text(f"${a} + {b} = ").mark(str(total))
    writer.text(f"$, and ${total} \\times {c} = {result}$.")
    return _draft(f"Compute $({a} + {b}) \\times {c}$.", writer, result)


def _multiply_then_add(rng: random.Random) -> Draft:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    product = a * b
    result = product + c
    writer = _SolutionWriter().text(f"${a} \\times {b} = ").mark(str(product))
    writer.text(f"$, and ${product} + {c} = {result}$.")
    return _draft(f"Compute ${a} \\times {b} + {c}$.", writer, result)


def _subtract_then_add(rng: random.Random) -> Draft:
    a, b, c = _digits(rng, 2), rng.randint(2, 9), rng.randint(2, 9)
    difference = a - b
    result = difference + c
    writer = _SolutionWriter().text(f"${a} - {b} = ").mark(str(difference))
    writer.text(f"$, and ${difference} + {c} = {result}$.")
    return _draft(f"Compute ${a} - {b} + {c}$.", writer, result)


def _add_three(first_digits: int) -> Callable[[random.Random], Draft]:
    def draw(rng: random.Random) -> Draft:
        a = _digits(rng, first_digits) if first_digits > 1 else rng.randint(2, 9)
        b, c = rng.randint(2, 9), rng.randint(2, 9)
        first = a + b
        result = first + c
        writer = _SolutionWriter().text(f"${a} + {b} = ").mark(str(first))
        writer.text(f"$, and ${first} + {c} = {result}$.")
        return _draft(f"Compute ${a} + {b} + {c}$.", writer, result)

    return draw


def _add_two(rng: random.Random) -> Draft:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    writer = _SolutionWriter().text(f"${a} + {b} = {a + b}$.")
    return _draft(f"Compute ${a} + {b}$.", writer, a + b)


def _multiply_two(rng: random.Random) -> Draft:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    writer = _SolutionWriter().text(f"${a} \\times {b} = {a * b}$.")
    return _draft(f"Compute ${a} \\times {b}$.", writer, a * b)


def _subtract_two(rng: random.Random) -> Draft:
    difference, b = rng.randint(2, 9), rng.randint(2, 9)
    a = difference + b
    writer = _SolutionWriter().text(f"${a} - {b} = {difference}$.")
    return _draft(f"Compute ${a} - {b}$.", writer, difference)


def _tens_then_add(rng: random.Random) -> Draft:
    a, b = rng.randint(2, 9), rng.randint(1, 9)
    tens = a * 10
    writer = _SolutionWriter().text(f"${a} \\times 10 = ").mark(str(tens))
    writer.text(f"$, and ${tens} + {b} = {tens + b}$.")
    return _draft(f"Compute ${a} \\times 10 + {b}$.", writer, tens + b)


def _one_step_equation(rng: random.Random) -> Draft:
    a, x = rng.randint(2, 9), rng.randint(2, 9)
    writer = _SolutionWriter().text(f"$x = {a + x} - {a} = {x}$.")
    return _draft(f"Solve $x + {a} = {a + x}$ for $x$.", writer, x)


def _linear_equation(rng: random.Random) -> Draft:
    a, x, b = rng.randint(2, 5), rng.randint(2, 9), rng.randint(1, 9)
    c = a * x + b
    writer = _SolutionWriter().text(f"Subtracting ${b}$ gives $").mark(f"{a}x = {c - b}")
    writer.text(f"$, so $x = {x}$.")
    return _draft(f"Solve ${a}x + {b} = {c}$ for $x$.", writer, x)


_WORD_TEMPLATES: tuple[tuple[str, str], ...] = (
    (
        "Sam has {n} boxes with {a} pencils in each box, and {b} more pencils. "
        "How many pencils does Sam have?",
        "pencils in the boxes",
    ),
    (
        "A shop sells {n} bags of {a} apples and {b} single apples. How many apples does it sell?",
        "apples in the bags",
    ),
    (
        "Mia reads {a} pages a day for {n} days, then {b} more pages. "
        "How many pages does she read?",
        "pages in those days",
    ),
    (
        "There are {n} rows of {a} chairs, and {b} extra chairs. How many chairs are there?",
        "chairs in the rows",
    ),
)


def _word_problem(rng: random.Random) -> Draft:
    template, what = rng.choice(_WORD_TEMPLATES)
    n, a, b = rng.randint(2, 4), rng.randint(2, 6), rng.randint(2, 5)
    product = n * a
    result = product + b
    writer = _SolutionWriter().text(f"${n} \\times {a} = ").mark(str(product))
    writer.text(f"$ {what}, and ${product} + {b} = {result}$.")
    return _draft(template.format(n=n, a=a, b=b), writer, result)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("add2", "a + b: one-digit a and b (one step, no waypoint)", _add_two, 1),
        Family("mul2", "a x b: one-digit a and b (one step, no waypoint)", _multiply_two, 1),
        Family("sub2", "a - b: b and a - b in 2..9 (one step, no waypoint)", _subtract_two, 1),
        Family("mul10-add", "a x 10 + b: a in 2..9, b in 1..9", _tens_then_add),
        Family(
            "linear1",
            "solve x + a = b: a and x in 2..9 (one step, no waypoint)",
            _one_step_equation,
            1,
        ),
        Family("add3", "a + b + c: one-digit a, b, c", _add_three(1)),
        Family("add3-2d", "a + b + c: a two-digit a, one-digit b and c", _add_three(2)),
        Family("sub-add", "a - b + c: a two-digit a, one-digit b and c", _subtract_then_add),
        Family("mul-add", "a x b + c: one-digit a, b, c", _multiply_then_add),
        Family("add-mul", "(a + b) x c: one-digit a and b, c in 2..5", _add_then_multiply),
        Family("linear", "solve ax + b = c: a in 2..5, x in 2..9, b in 1..9", _linear_equation),
        Family("word", "one-sentence word problems: n x a + b, small numbers", _word_problem),
    )
}


# --- Generation --------------------------------------------------------------------------------


class GenerationError(ValueError):
    """Arguments the generator cannot use (the message says why)."""


def family_names(names: str | Sequence[str] | None) -> list[str]:
    """Known family names from a comma-separated string or a list (None: every family)."""
    if names is None:
        return list(FAMILIES)
    chosen = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    chosen = [n for n in chosen if n]
    if not chosen:
        raise GenerationError(f"choose at least one family: {', '.join(FAMILIES)}")
    unknown = [n for n in chosen if n not in FAMILIES]
    if unknown:
        raise GenerationError(
            f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(map(repr, unknown))}; "
            f"choose from {', '.join(FAMILIES)}"
        )
    return list(dict.fromkeys(chosen))


def _is_answer_piece(text: str, answer: str) -> bool:
    """The suggester's rule: a waypoint whose normalised text is in the answer's is a piece."""
    compact = normalise_answer(text)
    return not compact or compact in normalise_answer(answer)


def _checked(draft: Draft) -> bool:
    answer = str(draft.answer)
    return not any(
        _is_answer_piece(draft.solution[start:end], answer) for start, end in draft.waypoints
    )


def generate_family(name: str, count: int, seed: int = DEFAULT_SEED) -> list[GeneratedProblem]:
    """The first `count` problems of one family for `seed` (a prefix of any larger count)."""
    family = FAMILIES[family_names([name])[0]]
    rng = random.Random(f"dail-generated\x1f{seed}\x1f{family.name}")
    problems = []
    seen: set[str] = set()  # no statement twice: a held-out copy of a training problem leaks
    for index in range(1, count + 1):
        for _attempt in range(MAX_DRAWS):
            draft = family.draw(rng)
            if draft.statement not in seen and _checked(draft):
                seen.add(draft.statement)
                break
        else:
            raise GenerationError(
                f"{family.name} has no new problem after {MAX_DRAWS} draws: it has fewer than "
                f"{count} distinct problems (the one-step families have 64); ask for fewer"
            )
        problems.append(
            GeneratedProblem(
                problem_id=f"{family.name}-{index:04d}",
                family=family.name,
                statement=draft.statement,
                solution=draft.solution,
                answer=str(draft.answer),
                waypoints=draft.waypoints,
            )
        )
    return problems


def generate_problems(
    *,
    seed: int = DEFAULT_SEED,
    per_family: int = DEFAULT_PER_FAMILY,
    families: str | Sequence[str] | None = None,
) -> list[GeneratedProblem]:
    """`per_family` problems of each chosen family (default: all), family by family."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise GenerationError(f"the seed must be a whole number >= 0; got {seed!r}")
    if isinstance(per_family, bool) or not isinstance(per_family, int):
        raise GenerationError(f"problems per family must be a whole number; got {per_family!r}")
    if not 1 <= per_family <= MAX_PER_FAMILY:
        raise GenerationError(f"problems per family must be 1..{MAX_PER_FAMILY}; got {per_family}")
    return [
        problem
        for name in family_names(families)
        for problem in generate_family(name, per_family, seed)
    ]
