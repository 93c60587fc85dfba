"""The three views of DAIL from one set of weights: learner, privileged (PS), negative (NR).

- learner: the LoRA adapter on, with gradients;
- PS and NR: the frozen base model (adapter off, `torch.no_grad()`, eval mode), optionally read
  from a `ReferenceCache` instead of recomputed.

Each view is one right-padded batch (see `data.py`). A view runs the decoder body once, gathers
the final hidden states at its `(B, T)` position map and applies the output layer to those
`(B, T, H)` rows only, so the logits `(B, T, V)` of the three views line up token for token and
no logits are ever computed for prompt positions. Models whose logits are more than
`output_layer(last_hidden_state)` (logit soft-capping, scaling) are detected once per model and
run through their own forward with `logits_to_keep` instead; they then cannot use the cache.

This module knows nothing about losses, optimizers or tokenizers. It calls the decoder body
directly, so it is single-device: a distributed wrapper's forward hooks would be bypassed.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from training.engine.reference_cache import ReferenceCache


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _body_and_head(model: Any) -> tuple[Any, Any]:
    base = _base(model)
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


def splits_into_body_and_head(model: Any) -> bool:
    """Whether `model(x).logits == output_layer(body(x).last_hidden_state)` (checked once)."""
    base = _base(model)
    known = getattr(base, "_dail_splits", None)
    if known is None:
        body, head = _body_and_head(model)
        known = body is not None and head is not None
        if known:
            device = next(base.parameters()).device
            probe = torch.arange(1, 9, device=device)[None] % base.config.vocab_size  # (1, 8)
            was_training = base.training
            base.eval()
            with torch.no_grad():
                whole = base(input_ids=probe, use_cache=False).logits  # (1, 8, V)
                split = head(body(input_ids=probe, use_cache=False).last_hidden_state)
            base.train(was_training)
            known = bool(torch.allclose(whole, split, rtol=1e-4, atol=1e-4))
        base._dail_splits = known
    return bool(known)


def gather_rows(values: Tensor, positions: Tensor) -> Tensor:
    """`values` (B, L, D) at `positions` (B, T) -> (B, T, D); a view when every row asks for
    the same consecutive positions (all prompts of one length)."""
    length = positions.shape[1]
    start = positions[:1, :1]  # (1, 1)
    consecutive = start + torch.arange(length, device=positions.device)  # (1, T)
    if bool((positions == consecutive).all()):
        first = int(start)
        return values[:, first : first + length]  # (B, T, D), no copy
    return values.gather(1, positions[..., None].expand(-1, -1, values.shape[-1]))  # (B, T, D)


def response_hidden(model: Any, input_ids: Tensor, positions: Tensor) -> Tensor:
    """Final hidden states of one view at its position map: `(B, L)`, `(B, T)` -> `(B, T, H)`."""
    body, _ = _body_and_head(model)
    hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, L, H)
    return gather_rows(hidden, positions)  # (B, T, H)


def output_logits(model: Any, hidden: Tensor) -> Tensor:
    """The output layer on gathered rows: `(B, T, H)` -> `(B, T, V)`."""
    return _body_and_head(model)[1](hidden)  # type: ignore[no-any-return]


def _logits_via_forward(model: Any, input_ids: Tensor, positions: Tensor) -> Tensor:
    base = _base(model)
    first = int(positions.min())
    kwargs = {}
    if first and "logits_to_keep" in inspect.signature(base.forward).parameters:
        kwargs["logits_to_keep"] = input_ids.shape[1] - first
    else:
        first = 0
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits  # (B, L - first, V)
    return gather_rows(logits, positions - first)  # (B, T, V)


def response_logits(model: Any, input_ids: Tensor, positions: Tensor) -> Tensor:
    """Logits of one view at its position map: `(B, L)`, `(B, T)` -> `(B, T, V)`."""
    if splits_into_body_and_head(model):
        return output_logits(model, response_hidden(model, input_ids, positions))
    return _logits_via_forward(model, input_ids, positions)


@contextlib.contextmanager
def frozen_base(peft_model: Any) -> Iterator[None]:
    """The base model as it was: adapter off, no gradients, eval mode (no dropout)."""
    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            yield
    finally:
        peft_model.train(was_training)


def _stack_right_padded(first: Tensor, second: Tensor, pad_token_id: int) -> Tensor:
    width = max(first.shape[1], second.shape[1])
    rows = first.new_full((first.shape[0] + second.shape[0], width), pad_token_id)  # (2B, L)
    rows[: first.shape[0], : first.shape[1]] = first
    rows[first.shape[0] :, : second.shape[1]] = second
    return rows


def _reference_rows(
    peft_model: Any, batch: dict[str, Any], fuse: bool, hidden_only: bool
) -> tuple[Tensor, Tensor]:
    """PS and NR, as hidden states `(B, T, H)` or as logits `(B, T, V)`."""
    run = response_hidden if hidden_only else response_logits
    if not fuse:
        return (
            run(peft_model, batch["privileged_input_ids"], batch["privileged_positions"]),
            run(peft_model, batch["negative_input_ids"], batch["negative_positions"]),
        )
    input_ids = _stack_right_padded(batch["privileged_input_ids"], batch["negative_input_ids"], 0)
    positions = torch.cat([batch["privileged_positions"], batch["negative_positions"]])  # (2B, T)
    both = run(peft_model, input_ids, positions)  # (2B, T, D)
    privileged, negative = both.chunk(2)  # (B, T, D) each
    return privileged, negative


def reference_logits(
    peft_model: Any,
    batch: dict[str, Any],
    fuse: bool = False,
    cache: ReferenceCache | None = None,
) -> tuple[Tensor, Tensor]:
    """(privileged, negative) logits `(B, T, V)` each, from the frozen base model.

    `fuse` runs both views as one batch of 2B rows padded to the longer view. With a `cache`
    (and `batch["reference_keys"]`), hidden states of traces seen before are read instead of
    recomputed, and those computed now are stored."""
    keys: Sequence[str] | None = batch.get("reference_keys")
    use_cache = cache is not None and keys is not None and splits_into_body_and_head(peft_model)
    with frozen_base(peft_model):
        if not use_cache:
            return _reference_rows(peft_model, batch, fuse, hidden_only=False)
        assert cache is not None and keys is not None
        lengths = batch["response_mask"].sum(1).tolist()
        hit = cache.load(keys, batch["response_mask"].shape[1], batch["response_mask"].device)
        if hit is None:
            privileged, negative = _reference_rows(peft_model, batch, fuse, hidden_only=True)
            cache.store(keys, lengths, privileged, negative)
        else:
            privileged, negative = hit
        return output_logits(peft_model, privileged), output_logits(peft_model, negative)
