"""The evaluation job kind and its thin handler."""

from __future__ import annotations

from dailweb.jobs.registry import JobKind, register_job_kind
from dailweb.jobs.runner import JobContext
from training.evaluations.services import EVALUATION_KIND


def run_evaluation(ctx: JobContext) -> dict:
    from training.evaluations.services import evaluation_execute

    def progress(done: int, total: int, stage: str) -> None:
        ctx.progress(done, total, stage=stage, unit="samples")

    return evaluation_execute(
        evaluation_id=int(ctx.params["evaluation_id"]), progress=progress, log=ctx.log
    )


register_job_kind(
    JobKind(
        name=EVALUATION_KIND,
        label="Evaluation",
        queue="gpu",
        handler=run_evaluation,
        description="Samples n completions per problem from a base model or adapter, judges "
        "their boxed answers, and stores them for pass@k and token-budget curves.",
        progress_unit="samples",
    )
)
