"""Tiny models and tokenizers for fast engine tests (built in memory, no downloads).

- `tiny_tokenizer`: byte-level (no merges) + ChatML-like special tokens and a chat template;
  every string round-trips, 261 ids.
- `make_tiny_model(dtype, seed, adapter)`: a 2-layer Llama over that vocabulary whose output
  layer is scaled up so next-token distributions range from flat to peaked (so every branch
  of the rollout rule is taken); `adapter=True` wraps it in a random PEFT LoRA adapter, making
  the learner view differ from the privileged one by weights as well as by prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_VOCAB = 261


def build_tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        name_or_path="tiny-byte-tokenizer",
    )
    tokenizer.chat_template = chat_template
    assert len(tokenizer) == TINY_VOCAB
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return build_tiny_tokenizer()


def make_tiny_model(
    dtype: torch.dtype = torch.float64, seed: int = 0, adapter: bool = False
) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=257,  # <|im_end|>
        pad_token_id=260,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    model = model.to(dtype).eval()
    if adapter:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "up_proj"],
            init_lora_weights=False,
        )
        model = get_peft_model(model, lora).eval()
    return model


@pytest.fixture(scope="session")
def tiny_model_factory() -> Callable[..., Any]:
    cache: dict[tuple[Any, ...], Any] = {}

    def factory(dtype: torch.dtype = torch.float64, seed: int = 0, adapter: bool = False) -> Any:
        key = (dtype, seed, adapter)
        if key not in cache:
            cache[key] = make_tiny_model(dtype, seed, adapter)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """A tiny float32 model + tokenizer saved as a transformers directory."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(torch.float32).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
