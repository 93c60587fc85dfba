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
        """Remaining time at this attempt's average rate; None until there is a rate."""
        if self.state != JobState.RUNNING or not self.started_at or self.progress_total <= 0:
            return None
        done_this_attempt = self.progress_done - self.progress_at_start
        remaining = self.progress_total - self.progress_done
        elapsed = (timezone.now() - self.started_at).total_seconds()
        if done_this_attempt <= 0 or elapsed <= 0:
            return None
        return timedelta(seconds=round(remaining * elapsed / done_this_attempt))


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
