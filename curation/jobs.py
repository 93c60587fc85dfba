"""Job kinds of the curation app: `problem_import` (large JSONL imports)."""

from __future__ import annotations

from curation.services.transfer import IMPORT_JOB_KIND, problem_import_job_execute
from dailweb.errors import DomainError
from dailweb.jobs.registry import JobKind, register_job_kind
from dailweb.jobs.runner import JobCancelled, JobContext


def run_problem_import(ctx: JobContext) -> dict:
    cancel_seen = False

    def batch_committed(done: int, total: int) -> None:
        # Runs inside the batch's transaction, so the progress is exactly what is committed
        # (a retry resumes after it). A cancel noticed here must not roll the batch back:
        # remember it and stop before the next batch.
        nonlocal cancel_seen
        try:
            ctx.progress(done, total, stage="writing", unit="lines", force=True)
        except JobCancelled:
            cancel_seen = True

    def should_stop() -> bool:
        if cancel_seen:
            return True
        try:
            ctx.check_cancelled()
        except JobCancelled:
            return True
        return False

    ctx.progress(
        ctx.done_before, int(ctx.params.get("file_lines", 0)), stage="checking", unit="lines"
    )
    report = problem_import_job_execute(
        params=ctx.params,
        resume_after_line=ctx.done_before,
        on_batch_committed=batch_committed,
        should_stop=should_stop,
        log=ctx.log,
    )
    ctx.log(report.summary())
    if report.cancelled:
        raise JobCancelled()
    if not report.imported:
        shown = "; ".join(str(error) for error in report.errors[:3])
        raise DomainError(f"{report.summary()} {shown}")
    return report.to_dict()


register_job_kind(
    JobKind(
        name=IMPORT_JOB_KIND,
        label="Problem import",
        queue="default",
        handler=run_problem_import,
        description="Writes a checked JSONL import file into its dataset in batches.",
        progress_unit="lines",
    )
)
