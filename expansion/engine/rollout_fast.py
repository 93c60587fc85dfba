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
4. sequences that hit EOS, `max_new_tokens` or non-finite logits leave the batch, and the
   block grows or shrinks with the share of fully matched drafts (the commit rules every
   engine shares: `rollout.token_ending`, `length_ending`, `adapted_block_size`).

Which view drafts, the block size and the batch only change speed: the rule's outcome at a
position depends on (seed, sequence key, position) and the two distributions alone, so traces
equal the reference loop's (exactly in float64; up to float rounding otherwise). One known
difference: when a drafted token's keys/values are non-finite, the checker's one pass over the
block spreads NaN to the block's earlier positions (masked attention weights are 0, and
0 x NaN is NaN), so such a trace ends with the same non-finite error up to one block earlier
than in the reference (`tests/engine/test_commit_rules.py`).

Single view: with tau = 0 the rule accepts every first candidate and with tau = 1 it always
falls back, so only one view is consulted (one forward pass per token, as plain sampling costs;
the other view's log-probs are left NaN).

Scores on the way (`score_top_n`): every view the engine consults has its logits at every
committed token anyway, so it can record what scoring would compute from them
(`rollout.ViewScores`: temperature-1 log-prob of the chosen token and top-N alternatives, via
`scoring.normalised_top`, taken before forbidden tokens are removed); scoring then skips that
view's prefill (the privileged one, with the longest prompt, at tau = 1).

Continuous batching: up to `max_batch_size` sequences are in flight; when a quarter of the
slots are free, pending requests are prefilled and their cache rows appended (left-padded with
holes), and each finished request is handed to `on_finished` at once, so a caller can store a
problem's traces while the others are still decoding.

Caches are rectangles with holes (left padding, rolled-back slots) hidden by the attention
mask; trailing holes are cropped each cycle and the rest compacted when they pile up. Prompts
shared by several samples admitted together are prefilled once and the cache rows repeated.

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
    Ending,
    FinishedCallback,
    ProgressCallback,
    RolloutConfig,
    RolloutRequest,
    RolloutResult,
    RolloutStats,
    ViewScores,
    adapted_block_size,
    finished_result,
    length_ending,
    single_view,
    token_ending,
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
from expansion.engine.scoring import normalised_top

# Compact a cache when removable holes exceed this share of its slots (and this many slots).
COMPACT_SHARE = 0.25
COMPACT_MIN_SLOTS = 32


# Admit pending sequences when at least this share of the batch is free (or none is active):
# each admission prefills the newcomers and copies the caches once, so it is amortised.
ADMIT_SHARE = 0.25


@torch.inference_mode()
def fast_rollout(
    model: Any,
    requests: Sequence[RolloutRequest],
    config: RolloutConfig,
    *,
    progress: ProgressCallback | None = None,
    stats: RolloutStats | None = None,
    on_finished: FinishedCallback | None = None,
    score_top_n: int | None = None,
) -> list[RolloutResult]:
    """Expand every request, keeping up to `config.max_batch_size` sequences in flight: a
    finished sequence's slot goes to the next pending request (continuous batching).
    `on_finished` gets the requests that finished in each cycle; results come back in request
    order. With `score_top_n`, each result carries the `ViewScores` of the views consulted."""
    if score_top_n is not None and score_top_n < 0:
        raise ValueError(f"score_top_n must be >= 0, got {score_top_n}")
    config = resolve_config(model, config)
    validate_requests(requests, model_views.vocab_size(model))
    stats = stats if stats is not None else RolloutStats()
    started = time.perf_counter()
    report = token_reporter(progress, len(requests) * config.max_new_tokens)

    results: list[RolloutResult | None] = [None] * len(requests)
    pending = list(range(len(requests)))[::-1]  # popped from the end: request order
    admit_at = max(1, int(ADMIT_SHARE * config.max_batch_size))
    with model_views.grouped_attention(model):
        wave = _Wave(model, config, stats, score_top_n)
        while pending or wave.rows:
            free = config.max_batch_size - len(wave.rows)
            if pending and (free >= admit_at or not wave.rows):
                admitted = [pending.pop() for _ in range(min(free, len(pending)))]
                wave.admit([(index, requests[index]) for index in admitted])
            finished = wave.cycle(report)
            for index, result in finished:
                results[index] = result
            if finished and on_finished is not None:
                on_finished(finished)
    stats.seconds += time.perf_counter() - started
    return results  # type: ignore[return-value]


# Padded tokens per prompt-prefill pass (None: `model_views.prefill_group_tokens`).
PREFILL_TOKENS: int | None = None


def _stack(parts: list[TokenDistributions]) -> TokenDistributions:
    """K per-step distributions over (B, ...) -> one over (B * K, ...) in (b, j) order."""
    stacked = {
        f.name: torch.stack([getattr(p, f.name) for p in parts], dim=1).flatten(0, 1)
        for f in fields(TokenDistributions)
    }
    return TokenDistributions(**stacked)


class _Wave:
    """The sequences decoded together; `admit` adds requests, `cycle` decides tokens and
    returns the requests that finished (their rows leave the batch)."""

    def __init__(
        self,
        model: Any,
        config: RolloutConfig,
        stats: RolloutStats,
        score_top_n: int | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.stats = stats
        self.device = model_views.model_device(model)
        self.forbidden = torch.tensor(
            config.forbidden_token_ids, dtype=torch.long, device=self.device
        )
        self.proposer, self.verifier = config.proposer, config.verifier
        self.single = single_view(config)
        draft_view = config.draft_view
        if draft_view == "auto":
            draft_view = "verifier" if config.tau >= 0.5 else "proposer"
        self.drafter = self.proposer if draft_view == "proposer" else self.verifier
        self.checker = self.verifier if self.drafter == self.proposer else self.proposer
        self.views = (self.single,) if self.single else (self.drafter, self.checker)
        self.score_top_n = score_top_n or 0
        self.scored_views = self.views if score_top_n is not None else ()
        self.block = 1 if self.single else config.block_size
        self.eos = set(config.eos_token_ids)
        self.proposer_source = SOURCE_LEARNER if self.proposer == "learner" else SOURCE_PRIVILEGED
        self.verifier_source = 1 - self.proposer_source

        self.rows: list[int] = []  # active row -> request index
        self.requests: dict[int, RolloutRequest] = {}
        self.keys = np.zeros(0, dtype=np.int64)
        self.done = np.zeros(0, dtype=np.int64)  # tokens decided per active row
        self.outputs: dict[int, dict[str, list[Any]]] = {}
        self.cache: dict[str, Any] = {}
        self.valid: dict[str, torch.Tensor] = {}  # (B, slots) bool
        self.next_position: dict[str, torch.Tensor] = {}  # (B,) RoPE position of next input
        self.inputs: dict[str, torch.Tensor] = {}  # (B,) next token to feed
        self.just_finished: list[tuple[int, RolloutResult]] = []

    def admit(self, indexed: list[tuple[int, RolloutRequest]]) -> None:
        """Prefill the newcomers' prompts and put their rows below the active ones."""
        requests = [request for _, request in indexed]
        for index, request in indexed:
            self.requests[index] = request
            self.outputs[index] = {
                "token_ids": [], "sources": [], "draws": [], "learner": [], "privileged": []
            }  # fmt: skip
            for view in self.scored_views:
                for name in ("raw", "top_ids", "top_lps"):
                    self.outputs[index][f"{name}_{view}"] = []
        for view in self.views:
            cache, valid, next_position, inputs = self._prefill(view, requests)
            if not self.rows:
                self.cache[view], self.valid[view] = cache, valid
                self.next_position[view], self.inputs[view] = next_position, inputs
                continue
            self.valid[view] = model_views.append_cache_rows(
                self.cache[view], self.valid[view], cache, valid
            )
            self.next_position[view] = torch.cat([self.next_position[view], next_position])
            self.inputs[view] = torch.cat([self.inputs[view], inputs])
        self.rows += [index for index, _ in indexed]
        self.keys = np.concatenate([self.keys, [r.sequence_key for r in requests]]).astype(np.int64)
        self.done = np.concatenate([self.done, np.zeros(len(requests), dtype=np.int64)])

    def _prefill(
        self, view: str, requests: list[RolloutRequest]
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read each prompt except its last token, which is the first input
        (`model_views.prefill`: distinct prompts once, their shared prefix once).
        Returns the cache, its mask (B, P), the next positions (B,) and inputs (B,)."""
        prompts = [r.prompt_ids(view) for r in requests]
        read = model_views.prefill(
            self.model, view, [p[:-1] for p in prompts], group_tokens=PREFILL_TOKENS
        )
        self.stats.forward_passes += read.passes
        cache, valid = read.cache, read.valid  # (B, P)
        next_position = torch.tensor(
            [len(p) - 1 for p in prompts], dtype=torch.long, device=self.device
        )
        inputs = torch.tensor([p[-1] for p in prompts], dtype=torch.long).to(self.device)
        return cache, valid, next_position, inputs

    def _distributions(self, logits: torch.Tensor) -> TokenDistributions:
        return next_token_distributions(
            logits,
            temperature=self.config.temperature,
            top_k=self.config.top_k,
            top_p=self.config.top_p,
            forbidden_token_ids=self.forbidden,
            in_place=True,
        )

    def cycle(self, report: Callable[[int], None]) -> list[tuple[int, RolloutResult]]:
        """Decide the next block of every active sequence; returns those that finished."""
        self.just_finished = []
        if self.single:
            self._cycle_single(report)
        else:
            self._cycle(report)
        return self.just_finished

    def _cycle_single(self, report: Callable[[int], None]) -> None:
        """One token per sequence from the single view: plain sampling with the rule's own
        random numbers (tau = 0: the proposer's first candidate; tau = 1: the fallback)."""
        config, device, view = self.config, self.device, self.single
        assert view is not None
        batch = len(self.rows)
        uniforms = torch.from_numpy(
            keyed_uniforms(config.seed, self.keys, self.done[:, None], config.max_draws + 1)[:, 0]
        ).to(device)  # (B, R + 1)
        ones = torch.ones((batch, 1), dtype=torch.bool, device=device)
        self.valid[view] = torch.cat([self.valid[view], ones], dim=1)
        logits = model_views.forward_logits(
            self.model,
            view,
            self.inputs[view][:, None],
            self.valid[view],
            self.next_position[view][:, None],
            self.cache[view],
            1,
        )[:, -1]  # (B, V)
        self.stats.forward_passes += 1
        self.stats.cycles += 1
        scores = self._raw_scores({view: logits})  # before forbidden tokens are removed
        dist = self._distributions(logits)
        proposes = view == self.proposer
        if proposes:
            token = proposer_guess(dist, uniforms)
        else:
            token = verifier_guess(dist, uniforms, tau=config.tau, acceptance=config.acceptance)
        logprob = chosen_logprobs(logits, dist, token, temperature=config.temperature)
        other = "privileged" if view == "learner" else "learner"
        column = token[:, None].cpu().numpy()  # (B, 1)
        host = {
            "token": column,
            "draft": column,
            "accepted": np.full((batch, 1), proposes),
            "draws": np.full((batch, 1), 1 if proposes else config.max_draws),
            f"finite_{view}": dist.finite[:, None].cpu().numpy(),
            f"finite_{other}": np.ones((batch, 1), dtype=bool),
            view: logprob[:, None].float().cpu().numpy(),
            other: np.full((batch, 1), np.nan, dtype=np.float32),  # never consulted
        }
        picked = {view: logits.gather(1, token[:, None])[:, 0]}  # never a forbidden token
        host.update(self._host_scores(scores, picked, batch, 1))
        self._commit(host, 1, config.max_new_tokens - self.done, report)

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
        drafter_scores: list[dict[str, tuple[torch.Tensor, ...]]] = []
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
            drafter_scores.append(self._raw_scores({drafter: logits}))
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
        scores = self._raw_scores({checker: checker_logits.flatten(0, 1)})  # before masking
        if drafter in self.scored_views:
            scores[drafter] = tuple(
                torch.stack([part[drafter][n] for part in drafter_scores], dim=1).flatten(0, 1)
                for n in range(3)
            )  # (B*K, ...) in (b, j) order
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
        picked = {  # the chosen tokens' logits (never forbidden ones)
            checker: checker_logits.flatten(0, 1).gather(1, chosen[:, None])[:, 0],
            drafter: drafter_picked.flatten(),
        }
        host.update(self._host_scores(scores, picked, batch, block))
        self._commit(host, block, remaining, report)

    def _raw_scores(
        self, logits: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """`scoring.normalised_top` of the recorded views' logits (N, V), taken before
        `_distributions` writes -inf over forbidden tokens."""
        return {
            view: normalised_top(view_logits, self.score_top_n)
            for view, view_logits in logits.items()
            if view in self.scored_views
        }

    def _host_scores(
        self,
        scores: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        picked: dict[str, torch.Tensor],
        batch: int,
        block: int,
    ) -> dict[str, np.ndarray]:
        """The recorded views' scores given the chosen tokens' raw logits (B*K,), as host
        arrays (B, K, ...)."""
        host: dict[str, np.ndarray] = {}
        for view, (normalizer, top_ids, top_lps) in scores.items():
            logprobs = picked[view].float() - normalizer
            host[f"raw_{view}"] = logprobs.view(batch, block).cpu().numpy()
            host[f"top_ids_{view}"] = top_ids.view(batch, block, self.score_top_n).cpu().numpy()
            host[f"top_lps_{view}"] = top_lps.view(batch, block, self.score_top_n).cpu().numpy()
        return host

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
            ending: Ending | None = None
            count = 0
            matched = 0
            for j in range(limit):
                token = int(host["token"][b, j])
                failed = [v for v in VIEWS if not host[f"finite_{v}"][b, j]]
                ending = token_ending(token, failed, int(self.done[b]) + j, self.eos)
                if ending is not None:
                    # The EOS position counts as decided (its slot is kept until the row
                    # leaves); a position with non-finite logits does not.
                    if ending[0] == "eos":
                        count += 1
                    break
                count += 1
                accepted = bool(host["accepted"][b, j])
                out["token_ids"].append(token)
                out["sources"].append(self.proposer_source if accepted else self.verifier_source)
                out["draws"].append(int(host["draws"][b, j]))
                out["learner"].append(float(host["learner"][b, j]))
                out["privileged"].append(float(host["privileged"][b, j]))
                for view in self.scored_views:
                    for name in ("raw", "top_ids", "top_lps"):
                        out[f"{name}_{view}"].append(host[f"{name}_{view}"][b, j])
                self.stats.tokens += 1
                self.stats.fallbacks += 0 if accepted else 1
                if token != int(host["draft"][b, j]):
                    break
                matched += 1
            self.stats.drafted += limit
            self.stats.matched_drafts += matched
            fully_matched += int(matched == limit)
            decided[b] = count
            if ending is None:
                ending = length_ending(len(out["token_ids"]), self.config)
            if ending is not None:
                self._finish(index, ending)
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

    def _finish(self, index: int, ending: Ending) -> None:
        out = self.outputs.pop(index)
        shape = (len(out["token_ids"]), self.score_top_n)
        view_scores = {
            view: ViewScores(
                logprobs=np.asarray(out[f"raw_{view}"], dtype=np.float32),
                top_ids=np.asarray(out[f"top_ids_{view}"], dtype=np.int64).reshape(shape),
                top_logprobs=np.asarray(out[f"top_lps_{view}"], dtype=np.float32).reshape(shape),
            )
            for view in self.scored_views
        }
        result = finished_result(
            self.requests.pop(index),
            self.config,
            out["token_ids"],
            out["sources"],
            out["draws"],
            out["learner"],
            out["privileged"],
            finish_reason=ending[0],
            error=ending[1],
            view_scores=view_scores,
        )
        self.just_finished.append((index, result))

    def _adapt_block(self, fully_matched_share: float) -> None:
        if self.single:  # one token per cycle: nothing is drafted
            return
        self.block = adapted_block_size(self.block, fully_matched_share, self.config.max_block_size)

    def _roll_back(self, decided: np.ndarray, block: int, host: dict[str, np.ndarray]) -> None:
        """Keep the first `decided` new slots of each row; feed the last decided token next."""
        device = self.device
        kept = torch.from_numpy(decided).to(device)  # (B,)
        new_valid = torch.arange(block, device=device)[None, :] < kept[:, None]  # (B, K)
        last = np.clip(decided - 1, 0, block - 1)
        next_inputs = torch.from_numpy(host["token"][np.arange(len(decided)), last]).to(device)
        keep_slots = int(decided.max()) if len(decided) else 0
        for view in self.views:
            old = self.valid[view].shape[1] - block
            valid = torch.cat([self.valid[view][:, :old], new_valid], dim=1)
            model_views.crop_cache(self.cache[view], old + keep_slots)
            self.valid[view] = valid[:, : old + keep_slots]
            self.next_position[view] = self.next_position[view] + kept
            self.inputs[view] = next_inputs
            self._maybe_compact(view)

    def _drop_rows(self, finished_rows: list[int]) -> None:
        gone = set(finished_rows)
        keep = [b for b in range(len(self.rows)) if b not in gone]
        self.rows = [self.rows[b] for b in keep]
        self.keys = self.keys[keep]
        self.done = self.done[keep]
        if not self.rows:  # the next admission starts fresh caches
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for view in self.views:
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
        on_finished: FinishedCallback | None = None,
        score_top_n: int | None = None,
    ) -> list[RolloutResult]:
        self.last_stats = RolloutStats()
        return fast_rollout(
            self.model,
            requests,
            config,
            progress=progress,
            stats=self.last_stats,
            on_finished=on_finished,
            score_top_n=score_top_n,
        )
