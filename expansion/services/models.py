"""Services of the expansion app (the bridge between Django and `expansion.engine`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings

from dailweb.errors import DomainError
from dailweb.jobs.models import Job, JobState
from dailweb.jobs.services import job_launch
from expansion.engine import embedded_model, prompts
from expansion.engine.models import ModelLoadError
from expansion.engine.session import ModelSession, open_model_session
from expansion.engine.tokenizer_cache import cached_tokenizer

MODEL_PREPARE_KIND = "model_prepare"


@dataclass(frozen=True)
class EmbeddedModelStatus:
    name: str
    path: Path
    prepared: bool
    gguf_path: Path | None
    gguf_error: str
    active_job: Job | None


def embedded_model_status() -> EmbeddedModelStatus:
    model_dir = embedded_model.embedded_model_dir(settings.ARTIFACTS_DIR)
    try:
        gguf, gguf_error = embedded_model.embedded_gguf_path(), ""
    except embedded_model.ModelPreparationError as exc:
        gguf, gguf_error = None, str(exc)
    active = (
        Job.objects.filter(kind=MODEL_PREPARE_KIND, state__in=[JobState.QUEUED, JobState.RUNNING])
        .order_by("-created_at")
        .first()
    )
    return EmbeddedModelStatus(
        name=embedded_model.EMBEDDED_MODEL_NAME,
        path=model_dir,
        prepared=embedded_model.is_prepared(model_dir),
        gguf_path=gguf,
        gguf_error=gguf_error,
        active_job=active,
    )


def embedded_model_prepare(
    *,
    progress: Callable[[int, int, str], None] | None = None,
    gguf_path: str | None = None,
    force: bool = False,
) -> embedded_model.PreparedModel:
    """Convert (once) and verify the embedded model in the artifacts directory."""
    try:
        return embedded_model.prepare_embedded_model(
            settings.ARTIFACTS_DIR,
            progress=progress,
            gguf_path=Path(gguf_path) if gguf_path else None,
            force=force,
        )
    except embedded_model.ModelPreparationError as exc:
        raise DomainError(str(exc)) from exc


def embedded_model_prepare_launch(*, launched_by, force: bool = False) -> Job:
    """Launch the preparation as a job (one at a time)."""
    status = embedded_model_status()
    if status.active_job is not None:
        raise DomainError(
            f"The embedded model is already being prepared (job #{status.active_job.pk})."
        )
    return job_launch(
        kind=MODEL_PREPARE_KIND,
        launched_by=launched_by,
        params={"force": bool(force)},
        title="Prepare the embedded model (SmolLM2-135M-Instruct)",
    )


def base_model_dir() -> Path:
    """The configured base model (DAIL_BASE_MODEL), else the embedded one."""
    configured = getattr(settings, "BASE_MODEL_DIR", None)
    return (
        Path(configured)
        if configured
        else embedded_model.embedded_model_dir(settings.ARTIFACTS_DIR)
    )


def base_tokenizer():
    """The base model's tokenizer (the process's one cache), or None when it is not there yet."""
    return cached_tokenizer(base_model_dir())


def prompt_texts_for_preview(
    *, problem: str, solution: str, partial_solution: str
) -> tuple[dict[str, str], str]:
    """The three prompts as the base model will see them, and a note when something is
    missing (model not prepared, empty problem or solution)."""
    templates = prompts.PromptTemplates()
    user_turns = {
        "learner": templates.user_turn("learner", problem.strip()),
        "privileged": templates.user_turn("privileged", problem.strip(), solution=solution.strip()),
        "negative": templates.user_turn(
            "negative", problem.strip(), partial=partial_solution.strip()
        ),
    }
    tokenizer = base_tokenizer()
    if tokenizer is None:
        return user_turns, (
            f"The base model ({base_model_dir().name}) is not prepared yet, so these are the "
            "user turns without its chat template."
        )
    try:
        return prompts.render_view_texts(tokenizer, problem, solution, partial_solution), ""
    except prompts.PromptError as exc:
        return user_turns, f"Showing the user turns only: {exc}."


def vllm_launch_refusal() -> str:
    """Why a job with backend "vllm" may not be launched ('' when it may): vLLM must import
    here, unless `DAIL_VLLM_ON_WORKERS` says the GPU workers have it (the job then checks)."""
    from expansion.engine.vllm_backend.availability import vllm_unavailable_reason

    if settings.VLLM_ON_WORKERS:
        return ""
    return vllm_unavailable_reason()


@contextmanager
def model_session_open(
    *,
    model_path: str | Path,
    adapter_path: str | Path | None = None,
    engine: str = "fast",
    reasoning: bool = False,
) -> Iterator[ModelSession]:
    """A model session for a job (an expansion chunk or an evaluation) in this worker process,
    closed when the block ends however it ends (a vLLM engine shut down).

    vLLM runs in-process (a Celery pool process starts no children of its own) with the
    configured KV cache (`DAIL_VLLM_KV_CACHE_GB`); an adapter is the learner view. The
    engine's loading errors, when the session opens or first loads what the block asks for,
    become `DomainError`s with the engine's message (which names the path).
    """
    vllm_options: dict[str, Any] = {"in_process": True}
    if settings.VLLM_KV_CACHE_GB:
        vllm_options["kv_cache_memory_bytes"] = settings.VLLM_KV_CACHE_GB << 30
    try:
        with open_model_session(
            model_path,
            adapter=adapter_path or None,
            engine=engine,
            reasoning=reasoning,
            vllm_options=vllm_options,
        ) as session:
            yield session
    except ModelLoadError as exc:
        raise DomainError(str(exc)) from exc
