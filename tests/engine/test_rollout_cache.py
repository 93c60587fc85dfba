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
