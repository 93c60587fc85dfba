"""Model sessions on a tiny saved model: the lazy model, the shared tokenizer cache, the one
staleness stamp (tokenizer, config, weights, adapter), the kept session, closing, forbidden ids
and the refusals."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from expansion.engine import session as session_module
from expansion.engine.models import ModelLoadError, ModelNotFoundError
from expansion.engine.rollout_fast import TransformersBackend
from expansion.engine.rollout_reference import ReferenceBackend
from expansion.engine.session import kept_model_session, open_model_session
from expansion.engine.tokenizer_cache import cached_tokenizer, model_stamp

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model directory, whose files a test may rewrite."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths `load_model` is called with by sessions (the real loading still runs)."""
    calls: list[Path] = []
    real = session_module.load_model

    def counting(path: Any, **kwargs: Any) -> Any:
        calls.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(session_module, "load_model", counting)
    return calls


def rewrite_later(path: Path) -> None:
    """Write the file again, its modification time a second later than the newest before (a
    coarse file-system clock cannot hide the change)."""
    newest = max(p.stat().st_mtime_ns for p in path.parent.iterdir() if p.is_file())
    path.write_bytes(path.read_bytes())
    os.utime(path, ns=(newest + 10**9, newest + 10**9))


def save_adapter(model_dir: Path, target: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from expansion.engine.models import load_model

    base, _ = load_model(model_dir, device="cpu")
    lora = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora)
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(target)
    return target


def test_the_model_loads_on_first_use_and_once(tiny_model_dir: Path, load_calls: list[Path]):
    with open_model_session(tiny_model_dir, device="cpu") as session:
        assert session.tokenizer is not None
        assert session.forbidden_token_ids == ()
        assert load_calls == []  # the tokenizer alone loads no model
        model = session.model
        assert session.model is model
        assert type(session.backend) is TransformersBackend
        assert session.backend.model is model
        assert load_calls == [tiny_model_dir]
    with open_model_session(tiny_model_dir, engine="reference", device="cpu") as session:
        assert type(session.backend) is ReferenceBackend
        assert session.backend.model is session.model


def test_a_vllm_session_gives_its_tokenizer_without_loading_the_model(
    tiny_model_dir: Path, load_calls: list[Path]
):
    with open_model_session(tiny_model_dir, engine="vllm", reasoning=True) as session:
        assert session.tokenizer is cached_tokenizer(tiny_model_dir)
        assert len(session.forbidden_token_ids) == 1
    assert load_calls == []


def test_the_tokenizer_is_the_process_cache(tiny_model_dir: Path):
    with (
        open_model_session(tiny_model_dir) as first,
        open_model_session(tiny_model_dir, engine="reference") as second,
    ):
        assert first.tokenizer is cached_tokenizer(tiny_model_dir)
        assert second.tokenizer is first.tokenizer


@pytest.mark.parametrize(
    "file_name", ["tokenizer_config.json", "tokenizer.json", "config.json", "model.safetensors"]
)
def test_rewriting_a_model_file_changes_the_stamp_and_reloads_the_tokenizer(
    model_copy: Path, file_name: str
):
    stamp = model_stamp(model_copy)
    tokenizer = cached_tokenizer(model_copy)
    assert cached_tokenizer(model_copy) is tokenizer  # unchanged: never loaded twice
    rewrite_later(model_copy / file_name)
    assert model_stamp(model_copy) > stamp
    reloaded = cached_tokenizer(model_copy)
    assert reloaded is not tokenizer
    assert reloaded("2 + 3")["input_ids"] == tokenizer("2 + 3")["input_ids"]
    with open_model_session(model_copy) as session:
        assert session.tokenizer is reloaded


def test_rewriting_an_adapter_file_changes_the_stamp(model_copy: Path, tmp_path: Path):
    adapter = save_adapter(model_copy, tmp_path / "adapter")
    model_only, with_adapter = model_stamp(model_copy), model_stamp(model_copy, adapter)
    assert with_adapter >= model_only
    rewrite_later(adapter / "adapter_config.json")
    assert model_stamp(model_copy) == model_only
    assert model_stamp(model_copy, adapter) > with_adapter
    assert model_stamp(tmp_path / "nothing-here") is None


def test_the_kept_session_is_replaced_when_its_files_change(
    model_copy: Path, tmp_path: Path, load_calls: list[Path]
):
    adapter = save_adapter(model_copy, tmp_path / "adapter")
    kept = kept_model_session(model_copy, device="cpu")
    model = kept.model
    assert kept_model_session(model_copy, device="cpu") is kept
    assert kept.model is model and len(load_calls) == 1

    rewrite_later(model_copy / "config.json")
    fresh = kept_model_session(model_copy, device="cpu")
    assert fresh is not kept and kept.closed and not fresh.closed
    assert fresh.model is not model and len(load_calls) == 2

    with_adapter = kept_model_session(model_copy, adapter=adapter, device="cpu")
    assert with_adapter is not fresh and fresh.closed
    assert hasattr(with_adapter.model, "disable_adapter")  # the adapter is the learner view
    rewrite_later(adapter / "adapter_config.json")
    assert kept_model_session(model_copy, adapter=adapter, device="cpu") is not with_adapter
    kept_model_session(model_copy, adapter=adapter, device="cpu").close()


class _RecordingEngine:
    """Stands in for a started vLLM backend: counts `close` calls."""

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_closing_shuts_the_vllm_engine_down_once_and_ends_the_session(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    engines: list[_RecordingEngine] = []

    def start(session: Any) -> _RecordingEngine:
        engines.append(_RecordingEngine())
        return engines[-1]

    monkeypatch.setattr(session_module.ModelSession, "_start_vllm", start)
    # An error in the block still closes the engine.
    with pytest.raises(KeyError), open_model_session(tiny_model_dir, engine="vllm") as session:
        assert session.backend is session.backend  # started once
        raise KeyError("the job failed")
    assert [engine.closed for engine in engines] == [1]
    session.close()
    assert [engine.closed for engine in engines] == [1]
    assert session.closed
    with pytest.raises(RuntimeError, match="closed"):
        _ = session.tokenizer
    with pytest.raises(RuntimeError, match="closed"):
        _ = session.model
    # A session whose engine never started closes without starting it.
    open_model_session(tiny_model_dir, engine="vllm").close()
    assert len(engines) == 1


def test_reasoning_forbids_the_thinking_end_token(tiny_model_dir: Path):
    with open_model_session(tiny_model_dir, reasoning=True) as session:
        end = session.tokenizer.convert_tokens_to_ids("</think>")
        assert session.forbidden_token_ids == (end,)
    with open_model_session(tiny_model_dir, reasoning=False) as session:
        assert session.forbidden_token_ids == ()


def test_an_unknown_engine_is_refused(tiny_model_dir: Path):
    with pytest.raises(ValueError, match="unknown engine 'turbo'; choose one of fast, reference"):
        open_model_session(tiny_model_dir, engine="turbo")


def test_missing_paths_and_a_vllm_engine_on_a_non_directory_are_refused_by_name(
    tiny_model_dir: Path, tmp_path: Path
):
    missing = tmp_path / "no-such-model"
    with pytest.raises(
        ModelNotFoundError, match=re.escape(f"No model at {missing}: the path does not")
    ):
        open_model_session(missing)
    with pytest.raises(ModelNotFoundError, match=re.escape(f"No adapter at {missing}")):
        open_model_session(tiny_model_dir, adapter=missing)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(
        ModelLoadError, match=f"vLLM needs a Hugging Face .* {re.escape(str(gguf))} is not one"
    ):
        open_model_session(gguf, engine="vllm")
    not_a_model = re.escape(f"{tmp_path} is not a model directory")
    with open_model_session(tmp_path) as session, pytest.raises(ModelLoadError, match=not_a_model):
        _ = session.model


@pytest.mark.slow
def test_a_gguf_file_opens_with_the_tokenizer_read_from_it(load_calls: list[Path]):
    from expansion.engine.embedded_model import embedded_gguf_path

    gguf = embedded_gguf_path()
    with open_model_session(gguf, device="cpu") as session:
        tokenizer = session.tokenizer  # no tokenizer files: read with the model
        assert load_calls == [gguf]
        assert tokenizer.chat_template
        assert session.model.config.num_hidden_layers == 30
        assert load_calls == [gguf]
