"""The embedded model's preparation: conversion, idempotence, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from expansion.engine.embedded_model import (
    ModelPreparationError,
    convert_gguf_to_safetensors,
    embedded_gguf_path,
    is_prepared,
    prepare_embedded_model,
    verify_model,
)


def test_gguf_ships_with_the_package():
    path = embedded_gguf_path()
    assert path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"


def test_missing_gguf_names_the_file(tmp_path: Path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelPreparationError, match=str(missing)):
        convert_gguf_to_safetensors(missing, tmp_path / "out")


def test_corrupt_gguf_names_the_file(tmp_path: Path):
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(ModelPreparationError, match="broken.gguf"):
        convert_gguf_to_safetensors(corrupt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf_names_the_file(tmp_path: Path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(embedded_gguf_path().read_bytes()[:4096])
    with pytest.raises(ModelPreparationError, match="truncated.gguf"):
        convert_gguf_to_safetensors(truncated, tmp_path / "out")


@pytest.mark.slow
def test_prepared_model_generates_and_is_reused(embedded_model_dir: Path):
    assert is_prepared(embedded_model_dir)
    assert (embedded_model_dir / "config.json").is_file()
    text = verify_model(embedded_model_dir)
    assert text  # a real generation came back

    events: list[tuple[int, int, str]] = []
    prepared = prepare_embedded_model(
        embedded_model_dir.parent.parent, progress=lambda *e: events.append(e)
    )
    assert prepared.converted is False  # idempotent: reused, not converted again
    assert prepared.path == embedded_model_dir
    assert events[-1][0] == events[-1][1]  # progress ends at 100 %
    dones = [done for done, _total, _msg in events]
    assert dones == sorted(dones)
