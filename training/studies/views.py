"""Studies: admins create one (a form, a preview of the plan and its cost, then Launch),
cancel, retry and end its review; reviewers and admins read its steps, arms and results and
export them (the JSON document, and a zip of the Markdown report with its SVG charts)."""

from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRedirect

from dailweb.errors import DomainError, add_to_form
from dailweb.jobs.models import JobState
from dailweb.roles import Role, require_role
from training.models import Study, StudyStep
from training.services.training import training_defaults
from training.studies import selectors, services
from training.studies.forms import StudyLaunchForm
from training.studies.plan import ARMS, duration_text, study_plan
from training.studies.report import CHART_TITLES, report_files, study_charts

READERS = (Role.REVIEWER, Role.ADMIN)
STUDIES_PER_PAGE = 25
POLL_SECONDS = 3
STEP_ORDER = [step.value for step in StudyStep]
_SVG_SIZE = re.compile(r'\swidth="[0-9.]+"\s+height="[0-9.]+"')


def _bar_state(study: Study) -> str:
    """The progress bar's colour class (a study waiting for review is still under way)."""
    return "running" if study.is_active else study.state


def _get(study_id: int) -> Study:
    try:
        return selectors.study_get(study_id)
    except Study.DoesNotExist:
        raise Http404(f"There is no study #{study_id}.") from None


@require_role(*READERS)
def study_list(request: HttpRequest) -> HttpResponse:
    page = Paginator(selectors.study_list(), STUDIES_PER_PAGE).get_page(request.GET.get("page"))
    for study in page.object_list:
        study.step_percent = 100 * STEP_ORDER.index(study.step) / (len(STEP_ORDER) - 1)
        study.bar_state = _bar_state(study)
        study.bar_label = f"Steps of study #{study.pk}"
    context = {"page": page, "any_active": any(s.is_active for s in page.object_list)}
    template = "studies/list.html#study-table" if request.htmx else "studies/list.html"
    return render(request, template, context)


def _estimate_rows(estimate: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "step": step,
            "tokens": f"{tokens:,}",
            "rate": estimate["tokens_per_second"][step],
            "duration": duration_text(estimate["seconds"][step]),
        }
        for step, tokens in estimate["tokens"].items()
    ]


@require_role(Role.ADMIN)
def study_launch(request: HttpRequest) -> HttpResponse:
    from expansion.services import base_model_dir

    initial = {**training_defaults(), "base_model_path": str(base_model_dir())}
    form = StudyLaunchForm(request.POST or None, initial=initial)
    status, plan = 200, None
    if request.method == "POST":
        status = 400
        if form.is_valid():
            settings = form.study_settings()
            try:
                if form.wants_launch():
                    study = services.study_launch(settings=settings, launched_by=request.user)
                    messages.success(request, f"Launched study #{study.pk}.")
                    return redirect("studies:detail", study_id=study.pk)
                plan = study_plan(settings=settings)  # the preview: writes nothing
                status = 200
            except DomainError as exc:
                add_to_form(form, exc)
                status = exc.status
    context = {
        "form": form,
        "plan": plan,
        "arm_descriptions": {key: spec.description for key, spec in ARMS.items()},
    }
    if plan is not None:
        context["estimate_rows"] = _estimate_rows(plan.estimate)
        context["total_duration"] = duration_text(plan.estimate["total_seconds"])
    return render(request, "studies/launch.html", context, status=status)


def _evaluated_arms(overview: selectors.StudyOverview) -> int:
    """Arms whose evaluation finished (the page reloads when this changes, to show them)."""
    return sum(
        1
        for row in overview.arms
        if row.evaluation_job is not None and row.evaluation_job.state == JobState.SUCCEEDED
    )


def _expansion_state(step: selectors.ExpansionStep | None) -> str:
    if step is None or step.chunks_active:
        return "running"
    return "succeeded" if step.chunks_done == step.chunks else "failed"


def _points(value: float) -> str:
    text = f"{100 * value:+.1f}"
    return "0.0" if text in ("+0.0", "-0.0") else text


def _comparison_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The paired comparisons, in words: the difference in points with its interval, and
    whether the interval excludes 0 (said, not only coloured)."""
    labels = {arm["key"]: arm["label"] for arm in document["arms"]}
    rows = []
    for c in document["comparisons"]:
        if c["low"] > 0:
            verdict = "better: the interval excludes 0"
        elif c["high"] < 0:
            verdict = "worse: the interval excludes 0"
        else:
            verdict = "no clear difference: the interval contains 0"
        rows.append(
            {
                "arm": labels.get(c["arm"], c["arm"]),
                "against": labels.get(c["against"], c["against"]),
                "k": c["k"],
                "difference": _points(c["value"]),
                "interval": f"[{_points(c['low'])}, {_points(c['high'])}]",
                "excludes_zero": c["low"] > 0 or c["high"] < 0,
                "verdict": verdict,
                "better": c["better"],
                "worse": c["worse"],
                "ties": c["ties"],
                "problems": c["problems"],
            }
        )
    return rows


def _inline_svg(svg: str) -> str:
    """The chart for the page: no XML declaration (HTML has none), and as wide as its box
    (its viewBox keeps the proportions; the page's CSP allows no style to size it). The SVG
    escapes every text it draws (`training.studies.charts`), so it is marked safe as it is."""
    if svg.startswith("<?xml"):
        svg = svg.split("?>", 1)[1].lstrip()
    svg = _SVG_SIZE.sub(' width="100%"', svg, count=1)
    return mark_safe(svg)  # noqa: S308 - built by charts.py, which escapes all text


@require_role(*READERS)
def study_detail(request: HttpRequest, study_id: int) -> HttpResponse:
    study = _get(study_id)
    overview = selectors.study_overview(study)
    evaluated = _evaluated_arms(overview)
    context = {
        "study": study,
        "overview": overview,
        "evaluated": evaluated,
        "held_out": len(study.held_out_problem_ids),
        "poll_seconds": POLL_SECONDS,
        "step_state": _expansion_state(overview.expansion),
    }
    if request.htmx:
        response = render(request, "studies/detail.html#study-status", context)
        seen = request.GET.get("evaluated")
        if not study.is_active or seen != str(evaluated):
            response["HX-Refresh"] = "true"  # finished, or new results: reload once
        return response
    document = selectors.study_document(study, overview)
    arms_with_results = [arm for arm in document["arms"] if arm["metrics"]]
    charts = {}
    if arms_with_results:
        charts = {
            CHART_TITLES.get(name, name): _inline_svg(svg)
            for name, svg in study_charts(document).items()
        }
    context.update(
        document=document,
        arms_with_results=arms_with_results,
        charts=charts,
        comparisons=_comparison_rows(document),
    )
    return render(request, "studies/detail.html", context)


def _post_action(request: HttpRequest, study_id: int, action, done: str) -> HttpResponse:
    study = _get(study_id)
    try:
        result = action(study=study, by=request.user)
    except DomainError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, done.format(result=result))
    if request.htmx:  # the button's hx-post (it asks for confirmation first): reload the page
        return HttpResponseClientRedirect(reverse("studies:detail", args=[study.pk]))
    return redirect("studies:detail", study_id=study.pk)


@require_role(Role.ADMIN)
@require_POST
def study_cancel(request: HttpRequest, study_id: int) -> HttpResponse:
    return _post_action(
        request,
        study_id,
        services.study_cancel,
        "Cancelled the study: asked {result} job(s) to stop; finished work is kept.",
    )


@require_role(Role.ADMIN)
@require_POST
def study_retry(request: HttpRequest, study_id: int) -> HttpResponse:
    return _post_action(
        request,
        study_id,
        services.study_retry,
        "Retrying the study: {result} job(s) queued again; finished work is kept.",
    )


@require_role(Role.ADMIN)
@require_POST
def study_review_done(request: HttpRequest, study_id: int) -> HttpResponse:
    return _post_action(
        request,
        study_id,
        services.study_review_done,
        "Review done: the trained arms train on the accepted traces now.",
    )


@require_role(*READERS)
def study_export_json(request: HttpRequest, study_id: int) -> HttpResponse:
    document = selectors.study_document(_get(study_id))
    response = HttpResponse(
        json.dumps(document, indent=2, sort_keys=True), content_type="application/json"
    )
    response["Content-Disposition"] = f'attachment; filename="study-{study_id}.json"'
    return response


@require_role(*READERS)
def study_export_report(request: HttpRequest, study_id: int) -> HttpResponse:
    files = report_files(selectors.study_document(_get(study_id)))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(f"study-{study_id}-report/{name}", text)
    response = HttpResponse(buffer.getvalue(), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="study-{study_id}-report.zip"'
    return response
