"""Worker lifecycle hooks: when a worker starts, the jobs it was running before are dead; while
it runs, it reports itself (`WorkerHeartbeat`) so the pages can say whether a queue has a
worker; when it stops cleanly, it says so."""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown
from django.conf import settings
from django.db import connection
from django.utils import timezone

logger = logging.getLogger(__name__)

_heartbeat: _WorkerHeartbeatThread | None = None


@worker_ready.connect
def fail_jobs_lost_by_this_worker(sender=None, **kwargs) -> None:
    from dailweb.jobs.services import job_fail_lost_on_worker

    hostname = getattr(sender, "hostname", None)
    if not hostname:
        return
    failed = job_fail_lost_on_worker(hostname=hostname)
    if failed:
        logger.warning("worker %s restarted; marked jobs %s failed", hostname, failed)


class _WorkerHeartbeatThread(threading.Thread):
    """Writes this worker's heartbeat row every WORKER_HEARTBEAT_SECONDS.

    A thread, not the consumer's timer: it keeps beating while the broker is away (the worker
    is alive; the broker status is shown separately). It closes its database connection after
    each beat, so no open socket is inherited by pool processes forked in between."""

    def __init__(self, hostname: str, queues: list[str]) -> None:
        super().__init__(name="worker-heartbeat", daemon=True)
        self.hostname = hostname
        self.queues = queues
        self.started_at = timezone.now()
        self.stopped = threading.Event()

    def run(self) -> None:
        from dailweb.jobs.health import worker_heartbeat_record

        while True:
            try:
                worker_heartbeat_record(
                    hostname=self.hostname, queues=self.queues, started_at=self.started_at
                )
            except Exception:  # the database is away: try again at the next beat
                logger.warning("worker heartbeat of %s not written", self.hostname, exc_info=True)
            finally:
                connection.close()
            if self.stopped.wait(settings.WORKER_HEARTBEAT_SECONDS):
                return


@worker_ready.connect
def start_worker_heartbeat(sender=None, **kwargs) -> None:
    global _heartbeat
    hostname = getattr(sender, "hostname", None)
    if not hostname:
        return
    queues = sorted(q.name for q in sender.task_consumer.queues) if sender.task_consumer else []
    _heartbeat = _WorkerHeartbeatThread(hostname, queues)
    _heartbeat.start()


@worker_shutdown.connect
def remove_worker_heartbeat(sender=None, **kwargs) -> None:
    from dailweb.jobs.health import worker_heartbeat_remove

    if _heartbeat is None:
        return
    _heartbeat.stopped.set()
    _heartbeat.join(timeout=5)
    connection.close()  # this thread's connection may predate a database restart
    try:
        worker_heartbeat_remove(hostname=_heartbeat.hostname)
    except Exception:  # shutting down with the database away: the row goes stale instead
        logger.warning("could not remove the heartbeat of %s", _heartbeat.hostname)
    finally:
        connection.close()
