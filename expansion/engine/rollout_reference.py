"""The reference mixed-policy rollout: one token at a time, both views called every token.

This is DAIL step 1 as the release runs it (both engines queried once per token), written to
be read: prefill both prompts, then per position take both views' next-token distributions,
apply the rule (`sampling.mixed_policy_decisions`), end the sequence or keep the token by the
commit rules every engine shares (`rollout.token_ending`, `length_ending`), feed it to both
contexts. It is the oracle the fast engine is tested against and the baseline the benchmark
compares with.

`batch_size` > 1 steps several sequences in lockstep (left-padded) to make slow tests
affordable; each sequence's tokens are the same as with `batch_size=1` up to float rounding.

This module knows nothing about tokenizers or prompts (requests are token ids), nor about
drafting, blocks or rollback.

Departures from the release: see `sampling` (threshold probability, tau = 0 / 1, forbidden
tokens, temperature) and `rollout` (EOS handling).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from expansion.engine import model_views
from expansion.engine.rollout import (
    SOURCE_LEARNER,
    SOURCE_PRIVILEGED,
    Ending,
    FinishedCallback,
    ProgressCallback,
    RolloutConfig,
    RolloutRequest,
    RolloutResult,
    RolloutStats,
    finished_result,
    length_ending,
    token_ending,
    validate_requests,
)
from expansion.engine.sampling import (
    chosen_logprobs,
    keyed_uniforms,
    mixed_policy_decisions,
    next_token_distributions,
)


def resolve_config(model: Any, config: RolloutConfig) -> RolloutConfig:
    """Fill in the model's EOS ids when the config names none."""
    if config.eos_token_ids:
        return config
    return RolloutConfig.from_dict(
        {**config.to_dict(), "eos_token_ids": list(model_views.default_eos_token_ids(model))}
    )


@torch.inference_mode()
def reference_rollout(
    model: Any,
    requests: Sequence[RolloutRequest],
    config: RolloutConfig,
    *,
    batch_size: int = 1,
    progress: ProgressCallback | None = None,
    stats: RolloutStats | None = None,
    on_finished: FinishedCallback | None = None,
) -> list[RolloutResult]:
    """Expand every request with the per-token two-view loop (`batch_size` at a time)."""
    config = resolve_config(model, config)
    validate_requests(requests, model_views.vocab_size(model))
    stats = stats if stats is not None else RolloutStats()
    started = time.perf_counter()
    results: list[RolloutResult] = []
    total = len(requests) * config.max_new_tokens
    with model_views.grouped_attention(model):
        for start in range(0, len(requests), batch_size):
            chunk = list(requests[start : start + batch_size])
            finished = _rollout_lockstep(model, chunk, config, stats)
            if on_finished is not None:
                on_finished([(len(results) + n, result) for n, result in enumerate(finished)])
            results.extend(finished)
            if progress is not None:
                progress(len(results) * config.max_new_tokens, total)
    stats.seconds += time.perf_counter() - started
    return results


def _rollout_lockstep(
    model: Any, requests: list[RolloutRequest], config: RolloutConfig, stats: RolloutStats
) -> list[RolloutResult]:
    device = model_views.model_device(model)
    views = (config.proposer, config.verifier)
    forbidden = torch.tensor(config.forbidden_token_ids, dtype=torch.long, device=device)
    keys = np.array([r.sequence_key for r in requests], dtype=np.int64)
    batch = len(requests)

    # Prefill: each view reads its own prompt; keep the logits of the last prompt token.
    caches, valid, next_position, logits = {}, {}, {}, {}
    for view in views:
        ids, valid[view] = model_views.left_pad([r.prompt_ids(view) for r in requests], device)
        caches[view] = model_views.new_cache(model)
        positions = model_views.positions_from_valid(valid[view])  # (B, P)
        logits[view] = model_views.forward_logits(
            model, view, ids, valid[view], positions, caches[view], logits_to_keep=1
        )[:, -1]  # (B, V)
        next_position[view] = valid[view].sum(dim=1)  # (B,)
        stats.forward_passes += 1

    columns: dict[str, list[list[Any]]] = {
        name: [[] for _ in requests]
        for name in ("token_ids", "sources", "draws", "learner", "privileged")
    }
    finish: list[Ending | None] = [None] * batch
    proposer_source = SOURCE_LEARNER if config.proposer == "learner" else SOURCE_PRIVILEGED
    verifier_source = 1 - proposer_source

    for position in range(config.max_new_tokens):
        dists = {
            view: next_token_distributions(
                logits[view],
                temperature=config.temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                forbidden_token_ids=forbidden,
                in_place=True,
            )
            for view in views
        }
        uniforms = keyed_uniforms(
            config.seed, keys, np.full((batch, 1), position), config.max_draws + 1
        )[:, 0]  # (B, R + 1)
        decisions = mixed_policy_decisions(
            dists[config.proposer],
            dists[config.verifier],
            torch.from_numpy(uniforms).to(device),
            tau=config.tau,
            acceptance=config.acceptance,
        )
        token_ids = decisions.token_ids  # (B,)
        view_logprobs = {
            view: chosen_logprobs(
                logits[view], dists[view], token_ids, temperature=config.temperature
            ).tolist()
            for view in views
        }
        for row in range(batch):
            if finish[row] is not None:
                continue
            token = int(token_ids[row])
            failed = [view for view in views if not bool(dists[view].finite[row])]
            finish[row] = token_ending(token, failed, position, config.eos_token_ids)
            if finish[row] is not None:
                continue
            accepted = bool(decisions.accepted[row])
            columns["token_ids"][row].append(token)
            columns["sources"][row].append(proposer_source if accepted else verifier_source)
            columns["draws"][row].append(int(decisions.draws[row]))
            columns["learner"][row].append(view_logprobs["learner"][row])
            columns["privileged"][row].append(view_logprobs["privileged"][row])
            stats.tokens += 1
            stats.fallbacks += 0 if accepted else 1
            finish[row] = length_ending(len(columns["token_ids"][row]), config)
        if all(f is not None for f in finish):
            break
        # Feed the chosen token to both views (finished rows are fed too and ignored).
        for view in views:
            valid[view] = torch.cat(
                [valid[view], torch.ones((batch, 1), dtype=torch.bool, device=device)], dim=1
            )
            logits[view] = model_views.forward_logits(
                model,
                view,
                token_ids[:, None],
                valid[view],
                next_position[view][:, None],
                caches[view],
                logits_to_keep=1,
            )[:, -1]  # (B, V)
            next_position[view] = next_position[view] + 1
            stats.forward_passes += 1

    results = []
    for row, request in enumerate(requests):
        ending = finish[row]
        assert ending is not None  # every row ends by max_new_tokens at the latest
        results.append(
            finished_result(
                request,
                config,
                columns["token_ids"][row],
                columns["sources"][row],
                columns["draws"][row],
                columns["learner"][row],
                columns["privileged"][row],
                finish_reason=ending[0],
                error=ending[1],
            )
        )
    return results


class ReferenceBackend:
    """`RolloutBackend` running the per-token loop one sequence at a time (the baseline)."""

    def __init__(self, model: Any, batch_size: int = 1) -> None:
        self.model = model
        self.batch_size = batch_size
        self.last_stats = RolloutStats()

    def rollout(
        self,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        progress: ProgressCallback | None = None,
        on_finished: FinishedCallback | None = None,
        score_top_n: int | None = None,  # records no scores: scoring computes every view
    ) -> list[RolloutResult]:
        self.last_stats = RolloutStats()
        return reference_rollout(
            self.model,
            requests,
            config,
            batch_size=self.batch_size,
            progress=progress,
            stats=self.last_stats,
            on_finished=on_finished,
        )
