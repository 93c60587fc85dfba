"""The three views' prompts: exact texts, chat template, trimming, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expansion.engine.prompts import (
    NEGATIVE_TEMPLATE,
    PRIVILEGED_TEMPLATE,
    PromptError,
    PromptTemplates,
    build_view_prompts,
    render_view_texts,
    thinking_end_token_ids,
)
from tests.engine.conftest import build_tiny_tokenizer

PROBLEM = "Find $x$ if $2x + 1 = 7$."
SOLUTION = "Subtract 1: $2x = 6$, so $x = \\boxed{3}$."
PARTIAL = "The final answer is 3. Intermediate results used in the solution might include: 6."


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_default_texts_are_the_release_prompts():
    templates = PromptTemplates()
    learner = templates.user_turn("learner", PROBLEM)
    assert learner == f"## Problem:\n{PROBLEM}\n\nBegin your step-by-step thinking process.\n"
    privileged = templates.user_turn("privileged", PROBLEM, solution=SOLUTION)
    assert privileged.startswith("You are an expert mathematician solving the following problem.")
    assert (
        f"## Problem:\n{PROBLEM}\n\nHint: To help you, here are reference solution(s)."
        in privileged
    )
    assert f"## Reference Solution(s):\n{SOLUTION}\n\nUse these only to guide" in privileged
    assert "directly use any intermediate derived number or result as given" in privileged
    assert privileged.endswith(
        "Now, solve the problem. Begin your step-by-step thinking process.\n"
    )
    negative = templates.user_turn("negative", PROBLEM, partial=PARTIAL)
    assert negative.endswith(f"Hint: {PARTIAL}\n\nBegin your step-by-step thinking process.\n")


def test_placeholders_in_inputs_are_not_expanded():
    turn = PromptTemplates().user_turn("privileged", "uses {solution} literally", solution="S")
    assert "uses {solution} literally" in turn


def test_templates_round_trip_and_are_validated():
    custom = PromptTemplates(learner="Q: {problem}\n")
    assert PromptTemplates.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    with pytest.raises(PromptError, match="solution"):
        PromptTemplates(privileged="{problem} only")
    with pytest.raises(PromptError, match="unknown"):
        PromptTemplates.from_dict({"teacher": "x"})
    assert PromptTemplates().privileged == PRIVILEGED_TEMPLATE
    assert PromptTemplates().negative == NEGATIVE_TEMPLATE


def test_chat_template_applied_with_assistant_turn_open(tiny_tokenizer):
    prompts = build_view_prompts(tiny_tokenizer, PROBLEM, SOLUTION, PARTIAL)
    learner = decode(tiny_tokenizer, prompts.learner_ids)
    assert learner.startswith("<|im_start|>user\n## Problem:\n")
    assert learner.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert SOLUTION in decode(tiny_tokenizer, prompts.privileged_ids)
    assert PARTIAL in decode(tiny_tokenizer, prompts.negative_ids)
    assert SOLUTION not in decode(tiny_tokenizer, prompts.negative_ids)
    texts = render_view_texts(tiny_tokenizer, PROBLEM, SOLUTION, PARTIAL)
    assert texts["learner"] == learner


def test_reasoning_models_open_with_think_and_forbid_its_end(tiny_tokenizer):
    prompts = build_view_prompts(tiny_tokenizer, PROBLEM, SOLUTION, PARTIAL, reasoning=True)
    for view in ("learner", "privileged", "negative"):
        assert decode(tiny_tokenizer, prompts.ids(view)).endswith("assistant\n<think>")
    assert thinking_end_token_ids(tiny_tokenizer) == (
        tiny_tokenizer.convert_tokens_to_ids("</think>"),
    )


def test_multiple_solutions_are_numbered(tiny_tokenizer):
    prompts = build_view_prompts(tiny_tokenizer, PROBLEM, ["First way.", "Second way."], PARTIAL)
    text = decode(tiny_tokenizer, prompts.privileged_ids)
    assert "Solution 1:\nFirst way.\n\nSolution 2:\nSecond way." in text
    assert prompts.solutions_used == 2


def test_trimming_drops_trailing_solutions_first(tiny_tokenizer):
    solutions = ["A" * 40, "B" * 40, "C" * 40]
    full = build_view_prompts(tiny_tokenizer, PROBLEM, solutions, PARTIAL)
    two = build_view_prompts(tiny_tokenizer, PROBLEM, solutions[:2], PARTIAL)
    trimmed = build_view_prompts(
        tiny_tokenizer, PROBLEM, solutions, PARTIAL, max_prompt_tokens=len(two.privileged_ids)
    )
    assert len(full.privileged_ids) > len(two.privileged_ids)
    assert trimmed.privileged_ids == two.privileged_ids
    assert (trimmed.solutions_given, trimmed.solutions_used) == (3, 2)
    assert not trimmed.solution_truncated


def test_last_solution_is_cut_when_one_alone_does_not_fit(tiny_tokenizer):
    budget = len(build_view_prompts(tiny_tokenizer, PROBLEM, "x", "y").privileged_ids) + 10
    prompts = build_view_prompts(
        tiny_tokenizer, PROBLEM, ["D" * 100, "E" * 100], "F" * 3000, max_prompt_tokens=budget
    )
    assert prompts.solutions_used == 1 and prompts.solution_truncated
    assert len(prompts.privileged_ids) <= budget
    assert "DDDD" in decode(tiny_tokenizer, prompts.privileged_ids)
    assert prompts.partial_solution_truncated and len(prompts.negative_ids) <= budget


def test_problem_alone_too_long_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(PromptError, match="problem alone needs"):
        build_view_prompts(tiny_tokenizer, "P" * 500, SOLUTION, PARTIAL, max_prompt_tokens=100)
    learner = len(build_view_prompts(tiny_tokenizer, PROBLEM, SOLUTION, PARTIAL).learner_ids)
    # Fits the learner prompt but not the privileged one's fixed instructions.
    with pytest.raises(PromptError, match="does not fit"):
        build_view_prompts(tiny_tokenizer, PROBLEM, SOLUTION, PARTIAL, max_prompt_tokens=learner)


@pytest.mark.parametrize(
    ("problem", "solution"),
    [("  ", SOLUTION), (PROBLEM, " "), (PROBLEM, []), (PROBLEM, ["ok", ""])],
)
def test_empty_problem_or_solution_is_rejected(tiny_tokenizer, problem, solution):
    with pytest.raises(PromptError, match="empty"):
        build_view_prompts(tiny_tokenizer, problem, solution, PARTIAL)


def test_missing_chat_template_names_the_model():
    tokenizer = build_tiny_tokenizer(chat_template=None)
    with pytest.raises(PromptError, match="tiny-byte-tokenizer"):
        build_view_prompts(tokenizer, PROBLEM, SOLUTION, PARTIAL)


@pytest.mark.slow
def test_real_chat_template(embedded_model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    prompts = build_view_prompts(tokenizer, PROBLEM, SOLUTION, PARTIAL, max_prompt_tokens=2048)
    text = tokenizer.decode(prompts.privileged_ids)
    assert text.rstrip().endswith("<|im_start|>assistant")
    assert SOLUTION in text
    assert thinking_end_token_ids(tokenizer) == ()  # SmolLM2 has no </think> token
