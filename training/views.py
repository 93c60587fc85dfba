"""Training runs (admins): launch from a form, watch (htmx-polled status, live charts fed by a
JSON endpoint of per-step metrics), cancel, retry; the adapter registry and zip downloads."""

from __future__ import annotations

from pathlib import Path

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from dailweb.errors import DomainError, add_to_form
from dailweb.forms import plain_id
from dailweb.roles import Role, require_role
from training import selectors
from training.charts import charts_available
from training.forms import TrainingLaunchForm
from training.models import TrainingRun
from training.services import training as training_services

TRAINING_RUNS_PER_PAGE = 25
LOG_TAIL_LINES = 40


def _get_training_run(training_run_id: int) -> TrainingRun:
    try:
        return selectors.training_run_get(training_run_id)
    except TrainingRun.DoesNotExist:
        raise Http404(f"There is no training run #{training_run_id}.") from None


@require_role(Role.ADMIN)
def training_run_list(request: HttpRequest) -> HttpResponse:
    page = Paginator(selectors.training_run_list(), TRAINING_RUNS_PER_PAGE).get_page(
        request.GET.get("page")
    )
    any_active = any(r.job and r.job.is_active for r in page.object_list)
    context = {"page": page, "any_active": any_active}
    template = (
        "training/training_list.html#training-table"
        if request.htmx
        else "training/training_list.html"
    )
    return render(request, template, context)


@require_role(Role.ADMIN)
def training_run_launch(request: HttpRequest) -> HttpResponse:
    from expansion.services import base_model_dir

    initial = {**training_services.training_defaults(), "base_model_path": str(base_model_dir())}
    form = TrainingLaunchForm(request.POST or None, initial=initial)
    status = 200
    plan = None
    if request.method == "POST":
        status = 400
        if form.is_valid():
            data = form.cleaned_data
            settings = training_services.TrainingSettings(
                name=data["name"],
                base_model_path=data["base_model_path"],
                config=form.config_values(),
                **form.data_values(),
            )
            try:
                if "preview" in request.POST:  # "Check data and steps": launch nothing
                    plan = training_services.training_run_plan(settings=settings)
                    status = 200
                else:
                    run = training_services.training_run_launch(
                        settings=settings, launched_by=request.user
                    )
                    messages.success(
                        request,
                        f"Launched training run #{run.pk} on the gpu queue: "
                        f"{training_services.training_source_description(run)}, "
                        f"{run.examples_used} examples used, {run.total_steps} steps.",
                    )
                    return redirect("training:detail", training_run_id=run.pk)
            except DomainError as exc:
                add_to_form(form, exc)
                status = exc.status
    context = {"form": form, "scale": training_services.EMBEDDED_SCALE, "plan": plan}
    return render(request, "training/training_launch.html", context, status=status)


def _status_context(run: TrainingRun) -> dict:
    job = run.job
    log_tail = "\n".join(job.log.splitlines()[-LOG_TAIL_LINES:]) if job else ""
    last = run.metrics.order_by("-step").first()
    return {
        "run": run,
        "job": job,
        "log_tail": log_tail,
        "last_metric": last,
        "warning": selectors.negative_term_warning(run),
    }


@require_role(Role.ADMIN)
def training_run_detail(request: HttpRequest, training_run_id: int) -> HttpResponse:
    run = _get_training_run(training_run_id)
    context = _status_context(run)
    if request.htmx:
        return render(request, "training/training_detail.html#training-status", context)
    points = selectors.training_metric_points(run)
    context.update(
        charts=charts_available(),
        chart_data=_chart_document(run, points),
        settings_fields=selectors.training_run_settings_fields(run),
        source_description=training_services.training_source_description(run),
    )
    return render(request, "training/training_detail.html", context)


def _chart_document(run: TrainingRun, points: list[dict]) -> dict:
    job = run.job
    return {
        "attempt": job.attempt if job else 0,
        "active": bool(job and job.is_active),
        "state": job.state if job else "",
        "objective": run.objective,
        "gamma": run.gamma,
        "total_steps": run.total_steps,
        "points": points,
    }


@require_role(Role.ADMIN)
def training_run_metrics(request: HttpRequest, training_run_id: int) -> JsonResponse:
    """Per-step metrics after `?after=N` (for the live charts), with the job's state."""
    run = _get_training_run(training_run_id)
    after = request.GET.get("after", "0")
    points = selectors.training_metric_points(run, after=plain_id(after) or 0)
    document = _chart_document(run, points)
    document["warning"] = selectors.negative_term_warning(run)
    return JsonResponse(document)


@require_role(Role.ADMIN)
@require_POST
def training_run_cancel(request: HttpRequest, training_run_id: int) -> HttpResponse:
    run = _get_training_run(training_run_id)
    try:
        training_services.training_run_cancel(run=run, by=request.user)
        messages.success(
            request, "Asked the run to stop after the current step; a checkpoint is kept."
        )
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("training:detail", training_run_id=run.pk)


@require_role(Role.ADMIN)
@require_POST
def training_run_retry(request: HttpRequest, training_run_id: int) -> HttpResponse:
    run = _get_training_run(training_run_id)
    try:
        training_services.training_run_retry(run=run, by=request.user)
        messages.success(request, "Queued again; it resumes from the last checkpoint.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("training:detail", training_run_id=run.pk)


@require_role(Role.ADMIN)
def adapter_registry(request: HttpRequest) -> HttpResponse:
    runs = list(selectors.adapter_registry()[:200])
    for run in runs:
        run.adapter_present = (Path(run.adapter_path) / "adapter_config.json").is_file()
        run.source_description = training_services.training_source_description(run)
    return render(request, "training/adapter_registry.html", {"runs": runs})


@require_role(Role.ADMIN)
def adapter_download(request: HttpRequest, training_run_id: int) -> HttpResponse:
    run = _get_training_run(training_run_id)
    try:
        archive = training_services.adapter_archive(run=run)
    except DomainError as exc:
        raise Http404(exc.message) from None
    return FileResponse(
        archive,
        as_attachment=True,
        filename=f"dail-adapter-{run.pk}.zip",
        content_type="application/zip",
    )
