"""Studies: the paper's comparison (base model, SFT on the expert solutions, NLL on the
expanded traces, DAIL, DAIL with gamma 0) run through the product's own jobs.

A study is created in one transaction (`study_launch`): every refusal of `plan.study_plan`
comes first, then the rows (the split pinned as problem ids), then its first step.

Steps, each an ordinary job launched by the existing services (so each is watched, cancelled
and retried like any other):
1. expansion of the training problems (only when an arm trains on traces);
2. review, when the study uses the reviewers' verdicts: it waits in "waiting for review" until
   an admin says the review is done (`study_review_done`); with automatic acceptance every
   kept trace that no reviewer rejected is trained on (`SELECTION_AUTOMATIC`, recorded on the
   training runs and shown as such);
3. one training run per trained arm (the study's training settings, the arm's objective and
   gamma), then the evaluation of each arm on the held-out problems as soon as its adapter
   exists (the base model's right after the trainings are queued, so that one worker takes
   the trainings first).

`study_advance` is idempotent (the study row locked, each step launched once): it runs when a
job of the study finishes (`dailweb.jobs.events.job_finished`, in the worker) and every sweep
(`training.tasks.advance_studies`), so a study survives worker restarts like its jobs. A failed
or cancelled job stops the study (failed / cancelled, with the step and the job's error);
`study_retry` retries exactly those jobs (finished work is kept by each job) and goes on.
`study_cancel` cancels every queued or running job of the study.
"""

from __future__ import annotations

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from curation.models import Problem
from dailweb.errors import ConflictError, DomainError, ServiceUnavailableError
from dailweb.jobs.models import ACTIVE_STATES, Job, JobState
from dailweb.jobs.services import job_cancel, job_retry
from expansion.services.runs import expansion_run_launch
from training.evaluations.services import EvaluationSettings, ProblemSetChoice, evaluation_launch
from training.models import (
    EvaluationSplit,
    Study,
    StudyAcceptance,
    StudyArm,
    StudyState,
    StudyStep,
)
from training.services.expert_solutions import ExpertSolutionsChoice
from training.services.training import (
    SELECTION_AUTOMATIC,
    SELECTION_REVIEWED,
    TrainingSettings,
    training_defaults,
    training_run_launch,
)
from training.studies.plan import ArmSpec, StudySettings, arm_spec, run_settings, study_plan

# --- Launch, advance, cancel, retry ----------------------------------------------------------


@transaction.atomic
def study_launch(*, settings: StudySettings, launched_by) -> Study:
    """Create the study and queue its first step; nothing is created when anything is refused
    (including a broker that cannot be reached)."""
    plan = study_plan(settings=settings)
    study = Study.objects.create(
        name=settings.name.strip()[:200],
        created_by=launched_by if getattr(launched_by, "pk", None) else None,
        dataset=plan.dataset,
        base_model_path=str(plan.base),
        held_out_fraction=settings.held_out_fraction,
        split_seed=settings.split_seed,
        training_problem_ids=[p.pk for p in plan.training_problems],
        held_out_problem_ids=[p.pk for p in plan.held_out_problems],
        acceptance=settings.acceptance,
        expansion_settings=plan.expansion,
        training_settings=plan.training,
        evaluation_settings=plan.evaluation,
        estimate=plan.estimate,
    )
    for position, arm in enumerate(plan.arms):
        StudyArm.objects.create(study=study, key=arm.key, position=position)
    _advance(study, launched_by=launched_by, strict=True)
    return study


def study_advance(*, study_id: int) -> None:
    """Launch whatever step of the study is due (idempotent; see the module docstring)."""
    with transaction.atomic():
        study = Study.objects.select_for_update().filter(pk=study_id).first()
        if study is None or study.state != StudyState.RUNNING:
            return
        _advance(study, launched_by=study.created_by, strict=False)


def studies_advance_active() -> int:
    """Advance every running study (the periodic sweep); returns how many were looked at."""
    ids = list(Study.objects.filter(state=StudyState.RUNNING).values_list("pk", flat=True))
    for study_id in ids:
        study_advance(study_id=study_id)
    return len(ids)


def studies_of_job(job_id: int) -> list[int]:
    """The studies a job belongs to (an expansion chunk, a training run or an evaluation)."""
    return list(
        Study.objects.filter(
            Q(expansion_run__chunks__job_id=job_id)
            | Q(arms__training_run__job_id=job_id)
            | Q(arms__evaluation__job_id=job_id)
        )
        .values_list("pk", flat=True)
        .distinct()
    )


def _job_trouble(job: Job | None, what: str) -> tuple[str, str] | None:
    """(state, reason) when the job failed or was cancelled, else None."""
    if job is None or job.state not in (JobState.FAILED, JobState.CANCELLED):
        return None
    state = StudyState.FAILED if job.state == JobState.FAILED else StudyState.CANCELLED
    detail = (job.error or "").strip().splitlines()[0:1]
    reason = f"{what} ({job.title}) {job.get_state_display().lower()}"
    return state, reason + (f": {detail[0]}" if detail else ".")


def _stop(study: Study, state: str, reason: str) -> None:
    study.state = state
    study.state_reason = reason[:4000]
    study.finished_at = timezone.now()
    study.save(update_fields=["state", "state_reason", "finished_at"])


def _set_step(study: Study, step: str, reason: str = "") -> None:
    if (study.step, study.state_reason) != (step, reason):
        study.step = step
        study.state_reason = reason
        study.save(update_fields=["step", "state_reason"])


def _launch_or_record(arm: StudyArm, launch, strict: bool) -> bool:
    """Run `launch()` in a savepoint; a refusal is recorded on the arm (the study then fails
    with it). A broker that cannot be reached is not the arm's fault: raised when `strict`
    (the launch page says so), else left for the next sweep."""
    try:
        with transaction.atomic():
            launch()
        return True
    except ServiceUnavailableError:
        if strict:
            raise
        return False
    except DomainError as exc:
        if strict:
            raise
        arm.launch_error = str(exc)[:4000]
        arm.save(update_fields=["launch_error"])
        return False


def _advance(study: Study, *, launched_by, strict: bool) -> None:
    arms = list(study.arms.select_related("training_run__job", "evaluation__job"))
    specs = {arm.key: arm_spec(arm.key) for arm in arms}
    troubles: list[tuple[str, str]] = []

    # 1. Expansion of the training problems (when an arm trains on traces).
    if any(spec.source == "traces" for spec in specs.values()):
        if study.expansion_run_id is None:
            run = expansion_run_launch(
                settings=run_settings(
                    f"{study.name}: expansion", study.base_model_path, study.expansion_settings
                ),
                problem_ids=study.training_problem_ids,
                launched_by=launched_by,
            )
            study.expansion_run = run
            study.save(update_fields=["expansion_run"])
            _set_step(study, StudyStep.EXPANSION)
            return
        chunks = list(
            Job.objects.filter(expansion_chunk__run_id=study.expansion_run_id).order_by("pk")
        )
        for job in chunks:
            if trouble := _job_trouble(job, "Expansion"):
                troubles.append(trouble)
        if troubles:
            _stop(study, *troubles[0])
            return
        if any(job.state in ACTIVE_STATES for job in chunks):
            _set_step(study, StudyStep.EXPANSION)
            return
        if study.acceptance == StudyAcceptance.REVIEWERS and study.review_done_at is None:
            study.state = StudyState.AWAITING_REVIEW
            study.step = StudyStep.REVIEW
            study.state_reason = (
                f"Review the traces of expansion run #{study.expansion_run_id} (accept the "
                "ones to train on), then say the review is done."
            )
            study.save(update_fields=["state", "step", "state_reason"])
            return

    # 2. Training runs, then evaluations (each arm's as soon as it can run). The step reads
    # "evaluation" once every trained arm has its adapter.
    trained = all(
        not specs[a.key].trains
        or (
            a.training_run and a.training_run.job and a.training_run.job.state == JobState.SUCCEEDED
        )
        for a in arms
    )
    _set_step(study, StudyStep.EVALUATION if trained else StudyStep.TRAINING)
    for arm in arms:
        spec = specs[arm.key]
        if spec.trains and arm.training_run_id is None and not arm.launch_error:

            def launch(arm: StudyArm = arm, spec: ArmSpec = spec) -> None:
                arm.training_run = training_run_launch(
                    settings=_training_settings(study, spec), launched_by=launched_by
                )
                arm.save(update_fields=["training_run"])

            _launch_or_record(arm, launch, strict)
    for arm in arms:
        spec = specs[arm.key]
        if arm.launch_error:
            troubles.append((StudyState.FAILED, f"{spec.label}: {arm.launch_error}"))
            continue
        if spec.trains:
            run = arm.training_run
            if run is None:
                continue
            if trouble := _job_trouble(run.job, f"Training of {spec.label}"):
                troubles.append(trouble)
                continue
            if run.job is None or run.job.state != JobState.SUCCEEDED:
                continue
        if arm.evaluation_id is None:

            def launch(arm: StudyArm = arm, spec: ArmSpec = spec) -> None:
                arm.evaluation = evaluation_launch(
                    settings=_evaluation_settings(study, arm, spec), launched_by=launched_by
                )
                arm.save(update_fields=["evaluation"])

            _launch_or_record(arm, launch, strict)
            if arm.launch_error:
                troubles.append((StudyState.FAILED, f"{spec.label}: {arm.launch_error}"))
        elif trouble := _job_trouble(arm.evaluation.job, f"Evaluation of {spec.label}"):
            troubles.append(trouble)
    if troubles:
        _stop(study, *troubles[0])
        return
    evaluations = [arm.evaluation for arm in arms]
    if all(e is not None and e.job and e.job.state == JobState.SUCCEEDED for e in evaluations):
        study.step = StudyStep.DONE
        _stop(study, StudyState.SUCCEEDED, "")
        study.save(update_fields=["step"])


def _training_settings(study: Study, spec: ArmSpec) -> TrainingSettings:
    config = (
        training_defaults()
        | dict(study.training_settings)
        | {"objective": spec.objective, "gamma": spec.gamma}
    )
    name = f"{study.name}: {spec.label}"
    if spec.source == "expert_solutions":
        return TrainingSettings(
            name=name,
            base_model_path=study.base_model_path,
            config=config,
            expert_solutions=ExpertSolutionsChoice(
                dataset_id=study.dataset_id,
                held_out_fraction=study.held_out_fraction,
                split_seed=int(study.split_seed),
                problem_ids=tuple(study.training_problem_ids),
                prompt_template=study.evaluation_settings["prompt_template"],
            ),
        )
    return TrainingSettings(
        name=name,
        base_model_path=study.base_model_path,
        run_ids=[study.expansion_run_id],
        config=config,
        selection=SELECTION_AUTOMATIC
        if study.acceptance == StudyAcceptance.AUTOMATIC
        else SELECTION_REVIEWED,
    )


def _evaluation_settings(study: Study, arm: StudyArm, spec: ArmSpec) -> EvaluationSettings:
    values = study.evaluation_settings
    external_ids = list(
        Problem.objects.filter(pk__in=study.held_out_problem_ids).values_list(
            "external_id", flat=True
        )
    )
    return EvaluationSettings(
        name=f"{study.name}: {spec.label}",
        base_model_path=study.base_model_path,
        adapter_path=arm.training_run.adapter_path if arm.training_run else "",
        problem_set=ProblemSetChoice(
            split=EvaluationSplit.IDS,
            dataset_id=study.dataset_id,
            problem_ids=" ".join(external_ids),
        ),
        samples_per_problem=int(values["samples_per_problem"]),
        ks=list(values["ks"]),
        budgets=list(values["budgets"]),
        temperature=float(values["temperature"]),
        top_p=float(values["top_p"]),
        top_k=values.get("top_k"),
        seed=int(values["seed"]),
        prompt_template=values["prompt_template"],
        protocol=values["protocol"],
    )


def _study_jobs(study: Study) -> list[Job]:
    jobs = []
    if study.expansion_run_id:
        jobs += list(Job.objects.filter(expansion_chunk__run_id=study.expansion_run_id))
    for arm in study.arms.select_related("training_run__job", "evaluation__job"):
        for owner in (arm.training_run, arm.evaluation):
            if owner is not None and owner.job is not None:
                jobs.append(owner.job)
    return jobs


@transaction.atomic
def study_cancel(*, study: Study, by) -> int:
    """Cancel every queued or running job of the study and stop it; returns how many."""
    study = Study.objects.select_for_update().get(pk=study.pk)
    if not study.is_active:
        raise ConflictError("This study is not running.")
    count = 0
    for job in _study_jobs(study):
        if job.state in ACTIVE_STATES and not job.cancel_requested:
            job_cancel(job_id=job.pk, by=by)
            count += 1
    who = getattr(by, "username", None) or "the system"
    _stop(study, StudyState.CANCELLED, f"Cancelled by {who} during {study.get_step_display()}.")
    return count


@transaction.atomic
def study_retry(*, study: Study, by) -> int:
    """Retry the failed or cancelled jobs of a stopped study (their finished work is kept)
    and refused launches, then go on; returns how many jobs were queued again."""
    study = Study.objects.select_for_update().get(pk=study.pk)
    if study.state not in (StudyState.FAILED, StudyState.CANCELLED):
        raise ConflictError("Only a failed or cancelled study can be retried.")
    retried = 0
    for job in _study_jobs(study):
        if job.state in (JobState.FAILED, JobState.CANCELLED):
            job_retry(job_id=job.pk, by=by)
            retried += 1
    study.arms.exclude(launch_error="").update(launch_error="")
    study.state = StudyState.RUNNING
    study.state_reason = ""
    study.finished_at = None
    study.save(update_fields=["state", "state_reason", "finished_at"])
    _advance(study, launched_by=by, strict=True)
    return retried


@transaction.atomic
def study_review_done(*, study: Study, by) -> None:
    """The reviewers are done with the study's traces: train on what they accepted."""
    study = Study.objects.select_for_update().get(pk=study.pk)
    if study.state != StudyState.AWAITING_REVIEW:
        raise ConflictError("This study is not waiting for review.")
    study.review_done_at = timezone.now()
    study.state = StudyState.RUNNING
    study.state_reason = ""
    study.save(update_fields=["review_done_at", "state", "state_reason"])
    _advance(study, launched_by=by, strict=True)
