"""A study advances as soon as one of its jobs finishes (in the worker that ran the job)."""

from __future__ import annotations

from django.dispatch import receiver

from dailweb.jobs.events import job_finished
from training.studies import services


@receiver(job_finished, dispatch_uid="training.studies.advance_on_job_finished")
def advance_on_job_finished(sender, *, job_id: int, state: str, **kwargs) -> None:
    for study_id in services.studies_of_job(job_id):
        services.study_advance(study_id=study_id)
