"""The three views' prompts: templates as data, rendered through the model's chat template.

- `PromptTemplates` holds the user-turn templates of the learner, privileged and
  negative-reference views (defaults: the release's texts, verbatim) and how several reference
  solutions are joined. Placeholders are `{problem}`, `{solution}`, `{partial_solution}`,
  replaced literally (LaTeX braces in templates or inputs need no escaping). `to_dict` /
  `from_dict` snapshot them with a run.
- `build_view_prompts` renders the three user turns, applies the chat template with the
  assistant turn opened (plus `<think>` for reasoning models) and returns token ids; with
  `max_prompt_tokens` it drops trailing reference solutions first, then shortens the last
  remaining solution (and, for the negative view, the partial solution) to fit, and raises
  when the problem alone does not fit.

This module knows nothing about models or rollouts: only tokenizers and strings.

Departures from the release: the release strips the problem and solution and cuts an
over-long solution text at its last "Solution N:" heading or in half; here solutions are a
list (joined as "Solution N:" blocks when there are several), trailing ones are dropped whole,
and the last one is cut at a token boundary. Reasoning models get the assistant turn
`<think>` (the release's `continue_final_message` with "<think>").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

LEARNER_TEMPLATE = "## Problem:\n{problem}\n\nBegin your step-by-step thinking process.\n"
_EXPERT_INTRO = (
    "You are an expert mathematician solving the following problem. Your task is to produce a "
    "clear, step-by-step thinking process that leads to the correct solution.\n\n"
)
PRIVILEGED_TEMPLATE = (
    _EXPERT_INTRO + "## Problem:\n{problem}\n\n"
    "Hint: To help you, here are reference solution(s).\n\n"
    "## Reference Solution(s):\n{solution}\n\n"
    "Use these only to guide your own thoughts implicitly, but express the reasoning in your "
    "own words as if you are solving it for the first time. **You must never explicitly "
    "acknowledge these instructions or cite the provided solution(s). Just use the methodology "
    "as if it were your own. You are not allowed to take any shortcuts, directly use any "
    "intermediate derived number or result as given (you must show everything from scratch), "
    "nor directly produce the answer. Do not worry that your solution is too long.**\n\n"
    "Now, solve the problem. Begin your step-by-step thinking process.\n"
)
NEGATIVE_TEMPLATE = (
    _EXPERT_INTRO + "## Problem:\n{problem}\n\n"
    "Hint: {partial_solution}\n\n"
    "Begin your step-by-step thinking process.\n"
)

VIEW_NAMES = ("learner", "privileged", "negative")
_REQUIRED = {
    "learner": ("{problem}",),
    "privileged": ("{problem}", "{solution}"),
    "negative": ("{problem}", "{partial_solution}"),
}


class PromptError(ValueError):
    """A prompt cannot be built (empty input, no chat template, or it does not fit)."""


@dataclass(frozen=True)
class PromptTemplates:
    """User-turn templates of the three views (editable per project and run)."""

    learner: str = LEARNER_TEMPLATE
    privileged: str = PRIVILEGED_TEMPLATE
    negative: str = NEGATIVE_TEMPLATE
    solution_heading: str = "Solution {index}:\n"  # before each solution when there are several
    solution_separator: str = "\n\n"
    thinking_start: str = "<think>"  # opens the assistant turn of reasoning models

    def __post_init__(self) -> None:
        for view, needed in _REQUIRED.items():
            text = getattr(self, view)
            missing = [p for p in needed if p not in text]
            if missing:
                raise PromptError(f"the {view} template lacks {', '.join(missing)}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptTemplates:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PromptError(f"unknown template fields: {sorted(unknown)}")
        return cls(**data)

    def join_solutions(self, solutions: Sequence[str]) -> str:
        if len(solutions) == 1:
            return solutions[0]
        return self.solution_separator.join(
            self.solution_heading.replace("{index}", str(i + 1)) + s
            for i, s in enumerate(solutions)
        )

    def user_turn(self, view: str, problem: str, solution: str = "", partial: str = "") -> str:
        text = getattr(self, view)
        # One pass over the template, so a placeholder inside an input is left alone.
        values = {"{problem}": problem, "{solution}": solution, "{partial_solution}": partial}
        pieces = []
        index = 0
        while index < len(text):
            for placeholder, value in values.items():
                if text.startswith(placeholder, index):
                    pieces.append(value)
                    index += len(placeholder)
                    break
            else:
                pieces.append(text[index])
                index += 1
        return "".join(pieces)


@dataclass(frozen=True)
class ViewPrompts:
    """Token ids of the three prompts (chat template applied, assistant turn open)."""

    learner_ids: list[int]
    privileged_ids: list[int]
    negative_ids: list[int]
    solutions_given: int
    solutions_used: int  # after dropping trailing solutions to fit
    solution_truncated: bool  # the last used solution was cut
    partial_solution_truncated: bool

    def ids(self, view: str) -> list[int]:
        return {"learner": self.learner_ids, "privileged": self.privileged_ids}.get(
            view, self.negative_ids
        )


def _model_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def chat_prompt_text(
    tokenizer: Any, user_turn: str, reasoning: bool, templates: PromptTemplates
) -> str:
    """The full prompt text: chat template with the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            f"The tokenizer of {_model_name(tokenizer)!r} has no chat template; DAIL prompts "
            "are chat turns, so use an instruct/chat model or set tokenizer.chat_template."
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_turn}], tokenize=False, add_generation_prompt=True
    )
    if reasoning and not text.rstrip().endswith(templates.thinking_start):
        text += templates.thinking_start
    return str(text)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _normalise_solutions(solution: str | Sequence[str]) -> list[str]:
    solutions = [solution] if isinstance(solution, str) else list(solution)
    solutions = [s.strip() for s in solutions]
    if not solutions or not all(solutions):
        raise PromptError("the expert solution is empty")
    return solutions


def render_view_texts(
    tokenizer: Any,
    problem: str,
    solution: str | Sequence[str],
    partial_solution: str,
    templates: PromptTemplates | None = None,
    reasoning: bool = False,
) -> dict[str, str]:
    """The three prompts as text (for previews), untrimmed."""
    templates = templates or PromptTemplates()
    problem = problem.strip()
    if not problem:
        raise PromptError("the problem is empty")
    joined = templates.join_solutions(_normalise_solutions(solution))
    turns = {
        "learner": templates.user_turn("learner", problem),
        "privileged": templates.user_turn("privileged", problem, solution=joined),
        "negative": templates.user_turn("negative", problem, partial=partial_solution.strip()),
    }
    return {v: chat_prompt_text(tokenizer, t, reasoning, templates) for v, t in turns.items()}


def build_view_prompts(
    tokenizer: Any,
    problem: str,
    solution: str | Sequence[str],
    partial_solution: str,
    templates: PromptTemplates | None = None,
    reasoning: bool = False,
    max_prompt_tokens: int | None = None,
) -> ViewPrompts:
    """Token ids of the learner, privileged and negative-reference prompts."""
    templates = templates or PromptTemplates()
    problem = problem.strip()
    if not problem:
        raise PromptError("the problem is empty")
    solutions = _normalise_solutions(solution)
    partial = partial_solution.strip()
    limit = max_prompt_tokens if max_prompt_tokens is not None else float("inf")

    def encode(view: str, solution_text: str = "", partial_text: str = "") -> list[int]:
        turn = templates.user_turn(view, problem, solution_text, partial_text)
        return _encode(tokenizer, chat_prompt_text(tokenizer, turn, reasoning, templates))

    learner = encode("learner")
    if len(learner) > limit:
        raise PromptError(
            f"the problem alone needs {len(learner)} prompt tokens, more than the "
            f"{max_prompt_tokens} allowed"
        )
    # Privileged view: drop trailing solutions, then shorten the last one.
    used = len(solutions)
    privileged = encode("privileged", templates.join_solutions(solutions))
    while len(privileged) > limit and used > 1:
        used -= 1
        privileged = encode("privileged", templates.join_solutions(solutions[:used]))
    solution_truncated = False
    if len(privileged) > limit:
        kept = solutions[: used - 1]

        def with_last(text: str) -> list[int]:
            return encode("privileged", templates.join_solutions([*kept, text]))

        privileged = _shorten_to_fit(
            tokenizer,
            solutions[used - 1],
            with_last,
            int(limit),
            "the problem with its reference solution",
        )
        solution_truncated = True
    negative = encode("negative", partial_text=partial)
    partial_truncated = False
    if len(negative) > limit:
        negative = _shorten_to_fit(
            tokenizer,
            partial,
            lambda text: encode("negative", partial_text=text),
            int(limit),
            "the problem with its partial solution",
        )
        partial_truncated = True
    return ViewPrompts(
        learner_ids=learner,
        privileged_ids=privileged,
        negative_ids=negative,
        solutions_given=len(solutions),
        solutions_used=used,
        solution_truncated=solution_truncated,
        partial_solution_truncated=partial_truncated,
    )


def _shorten_to_fit(tokenizer: Any, text: str, render: Any, limit: int, what: str) -> list[int]:
    """The longest token prefix of `text` whose rendered prompt fits `limit` (binary search)."""
    pieces = _encode(tokenizer, text)
    low, high = 0, len(pieces)
    best: list[int] | None = None
    while low <= high:
        middle = (low + high) // 2
        ids = render(tokenizer.decode(pieces[:middle]))
        if len(ids) <= limit:
            best, low = ids, middle + 1
        else:
            high = middle - 1
    if best is None:
        raise PromptError(f"{what} does not fit in {limit} prompt tokens even when cut to nothing")
    return best


def thinking_end_token_ids(tokenizer: Any, marker: str = "</think>") -> tuple[int, ...]:
    """Ids to forbid during expansion of a reasoning model: `</think>` when it is one token."""
    ids = _encode(tokenizer, marker)
    return tuple(ids) if len(ids) == 1 else ()
