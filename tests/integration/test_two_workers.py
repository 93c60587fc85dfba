"""Two GPU workers (distinct node names) on one expansion run, with real Celery workers on the
test broker and database and the embedded model: chunks spread over both, no trace is stored
twice, and after one worker is SIGKILLed mid-chunk the other finishes the run once "Rerun
missing work" re-queues the dead chunk."""

from __future__ import annotations

import pytest

from curation.models import Problem
from curation.services.champ import champ_load
from dailweb.jobs.models import Job, JobState
from dailweb.jobs.services import job_fail_stale
from expansion.models import Trace
from expansion.services.runs import RunSettings, expansion_run_launch, expansion_run_retry
from tests.conftest import wait_for
from tests.factories import make_user

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PROBLEMS = 4


def chunk_jobs(run):
    return Job.objects.filter(expansion_chunk__run=run)


def test_two_gpu_workers_share_a_run_and_one_finishes_after_the_other_dies(
    celery_worker_factory, embedded_model_dir
):
    champ_load()
    problems = list(Problem.objects.order_by("external_id")[:PROBLEMS])
    gpu_args = ["--max-tasks-per-child", "1"]  # as `./dev up` starts gpu workers
    first = celery_worker_factory(name="gpu-a", queues="gpu", args=gpu_args)
    second = celery_worker_factory(name="gpu-b", queues="gpu", args=gpu_args)
    run = expansion_run_launch(
        settings=RunSettings(
            name="two workers",
            model_path=str(embedded_model_dir),
            samples_per_problem=2,
            rollout={"max_new_tokens": 24, "seed": 3},
            chunk_tokens=2 * 24,  # one problem per chunk: four chunks
        ),
        problem_ids=[p.pk for p in problems],
        launched_by=make_user("admin"),
    )
    assert chunk_jobs(run).count() == PROBLEMS

    # Both workers take chunks.
    wait_for(
        lambda: (
            {j.worker_hostname for j in chunk_jobs(run).exclude(worker_hostname="")}
            >= {first.nodename, second.nodename}
        ),
        timeout=600,
        interval=0.5,
        message="the chunks did not spread over both workers",
    )
    # SIGKILL the first worker in the middle of a chunk (decoding, nothing of it stored yet).
    doomed = wait_for(
        lambda: (
            chunk_jobs(run)
            .filter(
                state=JobState.RUNNING, worker_hostname=first.nodename, stage__startswith="rollout"
            )
            .first()
        ),
        timeout=600,
        interval=0.1,
        message="the first worker was never caught decoding a chunk",
    )
    first.kill()
    # Its heartbeat stops, so the sweep fails the chunk; "Rerun missing work" queues it again
    # and the surviving worker finishes the run.
    wait_for(lambda: doomed.pk in job_fail_stale(), timeout=120, interval=1)
    assert expansion_run_retry(run=run, by=None) == 1
    try:
        wait_for(lambda: all(j.state == JobState.SUCCEEDED for j in chunk_jobs(run)), timeout=900)
    except pytest.fail.Exception:
        states = list(chunk_jobs(run).values_list("pk", "state", "worker_hostname", "attempt"))
        pytest.fail(f"chunks {states}; second worker log: {second.log_text()[-3000:]}")
    doomed.refresh_from_db()
    assert doomed.worker_hostname == second.nodename and doomed.attempt == 2
    keys = list(Trace.objects.filter(run=run).values_list("run_problem_id", "sample_index"))
    assert len(keys) == 2 * PROBLEMS == len(set(keys))
