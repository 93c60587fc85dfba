"""Final answers: the last `\\boxed{...}`, the one answer checker, and which traces to keep.

- `last_boxed_answer` finds the last `\\boxed{...}` (or `\\fbox{...}`) and returns its content,
  braces nested to any depth.
- `judge_answer` is the project's only answer checker (expansion's `answer_correct`/`kept` and
  evaluation's verdicts both call it). It compares a predicted answer with every alternative of
  the expected one, twice: with math-verify (symbolic equivalence, both sides read as LaTeX) and
  with a normalised string match; the answer is correct if either says so, and `disagreement`
  flags the cases where they differ, so a person can look at them. CHAMP-style answers are
  free-form: `C(10, 5), or equivalently 252` gives two alternatives (`C(a, b)` is also read as
  `\\binom{a}{b}`), and a yes/no answer matches a box that starts with the same word
  (`No, it is not possible`).
- `mark_kept` applies a named kept rule (`KEPT_RULES`) to the n traces of one problem:
  `release` (the release's `data_generation/extract_final_dataset.py`: instruct models keep the
  first correct trace; reasoning models and proofs keep one seeded random trace, ungraded),
  `every_correct` (every correct trace; ungraded traces: all) and `all`. The empty rule is the
  behaviour before rules were named (every correct trace, reasoning traces graded too; proofs one
  seeded trace): runs recorded without a rule keep it.
- Reasoning traces are not graded: during expansion `</think>` is forbidden, so a reasoning
  trace is the thinking section alone and need not contain a box; its verdict is None
  ("not graded"), as for proofs.

This module knows nothing about models or tokenizers. Departures from the release: the
release's `\\boxed{([^}]+)}` regex stops at the first closing brace (`\\boxed{\\frac{1}{2}}`
gives `\\frac{1`); here braces are matched. The release grades by string match only; the
math-verify check, the alternatives and the yes/no rule are ours. Its random pick uses Python's
`random`; ours is a seeded hash of (seed, problem key), stable across processes.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed_answer(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces, or None."""
    found: list[tuple[int, str]] = []
    for command in _BOX_COMMANDS:
        start = text.rfind(command)
        while start != -1:
            content = _braced_content(text, start + len(command))
            if content is not None:
                found.append((start, content))
                break
            start = text.rfind(command, 0, start)
    return max(found)[1].strip() if found else None


extract_last_boxed = last_boxed_answer  # the name the curation app imports


def _braced_content(text: str, index: int) -> str | None:
    """The balanced `{...}` group starting at `index` (spaces allowed before it)."""
    while index < len(text) and text[index] == " ":
        index += 1
    if index >= len(text) or text[index] != "{":
        return None
    depth = 0
    for position in range(index, len(text)):
        char = text[position]
        if char == "{" and text[position - 1] != "\\":
            depth += 1
        elif char == "}" and text[position - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[index + 1 : position]
    return None  # unbalanced: an unfinished answer


_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_SPACES = re.compile(r"(?:\\[,;:! ]|\\quad|\\qquad|~|\s)+")


def normalise_answer(answer: str) -> str:
    """Loose string form: no `$`, `\\left`/`\\right`, spacing, `\\text{}` wrappers, trailing
    period, `dfrac`/`tfrac`; lower case."""
    text = answer.strip().strip("$").rstrip(".").strip().strip("$")
    text = _TEXT_WRAPPER.sub(r"\1", text)
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _SPACES.sub("", text)
    return text.rstrip(".").lower()


def _math_verify(predicted: str, expected: str) -> bool | None:
    """math-verify's verdict on two LaTeX answers; None when it cannot read one side."""
    from math_verify import parse, verify

    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    predicted, expected = predicted.strip().strip("$"), expected.strip().strip("$")
    try:
        gold = parse(f"${expected}$", parsing_timeout=timeout)
        guess = parse(f"${predicted}$", parsing_timeout=timeout)
        if not gold or not guess:
            return None
        return bool(verify(gold, guess, timeout_seconds=timeout))
    except Exception:  # math-verify raises on pathological input; fall back to strings
        return None


_EQUIVALENTLY = re.compile(r"\s*,?\s*(?:or\s+)?(?:equivalently|i\.e\.)\s*,?\s*", re.IGNORECASE)
_BINOMIAL = re.compile(r"\bC\(\s*([\w+\-*/^ ]+?)\s*,\s*([\w+\-*/^ ]+?)\s*\)")
_YES_NO = re.compile(r"^(yes|no)\b", re.IGNORECASE)
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf)\{([^{}]*)\}")


def answer_alternatives(answer: str) -> list[str]:
    """The forms an answer may take: CHAMP's `A, or equivalently B` gives A and B, and each
    `C(a, b)` also reads as `\\binom{a}{b}`."""
    parts = [p.strip().strip("$").strip() for p in _EQUIVALENTLY.split(answer) if p.strip()]
    forms: list[str] = []
    for part in parts or [answer.strip()]:
        forms.append(part)
        binomial = _BINOMIAL.sub(r"\\binom{\1}{\2}", part)
        if binomial != part:
            forms.append(binomial)
    return list(dict.fromkeys(forms))


def _yes_no(answer: str) -> str | None:
    """'yes' or 'no' when the answer starts with that word (`\\text{No}, never` -> 'no')."""
    plain = _TEXT_COMMAND.sub(r"\1", answer).strip().strip("$").strip().lower()
    match = _YES_NO.match(plain)
    return match.group(1) if match else None


@dataclass(frozen=True)
class AnswerVerdict:
    predicted: str | None  # the last boxed answer, None when there is none
    expected: str
    math_verify: bool | None  # None: math-verify could read no alternative
    string_match: bool  # normalised string (or yes/no) match with some alternative
    correct: bool  # either checker says so
    disagreement: bool  # the two checkers disagree: a person should look


def judge_answer(predicted: str | None, expected: str) -> AnswerVerdict:
    """Compare a predicted final answer with every alternative of the expected one."""
    if predicted is None or not predicted.strip():
        return AnswerVerdict(predicted, expected, None, False, False, False)
    expected_forms = answer_alternatives(expected)
    predicted_forms = answer_alternatives(predicted)
    symbolic: bool | None = None
    string_match = False
    for guess in predicted_forms:
        for gold in expected_forms:
            string_match = string_match or normalise_answer(guess) == normalise_answer(gold)
            verdict = _math_verify(guess, gold)
            if verdict is not None:
                symbolic = bool(symbolic) or verdict
    expected_word = _yes_no(expected_forms[0]) if len(expected_forms) == 1 else None
    if expected_word is not None and _yes_no(predicted) == expected_word:
        string_match = True
    correct = string_match or bool(symbolic)
    disagreement = symbolic is not None and symbolic != string_match
    return AnswerVerdict(predicted, expected, symbolic, string_match, correct, disagreement)


def judge_completion(text: str, expected: str) -> AnswerVerdict:
    """Judge the last `\\boxed{}` answer of a trace or completion."""
    return judge_answer(last_boxed_answer(text), expected)


# --- Kept rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeptRule:
    name: str
    label: str
    source: str  # where the rule comes from, shown beside the choice


KEPT_RULES: dict[str, KeptRule] = {
    rule.name: rule
    for rule in (
        KeptRule(
            "release",
            "the release's filter",
            "The release's data_generation/extract_final_dataset.py: instruct models keep the "
            "first correct trace of each problem (none when no trace is correct); reasoning "
            "models and proofs keep one random trace per problem (seeded), without grading.",
        ),
        KeptRule(
            "every_correct",
            "every correct trace",
            "Ours: every trace whose last boxed answer is correct; traces that are not graded "
            "(proofs, reasoning traces) are all kept.",
        ),
        KeptRule("all", "every trace", "Ours: every trace is kept; reviewers decide."),
    )
}
DEFAULT_KEPT_RULE = "release"
LEGACY_KEPT_RULE = ""  # runs recorded before kept rules were named
LEGACY_KEPT_RULE_DESCRIPTION = (
    "recorded before kept rules were named: every correct trace (reasoning traces graded too); "
    "proofs keep one seeded trace"
)


def kept_rule_description(rule: str) -> str:
    """How a (possibly legacy) kept rule reads on a run's page."""
    if rule == LEGACY_KEPT_RULE:
        return LEGACY_KEPT_RULE_DESCRIPTION
    known = KEPT_RULES.get(rule)
    return f"{known.label}. {known.source}" if known else f"unknown rule {rule!r}"


def proof_pick(problem_key: str, n: int, seed: int) -> int:
    """Which of n samples an ungraded problem keeps: a seeded, stable choice."""
    digest = hashlib.blake2b(f"{seed}\x1f{problem_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def mark_kept(
    trace_texts: Sequence[str],
    expected: str | None,
    *,
    problem_key: str,
    seed: int = 0,
    rule: str = DEFAULT_KEPT_RULE,
    reasoning: bool = False,
) -> tuple[list[bool], list[AnswerVerdict | None]]:
    """Which traces of one problem to keep under `rule`, and each trace's verdict (None: not
    graded, i.e. a proof, or a reasoning trace under a named rule)."""
    if rule != LEGACY_KEPT_RULE and rule not in KEPT_RULES:
        raise ValueError(f"unknown kept rule {rule!r}; choose one of {', '.join(KEPT_RULES)}")
    n = len(trace_texts)
    has_answer = expected is not None and bool(expected.strip())
    graded = has_answer and (rule == LEGACY_KEPT_RULE or not reasoning)
    verdicts: list[AnswerVerdict | None] = (
        [judge_completion(t, expected or "") for t in trace_texts] if graded else [None] * n
    )
    if n == 0:
        return [], []
    if rule == "all":
        return [True] * n, verdicts
    if not graded:
        if rule == "every_correct":
            return [True] * n, verdicts
        chosen = proof_pick(problem_key, n, seed)  # release and legacy: one seeded trace
        return [i == chosen for i in range(n)], verdicts
    correct = [bool(v and v.correct) for v in verdicts]
    if rule == "release":
        first = correct.index(True) if True in correct else -1
        return [i == first for i in range(n)], verdicts
    return correct, verdicts  # every_correct and legacy
