"""Celery tasks: a thin interface that passes ids to the job runner and services."""

from __future__ import annotations

from celery import shared_task

from dailweb.jobs import runner, services


@shared_task(bind=True, name="dailweb.jobs.tasks.run_job", acks_late=True)
def run_job(self, job_id: int) -> None:
    """Run job `job_id`; the row decides whether there is anything to do."""
    runner.job_execute(job_id=job_id, task_id=self.request.id, hostname=self.request.hostname)


@shared_task(name="dailweb.jobs.tasks.sweep_jobs", ignore_result=True)
def sweep_jobs() -> None:
    """Periodic (celery beat): fail running jobs whose worker stopped its heartbeat, and send
    again (or fail) queued jobs whose message never reached a worker."""
    services.job_fail_stale()
    services.job_resend_lost()
