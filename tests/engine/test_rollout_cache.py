"""The engine's KV-cache layer and attention: rollback, row selection, compaction, GQA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import expansion.engine.rollout_fast as rollout_fast
from expansion.engine import model_views
from expansion.engine.rollout import RolloutConfig
from expansion.engine.rollout_fast import fast_rollout
from expansion.engine.rollout_reference import reference_rollout
from tests.engine.test_rollout_equivalence import assert_same_traces, make_requests

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_slot_layer_grows_crops_and_selects_rows():
    layer = model_views.SlotLayer()
    first = torch.randn(3, 2, 5, 4)
    keys, _ = layer.update(first, first + 1)
    assert torch.equal(keys, first) and layer.get_seq_length() == 5
    second = torch.randn(3, 2, 70, 4)  # past the initial capacity: the buffer grows
    keys, values = layer.update(second, second + 1)
    assert torch.equal(keys, torch.cat([first, second], dim=2))
    assert torch.equal(values, torch.cat([first, second], dim=2) + 1)
    layer.crop(-60)
    assert layer.get_seq_length() == 15 and torch.equal(layer.keys[:, :, 5:], second[:, :, :10])
    layer.batch_select_indices(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.keys[1], layer.keys[2]) and torch.equal(layer.keys[0, :, :5], first[2])
    keep = torch.tensor([[0, 2], [1, 3], [4, 14]])
    layer.gather_slots(keep)
    assert layer.get_seq_length() == 2
    assert torch.equal(layer.keys[2, :, 1], second[0, :, 9])


def test_compaction_squeezes_holes_and_keeps_order(tiny_model_factory):
    model = tiny_model_factory()
    cache = model_views.new_cache(model)
    ids = torch.randint(0, 256, (2, 6))
    valid = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    model_views.forward_logits(
        model, "learner", ids, valid, model_views.positions_from_valid(valid), cache
    )
    before = cache.layers[0].keys.clone()
    compacted = model_views.compact_cache(cache, valid)
    assert compacted.tolist() == [[False, False, True, True, True], [True, True, True, True, True]]
    assert torch.equal(cache.layers[0].keys[0, :, 2:], before[0][:, [1, 3, 4]])
    assert all(layer.get_seq_length() == 5 for layer in cache.layers)


def test_traces_survive_frequent_compaction(tiny_model_factory, monkeypatch):
    monkeypatch.setattr(rollout_fast, "COMPACT_MIN_SLOTS", 1)
    monkeypatch.setattr(rollout_fast, "COMPACT_SHARE", 0.0)
    calls = []
    original = model_views.compact_cache

    def counting(cache, valid):
        calls.append(valid.shape)
        return original(cache, valid)

    monkeypatch.setattr(model_views, "compact_cache", counting)
    model = tiny_model_factory()
    requests = make_requests(6, seed=11, shared=2)
    config = RolloutConfig(tau=0.5, max_new_tokens=30, eos_token_ids=(257,), block_size=4)
    assert_same_traces(
        reference_rollout(model, requests, config), fast_rollout(model, requests, config)
    )
    assert calls  # compaction really happened


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("q_len", [1, 5])
def test_grouped_attention_equals_repeated_kv_attention(masked: bool, q_len: int):
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 6, 2, 9, 8
    query = torch.randn(batch, heads, q_len, dim, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    causal = torch.ones(q_len, length, dtype=torch.bool).tril(length - q_len)
    mask = causal[None, None] & (torch.rand(batch, 1, 1, length) > 0.3) if masked else None
    if mask is not None:
        mask[..., -1] = True  # every query sees at least itself
    repeated_k = key.repeat_interleave(heads // kv_heads, dim=1)
    repeated_v = value.repeat_interleave(heads // kv_heads, dim=1)
    expected = F.scaled_dot_product_attention(
        query, repeated_k, repeated_v, attn_mask=mask if masked else causal[None, None]
    ).transpose(1, 2)
    module = type("Attention", (), {"num_key_value_groups": heads // kv_heads})()
    cpu_path, _ = model_views.grouped_sdpa_attention(module, query, key, value, mask)
    torch.testing.assert_close(cpu_path, expected)
    # The path used on CUDA (query heads as rows of their KV head), checked here on CPU.
    full_mask = mask if masked else causal[None, None]
    rows = model_views._grouped_rows_attention(query, key, value, full_mask, 0.0, None)
    torch.testing.assert_close(rows.transpose(1, 2), expected)


def test_grouped_attention_is_switched_on_and_off(tiny_model_factory):
    model = tiny_model_factory()
    assert model.config._attn_implementation == "sdpa"
    with model_views.grouped_attention(model):
        assert model.config._attn_implementation == model_views.GROUPED_ATTENTION
    assert model.config._attn_implementation == "sdpa"


@pytest.fixture
def forward_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """The input shape (rows, tokens) of every `model_views.forward_logits` call, in order."""
    shapes: list[tuple[int, ...]] = []
    real_forward = model_views.forward_logits

    def spy(model_, view_, input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return real_forward(model_, view_, input_ids, *args, **kwargs)

    monkeypatch.setattr(model_views, "forward_logits", spy)
    return shapes


def _prefixed(rng, prefix: list[int], low: int, high: int) -> list[int]:
    return prefix + rng.integers(0, 256, size=int(rng.integers(low, high))).tolist()


@pytest.mark.parametrize("group_tokens", [1, 40, 10_000])
def test_prefill_reads_a_shared_prefix_once_and_equals_plain_passes(
    tiny_model_factory, forward_shapes, group_tokens: int
):
    """Prompts that start alike (as every real prompt does: chat template, instruction) are
    read with their common prefix once, the rest in length groups; each prompt's cache and
    last logits equal a plain forward pass of that prompt alone, duplicates included."""
    import numpy as np

    model = tiny_model_factory()
    rng = np.random.default_rng(21)
    prefix = rng.integers(0, 256, size=12).tolist()
    prompts = [_prefixed(rng, prefix, 1, 15) for _ in range(5)]
    prompts += [prompts[1], prefix + [7]]  # a duplicate; one only a token past the prefix
    read = model_views.prefill(
        model, "privileged", prompts, group_tokens=group_tokens, last_logits=True
    )
    assert forward_shapes[0] == (1, 12), "the shared prefix is read once, in one row"
    assert sum(rows for rows, _ in forward_shapes[1:]) == 6, "each distinct prompt once"
    assert read.passes == len(forward_shapes)
    assert read.valid.shape[0] == len(prompts) and read.last_logits is not None
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            plain = model(torch.tensor([prompt]), use_cache=True)
        torch.testing.assert_close(read.last_logits[row], plain.logits[0, -1])
        slots = read.valid[row]
        assert int(slots.sum()) == len(prompt)
        for layer, alone in zip(read.cache.layers, plain.past_key_values.layers, strict=True):
            torch.testing.assert_close(layer.keys[row][:, slots], alone.keys[0])
            torch.testing.assert_close(layer.values[row][:, slots], alone.values[0])


def test_prefill_without_a_long_shared_prefix_reads_no_prefix(tiny_model_factory, forward_shapes):
    """A common prefix shorter than `SHARED_PREFIX_MIN` is not worth its own pass; prompts
    with an empty one (here: an empty prompt, as an engine's one-token prompt leaves) work."""
    model = tiny_model_factory()
    short = [1, 2, 3]
    read = model_views.prefill(model, "learner", [short + [4, 5], short + [9], []])
    assert read.passes == 1 and forward_shapes == [(3, 5)] and read.last_logits is None
    assert read.valid.sum(dim=1).tolist() == [5, 4, 0]
    with pytest.raises(ValueError, match="non-empty"):
        model_views.prefill(model, "learner", [[1], []], last_logits=True)
