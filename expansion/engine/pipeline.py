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
from expansion.engine.prompts import (
    PromptError,
    PromptTemplates,
    ViewPrompts,
    build_view_prompts,
)
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
    label: str = ""  # how messages name the item (default: its key)


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
    prompts = []
    for item in items:
        try:
            prompts.append(
                build_view_prompts(
                    tokenizer,
                    item.problem,
                    item.solution,
                    item.partial_solution,
                    templates,
                    reasoning=reasoning,
                    max_prompt_tokens=max_prompt_tokens,
                )
            )
        except PromptError as exc:
            raise PromptError(f"{item.label or item.key}: {exc}") from exc
    return prompts


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


ItemCallback = Callable[[int, list["ExpandedTrace"]], None]  # (item index, its traces)


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
    on_item: ItemCallback | None = None,
) -> list[ExpandedTrace]:
    """Expand every item `samples` times; traces come back grouped by item, in order.

    All items' sequences go to the backend at once, so its batch holds samples of many
    problems. As soon as every sample of an item has finished, the item is scored (together
    with the items that finished in the same engine step), its traces are marked kept by
    `kept_rule` (reasoning traces are not graded) and handed to `on_item(item_index, traces)`:
    a caller can store a problem while others are still decoding. The backend is asked to
    record the scores of the views it consults (`score_top_n`), so scoring reads only the
    others. Progress: stage "rollout" (tokens) and "scoring" (sequences), each counted over
    the whole call."""
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
    finished: dict[int, dict[int, RolloutResult]] = {i: {} for i in range(len(items))}
    waiting: list[int] = []  # items whose samples have all finished, not yet scored
    expanded: dict[int, list[ExpandedTrace]] = {}
    scored = [0]

    def score_waiting() -> None:
        batch = [(i, s) for i in waiting for s in range(samples)]
        done_before = scored[0]
        scores = score_traces(
            model,
            [
                ScoringRequest(
                    prompts[i].learner_ids,
                    prompts[i].privileged_ids,
                    prompts[i].negative_ids,
                    finished[i][s].token_ids.tolist(),
                    known_scores=finished[i][s].view_scores,
                )
                for i, s in batch
            ],
            top_n=top_n,
            progress=lambda done, _total: report("scoring", done_before + done // 3, len(rows)),
        )
        scored[0] += len(batch)
        for offset, index in enumerate(list(waiting)):
            item_scores = scores[offset * samples : (offset + 1) * samples]
            expanded[index] = _item_traces(
                tokenizer,
                items[index],
                index,
                [finished[index][s] for s in range(samples)],
                item_scores,
                seed=config.seed,
                kept_rule=kept_rule,
                reasoning=reasoning,
                shortcut_threshold=shortcut_threshold,
            )
            if on_item is not None:
                on_item(index, expanded[index])
        waiting.clear()

    def on_finished(results: list[tuple[int, RolloutResult]]) -> None:
        for n, result in results:
            item, sample = rows[n]
            finished[item][sample] = result
            if len(finished[item]) == samples:
                waiting.append(item)
        if waiting:
            score_waiting()

    backend.rollout(
        requests,
        config,
        progress=lambda done, total: report("rollout", done, total),
        on_finished=on_finished,
        score_top_n=top_n,
    )
    return [trace for index in range(len(items)) for trace in expanded[index]]


def _item_traces(
    tokenizer: Any,
    item: ExpansionItem,
    index: int,
    results: list[RolloutResult],
    scores: list[TokenScores],
    *,
    seed: int,
    kept_rule: str,
    reasoning: bool,
    shortcut_threshold: float,
) -> list[ExpandedTrace]:
    """One item's traces with their arrays, shortcut summaries and kept marks."""
    arrays = [trace_arrays(tokenizer, r, sc) for r, sc in zip(results, scores, strict=True)]
    kept, checks = mark_kept(
        [a.text for a in arrays],
        item.answer,
        problem_key=item.key,
        seed=seed,
        rule=kept_rule,
        reasoning=reasoning,
    )
    return [
        ExpandedTrace(
            item_index=index,
            sample_index=sample,
            arrays=arrays[sample],
            finish_reason=result.finish_reason,
            error=result.error,
            fallback_share=result.fallback_share,
            shortcut=summarise_shortcuts(scores[sample].shortcut_scores, shortcut_threshold),
            kept=kept[sample],
            answer_check=checks[sample],
        )
        for sample, result in enumerate(results)
    ]


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
