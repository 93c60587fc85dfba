"""Signals the job machinery sends, for other apps to follow their jobs without the job
machinery knowing them (a study advances when one of its jobs finishes).

`job_finished(sender=Job, job_id, state)`: sent by the worker after it wrote a job's final
state (succeeded, failed or cancelled while running), outside any transaction, with
`send_robust`, so a receiver's error is logged and never changes the job. Jobs finished by
someone else (cancelled while queued, failed by the sweep) send nothing: receivers that must
see every end also poll (training.tasks.advance_studies).
"""

from __future__ import annotations

import logging

from django.dispatch import Signal

logger = logging.getLogger(__name__)

job_finished = Signal()


def job_finished_send(*, job_id: int, state: str) -> None:
    from dailweb.jobs.models import Job

    for receiver, result in job_finished.send_robust(sender=Job, job_id=job_id, state=state):
        if isinstance(result, Exception):
            logger.error(
                "a job_finished receiver (%s) failed for job %s",
                getattr(receiver, "__qualname__", receiver),
                job_id,
                exc_info=result,
            )
