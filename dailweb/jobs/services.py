"""Writes on jobs: launch, cancel, retry, log, and the sweep (failing jobs whose worker died,
sending again the message of queued jobs that never reached a worker).

Publishing: a launch or retry first checks that the broker answers (if not, it raises before
writing anything, so the caller's transaction rolls back and nothing is created: a 503 message).
The Celery message itself is sent when the transaction that queued the job commits
(`transaction.on_commit`), so a worker never receives a job whose row was rolled back or is not
committed yet. If sending still fails then (the broker went away in between), the job is marked
failed with that reason, never left silently queued.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import F, Max, Q, Value
from django.db.models.functions import Concat, Right
from django.utils import timezone

from dailweb.errors import ConflictError, DomainError, ServiceUnavailableError
from dailweb.jobs import health
from dailweb.jobs.models import Job, JobState
from dailweb.jobs.registry import QUEUES, job_kind

logger = logging.getLogger(__name__)


def broker_display_url() -> str:
    """The broker URL without credentials, for messages."""
    parts = urlsplit(settings.CELERY_BROKER_URL)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _broker_hint() -> str:
    if settings.USES_EMBEDDED_BROKER:
        return "Start the product with `./dev up`, which runs the embedded broker."
    return "Check that the Redis server in CELERY_BROKER_URL is running."


def _require_broker() -> None:
    """Refuse to queue anything while the broker does not answer. Called before any row is
    written, so the caller's transaction rolls back and nothing half-created is left."""
    status = health.broker_status(fresh=True)
    if not status.reachable:
        logger.warning("job queue %s unreachable: %s", status.url, status.error)
        raise ServiceUnavailableError(
            f"The job queue ({status.url}) is unreachable, so nothing was launched. "
            f"{_broker_hint()}"
        )


def _send(*, job_id: int, task_id: str, queue: str) -> None:
    """Send the job's Celery message now, failing fast (no retries) if the broker is down."""
    from dailweb.celery import app
    from dailweb.jobs.tasks import run_job

    with app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=3)
        run_job.apply_async(
            args=[job_id], task_id=task_id, queue=queue, connection=connection, retry=False
        )


def _publish_on_commit(job: Job) -> None:
    """Send the job's message once the transaction that queued it commits (at once when there
    is none). A rolled-back launch therefore publishes nothing.

    `robust=True`: a failure in this callback (it handles the broker itself; only the database
    failing while it marks the job could escape) is logged and does not stop the other
    callbacks of that commit, such as the messages of an expansion run's other chunks, nor turn
    a committed launch into a server error. A job whose message was not sent stays queued and
    the sweep (`job_resend_lost`) sends it again."""
    job_id, task_id, queue = job.pk, job.task_id, job.queue
    transaction.on_commit(
        lambda: _publish_committed(job_id=job_id, task_id=task_id, queue=queue), robust=True
    )


def _publish_committed(*, job_id: int, task_id: str, queue: str) -> None:
    try:
        _send(job_id=job_id, task_id=task_id, queue=queue)
    except Exception as exc:  # kombu/redis raise many types; all mean "not queued"
        logger.warning("could not queue job %s: %s", job_id, exc)
        reason = (
            f"The job queue ({broker_display_url()}) could not be reached when this job was "
            f"queued ({str(exc).strip() or type(exc).__name__}), so no worker received it. "
            f"{_broker_hint()} Retry the job when it is back: finished work is kept."
        )
        with transaction.atomic():
            failed = Job.objects.filter(pk=job_id, task_id=task_id, state=JobState.QUEUED).update(
                state=JobState.FAILED, finished_at=timezone.now(), error=reason
            )
            if failed:
                job_log_append(job_id=job_id, message=reason)


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
    """Create a queued job of `kind`, published when the transaction commits; raises
    ServiceUnavailableError (and creates nothing) when the broker cannot be reached."""
    definition = job_kind(kind)
    queue = queue or definition.queue
    if queue not in QUEUES:
        raise DomainError(f"Unknown queue {queue!r}; choose one of {', '.join(QUEUES)}.")
    _require_broker()
    who = getattr(launched_by, "username", None) or "the system"
    job = Job.objects.create(
        kind=kind,
        title=title or definition.label,
        queue=queue,
        params=params or {},
        progress_unit=definition.progress_unit,
        launched_by=launched_by if getattr(launched_by, "pk", None) else None,
        task_id=str(uuid.uuid4()),
        published_at=timezone.now(),
        log=_log_line(f"queued on '{queue}' by {who}"),
    )
    _publish_on_commit(job)
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
    _require_broker()
    who = getattr(by, "username", None) or "the system"
    job.state = JobState.QUEUED
    job.attempt += 1
    job.task_id = str(uuid.uuid4())
    job.published_at = timezone.now()
    job.resends = 0
    job.error = ""
    job.cancel_requested = False
    job.started_at = job.finished_at = job.heartbeat_at = None
    job.worker_hostname = ""
    job.worker_pid = None
    job.save()
    job_log_append(job_id=job.pk, message=f"retry (attempt {job.attempt}) by {who}")
    _publish_on_commit(job)
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


class LostJobs(NamedTuple):
    resent: list[int]
    failed: list[int]


def _idle_since_by_queue(now: datetime) -> dict[str, tuple[datetime, str]]:
    """For each queue with an idle live worker: since when the longest-idle one (its name) has
    had nothing to run. A worker is idle when no running job names it; it has been idle since
    it started or since its last job finished, whichever is later. A worker that just became
    free or just started may still be fetching the next message, so the wait counts from then."""
    workers = health.workers_online(now=now)
    names = [w.hostname for w in workers]
    busy = set(
        Job.objects.filter(state=JobState.RUNNING, worker_hostname__in=names).values_list(
            "worker_hostname", flat=True
        )
    )
    last_finished = dict(
        Job.objects.filter(worker_hostname__in=names, finished_at__isnull=False)
        .order_by()
        .values_list("worker_hostname")
        .annotate(last=Max("finished_at"))
        .values_list("worker_hostname", "last")
    )
    idle: dict[str, tuple[datetime, str]] = {}
    for worker in workers:
        if worker.hostname in busy:
            continue
        since = max(worker.started_at, last_finished.get(worker.hostname, worker.started_at))
        for queue in worker.queues:
            if queue not in idle or since < idle[queue][0]:
                idle[queue] = (since, worker.hostname)
    return idle


def job_resend_lost(*, now: datetime | None = None) -> LostJobs:
    """Queued jobs whose message never reached a worker (the broker lost it, or a worker
    dropped it): queued for JOB_QUEUED_LOST_SECONDS while a live worker of their queue had
    nothing to run. Their message is sent again with the same task id, at most
    JOB_RESEND_MAX times per attempt; then the job is failed with the reason.

    A duplicate is harmless: `runner.job_claim` locks the row and runs it only for the task id
    it holds while it is queued; a second copy of the same task id finds it running (dropped
    while its process is alive) or finished (nothing to do). Jobs cancelled while queued are
    no longer queued, so they are never sent again."""
    now = now or timezone.now()
    wait = timedelta(seconds=settings.JOB_QUEUED_LOST_SECONDS)
    cutoff = now - wait
    result = LostJobs([], [])
    for queue, (idle_since, worker) in _idle_since_by_queue(now).items():
        if idle_since > cutoff:
            continue
        waiting = Q(published_at__lte=cutoff) | Q(published_at__isnull=True, created_at__lte=cutoff)
        candidates = Job.objects.filter(waiting, state=JobState.QUEUED, queue=queue)
        for job_id in candidates.values_list("pk", flat=True):
            with transaction.atomic():
                job = Job.objects.select_for_update().get(pk=job_id)
                queued_since = job.published_at or job.created_at
                if job.state != JobState.QUEUED or queued_since > cutoff:
                    continue  # claimed, cancelled or re-sent meanwhile
                seconds = int((now - max(queued_since, idle_since)).total_seconds())
                if job.resends >= settings.JOB_RESEND_MAX:
                    job.state = JobState.FAILED
                    job.finished_at = now
                    job.error = (
                        f"The job's message never reached a worker: it stayed queued {seconds} s "
                        f"while {worker} on '{queue}' had nothing to run, also after "
                        f"{job.resends} re-sends. The broker may be losing messages, or the "
                        "workers may run other code than the web server; check the worker logs, "
                        "then retry the job."
                    )
                    job.save(update_fields=["state", "finished_at", "error"])
                    job_log_append(job_id=job.pk, message=job.error)
                    result.failed.append(job.pk)
                    continue
                job.resends += 1
                job.published_at = now
                job.save(update_fields=["resends", "published_at"])
                job_log_append(
                    job_id=job.pk,
                    message=f"message re-sent ({job.resends} of {settings.JOB_RESEND_MAX}): "
                    f"queued {seconds} s with an idle worker ({worker})",
                )
                _publish_on_commit(job)
                result.resent.append(job.pk)
    for job_id in result.resent:
        logger.warning("job %s: message re-sent (it never reached a worker)", job_id)
    for job_id in result.failed:
        logger.warning("job %s marked failed: its message never reached a worker", job_id)
    return result


def job_fail_lost_on_worker(*, hostname: str) -> list[int]:
    """A worker just started: jobs it was running before are dead. Mark them failed."""
    return _fail_running(
        Q(worker_hostname=hostname),
        "The worker {host} restarted while running this job (it was killed or crashed); the "
        "job did not finish. Retry it to continue: finished work is kept.",
    )
