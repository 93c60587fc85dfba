"""Job kinds that belong to the job machinery itself."""

from __future__ import annotations

import time

from dailweb.errors import DomainError
from dailweb.jobs.registry import JobKind, register_job_kind
from dailweb.jobs.runner import JobContext

WORKER_CHECK_MAX_STEPS = 10_000


def worker_check_params(*, steps: int, seconds_per_step: float) -> dict:
    """Validate the parameters of a worker check."""
    if not 1 <= steps <= WORKER_CHECK_MAX_STEPS:
        raise DomainError(
            f"steps must be between 1 and {WORKER_CHECK_MAX_STEPS}.",
            field_errors={"steps": "out of range"},
        )
    if not 0 <= seconds_per_step <= 60:
        raise DomainError(
            "seconds_per_step must be between 0 and 60.",
            field_errors={"seconds_per_step": "out of range"},
        )
    return {"steps": steps, "seconds_per_step": seconds_per_step}


def run_worker_check(ctx: JobContext) -> dict:
    """Count to `steps`, sleeping between steps: shows that a queue has a live worker and
    that progress, cancel and retry work end to end. Resumes where a previous attempt stopped."""
    steps = int(ctx.params["steps"])
    pause = float(ctx.params["seconds_per_step"])
    start = min(ctx.done_before, steps)  # committed by an earlier attempt
    ctx.progress(start, steps, stage="counting", unit="steps", force=True)
    for step in range(start + 1, steps + 1):
        time.sleep(pause)
        ctx.progress(step, steps)
    ctx.flush()
    return {"steps": steps}


register_job_kind(
    JobKind(
        name="worker_check",
        label="Worker check",
        queue="default",
        handler=run_worker_check,
        description="Counts to N on the chosen queue: proves a worker is listening.",
    )
)
