"""A queued job whose message the broker lost, with a real Redis broker and a real worker: the
sweep sends it again with the same task id, the worker runs it once, and a second copy of
that message does nothing."""

from __future__ import annotations

import pytest

from dailweb.celery import app
from dailweb.jobs import services
from dailweb.jobs.models import Job, JobState, WorkerHeartbeat
from tests.conftest import wait_for
from tests.factories import make_user

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_lost_message_is_sent_again_and_the_job_runs_once(celery_worker_factory, settings):
    job = services.job_launch(
        kind="worker_check",
        launched_by=make_user("admin"),
        params={"steps": 2, "seconds_per_step": 0},
    )
    # No worker consumes 'default' yet; the broker loses the message (a flushed or restarted
    # Redis without its data).
    with app.connection_for_write() as connection:
        assert connection.default_channel.queue_purge("default") == 1
    worker = celery_worker_factory(name="idle", queues="default")
    wait_for(lambda: WorkerHeartbeat.objects.filter(hostname=worker.nodename).exists(), 30)
    job.refresh_from_db()
    assert job.state == JobState.QUEUED  # nothing left to deliver: it would wait forever

    settings.JOB_QUEUED_LOST_SECONDS = 0  # the sweep runs here, not in the worker
    assert services.job_resend_lost().resent == [job.pk]
    wait_for(lambda: Job.objects.get(pk=job.pk).state == JobState.SUCCEEDED, 60)
    job.refresh_from_db()
    assert "message re-sent (1 of 3)" in job.log and job.worker_hostname == worker.nodename

    # A copy of the same message (the original turning up after all) runs nothing again.
    services._send(job_id=job.pk, task_id=job.task_id, queue=job.queue)
    wait_for(lambda: f"nothing to do for task {job.task_id}" in worker.log_text(), 30)
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and job.log.count("started on") == 1
    assert services.job_resend_lost().resent == []  # a finished job is never sent again
