"""Running one job inside a Celery task: claim the row, heartbeat, report progress, finish.

The handler gets a `JobContext`; it reports progress and checks for cancellation through it.
Writes are throttled (a progress bar does not need 100 updates a second) and always carry the
task id, so a superseded attempt can never overwrite a newer one.

Database outages (a restarted PostgreSQL, a locked SQLite file): progress, log and heartbeat
writes are best effort (skipped, the connection reopened at the next one), so a short outage
between the handler's own writes costs nothing. Claiming and finishing the row are retried for
up to `DB_OUTAGE_SECONDS`; a handler whose own write fails ends failed with that reason.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from dailweb.jobs.events import job_finished_send
from dailweb.jobs.models import FINISHED_STATES, Job, JobState
from dailweb.jobs.registry import job_kind
from dailweb.jobs.services import job_log_append

logger = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL = 0.5  # seconds between progress writes
CANCEL_CHECK_INTERVAL = 1.0  # seconds between reads of the cancel flag
# How long a task waits for its row to appear. Messages are sent after the launch commits
# (`services._publish_on_commit`), so the row is normally there; the wait only covers messages
# published by an older version that sent them inside the launching transaction.
CLAIM_WAIT_SECONDS = 10.0
DB_OUTAGE_SECONDS = 90.0  # how long claiming / finishing a row waits for the database
DB_ERRORS = (OperationalError, InterfaceError)


def _reconnect_later() -> None:
    """Drop a broken connection; Django opens a new one at the next query."""
    try:
        connection.close()
    except Exception:  # closing a dead connection may itself fail
        logger.debug("closing the broken database connection failed", exc_info=True)


def _with_db_retry(write, what: str):
    """Run `write()`, retrying through a database outage of up to DB_OUTAGE_SECONDS."""
    deadline = time.monotonic() + DB_OUTAGE_SECONDS
    pause = 0.5
    while True:
        try:
            return write()
        except DB_ERRORS as exc:
            _reconnect_later()
            if time.monotonic() > deadline:
                raise
            logger.warning("database unavailable while %s (%s); retrying", what, exc)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def db_error_message(exc: BaseException) -> str:
    return (
        f"The database was unreachable while the job ran ({str(exc).strip() or type(exc).__name__})"
        ". Work committed before that is kept; retry the job to continue."
    )


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
        self._first_written = job.progress_first_at is not None

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
            wall = timezone.now()
            fields: dict[str, Any] = {"progress_at": wall}
            # The first report beyond where this attempt started anchors the ETA's rate.
            first = not self._first_written and self._done > self.done_before
            if first:
                fields.update(progress_first_at=wall, progress_first_done=self._done)
            try:
                self._mine().update(
                    progress_done=self._done,
                    progress_total=self._total,
                    progress_unit=self._unit,
                    stage=self._stage,
                    heartbeat_at=wall,
                    **fields,
                )
                self._first_written = self._first_written or first
            except DB_ERRORS as exc:  # best effort: the next report writes it again
                logger.warning("job %s: progress not written (%s)", self.job_id, exc)
                _reconnect_later()
                return
        self.check_cancelled()

    def log(self, message: str) -> None:
        logger.info("job %s: %s", self.job_id, message)
        try:
            job_log_append(job_id=self.job_id, message=message)
        except DB_ERRORS as exc:  # the worker's own log still has it
            logger.warning("job %s: log line not stored (%s)", self.job_id, exc)
            _reconnect_later()

    def check_cancelled(self) -> None:
        """Raise JobCancelled if an admin asked this job to stop (read at most once a second)."""
        now = time.monotonic()
        if now - self._last_cancel_check < CANCEL_CHECK_INTERVAL:
            return
        self._last_cancel_check = now
        try:
            cancelled = Job.objects.filter(pk=self.job_id, cancel_requested=True).exists()
        except DB_ERRORS:
            _reconnect_later()
            return
        if cancelled:
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
        while not self.stopped.wait(settings.JOB_HEARTBEAT_SECONDS):
            try:
                Job.objects.filter(
                    pk=self.job_id, task_id=self.task_id, state=JobState.RUNNING
                ).update(heartbeat_at=timezone.now())
            except Exception:  # the heartbeat must never take the job down; beat again later
                logger.warning("heartbeat of job %s failed", self.job_id, exc_info=True)
                _reconnect_later()
        connection.close()


def job_claim(*, job_id: int, task_id: str, hostname: str) -> Job | None:
    """Move the job from queued to running for this task, or say why not (returns None)."""
    deadline = time.monotonic() + CLAIM_WAIT_SECONDS

    def attempt() -> tuple[bool, Job | None]:
        with transaction.atomic():
            job = Job.objects.select_for_update().filter(pk=job_id).first()
            return (False, None) if job is None else (True, _claim_locked(job, task_id, hostname))

    while True:
        found, claimed = _with_db_retry(attempt, f"claiming job {job_id}")
        if found:
            return claimed
        if time.monotonic() > deadline:
            logger.warning("job %s does not exist; task %s dropped", job_id, task_id)
            return None
        time.sleep(0.2)  # see CLAIM_WAIT_SECONDS


def _process_alive(pid: int) -> bool:
    """True if `pid` runs on this machine and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in {"Z", "X"}


def job_still_running(job: Job, *, hostname: str) -> bool:
    """Whether the process that claimed this running job is still at work.

    On the worker node that claimed it, the answer is exact (is its pool process alive?);
    from another node, a heartbeat younger than the stale threshold means it is alive."""
    if job.worker_hostname == hostname[:200] and job.worker_pid:
        return job.worker_pid != os.getpid() and _process_alive(job.worker_pid)
    if job.heartbeat_at is None:
        return False
    age = (timezone.now() - job.heartbeat_at).total_seconds()
    return age < settings.JOB_STALE_SECONDS


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def failure_message(exc: BaseException) -> str:
    """What the job page says about a handler that raised `exc`."""
    if isinstance(exc, DB_ERRORS):
        return db_error_message(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS and exc.filename:
        return (
            f"Cannot write {exc.filename}: {exc.strerror} (the disk is full or the directory is "
            "read-only). Nothing half-written was kept; free space or fix the permissions, "
            "then retry the job: finished work is kept."
        )
    return str(exc) or type(exc).__name__


def _claim_locked(job: Job, task_id: str, hostname: str) -> Job | None:
    # Only the copy that finds the row queued (under the row lock) runs it: a second message
    # with the same task id (a redelivery, or a re-send by `services.job_resend_lost`) finds it
    # running or finished and does nothing to it.
    if job.task_id != task_id:
        logger.info("task %s is superseded by attempt %s of job %s", task_id, job.attempt, job.pk)
        return None
    if job.state == JobState.RUNNING:
        # The broker delivered this task again. Either the process running it died, or the
        # broker lost its connection (a blip) while the job kept running: then this copy must
        # not touch the row, or the live job would be failed (or run twice).
        if job_still_running(job, hostname=hostname):
            logger.warning(
                "task %s delivered again while job %s still runs on %s (pid %s); copy dropped",
                task_id,
                job.pk,
                job.worker_hostname,
                job.worker_pid,
            )
            return None
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
    job.progress_first_at = job.progress_at = None
    job.progress_first_done = job.progress_done
    job.save()
    job_log_append(job_id=job.pk, message=f"started on {job.worker_hostname} (pid {os.getpid()})")
    return job


def _finish(ctx: JobContext, state: str, **fields: Any) -> None:
    def write() -> int:
        with transaction.atomic():
            return ctx._mine().update(state=state, finished_at=timezone.now(), **fields)

    updated = _with_db_retry(write, f"finishing job {ctx.job_id}")
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
        message = failure_message(exc)
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
    try:
        state = Job.objects.filter(pk=job.pk).values_list("state", flat=True).first()
    except (InterfaceError, OperationalError):
        return  # the database is away: the receivers' own polling will see the end
    if state in FINISHED_STATES:
        job_finished_send(job_id=job.pk, state=state)
