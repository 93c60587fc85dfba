"""Job machinery without a worker: launch/cancel/retry, claiming, the runner, the sweeps."""

from __future__ import annotations

from datetime import timedelta

import pytest
from amqp.exceptions import ChannelError
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from dailweb.celery import app
from dailweb.errors import ConflictError, DomainError, ServiceUnavailableError
from dailweb.jobs import health, runner, services
from dailweb.jobs.models import Job, JobState, WorkerHeartbeat
from dailweb.jobs.registry import JobKind, register_job_kind
from tests.factories import make_job, make_user

pytestmark = pytest.mark.django_db


def queued_messages(queue: str = "default") -> int:
    with app.connection_for_write() as connection:
        try:
            return connection.default_channel.queue_declare(queue, passive=True).message_count
        except ChannelError:  # Redis: an empty queue does not exist
            return 0


@pytest.fixture
def broker(broker_url, clean_queues):
    return broker_url


@pytest.fixture
def broken_broker(settings, monkeypatch):
    """Point the Celery app at a broker that is not there."""
    monkeypatch.setattr(health, "_probe_cache", None)  # restored after: no "down" left cached
    original = app.conf.broker_url
    app.conf.broker_url = "redis://127.0.0.1:1/0"
    yield
    app.conf.broker_url = original


def test_launch_creates_a_queued_job_and_a_message(broker, django_capture_on_commit_callbacks):
    admin = make_user("admin")
    with django_capture_on_commit_callbacks(execute=True):
        job = services.job_launch(
            kind="worker_check", launched_by=admin, params={"steps": 2, "seconds_per_step": 0}
        )
        assert queued_messages("default") == 0  # sent when the transaction commits
    assert job.state == JobState.QUEUED
    assert job.launched_by == admin
    assert job.queue == "default"
    assert "queued on 'default' by" in job.log
    assert queued_messages("default") == 1


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_launch_publishes_nothing(broker):
    """A launch service that fails after `job_launch` (in its own transaction) leaves neither
    a row nor a message a worker would look for in vain."""
    with pytest.raises(RuntimeError, match="after the launch"), transaction.atomic():
        services.job_launch(kind="worker_check", launched_by=None, params={})
        raise RuntimeError("the caller failed after the launch")
    assert Job.objects.count() == 0
    assert queued_messages("default") == 0


@pytest.mark.django_db(transaction=True)
def test_broker_lost_between_launch_and_commit_fails_the_job_with_the_reason(broker):
    original = app.conf.broker_url
    try:
        with transaction.atomic():
            job = services.job_launch(kind="worker_check", launched_by=None, params={})
            app.conf.broker_url = "redis://127.0.0.1:1/0"  # the broker goes away before commit
    finally:
        app.conf.broker_url = original
    job.refresh_from_db()
    assert job.state == JobState.FAILED and job.finished_at is not None
    assert "could not be reached when this job was queued" in job.error
    assert "Retry the job when it is back" in job.error and job.can_retry
    assert job.error in job.log


def test_launch_with_broker_down_creates_nothing_and_says_why(broken_broker):
    with pytest.raises(ServiceUnavailableError, match="unreachable, so nothing was launched"):
        services.job_launch(kind="worker_check", launched_by=None, params={})
    assert Job.objects.count() == 0


def test_unknown_kind_and_queue_are_refused(broker):
    with pytest.raises(DomainError, match="Unknown job kind"):
        services.job_launch(kind="no-such-kind", launched_by=None)
    with pytest.raises(DomainError, match="Unknown queue"):
        services.job_launch(kind="worker_check", launched_by=None, queue="tpu")
    assert Job.objects.count() == 0


def test_cancel_queued_job_is_immediate(broker):
    job = make_job(JobState.QUEUED)
    job = services.job_cancel(job_id=job.pk, by=make_user("admin", username="boss"))
    assert job.state == JobState.CANCELLED
    assert job.finished_at is not None
    assert "cancelled by boss before it started" in job.log


def test_cancel_running_job_sets_the_flag(broker):
    job = make_job(JobState.RUNNING)
    job = services.job_cancel(job_id=job.pk, by=None)
    assert job.state == JobState.RUNNING and job.cancel_requested
    with pytest.raises(ConflictError, match="already stopping"):
        services.job_cancel(job_id=job.pk, by=None)


def test_cancel_finished_job_is_refused():
    job = make_job(JobState.SUCCEEDED)
    with pytest.raises(ConflictError, match="only queued or running"):
        services.job_cancel(job_id=job.pk, by=None)


def test_retry_failed_job_requeues_with_a_new_task(broker, django_capture_on_commit_callbacks):
    job = make_job(JobState.FAILED, error="boom", progress_done=5, progress_total=10, resends=3)
    old_task = job.task_id
    with django_capture_on_commit_callbacks(execute=True):
        job = services.job_retry(job_id=job.pk, by=None)
    assert job.resends == 0  # a new attempt gets its own re-sends
    assert job.state == JobState.QUEUED
    assert job.attempt == 2
    assert job.task_id != old_task
    assert job.error == ""
    assert job.progress_done == 5  # finished work is kept
    assert queued_messages("default") == 1


def test_retry_with_broker_down_leaves_job_failed(broken_broker):
    job = make_job(JobState.FAILED, error="boom")
    with pytest.raises(ServiceUnavailableError):
        services.job_retry(job_id=job.pk, by=None)
    job.refresh_from_db()
    assert job.state == JobState.FAILED and job.attempt == 1 and job.error == "boom"


def test_retry_of_succeeded_job_is_refused():
    job = make_job(JobState.SUCCEEDED)
    with pytest.raises(ConflictError, match="only failed or cancelled"):
        services.job_retry(job_id=job.pk, by=None)


def test_stale_running_jobs_are_failed_with_the_reason(settings):
    now = timezone.now()
    stale = make_job(
        JobState.RUNNING,
        worker_hostname="gpu@box",
        started_at=now - timedelta(minutes=5),
        heartbeat_at=now - timedelta(seconds=settings.JOB_STALE_SECONDS + 1),
    )
    fresh = make_job(JobState.RUNNING, started_at=now, heartbeat_at=now)
    assert services.job_fail_stale(now=now) == [stale.pk]
    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert stale.state == JobState.FAILED
    assert "gpu@box stopped sending heartbeats" in stale.error
    assert stale.can_retry
    assert fresh.state == JobState.RUNNING


# --- The sweep: queued jobs whose message never reached a worker ---------------------------


def _worker(hostname="w@box", queues=("default",), started_ago=3600, seen_ago=0):
    now = timezone.now()
    return WorkerHeartbeat.objects.create(
        hostname=hostname,
        queues=list(queues),
        started_at=now - timedelta(seconds=started_ago),
        seen_at=now - timedelta(seconds=seen_ago),
    )


def _queued_for(seconds: float, **fields) -> Job:
    return make_job(
        JobState.QUEUED, published_at=timezone.now() - timedelta(seconds=seconds), **fields
    )


def test_a_lost_queued_job_is_sent_again_once_with_its_task_id(
    broker, settings, django_capture_on_commit_callbacks
):
    _worker()
    lost = _queued_for(settings.JOB_QUEUED_LOST_SECONDS + 5)
    recent = _queued_for(settings.JOB_QUEUED_LOST_SECONDS - 30)
    with django_capture_on_commit_callbacks(execute=True):
        swept = services.job_resend_lost()
    assert swept == services.LostJobs(resent=[lost.pk], failed=[])
    lost.refresh_from_db()
    assert lost.state == JobState.QUEUED and lost.resends == 1
    assert "message re-sent (1 of 3): queued" in lost.log and "idle worker (w@box)" in lost.log
    with app.connection_for_write() as connection:
        message = connection.default_channel.basic_get("default", no_ack=True)
    assert message.headers["id"] == lost.task_id  # the same task: a duplicate is a no-op
    assert queued_messages("default") == 0
    # The next sweep waits a full threshold again before it counts the job as lost.
    assert services.job_resend_lost() == services.LostJobs([], [])
    assert Job.objects.get(pk=recent.pk).resends == 0


def test_a_queued_job_behind_a_busy_or_absent_worker_is_left_alone(settings):
    old = settings.JOB_QUEUED_LOST_SECONDS + 60
    _worker("busy@box", queues=("gpu",))
    make_job(JobState.RUNNING, queue="gpu", worker_hostname="busy@box")
    waiting_for_gpu = _queued_for(old, queue="gpu")
    _worker("gone@box", queues=("default",), seen_ago=settings.WORKER_STALE_SECONDS + 5)
    no_live_worker = _queued_for(old, queue="default")
    assert services.job_resend_lost() == services.LostJobs([], [])
    for job in (waiting_for_gpu, no_live_worker):
        job.refresh_from_db()
        assert job.state == JobState.QUEUED and job.resends == 0 and "re-sent" not in job.log


def test_the_wait_counts_from_when_the_worker_became_idle(settings):
    """A worker that just finished a job (or just started) may still be fetching the next
    message: a job that waited behind the previous one is not lost yet."""
    _worker("gpu@box", queues=("gpu",))
    previous = make_job(
        JobState.SUCCEEDED,
        queue="gpu",
        worker_hostname="gpu@box",
        finished_at=timezone.now() - timedelta(seconds=10),
    )
    fresh = _worker("fresh@box", queues=("default",), started_ago=10)
    behind = _queued_for(settings.JOB_QUEUED_LOST_SECONDS * 10, queue="gpu")
    on_fresh = _queued_for(settings.JOB_QUEUED_LOST_SECONDS * 10, queue="default")
    assert services.job_resend_lost() == services.LostJobs([], [])
    # Idle for the whole threshold: now they are lost.
    idle = timedelta(seconds=settings.JOB_QUEUED_LOST_SECONDS)
    Job.objects.filter(pk=previous.pk).update(finished_at=F("finished_at") - idle)
    WorkerHeartbeat.objects.filter(pk=fresh.pk).update(started_at=F("started_at") - idle)
    swept = services.job_resend_lost()
    assert sorted(swept.resent) == sorted([behind.pk, on_fresh.pk])


def test_a_worker_restarted_after_a_crash_counts_as_just_started(settings):
    _worker("w@box", started_ago=3600, seen_ago=settings.WORKER_STALE_SECONDS + 5)  # left behind
    job = _queued_for(settings.JOB_QUEUED_LOST_SECONDS * 10)
    health.worker_heartbeat_record(hostname="w@box", queues=["default"], started_at=timezone.now())
    assert services.job_resend_lost() == services.LostJobs([], [])
    assert Job.objects.get(pk=job.pk).resends == 0


def test_a_job_cancelled_while_queued_is_not_sent_again(settings):
    _worker()
    job = _queued_for(settings.JOB_QUEUED_LOST_SECONDS + 5)
    services.job_cancel(job_id=job.pk, by=None)
    assert services.job_resend_lost() == services.LostJobs([], [])
    assert Job.objects.get(pk=job.pk).state == JobState.CANCELLED


def test_a_job_still_lost_after_the_last_resend_is_failed_with_the_reason(settings):
    settings.JOB_RESEND_MAX = 2
    _worker()
    job = _queued_for(settings.JOB_QUEUED_LOST_SECONDS + 5)
    wait = timedelta(seconds=settings.JOB_QUEUED_LOST_SECONDS + 1)
    for round_ in range(1, 3):
        assert services.job_resend_lost().resent == [job.pk]
        assert Job.objects.get(pk=job.pk).resends == round_
        # The re-sent message was lost too: a full threshold passes without a worker taking it.
        Job.objects.filter(pk=job.pk).update(published_at=F("published_at") - wait)
    assert services.job_resend_lost() == services.LostJobs([], [job.pk])
    job.refresh_from_db()
    assert job.state == JobState.FAILED and job.can_retry
    assert "never reached a worker" in job.error and "after 2 re-sends" in job.error
    assert job.error in job.log


def test_worker_restart_fails_only_its_own_running_jobs():
    mine = make_job(JobState.RUNNING, worker_hostname="gpu@box")
    other = make_job(JobState.RUNNING, worker_hostname="gpu@other")
    queued = make_job(JobState.QUEUED, worker_hostname="")
    assert services.job_fail_lost_on_worker(hostname="gpu@box") == [mine.pk]
    mine.refresh_from_db()
    assert "gpu@box restarted while running this job" in mine.error
    assert Job.objects.get(pk=other.pk).state == JobState.RUNNING
    assert Job.objects.get(pk=queued.pk).state == JobState.QUEUED


def test_claim_ignores_superseded_and_finished_and_fails_redelivered():
    superseded = make_job(JobState.QUEUED, task_id="new")
    assert runner.job_claim(job_id=superseded.pk, task_id="old", hostname="w@h") is None
    done = make_job(JobState.SUCCEEDED, task_id="t1")
    assert runner.job_claim(job_id=done.pk, task_id="t1", hostname="w@h") is None
    redelivered = make_job(JobState.RUNNING, task_id="t2", worker_hostname="w@h")
    assert runner.job_claim(job_id=redelivered.pk, task_id="t2", hostname="w@h") is None
    redelivered.refresh_from_db()
    assert redelivered.state == JobState.FAILED
    assert "worker process running this job" in redelivered.error


def test_redelivered_copy_of_a_job_alive_on_this_node_is_dropped():
    """A broker blip redelivers the message of a job whose pool process still runs it."""
    import subprocess
    import sys

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        job = make_job(JobState.RUNNING, task_id="t3", worker_hostname="w@h", worker_pid=alive.pid)
        assert runner.job_claim(job_id=job.pk, task_id="t3", hostname="w@h") is None
        job.refresh_from_db()
        assert job.state == JobState.RUNNING and job.error == ""
    finally:
        alive.kill()
        alive.wait()
    # Once that process is gone, the next copy knows the job died with it.
    assert runner.job_claim(job_id=job.pk, task_id="t3", hostname="w@h") is None
    job.refresh_from_db()
    assert job.state == JobState.FAILED and "died" in job.error


def test_redelivered_copy_on_another_node_trusts_the_heartbeat(settings):
    now = timezone.now()
    beating = make_job(
        JobState.RUNNING, task_id="t4", worker_hostname="gpu@a", worker_pid=1, heartbeat_at=now
    )
    assert runner.job_claim(job_id=beating.pk, task_id="t4", hostname="gpu@b") is None
    assert Job.objects.get(pk=beating.pk).state == JobState.RUNNING
    silent = make_job(
        JobState.RUNNING,
        task_id="t5",
        worker_hostname="gpu@a",
        worker_pid=1,
        heartbeat_at=now - timedelta(seconds=settings.JOB_STALE_SECONDS + 1),
    )
    assert runner.job_claim(job_id=silent.pk, task_id="t5", hostname="gpu@b") is None
    assert Job.objects.get(pk=silent.pk).state == JobState.FAILED


def test_claim_of_a_missing_job_gives_up(monkeypatch):
    monkeypatch.setattr(runner, "CLAIM_WAIT_SECONDS", 0.3)
    assert runner.job_claim(job_id=999_999, task_id="x", hostname="w@h") is None


def _register(name: str, handler) -> None:
    register_job_kind(JobKind(name=name, label=name, queue="default", handler=handler))


def _counting_handler(ctx):
    for step in range(1, 4):
        ctx.progress(step, 3, stage=f"step {step}")
    ctx.log("counted to 3")
    return {"counted": 3}


def _failing_handler(ctx):
    ctx.progress(1, 4, stage="about to fail", force=True)
    raise ValueError("the handler broke on purpose")


def _cancelled_handler(ctx):
    from dailweb.jobs.models import Job

    Job.objects.filter(pk=ctx.job_id).update(cancel_requested=True)
    ctx._last_cancel_check = -1e9
    ctx.progress(2, 10, force=True)
    raise AssertionError("progress() should have raised JobCancelled")


_register("test_counting", _counting_handler)
_register("test_failing", _failing_handler)
_register("test_cancelled", _cancelled_handler)


def _run_inline(kind: str) -> Job:
    job = make_job(JobState.QUEUED, kind=kind, task_id=f"inline-{kind}")
    runner.job_execute(job_id=job.pk, task_id=job.task_id, hostname="inline@test")
    job.refresh_from_db()
    return job


def test_runner_success_records_result_and_full_progress():
    job = _run_inline("test_counting")
    assert job.state == JobState.SUCCEEDED
    assert job.result == {"counted": 3}
    assert job.percent == 100.0
    assert job.worker_hostname == "inline@test"
    assert "counted to 3" in job.log and "succeeded" in job.log


def test_runner_failure_keeps_the_message_and_progress():
    job = _run_inline("test_failing")
    assert job.state == JobState.FAILED
    assert job.error == "the handler broke on purpose"
    assert job.progress_done == 1 and job.progress_total == 4
    assert "ValueError" in job.log  # traceback in the log tail, not in the error summary


def test_runner_cancel_stops_at_the_next_progress_report():
    job = _run_inline("test_cancelled")
    assert job.state == JobState.CANCELLED
    assert job.progress_done == 2


def _running_job_with_reports(now):
    """Started 600 s ago (a slow model load); 10 units at the first report 20 s ago, 30 now."""
    return make_job(
        JobState.RUNNING,
        progress_done=30,
        progress_total=130,
        progress_at_start=0,
        started_at=now - timedelta(seconds=600),
        progress_first_at=now - timedelta(seconds=20),
        progress_first_done=10,
        progress_at=now,
    )


def test_eta_uses_the_rate_since_the_first_progress_report():
    """Issue 16.6: the rate is 20 units in 20 s, so 100 left take about 100 s; the 600 s of
    start-up before the first report do not count (the old estimate said 2000 s)."""
    job = _running_job_with_reports(timezone.now())
    assert 98 <= job.eta.total_seconds() <= 100
    assert make_job(JobState.QUEUED).eta is None
    # One report gives no rate yet: "estimating…".
    job.progress_first_at = job.progress_at
    assert job.eta is None


def test_eta_does_not_grow_with_elapsed_time(monkeypatch):
    """Between reports the estimate counts down; it never grows while the job works."""
    now = timezone.now()
    job = _running_job_with_reports(now)
    seen = []
    for later in (0, 15, 30, 60):
        monkeypatch.setattr(timezone, "now", lambda later=later: now + timedelta(seconds=later))
        seen.append(job.eta.total_seconds())
    assert seen == sorted(seen, reverse=True) and seen[0] - seen[-1] == 60, seen
    monkeypatch.setattr(timezone, "now", lambda: now + timedelta(seconds=500))
    assert job.eta.total_seconds() == 0


def test_a_new_attempt_measures_its_own_rate():
    """The runner records the first report beyond where the attempt started and the last one;
    claiming a retry clears them, so a new attempt does not inherit the old rate."""
    job = _run_inline("test_counting")
    assert job.progress_first_done == 1
    assert job.progress_first_at is not None and job.progress_at >= job.progress_first_at
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED, task_id="again")
    claimed = runner.job_claim(job_id=job.pk, task_id="again", hostname="inline@test")
    assert claimed.progress_first_at is None and claimed.progress_at is None
    assert claimed.progress_first_done == claimed.progress_done == 3


def test_log_tail_is_bounded(settings):
    settings.JOB_LOG_MAX_CHARS = 500
    job = make_job()
    for i in range(100):
        services.job_log_append(job_id=job.pk, message=f"line {i:03d} " + "x" * 20)
    job.refresh_from_db()
    assert len(job.log) <= 500
    assert "line 099" in job.log and "line 000" not in job.log


class DatabaseOutage:
    """While armed, the next `left` UPDATE queries on jobs fail as a restarted database's do."""

    left = 0

    @classmethod
    def install(cls, monkeypatch) -> None:
        from django.db import OperationalError
        from django.db.models.query import QuerySet

        original = QuerySet.update

        def update(queryset, **fields):
            if queryset.model is Job and cls.left > 0:
                cls.left -= 1
                raise OperationalError("server closed the connection unexpectedly")
            return original(queryset, **fields)

        monkeypatch.setattr(QuerySet, "update", update)
        monkeypatch.setattr(cls, "left", 0)


def _progress_through_outage(ctx):
    DatabaseOutage.left = 3  # the database goes away now, for three writes
    for step in range(1, 6):
        ctx.progress(step, 5, force=True)
    return {"steps": 5}


def _handler_write_fails(ctx):
    from django.db import OperationalError

    DatabaseOutage.left = 2  # the failure's log line and a first try at finishing fail too
    raise OperationalError("terminating connection due to administrator command")


_register("test_progress_outage", _progress_through_outage)
_register("test_write_fails", _handler_write_fails)


@pytest.mark.django_db(transaction=True)  # the runner closes and reopens the connection
def test_a_database_outage_during_progress_reports_does_not_fail_the_job(monkeypatch):
    DatabaseOutage.install(monkeypatch)
    job = make_job(JobState.QUEUED, kind="test_progress_outage", task_id="inline-outage")
    runner.job_execute(job_id=job.pk, task_id=job.task_id, hostname="inline@test")
    job.refresh_from_db()
    assert DatabaseOutage.left == 0  # the outage happened
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.progress_done == 5


@pytest.mark.django_db(transaction=True)
def test_a_handler_whose_write_fails_ends_failed_with_the_reason(monkeypatch):
    DatabaseOutage.install(monkeypatch)
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: None)
    job = make_job(JobState.QUEUED, kind="test_write_fails", task_id="inline-write-fails")
    runner.job_execute(job_id=job.pk, task_id=job.task_id, hostname="inline@test")
    job.refresh_from_db()
    assert DatabaseOutage.left == 0
    assert job.state == JobState.FAILED
    assert "database was unreachable" in job.error and "retry the job" in job.error


def test_a_read_only_or_full_disk_names_the_path():
    import errno

    message = runner.failure_message(
        PermissionError(errno.EACCES, "Permission denied", "/data/artifacts/run-1/adapter")
    )
    assert "Cannot write /data/artifacts/run-1/adapter: Permission denied" in message
    full = runner.failure_message(OSError(errno.ENOSPC, "No space left on device", "/x/ckpt"))
    assert "/x/ckpt" in full and "disk is full" in full
    assert runner.failure_message(ValueError("plain")) == "plain"
