"""One set of weights, several views: forward passes, KV caches and padding helpers.

The learner view runs the model as given (with its PEFT adapter enabled, if it has one); the
privileged and negative-reference views run it with the adapter disabled. A model without an
adapter serves every view with the same weights; only the prompts differ.

Caches are transformers `DynamicCache`s whose layers are `SlotLayer`s (a buffer that grows by
doubling, so a step writes only its new entries), laid out as a rectangle (batch, slots): a
row's valid slots are marked in a boolean mask, so left padding, rolled-back drafts and
finished rows are all "holes" the attention mask hides; `compact_cache` squeezes holes out when
they pile up. While the engines run, SDPA models use `grouped_sdpa_attention`, which attends
grouped-query heads without copying the cache for every query head.

`prefill` reads prompts into such a cache the way both engines and scoring need: each distinct
prompt once, a prefix common to all of them (the chat template and the view's instruction)
once, and the rest in groups of similar length, so little is padded and no forward pass is
larger than the device handles well.

This module knows nothing about the rollout rule, prompts or tokenizers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

GROUPED_ATTENTION = "dail_grouped_sdpa"


def has_adapter(model: Any) -> bool:
    """True for a PEFT model (the learner = base weights + adapter)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextlib.contextmanager
def view_context(model: Any, view: str) -> Iterator[None]:
    """Run the block under `view`: the adapter is enabled only for the learner."""
    if view == "learner" or not has_adapter(model):
        yield
        return
    with model.disable_adapter():
        yield


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def vocab_size(model: Any) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def default_eos_token_ids(model: Any) -> tuple[int, ...]:
    """The EOS ids of the model's generation config (else its config)."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
    return ()


class SlotLayer(DynamicLayer):
    """A cache layer over a buffer that grows by doubling.

    transformers' `DynamicLayer` concatenates the whole cache with the new entries at every
    step (O(slots) copying per token, a lot for 32 sequences x 2,000 tokens); here a step
    writes only its new entries, and `keys`/`values` are views of the used slots.
    """

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            self._grow(key_states, end)
        assert self.key_buffer is not None and self.value_buffer is not None
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values  # type: ignore[return-value]

    def _grow(self, like: torch.Tensor, needed: int) -> None:
        old = 0 if self.key_buffer is None else self.key_buffer.shape[-2]
        capacity = max(needed, 2 * old, 64)
        shape = (like.shape[0], like.shape[1], capacity, like.shape[3])
        keys = like.new_empty(shape)
        values = like.new_empty(shape)
        if self.key_buffer is not None and self.value_buffer is not None and self.length:
            keys[:, :, : self.length] = self.key_buffer[:, :, : self.length]
            values[:, :, : self.length] = self.value_buffer[:, :, : self.length]
        self.key_buffer, self.value_buffer = keys, values

    def _expose(self) -> None:
        assert self.key_buffer is not None and self.value_buffer is not None
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.length:
            self.length = max(self.length + tokens_to_remove, 0)
            self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.key_buffer is not None and self.value_buffer is not None:
            self.key_buffer = self.key_buffer[indices]
            self.value_buffer = self.value_buffer[indices]
            self._expose()

    def append_rows(self, other: SlotLayer, rows: tuple[int, int], pads: tuple[int, int]) -> None:
        """Rows of `other` below this layer's, both left-padded with holes to one slot count:
        (B1, H, L1, D) + (B2, H, L2, D) -> (B1 + B2, H, L, D), L = L1 + pads[0] = L2 + pads[1].
        `rows` = (B1, B2): a layer with no slots yet holds no rows. Holes are never read (the
        caller's attention mask hides them)."""
        like = self.key_buffer if self.key_buffer is not None else other.key_buffer
        if like is None:  # neither has a slot: nothing to join
            return
        length = self.length + pads[0]
        shape = (rows[0] + rows[1], like.shape[1], max(length, 64), like.shape[3])
        keys, values = like.new_zeros(shape), like.new_zeros(shape)
        for layer, part, pad in (
            (self, slice(0, rows[0]), pads[0]),
            (other, slice(rows[0], None), pads[1]),
        ):
            if layer.key_buffer is not None and layer.length:
                keys[part, :, pad:length] = layer.keys
                values[part, :, pad:length] = layer.values
        if not self.is_initialized:
            self.lazy_initialization(like, like)
        self.key_buffer, self.value_buffer, self.length = keys, values, length
        self._expose()

    def gather_slots(self, keep: torch.Tensor) -> None:
        """Keep slots `keep` (B, L') of each row, in that order, as slots 0 .. L' - 1."""
        assert self.key_buffer is not None and self.value_buffer is not None
        heads, dim = self.key_buffer.shape[1], self.key_buffer.shape[3]
        index = keep[:, None, :, None].expand(-1, heads, -1, dim)  # (B, H, L', D)
        self.key_buffer = self.key_buffer.gather(2, index)
        self.value_buffer = self.value_buffer.gather(2, index)
        self.length = keep.shape[1]
        self._expose()


def new_cache(model: Any) -> DynamicCache:
    """An empty KV cache of `SlotLayer`s; models with sliding-window or linear-attention
    layers are refused because their caches cannot be rolled back slot by slot."""
    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) or type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"{type(model).__name__} uses {type(layer).__name__} cache layers; the rollout "
                "engine needs full-attention layers it can roll back."
            )
    cache.layers = [SlotLayer() for _ in cache.layers]
    return cache


def grouped_sdpa_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA for grouped-query attention that never copies the cached keys and values.

    transformers' SDPA path repeats every KV head for its query heads whenever a mask is
    given (always, here: padding and rolled-back slots are masked), which copies the whole
    cache in every layer and step. Instead: on CPU, `enable_gqa=True`; elsewhere (CUDA, whose
    fast kernels refuse `enable_gqa` with a mask) the query heads sharing a KV head become extra
    query rows of that head. query (B, Hq, q, D), key/value (B, Hkv, L, D); returns (B, q, Hq, D).
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    mask = attention_mask
    if mask is None and q_len > 1:  # causal, aligned to the end of the keys
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
        mask = mask.tril(diagonal=kv_len - q_len)[None, None]  # (1, 1, q, L)
    if groups == 1 or query.device.type == "cpu":
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=groups > 1,
        )  # (B, Hq, q, D)
    else:
        out = _grouped_rows_attention(query, key, value, mask, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


def _grouped_rows_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """The query heads of a KV head as extra query rows: (B, Hq, q, D) -> (B, Hq, q, D)."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped_query = query.reshape(batch, kv_heads, groups * q_len, dim)  # (B, Hkv, g*q, D)
    if mask is not None:
        rows = mask.shape[0]
        mask = mask[:, :, None].expand(rows, 1, groups, q_len, kv_len)
        mask = mask.reshape(rows, 1, groups * q_len, kv_len)  # (B, 1, g*q, L)
    out = F.scaled_dot_product_attention(
        grouped_query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )  # (B, Hkv, g*q, D)
    return out.reshape(batch, heads, q_len, dim)


_registered = False


@contextlib.contextmanager
def grouped_attention(model: Any) -> Iterator[None]:
    """Run `model` with `grouped_sdpa_attention` while in the block (only if it uses SDPA)."""
    global _registered
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(GROUPED_ATTENTION, grouped_sdpa_attention)
        AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)
        _registered = True
    config._attn_implementation = GROUPED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def forward_logits(
    model: Any,
    view: str,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache | None,
    logits_to_keep: int | torch.Tensor = 0,
) -> torch.Tensor:
    """One forward pass under `view`.

    input_ids (B, Q); valid (B, past + Q) bool attention mask; position_ids (B, Q).
    Returns logits (B, kept, V) in the model's dtype.
    """
    with view_context(model, view):
        output = model(
            input_ids=input_ids,
            attention_mask=valid.long(),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=cache is not None,
            logits_to_keep=logits_to_keep,
        )
    return output.logits


def left_pad(
    sequences: Sequence[Sequence[int]], device: torch.device, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists: ids (B, L) int64 and valid (B, L) bool."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    valid = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, length - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            valid[row, length - len(sequence) :] = True
    return ids.to(device), valid.to(device)


def positions_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """Position ids counting only valid slots: (B, L) bool -> (B, L) int64."""
    return (valid.long().cumsum(dim=-1) - 1).clamp_(min=0)


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Drop cache slots at and after `length`."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


def select_cache_rows(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep (or repeat) batch rows `rows` (R,) of every layer."""
    cache.batch_select_indices(rows)


def compact_cache(cache: DynamicCache, valid: torch.Tensor) -> torch.Tensor:
    """Move each row's valid slots to the right end, dropping holes; returns the new mask.

    valid (B, L) -> (B, L'), L' = the most valid slots in any row. Slot order within a row is
    kept, so the causal order of the cached context is unchanged.
    """
    length = valid.shape[1]
    new_length = int(valid.sum(dim=1).max())
    if new_length == length:
        return valid
    order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)  # (B, L) holes first
    keep = order[:, length - new_length :]  # (B, L')
    for layer in cache.layers:
        layer.gather_slots(keep)
    return valid.gather(1, keep)


def append_cache_rows(
    cache: DynamicCache, valid: torch.Tensor, other: DynamicCache, other_valid: torch.Tensor
) -> torch.Tensor:
    """Put `other`'s rows below `cache`'s (in place), left-padding the shorter with holes;
    returns the joined mask. valid (B1, L1), other_valid (B2, L2) -> (B1 + B2, max(L1, L2))."""
    length = max(valid.shape[1], other_valid.shape[1])
    pad_self, pad_other = length - valid.shape[1], length - other_valid.shape[1]
    rows = (valid.shape[0], other_valid.shape[0])
    for layer, other_layer in zip(cache.layers, other.layers, strict=True):
        layer.append_rows(other_layer, rows, (pad_self, pad_other))

    def padded(mask: torch.Tensor, pad: int) -> torch.Tensor:
        holes = torch.zeros((mask.shape[0], pad), dtype=torch.bool, device=mask.device)
        return torch.cat([holes, mask], dim=1)

    return torch.cat([padded(valid, pad_self), padded(other_valid, pad_other)])


# A prefix common to every prompt of a prefill is read once (and its cache rows copied) when it
# is at least this long; shorter ones are not worth the extra forward pass.
SHARED_PREFIX_MIN = 8


def prefill_group_tokens(device: torch.device) -> int:
    """Padded tokens per prefill forward pass. On CPU, passes of a few thousand tokens read
    long prompts at ~half the speed of passes of ~1,000 (the attention weights of long rows
    leave the caches; measured with SmolLM2-135M on 2 cores: 16 prompts of 314-638 tokens in
    one pass 33 s, in passes of <= 1,024 tokens 18 s); accelerators want big passes."""
    return 1024 if device.type == "cpu" else 8192


def length_groups(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ascending `lengths` in consecutive groups whose padded size (rows x the
    group's longest) stays within `budget` (a group has at least one row)."""
    groups: list[list[int]] = []
    for index, length in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * max(length, 1) <= budget:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


@dataclass
class Prefill:
    """Prompts read into a cache: `valid` (B, L) marks each row's slots; `last_logits` (B, V)
    are the logits at each prompt's last token (when asked for); `passes` forward passes."""

    cache: DynamicCache
    valid: torch.Tensor
    last_logits: torch.Tensor | None
    passes: int


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix every sequence starts with."""
    shortest = min((len(s) for s in sequences), default=0)
    for position in range(shortest):
        token = sequences[0][position]
        if any(s[position] != token for s in sequences):
            return position
    return shortest


def copy_cache_rows(cache: DynamicCache, model: Any, rows: int) -> DynamicCache:
    """A new cache holding `rows` copies of `cache`'s single row (its slots as they are)."""
    copy = new_cache(model)
    for layer, source in zip(copy.layers, cache.layers, strict=True):
        if source.key_buffer is None or source.value_buffer is None:
            continue
        keys = source.keys.expand(rows, -1, -1, -1).contiguous()
        values = source.values.expand(rows, -1, -1, -1).contiguous()
        layer.lazy_initialization(keys, values)
        layer.key_buffer, layer.value_buffer, layer.length = keys, values, source.length
        layer._expose()
    return copy


def prefill(
    model: Any,
    view: str,
    prompts: Sequence[Sequence[int]],
    *,
    group_tokens: int | None = None,
    last_logits: bool = False,
) -> Prefill:
    """Read `prompts` (B, duplicates allowed) under `view` into one cache, rows in the given
    order: distinct prompts once; a prefix shared by all of them (>= `SHARED_PREFIX_MIN`
    tokens) once, its rows copied; the rest shortest first in groups of <= `group_tokens`
    padded tokens (default `prefill_group_tokens`), left-padded within a group, so a row's
    slots are [shared prefix][holes][rest]. With `last_logits` every prompt must be non-empty
    and its last token is read in its group (the shared prefix stops before it)."""
    device = model_device(model)
    budget = group_tokens or prefill_group_tokens(device)
    distinct = sorted({tuple(p) for p in prompts}, key=len)
    if last_logits and (not distinct or not distinct[0]):
        raise ValueError("last_logits needs non-empty prompts")
    shared = shared_prefix_length(distinct) if len(distinct) > 1 else 0
    if last_logits:
        shared = min(shared, len(distinct[0]) - 1)
    shared = shared if shared >= SHARED_PREFIX_MIN else 0
    passes = 0
    prefix_cache = None
    if shared:
        prefix_cache = new_cache(model)
        ids = torch.tensor([distinct[0][:shared]], dtype=torch.long, device=device)
        ones = torch.ones((1, shared), dtype=torch.bool, device=device)
        positions = torch.arange(shared, device=device)[None]
        forward_logits(model, view, ids, ones, positions, prefix_cache, 1)
        passes += 1
    cache, valid, logits = None, None, []
    for group in length_groups([len(p) - shared for p in distinct], budget):
        rests = [list(distinct[n][shared:]) for n in group]
        if prefix_cache is not None:
            part_cache = copy_cache_rows(prefix_cache, model, len(group))
        else:
            part_cache = new_cache(model)
        prefix_valid = torch.ones((len(group), shared), dtype=torch.bool, device=device)
        if max(len(r) for r in rests) == 0:
            part_valid = prefix_valid
        else:
            ids, rest_valid = left_pad(rests, device)  # (G, R)
            part_valid = torch.cat([prefix_valid, rest_valid], dim=1)  # (G, S + R)
            positions = positions_from_valid(part_valid)[:, shared:]
            out = forward_logits(model, view, ids, part_valid, positions, part_cache, 1)
            passes += 1
            if last_logits:
                logits.append(out[:, -1])
        if cache is None or valid is None:
            cache, valid = part_cache, part_valid
        else:
            valid = append_cache_rows(cache, valid, part_cache, part_valid)
    assert cache is not None and valid is not None
    order = {p: n for n, p in enumerate(distinct)}
    rows = torch.tensor([order[tuple(p)] for p in prompts], dtype=torch.long, device=device)
    if valid.shape[1]:
        select_cache_rows(cache, rows)
    return Prefill(cache, valid[rows], torch.cat(logits)[rows] if last_logits else None, passes)
