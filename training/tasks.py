"""Celery tasks of the training app: a thin interface to the studies' services."""

from __future__ import annotations

from celery import shared_task

from training.studies import services


@shared_task(name="training.tasks.advance_studies", ignore_result=True)
def advance_studies() -> None:
    """Periodic (celery beat): launch the due step of every running study."""
    services.studies_advance_active()
