"""Last boxed answer, the one answer checker, and which traces each kept rule keeps."""

from __future__ import annotations

import threading

import pytest

from expansion.engine.answers import (
    KEPT_RULES,
    LEGACY_KEPT_RULE,
    extract_last_boxed,
    judge_answer,
    judge_completion,
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
    check = judge_answer("\\frac{1}{2}", "0.5")
    assert check.correct and check.math_verify and not check.string_match
    assert check.disagreement  # reported: only math-verify saw it


def test_string_match_rescues_what_math_verify_misreads():
    check = judge_answer("\\text{No}", "No")
    assert check.correct and check.string_match


def test_wrong_and_missing_answers():
    assert not judge_answer("3", "4").correct
    assert not judge_answer("3", "4").disagreement
    assert not judge_answer(None, "4").correct
    assert judge_completion("so the answer is \\boxed{2^{n-1}}", "2^(n-1)").correct


def test_checks_work_outside_the_main_thread():
    results = []
    thread = threading.Thread(target=lambda: results.append(judge_answer("1/2", "0.5").correct))
    thread.start()
    thread.join()
    assert results == [True]


# --- Kept rules on synthetic samples -------------------------------------------------------

TEXTS = ["no answer", "\\boxed{6}", "\\boxed{5}", "\\boxed{ 5 }", "\\boxed{7}"]


def test_release_rule_keeps_the_first_correct_trace_of_an_instruct_run():
    kept, verdicts = mark_kept(TEXTS, "5", problem_key="p1", rule="release")
    assert kept == [False, False, True, False, False]
    assert [v.correct for v in verdicts] == [False, False, True, True, False]
    assert verdicts[0].predicted is None
    none_right, _ = mark_kept(["\\boxed{1}", "x"], "5", problem_key="p1", rule="release")
    assert none_right == [False, False]


def test_every_correct_rule_keeps_every_correct_trace():
    kept, _ = mark_kept(TEXTS, "5", problem_key="p1", rule="every_correct")
    assert kept == [False, False, True, True, False]


def test_all_rule_keeps_everything_and_still_grades():
    kept, verdicts = mark_kept(TEXTS, "5", problem_key="p1", rule="all")
    assert kept == [True] * 5 and verdicts[2].correct and not verdicts[1].correct


@pytest.mark.parametrize("rule", ["release", LEGACY_KEPT_RULE])
def test_proofs_keep_one_seeded_trace_ungraded(rule):
    texts = [f"proof {i}" for i in range(32)]
    kept, verdicts = mark_kept(texts, None, problem_key="p1", seed=3, rule=rule)
    assert sum(kept) == 1 and verdicts == [None] * 32
    assert kept.index(True) == proof_pick("p1", 32, 3)
    picks = {proof_pick(f"p{i}", 32, 3) for i in range(40)}
    assert len(picks) > 10  # different problems keep different samples
    assert mark_kept(texts, None, problem_key="p1", seed=3, rule=rule)[0] == kept


def test_every_correct_keeps_all_ungraded_traces():
    kept, verdicts = mark_kept(["a", "b"], None, problem_key="p1", rule="every_correct")
    assert kept == [True, True] and verdicts == [None, None]


def test_reasoning_traces_are_not_graded_under_named_rules():
    # A reasoning trace is the thinking section alone: no box is expected, so no verdict.
    kept, verdicts = mark_kept(TEXTS, "5", problem_key="p1", seed=1, rule="release", reasoning=True)
    assert verdicts == [None] * 5
    assert kept == [i == proof_pick("p1", 5, 1) for i in range(5)]
    every, _ = mark_kept(TEXTS, "5", problem_key="p1", rule="every_correct", reasoning=True)
    assert every == [True] * 5


def test_legacy_rule_is_the_behaviour_before_rules_were_named():
    # Runs without a recorded rule: every correct trace, reasoning traces graded as before.
    kept, verdicts = mark_kept(TEXTS, "5", problem_key="p1", rule=LEGACY_KEPT_RULE, reasoning=True)
    assert kept == [False, False, True, True, False]
    assert verdicts[2].correct


def test_unknown_rules_are_refused():
    with pytest.raises(ValueError, match="unknown kept rule"):
        mark_kept(TEXTS, "5", problem_key="p1", rule="best")
    assert set(KEPT_RULES) == {"release", "every_correct", "all"}


# --- One checker: expansion and evaluation agree on every CHAMP answer ---------------------


def _champ_answers() -> list[str]:
    from curation.services.champ import champ_problems

    return [p.answer for p in champ_problems() if p.answer]


def test_expansion_and_evaluation_agree_on_every_champ_answer():
    """For each CHAMP answer, a trace boxing the answer itself or any of its stated
    alternatives ("A, or equivalently B"; a yes/no answer's bare word) is correct and kept by
    expansion, and judged correct by evaluation. Before the checkers were merged, expansion's
    plain check rejected the alternatives of up to 52 problems that evaluation accepted."""
    from expansion.engine.answers import answer_alternatives
    from training.evaluations import services as evaluation_services

    answers = _champ_answers()
    assert len(answers) >= 250
    disagreements = []
    alternatives_checked = 0
    for expected in answers:
        forms = answer_alternatives(expected)
        word = expected.split(",")[0].split()[0]
        if word.lower() in ("yes", "no") and word not in forms:
            forms.append(word)  # the bare word of a yes/no prose answer
        texts = [f"So the answer is \\boxed{{{form}}}." for form in forms]
        alternatives_checked += len(forms) - 1
        kept, verdicts = mark_kept(texts, expected, problem_key="k", rule="every_correct")
        evaluation = [
            evaluation_services.judge_completion(text, expected).correct for text in texts
        ]
        expansion = [bool(v and v.correct) for v in verdicts]
        if not (all(kept) and all(expansion) and all(evaluation)):
            disagreements.append((expected, forms, kept, expansion, evaluation))
    assert alternatives_checked > 20  # CHAMP does state alternatives
    assert disagreements == []
