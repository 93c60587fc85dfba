"""The mixed-policy decision rule, shared by every rollout implementation.

Three pieces, all pure functions of tensors:

- **Keyed randomness.** Every random number is a function of
  `(seed, sequence_key, position, draw)` through a counter-based hash (splitmix64 finalizer,
  chained over the four words) mapped to a float64 uniform in [0, 1). A token's fate therefore
  does not depend on batch composition, block size, or how many forward passes produced it, so
  the per-token reference loop and the speculative fast path make the same decisions.
  Draws `0 .. R-1` are the proposer's candidates; draw `R` is the fallback.
- **Next-token distributions.** Logits -> forbidden tokens removed -> divided by the
  temperature -> top-k (ties broken by the lower token id) -> renormalised -> top-p over that
  top-k -> renormalised. Sampling is by inverse CDF over this sorted, renormalised top-k.
- **The rule** (DAIL step 1): draw up to R candidates from the proposer; accept the first whose
  verifier probability is >= tau; otherwise sample from the verifier (a fallback).

This module knows nothing about models, caches, prompts, or which view is the learner.

Departures from the release (arXiv 2602.02405, authors' code):
- The verifier probability compared with tau is, by default (`acceptance="full"`), the full
  softmax probability at the rollout temperature, as the release's raw top-20 log-probs are at
  temperature 1; a candidate outside the verifier's top-k (after top-p) counts as probability 0.
  `acceptance="top_k"` compares the renormalised top-k probability instead.
- tau = 0 accepts every candidate (0 >= 0) and tau = 1 always falls back, as in the release's
  special cases; in between the rule is applied as written.
- Forbidden tokens (e.g. `</think>`) get logit -inf before everything, in both views; the
  release zeroed their probability after renormalising.
- Temperature and top-p are applied (the release's engine returned log-probs before them,
  sampling in effect at temperature 1 over the top-20; temperature 1.0 and top-p 1.0 reproduce
  that).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def keyed_uniforms(
    seed: int, sequence_keys: np.ndarray, positions: np.ndarray, draws: int
) -> np.ndarray:
    """Uniforms in [0, 1) for every (sequence, position, draw).

    sequence_keys: (B,) integers; positions: (B, T) response positions (0 = first new token).
    Returns (B, T, draws) float64.
    """
    keys = np.asarray(sequence_keys, dtype=np.int64).astype(np.uint64)  # (B,)
    pos = np.asarray(positions, dtype=np.int64).astype(np.uint64)  # (B, T)
    draw = np.arange(draws, dtype=np.uint64)  # (D,)
    with np.errstate(over="ignore"):
        h = _splitmix(np.full(keys.shape, np.uint64(seed & _MASK64)) + _GAMMA)  # (B,)
        h = _splitmix((h ^ keys) + _GAMMA)  # (B,)
        h = _splitmix((h[:, None] ^ pos) + _GAMMA)  # (B, T)
        h = _splitmix((h[:, :, None] ^ draw[None, None, :]) + _GAMMA)  # (B, T, D)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sequence_key(group: str | int, sample_index: int) -> int:
    """A stable 63-bit key for sample `sample_index` of `group` (e.g. a problem id).

    Non-negative so it fits a signed 64-bit database column.
    """
    digest = hashlib.blake2b(f"{group}\x1f{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class TokenDistributions:
    """Processed next-token distributions for N positions (one row per position)."""

    token_ids: torch.Tensor  # (N, k) int64, most likely first
    probs: torch.Tensor  # (N, k) float64, renormalised after top-k and top-p (0 = cut by top-p)
    full_logprobs: torch.Tensor  # (N, k) float64, full-softmax log-probs at the temperature
    log_normalizer: torch.Tensor  # (N,) logsumexp of the scaled logits
    finite: torch.Tensor  # (N,) bool: False where the model produced NaN or +inf logits


def next_token_distributions(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    forbidden_token_ids: torch.Tensor | None = None,
    in_place: bool = False,
) -> TokenDistributions:
    """Temperature, top-k, top-p and forbidden tokens applied to raw logits (N, V).

    `in_place=True` lets forbidden tokens be written into `logits` itself (saves a copy of
    a (N, V) tensor per step; the callers own their logits and never read forbidden ones).
    """
    scaled = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature  # (N, V)
        in_place = True  # a fresh tensor already
    if forbidden_token_ids is not None and forbidden_token_ids.numel():
        if in_place or scaled is not logits:
            scaled = scaled.index_fill_(1, forbidden_token_ids, float("-inf"))  # (N, V)
        else:
            scaled = scaled.index_fill(1, forbidden_token_ids, float("-inf"))  # (N, V)
    log_normalizer = torch.logsumexp(scaled, dim=-1)  # (N,)
    # NaN or +inf anywhere makes the normaliser non-finite; such a row's numbers below are
    # garbage (never used: the caller fails the sequence).
    finite = torch.isfinite(log_normalizer)  # (N,)
    k = min(top_k, scaled.shape[-1])
    values, ids = scaled.topk(k, dim=-1)  # (N, k)
    # Deterministic order among equal logits: lower token id first.
    ids, by_id = ids.sort(dim=-1)  # (N, k)
    values = values.gather(-1, by_id)  # (N, k)
    values, by_value = values.sort(dim=-1, descending=True, stable=True)  # (N, k)
    ids = ids.gather(-1, by_value)  # (N, k)
    values64 = values.double()  # (N, k)
    probs = torch.softmax(values64, dim=-1)  # (N, k)
    if top_p < 1.0:
        mass_before = probs.cumsum(dim=-1) - probs  # (N, k)
        probs = torch.where(mass_before < top_p, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    full_logprobs = values64 - log_normalizer.double()[:, None]  # (N, k)
    return TokenDistributions(ids, probs, full_logprobs, log_normalizer, finite)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Indices into the sorted top-k: probs (N, k), uniforms (N, D) -> (N, D) int64."""
    cdf = probs.cumsum(dim=-1)  # (N, k)
    cdf = (cdf / cdf[:, -1:]).contiguous()
    index = torch.searchsorted(cdf, uniforms.contiguous(), right=True)  # (N, D)
    return index.clamp_(max=probs.shape[-1] - 1)


def verifier_probability(
    verifier: TokenDistributions, candidates: torch.Tensor, acceptance: str
) -> torch.Tensor:
    """The verifier's probability of each candidate (N, D) -> (N, D) float64.

    0 for a candidate outside the verifier's top-k (or cut by top-p).
    """
    match = candidates[:, :, None] == verifier.token_ids[:, None, :]  # (N, D, k)
    match &= (verifier.probs > 0)[:, None, :]
    values = verifier.probs if acceptance == "top_k" else verifier.full_logprobs.exp()  # (N, k)
    return (match * values[:, None, :]).sum(dim=-1)  # (N, D)


@dataclass(frozen=True)
class Decisions:
    """The rule's outcome at N positions."""

    token_ids: torch.Tensor  # (N,) int64
    accepted: torch.Tensor  # (N,) bool: a proposer candidate was accepted (else fallback)
    draws: torch.Tensor  # (N,) int64: candidates drawn (1..R; R for a fallback)


def mixed_policy_decisions(
    proposer: TokenDistributions,
    verifier: TokenDistributions,
    uniforms: torch.Tensor,
    *,
    tau: float,
    acceptance: str = "full",
) -> Decisions:
    """Apply the rule at N positions; uniforms (N, R + 1) (draw R is the fallback's)."""
    max_draws = uniforms.shape[-1] - 1
    candidate_index = inverse_cdf(proposer.probs, uniforms[:, :max_draws])  # (N, R)
    candidates = proposer.token_ids.gather(1, candidate_index)  # (N, R)
    p_verifier = verifier_probability(verifier, candidates, acceptance)  # (N, R)
    accepted = (p_verifier >= tau) & (tau < 1.0)  # (N, R)
    any_accepted = accepted.any(dim=-1)  # (N,)
    first = accepted.to(torch.int8).argmax(dim=-1)  # (N,) first True (0 if none)
    fallback_index = inverse_cdf(verifier.probs, uniforms[:, max_draws:])  # (N, 1)
    fallback = verifier.token_ids.gather(1, fallback_index)[:, 0]  # (N,)
    chosen = candidates.gather(1, first[:, None])[:, 0]  # (N,)
    token_ids = torch.where(any_accepted, chosen, fallback)  # (N,)
    draws = torch.where(any_accepted, first + 1, torch.full_like(first, max_draws))  # (N,)
    return Decisions(token_ids, any_accepted, draws.long())


def proposer_guess(proposer: TokenDistributions, uniforms: torch.Tensor) -> torch.Tensor:
    """The token the rule picks if the first candidate is accepted: (N,)."""
    index = inverse_cdf(proposer.probs, uniforms[:, :1])  # (N, 1)
    return proposer.token_ids.gather(1, index)[:, 0]


def verifier_guess(
    verifier: TokenDistributions, uniforms: torch.Tensor, *, tau: float, acceptance: str
) -> torch.Tensor:
    """The verifier's best guess of the rule's outcome without the proposer: (N,).

    If no token clears tau the outcome is certainly the fallback sample; otherwise the most
    likely acceptable token (the only one when tau > 0.5).
    """
    max_draws = uniforms.shape[-1] - 1
    top = verifier.token_ids[:, :1]  # (N, 1)
    acceptable = (verifier_probability(verifier, top, acceptance)[:, 0] >= tau) & (tau < 1.0)
    fallback_index = inverse_cdf(verifier.probs, uniforms[:, max_draws:])  # (N, 1)
    fallback = verifier.token_ids.gather(1, fallback_index)[:, 0]  # (N,)
    return torch.where(acceptable, top[:, 0], fallback)


def chosen_logprobs(
    logits: torch.Tensor,
    distributions: TokenDistributions,
    token_ids: torch.Tensor,
    *,
    temperature: float,
) -> torch.Tensor:
    """Full-softmax log-prob at the temperature of `token_ids` (N,) under logits (N, V)."""
    picked = logits.gather(1, token_ids[:, None])[:, 0].double() / temperature  # (N,)
    return picked - distributions.log_normalizer.double()  # (N,)
