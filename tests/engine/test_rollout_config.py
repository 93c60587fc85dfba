"""Rollout settings: validation, snapshots, requests."""

from __future__ import annotations

import json

import pytest

from expansion.engine.rollout import RolloutConfig, RolloutError, RolloutRequest


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tau": -0.1}, "tau"),
        ({"tau": 1.5}, "tau"),
        ({"top_k": 0}, "top_k"),
        ({"max_draws": 0}, "retries"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.2}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"proposer": "teacher"}, "proposer"),
        ({"acceptance": "raw"}, "acceptance"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 8, "max_block_size": 4}, "max_block_size"),
        ({"draft_view": "both"}, "draft_view"),
        ({"max_batch_size": 0}, "max_batch_size"),
        # Seeds are bounded: 2^64 would otherwise wrap onto seed 0.
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 2**64}, "seed"),
        # Settings from JSON: a bool, a string or a float is no whole number.
        ({"seed": True}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"top_k": 20.0}, "top_k"),
        ({"max_new_tokens": "1_000"}, "max_new_tokens"),
        ({"tau": "0.8"}, "tau"),
        ({"temperature": False}, "temperature"),
        ({"forbidden_token_ids": "12"}, "forbidden_token_ids"),
        ({"eos_token_ids": [1.5]}, "eos_token_ids"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        RolloutConfig(**settings)


def test_boundaries_are_valid():
    RolloutConfig(tau=0.0, top_k=1, max_draws=1, top_p=1.0)
    RolloutConfig(tau=1.0)
    RolloutConfig(seed=0)
    RolloutConfig(seed=2**63 - 1)


def test_snapshot_round_trips_through_json():
    config = RolloutConfig(tau=0.3, proposer="privileged", forbidden_token_ids=(5, 7), seed=9)
    restored = RolloutConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.verifier == "learner"


def test_unknown_setting_is_refused():
    with pytest.raises(RolloutError, match="nonsense"):
        RolloutConfig.from_dict({"nonsense": 1})


def test_every_setting_has_help_text():
    assert all(RolloutConfig.help().values())
    assert RolloutConfig.defaults()["top_k"] == 20


def test_requests_need_both_prompts():
    with pytest.raises(RolloutError):
        RolloutRequest([], [1, 2], 0)
    request = RolloutRequest([1], [2, 3], 5)
    assert request.prompt_ids("privileged") == (2, 3)
