"""The Job row: state, progress, log tail, error, parameters, who launched it, where it ran."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


class JobState(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)
FINISHED_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Job(models.Model):
    kind = models.CharField(max_length=64, db_index=True)
    title = models.CharField(max_length=200)
    queue = models.CharField(max_length=32)
    state = models.CharField(
        max_length=16, choices=JobState.choices, default=JobState.QUEUED, db_index=True
    )
    params = models.JSONField(default=dict, blank=True)
    result = models.JSONField(default=dict, blank=True)

    progress_done = models.BigIntegerField(default=0)
    progress_total = models.BigIntegerField(default=0)
    progress_unit = models.CharField(max_length=32, default="steps")
    # Progress when the current attempt started, so the ETA uses this attempt's rate only.
    progress_at_start = models.BigIntegerField(default=0)
    # The rate behind the ETA is measured between the first progress of this attempt beyond
    # `progress_at_start` and the latest progress write, so start-up time (loading a model)
    # and the time since the last report do not slow the estimate down.
    progress_first_at = models.DateTimeField(null=True, blank=True)
    progress_first_done = models.BigIntegerField(default=0)
    progress_at = models.DateTimeField(null=True, blank=True)
    stage = models.CharField(max_length=200, blank=True)
    log = models.TextField(blank=True)
    error = models.TextField(blank=True)

    launched_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    task_id = models.CharField(max_length=64, blank=True, db_index=True)
    attempt = models.PositiveIntegerField(default=1)
    # When this attempt's message was last sent to the broker (launch, retry or a re-send by
    # the sweep), and how many times the sweep re-sent it because it never reached a worker.
    published_at = models.DateTimeField(null=True, blank=True)
    resends = models.PositiveIntegerField(default=0)
    worker_hostname = models.CharField(max_length=200, blank=True)
    worker_pid = models.PositiveIntegerField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["state", "heartbeat_at"])]

    def __str__(self) -> str:
        return f"#{self.pk} {self.title} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def can_cancel(self) -> bool:
        return self.state in ACTIVE_STATES and not self.cancel_requested

    @property
    def can_retry(self) -> bool:
        return self.state in (JobState.FAILED, JobState.CANCELLED)

    @property
    def percent(self) -> float:
        if self.state == JobState.SUCCEEDED:
            return 100.0
        if self.progress_total <= 0:
            return 0.0
        return max(0.0, min(100.0, 100.0 * self.progress_done / self.progress_total))

    @property
    def elapsed(self) -> timedelta | None:
        if not self.started_at:
            return None
        return (self.finished_at or timezone.now()) - self.started_at

    @property
    def eta(self) -> timedelta | None:
        """Remaining time at this attempt's recent rate; None until two progress reports
        (after the first one beyond where the attempt started) give a rate.

        rate = (done - first_done) / (last_report - first_report); the estimate then counts
        down from the last report, so it never grows while the job is simply working."""
        if self.state != JobState.RUNNING or self.progress_total <= 0:
            return None
        if self.progress_first_at is None or self.progress_at is None:
            return None
        done_since_first = self.progress_done - self.progress_first_done
        seconds = (self.progress_at - self.progress_first_at).total_seconds()
        if done_since_first <= 0 or seconds <= 0:
            return None
        remaining = max(0, self.progress_total - self.progress_done)
        since_report = max(0.0, (timezone.now() - self.progress_at).total_seconds())
        return timedelta(
            seconds=max(0, round(remaining * seconds / done_since_first - since_report))
        )


class WorkerHeartbeat(models.Model):
    """A Celery worker as it last reported itself: written every few seconds by the worker's
    own thread (`dailweb.jobs.signals`), removed when it shuts down cleanly. A row older than
    `WORKER_STALE_SECONDS` is a worker that died without saying goodbye."""

    hostname = models.CharField(max_length=200, unique=True)
    queues = models.JSONField(default=list)
    pid = models.PositiveIntegerField(null=True, blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    seen_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return f"{self.hostname} ({', '.join(self.queues)})"
