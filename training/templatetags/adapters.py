"""Template tags about trained adapters, for pages that offer adapters to use (evaluation)."""

from __future__ import annotations

from django import template

from training import selectors
from training.models import TrainingRun

register = template.Library()


@register.simple_tag
def adapters_that_did_not_move() -> list[TrainingRun]:
    """Training runs whose adapter's LoRA update is zero (they change nothing)."""
    return selectors.adapters_that_did_not_move()


@register.simple_tag
def adapter_did_not_move(adapter_path: str | None) -> bool:
    """Whether the adapter at this path (a training run's, or any on disk) did not move."""
    return selectors.adapter_did_not_move(adapter_path or "")
