"""Training jobs end to end with the real embedded model (SmolLM2-135M-Instruct) and real
Celery worker processes on the `gpu` queue: launched from the web form, trained for a few
steps on traces the model's own tokenizer produced (one of them longer than max_length, so
truncated and counted), the adapter written with its lineage; and a worker SIGKILLed in the
middle of a run, the job retried, and training resumed from the last checkpoint to the same
final step count with no checkpoint lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dailweb.jobs.models import Job, JobState
from dailweb.jobs.services import job_retry
from tests.conftest import wait_for
from tests.factories import make_user
from tests.training.training_factories import make_tokenized_run, small_config
from training.engine import evaluation as evaluation_engine
from training.engine.trainer import last_complete_checkpoint
from training.models import TrainingMetric, TrainingRun
from training.services import training as services

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def artifacts(settings, tmp_path):
    # The run's output directory is stored on its row, so the worker writes there too.
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


def finished(job: Job, timeout: float) -> Job:
    def done():
        job.refresh_from_db()
        return job.state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    wait_for(done, timeout=timeout, interval=0.5, message=f"job still {job.state}: {job.log}")
    return job


def test_a_training_job_runs_on_a_worker_from_the_form(
    client, celery_worker_factory, embedded_model_dir
):
    run_data = make_tokenized_run(embedded_model_dir, samples=3, long_response=120)
    celery_worker_factory(name="gpu-train", queues="gpu")
    client.force_login(make_user("admin"))
    config = small_config(max_length=128)
    data = {
        "name": "SmolLM2 DAIL smoke",
        "expansion_runs": [str(run_data.pk)],
        "base_model_path": str(embedded_model_dir),
        **{k: str(v) for k, v in config.items() if not isinstance(v, list | bool | type(None))},
        "lora_targets": config["lora_targets"],
    }
    response = client.post("/training/new/", data)
    assert response.status_code == 302, response.content.decode()[-3000:]
    run = TrainingRun.objects.get()
    assert (run.examples_used, run.overlong_truncated, run.total_steps) == (3, 1, 3)

    job = finished(run.job, timeout=900)
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    run.refresh_from_db()
    assert (job.progress_done, job.progress_total) == (3, 3)
    assert job.result["overlong"]["truncated"] == 1 and job.result["examples_used"] == 3
    steps = list(TrainingMetric.objects.filter(run=run).order_by("step"))
    assert [m.step for m in steps] == [1, 2, 3]
    for m in steps:
        assert m.kl_privileged > 0 and m.kl_negative > 0 and m.tokens > 0
        assert m.loss == pytest.approx(m.kl_privileged - 0.1 * m.kl_negative, rel=1e-3, abs=1e-4)
    # lr: linear decay from the peak without warm-up.
    assert steps[0].lr > steps[1].lr > steps[2].lr >= 0

    adapter = Path(run.adapter_path)
    assert (adapter / "adapter_model.safetensors").is_file()
    evaluation_engine.check_adapter_base(adapter, embedded_model_dir)
    lineage = json.loads((adapter / "dail-training.json").read_text())
    assert lineage["problem_ids"] == run.problem_ids and lineage["global_step"] == 3
    assert lineage["fitting"]["truncated"] == 1
    page = client.get(f"/training/{run.pk}/").content.decode()
    assert "1 truncated" in page and "Download adapter (zip)" in page


def test_a_killed_worker_resumes_from_the_last_checkpoint_after_retry(
    celery_worker_factory, embedded_model_dir
):
    run_data = make_tokenized_run(embedded_model_dir, samples=8)
    run = services.training_run_launch(
        settings=services.TrainingSettings(
            name="crash me",
            base_model_path=str(embedded_model_dir),
            run_ids=[run_data.pk],
            config=small_config(max_length=128),
        ),
        launched_by=None,
    )
    assert run.total_steps == 8
    worker = celery_worker_factory(name="gpu-doomed", queues="gpu")
    checkpoints = Path(run.output_dir) / "checkpoints"
    wait_for(
        # Step 3's metrics come after checkpoint-2 was saved (the Trainer saves after logging).
        lambda: TrainingMetric.objects.filter(run=run, step__gte=3).exists(),
        timeout=600,
        interval=0.2,
    )
    worker.kill()  # SIGKILL, as the OOM killer or a lost machine would
    at_kill = last_complete_checkpoint(checkpoints)
    saved = sorted(p.name for p in checkpoints.iterdir() if (p / "trainer_state.json").is_file())
    assert at_kill is not None and 2 <= int(at_kill.name.split("-")[1]) < 8
    job = Job.objects.get(pk=run.job_id)
    assert job.state == JobState.RUNNING  # nobody has noticed yet

    celery_worker_factory(name="gpu-doomed", queues="gpu")  # restarts: fails what it ran
    wait_for(lambda: Job.objects.get(pk=job.pk).state == JobState.FAILED, timeout=120)
    job_retry(job_id=job.pk, by=None)
    job = finished(Job.objects.get(pk=job.pk), timeout=900)
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    assert job.attempt == 2
    assert job.result["resumed_from"] == at_kill.name
    assert job.result["global_step"] == job.result["total_steps"] == 8
    assert f"resuming from {at_kill.name}" in job.log
    # Every step once, no checkpoint lost, the adapter written.
    assert list(TrainingMetric.objects.filter(run=run).values_list("step", flat=True)) == list(
        range(1, 9)
    )
    after = {p.name for p in checkpoints.iterdir() if (p / "trainer_state.json").is_file()}
    assert set(saved) <= after and "checkpoint-8" in after
    run.refresh_from_db()
    assert Path(run.adapter_path, "adapter_config.json").is_file()
