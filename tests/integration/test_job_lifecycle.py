"""The job lifecycle with a real Celery worker process, a real broker and the test database:
success, cancel, retry, and a worker killed with SIGKILL in the middle of a job."""

from __future__ import annotations

import os
import signal

import pytest

from dailweb.jobs import services
from dailweb.jobs.models import Job, JobState
from tests.conftest import wait_for
from tests.factories import make_user

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def launch_count(steps: int, seconds: float, queue: str = "default") -> Job:
    return services.job_launch(
        kind="worker_check",
        launched_by=make_user("admin"),
        params={"steps": steps, "seconds_per_step": seconds},
        queue=queue,
    )


def state_of(job: Job) -> str:
    job.refresh_from_db()
    return job.state


def wait_state(job: Job, state: str, timeout: float = 60) -> Job:
    wait_for(lambda: state_of(job) == state, timeout, message=f"job never became {state}")
    return job


def test_job_runs_to_success_with_progress(celery_worker_factory):
    worker = celery_worker_factory()
    job = launch_count(steps=5, seconds=0.1)
    wait_state(job, JobState.SUCCEEDED)
    assert job.progress_done == job.progress_total == 5
    assert job.result == {"steps": 5}
    assert job.worker_hostname == worker.nodename
    assert job.started_at and job.finished_at and job.finished_at >= job.started_at


def test_job_on_gpu_queue_needs_a_gpu_worker(celery_worker_factory):
    celery_worker_factory(name="cpu-only", queues="default")
    job = launch_count(steps=2, seconds=0, queue="gpu")
    import time

    time.sleep(3)
    assert state_of(job) == JobState.QUEUED  # nobody listens on 'gpu'
    celery_worker_factory(name="gpu-worker", queues="gpu")
    wait_state(job, JobState.SUCCEEDED)


def test_cancel_running_job_then_retry_resumes(celery_worker_factory):
    celery_worker_factory()
    job = launch_count(steps=200, seconds=0.05)
    wait_for(lambda: Job.objects.get(pk=job.pk).progress_done >= 5, 60)
    services.job_cancel(job_id=job.pk, by=None)
    wait_state(job, JobState.CANCELLED)
    stopped_at = job.progress_done
    assert 5 <= stopped_at < 200
    services.job_retry(job_id=job.pk, by=None)
    wait_state(job, JobState.SUCCEEDED, timeout=90)
    assert job.attempt == 2
    assert job.progress_done == 200
    assert "started on" in job.log and "cancel requested" in job.log


def test_killed_worker_job_is_failed_on_restart_and_retry_finishes(celery_worker_factory):
    worker = celery_worker_factory(name="doomed")
    job = launch_count(steps=400, seconds=0.05)
    wait_for(lambda: Job.objects.get(pk=job.pk).progress_done >= 3, 60)
    worker.kill()  # SIGKILL the whole worker, as the OOM killer or a power cut would
    assert state_of(job) == JobState.RUNNING  # nobody has noticed yet
    celery_worker_factory(name="doomed")  # same node name: it fails what it was running
    wait_state(job, JobState.FAILED, timeout=30)
    assert "restarted while running this job" in job.error
    done_before = job.progress_done
    services.job_retry(job_id=job.pk, by=None)
    wait_state(job, JobState.SUCCEEDED, timeout=120)
    assert job.progress_done == 400
    assert job.attempt == 2
    assert done_before >= 3


def test_killed_worker_is_detected_by_the_heartbeat_sweep(celery_worker_factory, settings):
    worker = celery_worker_factory(name="lost-for-good")
    job = launch_count(steps=400, seconds=0.05)
    wait_for(lambda: Job.objects.get(pk=job.pk).progress_done >= 3, 60)
    worker.kill()
    # No worker with that name comes back; the periodic sweep notices the silent heartbeat.
    wait_for(
        lambda: job.pk in services.job_fail_stale(),
        timeout=settings.JOB_STALE_SECONDS + 15,
        interval=1,
    )
    assert state_of(job) == JobState.FAILED
    assert "stopped sending heartbeats" in job.error
    assert job.can_retry


def test_killed_pool_process_fails_the_job_with_the_reason(celery_worker_factory):
    worker = celery_worker_factory(name="pool-kill")
    job = launch_count(steps=400, seconds=0.05)
    wait_for(lambda: Job.objects.get(pk=job.pk).progress_done >= 3, 60)
    children = worker.pool_child_pids()
    assert children, "prefork pool has no child process?"
    os.kill(children[0], signal.SIGKILL)
    # The worker main process sees the child die and gives the task back to the broker; the
    # redelivered task finds its job 'running' and marks it failed with the reason.
    wait_state(job, JobState.FAILED, timeout=60)
    assert "died" in job.error
