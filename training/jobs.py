"""The training job kind and its thin handler (evaluations register theirs in
training/evaluations/jobs.py)."""

from __future__ import annotations

from dailweb.jobs.registry import JobKind, register_job_kind
from dailweb.jobs.runner import JobContext
from training.services.training import TRAINING_KIND


def run_training(ctx: JobContext) -> dict:
    """A training run's job. Cancellation is turned into the engine's `should_stop`, so the
    trainer stops at the end of an optimizer step and saves a checkpoint first."""
    from dailweb.jobs.runner import JobCancelled
    from training.services.training import training_run_execute

    stop = {"asked": False}

    def progress(done: int, total: int, stage: str) -> None:
        try:
            ctx.progress(done, total, stage=stage, unit="steps")
        except JobCancelled:
            stop["asked"] = True  # the trainer asks should_stop() right after this report

    def should_stop() -> bool:
        if not stop["asked"]:
            try:
                ctx.check_cancelled()
            except JobCancelled:
                stop["asked"] = True
        return stop["asked"]

    result = training_run_execute(
        training_run_id=int(ctx.params["training_run_id"]),
        progress=progress,
        log=ctx.log,
        should_stop=should_stop,
    )
    if result["status"] == "cancelled":
        raise JobCancelled()
    return result


register_job_kind(
    JobKind(
        name=TRAINING_KIND,
        label="Training",
        queue="gpu",
        handler=run_training,
        description="Trains a LoRA adapter with the DAIL contrastive objective (or the NLL "
        "baseline) on a frozen snapshot of accepted traces; resumes from its last checkpoint.",
        progress_unit="steps",
    )
)
