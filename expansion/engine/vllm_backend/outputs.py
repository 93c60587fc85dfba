"""vLLM's log-prob outputs as plain numpy arrays: the edge between vLLM objects and our code.

`top_logprobs_from_flat` reads positions of a vLLM `FlatLogprobs` (what `flat_logprobs=True`
returns, for generated tokens or prompt tokens alike) into a `TopLogprobs`: the actual token
at each position and the view's top-N raw log-probs there. Everything downstream (decisions,
log-probs of chosen tokens) works on these arrays, so it is tested without vLLM.

This module knows nothing about the rule, views, requests or engines; it reads only the
attributes of `FlatLogprobs` it names and never imports vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from expansion.engine.rollout import RolloutError


@dataclass(frozen=True)
class TopLogprobs:
    """One view's raw (temperature 1) log-probs at M positions, as vLLM returned them."""

    actual_ids: np.ndarray  # (M,) int64: the token at the position (prompt or generated)
    actual_logprobs: np.ndarray  # (M,) float64
    top_ids: np.ndarray  # (M, N) int64, most likely first; -1 pads
    top_logprobs: np.ndarray  # (M, N) float64; -inf pads

    def __len__(self) -> int:
        return int(self.actual_ids.shape[0])

    @staticmethod
    def concat(parts: Sequence[TopLogprobs]) -> TopLogprobs:
        """The parts' positions one after another (narrower parts padded to the widest)."""
        width = max(p.top_ids.shape[1] for p in parts)
        padded = [padded_to_width(p, width) for p in parts]
        return TopLogprobs(
            np.concatenate([p.actual_ids for p in padded]),
            np.concatenate([p.actual_logprobs for p in padded]),
            np.concatenate([p.top_ids for p in padded]),
            np.concatenate([p.top_logprobs for p in padded]),
        )


def padded_to_width(top: TopLogprobs, width: int) -> TopLogprobs:
    """`top` with its top-N columns padded to `width` (ids -1, log-probs -inf)."""
    missing = width - top.top_ids.shape[1]
    if missing <= 0:
        return top
    rows = len(top)
    return TopLogprobs(
        top.actual_ids,
        top.actual_logprobs,
        np.concatenate([top.top_ids, np.full((rows, missing), -1, np.int64)], axis=1),
        np.concatenate([top.top_logprobs, np.full((rows, missing), -np.inf)], axis=1),
    )


def top_logprobs_from_flat(flat: Any, first: int, count: int, top_n: int) -> TopLogprobs:
    """Positions `first .. first + count - 1` of a vLLM `FlatLogprobs` as arrays.

    vLLM stores, per position, the actual token (the prompt token, or the sampled one) first,
    then the top-`top_n` in rank order (the actual token may appear twice).
    """
    starts = np.asarray(flat.start_indices[first : first + count], dtype=np.int64)
    ends = np.asarray(flat.end_indices[first : first + count], dtype=np.int64)
    if starts.shape[0] != count:
        raise RolloutError(f"vLLM returned {starts.shape[0]} log-prob positions, not {count}")
    width = top_n + 1
    ids = np.full((count, width), -1, dtype=np.int64)  # (M, N + 1)
    values = np.full((count, width), -np.inf, dtype=np.float64)  # (M, N + 1)
    if count and np.all(ends - starts == width):
        lo, hi = int(starts[0]), int(ends[-1])
        ids[:] = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(count, width)
        values[:] = np.asarray(flat.logprobs[lo:hi], dtype=np.float64).reshape(count, width)
    else:  # ragged (should not happen with a fixed logprobs count): copy row by row
        for row, (start, end) in enumerate(zip(starts, ends, strict=True)):
            n = min(int(end - start), width)
            ids[row, :n] = flat.token_ids[start : start + n]
            values[row, :n] = flat.logprobs[start : start + n]
    return TopLogprobs(ids[:, 0].copy(), values[:, 0].copy(), ids[:, 1:], values[:, 1:])
