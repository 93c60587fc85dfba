"""A vLLM logits processor that makes `generate` draft the rule's best guess, or given tokens.

The vLLM backend's waves (`waves`) draft a block of tokens with one `generate` call of one
view and check them with the other view. For drafts to be accepted as often as in the
transformers fast engine, the drafting view must pick, at each position, the same guess:
the proposer's first keyed candidate (`sampling.proposer_guess`) or the verifier's acceptable
top token, else its own keyed fallback sample (`sampling.verifier_guess`). vLLM's sampler
cannot draw our keyed random numbers, so this processor computes the guess from the raw
logits of each marked request and masks every other token; greedy decoding then emits it.
With one view consulted (tau = 0 or 1) the guess is the rule's decision itself, so a
single-view rollout is one `generate` per sequence with this processor.

A request opts in through `SamplingParams.extra_args[DRAFT_ARGS_KEY]` (see `draft_args`);
other requests in the batch are untouched. `force_args` instead makes a request generate
given tokens (teacher forcing), to read a view's log-probs along them without prompt
log-probs. The returned log-probs are unaffected: the
engine's `logprobs_mode="raw_logprobs"` takes them before any logits processor.

Correctness of a two-view rollout never depends on this module: a draft is only a guess that
the backend checks against both views' distributions, so a missing or wrong guess costs speed,
not exactness. A single-view rollout takes the guess as the decision (it is the same keyed
draw from the same distribution).

This module runs inside vLLM's worker process and imports vLLM at the top: the engine names it
by its qualified class name (`engine.DRAFT_PROCESSOR`), and `waves` imports its argument
builders only inside the functions that send requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from expansion.engine.sampling import (
    keyed_uniforms,
    next_token_distributions,
    proposer_guess,
    verifier_guess,
)

DRAFT_ARGS_KEY = "dail_draft"
FORCE_ARGS_KEY = "dail_force"


def draft_args(
    *,
    role: str,
    seed: int,
    sequence_key: int,
    start: int,
    temperature: float,
    top_k: int,
    top_p: float,
    tau: float,
    acceptance: str,
    max_draws: int,
    forbidden_token_ids: tuple[int, ...],
) -> dict[str, Any]:
    """`extra_args` of a drafting request whose first generated token is position `start`.

    `role` is "proposer" or "verifier": which guess the drafting view makes.
    """
    return {
        DRAFT_ARGS_KEY: {
            "role": role,
            "seed": int(seed),
            "key": int(sequence_key),
            "start": int(start),
            "temperature": float(temperature),
            "top_k": int(top_k),
            "top_p": float(top_p),
            "tau": float(tau),
            "acceptance": acceptance,
            "max_draws": int(max_draws),
            "forbidden": [int(t) for t in forbidden_token_ids],
        }
    }


def force_args(token_ids: list[int]) -> dict[str, Any]:
    """`extra_args` of a request that must generate exactly `token_ids` (teacher forcing).

    The engine still returns the raw log-probs of every position: a way to read a view's
    distributions along given tokens without prompt log-probs.
    """
    return {FORCE_ARGS_KEY: [int(t) for t in token_ids]}


@dataclass
class _Row:
    settings: tuple[Any, ...]  # everything but key and start: rows sharing it are batched
    key: int
    start: int
    output_token_ids: list[int]  # vLLM's live list of the request's generated tokens
    forced: list[int] | None = None


def _row_state(
    params: SamplingParams, _prompt: list[int] | None, output_token_ids: list[int]
) -> _Row | None:
    extra = params.extra_args or {}
    if FORCE_ARGS_KEY in extra:
        return _Row((), 0, 0, output_token_ids, list(extra[FORCE_ARGS_KEY]))
    spec = extra.get(DRAFT_ARGS_KEY)
    if not spec:
        return None
    settings = (
        spec["role"],
        spec["seed"],
        spec["temperature"],
        spec["top_k"],
        spec["top_p"],
        spec["tau"],
        spec["acceptance"],
        spec["max_draws"],
        tuple(spec["forbidden"]),
    )
    return _Row(settings, spec["key"], spec["start"], output_token_ids)


class DraftGuessProcessor(LogitsProcessor):
    """Forces each marked request's next token to the rule's guess (see the module doc)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the argmax

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, _row_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        groups: dict[tuple[Any, ...], list[int]] = {}
        forced_rows: list[int] = []
        forced_tokens: list[int] = []
        for index, row in self.rows.items():
            if index >= logits.shape[0]:
                continue
            if row.forced is None:
                groups.setdefault(row.settings, []).append(index)
            elif len(row.output_token_ids) < len(row.forced):
                forced_rows.append(index)
                forced_tokens.append(row.forced[len(row.output_token_ids)])
        if forced_rows:
            index = torch.tensor(forced_rows, dtype=torch.long, device=logits.device)
            logits.index_fill_(0, index, float("-inf"))
            logits[index, torch.tensor(forced_tokens, device=logits.device)] = 0.0
        for settings, indices in groups.items():
            role, seed, temperature, top_k, top_p, tau, acceptance, max_draws, forbidden = settings
            rows = [self.rows[i] for i in indices]
            index = torch.tensor(indices, dtype=torch.long, device=logits.device)
            dist = next_token_distributions(
                logits.index_select(0, index),
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                forbidden_token_ids=torch.tensor(forbidden, dtype=torch.long, device=logits.device),
                in_place=True,
            )
            keys = np.array([r.key for r in rows], dtype=np.int64)
            positions = np.array([[r.start + len(r.output_token_ids)] for r in rows])  # (G, 1)
            uniforms = torch.from_numpy(
                keyed_uniforms(seed, keys, positions, max_draws + 1)[:, 0]
            ).to(logits.device)  # (G, R + 1)
            if role == "proposer":
                guess = proposer_guess(dist, uniforms)
            else:
                guess = verifier_guess(dist, uniforms, tau=tau, acceptance=acceptance)
            # Rows with non-finite logits keep theirs: the backend fails those sequences.
            guess = torch.where(dist.finite, guess, logits.index_select(0, index).argmax(-1))
            logits.index_fill_(0, index, float("-inf"))
            logits[index, guess] = 0.0
        return logits
