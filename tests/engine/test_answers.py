"""Last boxed answer, answer checks, and which traces are kept."""

from __future__ import annotations

import threading

from expansion.engine.answers import (
    check_answer,
    check_trace,
    extract_last_boxed,
    last_boxed_answer,
    mark_kept,
    normalise_answer,
    proof_pick,
)


def test_last_boxed_handles_nesting_and_takes_the_last():
    text = "first \\boxed{1} then \\boxed{\\frac{1}{2^{n}}} done"
    assert last_boxed_answer(text) == "\\frac{1}{2^{n}}"
    assert last_boxed_answer("\\fbox{3} and later \\boxed {4}") == "4"
    assert last_boxed_answer("\\boxed{5} then \\fbox{6}") == "6"
    assert extract_last_boxed("x \\boxed{ 7 }") == "7"


def test_last_boxed_ignores_unfinished_and_missing_boxes():
    assert last_boxed_answer("no box here") is None
    assert last_boxed_answer("\\boxed{3} and then \\boxed{unfinished") == "3"
    assert last_boxed_answer("\\boxed{a \\{ b \\} c}") == "a \\{ b \\} c"


def test_normalisation():
    assert normalise_answer("$\\text{No}$.") == "no"
    assert normalise_answer("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalise_answer("\\dfrac{1}{2}") == "\\frac{1}{2}"


def test_symbolic_equivalence_counts_as_a_match():
    check = check_answer("\\frac{1}{2}", "0.5")
    assert check.matches and check.math_verify and not check.string_match
    assert check.disagreement  # reported: only math-verify saw it


def test_string_match_rescues_what_math_verify_misreads():
    check = check_answer("\\text{No}", "No")
    assert check.matches and check.string_match


def test_wrong_and_missing_answers():
    assert not check_answer("3", "4").matches
    assert not check_answer("3", "4").disagreement
    assert not check_answer(None, "4").matches
    assert check_trace("so the answer is \\boxed{2^{n-1}}", "2^(n-1)").matches


def test_checks_work_outside_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(check_answer("1/2", "0.5").matches))
    thread.start()
    thread.join()
    assert results == [True]


def test_mark_kept_for_verifiable_problems():
    texts = ["\\boxed{5}", "\\boxed{6}", "no answer", "\\boxed{ 5 }"]
    kept, checks = mark_kept(texts, "5", problem_key="p1")
    assert kept == [True, False, False, True]
    assert checks[2] is not None and checks[2].predicted is None


def test_mark_kept_for_proofs_keeps_one_seeded_trace():
    texts = [f"proof {i}" for i in range(32)]
    kept, checks = mark_kept(texts, None, problem_key="p1", seed=3)
    assert sum(kept) == 1 and checks == [None] * 32
    assert kept.index(True) == proof_pick("p1", 32, 3)
    picks = {proof_pick(f"p{i}", 32, 3) for i in range(40)}
    assert len(picks) > 10  # different problems keep different samples
    assert mark_kept(texts, None, problem_key="p1", seed=3)[0] == kept
