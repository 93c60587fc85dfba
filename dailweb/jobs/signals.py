"""Worker lifecycle hooks: when a worker starts, the jobs it was running before are dead."""

from __future__ import annotations

import logging

from celery.signals import worker_ready

logger = logging.getLogger(__name__)


@worker_ready.connect
def fail_jobs_lost_by_this_worker(sender=None, **kwargs) -> None:
    from dailweb.jobs.services import job_fail_lost_on_worker

    hostname = getattr(sender, "hostname", None)
    if not hostname:
        return
    failed = job_fail_lost_on_worker(hostname=hostname)
    if failed:
        logger.warning("worker %s restarted; marked jobs %s failed", hostname, failed)
