"""Reads for training runs: the list, per-step metrics for the charts, the warning when the
unbounded negative-reference term dominates, and the adapter registry (with whether an adapter
moved at all, also used where evaluations offer adapters)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from django.db.models import QuerySet

from dailweb.labelled_fields import FieldLabel, LabelledField, labelled_fields
from training.engine.config import DailTrainingConfig
from training.models import TrainingMetric, TrainingRun

# The negative-reference term has no lower bound: warn when it has dominated this many steps.
DOMINANCE_STEPS = 3
METRIC_FIELDS = ("step", "epoch", "loss", "kl_privileged", "kl_negative", "nll", "lr", "grad_norm")


def training_run_list() -> QuerySet[TrainingRun]:
    return TrainingRun.objects.select_related("job", "created_by").order_by("-created_at", "-id")


def training_run_get(training_run_id: int) -> TrainingRun:
    return TrainingRun.objects.select_related("job", "created_by").get(pk=training_run_id)


# How the run page labels each setting (what each means comes from the config's field help).
TRAINING_LABELS: dict[str, FieldLabel] = {
    "gamma": FieldLabel("Cheating penalty γ"),
    "kl_direction": FieldLabel("KL direction"),
    "shortcut_policy": FieldLabel("Reviewer-marked shortcut spans"),
    "learning_rate": FieldLabel("Peak learning rate"),
    "lr_scheduler": FieldLabel("Schedule after warm-up"),
    "warmup_steps": FieldLabel("Warm-up", "steps"),
    "weight_decay": FieldLabel("Weight decay"),
    "max_grad_norm": FieldLabel("Gradient clipping norm"),
    "effective_batch_size": FieldLabel("Traces per optimizer step"),
    "micro_batch_size": FieldLabel("Traces per forward pass"),
    "epochs": FieldLabel("Epochs"),
    "max_length": FieldLabel("Longest view", "tokens"),
    "overlong_policy": FieldLabel("Traces longer than that"),
    "lora_r": FieldLabel("LoRA rank r"),
    "lora_alpha": FieldLabel("LoRA alpha α"),
    "lora_dropout": FieldLabel("LoRA dropout"),
    "lora_targets": FieldLabel("LoRA target modules"),
    "checkpoint_every": FieldLabel("Checkpoint every", "steps"),
    "checkpoints_to_keep": FieldLabel("Checkpoints kept", empty="all"),
    "seed": FieldLabel("Seed"),
    "precision": FieldLabel("Precision"),
    "device": FieldLabel("Device"),
    "fuse_reference_forwards": FieldLabel("One forward for both reference views"),
    "reference_cache": FieldLabel("Reference cache on disk"),
    "reference_cache_limit_gb": FieldLabel("Reference cache limit", "GB"),
}
# Shown with their own explanation in the page's summary, so not repeated among the settings.
TRAINING_SUMMARY_KEYS = ("objective", "loss_normalisation")


def training_run_settings_fields(run: TrainingRun) -> list[LabelledField]:
    """The run's settings as launched, as labelled fields (what each means from the engine's
    own field help); the objective and the loss normalisation are in the page's summary."""
    helps = {f.name: f.metadata.get("help", "") for f in fields(DailTrainingConfig)}
    values = {k: v for k, v in (run.config or {}).items() if k not in TRAINING_SUMMARY_KEYS}
    return labelled_fields(values, labels=TRAINING_LABELS, helps=helps)


def training_metric_points(run: TrainingRun, *, after: int = 0) -> list[dict[str, Any]]:
    """Per-step metrics after step `after`, in step order, as plain dicts for the charts."""
    rows = TrainingMetric.objects.filter(run=run, step__gt=after).order_by("step")
    return [
        dict(zip(METRIC_FIELDS, values, strict=True)) for values in rows.values_list(*METRIC_FIELDS)
    ]


def negative_term_warning(run: TrainingRun, points: Sequence[dict[str, Any]] | None = None) -> str:
    """A warning when the push away from the negative reference dominates ('' when not).

    The objective is KL(θ‖PS) − γ·KL(θ‖NR); the second term has no lower bound, so the loss
    can fall by pushing the learner anywhere away from NR instead of toward PS. Warned when
    γ·KL_NR exceeded KL_PS on each of the last DOMINANCE_STEPS steps, or the latest total
    loss is negative."""
    if run.objective != "dail" or run.gamma <= 0:
        return ""
    if points is None:
        recent = list(
            TrainingMetric.objects.filter(run=run)
            .order_by("-step")
            .values("step", "loss", "kl_privileged", "kl_negative")[:DOMINANCE_STEPS]
        )[::-1]
    else:
        recent = list(points)[-DOMINANCE_STEPS:]
    if not recent:
        return ""
    gamma = run.gamma
    last = recent[-1]
    dominated = len(recent) == DOMINANCE_STEPS and all(
        p["kl_negative"] is not None
        and p["kl_privileged"] is not None
        and gamma * p["kl_negative"] > p["kl_privileged"]
        for p in recent
    )
    if dominated:
        return (
            f"The push away from the negative reference dominates: γ·KL(θ‖NR) = "
            f"{gamma * last['kl_negative']:.4g} > KL(θ‖PS) = {last['kl_privileged']:.4g} for the "
            f"last {DOMINANCE_STEPS} steps (to step {last['step']}). That term has no lower "
            "bound, so the loss can keep falling while the learner moves away from the "
            "privileged view. Consider cancelling and lowering gamma."
        )
    if last["loss"] < 0:
        return (
            f"The total loss is negative ({last['loss']:.4g} at step {last['step']}): the "
            "unbounded push away from the negative reference outweighs the pull toward the "
            "privileged view. Consider cancelling and lowering gamma."
        )
    return ""


def adapter_registry() -> QuerySet[TrainingRun]:
    """Training runs that produced an adapter, newest first."""
    return training_run_list().exclude(adapter_path="")


def adapter_did_not_move(adapter_path: str) -> bool:
    """Whether the adapter at `adapter_path` changes nothing (its LoRA update norm is zero):
    the recorded norm of the training run that wrote it, else measured from its files (any
    adapter, also one trained elsewhere). False when it cannot be read: the evaluation's own
    checks report a missing or broken adapter."""
    from pathlib import Path

    from training.engine.adapter_motion import did_not_move, lora_update_norm

    path = (adapter_path or "").strip()
    if not path:
        return False
    recorded = (
        TrainingRun.objects.filter(adapter_path__in={path, str(Path(path).resolve())})
        .exclude(update_norm=None)
        .values_list("update_norm", flat=True)
        .first()
    )
    if recorded is not None:
        return did_not_move(recorded)
    try:
        return did_not_move(lora_update_norm(path))
    except (OSError, ValueError):
        return False


def adapters_that_did_not_move() -> list[TrainingRun]:
    """Training runs whose adapter did not move (for warnings beside adapter choices)."""
    from training.engine.adapter_motion import UPDATE_NORM_EPSILON

    return list(adapter_registry().filter(update_norm__lte=UPDATE_NORM_EPSILON))
