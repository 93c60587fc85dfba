"""Model loading: directories, GGUF, adapters, defaults, errors, random benchmark models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from expansion.engine.models import (
    ModelLoadError,
    ModelNotFoundError,
    load_model,
    random_model_like,
    resolve_dtype,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_missing_path_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="No model at .*nowhere"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):  # also catchable as the builtin
        load_model(tmp_path / "nowhere")


def test_directory_without_config_and_non_gguf_file_are_refused(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    weird = tmp_path / "weights.bin"
    weird.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(weird)


def test_cpu_defaults_to_float32_and_dtype_can_be_overridden(tiny_model_dir: Path):
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    assert tokenizer.chat_template
    model64, _ = load_model(tiny_model_dir, device="cpu", dtype="float64")
    assert next(model64.parameters()).dtype == torch.float64
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(tiny_model_dir, dtype="float8")


def test_dtype_defaults():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        assert resolve_dtype(None, torch.device("cuda")) in (torch.bfloat16, torch.float16)


def test_adapter_directory_loads_on_its_base(tiny_model_dir: Path, tmp_path: Path):
    from peft import LoraConfig, get_peft_model

    base, _ = load_model(tiny_model_dir, device="cpu")
    lora = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora)
    peft_model.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3]])
    for model, _ in (
        load_model(tmp_path / "adapter", device="cpu"),
        load_model(tiny_model_dir, device="cpu", adapter=tmp_path / "adapter"),
    ):
        assert hasattr(model, "disable_adapter")
        with torch.no_grad():
            with_adapter = model(ids).logits
            with model.disable_adapter():
                without = model(ids).logits
        assert not torch.allclose(with_adapter, without)


def test_random_model_is_built_by_hand():
    model = random_model_like(
        "qwen2-0.5b",
        device="cpu",
        num_hidden_layers=1,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=1,
    )
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.num_hidden_layers == 1 and model.config.rope_parameters["rope_theta"] == 1e6
    other = random_model_like(
        {
            "model_type": "llama",
            "vocab_size": 50,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        device="cpu",
    )
    assert type(other).__name__ == "LlamaForCausalLM"
    with pytest.raises(ModelLoadError, match="unknown random config"):
        random_model_like("gpt-7")


@pytest.mark.slow
def test_gguf_file_loads(tmp_path: Path):
    from expansion.engine.embedded_model import embedded_gguf_path

    model, tokenizer = load_model(embedded_gguf_path(), device="cpu")
    assert model.config.num_hidden_layers == 30
    assert tokenizer.chat_template
