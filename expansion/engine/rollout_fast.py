"""The fast mixed-policy rollout: many sequences at once, drafted in blocks, verified in one pass.

Per cycle, for every active sequence:
1. the *drafting* view feeds one token at a time through its KV cache and guesses the rule's
   outcome at each of K positions (the proposer guesses its first candidate; the verifier
   guesses its acceptable top token, else its own fallback sample);
2. the *checking* view reads the K drafted positions in ONE forward pass;
3. with both views' distributions known at every position, the rule is applied exactly
   (`sampling.mixed_policy_decisions`, keyed random numbers) position by position; the first
   position whose outcome differs from the draft is resolved by the rule (an accepted later
   candidate or a fallback), and both caches roll back to it;
4. sequences that hit EOS, `max_new_tokens` or non-finite logits leave the batch.

Which view drafts, the block size and the batch only change speed: the rule's outcome at a
position depends on (seed, sequence key, position) and the two distributions alone, so traces
equal the reference loop's (exactly in float64; up to float rounding otherwise).

Caches are rectangles with holes (left padding, rolled-back slots) hidden by the attention
mask; trailing holes are cropped each cycle and the rest compacted when they pile up. Prompts
shared by several samples are prefilled once and the cache rows repeated.

This module knows nothing about tokenizers, prompts or storage; nor about vLLM (a vLLM
backend implements the same `RolloutBackend` protocol).

Departures from the release: as `sampling` and `rollout` list; no others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from expansion.engine import model_views
from expansion.engine.rollout import (
    SOURCE_LEARNER,
    SOURCE_PRIVILEGED,
    VIEWS,
    ProgressCallback,
    RolloutConfig,
    RolloutRequest,
    RolloutResult,
    RolloutStats,
    finished_result,
    non_finite_message,
    token_reporter,
    validate_requests,
)
from expansion.engine.rollout_reference import resolve_config
from expansion.engine.sampling import (
    TokenDistributions,
    chosen_logprobs,
    keyed_uniforms,
    mixed_policy_decisions,
    next_token_distributions,
    proposer_guess,
    verifier_guess,
)

# Compact a cache when removable holes exceed this share of its slots (and this many slots).
COMPACT_SHARE = 0.25
COMPACT_MIN_SLOTS = 32


@torch.inference_mode()
def fast_rollout(
    model: Any,
    requests: Sequence[RolloutRequest],
    config: RolloutConfig,
    *,
    progress: ProgressCallback | None = None,
    stats: RolloutStats | None = None,
) -> list[RolloutResult]:
    """Expand every request; sequences are decoded `config.max_batch_size` at a time."""
    config = resolve_config(model, config)
    validate_requests(requests, model_views.vocab_size(model))
    stats = stats if stats is not None else RolloutStats()
    started = time.perf_counter()
    report = token_reporter(progress, len(requests) * config.max_new_tokens)

    results: list[RolloutResult] = []
    with model_views.grouped_attention(model):
        for start in range(0, len(requests), config.max_batch_size):
            chunk = list(requests[start : start + config.max_batch_size])
            results.extend(_Wave(model, chunk, config, stats).run(report))
    stats.seconds += time.perf_counter() - started
    return results


def _stack(parts: list[TokenDistributions]) -> TokenDistributions:
    """K per-step distributions over (B, ...) -> one over (B * K, ...) in (b, j) order."""
    stacked = {
        f.name: torch.stack([getattr(p, f.name) for p in parts], dim=1).flatten(0, 1)
        for f in fields(TokenDistributions)
    }
    return TokenDistributions(**stacked)


class _Wave:
    """One batch of sequences decoded together until every one has finished."""

    def __init__(
        self,
        model: Any,
        requests: list[RolloutRequest],
        config: RolloutConfig,
        stats: RolloutStats,
    ) -> None:
        self.model = model
        self.requests = requests
        self.config = config
        self.stats = stats
        self.device = model_views.model_device(model)
        self.forbidden = torch.tensor(
            config.forbidden_token_ids, dtype=torch.long, device=self.device
        )
        self.proposer, self.verifier = config.proposer, config.verifier
        draft_view = config.draft_view
        if draft_view == "auto":
            draft_view = "verifier" if config.tau >= 0.5 else "proposer"
        self.drafter = self.proposer if draft_view == "proposer" else self.verifier
        self.checker = self.verifier if self.drafter == self.proposer else self.proposer
        self.block = config.block_size
        self.eos = set(config.eos_token_ids)
        self.proposer_source = SOURCE_LEARNER if self.proposer == "learner" else SOURCE_PRIVILEGED
        self.verifier_source = 1 - self.proposer_source

        batch = len(requests)
        self.rows = list(range(batch))  # active row -> request index
        self.keys = np.array([r.sequence_key for r in requests], dtype=np.int64)
        self.done = np.zeros(batch, dtype=np.int64)  # tokens decided per active row
        self.outputs: list[dict[str, list[Any]]] = [
            {"token_ids": [], "sources": [], "draws": [], "learner": [], "privileged": []}
            for _ in requests
        ]
        self.finished: dict[int, tuple[str, str | None]] = {}
        self.cache: dict[str, Any] = {}
        self.valid: dict[str, torch.Tensor] = {}  # (B, slots) bool
        self.next_position: dict[str, torch.Tensor] = {}  # (B,) RoPE position of next input
        self.inputs: dict[str, torch.Tensor] = {}  # (B,) next token to feed
        for view in (self.drafter, self.checker):
            self._prefill(view)

    def _prefill(self, view: str) -> None:
        """Read each distinct prompt once except its last token, which is the first input."""
        prompts = [r.prompt_ids(view) for r in self.requests]
        distinct: dict[tuple[int, ...], int] = {}
        row_of = [distinct.setdefault(p, len(distinct)) for p in prompts]
        heads = [list(p[:-1]) for p in distinct]
        cache = model_views.new_cache(self.model)
        rows = torch.tensor(row_of, dtype=torch.long, device=self.device)
        if max(len(h) for h in heads) > 0:
            ids, valid = model_views.left_pad(heads, self.device)  # (U, P)
            positions = model_views.positions_from_valid(valid)  # (U, P)
            model_views.forward_logits(self.model, view, ids, valid, positions, cache, 1)
            self.stats.forward_passes += 1
            model_views.select_cache_rows(cache, rows)
            self.valid[view] = valid[rows]  # (B, P)
        else:
            self.valid[view] = torch.zeros((len(prompts), 0), dtype=torch.bool, device=self.device)
        self.cache[view] = cache
        self.next_position[view] = torch.tensor(
            [len(p) - 1 for p in prompts], dtype=torch.long, device=self.device
        )
        self.inputs[view] = torch.tensor([p[-1] for p in prompts], dtype=torch.long).to(self.device)

    def _distributions(self, logits: torch.Tensor) -> TokenDistributions:
        return next_token_distributions(
            logits,
            temperature=self.config.temperature,
            top_k=self.config.top_k,
            top_p=self.config.top_p,
            forbidden_token_ids=self.forbidden,
            in_place=True,
        )

    def run(self, report: Callable[[int], None]) -> list[RolloutResult]:
        while self.rows:
            self._cycle(report)
        return [
            finished_result(
                request,
                self.config,
                out["token_ids"],
                out["sources"],
                out["draws"],
                out["learner"],
                out["privileged"],
                finish_reason=self.finished[index][0],  # type: ignore[arg-type]
                error=self.finished[index][1],
            )
            for index, (request, out) in enumerate(zip(self.requests, self.outputs, strict=True))
        ]

    def _cycle(self, report: Callable[[int], None]) -> None:
        config, device = self.config, self.device
        batch = len(self.rows)
        remaining = config.max_new_tokens - self.done  # (B,)
        block = int(min(self.block, remaining.max()))
        draws = config.max_draws
        positions = self.done[:, None] + np.arange(block)[None, :]  # (B, K)
        uniforms = torch.from_numpy(
            keyed_uniforms(config.seed, self.keys, positions, draws + 1)
        ).to(device)  # (B, K, R + 1)

        # 1. Draft K tokens, one forward pass each.
        drafter, checker = self.drafter, self.checker
        drafts = torch.empty((batch, block), dtype=torch.long, device=device)  # (B, K)
        drafter_logits, drafter_dists = [], []
        token = self.inputs[drafter]  # (B,)
        ones = torch.ones((batch, 1), dtype=torch.bool, device=device)
        for j in range(block):
            self.valid[drafter] = torch.cat([self.valid[drafter], ones], dim=1)
            logits = model_views.forward_logits(
                self.model,
                drafter,
                token[:, None],
                self.valid[drafter],
                (self.next_position[drafter] + j)[:, None],
                self.cache[drafter],
                1,
            )[:, -1]  # (B, V)
            dist = self._distributions(logits)
            if drafter == self.proposer:
                token = proposer_guess(dist, uniforms[:, j])
            else:
                token = verifier_guess(
                    dist, uniforms[:, j], tau=config.tau, acceptance=config.acceptance
                )
            drafts[:, j] = token
            drafter_logits.append(logits)
            drafter_dists.append(dist)

        # 2. Check all K positions in one pass.
        checker_inputs = torch.cat([self.inputs[checker][:, None], drafts[:, :-1]], dim=1)  # (B, K)
        self.valid[checker] = torch.cat([self.valid[checker], ones.expand(batch, block)], dim=1)
        offsets = torch.arange(block, device=device)
        checker_logits = model_views.forward_logits(
            self.model,
            checker,
            checker_inputs,
            self.valid[checker],
            self.next_position[checker][:, None] + offsets[None, :],
            self.cache[checker],
            block,
        )  # (B, K, V)
        self.stats.forward_passes += block + 1
        self.stats.cycles += 1

        # 3. The rule at every (row, position).
        dists = {
            drafter: _stack(drafter_dists),  # (B*K, ...)
            checker: self._distributions(checker_logits.flatten(0, 1)),  # (B*K, ...)
        }
        decisions = mixed_policy_decisions(
            dists[self.proposer],
            dists[self.verifier],
            uniforms.flatten(0, 1),
            tau=config.tau,
            acceptance=config.acceptance,
        )
        temperature = config.temperature
        chosen = decisions.token_ids  # (B*K,)
        by_step = chosen.view(batch, block)  # (B, K)
        drafter_picked = torch.stack(
            [drafter_logits[j].gather(1, by_step[:, j : j + 1])[:, 0] for j in range(block)], dim=1
        )  # (B, K)
        logprobs = {
            drafter: drafter_picked.double().flatten() / temperature
            - dists[drafter].log_normalizer.double(),  # (B*K,)
            checker: chosen_logprobs(
                checker_logits.flatten(0, 1), dists[checker], chosen, temperature=temperature
            ),  # (B*K,)
        }
        # One device -> host copy per cycle.
        host = {
            "token": chosen.view(batch, block).cpu().numpy(),
            "draft": drafts.cpu().numpy(),
            "accepted": decisions.accepted.view(batch, block).cpu().numpy(),
            "draws": decisions.draws.view(batch, block).cpu().numpy(),
            "finite_learner": dists["learner"].finite.view(batch, block).cpu().numpy(),
            "finite_privileged": dists["privileged"].finite.view(batch, block).cpu().numpy(),
            "learner": logprobs["learner"].view(batch, block).float().cpu().numpy(),
            "privileged": logprobs["privileged"].view(batch, block).float().cpu().numpy(),
        }
        self._commit(host, block, remaining, report)

    def _commit(
        self,
        host: dict[str, np.ndarray],
        block: int,
        remaining: np.ndarray,
        report: Callable[[int], None],
    ) -> None:
        """Append decided tokens, finish rows, roll caches back to the first miss."""
        decided = np.zeros(len(self.rows), dtype=np.int64)  # positions decided per row
        finished_rows: list[int] = []
        fully_matched = 0
        tokens_done = 0
        for b, index in enumerate(self.rows):
            out = self.outputs[index]
            limit = int(min(block, remaining[b]))
            reason: tuple[str, str | None] | None = None
            count = 0
            matched = 0
            for j in range(limit):
                failed = [v for v in VIEWS if not host[f"finite_{v}"][b, j]]
                if failed:
                    reason = ("error", non_finite_message(failed, int(self.done[b]) + j))
                    break
                token = int(host["token"][b, j])
                count += 1
                if token in self.eos:
                    reason = ("eos", None)
                    break
                accepted = bool(host["accepted"][b, j])
                out["token_ids"].append(token)
                out["sources"].append(self.proposer_source if accepted else self.verifier_source)
                out["draws"].append(int(host["draws"][b, j]))
                out["learner"].append(float(host["learner"][b, j]))
                out["privileged"].append(float(host["privileged"][b, j]))
                self.stats.tokens += 1
                self.stats.fallbacks += 0 if accepted else 1
                if token != int(host["draft"][b, j]):
                    break
                matched += 1
            self.stats.drafted += limit
            self.stats.matched_drafts += matched
            fully_matched += int(matched == limit)
            decided[b] = count
            if reason is None and int(self.done[b]) + count >= self.config.max_new_tokens:
                reason = ("length", None)
            if reason is not None:
                self.finished[index] = reason
                finished_rows.append(b)
                tokens_done += self.config.max_new_tokens - int(self.done[b])
            else:
                tokens_done += count
        self.done += decided
        self._adapt_block(fully_matched / max(len(self.rows), 1))
        self._roll_back(decided, block, host)
        if finished_rows:
            self._drop_rows(finished_rows)
        report(tokens_done)

    def _adapt_block(self, fully_matched_share: float) -> None:
        if fully_matched_share >= 0.9:
            self.block = min(self.block * 2, self.config.max_block_size)
        elif fully_matched_share < 0.5:
            self.block = max(self.block // 2, 1)

    def _roll_back(self, decided: np.ndarray, block: int, host: dict[str, np.ndarray]) -> None:
        """Keep the first `decided` new slots of each row; feed the last decided token next."""
        device = self.device
        kept = torch.from_numpy(decided).to(device)  # (B,)
        new_valid = torch.arange(block, device=device)[None, :] < kept[:, None]  # (B, K)
        last = np.clip(decided - 1, 0, block - 1)
        next_inputs = torch.from_numpy(host["token"][np.arange(len(decided)), last]).to(device)
        keep_slots = int(decided.max()) if len(decided) else 0
        for view in (self.drafter, self.checker):
            old = self.valid[view].shape[1] - block
            valid = torch.cat([self.valid[view][:, :old], new_valid], dim=1)
            model_views.crop_cache(self.cache[view], old + keep_slots)
            self.valid[view] = valid[:, : old + keep_slots]
            self.next_position[view] = self.next_position[view] + kept
            self.inputs[view] = next_inputs
            self._maybe_compact(view)

    def _drop_rows(self, finished_rows: list[int]) -> None:
        keep = [b for b in range(len(self.rows)) if b not in set(finished_rows)]
        self.rows = [self.rows[b] for b in keep]
        if not self.rows:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.keys = self.keys[keep]
        self.done = self.done[keep]
        for view in (self.drafter, self.checker):
            model_views.select_cache_rows(self.cache[view], index)
            self.valid[view] = self.valid[view][index]
            self.next_position[view] = self.next_position[view][index]
            self.inputs[view] = self.inputs[view][index]

    def _maybe_compact(self, view: str) -> None:
        slots = self.valid[view].shape[1]
        removable = slots - int(self.valid[view].sum(dim=1).max())
        if removable >= max(COMPACT_MIN_SLOTS, COMPACT_SHARE * slots):
            self.valid[view] = model_views.compact_cache(self.cache[view], self.valid[view])


class TransformersBackend:
    """`RolloutBackend` on a transformers (optionally PEFT) model, using the fast engine."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.last_stats = RolloutStats()

    def rollout(
        self,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        progress: ProgressCallback | None = None,
    ) -> list[RolloutResult]:
        self.last_stats = RolloutStats()
        return fast_rollout(self.model, requests, config, progress=progress, stats=self.last_stats)
