"""Models, expansion runs (admins launch; reviewers and admins watch) and the reviewer's
queue and trace page."""

from __future__ import annotations

import re

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.defaultfilters import pluralize
from django.urls import reverse
from django.views.decorators.http import require_POST

from curation.spans import Span
from dailweb.errors import DomainError
from dailweb.forms import plain_id
from dailweb.rendering import render_markdown, render_source_with_math
from dailweb.roles import Role, require_role
from expansion import selectors
from expansion.engine.trace_format import decode_trace
from expansion.forms import RunLaunchForm, SpanForm, TraceFilterForm, VerdictForm
from expansion.models import ExpansionRun, ShortcutSpan, Trace
from expansion.services import base_model_dir, embedded_model_status
from expansion.services import review as review_services
from expansion.services import runs as run_services
from expansion.services.whatif import trace_whatif_text
from expansion.trace_display import pinned_partial_solution_html, tokenizer_for, trace_display

REVIEWERS = (Role.REVIEWER, Role.ADMIN)
TRACES_PER_PAGE = 50


@require_role(Role.ADMIN)
def model_list(request: HttpRequest) -> HttpResponse:
    return render(request, "expansion/model_list.html", {"embedded": embedded_model_status()})


# --- Runs ------------------------------------------------------------------------------------


@require_role(*REVIEWERS)
def run_list(request: HttpRequest) -> HttpResponse:
    page = Paginator(selectors.run_list(), 25).get_page(request.GET.get("page"))
    progress = selectors.run_progress(list(page.object_list))
    context = {"page": page, "runs": progress, "any_active": any(p.is_active for p in progress)}
    template = "expansion/run_list.html#run-table" if request.htmx else "expansion/run_list.html"
    return render(request, template, context)


def _selected_problem_ids(form: RunLaunchForm) -> list[int]:
    data = form.cleaned_data
    return run_services.run_problems_select(
        dataset=data["dataset"],
        external_ids=re.split(r"[\s,]+", data["problem_ids"] or ""),
        limit=data["limit"],
    )


@require_role(Role.ADMIN)
def run_launch(request: HttpRequest) -> HttpResponse:
    form = RunLaunchForm(request.POST or None, initial={"model_path": str(base_model_dir())})
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            data = form.cleaned_data
            try:
                run = run_services.expansion_run_launch(
                    settings=run_services.RunSettings(
                        name=data["name"],
                        model_path=data["model_path"],
                        adapter_path=data["adapter_path"],
                        backend=data["backend"],
                        samples_per_problem=data["samples_per_problem"],
                        preset=data["preset"],
                        rollout=form.rollout_settings(),
                        kept_rule=data["kept_rule"],
                        chunk_tokens=data["chunk_tokens"],
                        reasoning=data["reasoning"],
                        require_answers=data["require_answers"],
                    ),
                    problem_ids=_selected_problem_ids(form),
                    launched_by=request.user,
                )
            except DomainError as exc:
                form.add_error(None, exc.message)
                status = exc.status
            else:
                chunk_count = run.chunks.count()
                messages.success(
                    request,
                    f"Launched expansion run #{run.pk} ({chunk_count} chunk{pluralize(chunk_count)}).",
                )
                return redirect("expansion:run_detail", run_id=run.pk)
    return render(request, "expansion/run_launch.html", {"form": form}, status=status)


def _get_run(run_id: int) -> ExpansionRun:
    try:
        return selectors.run_list().get(pk=run_id)
    except ExpansionRun.DoesNotExist:
        raise Http404(f"There is no expansion run #{run_id}.") from None


@require_role(*REVIEWERS)
def run_detail(request: HttpRequest, run_id: int) -> HttpResponse:
    run = _get_run(run_id)
    progress = selectors.run_progress([run])[0]
    multi, agreeing = selectors.run_agreement(run.pk)
    chunks = list(selectors.run_chunks(run))
    current, queued_after = selectors.run_current_chunk(chunks)
    context = {
        "run": run,
        "progress": progress,
        "chunks": chunks,
        "current_chunk": current,
        "queued_after": queued_after,
        "agreement": (multi, agreeing),
    }
    if not request.htmx:
        context["settings_fields"] = selectors.run_settings_fields(run)
    template = (
        "expansion/run_detail.html#run-status" if request.htmx else "expansion/run_detail.html"
    )
    return render(request, template, context)


@require_role(Role.ADMIN)
@require_POST
def run_cancel(request: HttpRequest, run_id: int) -> HttpResponse:
    run = _get_run(run_id)
    try:
        count = run_services.expansion_run_cancel(run=run, by=request.user)
        messages.success(request, f"Asked {count} chunk{pluralize(count)} to stop.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("expansion:run_detail", run_id=run.pk)


@require_role(Role.ADMIN)
@require_POST
def run_retry(request: HttpRequest, run_id: int) -> HttpResponse:
    run = _get_run(run_id)
    try:
        count = run_services.expansion_run_retry(run=run, by=request.user)
        messages.success(
            request, f"Queued {count} chunk{pluralize(count)} again; finished traces are kept."
        )
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("expansion:run_detail", run_id=run.pk)


# --- Reviewing -------------------------------------------------------------------------------


def _trace_filters(form: TraceFilterForm) -> selectors.TraceFilters:
    if not form.is_valid():
        return selectors.TraceFilters()
    data = form.cleaned_data
    yes_no = {"yes": True, "no": False}
    return selectors.TraceFilters(
        run_id=data["run"],
        problem=data["problem"].strip(),
        state=data["state"],
        correct=yes_no.get(data["correct"]),
        kept=yes_no.get(data["kept"]),
        min_shortcut=data["min_shortcut"],
        min_fallback=data["min_fallback"],
        sort=data["sort"] or "shortcut",
    )


@require_role(*REVIEWERS)
def trace_queue(request: HttpRequest) -> HttpResponse:
    form = TraceFilterForm(request.GET or None)
    filters = _trace_filters(form)
    # Paginate ids (a narrow query, cheap on deep pages), then load that page's rows.
    page = Paginator(selectors.trace_queue_ids(filters), TRACES_PER_PAGE).get_page(
        request.GET.get("page")
    )
    page.object_list = selectors.traces_by_ids(list(page.object_list))
    query = request.GET.copy()
    query.pop("page", None)
    runs = selectors.run_review_counts(list(selectors.run_list()[:20]))
    context = {
        "filters": form,
        "page": page,
        "query": query.urlencode(),
        "runs": runs,
        "run_id": filters.run_id,
    }
    template = (
        "expansion/trace_queue.html#trace-table" if request.htmx else "expansion/trace_queue.html"
    )
    return render(request, template, context)


@require_role(*REVIEWERS)
def trace_next(request: HttpRequest) -> HttpResponse:
    run_id = request.GET.get("run")
    after = request.GET.get("after")
    trace = review_services.trace_claim_next(
        reviewer=request.user,
        run_id=plain_id(run_id),
        after_trace_id=plain_id(after),
    )
    if trace is None:
        messages.info(request, "No unreviewed traces left here. Well done.")
        return redirect(reverse("expansion:queue") + (f"?run={run_id}" if run_id else ""))
    return redirect("expansion:trace", trace_id=trace.pk)


def _get_trace(trace_id: int) -> Trace:
    try:
        return selectors.trace_detail(trace_id)
    except Trace.DoesNotExist:
        raise Http404(f"There is no trace #{trace_id}.") from None


def _trace_context(request: HttpRequest, trace: Trace) -> dict:
    arrays = decode_trace(bytes(trace.data))
    display = trace_display(arrays, tokenizer_for(trace.run.model_path))
    version = trace.run_problem.solution_version
    waypoints = list(version.waypoints.order_by("order"))
    verdicts = list(trace.verdicts.select_related("reviewer"))
    previous_id, next_id = selectors.trace_neighbours(trace)
    run_problem = trace.run_problem
    return {
        "trace": trace,
        "problem": trace.run_problem.problem,
        "display": display,
        "statement": render_markdown(trace.run_problem.problem.statement),
        "solution": render_source_with_math(version.body, [(w.start, w.end) for w in waypoints]),
        "waypoints": [version.body[w.start : w.end] for w in waypoints],
        "partial_solution_html": pinned_partial_solution_html(
            pinned=run_problem.partial_solution,
            body=version.body,
            answer=run_problem.answer,
            waypoints=[Span(w.start, w.end, w.origin) for w in waypoints],
        ),
        "whatif_text": trace_whatif_text(trace=trace),
        "verdicts": verdicts,
        "agreement": selectors.trace_agreement(verdicts),
        "spans": selectors.trace_spans(trace),
        "deleted_spans": selectors.trace_deleted_spans(trace),
        "previous_id": previous_id,
        "next_id": next_id,
        "threshold": trace.run.shortcut_threshold,
        "verdict_form": VerdictForm(initial={"base_revision": trace.revision}),
        "accept_concerns": selectors.trace_accept_concerns(trace),
    }


@require_role(*REVIEWERS)
def trace_page(request: HttpRequest, trace_id: int) -> HttpResponse:
    trace = _get_trace(trace_id)
    return render(request, "expansion/trace.html", _trace_context(request, trace))


def _review_panel(
    request: HttpRequest,
    trace_id: int,
    *,
    error: str = "",
    status: int = 200,
    form=None,
    confirm_open: bool = False,
) -> HttpResponse:
    trace = _get_trace(trace_id)
    verdicts = list(trace.verdicts.select_related("reviewer"))
    context = {
        "trace": trace,
        "verdicts": verdicts,
        "agreement": selectors.trace_agreement(verdicts),
        "spans": selectors.trace_spans(trace),
        "deleted_spans": selectors.trace_deleted_spans(trace),
        "verdict_form": form or VerdictForm(initial={"base_revision": trace.revision}),
        "review_error": error,
        "accept_concerns": selectors.trace_accept_concerns(trace),
        "confirm_open": confirm_open,
    }
    return render(request, "expansion/trace.html#review-panel", context, status=status)


@require_role(*REVIEWERS)
@require_POST
def trace_verdict(request: HttpRequest, trace_id: int) -> HttpResponse:
    trace = _get_trace(trace_id)
    form = VerdictForm(request.POST)
    if not form.is_valid():
        return _review_panel(
            request, trace.pk, error="Choose accept, reject or needs fix.", status=400, form=form
        )
    try:
        review_services.verdict_record(
            trace_id=trace.pk,
            reviewer=request.user,
            decision=form.cleaned_data["decision"],
            note=form.cleaned_data["note"],
            base_revision=form.cleaned_data["base_revision"],
            confirm_incorrect=form.cleaned_data["confirm_incorrect"],
        )
    except DomainError as exc:
        return _review_panel(
            request,
            trace.pk,
            error=exc.message,
            status=exc.status,
            form=form,
            confirm_open="confirm_incorrect" in exc.field_errors,
        )
    if request.POST.get("then") == "next":
        target = reverse("expansion:next") + f"?run={trace.run_id}&after={trace.pk}"
        if request.htmx:
            response = HttpResponse(status=204)
            response["HX-Redirect"] = target
            return response
        return redirect(target)
    if request.htmx:
        return _review_panel(request, trace.pk)
    return redirect("expansion:trace", trace_id=trace.pk)


@require_role(*REVIEWERS)
@require_POST
def trace_span_add(request: HttpRequest, trace_id: int) -> HttpResponse:
    trace = _get_trace(trace_id)
    form = SpanForm(request.POST)
    if not form.is_valid():
        return _review_panel(request, trace.pk, error="Select some tokens first.", status=400)
    try:
        review_services.shortcut_span_add(
            trace_id=trace.pk,
            reviewer=request.user,
            start_token=form.cleaned_data["start_token"],
            end_token=form.cleaned_data["end_token"],
            note=form.cleaned_data["note"],
            tokens=trace.length,
        )
    except DomainError as exc:
        return _review_panel(request, trace.pk, error=exc.message, status=exc.status)
    return (
        _review_panel(request, trace.pk)
        if request.htmx
        else redirect("expansion:trace", trace_id=trace.pk)
    )


@require_role(*REVIEWERS)
@require_POST
def trace_span_delete(request: HttpRequest, trace_id: int, span_id: int) -> HttpResponse:
    trace = _get_trace(trace_id)
    if not ShortcutSpan.objects.filter(pk=span_id, trace=trace).exists():
        raise Http404("No such span on this trace.")
    try:
        review_services.shortcut_span_delete(span_id=span_id, reviewer=request.user)
    except DomainError as exc:
        if request.htmx:
            return _review_panel(request, trace.pk, error=exc.message, status=exc.status)
        context = {**_trace_context(request, trace), "review_error": exc.message}
        return render(request, "expansion/trace.html", context, status=exc.status)
    return (
        _review_panel(request, trace.pk)
        if request.htmx
        else redirect("expansion:trace", trace_id=trace.pk)
    )


@require_role(*REVIEWERS)
def trace_export(request: HttpRequest) -> HttpResponse:
    """Reviewed traces of the chosen runs as JSONL or Parquet (what training reads)."""
    import tempfile
    from pathlib import Path

    from django.http import FileResponse

    from expansion.services import export

    run_ids = [i for i in map(plain_id, request.GET.getlist("run")) if i is not None]
    if not run_ids:
        raise Http404("Choose at least one run (?run=ID).")
    states = [s for s in request.GET.getlist("state") if s] or list(export.DEFAULT_STATES)
    fmt = request.GET.get("format", "jsonl")
    if fmt not in {"jsonl", "parquet"}:
        raise Http404("Export formats: jsonl, parquet.")
    traces = export.reviewed_traces(run_ids=run_ids, states=states)
    handle = tempfile.NamedTemporaryFile(suffix=f".{fmt}", delete=False)  # noqa: SIM115
    handle.close()
    path = Path(handle.name)
    (export.export_parquet if fmt == "parquet" else export.export_jsonl)(traces, path)
    name = f"traces-run{'-'.join(map(str, run_ids))}-{'-'.join(states)}.{fmt}"
    response = FileResponse(path.open("rb"), as_attachment=True, filename=name)
    path.unlink()  # the open handle keeps the data until the response is sent
    return response


@require_role(*REVIEWERS)
@require_POST
def trace_whatif(request: HttpRequest, trace_id: int) -> HttpResponse:
    """Re-score the negative reference under edited waypoints (JSON for the page's script)."""
    from django.http import JsonResponse

    from expansion.services.whatif import trace_whatif_rescore

    trace = _get_trace(trace_id)
    waypoints = request.POST.get("waypoints", "").splitlines()
    try:
        result = trace_whatif_rescore(trace=trace, waypoints=waypoints)
    except DomainError as exc:
        return JsonResponse({"error": exc.message}, status=exc.status)
    return JsonResponse(result)
