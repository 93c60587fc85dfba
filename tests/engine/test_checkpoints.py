"""Atomic checkpoint and adapter writes (training/engine/checkpoints.py) on a tiny random Llama:
a write interrupted half-way leaves no directory that looks complete, and training resumes
from the last checkpoint that was fully written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.training_fixtures import make_examples, save_tiny_llama
from training.engine.checkpoints import STAGING_PREFIX, atomic_directory
from training.engine.config import DailTrainingConfig
from training.engine.trainer import last_complete_checkpoint, train_adapter

pytestmark = pytest.mark.engine


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs (BaseException: no handler catches it)."""


def tiny_config(**overrides) -> DailTrainingConfig:
    values = dict(
        effective_batch_size=1,
        micro_batch_size=1,
        epochs=1,
        learning_rate=1e-2,
        warmup_steps=0,
        lora_r=4,
        lora_alpha=8,
        checkpoint_every=1,
        checkpoints_to_keep=None,
        max_length=64,
        device="cpu",
        reference_cache=False,
    )
    values.update(overrides)
    return DailTrainingConfig(**values)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def test_atomic_directory_publishes_only_a_complete_write(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with pytest.raises(OSError), atomic_directory(target) as staging:
        (staging / "weights").write_text("v2, half")
        raise OSError(28, "No space left on device")
    assert (target / "weights").read_text() == "v1"  # the old one is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging left behind


def test_a_crash_while_writing_the_trainer_state_leaves_the_previous_checkpoint(
    model_dir, tmp_path, monkeypatch
):
    """Trainer writes trainer_state.json last; a crash half-way through it used to leave a
    `checkpoint-N` with a truncated state that `last_complete_checkpoint` took for complete."""
    from transformers.trainer_callback import TrainerState

    examples = make_examples(4, seed=3)
    original = TrainerState.save_to_json

    def crash_at_step_3(self, json_path):
        if self.global_step == 3:
            Path(json_path).write_text('{"global_step": 3, "log_hi')  # half of it, then dead
            raise Crash()
        original(self, json_path)

    monkeypatch.setattr(TrainerState, "save_to_json", crash_at_step_3)
    with pytest.raises(Crash):
        train_adapter(model_dir, examples, tiny_config(), tmp_path)
    checkpoints = tmp_path / "checkpoints"
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-2"
    assert not (checkpoints / "checkpoint-3").exists()

    monkeypatch.setattr(TrainerState, "save_to_json", original)
    resumed = train_adapter(model_dir, examples, tiny_config(), tmp_path)
    assert resumed.resumed_from.name == "checkpoint-2"
    assert resumed.global_step == 4
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == [f"checkpoint-{n}" for n in range(1, 5)]  # the staging dir is gone too
    assert not any(p.name.startswith(STAGING_PREFIX) for p in tmp_path.iterdir())


@pytest.mark.parametrize("where", ["checkpoint", "adapter"])
def test_a_full_disk_leaves_no_half_written_checkpoint_or_adapter(
    where, model_dir, tmp_path, monkeypatch
):
    from peft import PeftModel

    original = PeftModel.save_pretrained

    def full_disk(self, save_directory, **kwargs):
        if (where == "checkpoint") != ("checkpoint-" in str(save_directory)):
            return original(self, save_directory, **kwargs)
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        Path(save_directory, "adapter_config.json").write_text("{}")
        raise OSError(28, f"No space left on device: '{save_directory}'")

    monkeypatch.setattr(PeftModel, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train_adapter(model_dir, make_examples(2, seed=4), tiny_config(), tmp_path)
    assert not (tmp_path / "adapter").exists()
    if where == "checkpoint":
        assert not (tmp_path / "checkpoints" / "checkpoint-1").exists()
    else:
        assert last_complete_checkpoint(tmp_path / "checkpoints").name == "checkpoint-2"
    leftovers = [p for p in tmp_path.rglob(f"{STAGING_PREFIX}*")]
    assert not leftovers
