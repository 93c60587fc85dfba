"""Is anyone there? Whether the broker answers and which workers listen on each queue, for
the pages admins watch (jobs dashboard, job pages, home).

Workers report themselves in the database (`WorkerHeartbeat`, written by a thread in each
worker), not through the broker: reading them never blocks a page, and a worker stays
visible while the broker is down. The broker itself is probed with a short timeout, at most
once every `BROKER_PROBE_CACHE_SECONDS` per process, so polling pages stay fast when it is down.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from dailweb.jobs.models import WorkerHeartbeat
from dailweb.jobs.registry import QUEUES

logger = logging.getLogger(__name__)

BROKER_PROBE_TIMEOUT_SECONDS = 1.0
BROKER_PROBE_CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class BrokerStatus:
    reachable: bool
    url: str
    error: str = ""


@dataclass(frozen=True)
class QueueHealth:
    queue: str
    workers: list[WorkerHeartbeat] = field(default_factory=list)

    @property
    def online(self) -> bool:
        return bool(self.workers)


@dataclass(frozen=True)
class SystemHealth:
    broker: BrokerStatus
    queues: list[QueueHealth]

    @property
    def offline_queues(self) -> list[str]:
        return [q.queue for q in self.queues if not q.online]

    def queue(self, name: str) -> QueueHealth:
        return next((q for q in self.queues if q.queue == name), QueueHealth(name))


_probe_lock = threading.Lock()
_probe_cache: tuple[float, BrokerStatus] | None = None


def _probe_broker() -> BrokerStatus:
    from dailweb.celery import app
    from dailweb.jobs.services import broker_display_url

    url = broker_display_url()
    try:
        with app.connection_for_read(connect_timeout=BROKER_PROBE_TIMEOUT_SECONDS) as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_PROBE_TIMEOUT_SECONDS)
            client = getattr(connection.default_channel, "client", None)
            if client is not None:  # Redis: a connection from the pool may be stale; ask it
                client.ping()
    except Exception as exc:  # kombu/redis raise many types; all mean "not reachable"
        return BrokerStatus(False, url, str(exc) or type(exc).__name__)
    return BrokerStatus(True, url)


def broker_status(*, fresh: bool = False) -> BrokerStatus:
    """Whether the broker answers now (cached for a few seconds unless `fresh`)."""
    global _probe_cache
    with _probe_lock:
        now = time.monotonic()
        if fresh or _probe_cache is None or now - _probe_cache[0] > BROKER_PROBE_CACHE_SECONDS:
            _probe_cache = (now, _probe_broker())
        return _probe_cache[1]


def workers_online(*, now: datetime | None = None) -> list[WorkerHeartbeat]:
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.WORKER_STALE_SECONDS)
    return list(WorkerHeartbeat.objects.filter(seen_at__gte=cutoff))


def system_health() -> SystemHealth:
    """The broker's reachability and the live workers of every queue."""
    workers = workers_online()
    queues = [QueueHealth(q, [w for w in workers if q in w.queues]) for q in QUEUES]
    return SystemHealth(broker_status(), queues)


def worker_heartbeat_record(
    *, hostname: str, queues: list[str], started_at: datetime | None = None
) -> None:
    """Say that worker `hostname` (consuming `queues`, started at `started_at`) is alive now."""
    defaults = {"queues": sorted(queues), "pid": os.getpid(), "seen_at": timezone.now()}
    if started_at is not None:  # a worker restarted after a crash reuses its row
        defaults["started_at"] = started_at
    WorkerHeartbeat.objects.update_or_create(hostname=hostname[:200], defaults=defaults)


def worker_heartbeat_remove(*, hostname: str) -> None:
    """The worker shuts down cleanly: it is offline at once, not after the stale delay."""
    WorkerHeartbeat.objects.filter(hostname=hostname[:200]).delete()
