"""Fixtures of the evaluation tests: a tiny model directory and LoRA adapters for it (built
from the engine tests' tiny model; nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    import torch

    from tests.engine.conftest import build_tiny_tokenizer, make_tiny_model

    path = tmp_path_factory.mktemp("eval-tiny-model")
    make_tiny_model(torch.float32, seed=7).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def write_adapter(path: Path, base: Path | str) -> Path:
    """A real (random) LoRA adapter for the tiny model, naming `base` as its base model."""
    import torch

    from tests.engine.conftest import make_tiny_model

    make_tiny_model(torch.float32, seed=7, adapter=True).save_pretrained(path)
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(config))
    return path


@pytest.fixture
def tiny_adapter_path(tmp_path, tiny_model_path) -> Path:
    return write_adapter(tmp_path / "run" / "adapter", tiny_model_path)
