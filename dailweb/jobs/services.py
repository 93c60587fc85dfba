"""Writes on jobs: launch, cancel, retry, log, and failing jobs whose worker died.

A job is launched in one transaction that also publishes its Celery message: if the broker is
unreachable the transaction rolls back, so no half-created job is left behind. The task itself
tolerates the few milliseconds before the row is committed (see `runner.job_claim`).
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Concat, Right
from django.utils import timezone

from dailweb.errors import ConflictError, DomainError, ServiceUnavailableError
from dailweb.jobs.models import Job, JobState
from dailweb.jobs.registry import QUEUES, job_kind

logger = logging.getLogger(__name__)


def broker_display_url() -> str:
    """The broker URL without credentials, for messages."""
    parts = urlsplit(settings.CELERY_BROKER_URL)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _publish(job: Job) -> None:
    """Send the job's Celery message, failing fast with a clear message if the broker is down."""
    from dailweb.celery import app
    from dailweb.jobs.tasks import run_job

    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
            run_job.apply_async(
                args=[job.pk],
                task_id=job.task_id,
                queue=job.queue,
                connection=connection,
                retry=False,
            )
    except Exception as exc:  # kombu/redis raise many types; all mean "not queued"
        logger.warning("could not queue job %s: %s", job.pk, exc)
        hint = (
            "Start the product with `./dev up`, which runs the embedded broker."
            if settings.USES_EMBEDDED_BROKER
            else "Check that the Redis server in CELERY_BROKER_URL is running."
        )
        raise ServiceUnavailableError(
            f"The job queue ({broker_display_url()}) is unreachable, so nothing was launched. "
            f"{hint}"
        ) from exc


def _log_line(message: str) -> str:
    return f"[{timezone.now():%Y-%m-%d %H:%M:%S}] {message}\n"


def job_log_append(*, job_id: int, message: str) -> None:
    """Append a line to the job's log tail (kept to the last JOB_LOG_MAX_CHARS characters)."""
    Job.objects.filter(pk=job_id).update(
        log=Right(Concat(F("log"), Value(_log_line(message))), settings.JOB_LOG_MAX_CHARS)
    )


@transaction.atomic
def job_launch(
    *,
    kind: str,
    launched_by: AbstractBaseUser | None,
    params: dict[str, Any] | None = None,
    title: str = "",
    queue: str = "",
) -> Job:
    """Create a queued job of `kind` and publish it; raises ServiceUnavailableError (and creates
    nothing) when the broker cannot be reached."""
    definition = job_kind(kind)
    queue = queue or definition.queue
    if queue not in QUEUES:
        raise DomainError(f"Unknown queue {queue!r}; choose one of {', '.join(QUEUES)}.")
    who = getattr(launched_by, "username", None) or "the system"
    job = Job.objects.create(
        kind=kind,
        title=title or definition.label,
        queue=queue,
        params=params or {},
        progress_unit=definition.progress_unit,
        launched_by=launched_by if getattr(launched_by, "pk", None) else None,
        task_id=str(uuid.uuid4()),
        log=_log_line(f"queued on '{queue}' by {who}"),
    )
    _publish(job)
    return job


@transaction.atomic
def job_cancel(*, job_id: int, by: AbstractBaseUser | None) -> Job:
    """Cancel a queued job at once; ask a running job to stop at its next progress report."""
    job = Job.objects.select_for_update().get(pk=job_id)
    who = getattr(by, "username", None) or "the system"
    if job.state == JobState.QUEUED:
        job.state = JobState.CANCELLED
        job.finished_at = timezone.now()
        job.save(update_fields=["state", "finished_at"])
        job_log_append(job_id=job.pk, message=f"cancelled by {who} before it started")
        # The message stays in the broker; the task sees the state and does nothing.
    elif job.state == JobState.RUNNING:
        if job.cancel_requested:
            raise ConflictError(f"Job #{job.pk} is already stopping.")
        job.cancel_requested = True
        job.save(update_fields=["cancel_requested"])
        job_log_append(job_id=job.pk, message=f"cancel requested by {who}")
    else:
        raise ConflictError(
            f"Job #{job.pk} has {job.get_state_display().lower()}; only queued or running jobs "
            "can be cancelled."
        )
    job.refresh_from_db()
    return job


@transaction.atomic
def job_retry(*, job_id: int, by: AbstractBaseUser | None) -> Job:
    """Queue a failed or cancelled job again (a new attempt, with a new task id).

    Handlers are idempotent: work committed by earlier attempts is kept and skipped.
    """
    job = Job.objects.select_for_update().get(pk=job_id)
    if not job.can_retry:
        raise ConflictError(
            f"Job #{job.pk} is {job.get_state_display().lower()}; only failed or cancelled "
            "jobs can be retried."
        )
    who = getattr(by, "username", None) or "the system"
    job.state = JobState.QUEUED
    job.attempt += 1
    job.task_id = str(uuid.uuid4())
    job.error = ""
    job.cancel_requested = False
    job.started_at = job.finished_at = job.heartbeat_at = None
    job.worker_hostname = ""
    job.worker_pid = None
    job.save()
    job_log_append(job_id=job.pk, message=f"retry (attempt {job.attempt}) by {who}")
    _publish(job)
    job.refresh_from_db()
    return job


def _fail_running(jobs_filter: Q, reason: str) -> list[int]:
    failed: list[int] = []
    with transaction.atomic():
        for job in Job.objects.select_for_update().filter(jobs_filter, state=JobState.RUNNING):
            job.state = JobState.FAILED
            job.finished_at = timezone.now()
            job.error = reason.format(host=job.worker_hostname or "unknown worker")
            job.save(update_fields=["state", "finished_at", "error"])
            job_log_append(job_id=job.pk, message=job.error)
            failed.append(job.pk)
    for job_id in failed:
        logger.warning("job %s marked failed: worker lost", job_id)
    return failed


def job_fail_stale(*, now=None) -> list[int]:
    """Mark running jobs failed whose heartbeat stopped (their worker died); returns their ids."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.JOB_STALE_SECONDS)
    stale = Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True, started_at__lt=cutoff)
    return _fail_running(
        stale,
        "The worker {host} stopped sending heartbeats (it was killed or lost its machine); "
        "the job did not finish. Retry it to continue: finished work is kept.",
    )


def job_fail_lost_on_worker(*, hostname: str) -> list[int]:
    """A worker just started: jobs it was running before are dead. Mark them failed."""
    return _fail_running(
        Q(worker_hostname=hostname),
        "The worker {host} restarted while running this job (it was killed or crashed); the "
        "job did not finish. Retry it to continue: finished work is kept.",
    )
