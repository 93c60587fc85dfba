"""The rule's distributions and decisions from the top-N raw log-probs vLLM returns.

The transformers engines decide from full logits; vLLM returns, per position and view, the
top-N raw (temperature 1) log-probs (N = top_k + number of forbidden tokens). From those,
`view_distributions` builds the same `TokenDistributions` (`sampling.next_token_distributions`
applies forbidden tokens, temperature, top-k and top-p to the returned top-N, ties broken by
lower token id as everywhere), and `decide_positions` applies the rule with the same keyed
random numbers, so decisions match wherever the distributions agree (float rounding of two
different kernels can flip a near-tie). `single_view_decisions` is the same outcome when only
one view was consulted (tau = 0 or 1), from the tokens that view generated.

Departure from the transformers engines: the full-softmax normaliser at a temperature other
than 1 is estimated from the top-N: the tail mass beyond the N-th token (exact at temperature 1)
is treated as tokens at the N-th token's log-prob. At temperature 1 (the rollout default) it
is exact, except that a forbidden token outside the top-N stays in the normaliser (its mass
is below the N-th's).

This module knows nothing about vLLM objects (it reads `TopLogprobs` arrays), requests,
sequences or engines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from expansion.engine.rollout import VIEWS, RolloutConfig
from expansion.engine.sampling import (
    TokenDistributions,
    keyed_uniforms,
    mixed_policy_decisions,
    next_token_distributions,
)
from expansion.engine.vllm_backend.outputs import TopLogprobs


def view_distributions(top: TopLogprobs, config: RolloutConfig) -> TokenDistributions:
    """The rule's processed distribution of one view at every row of `top` (vocabulary ids).

    Forbidden tokens, temperature, top-k and top-p are applied by `next_token_distributions`
    to the returned top-N (columns ordered by token id so ties break as in the other engines);
    the full-softmax normaliser adds the mass beyond the top-N (see the module docstring).
    """
    ids, raw = top.top_ids, top.top_logprobs  # (M, N)
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)  # (M, N) by token id
    raw = np.take_along_axis(raw, order, axis=1)  # (M, N)
    nan_rows = np.isnan(raw).any(axis=1)  # (M,)
    raw = np.where(np.isnan(raw), -np.inf, raw)
    excluded = (ids < 0) | np.isin(ids, np.asarray(config.forbidden_token_ids, dtype=np.int64))
    values = np.where(excluded, -np.inf, raw)  # (M, N)
    dist = next_token_distributions(
        torch.from_numpy(values),
        temperature=config.temperature,
        top_k=min(config.top_k, values.shape[1]),
        top_p=config.top_p,
    )
    # Mass beyond the returned top-N at temperature 1, spread as tokens at the N-th log-prob.
    returned = np.where(ids >= 0, raw, -np.inf)  # (M, N)
    tail = np.clip(1.0 - np.exp(returned).sum(axis=1), 0.0, 1.0)  # (M,)
    smallest = np.where(ids >= 0, raw, np.inf).min(axis=1)  # (M,)
    smallest = np.where(np.isfinite(smallest), smallest, 0.0)
    with np.errstate(divide="ignore"):
        tail_term = np.log(tail) + smallest * (1.0 / config.temperature - 1.0)  # (M,)
    compact = dist.log_normalizer.double()  # (M,)
    normalizer = torch.logaddexp(compact, torch.from_numpy(tail_term))  # (M,)
    finite = dist.finite & torch.from_numpy(~nan_rows)  # (M,)
    return TokenDistributions(
        token_ids=torch.from_numpy(ids).gather(1, dist.token_ids),  # (M, k) vocabulary ids
        probs=dist.probs,
        full_logprobs=dist.full_logprobs + (compact - normalizer)[:, None],
        log_normalizer=normalizer,
        finite=finite,
    )


def chosen_logprobs_from_top(
    top: TopLogprobs, normalizer: np.ndarray, token_ids: np.ndarray, temperature: float
) -> np.ndarray:
    """Full-softmax log-prob at the temperature of `token_ids` (M,); NaN where not returned."""
    ids = np.concatenate([top.actual_ids[:, None], top.top_ids], axis=1)  # (M, N + 1)
    raw = np.concatenate([top.actual_logprobs[:, None], top.top_logprobs], axis=1)  # (M, N + 1)
    match = ids == np.asarray(token_ids)[:, None]  # (M, N + 1)
    found = match.any(axis=1)  # (M,)
    picked = raw[np.arange(len(ids)), match.argmax(axis=1)]  # (M,)
    return np.where(found, picked / temperature - normalizer, np.nan)


@dataclass(frozen=True)
class PositionDecisions:
    """The rule's outcome at M positions, as arrays."""

    token_ids: np.ndarray  # (M,) int64
    accepted: np.ndarray  # (M,) bool
    draws: np.ndarray  # (M,) int64
    finite: dict[str, np.ndarray]  # view -> (M,) bool; True for a view not consulted
    logprobs: dict[str, np.ndarray]  # view -> (M,) float64, NaN = not among the returned
    normalizers: dict[str, np.ndarray]  # view -> (M,) float64; NaN for a view not consulted


def decide_positions(
    tops: dict[str, TopLogprobs],
    sequence_keys: np.ndarray,
    positions: np.ndarray,
    config: RolloutConfig,
) -> PositionDecisions:
    """Apply the rule at M positions given both views' returned log-probs.

    sequence_keys, positions: (M,) the sequence and response position of each row.
    """
    dists = {view: view_distributions(tops[view], config) for view in VIEWS}
    uniforms = keyed_uniforms(
        config.seed, np.asarray(sequence_keys), np.asarray(positions)[:, None], config.max_draws + 1
    )  # (M, 1, R + 1); one row per (sequence, position) pair
    decisions = mixed_policy_decisions(
        dists[config.proposer],
        dists[config.verifier],
        torch.from_numpy(uniforms[:, 0]),
        tau=config.tau,
        acceptance=config.acceptance,
    )
    token_ids = decisions.token_ids.numpy()  # (M,)
    normalizers = {view: dists[view].log_normalizer.numpy() for view in VIEWS}
    return PositionDecisions(
        token_ids=token_ids,
        accepted=decisions.accepted.numpy(),
        draws=decisions.draws.numpy(),
        finite={view: dists[view].finite.numpy() for view in VIEWS},
        logprobs={
            view: chosen_logprobs_from_top(
                tops[view], normalizers[view], token_ids, config.temperature
            )
            for view in VIEWS
        },
        normalizers=normalizers,
    )


def single_view_decisions(top: TopLogprobs, view: str, config: RolloutConfig) -> PositionDecisions:
    """The rule's outcome at M positions where only `view` decides (tau = 0: the proposer's
    first candidate; tau = 1: the verifier's fallback), given the tokens that view generated.

    The tokens are `top.actual_ids`: the drafting logits processor made the view generate
    the rule's keyed choice, which with one view consulted is the decision itself. Accepted
    and draws are what the rule reports for such a run (a first candidate accepted after one
    draw, or a fallback after R); the other view's log-probs are NaN and its rows count as
    finite (it was never asked).
    """
    proposes = view == config.proposer
    rows = len(top)
    dist = view_distributions(top, config)
    normalizer = dist.log_normalizer.numpy()  # (M,)
    other = VIEWS[1 - VIEWS.index(view)]
    return PositionDecisions(
        token_ids=top.actual_ids,
        accepted=np.full(rows, proposes),
        draws=np.full(rows, 1 if proposes else config.max_draws, dtype=np.int64),
        finite={view: dist.finite.numpy(), other: np.ones(rows, dtype=bool)},
        logprobs={
            view: chosen_logprobs_from_top(top, normalizer, top.actual_ids, config.temperature),
            other: np.full(rows, np.nan),
        },
        normalizers={view: normalizer, other: np.full(rows, np.nan)},
    )
