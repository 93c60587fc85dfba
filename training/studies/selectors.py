"""Reads for studies: the list, a study's steps and arms, and its results document (the JSON
export, the page's tables and charts, the Markdown report all come from `study_document`).

Results cover the arms whose evaluation has complete problems; paired comparisons (each arm
against the base model and against SFT on the expert solutions) use the problems both arms
have complete, with a percentile bootstrap over problems (`training.engine.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Count, Q, QuerySet

from dailweb.jobs.models import ACTIVE_STATES, Job, JobState
from expansion.models import Trace
from training.engine.metrics import paired_difference
from training.evaluations.selectors import EvaluationResult, evaluation_results
from training.models import Study, StudyArm
from training.services.training import training_source_description
from training.studies.plan import ArmSpec, arm_spec

COMPARED_AGAINST = ("base", "sft_solutions")


def study_list() -> QuerySet[Study]:
    return (
        Study.objects.select_related("dataset", "created_by")
        .annotate(arm_count=Count("arms"))
        .order_by("-created_at", "-id")
    )


def study_get(study_id: int) -> Study:
    return Study.objects.select_related("dataset", "created_by", "expansion_run").get(pk=study_id)


@dataclass
class ArmRow:
    arm: StudyArm
    spec: ArmSpec
    result: EvaluationResult | None

    @property
    def training_job(self) -> Job | None:
        return self.arm.training_run.job if self.arm.training_run else None

    @property
    def evaluation_job(self) -> Job | None:
        return self.arm.evaluation.job if self.arm.evaluation else None


@dataclass
class ExpansionStep:
    chunks: int
    chunks_done: int
    chunks_active: int
    progress_done: int
    progress_total: int
    traces: int
    kept: int
    accepted: int

    @property
    def percent(self) -> float:
        if not self.progress_total:
            return 0.0
        return max(0.0, min(100.0, 100.0 * self.progress_done / self.progress_total))


@dataclass
class StudyOverview:
    study: Study
    arms: list[ArmRow]
    expansion: ExpansionStep | None

    @property
    def active_jobs(self) -> int:
        jobs = [r.training_job for r in self.arms] + [r.evaluation_job for r in self.arms]
        active = sum(1 for j in jobs if j is not None and j.state in ACTIVE_STATES)
        return active + (self.expansion.chunks_active if self.expansion else 0)


def _expansion_step(study: Study) -> ExpansionStep | None:
    if study.expansion_run_id is None:
        return None
    jobs = list(
        Job.objects.filter(expansion_chunk__run_id=study.expansion_run_id).values_list(
            "state", "progress_done", "progress_total"
        )
    )
    traces = Trace.objects.filter(run_id=study.expansion_run_id)
    counts = traces.aggregate(
        total=Count("pk"),
        kept=Count("pk", filter=Q(kept=True)),
        accepted=Count("pk", filter=Q(review_state="accepted")),
    )
    return ExpansionStep(
        chunks=len(jobs),
        chunks_done=sum(1 for s, _, _ in jobs if s == JobState.SUCCEEDED),
        chunks_active=sum(1 for s, _, _ in jobs if s in ACTIVE_STATES),
        progress_done=sum(d for _, d, _ in jobs),
        progress_total=sum(t for _, _, t in jobs),
        traces=counts["total"],
        kept=counts["kept"],
        accepted=counts["accepted"],
    )


def study_overview(study: Study) -> StudyOverview:
    """The study's steps and arms with their jobs and results so far (a constant number of
    queries whatever the number of arms)."""
    arms = list(
        study.arms.select_related(
            "training_run__job", "evaluation__job", "evaluation__dataset"
        ).order_by("position")
    )
    evaluations = [a.evaluation for a in arms if a.evaluation is not None]
    results = {r.evaluation.pk: r for r in evaluation_results(evaluations)} if evaluations else {}
    rows = [ArmRow(arm=a, spec=arm_spec(a.key), result=results.get(a.evaluation_id)) for a in arms]
    return StudyOverview(study=study, arms=rows, expansion=_expansion_step(study))


def _counts(result: EvaluationResult | None) -> dict[str, tuple[int, int]]:
    if result is None or result.metrics is None:
        return {}
    return {key: (p.samples, p.correct) for key, p in result.metrics.problems.items()}


def _training_lineage(arm: StudyArm) -> dict[str, Any] | None:
    run = arm.training_run
    if run is None:
        return None
    metrics = run.final_metrics or {}
    return {
        "run_id": run.pk,
        "state": run.job.state if run.job else "",
        "objective": run.objective,
        "gamma": run.gamma if run.objective == "dail" else None,
        "data": training_source_description(run),
        "examples": run.examples_used,
        "steps": run.total_steps,
        "epochs": run.epochs,
        "learning_rate": run.config.get("learning_rate"),
        "lora_r": run.config.get("lora_r"),
        "adapter_path": run.adapter_path,
        "snapshot_sha256": run.snapshot_sha256,
        "final_loss": metrics.get("loss"),
        "did_not_move": bool(run.did_not_move),
    }


def study_comparisons(overview: StudyOverview) -> list[dict[str, Any]]:
    """Each evaluated arm against the base model and against SFT on the expert solutions, at
    k = 1 and k = n, paired over the problems both have complete (a pair once: SFT against
    the base model, not also the base model against SFT)."""
    counts = {row.arm.key: _counts(row.result) for row in overview.arms}
    seed = int(overview.study.evaluation_settings.get("seed", 0))
    ks = list(overview.study.evaluation_settings.get("ks", [1]))
    chosen_ks = sorted({ks[0], ks[-1]}) if ks else [1]
    comparisons = []
    for against in COMPARED_AGAINST:
        if not counts.get(against):
            continue
        for row in overview.arms:
            if row.arm.key == against or not counts[row.arm.key]:
                continue
            if row.arm.key in COMPARED_AGAINST[: COMPARED_AGAINST.index(against)]:
                continue  # base vs SFT is SFT vs base with the sign turned: shown once
            for k in chosen_ks:
                common = set(counts[row.arm.key]) & set(counts[against])
                if not common or any(
                    counts[row.arm.key][p][0] < k or counts[against][p][0] < k for p in common
                ):
                    continue
                difference = paired_difference(counts[row.arm.key], counts[against], k, seed=seed)
                comparisons.append({"arm": row.arm.key, "against": against, **difference.to_dict()})
    return comparisons


def study_document(study: Study, overview: StudyOverview | None = None) -> dict[str, Any]:
    """The study as one JSON-ready document (the export, the report and the page's results)."""
    overview = overview or study_overview(study)
    expansion = None
    if overview.expansion is not None:
        settings = study.expansion_settings
        expansion = {
            "run_id": study.expansion_run_id,
            "preset": settings.get("preset"),
            "samples_per_problem": settings.get("samples_per_problem"),
            "max_new_tokens": settings.get("rollout", {}).get("max_new_tokens"),
            "kept_rule": settings.get("kept_rule"),
            "traces": overview.expansion.traces,
            "kept": overview.expansion.kept,
            "accepted": overview.expansion.accepted,
        }
    evaluation = dict(study.evaluation_settings)
    evaluation.pop("prompt_template", None)
    evaluation["max_new_tokens"] = max(evaluation.get("budgets") or [0])
    arms = []
    for row in overview.arms:
        result = row.result
        arms.append(
            {
                "key": row.arm.key,
                "label": row.spec.label,
                "description": row.spec.description,
                "trains": row.spec.trains,
                "state": _arm_state(row),
                "training": _training_lineage(row.arm),
                "evaluation_id": row.arm.evaluation_id,
                "launch_error": row.arm.launch_error or None,
                "metrics": result.metrics.to_dict() if result and result.metrics else None,
                "complete_problems": result.complete_problems if result else 0,
            }
        )
    return {
        "format": "dail-study/1",
        "study": {
            "id": study.pk,
            "name": study.name,
            "state": study.state,
            "step": study.step,
            "state_reason": study.state_reason,
            "created_at": study.created_at.isoformat(),
            "finished_at": study.finished_at.isoformat() if study.finished_at else None,
            "dataset": study.dataset.name,
            "base_model": study.base_model_path,
            "split": {
                "held_out_fraction": study.held_out_fraction,
                "seed": study.split_seed,
                "training_problems": len(study.training_problem_ids),
                "held_out_problems": len(study.held_out_problem_ids),
            },
            "acceptance": study.get_acceptance_display(),
            "expansion": expansion,
            "training_settings": study.training_settings,
            "evaluation": evaluation,
            "estimate": study.estimate,
        },
        "arms": arms,
        "comparisons": study_comparisons(overview),
    }


def _arm_state(row: ArmRow) -> str:
    if row.arm.launch_error:
        return "refused"
    for job, step in ((row.evaluation_job, "evaluation"), (row.training_job, "training")):
        if job is not None:
            return (
                "done"
                if (step, job.state) == ("evaluation", JobState.SUCCEEDED)
                else (f"{step} {job.state}")
            )
    return "waiting"
