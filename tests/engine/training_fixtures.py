"""Tiny models and token-id traces for the training-engine tests (no tokenizer, no download)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from training.engine.data import TrainingExample

VOCAB = 64


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama with a 64-token vocabulary, saved as a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def make_examples(count: int, seed: int = 0, response_length: int = 12) -> list[TrainingExample]:
    """Traces whose three prompts differ (the privileged one longest, as with a solution)."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    examples = []
    for i in range(count):
        problem = ids(rng.randint(3, 6))
        examples.append(
            TrainingExample(
                learner_prompt_ids=[1, *problem, 2],
                privileged_prompt_ids=[3, *problem, *ids(rng.randint(6, 10)), 2],
                negative_prompt_ids=[4, *problem, *ids(2), 2],
                response_ids=ids(response_length - (i % 3)),
                example_id=f"trace-{i}",
            )
        )
    return examples
