"""Per-token scores of finished traces: three views' log-probs, PS/NR alternatives, shortcuts.

After a trace is expanded, one prefill pass per view over `prompt + trace` gives, for every
trace token r_i, `log p_L(r_i)`, `log p_PS(r_i)`, `log p_NR(r_i)` (full softmax, temperature 1:
the distributions the training objective compares) and the top-N alternatives of PS and NR
for the reviewer. Traces are batched per view (traces right-padded so trace positions line
up; only trace positions go through the output layer), in micro-batches bounded by tokens and
by logits size. The prompts are read first by `model_views.prefill`, as the engines read
theirs: each distinct prompt once (the samples of a problem share it), the prefix all prompts
share once, the rest in groups of similar length; the traces are then read on top. A view
whose scores the rollout engine already recorded (`ScoringRequest.known_scores`,
`rollout.ViewScores`, from the same `normalised_top`) is not read again.

`shortcut_scores` gives delta_i = log p_NR(r_i) - log p_PS(r_i) and `summarise_shortcuts` the
per-trace max, mean of the positive part and share of tokens above a threshold.

This module knows nothing about tokenizers, prompts or the rollout rule; views are as in
`model_views` (learner = adapter on; privileged and negative = adapter off).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from expansion.engine import model_views
from expansion.engine.rollout import ViewScores

SCORED_VIEWS = ("learner", "privileged", "negative")
DEFAULT_SHORTCUT_THRESHOLD = 1.0  # nats: NR finds the token e times likelier than PS


@dataclass(frozen=True)
class ScoringRequest:
    """A finished trace and the three prompts it is scored under; `known_scores` holds the
    views already scored (by the rollout engine), which are taken as they are."""

    learner_prompt_ids: Sequence[int]
    privileged_prompt_ids: Sequence[int]
    negative_prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    known_scores: Mapping[str, ViewScores] = field(default_factory=dict)

    def known(self, view: str, top_n: int) -> ViewScores | None:
        """The view's recorded scores when they cover every token and `top_n` alternatives."""
        scores = self.known_scores.get(view)
        if scores is None or len(scores.logprobs) != len(self.response_ids):
            return None
        return scores if scores.top_ids.shape[1] >= top_n else None

    def prompt_ids(self, view: str) -> Sequence[int]:
        return {
            "learner": self.learner_prompt_ids,
            "privileged": self.privileged_prompt_ids,
            "negative": self.negative_prompt_ids,
        }[view]


@dataclass
class TokenScores:
    """Per-token scores of one trace (T tokens, N alternatives)."""

    learner_logprobs: np.ndarray  # (T,) float32
    privileged_logprobs: np.ndarray  # (T,) float32
    negative_logprobs: np.ndarray  # (T,) float32
    privileged_top_ids: np.ndarray  # (T, N) int64, most likely first
    privileged_top_logprobs: np.ndarray  # (T, N) float32
    negative_top_ids: np.ndarray  # (T, N) int64
    negative_top_logprobs: np.ndarray  # (T, N) float32

    @property
    def shortcut_scores(self) -> np.ndarray:
        return shortcut_scores(self.negative_logprobs, self.privileged_logprobs)


@dataclass(frozen=True)
class ShortcutSummary:
    max: float
    mean_positive: float
    share_above: float
    threshold: float


def shortcut_scores(negative_logprobs: np.ndarray, privileged_logprobs: np.ndarray) -> np.ndarray:
    """delta_i = log p_NR(r_i) - log p_PS(r_i), (T,) float32."""
    negative = np.asarray(negative_logprobs, dtype=np.float32)
    privileged = np.asarray(privileged_logprobs, dtype=np.float32)
    return negative - privileged


def summarise_shortcuts(
    scores: np.ndarray, threshold: float = DEFAULT_SHORTCUT_THRESHOLD
) -> ShortcutSummary:
    """Per-trace summary: max delta, mean of max(delta, 0), share of tokens with delta > t."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return ShortcutSummary(0.0, 0.0, 0.0, threshold)
    return ShortcutSummary(
        max=float(scores.max()),
        mean_positive=float(np.clip(scores, 0.0, None).mean()),
        share_above=float((scores > threshold).mean()),
        threshold=threshold,
    )


@torch.inference_mode()
def score_traces(
    model: Any,
    requests: Sequence[ScoringRequest],
    *,
    top_n: int = 5,
    max_batch_tokens: int = 16384,
    max_logit_elements: int = 1 << 27,
    progress: Callable[[int, int], None] | None = None,
) -> list[TokenScores]:
    """Score every trace under the three views (batched prefills; a view a request already
    knows is taken from it)."""
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    per_view: dict[str, list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]] = {}
    steps, done = len(SCORED_VIEWS) * len(requests), 0
    with model_views.grouped_attention(model):
        for view in SCORED_VIEWS:
            want_top = top_n if view != "learner" else 0
            results: list[Any] = [None] * len(requests)
            unknown = []
            for index, request in enumerate(requests):
                known = request.known(view, want_top)
                if known is None:
                    unknown.append(index)
                elif want_top:
                    top = known.top_ids[:, :want_top], known.top_logprobs[:, :want_top]
                    results[index] = (known.logprobs, *top)
                else:
                    results[index] = (known.logprobs, None, None)
            done += len(requests) - len(unknown)
            if progress is not None and len(unknown) < len(requests):
                progress(done, steps)
            for batch in _micro_batches(
                model, requests, unknown, view, max_batch_tokens, max_logit_elements
            ):
                scored = _score_batch(model, requests, batch, view, want_top)
                for index, item in zip(batch, scored, strict=True):
                    results[index] = item
                done += len(batch)
                if progress is not None:
                    progress(done, steps)
            per_view[view] = results
    out = []
    for index in range(len(requests)):
        learner, _, _ = per_view["learner"][index]
        privileged, p_ids, p_lps = per_view["privileged"][index]
        negative, n_ids, n_lps = per_view["negative"][index]
        out.append(
            TokenScores(learner, privileged, negative, p_ids, p_lps, n_ids, n_lps)  # type: ignore[arg-type]
        )
    return out


def normalised_top(
    logits: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The softmax every scored view uses (raw logits (N, V), temperature 1, no token
    removed): its log-normaliser (N,) and top-`top_n` ids (N, n) and log-probs (N, n), float32.
    A token's log-prob is its logit minus the normaliser. Scoring and the fast engine (which
    records the views it consults, `rollout.ViewScores`) both use it, so their numbers agree."""
    raw = logits.float()
    normalizer = torch.logsumexp(raw, dim=-1)  # (N,)
    if not top_n:
        empty = raw.new_zeros((raw.shape[0], 0))
        return normalizer, empty.long(), empty
    values, ids = raw.topk(top_n, dim=-1)  # (N, n)
    return normalizer, ids, values - normalizer[:, None]


def _micro_batches(
    model: Any,
    requests: Sequence[ScoringRequest],
    indices: Sequence[int],
    view: str,
    max_batch_tokens: int,
    max_logit_elements: int,
) -> list[list[int]]:
    """The given request indices grouped by prompt, then by similar length, within the token
    budget (a shared prompt counted once) and the logits budget."""
    vocab = model_views.vocab_size(model)
    order = sorted(
        indices,
        key=lambda i: (
            len(requests[i].prompt_ids(view)),
            tuple(requests[i].prompt_ids(view)),
            len(requests[i].response_ids),
        ),
    )
    batches: list[list[int]] = []
    current: list[int] = []
    prompts: set[tuple[int, ...]] = set()
    prompt_max = response_max = 0
    for index in order:
        prompt = tuple(requests[index].prompt_ids(view))
        p = max(prompt_max, len(prompt))
        r = max(response_max, len(requests[index].response_ids))
        rows = len(current) + 1
        distinct = len(prompts | {prompt})
        fits = (
            distinct * p + rows * r <= max_batch_tokens and rows * r * vocab <= max_logit_elements
        )
        if current and not fits:
            batches.append(current)
            current, prompts = [], set()
            p, r = len(prompt), len(requests[index].response_ids)
        current.append(index)
        prompts.add(prompt)
        prompt_max, response_max = p, r
    if current:
        batches.append(current)
    return batches


def _trace_logits(
    model: Any, view: str, prompts: list[list[int]], responses: list[list[int]]
) -> torch.Tensor:
    """Logits predicting every trace position: (B, T, V), T the longest trace.

    The prompts are read by `model_views.prefill` (distinct prompts once, their shared prefix
    once; the logits of each prompt's last position predict trace token 0); the traces then
    go through in one pass on top."""
    device = model_views.model_device(model)
    read = model_views.prefill(model, view, prompts, last_logits=True)
    assert read.last_logits is not None
    first = read.last_logits[:, None]  # (B, 1, V)
    response_len = max(len(r) for r in responses)
    if response_len <= 1:
        return first
    traces = torch.zeros((len(responses), response_len - 1), dtype=torch.long)
    trace_valid = torch.zeros_like(traces, dtype=torch.bool)
    for row, response in enumerate(responses):
        # The last trace token predicts nothing that is scored: read tokens 0 .. T - 2.
        head = response[:-1]
        traces[row, : len(head)] = torch.tensor(head, dtype=torch.long)
        trace_valid[row, : len(head)] = True
    traces, trace_valid = traces.to(device), trace_valid.to(device)
    valid = torch.cat([read.valid, trace_valid], dim=1)  # (B, P + T - 1)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    trace_positions = lengths[:, None] + torch.arange(response_len - 1, device=device)[None, :]
    rest = model_views.forward_logits(
        model, view, traces, valid, trace_positions, read.cache, response_len - 1
    )  # (B, T - 1, V)
    return torch.cat([first, rest], dim=1)


def _score_batch(
    model: Any, requests: Sequence[ScoringRequest], batch: list[int], view: str, top_n: int
) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    device = model_views.model_device(model)
    prompts = [list(requests[i].prompt_ids(view)) for i in batch]
    responses = [list(requests[i].response_ids) for i in batch]
    response_len = max(len(r) for r in responses)
    empty = np.zeros(0, dtype=np.float32)
    if response_len == 0:
        no_top = np.zeros((0, top_n), dtype=np.int64), np.zeros((0, top_n), dtype=np.float32)
        return [(empty, *no_top) if top_n else (empty, None, None) for _ in batch]
    rows = len(batch)
    logits = _trace_logits(model, view, prompts, responses)  # (B, T, V)
    targets = torch.zeros((rows, response_len), dtype=torch.long)
    for row, response in enumerate(responses):
        targets[row, : len(response)] = torch.tensor(response, dtype=torch.long)
    targets = targets.to(device)  # (B, T)
    logprobs = torch.empty(targets.shape, dtype=torch.float32, device=device)  # (B, T)
    top_ids = torch.zeros((rows, response_len, top_n), dtype=torch.long, device=device)
    top_lps = torch.zeros((rows, response_len, top_n), dtype=torch.float32, device=device)
    chunk = 256  # positions at a time, to bound float32 copies of the logits
    for start in range(0, response_len, chunk):
        part = logits[:, start : start + chunk]  # (B, c, V)
        width = part.shape[1]
        normalizer, ids, lps = normalised_top(part.flatten(0, 1), top_n)  # (B*c,), (B*c, N)
        picked = part.gather(-1, targets[:, start : start + chunk, None])[..., 0].float()
        logprobs[:, start : start + chunk] = picked - normalizer.view(rows, width)
        if top_n:
            top_lps[:, start : start + chunk] = lps.view(rows, width, top_n)
            top_ids[:, start : start + chunk] = ids.view(rows, width, top_n)
    logprobs_np, top_ids_np, top_lps_np = (
        logprobs.cpu().numpy(),
        top_ids.cpu().numpy(),
        top_lps.cpu().numpy(),
    )
    out = []
    for row, response in enumerate(responses):
        n = len(response)
        if top_n:
            out.append(
                (
                    logprobs_np[row, :n].copy(),
                    top_ids_np[row, :n].copy(),
                    top_lps_np[row, :n].copy(),
                )
            )
        else:
            out.append((logprobs_np[row, :n].copy(), None, None))
    return out
