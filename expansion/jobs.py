"""Job kinds of the expansion app and their thin handlers."""

from __future__ import annotations

from django import forms

from dailweb.jobs.forms import LaunchForm
from dailweb.jobs.launchers import DashboardLauncher, register_dashboard_launcher
from dailweb.jobs.registry import JobKind, register_job_kind
from dailweb.jobs.runner import JobContext
from expansion.services import models as services


def run_model_prepare(ctx: JobContext) -> dict:
    def progress(done: int, total: int, message: str) -> None:
        ctx.progress(done, total, stage=message)

    prepared = services.embedded_model_prepare(
        progress=progress,
        gguf_path=ctx.params.get("gguf_path"),
        force=bool(ctx.params.get("force", False)),
    )
    ctx.log(
        f"model ready at {prepared.path} ({'converted' if prepared.converted else 'reused'}, "
        f"{prepared.seconds:.1f} s); verification said: {prepared.verification_text!r}"
    )
    return {
        "path": str(prepared.path),
        "converted": prepared.converted,
        "verification_text": prepared.verification_text,
        "seconds": round(prepared.seconds, 2),
    }


register_job_kind(
    JobKind(
        name=services.MODEL_PREPARE_KIND,
        label="Prepare embedded model",
        queue="gpu",
        handler=run_model_prepare,
        description="Converts the SmolLM2-135M-Instruct GGUF into a safetensors model directory "
        "once, then verifies it with a short generation.",
        progress_unit="units",
    )
)


class ModelPrepareForm(LaunchForm):
    force = forms.BooleanField(
        required=False, help_text="Convert again even if the model is already prepared."
    )


register_dashboard_launcher(
    DashboardLauncher(
        kind=services.MODEL_PREPARE_KIND,
        label="Prepare embedded model",
        description="Convert SmolLM2-135M-Instruct from GGUF to safetensors (once) and verify it.",
        form_class=ModelPrepareForm,
        launch=services.embedded_model_prepare_launch,
    )
)


def run_expansion_chunk(ctx: JobContext) -> dict:
    from expansion.services.runs import expansion_chunk_execute

    def progress(done: int, total: int, message: str) -> None:
        ctx.progress(done, total, stage=message, unit="tokens")

    return expansion_chunk_execute(
        run_id=int(ctx.params["run_id"]),
        chunk_index=int(ctx.params["chunk_index"]),
        progress=progress,
        log=ctx.log,
    )


register_job_kind(
    JobKind(
        name="expansion_chunk",
        label="Expansion chunk",
        queue="gpu",
        handler=run_expansion_chunk,
        description="Expands a slice of an expansion run's problems into traces.",
        progress_unit="tokens",
    )
)
