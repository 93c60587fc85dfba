"""An expansion run through real workers: 3 CHAMP problems x 2 samples x 64 tokens with the
embedded model; every trace's per-token arrays are consistent; a worker killed mid-run and a
rerun leave no duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from curation.models import Problem
from curation.services.champ import champ_load
from dailweb.jobs.models import Job, JobState
from expansion.engine.trace_format import decode_trace
from expansion.models import Trace
from expansion.services.runs import RunSettings, expansion_run_launch, expansion_run_retry
from tests.conftest import wait_for
from tests.factories import make_user

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def launch(embedded_model_dir, problems, samples=2, tokens=64, chunk=3, batch=32):
    return expansion_run_launch(
        settings=RunSettings(
            name="integration",
            model_path=str(embedded_model_dir),
            samples_per_problem=samples,
            rollout={"max_new_tokens": tokens, "tau": 0.5, "seed": 7, "max_batch_size": batch},
            chunk_problems=chunk,
        ),
        problem_ids=[p.pk for p in problems],
        launched_by=make_user("admin"),
    )


def chunk_jobs(run):
    return Job.objects.filter(expansion_chunk__run=run)


def test_run_expands_champ_problems_with_consistent_arrays(
    celery_worker_factory, embedded_model_dir
):
    champ_load()
    problems = list(Problem.objects.order_by("external_id")[:3])
    worker = celery_worker_factory(name="gpu-exp", queues="gpu")
    run = launch(embedded_model_dir, problems)
    wait_for(
        lambda: all(j.state in (JobState.SUCCEEDED, JobState.FAILED) for j in chunk_jobs(run)),
        timeout=600,
        interval=1,
    )
    job = chunk_jobs(run).get()
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    # The job page shows its progress; the worker's log file gets no library progress bars.
    assert "Loading weights" not in worker.log_text()
    traces = list(Trace.objects.filter(run=run))
    assert len(traces) == 6
    # One pass over the chunk's 3 problems (their 6 sequences decoded together), each problem
    # stored on its own.
    assert job.log.count("stored 2 traces") == 3
    for trace in traces:
        arrays = decode_trace(bytes(trace.data))
        n = len(arrays)
        assert n == trace.length and 1 <= n <= 64
        for name in (
            "sources",
            "draws",
            "learner_logprobs",
            "privileged_logprobs",
            "negative_logprobs",
            "char_lengths",
        ):
            assert getattr(arrays, name).shape == (n,), name
        assert arrays.privileged_top_ids.shape[0] == arrays.negative_top_ids.shape[0] == n
        assert int(arrays.char_lengths.sum()) == len(arrays.text)  # offsets cover the text
        for name in ("learner_logprobs", "privileged_logprobs", "negative_logprobs"):
            assert np.isfinite(getattr(arrays, name)).all(), name
        assert trace.finish_reason in ("eos", "length")
    # The rerun of a finished run does nothing and says so.
    with pytest.raises(Exception, match="a rerun has nothing to do"):
        expansion_run_retry(run=run, by=None)


def test_killed_worker_then_rerun_leaves_no_duplicates(celery_worker_factory, embedded_model_dir):
    champ_load()
    problems = list(Problem.objects.order_by("external_id")[:3])
    worker = celery_worker_factory(name="gpu-doomed", queues="gpu")
    # A batch of 2 sequences: the chunk's problems go through the engine one after another.
    run = launch(embedded_model_dir, problems, samples=2, tokens=48, chunk=3, batch=2)
    # Kill the worker once the first problem's traces are stored (mid-run).
    wait_for(lambda: Trace.objects.filter(run=run).count() >= 2, timeout=600, interval=0.5)
    worker.kill()
    stored_before = Trace.objects.filter(run=run).count()
    assert stored_before < 6
    restarted = celery_worker_factory(name="gpu-doomed", queues="gpu")  # fails what it ran
    job = chunk_jobs(run).get()
    wait_for(
        lambda: chunk_jobs(run).get().state == JobState.FAILED,
        timeout=60,
        message=f"chunk job {job.state} on {job.worker_hostname!r}; new worker "
        f"{restarted.nodename!r}; log: {restarted.log_text()[-1500:]}",
    )
    expansion_run_retry(run=run, by=None)
    wait_for(lambda: chunk_jobs(run).get().state == JobState.SUCCEEDED, timeout=600, interval=1)
    keys = list(Trace.objects.filter(run=run).values_list("run_problem_id", "sample_index"))
    assert len(keys) == 6 == len(set(keys))
    assert "stored 2 traces" in chunk_jobs(run).get().log
