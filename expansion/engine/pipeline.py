"""Expand a batch of problems end to end: prompts -> mixed-policy rollout -> scoring under the
three views -> character offsets -> a named kept rule (`answers.KEPT_RULES`; the release's by
default) -> compact per-token arrays.

This is the one place that strings the engine's steps together for a caller that holds a
loaded model (a Celery job, the CLI, a benchmark). It knows nothing about Django or storage:
items in, `ExpandedTrace`s out.

Reproducibility: in float32/float64 a seed gives the same traces whatever the backend's block
and batch settings; in bfloat16 (the GPU default) only with the same engine, block and batch
settings (see `rollout.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from expansion.engine.answers import (
    DEFAULT_KEPT_RULE,
    KEPT_RULES,
    LEGACY_KEPT_RULE,
    AnswerVerdict,
    mark_kept,
)
from expansion.engine.prompts import PromptTemplates, ViewPrompts, build_view_prompts
from expansion.engine.rollout import RolloutBackend, RolloutConfig, RolloutRequest, RolloutResult
from expansion.engine.sampling import sequence_key
from expansion.engine.scoring import (
    ScoringRequest,
    ShortcutSummary,
    TokenScores,
    score_traces,
    summarise_shortcuts,
)
from expansion.engine.trace_format import TraceArrays, char_offsets

StageProgress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class ExpansionItem:
    """One problem to expand: `key` seeds its randomness (and the proof pick)."""

    key: str
    problem: str
    solution: str | Sequence[str]
    partial_solution: str
    answer: str | None


@dataclass
class ExpandedTrace:
    item_index: int
    sample_index: int
    arrays: TraceArrays
    finish_reason: str
    error: str | None
    fallback_share: float
    shortcut: ShortcutSummary
    kept: bool
    answer_check: AnswerVerdict | None  # None: not graded (proof, reasoning trace)


def default_max_prompt_tokens(model: Any, config: RolloutConfig) -> int | None:
    """Room left for prompts in the model's context after the trace's token budget."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return None
    room = int(context) - config.max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={config.max_new_tokens} leaves no room for prompts in the model's "
            f"context of {context} tokens"
        )
    return room


def view_prompts_for(
    tokenizer: Any,
    items: Sequence[ExpansionItem],
    templates: PromptTemplates,
    *,
    reasoning: bool,
    max_prompt_tokens: int | None,
) -> list[ViewPrompts]:
    return [
        build_view_prompts(
            tokenizer,
            item.problem,
            item.solution,
            item.partial_solution,
            templates,
            reasoning=reasoning,
            max_prompt_tokens=max_prompt_tokens,
        )
        for item in items
    ]


def trace_arrays(tokenizer: Any, result: RolloutResult, scores: TokenScores) -> TraceArrays:
    text, lengths = char_offsets(tokenizer, result.token_ids)
    return TraceArrays(
        text=text,
        token_ids=result.token_ids,
        char_lengths=lengths,
        sources=result.sources,
        draws=result.draws,
        learner_logprobs=scores.learner_logprobs,
        privileged_logprobs=scores.privileged_logprobs,
        negative_logprobs=scores.negative_logprobs,
        privileged_top_ids=scores.privileged_top_ids,
        privileged_top_logprobs=scores.privileged_top_logprobs,
        negative_top_ids=scores.negative_top_ids,
        negative_top_logprobs=scores.negative_top_logprobs,
    )


def expand_items(
    model: Any,
    tokenizer: Any,
    backend: RolloutBackend,
    items: Sequence[ExpansionItem],
    *,
    config: RolloutConfig,
    samples: int,
    templates: PromptTemplates | None = None,
    reasoning: bool = False,
    top_n: int = 5,
    shortcut_threshold: float = 1.0,
    max_prompt_tokens: int | None = None,
    progress: StageProgress | None = None,
    kept_rule: str = DEFAULT_KEPT_RULE,
) -> list[ExpandedTrace]:
    """Expand every item `samples` times; traces come back grouped by item, in order. Each
    problem's traces are marked kept by `kept_rule` (reasoning traces are not graded)."""
    if samples < 1:
        raise ValueError("samples must be at least 1")
    if kept_rule != LEGACY_KEPT_RULE and kept_rule not in KEPT_RULES:  # before any rollout
        raise ValueError(f"unknown kept rule {kept_rule!r}; choose one of {', '.join(KEPT_RULES)}")
    templates = templates or PromptTemplates()
    report = progress or (lambda stage, done, total: None)
    if max_prompt_tokens is None:
        max_prompt_tokens = default_max_prompt_tokens(model, config)
    prompts = view_prompts_for(
        tokenizer, items, templates, reasoning=reasoning, max_prompt_tokens=max_prompt_tokens
    )
    rows = [(i, s) for i in range(len(items)) for s in range(samples)]
    requests = [
        RolloutRequest(
            prompts[i].learner_ids, prompts[i].privileged_ids, sequence_key(items[i].key, s)
        )
        for i, s in rows
    ]
    results = backend.rollout(
        requests, config, progress=lambda done, total: report("rollout", done, total)
    )
    scores = score_traces(
        model,
        [
            ScoringRequest(
                prompts[i].learner_ids,
                prompts[i].privileged_ids,
                prompts[i].negative_ids,
                results[n].token_ids.tolist(),
            )
            for n, (i, _s) in enumerate(rows)
        ],
        top_n=top_n,
        progress=lambda done, total: report("scoring", done, total),
    )
    expanded: list[ExpandedTrace] = []
    for index, item in enumerate(items):
        indices = [n for n, (i, _s) in enumerate(rows) if i == index]
        arrays = [trace_arrays(tokenizer, results[n], scores[n]) for n in indices]
        kept, checks = mark_kept(
            [a.text for a in arrays],
            item.answer,
            problem_key=item.key,
            seed=config.seed,
            rule=kept_rule,
            reasoning=reasoning,
        )
        for sample, n in enumerate(indices):
            expanded.append(
                ExpandedTrace(
                    item_index=index,
                    sample_index=sample,
                    arrays=arrays[sample],
                    finish_reason=results[n].finish_reason,
                    error=results[n].error,
                    fallback_share=results[n].fallback_share,
                    shortcut=summarise_shortcuts(scores[n].shortcut_scores, shortcut_threshold),
                    kept=kept[sample],
                    answer_check=checks[sample],
                )
            )
    return expanded


def rescore_negative(
    model: Any,
    tokenizer: Any,
    item: ExpansionItem,
    response_ids: Sequence[int],
    *,
    templates: PromptTemplates | None = None,
    reasoning: bool = False,
) -> Any:
    """log p_NR of every response token under a (possibly edited) partial solution: one
    prefill of the negative-reference prompt + the finished trace. Returns (T,) float32."""
    import numpy as np
    import torch

    from expansion.engine.model_views import model_device, view_context

    prompts = view_prompts_for(
        tokenizer,
        [item],
        templates or PromptTemplates(),
        reasoning=reasoning,
        max_prompt_tokens=None,
    )[0]
    prompt = list(prompts.negative_ids)
    response = [int(t) for t in response_ids]
    if not response:
        return np.zeros(0, dtype=np.float32)
    ids = torch.tensor([prompt + response], device=model_device(model))  # (1, P + T)
    with torch.inference_mode(), view_context(model, "negative"):
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # (T, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(response, device=logprobs.device).unsqueeze(1)  # (T, 1)
    return logprobs.gather(1, target).squeeze(1).cpu().numpy().astype(np.float32)
