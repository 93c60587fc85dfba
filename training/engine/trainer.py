"""The LoRA trainer of DAIL step 2: transformers' `Trainer` with a DAIL `compute_loss`.

One copy of the base weights serves all three views (`views.py`): the learner forward runs
with the LoRA adapter on and with gradients; the privileged (PS) and negative-reference (NR)
forwards run under `torch.no_grad()` with `disable_adapter()` in eval mode, i.e. the frozen
base model, and from epoch 2 on their hidden states come from the reference cache
(`reference_cache.py`) when it fits the configured disk budget.

What this module adds to `Trainer`:
- the loss normaliser counts the whole accumulated batch (`get_batch_samples`): its sequences
  under `loss_normalisation` "per_sequence" (the release: every trace weighs the same), its
  response tokens under "per_token", so micro-batching never changes the loss;
- a warm-up that is not shorter than the planned optimizer steps is refused before the model
  loads (`DailTrainingConfig.check_warmup`): such a run would train at learning rate 0;
- the saved adapter's update norm (`adapter_motion.lora_update_norm`) is in the result, so a
  caller can tell an adapter that did not move;
- metrics kl_privileged / kl_negative are token-weighted over each optimizer step and logged
  beside Trainer's loss, learning rate and gradient norm;
- a NaN/inf loss or gradient raises `TrainingDiverged` before the optimizer step, so no
  checkpoint ever holds non-finite weights;
- callbacks for progress and for cancellation (`should_stop()`, asked after every optimizer
  step once its progress is reported: a checkpoint is saved and training stops);
- resume from the last complete checkpoint of the output directory, refusing a different
  config or different data.

This module knows nothing about Django, jobs, tokenizers or prompts: it takes token-id
`TrainingExample`s and writes a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors) that peft, transformers and vLLM's LoRARequest load.

It trains on one device: `views.py` calls the decoder body directly, past any distributed
wrapper (the product scales by more workers on the `gpu` queue, not by data parallelism).

Departures from the release:
- Right-padded batches are run without an attention mask (padding follows every real token,
  so a causal model cannot see it), which keeps the fused causal attention kernels.
- On a CUDA GPU the base weights are bf16 and the LoRA weights fp32 (peft's default), without
  autocast; on CPU everything is fp32.
- Reference views are cached across epochs (same values, fewer forwards).
- The history in `TrainingResult` holds the steps of this call; a resumed run's earlier steps
  are in the checkpoint's trainer_state.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from training.engine.adapter_motion import lora_update_norm
from training.engine.checkpoints import AtomicCheckpointMixin, atomic_directory
from training.engine.config import LEGACY_DEFAULTS, DailTrainingConfig
from training.engine.data import (
    DailCollator,
    OverlongCounts,
    TrainingExample,
    examples_fingerprint,
    fit_to_length,
    views_for,
)
from training.engine.objective import dail_loss, loss_items, loss_masks, nll_loss
from training.engine.reference_cache import ReferenceCache, estimated_bytes
from training.engine.views import reference_logits, response_logits, splits_into_body_and_head

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
REFERENCE_CACHE_DIR = "reference_cache"
RUN_FILE = "training_run.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the last checkpoint on disk is still good."""


class TrainingDataError(ValueError):
    """No example is left to train on, or the data differs from the run being resumed."""


@dataclass(frozen=True)
class TrainingProgress:
    """One optimizer step's report: metrics has loss, kl_privileged, kl_negative (DAIL) or
    nll (NLL), lr, grad_norm and tokens (response tokens in the step)."""

    step: int
    total_steps: int
    epoch: float
    metrics: dict[str, float]


ProgressCallback = Callable[[TrainingProgress], None]


@dataclass
class TrainingResult:
    status: Literal["completed", "cancelled"]
    adapter_dir: Path | None  # the final adapter; None when cancelled
    last_checkpoint: Path | None
    global_step: int
    total_steps: int
    examples_used: int
    overlong: OverlongCounts
    resumed_from: Path | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # this call's steps only
    reference_cache: str = "off"  # "on", or "off (why)"
    reference_cache_hits: int = 0  # micro-batches whose references were read, not recomputed
    seconds: float = 0.0
    update_norm: float | None = None  # ||LoRA update||_F of the saved adapter; None: cancelled


# ---- model ---------------------------------------------------------------------------------


def resolve_device(config: DailTrainingConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA GPU")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(config: DailTrainingConfig, device: torch.device) -> torch.dtype:
    if config.precision == "fp32":
        return torch.float32
    if config.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def attach_lora(model: Any, config: DailTrainingConfig) -> Any:
    """Wrap a causal LM in a fresh LoRA adapter (seeded by the caller); returns a PeftModel."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.config.use_cache = False
    return get_peft_model(model, lora)


def load_model_with_lora(model_dir: str | Path, config: DailTrainingConfig) -> Any:
    """The base model from `model_dir` (bf16 on GPU, fp32 on CPU) with a fresh LoRA adapter."""
    from transformers import AutoModelForCausalLM, set_seed

    device = resolve_device(config)
    set_seed(config.seed)  # LoRA's A matrices are random
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(config, device))
    return attach_lora(base, config)


def batch_loss_masks(batch: dict[str, Tensor], config: DailTrainingConfig) -> tuple[Tensor, Tensor]:
    """`(loss_mask, pull_mask)` (B, T) of a collated batch under the config's shortcut policy."""
    return loss_masks(
        batch["response_mask"], batch.get("shortcut_mask"), config.objective, config.shortcut_policy
    )


def objective_loss(
    model: Any,
    batch: dict[str, Any],
    config: DailTrainingConfig,
    normaliser: int | float | Tensor | None = None,
    reference_cache: ReferenceCache | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The configured objective on one collated micro-batch of a PeftModel `model`."""
    loss_mask, pull_mask = batch_loss_masks(batch, config)
    if config.objective == "nll":
        learner = response_logits(model, batch["learner_input_ids"], batch["learner_positions"])
        return nll_loss(
            learner, batch["response_ids"], loss_mask, normaliser, config.loss_normalisation
        )
    # References first: their forward's working memory is gone before the learner's graph exists.
    privileged, negative = reference_logits(
        model, batch, config.fuse_reference_forwards, reference_cache
    )
    learner = response_logits(model, batch["learner_input_ids"], batch["learner_positions"])
    return dail_loss(
        learner,
        privileged,
        negative,
        loss_mask,
        config.gamma,
        config.kl_direction,
        pull_mask,
        normaliser,
        config.loss_normalisation,
    )


# ---- Trainer -------------------------------------------------------------------------------


def _make_trainer_class() -> type:
    """Build the Trainer subclass lazily, so importing this module does not import Trainer."""
    from transformers import Trainer

    class DailTrainer(AtomicCheckpointMixin, Trainer):  # type: ignore[misc]
        """`Trainer` whose loss is `objective_loss`, normalised over the accumulated batch;
        checkpoints are written aside and renamed into place (`checkpoints.py`)."""

        loss_is_scaled_for_ga = True  # compute_loss divides by the whole accumulated batch

        def __init__(
            self,
            *args: Any,
            dail_config: DailTrainingConfig,
            reference_cache: ReferenceCache | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.dail_config = dail_config
            self.reference_cache = reference_cache
            self._metric_sums: dict[str, float] = {}

        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
            batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
            normalisation = self.dail_config.loss_normalisation
            items = sum(
                loss_items(batch_loss_masks(b, self.dail_config)[0], normalisation) for b in batches
            )
            return batches, max(items, 1)

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Tensor],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            loss, metrics = objective_loss(
                self.accelerator.unwrap_model(model),
                inputs,
                self.dail_config,
                normaliser=num_items_in_batch,
                reference_cache=self.reference_cache,
            )
            if not math.isfinite(metrics["total"]):
                raise TrainingDiverged(
                    f"the loss became {metrics['total']} at step {self.state.global_step + 1}; "
                    "training stopped, the last checkpoint is unchanged"
                )
            tokens = metrics.pop("tokens")
            metrics.pop("total")
            sums = self._metric_sums
            sums["tokens"] = sums.get("tokens", 0.0) + tokens
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value * tokens
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            sums, self._metric_sums = self._metric_sums, {}
            tokens = sums.pop("tokens", 0.0)
            if "loss" in logs and tokens:
                logs.update({name: value / tokens for name, value in sums.items()})
                logs["tokens"] = tokens
            super().log(logs, start_time)

        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            return 0  # our inputs have no `input_ids`; transformers would warn and count 0

    return DailTrainer


def _callbacks(
    on_progress: ProgressCallback | None,
    should_stop: Callable[[], bool] | None,
    history: list[dict[str, float]],
) -> tuple[list[Any], dict[str, bool]]:
    from transformers import TrainerCallback

    flags = {"cancelled": False}

    class GuardAndReport(TrainerCallback):  # type: ignore[misc]
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            grads = [p.grad for p in kwargs["model"].parameters() if p.grad is not None]
            if grads and not bool(torch.stack([g.float().norm() for g in grads]).isfinite().all()):
                raise TrainingDiverged(
                    f"a gradient became NaN/inf at step {state.global_step + 1}; training "
                    "stopped before the optimizer step, the last checkpoint is unchanged"
                )

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if not logs or "loss" not in logs:
                return  # the end-of-training summary, not a step
            metrics = {k: float(v) for k, v in logs.items() if isinstance(v, int | float)}
            if "learning_rate" in metrics:
                metrics["lr"] = metrics.pop("learning_rate")
            metrics.pop("epoch", None)
            history.append({"step": float(state.global_step), **metrics})
            if on_progress is not None:
                on_progress(
                    TrainingProgress(
                        state.global_step, state.max_steps, state.epoch or 0.0, metrics
                    )
                )
            # Logged every step; Trainer saves right after logging, then leaves the loop.
            if should_stop is not None and state.global_step < state.max_steps and should_stop():
                flags["cancelled"] = True
                control.should_training_stop = True
                control.should_save = True  # keep the work done so far

    return [GuardAndReport()], flags


def open_reference_cache(
    peft_model: Any,
    examples: Sequence[TrainingExample],
    config: DailTrainingConfig,
    output_dir: Path,
    model_dir: str | Path,
) -> tuple[ReferenceCache | None, str]:
    """The run's reference cache, or None with the reason it is not used."""
    if config.objective != "dail" or not config.reference_cache:
        return None, "off (not asked for)"
    if config.epochs < 2:
        return None, "off (one epoch: nothing to reuse)"
    if not splits_into_body_and_head(peft_model):
        return None, "off (this model post-processes its logits)"
    head = peft_model.get_base_model().get_output_embeddings()
    dtype = head.weight.dtype
    size = estimated_bytes([len(e.response_ids) for e in examples], head.weight.shape[1], dtype)
    if size > config.reference_cache_limit_gb * 1e9:
        return None, (
            f"off (needs {size / 1e9:.1f} GB > reference_cache_limit_gb "
            f"{config.reference_cache_limit_gb})"
        )
    config_file = Path(model_dir) / "config.json"
    identity = {
        "model": str(Path(model_dir).resolve()),
        "model_config": hashlib.sha256(config_file.read_bytes()).hexdigest()
        if config_file.is_file()
        else "",
        "dtype": str(dtype),
    }
    return ReferenceCache(output_dir / REFERENCE_CACHE_DIR, identity), "on"


def last_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The highest-numbered checkpoint whose trainer state was written (Trainer writes it last)."""
    if not checkpoints_dir.is_dir():
        return None
    found = []
    for path in checkpoints_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def _check_resumable(run_file: Path, record: dict[str, Any]) -> None:
    if not run_file.is_file():
        return
    saved = json.loads(run_file.read_text())
    # A run file written before a setting existed recorded what that run did: the legacy value.
    saved["config"] = {**LEGACY_DEFAULTS, **saved.get("config", {})}
    if saved["config"] != record["config"]:
        changed = sorted(
            k for k in record["config"] if saved["config"].get(k) != record["config"][k]
        )
        raise TrainingDataError(
            f"{run_file.parent} holds a run with other settings ({', '.join(changed)}); "
            "use a fresh output directory or the same settings"
        )
    if saved.get("data") != record["data"]:
        raise TrainingDataError(
            f"{run_file.parent} holds a run on other training data; use a fresh output directory"
        )


def build_trainer(
    peft_model: Any,
    examples: Sequence[TrainingExample],
    config: DailTrainingConfig,
    checkpoints_dir: Path,
    callbacks: Sequence[Any] = (),
    pad_token_id: int = 0,
    reference_cache: ReferenceCache | None = None,
) -> Any:
    """A `Trainer` wired for `config` (examples already fitted to `max_length`)."""
    from transformers import PrinterCallback, TrainingArguments

    device = resolve_device(config)
    args = TrainingArguments(
        output_dir=str(checkpoints_dir),
        per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.epochs,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.checkpoint_every,
        save_total_limit=config.checkpoints_to_keep,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=device.type == "cpu",
        dataloader_pin_memory=device.type == "cuda",
    )
    trainer = _make_trainer_class()(
        model=peft_model,
        args=args,
        train_dataset=list(examples),
        data_collator=DailCollator(pad_token_id, views_for(config.objective)),
        callbacks=list(callbacks),
        dail_config=config,
        reference_cache=reference_cache,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def train_adapter(
    model_dir: str | Path,
    examples: Sequence[TrainingExample],
    config: DailTrainingConfig,
    output_dir: str | Path,
    *,
    on_progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: bool = True,
    pad_token_id: int = 0,
) -> TrainingResult:
    """Train a LoRA adapter on `examples` with `config`; write it to `output_dir/adapter`.

    `output_dir/checkpoints/checkpoint-N` are resumable checkpoints (every
    `config.checkpoint_every` steps, at cancellation and at the end). With `resume` (default),
    a run that finds a complete checkpoint in `output_dir` continues from it; the settings and
    data must be the same. `should_stop()` is asked after every optimizer step.
    Raises `TrainingDiverged` on a NaN/inf loss or gradient, `TrainingDataError` when no
    example fits `config.max_length`, the warm-up is not shorter than the planned steps, or
    the data differs from the run being resumed.
    """
    started = time.monotonic()
    output_dir = Path(output_dir)
    checkpoints_dir = output_dir / CHECKPOINTS_DIR
    kept, overlong = fit_to_length(
        examples, config.max_length, config.overlong_policy, views_for(config.objective)
    )
    if not kept:
        raise TrainingDataError(
            f"none of the {len(examples)} examples fits max_length={config.max_length} "
            f"({overlong.as_dict()})"
        )
    try:
        config.check_warmup(config.planned_steps(len(kept)))
    except ValueError as exc:
        raise TrainingDataError(str(exc)) from exc
    record = {
        "config": {**config.to_dict(), "model": str(model_dir)},
        "data": {"examples": len(kept), "fingerprint": examples_fingerprint(kept)},
    }
    run_file = output_dir / RUN_FILE
    checkpoint = last_complete_checkpoint(checkpoints_dir) if resume else None
    if checkpoint is not None:
        _check_resumable(run_file, record)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    peft_model = load_model_with_lora(model_dir, config)
    cache, cache_note = open_reference_cache(peft_model, kept, config, output_dir, model_dir)
    history: list[dict[str, float]] = []
    callbacks, flags = _callbacks(on_progress, should_stop, history)
    trainer = build_trainer(
        peft_model, kept, config, checkpoints_dir, callbacks, pad_token_id, cache
    )
    if should_stop is not None and should_stop():
        flags["cancelled"] = True  # cancelled before the first step: nothing new to save
    else:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    adapter_dir = None
    update_norm = None
    if not flags["cancelled"]:
        adapter_dir = output_dir / ADAPTER_DIR
        with atomic_directory(adapter_dir) as staging:  # no half-written adapter is ever left
            peft_model.save_pretrained(staging)
        update_norm = lora_update_norm(adapter_dir)
        if cache is not None:  # only a resumed run could use it again; it can be gigabytes
            shutil.rmtree(cache.directory, ignore_errors=True)
    return TrainingResult(
        status="cancelled" if flags["cancelled"] else "completed",
        adapter_dir=adapter_dir,
        last_checkpoint=last_complete_checkpoint(checkpoints_dir),
        global_step=trainer.state.global_step,
        total_steps=trainer.state.max_steps,
        examples_used=len(kept),
        overlong=overlong,
        resumed_from=checkpoint,
        history=history,
        reference_cache=cache_note,
        reference_cache_hits=cache.hits if cache else 0,
        seconds=time.monotonic() - started,
        update_norm=update_norm,
    )
