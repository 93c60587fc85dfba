"""How far a saved LoRA adapter moved the base model: the Frobenius norm of its weight update.

A LoRA module adds `scaling * B @ A` to a base weight; peft starts every `B` at zero, so an
adapter whose optimizer never took a step with a learning rate above 0 adds exactly nothing.
`lora_update_norm` reads an adapter directory (adapter_config.json +
adapter_model.safetensors) and returns sqrt(sum over modules of ||scaling * B A||_F^2).

It uses ||B A||_F^2 = trace((B^T B)(A A^T)), two r x r products, so it never forms the
out x in update (gigabytes for a large model), in float64.

This module knows nothing about training, Django or which run wrote the adapter. Departure:
per-module `rank_pattern` / `alpha_pattern` scalings are not applied (the trainer never sets
them); the norm of such an adapter uses the global alpha / r, which does not change whether
it is zero.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# Below this the adapter counts as "did not move". peft's B starts at exactly 0, so an
# untrained adapter is 0.0; one optimizer step at the smallest learning rate the form allows
# (1e-8) already moves it by about 1e-6.
UPDATE_NORM_EPSILON = 1e-9

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def _scaling(config: dict) -> float:
    rank = float(config.get("r") or 1)
    alpha = float(config.get("lora_alpha") or rank)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def lora_update_norm(adapter_dir: str | Path) -> float:
    """The Frobenius norm of the whole LoRA update of the adapter in `adapter_dir`.

    Raises `FileNotFoundError` when the directory has no adapter_model.safetensors and
    `ValueError` when it holds no lora_A/lora_B pair."""
    from safetensors.torch import load_file

    directory = Path(adapter_dir)
    config_file = directory / CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    weights = load_file(directory / WEIGHTS_FILE)
    scaling = _scaling(config)
    squared = 0.0
    pairs = 0
    for name, a in weights.items():
        if ".lora_A." not in name:
            continue
        b = weights.get(name.replace(".lora_A.", ".lora_B."))
        if b is None:
            continue
        a64, b64 = a.double(), b.double()  # (r, in), (out, r)
        gram_b = b64.T @ b64  # (r, r)
        gram_a = a64 @ a64.T  # (r, r)
        squared += max(float((gram_b * gram_a).sum()), 0.0)
        pairs += 1
    if not pairs:
        raise ValueError(f"{directory} holds no LoRA A/B weight pairs")
    return math.sqrt(squared) * scaling


def did_not_move(update_norm: float | None) -> bool:
    """True for an update norm at or below `UPDATE_NORM_EPSILON` (None: not measured)."""
    return update_norm is not None and update_norm <= UPDATE_NORM_EPSILON
