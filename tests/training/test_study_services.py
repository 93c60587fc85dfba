"""Studies, service level: every refusal before anything is queued, the whole study run inline
on the tiny model (expansion -> four trainings -> five evaluations, each step launched by the
job that finished before it), a failed step that stops the study and a retry that resumes it
from that step, cancel, and the reviewers' acceptance that waits for the review.

Real workers and the real embedded model: tests/integration/test_study_workers.py."""

from __future__ import annotations

import pytest

from dailweb.errors import ConflictError, DomainError, ServiceUnavailableError
from dailweb.jobs import runner
from dailweb.jobs.models import Job, JobState
from expansion.models import ExpansionRun, Trace
from tests.factories import make_dataset, make_problem, make_user
from tests.training.training_factories import small_config
from training.models import (
    Evaluation,
    Study,
    StudyAcceptance,
    StudyArm,
    StudyState,
    StudyStep,
    TrainingRun,
)
from training.studies import plan, selectors
from training.studies import services as studies

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("single_torch_thread"),
]


@pytest.fixture(autouse=True)
def artifacts(settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


@pytest.fixture
def queue(broker_url, clean_queues):
    """Launching publishes to the test broker; the jobs are run inline here."""


def make_dataset_with_problems(count: int = 12, **dataset_fields):
    """`count` problems; the hash split depends on the dataset's id, so 12 problems at
    fraction 0.5 leave a side empty with probability 2 / 4096 only."""
    dataset = make_dataset(**dataset_fields)
    for index in range(count):
        a, b = index + 2, index + 3
        make_problem(
            dataset=dataset,
            statement=f"Compute ${a} + {b}$.",
            solution=f"${a} + {b} = {a + b}$. The answer is $\\boxed{{{a + b}}}$.",
            answer=str(a + b),
        )
    return dataset


def tiny_settings(model_dir, dataset, **overrides) -> plan.StudySettings:
    values = {
        "name": "tiny study",
        "dataset_id": dataset.pk,
        "base_model_path": str(model_dir),
        "held_out_fraction": 0.5,
        "split_seed": 0,
        "training_limit": 3,
        "held_out_limit": 3,
        "samples_per_problem": 1,
        "expansion_max_new_tokens": 3,
        "kept_rule": "all",
        "training": small_config(max_length=2048),
        "evaluation_samples": 2,
        "budgets": (3,),
        "temperature": 1.0,
        "top_p": 1.0,
    }
    return plan.StudySettings(**(values | overrides))


def run_queued_jobs(limit: int = 40) -> list[Job]:
    """Run queued jobs inline, oldest first, until none is left (as one worker would)."""
    ran = []
    for _ in range(limit):
        job = Job.objects.filter(state=JobState.QUEUED).order_by("pk").first()
        if job is None:
            return ran
        runner.job_execute(job_id=job.pk, task_id=job.task_id, hostname="inline@test")
        job.refresh_from_db()
        ran.append(job)
    raise AssertionError("jobs kept coming")


def test_a_study_runs_every_step_in_order_and_its_document_has_every_arm(tiny_model_path, queue):
    dataset = make_dataset_with_problems()
    study = studies.study_launch(
        settings=tiny_settings(tiny_model_path, dataset), launched_by=make_user("admin")
    )
    training_ids, held_out_ids = study.training_problem_ids, study.held_out_problem_ids
    assert training_ids and held_out_ids and not set(training_ids) & set(held_out_ids)
    assert study.step == StudyStep.EXPANSION and study.expansion_run is not None
    assert sorted(study.expansion_run.run_problems.values_list("problem_id", flat=True)) == (
        sorted(training_ids)
    )
    # Only the expansion is queued at first: trainings wait for its traces.
    assert not TrainingRun.objects.exists() and not Evaluation.objects.exists()

    ran = run_queued_jobs()
    kinds = [job.kind for job in ran]
    assert all(job.state == JobState.SUCCEEDED for job in ran), [(j.kind, j.error) for j in ran]
    # Expansion first, then the four trainings, then five evaluations (the base model's
    # queued right after the trainings).
    first_training = kinds.index("training")
    assert set(kinds[:first_training]) == {"expansion_chunk"}
    assert kinds[first_training : first_training + 4] == ["training"] * 4
    assert kinds.count("evaluation") == 5
    assert kinds.index("evaluation") > first_training + 3

    study.refresh_from_db()
    assert (study.state, study.step) == (StudyState.SUCCEEDED, StudyStep.DONE)
    arms = {arm.key: arm for arm in study.arms.select_related("training_run", "evaluation")}
    assert set(arms) == set(plan.ARMS)
    assert arms["base"].training_run is None and arms["base"].evaluation.adapter_path == ""
    for key in ("sft_solutions", "nll_traces", "dail", "dail_gamma0"):
        run = arms[key].training_run
        assert run.adapter_path and arms[key].evaluation.adapter_path == run.adapter_path
    assert arms["sft_solutions"].training_run.data_filter["source"] == "expert_solutions"
    assert sorted(arms["sft_solutions"].training_run.problem_ids) == sorted(training_ids)
    assert arms["dail"].training_run.gamma == 0.1
    assert arms["dail_gamma0"].training_run.gamma == 0.0
    assert arms["nll_traces"].training_run.objective == "nll"
    # Automatic acceptance: every kept trace (here all) trained on, recorded as such.
    traces = Trace.objects.filter(run=study.expansion_run).count()
    assert arms["dail"].training_run.snapshot_traces == traces
    assert arms["dail"].training_run.data_filter["selection"] == "automatic"
    assert Trace.objects.filter(run=study.expansion_run, review_state="accepted").count() == 0
    # Every evaluation ran on exactly the held-out problems.
    for arm in arms.values():
        evaluated = arm.evaluation.problems.values_list("problem_id", flat=True)
        assert sorted(evaluated) == sorted(held_out_ids)

    document = selectors.study_document(study)
    assert [a["key"] for a in document["arms"]] == list(plan.ARMS)
    assert all(a["metrics"]["problems"] == len(held_out_ids) for a in document["arms"])
    assert document["study"]["split"]["held_out_problems"] == len(held_out_ids)
    assert "automatic" in document["study"]["acceptance"].lower()
    against = {(c["arm"], c["against"], c["k"]) for c in document["comparisons"]}
    assert ("dail", "base", 1) in against and ("dail", "sft_solutions", 2) in against
    assert ("base", "base", 1) not in against
    assert ("sft_solutions", "base", 1) in against and ("base", "sft_solutions", 1) not in against
    assert len(against) == len(document["comparisons"]) == 2 * (4 + 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"held_out_fraction": 0.0}, "between 0 and 1"),
        ({"held_out_fraction": 1.0}, "between 0 and 1"),
        ({"held_out_fraction": 0.999}, "leaves"),
        ({"arms": ("base", "grpo")}, "Unknown arm"),
        ({"arms": ()}, "at least one arm"),
        ({"name": "  "}, "name"),
        ({"budgets": (0,)}, "budget"),
        ({"temperature": 0.0}, "temperature"),
        ({"training": small_config() | {"epochs": 0}}, "epochs"),
        ({"preset": "nope"}, "preset"),
        ({"base_model_path": "/nonexistent/model"}, "model"),
    ],
)
def test_bad_studies_are_refused_before_anything_is_created(
    tiny_model_path, queue, overrides, message
):
    dataset = make_dataset_with_problems()
    with pytest.raises(DomainError, match=message):
        studies.study_launch(
            settings=tiny_settings(tiny_model_path, dataset, **overrides),
            launched_by=make_user("admin"),
        )
    assert not Study.objects.exists() and not Job.objects.exists()
    assert not ExpansionRun.objects.exists()


def test_datasets_without_answers_and_proof_datasets_are_refused(tiny_model_path, queue):
    dataset = make_dataset_with_problems()
    make_problem(dataset=dataset, statement="Show it.", solution="Because.", answer="")
    every_problem = {"training_limit": None, "held_out_limit": None}
    with pytest.raises(DomainError, match="no final answer"):
        plan.study_plan(settings=tiny_settings(tiny_model_path, dataset, **every_problem))
    proofs = make_dataset_with_problems(kind="proof")
    with pytest.raises(DomainError, match="proof dataset"):
        plan.study_plan(settings=tiny_settings(tiny_model_path, proofs))


def test_a_study_above_the_workers_capacity_is_refused_with_its_cost(
    tiny_model_path, queue, settings
):
    settings.STUDY_MAX_HOURS = 1
    dataset = make_dataset_with_problems()
    cost = plan.study_plan(
        settings=tiny_settings(tiny_model_path, dataset, expansion_max_new_tokens=8)
    )
    assert cost.estimate["tokens"]["expansion"] == len(cost.training_problems) * 1 * 8
    assert cost.estimate["tokens"]["evaluation"] == 5 * len(cost.held_out_problems) * 2 * 3
    with pytest.raises(DomainError, match=r"would take about .* above the 1 h") as refused:
        studies.study_launch(
            settings=tiny_settings(
                tiny_model_path, dataset, evaluation_samples=512, budgets=(4096,)
            ),
            launched_by=make_user("admin"),
        )
    assert "evaluation" in str(refused.value) and not Study.objects.exists()


def test_a_broker_that_cannot_be_reached_creates_nothing(tiny_model_path, queue, monkeypatch):
    from dailweb.jobs import services as job_services

    def down() -> None:
        raise ServiceUnavailableError("The job queue (Redis) cannot be reached.")

    monkeypatch.setattr(job_services, "_require_broker", down)
    dataset = make_dataset_with_problems()
    with pytest.raises(ServiceUnavailableError):
        studies.study_launch(
            settings=tiny_settings(tiny_model_path, dataset), launched_by=make_user("admin")
        )
    assert not Study.objects.exists() and not ExpansionRun.objects.exists()


def test_a_failed_step_stops_the_study_and_retry_resumes_from_it(tiny_model_path, queue):
    dataset = make_dataset_with_problems()
    admin = make_user("admin")
    study = studies.study_launch(
        settings=tiny_settings(tiny_model_path, dataset, arms=("base", "dail")),
        launched_by=admin,
    )
    chunk = Job.objects.get(kind="expansion_chunk")
    Job.objects.filter(pk=chunk.pk).update(state=JobState.FAILED, error="GPU fell over\nmore")
    studies.study_advance(study_id=study.pk)
    study.refresh_from_db()
    assert study.state == StudyState.FAILED
    assert "Expansion" in study.state_reason and "GPU fell over" in study.state_reason
    assert "more" not in study.state_reason
    assert not TrainingRun.objects.exists()  # nothing after the failed step was launched

    with pytest.raises(ConflictError):
        studies.study_cancel(study=study, by=admin)
    assert studies.study_retry(study=study, by=admin) == 1
    study.refresh_from_db()
    chunk.refresh_from_db()
    assert study.state == StudyState.RUNNING and study.state_reason == ""
    assert chunk.state == JobState.QUEUED and chunk.attempt == 2
    run_queued_jobs()
    study.refresh_from_db()
    assert study.state == StudyState.SUCCEEDED
    assert ExpansionRun.objects.count() == 1  # the same run, resumed
    with pytest.raises(ConflictError):
        studies.study_retry(study=study, by=admin)


def test_cancel_stops_every_active_job_and_the_study(tiny_model_path, queue):
    dataset = make_dataset_with_problems()
    admin = make_user("admin")
    study = studies.study_launch(
        settings=tiny_settings(tiny_model_path, dataset, arms=("base", "sft_solutions")),
        launched_by=admin,
    )
    # No trace arm: no expansion; the training and the base evaluation are queued at once.
    assert study.expansion_run is None
    assert set(Job.objects.values_list("kind", flat=True)) == {"training", "evaluation"}
    assert studies.study_cancel(study=study, by=admin) == 2
    study.refresh_from_db()
    assert study.state == StudyState.CANCELLED
    assert study.state_reason.startswith(f"Cancelled by {admin.username}")
    assert set(Job.objects.values_list("state", flat=True)) == {JobState.CANCELLED}
    studies.study_advance(study_id=study.pk)  # a stopped study launches nothing
    assert Job.objects.count() == 2


def test_reviewers_acceptance_waits_for_the_review_and_trains_on_accepted_traces(
    tiny_model_path, queue
):
    dataset = make_dataset_with_problems()
    admin = make_user("admin")
    study = studies.study_launch(
        settings=tiny_settings(
            tiny_model_path,
            dataset,
            arms=("base", "nll_traces"),
            acceptance=StudyAcceptance.REVIEWERS,
        ),
        launched_by=admin,
    )
    run_queued_jobs()
    study.refresh_from_db()
    assert (study.state, study.step) == (StudyState.AWAITING_REVIEW, StudyStep.REVIEW)
    assert f"#{study.expansion_run_id}" in study.state_reason
    assert not TrainingRun.objects.exists()
    # Nothing accepted yet: going on is refused with the reason, and nothing changes.
    with pytest.raises(DomainError, match="no accepted traces"):
        studies.study_review_done(study=study, by=admin)
    study.refresh_from_db()
    assert study.state == StudyState.AWAITING_REVIEW

    accepted = Trace.objects.filter(run=study.expansion_run).order_by("pk").first()
    Trace.objects.filter(pk=accepted.pk).update(review_state="accepted")
    studies.study_review_done(study=study, by=admin)
    run_queued_jobs()
    study.refresh_from_db()
    assert study.state == StudyState.SUCCEEDED
    run = StudyArm.objects.get(study=study, key="nll_traces").training_run
    assert run.trace_ids == [accepted.pk] and "selection" not in run.data_filter


def test_the_sweep_advances_a_study_whose_job_ended_without_the_signal(tiny_model_path, queue):
    """A worker killed right after its job's final write never sends `job_finished`: the
    periodic sweep (beat: training.tasks.advance_studies) launches the next step instead."""
    from django.conf import settings

    from dailweb.jobs.events import job_finished
    from training.studies.signals import advance_on_job_finished
    from training.tasks import advance_studies

    assert settings.CELERY_BEAT_SCHEDULE["advance-studies"]["task"] == advance_studies.name
    dataset = make_dataset_with_problems()
    study = studies.study_launch(
        settings=tiny_settings(tiny_model_path, dataset, arms=("base", "nll_traces")),
        launched_by=make_user("admin"),
    )
    job_finished.disconnect(dispatch_uid="training.studies.advance_on_job_finished")
    try:
        run_queued_jobs()  # the expansion only: nothing launches the next step
    finally:
        job_finished.connect(
            advance_on_job_finished, dispatch_uid="training.studies.advance_on_job_finished"
        )
    study.refresh_from_db()
    assert study.step == StudyStep.EXPANSION and not TrainingRun.objects.exists()
    advance_studies()
    study.refresh_from_db()
    assert study.step == StudyStep.TRAINING
    assert TrainingRun.objects.count() == 1 and Evaluation.objects.count() == 1
    advance_studies()  # idempotent: nothing is launched twice
    assert TrainingRun.objects.count() == 1 and Evaluation.objects.count() == 1
    run_queued_jobs()
    study.refresh_from_db()
    assert study.state == StudyState.SUCCEEDED
