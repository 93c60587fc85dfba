"""A tiny study through real Celery workers on the test broker and database with the embedded
model: every step runs (expansion, a training per trained arm, an evaluation per arm), each
launched by the job that finished before it, every arm has an evaluation on the held-out
problems, and the report renders. Two arms (the base model, DAIL on the traces) keep it short;
all five arms run inline on the tiny model in tests/training/test_study_services.py. It tests
the mechanics only: with a few tokens nothing can improve, and nothing is asserted about which
arm is better."""

from __future__ import annotations

import json

import pytest

from dailweb.jobs.models import Job, JobState
from tests.conftest import wait_for
from tests.factories import make_dataset, make_problem, make_user
from tests.training.training_factories import small_config
from training.models import Study, StudyState, StudyStep
from training.studies import services as studies
from training.studies.plan import StudySettings
from training.studies.report import report_files
from training.studies.selectors import study_document

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

ARMS = ("base", "dail")


def test_a_tiny_study_runs_every_step_on_real_workers_and_its_report_renders(
    celery_worker_factory, embedded_model_dir, settings, tmp_path
):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    dataset = make_dataset(name="tiny-study")
    for index in range(12):  # a side left empty by the hash split: p = 2 / 4096
        a, b = index + 2, 2 * index + 1
        make_problem(
            dataset=dataset,
            statement=f"Compute ${a} \\times {b}$.",
            solution=f"${a} \\times {b} = {a * b}$, so the answer is $\\boxed{{{a * b}}}$.",
            answer=str(a * b),
        )
    # As `./dev up` starts them: a gpu worker with a fresh process per job, a default worker.
    celery_worker_factory(
        name="study-gpu",
        queues="gpu",
        args=["--max-tasks-per-child", "1"],
        env={"DAIL_ARTIFACTS_DIR": str(settings.ARTIFACTS_DIR)},
    )
    study = studies.study_launch(
        settings=StudySettings(
            name="tiny | <b>study</b>",
            dataset_id=dataset.pk,
            base_model_path=str(embedded_model_dir),
            held_out_fraction=0.5,
            arms=ARMS,
            training_limit=3,
            held_out_limit=2,
            samples_per_problem=1,
            expansion_max_new_tokens=4,
            kept_rule="all",
            training=small_config(max_length=1024),
            evaluation_samples=2,
            budgets=(4,),
            temperature=1.0,
            top_p=1.0,
        ),
        launched_by=make_user("admin"),
    )

    def finished():
        study.refresh_from_db()
        return not study.is_active

    try:
        wait_for(finished, timeout=1500, interval=2, message="the study did not finish")
    finally:
        jobs = list(Job.objects.order_by("pk").values_list("kind", "state", "error"))
    assert (study.state, study.step) == (StudyState.SUCCEEDED, StudyStep.DONE), jobs
    kinds = [kind for kind, _, _ in jobs]
    assert kinds.count("training") == 1 and kinds.count("evaluation") == 2
    assert {state for _, state, _ in jobs} == {JobState.SUCCEEDED}
    first_training = kinds.index("training")
    assert set(kinds[:first_training]) == {"expansion_chunk"}

    document = study_document(Study.objects.get(pk=study.pk))
    assert [arm["key"] for arm in document["arms"]] == list(ARMS)
    for arm in document["arms"]:
        assert arm["metrics"]["problems"] == len(study.held_out_problem_ids), arm["key"]
        assert [row["k"] for row in arm["metrics"]["pass_at_k"]] == [1, 2]
        assert (arm["training"] is None) == (arm["key"] == "base")
    files = report_files(document)
    assert "report.md" in files and any(name.endswith(".svg") for name in files)
    assert json.loads(files["study.json"])["study"]["id"] == study.pk
    report = files["report.md"]
    for arm in document["arms"]:
        assert arm["label"] in report
    assert "<b>study</b>" not in report  # the name is user text
