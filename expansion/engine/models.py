"""Loading models for the engines: local transformers directories, GGUF files, PEFT adapters,
and random-initialised models of realistic size for benchmarks.

Device and dtype default to CUDA + bfloat16 when a GPU is present (float16 on GPUs without
bf16) and CPU + float32 otherwise; both can be overridden (`"cuda"`, `"cpu"`, `"float64"`, ...).

This module knows nothing about prompts, rollouts or Django, and never downloads anything:
paths must exist locally, and `random_model_like` builds its config by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Qwen2-0.5B's published architecture (Qwen/Qwen2-0.5B config.json), written out so that
# nothing is downloaded.
QWEN2_0_5B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
RANDOM_CONFIGS = {"qwen2-0.5b": QWEN2_0_5B, "random-0.5b": QWEN2_0_5B}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded from the given path."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """Nothing exists at the given path."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    return default_device() if device is None else torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that support it (else float16), float32 on CPU, unless told."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    adapter: str | Path | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local transformers directory or a `.gguf` file.

    `adapter`: a PEFT adapter directory; the returned model is then a `PeftModel` whose
    adapter is the learner view. A directory that is itself an adapter (adapter_config.json)
    is loaded on top of the base model it names.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if not path.exists():
        raise ModelNotFoundError(
            f"No model at {path}: expected a transformers model directory (with config.json) "
            "or a .gguf file."
        )
    base_path, adapter_path = path, Path(adapter) if adapter else None
    if path.is_dir() and (path / "adapter_config.json").is_file() and adapter is None:
        import json

        base_name = json.loads((path / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
        if not base_name or not Path(base_name).exists():
            raise ModelLoadError(
                f"{path} is a PEFT adapter whose base model {base_name!r} is not a local path; "
                "pass the base model directory and adapter=... instead."
            )
        base_path, adapter_path = Path(base_name), path
    try:
        if base_path.is_file():
            if base_path.suffix != ".gguf":
                raise ModelLoadError(f"{base_path} is a file but not a .gguf model")
            tokenizer = AutoTokenizer.from_pretrained(base_path.parent, gguf_file=base_path.name)
            model = AutoModelForCausalLM.from_pretrained(
                base_path.parent, gguf_file=base_path.name, dtype=torch_dtype
            )
        else:
            if not (base_path / "config.json").is_file():
                raise ModelLoadError(f"{base_path} is not a model directory: no config.json")
            tokenizer = AutoTokenizer.from_pretrained(base_path)
            model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types; name the path
        raise ModelLoadError(f"Cannot load the model at {base_path}: {exc}") from exc
    model = model.to(target)
    if adapter_path is not None:
        from peft import PeftModel

        if not adapter_path.exists():
            raise ModelNotFoundError(f"No adapter at {adapter_path}")
        model = PeftModel.from_pretrained(model, adapter_path).to(target)
    model.eval()
    return model, tokenizer


def random_model_like(
    config: str | dict[str, Any] = "qwen2-0.5b",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Any:
    """A random-initialised causal LM (Qwen2 architecture unless `model_type` says otherwise),
    built on `device` directly, for benchmarks; nothing is downloaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, str):
        if config not in RANDOM_CONFIGS:
            raise ModelLoadError(
                f"unknown random config {config!r}; choose one of {sorted(RANDOM_CONFIGS)}"
            )
        settings = dict(RANDOM_CONFIGS[config])
    else:
        settings = dict(config)
    settings.update(overrides)
    model_type = settings.pop("model_type", "qwen2")
    model_config = AutoConfig.for_model(model_type, **settings)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    torch.manual_seed(seed)
    with target:
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch_dtype)
    return model.eval()
