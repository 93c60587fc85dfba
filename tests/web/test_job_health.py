"""Whether a queue has a worker and the broker answers, on the pages admins watch."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from dailweb.celery import app
from dailweb.jobs import health
from dailweb.jobs.models import JobState, WorkerHeartbeat
from tests.factories import make_job, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.setattr(health, "_probe_cache", None)


@pytest.fixture
def broker_down(settings):
    original = app.conf.broker_url
    app.conf.broker_url = settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    yield
    app.conf.broker_url = original


@pytest.fixture
def admin_client(client):
    client.force_login(make_user("admin"))
    return client


def beat(hostname: str, queues: list[str], age: float = 0) -> WorkerHeartbeat:
    seen = timezone.now() - timedelta(seconds=age)
    return WorkerHeartbeat.objects.create(hostname=hostname, queues=queues, seen_at=seen)


def test_queued_job_without_a_worker_for_its_queue_says_so(admin_client, broker_url):
    beat("default@box", ["default"])
    job = make_job(JobState.QUEUED, queue="gpu")
    body = admin_client.get(reverse("jobs:detail", args=[job.pk])).content.decode()
    assert 'data-health="no-worker"' in body
    assert "this job waits until one starts" in body
    assert "celery -A dailweb worker -Q gpu" in body
    listing = admin_client.get(reverse("jobs:list")).content.decode()
    assert 'data-queue="gpu" data-online="no"' in listing
    assert 'data-queue="default" data-online="yes"' in listing and "default@box" in listing


def test_a_live_worker_on_the_queue_is_shown_and_a_stale_one_is_not(admin_client, broker_url):
    job = make_job(JobState.QUEUED, queue="gpu")
    beat("gpu@old", ["gpu"], age=3600)  # died long ago without saying goodbye
    body = admin_client.get(reverse("jobs:detail", args=[job.pk])).content.decode()
    assert 'data-queue-online="no"' in body and "gpu@old" not in body
    beat("gpu@box", ["gpu"])
    body = admin_client.get(reverse("jobs:detail", args=[job.pk])).content.decode()
    assert 'data-queue-online="yes"' in body
    assert 'data-health="no-worker"' not in body


def test_broker_down_is_a_clear_message_not_an_error(admin_client, broker_down):
    job = make_job(JobState.RUNNING, queue="default")
    for url in (reverse("home"), reverse("jobs:list"), reverse("jobs:detail", args=[job.pk])):
        response = admin_client.get(url)
        assert response.status_code == 200, url
        body = response.content.decode()
        assert 'data-health="broker-down"' in body, url
        assert "redis://127.0.0.1:1/0" in body and "unreachable" in body


def test_home_shows_broker_and_workers_to_admins_only(client, broker_url):
    beat("gpu@box", ["gpu"])
    client.force_login(make_user("admin"))
    body = client.get(reverse("home")).content.decode()
    assert 'data-broker="up"' in body and 'data-queue="gpu" data-online="yes"' in body
    client.force_login(make_user("expert"))
    assert "data-broker" not in client.get(reverse("home")).content.decode()


def test_broker_probe_is_cached_for_a_few_seconds(broker_url, monkeypatch):
    calls = []
    monkeypatch.setattr(
        health, "_probe_broker", lambda: calls.append(1) or health.BrokerStatus(True, "x")
    )
    for _ in range(5):
        health.broker_status()
    assert len(calls) == 1
    health.broker_status(fresh=True)
    assert len(calls) == 2


def test_worker_heartbeat_record_and_remove():
    health.worker_heartbeat_record(hostname="gpu@box", queues=["gpu"])
    health.worker_heartbeat_record(hostname="gpu@box", queues=["gpu", "default"])
    row = WorkerHeartbeat.objects.get()
    assert row.queues == ["default", "gpu"]
    assert [q.queue for q in health.system_health().queues if q.online] == ["default", "gpu"]
    health.worker_heartbeat_remove(hostname="gpu@box")
    assert not WorkerHeartbeat.objects.exists()
