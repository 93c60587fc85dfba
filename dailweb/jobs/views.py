"""The jobs dashboard: list, launch, watch (htmx-polled progress), cancel and retry.

Admins only. Each page is one view serving both the full page and, for htmx requests, the
named partial that polls (`template.html#partial`).
"""

from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from dailweb.errors import DomainError, add_to_form
from dailweb.jobs import health, selectors, services
from dailweb.jobs.forms import JobFilterForm
from dailweb.jobs.launchers import dashboard_launcher, dashboard_launchers
from dailweb.jobs.models import Job
from dailweb.roles import Role, require_role

JOBS_PER_PAGE = 25


def _launch_forms(bound_kind: str = "", bound_form=None) -> list[tuple]:
    return [
        (launcher, bound_form if launcher.kind == bound_kind else launcher.form_class(), None)
        for launcher in dashboard_launchers()
    ]


@require_role(Role.ADMIN)
def job_list(request: HttpRequest) -> HttpResponse:
    filters = JobFilterForm(request.GET or None)
    state = kind = ""
    if filters.is_valid():
        state = filters.cleaned_data["state"]
        kind = filters.cleaned_data["kind"]
    page = Paginator(selectors.job_list(state=state, kind=kind), JOBS_PER_PAGE).get_page(
        request.GET.get("page")
    )
    context = {
        "page": page,
        "filters": filters,
        "any_active": selectors.job_any_active(page.object_list),
        "launch_forms": _launch_forms(),
        "query": request.GET.urlencode(),
        "health": health.system_health(),
    }
    template = "jobs/job_list.html#job-table" if request.htmx else "jobs/job_list.html"
    return render(request, template, context)


@require_role(Role.ADMIN)
@require_POST
def job_launch(request: HttpRequest, kind: str) -> HttpResponse:
    launcher = dashboard_launcher(kind)
    if launcher is None:
        raise Http404(f"No dashboard launcher for job kind {kind!r}.")
    form = launcher.form_class(request.POST)
    status = 400
    if form.is_valid():
        try:
            job = launcher.launch(launched_by=request.user, **form.cleaned_data)
        except DomainError as exc:
            add_to_form(form, exc)
            status = exc.status
        else:
            messages.success(request, f"Launched job #{job.pk}: {job.title}.")
            return redirect("jobs:detail", job_id=job.pk)
    page = Paginator(selectors.job_list(), JOBS_PER_PAGE).get_page(1)
    context = {
        "page": page,
        "filters": JobFilterForm(),
        "any_active": selectors.job_any_active(page.object_list),
        "launch_forms": _launch_forms(kind, form),
        "query": "",
        "health": health.system_health(),
    }
    return render(request, "jobs/job_list.html", context, status=status)


def _get_job(job_id: int) -> Job:
    try:
        return selectors.job_get(job_id=job_id)
    except Job.DoesNotExist:
        raise Http404(f"There is no job #{job_id}.") from None


def _status_context(job: Job, **extra) -> dict:
    """The job and whether its queue has a live worker and a reachable broker."""
    system = health.system_health()
    return {"job": job, "health": system, "queue_health": system.queue(job.queue), **extra}


@require_role(Role.ADMIN)
def job_detail(request: HttpRequest, job_id: int) -> HttpResponse:
    job = _get_job(job_id)
    template = "jobs/job_detail.html#job-status" if request.htmx else "jobs/job_detail.html"
    return render(request, template, _status_context(job))


def _after_action(request: HttpRequest, job_id: int) -> HttpResponse:
    if request.htmx:
        context = _status_context(_get_job(job_id))
        return render(request, "jobs/job_detail.html#job-status", context)
    return redirect("jobs:detail", job_id=job_id)


def _action_failed(request: HttpRequest, job_id: int, exc: DomainError) -> HttpResponse:
    if request.htmx:
        context = _status_context(_get_job(job_id), action_error=exc.message)
        return render(request, "jobs/job_detail.html#job-status", context, status=exc.status)
    messages.error(request, exc.message)
    return redirect("jobs:detail", job_id=job_id)


@require_role(Role.ADMIN)
@require_POST
def job_cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    _get_job(job_id)
    try:
        services.job_cancel(job_id=job_id, by=request.user)
    except DomainError as exc:
        return _action_failed(request, job_id, exc)
    return _after_action(request, job_id)


@require_role(Role.ADMIN)
@require_POST
def job_retry(request: HttpRequest, job_id: int) -> HttpResponse:
    _get_job(job_id)
    try:
        services.job_retry(job_id=job_id, by=request.user)
    except DomainError as exc:
        return _action_failed(request, job_id, exc)
    return _after_action(request, job_id)
