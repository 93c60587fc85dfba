"""Running one job inside a Celery task: claim the row, heartbeat, report progress, finish.

The handler gets a `JobContext`; it reports progress and checks for cancellation through it.
Writes are throttled (a progress bar does not need 100 updates a second) and always carry the
task id, so a superseded attempt can never overwrite a newer one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from dailweb.jobs.models import Job, JobState
from dailweb.jobs.registry import job_kind
from dailweb.jobs.services import job_log_append

logger = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL = 0.5  # seconds between progress writes
CANCEL_CHECK_INTERVAL = 1.0  # seconds between reads of the cancel flag
CLAIM_WAIT_SECONDS = 10.0  # how long a task waits for its row to be committed


class JobCancelled(Exception):
    """Raised inside a handler when an admin asked the job to stop."""


class JobContext:
    """What a handler sees of its job: parameters, progress, log and cancellation."""

    def __init__(self, job: Job) -> None:
        self.job_id = job.pk
        self.task_id = job.task_id
        self.params: dict[str, Any] = dict(job.params)
        self.attempt = job.attempt
        self.launched_by_id = job.launched_by_id
        self._done = job.progress_done
        # Progress committed by earlier attempts: idempotent handlers resume from here.
        self.done_before = job.progress_done
        self._total = job.progress_total
        self._unit = job.progress_unit
        self._stage = job.stage
        self._last_write = 0.0
        self._last_cancel_check = 0.0

    def _mine(self):
        return Job.objects.filter(pk=self.job_id, task_id=self.task_id, state=JobState.RUNNING)

    def progress(
        self,
        done: int,
        total: int | None = None,
        *,
        stage: str | None = None,
        unit: str | None = None,
        force: bool = False,
    ) -> None:
        """Report progress (`done` of `total` units); also checks for cancellation."""
        self._done = int(done)
        if total is not None:
            self._total = int(total)
        stage_changed = stage is not None and stage != self._stage
        if stage is not None:
            self._stage = stage[:200]
        if unit is not None:
            self._unit = unit[:32]
        now = time.monotonic()
        if force or stage_changed or now - self._last_write >= PROGRESS_WRITE_INTERVAL:
            self._last_write = now
            self._mine().update(
                progress_done=self._done,
                progress_total=self._total,
                progress_unit=self._unit,
                stage=self._stage,
                heartbeat_at=timezone.now(),
            )
        self.check_cancelled()

    def log(self, message: str) -> None:
        logger.info("job %s: %s", self.job_id, message)
        job_log_append(job_id=self.job_id, message=message)

    def check_cancelled(self) -> None:
        """Raise JobCancelled if an admin asked this job to stop (read at most once a second)."""
        now = time.monotonic()
        if now - self._last_cancel_check < CANCEL_CHECK_INTERVAL:
            return
        self._last_cancel_check = now
        if Job.objects.filter(pk=self.job_id, cancel_requested=True).exists():
            raise JobCancelled()

    def flush(self) -> None:
        self.progress(self._done, self._total, force=True)


class _Heartbeat(threading.Thread):
    """Touches the job's heartbeat while the handler runs, so a dead worker is noticed."""

    def __init__(self, job_id: int, task_id: str) -> None:
        super().__init__(name=f"job-{job_id}-heartbeat", daemon=True)
        self.job_id = job_id
        self.task_id = task_id
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopped.wait(settings.JOB_HEARTBEAT_SECONDS):
                Job.objects.filter(
                    pk=self.job_id, task_id=self.task_id, state=JobState.RUNNING
                ).update(heartbeat_at=timezone.now())
        except Exception:  # the heartbeat must never take the job down
            logger.exception("heartbeat of job %s failed", self.job_id)
        finally:
            connection.close()


def job_claim(*, job_id: int, task_id: str, hostname: str) -> Job | None:
    """Move the job from queued to running for this task, or say why not (returns None)."""
    deadline = time.monotonic() + CLAIM_WAIT_SECONDS
    while True:
        with transaction.atomic():
            job = Job.objects.select_for_update().filter(pk=job_id).first()
            if job is not None:
                return _claim_locked(job, task_id, hostname)
        if time.monotonic() > deadline:
            logger.warning("job %s does not exist; task %s dropped", job_id, task_id)
            return None
        time.sleep(0.2)  # the launching transaction may not have committed yet


def _claim_locked(job: Job, task_id: str, hostname: str) -> Job | None:
    if job.task_id != task_id:
        logger.info("task %s is superseded by attempt %s of job %s", task_id, job.attempt, job.pk)
        return None
    if job.state == JobState.RUNNING:
        # The broker delivered this task again: the worker process that ran it died.
        job.state = JobState.FAILED
        job.finished_at = timezone.now()
        job.error = (
            f"The worker process running this job on {job.worker_hostname or 'a worker'} died "
            "(killed or out of memory); the job did not finish. Retry it to continue: "
            "finished work is kept."
        )
        job.save(update_fields=["state", "finished_at", "error"])
        job_log_append(job_id=job.pk, message=job.error)
        return None
    if job.state != JobState.QUEUED:
        logger.info("job %s is %s; nothing to do for task %s", job.pk, job.state, task_id)
        return None
    now = timezone.now()
    job.state = JobState.RUNNING
    job.started_at = job.heartbeat_at = now
    job.worker_hostname = hostname[:200]
    job.worker_pid = os.getpid()
    job.progress_at_start = job.progress_done
    job.save()
    job_log_append(job_id=job.pk, message=f"started on {job.worker_hostname} (pid {os.getpid()})")
    return job


def _finish(ctx: JobContext, state: str, **fields: Any) -> None:
    with transaction.atomic():
        updated = ctx._mine().update(state=state, finished_at=timezone.now(), **fields)
    if not updated:
        logger.warning("job %s changed state while finishing; left as it is", ctx.job_id)


def job_execute(*, job_id: int, task_id: str, hostname: str) -> None:
    """Run the job's handler in this worker process (the body of the Celery task).

    Celery's Django fix-up closes stale database connections before and after each task."""
    job = job_claim(job_id=job_id, task_id=task_id, hostname=hostname)
    if job is None:
        return
    ctx = JobContext(job)
    heartbeat = _Heartbeat(job.pk, task_id)
    heartbeat.start()
    try:
        result = job_kind(job.kind).handler(ctx) or {}
    except JobCancelled:
        ctx.log("cancelled; work finished so far is kept")
        _finish(ctx, JobState.CANCELLED, progress_done=ctx._done, progress_total=ctx._total)
    except Exception as exc:
        message = str(exc) or type(exc).__name__
        ctx.log("failed:\n" + traceback.format_exc(limit=20))
        _finish(
            ctx,
            JobState.FAILED,
            error=message,
            progress_done=ctx._done,
            progress_total=ctx._total,
        )
    else:
        total = max(ctx._total, ctx._done, 1)
        ctx.log("succeeded")
        _finish(
            ctx,
            JobState.SUCCEEDED,
            result=result,
            progress_done=total,
            progress_total=total,
            stage="done",
        )
    finally:
        heartbeat.stopped.set()
        heartbeat.join(timeout=5)
