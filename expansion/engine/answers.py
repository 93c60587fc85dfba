"""Final answers: the last `\\boxed{...}`, equivalence checks, and which traces to keep.

- `last_boxed_answer` finds the last `\\boxed{...}` (or `\\fbox{...}`) and returns its content,
  braces nested to any depth.
- `check_answer` compares a predicted answer with the expected one twice: with math-verify
  (symbolic equivalence, both sides read as LaTeX) and with a normalised string match; the
  answer matches if either says so, and `disagreement` flags the cases where they differ, so a
  reviewer can look at them.
- `mark_kept` applies the release's filter: verifiable problems keep every trace whose last
  boxed answer matches; proofs (no answer) keep one trace of the n, chosen by a seeded hash.

This module knows nothing about models or tokenizers. Departures from the release: the
release's `\\boxed{([^}]+)}` regex stops at the first closing brace (`\\boxed{\\frac{1}{2}}`
gives `\\frac{1`); here braces are matched. The string fallback is ours.
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


@dataclass(frozen=True)
class AnswerCheck:
    predicted: str | None
    expected: str
    math_verify: bool | None  # None when math-verify could not read one side
    string_match: bool
    matches: bool
    disagreement: bool  # math-verify and the string match disagree


def _math_verify(predicted: str, expected: str) -> bool | None:
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


def check_answer(predicted: str | None, expected: str) -> AnswerCheck:
    """Compare a predicted final answer with the expected one."""
    if predicted is None or not predicted.strip():
        return AnswerCheck(predicted, expected, None, False, False, False)
    string_match = normalise_answer(predicted) == normalise_answer(expected)
    symbolic = _math_verify(predicted, expected)
    matches = string_match or bool(symbolic)
    disagreement = symbolic is not None and symbolic != string_match
    return AnswerCheck(predicted, expected, symbolic, string_match, matches, disagreement)


def check_trace(trace_text: str, expected: str) -> AnswerCheck:
    """Check the last boxed answer of a trace."""
    return check_answer(last_boxed_answer(trace_text), expected)


def proof_pick(problem_key: str, n: int, seed: int) -> int:
    """Which of n samples a proof keeps: a seeded, stable choice."""
    digest = hashlib.blake2b(f"{seed}\x1f{problem_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def mark_kept(
    trace_texts: Sequence[str], expected: str | None, *, problem_key: str, seed: int = 0
) -> tuple[list[bool], list[AnswerCheck | None]]:
    """Which traces of one problem to keep, and each trace's answer check (None for proofs)."""
    if expected is None or not expected.strip():
        if not trace_texts:
            return [], []
        chosen = proof_pick(problem_key, len(trace_texts), seed)
        return [i == chosen for i in range(len(trace_texts))], [None] * len(trace_texts)
    checks: list[AnswerCheck | None] = [check_trace(t, expected) for t in trace_texts]
    return [bool(c and c.matches) for c in checks], checks
