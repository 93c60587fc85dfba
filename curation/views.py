"""The expert's workflow: problem list, problem page, solution editor with live preview and
waypoint marking, version history with diffs, import and export.

Experts create problems and edit their own; admins edit everything; reviewers (and experts)
read everything. Object-level rights are checked by `problem_require_edit`.
"""

from __future__ import annotations

import difflib
import json
import tempfile
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.text import slugify
from django.views.decorators.http import require_POST

from curation import selectors
from curation.forms import (
    DatasetForm,
    ImportForm,
    ProblemCreateForm,
    ProblemDetailsForm,
    ProblemFilterForm,
    SolutionForm,
    split_tags,
)
from curation.models import Problem
from curation.services import problems as problem_services
from curation.services import suggestions, transfer
from curation.services.editor import editor_action_apply
from curation.spans import Span, SpanError, carry_spans, validate_spans
from dailweb.errors import ConflictError, DomainError, add_to_form
from dailweb.forms import plain_int
from dailweb.jobs.models import Job
from dailweb.rendering import render_markdown, render_source_with_math, render_spans_of
from dailweb.roles import Role, require_role

READERS = (Role.EXPERT, Role.REVIEWER, Role.ADMIN)
WRITERS = (Role.EXPERT, Role.ADMIN)
PROBLEMS_PER_PAGE = 25


def _filters(request: HttpRequest) -> tuple[ProblemFilterForm, selectors.ProblemFilters]:
    form = ProblemFilterForm(request.GET or None)
    if not form.is_valid():
        return form, selectors.ProblemFilters()
    data = form.cleaned_data
    author_id = None
    if data["author"]:
        author = get_user_model().objects.filter(username=data["author"]).first()
        author_id = author.pk if author else -1
    return form, selectors.ProblemFilters(
        query=data["q"].strip(),
        dataset_id=data["dataset"].pk if data["dataset"] else None,
        has_answer={"yes": True, "no": False}.get(data["answer"]),
        waypoint_status=data["waypoints"],
        author_id=author_id,
    )


@require_role(*READERS)
def problem_list(request: HttpRequest) -> HttpResponse:
    form, filters = _filters(request)
    page = Paginator(selectors.problem_list(filters), PROBLEMS_PER_PAGE).get_page(
        request.GET.get("page")
    )
    query = request.GET.copy()
    query.pop("page", None)
    context = {"filters": form, "page": page, "query": query.urlencode()}
    template = (
        "curation/problem_list.html#problem-table" if request.htmx else "curation/problem_list.html"
    )
    return render(request, template, context)


def _get_problem(problem_id: int) -> Problem:
    try:
        return selectors.problem_detail(problem_id)
    except Problem.DoesNotExist:
        raise Http404(f"There is no problem #{problem_id}.") from None


def _spans_of(version) -> list[Span]:
    return [Span(w.start, w.end, w.origin) for w in version.ordered_waypoints]


def _waypoint_rows(body: str, spans: list[Span]) -> list[tuple]:
    """(number as listed, span, source text, typeset text) for each waypoint."""
    typeset = render_spans_of(body, [(s.start, s.end) for s in spans])
    return [(i + 1, s, s.text_in(body), typeset[i]) for i, s in enumerate(spans)]


def _method_context(*, statement: str, body: str, answer: str, spans: list[Span]) -> dict:
    previews, note = suggestions.prompt_previews(
        statement=statement, body=body, answer=answer, spans=spans
    )
    return {
        "partial_solution": suggestions.partial_solution_text(
            body=body, answer=answer, spans=spans
        ),
        "partial_solution_html": suggestions.partial_solution_html(
            body=body, answer=answer, spans=spans
        ),
        "prompts": previews,
        "prompts_note": note,
    }


@require_role(*READERS)
def problem_detail(request: HttpRequest, problem_id: int) -> HttpResponse:
    problem = _get_problem(problem_id)
    version = problem.current_version
    spans = _spans_of(version)
    context = {
        "problem": problem,
        "version": version,
        "statement": render_markdown(problem.statement),
        "solution": render_markdown(version.body),
        "waypoints": _waypoint_rows(version.body, spans),
        "can_edit": problem_services.problem_can_edit(request.user, problem),
        **_method_context(
            statement=problem.statement, body=version.body, answer=problem.answer, spans=spans
        ),
    }
    return render(request, "curation/problem_detail.html", context)


def _editor_state(form: SolutionForm) -> tuple[str, str, list[Span], list[str]]:
    """Body, answer and waypoints as posted; waypoints marked on an older text are carried
    into the current one (returns the texts that could not be carried)."""
    data = form.cleaned_data
    body = data["body"].replace("\r\n", "\n")
    spans = data["waypoints"]
    marked_on = data.get("waypoints_body", "").replace("\r\n", "\n")
    dropped: list[str] = []
    if spans and marked_on and marked_on != body:
        spans, dropped = carry_spans(marked_on, body, spans)
    return body, data["answer"].strip(), spans, dropped


def _editor_context(
    *, statement: str, body: str, answer: str, spans: list[Span], dropped=(), error="", notices=()
) -> dict:
    waypoint_error = error
    try:
        validate_spans(body, spans)
    except SpanError as exc:
        waypoint_error = str(exc)
        spans = []
    preview = render_markdown(body)
    return {
        "preview": preview,
        "marking": render_source_with_math(body, [(s.start, s.end) for s in spans]),
        "waypoints": _waypoint_rows(body, spans),
        "has_expert_waypoints": any(s.origin == "expert" for s in spans),
        "waypoints_json": json.dumps([[s.start, s.end, s.origin] for s in spans]),
        "waypoints_body": body,
        "dropped": list(dropped),
        "waypoint_error": waypoint_error,
        "waypoint_notices": list(notices),
        **_method_context(statement=statement, body=body, answer=answer, spans=spans),
    }


@require_role(*WRITERS)
def problem_edit(request: HttpRequest, problem_id: int) -> HttpResponse:
    problem = _get_problem(problem_id)
    problem_services.problem_require_edit(request.user, problem)
    version = problem.current_version
    if request.method == "POST":
        form = SolutionForm(request.POST)
        conflict = None
        if form.is_valid():
            body, answer, spans, dropped = _editor_state(form)
            base_version = form.cleaned_data["base_version"]
            try:
                if body == version.body and answer == problem.answer:
                    problem_services.waypoints_save(
                        version=version, spans=spans, base_version=base_version
                    )
                    messages.success(request, f"Saved the waypoints of version {version.number}.")
                else:
                    revision = problem_services.solution_revise(
                        problem=problem,
                        body=body,
                        answer=answer,
                        author=request.user,
                        note=form.cleaned_data["note"],
                        waypoints=spans,
                        base_version=base_version,
                    )
                    messages.success(request, f"Saved version {revision.version.number}.")
                    if dropped:
                        messages.warning(
                            request,
                            "These waypoints no longer occur in the text and were not carried: "
                            + ", ".join(repr(d) for d in dropped),
                        )
            except ConflictError as exc:
                form.add_error(None, exc.message)
                conflict = _edit_conflict(problem, base_version)
            except DomainError as exc:
                form.add_error(None, exc.message)
            else:
                return redirect("curation:detail", problem_id=problem.pk)
            # Nothing typed is lost: the text, answer, note and waypoints come back as posted.
            context = _editor_context(
                statement=problem.statement, body=body, answer=answer, spans=spans, dropped=dropped
            )
        else:
            context = _editor_context(
                statement=problem.statement,
                body=request.POST.get("body", version.body),
                answer=request.POST.get("answer", ""),
                spans=[],
                error="",
            )
        if conflict:
            # The next save is made on top of the version now current (the user has seen it).
            version = problem.versions.order_by("-number").first()
            form.data = form.data.copy()
            form.data["base_version"] = str(version.number)
        context.update(
            {
                "problem": problem,
                "version": version,
                "form": form,
                "conflict": conflict,
                "details": _details_form(problem),
            }
        )
        status = ConflictError.status if conflict else 400
        return render(request, "curation/problem_edit.html", context, status=status)
    spans = _spans_of(version)
    form = SolutionForm(
        initial={
            "body": version.body,
            "answer": problem.answer,
            "waypoints": json.dumps([[s.start, s.end, s.origin] for s in spans]),
            "waypoints_body": version.body,
            "base_version": version.number,
        }
    )
    context = _editor_context(
        statement=problem.statement, body=version.body, answer=problem.answer, spans=spans
    )
    context.update(
        {
            "problem": problem,
            "version": version,
            "form": form,
            "details": _details_form(problem),
        }
    )
    return render(request, "curation/problem_edit.html", context)


def _details_form(problem: Problem) -> ProblemDetailsForm:
    return ProblemDetailsForm(
        initial={
            "statement": problem.statement,
            "source": problem.source,
            "tags": ", ".join(problem.tags),
        }
    )


def _edit_conflict(problem: Problem, base_version: int | None) -> dict | None:
    """What the editor shows beside a refused save: the link to the diff between the version
    the edit started from and the one saved since."""
    current = problem.versions.order_by("-number").values_list("number", flat=True).first()
    if base_version is None or current is None:
        return None
    diff_url = reverse("curation:versions", kwargs={"problem_id": problem.pk})
    if 0 < base_version < current:
        diff_url += f"?a={base_version}&b={current}"
    return {
        "base": base_version,
        "current": current,
        "diff_url": diff_url,
    }


@require_role(*WRITERS)
@require_POST
def editor_preview(request: HttpRequest) -> HttpResponse:
    """The live panel of the editor: rendered preview, marking pane, waypoints, s~, prompts.

    Actions (`action`, applied by `editor_action_apply`): refresh (default), add (a span
    `start`/`end`), delete / up / down (`index`), suggest, clear.
    """
    form = SolutionForm(request.POST)
    if not form.is_valid():
        return HttpResponse("The editor state could not be read; reload the page.", status=400)
    statement = request.POST.get("statement", "")
    body, answer, spans, dropped = _editor_state(form)
    action = request.POST.get("action", "refresh")
    try:
        numbers = {
            key: plain_int(request.POST[key])
            for key in ("start", "end", "index")
            if request.POST.get(key, "") != ""
        }
    except ValueError:
        action, numbers = "refresh", {}
        unreadable = "The selection could not be read."
    else:
        unreadable = ""
    outcome = editor_action_apply(
        body=body,
        answer=answer,
        spans=spans,
        action=action,
        keep_text_order=bool(request.POST.get("keep_text_order")),
        **numbers,
    )
    outcome.error = unreadable or outcome.error
    context = _editor_context(
        statement=statement,
        body=body,
        answer=answer,
        spans=outcome.spans,
        dropped=dropped,
        error=outcome.error,
        notices=outcome.notices,
    )
    return render(request, "curation/problem_edit.html#live-panel", context)


@require_role(*WRITERS)
def problem_create(request: HttpRequest) -> HttpResponse:
    form = ProblemCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        body, answer, spans, _dropped = _editor_state(form)
        try:
            problem = problem_services.problem_create(
                dataset=data["dataset"],
                statement=data["statement"],
                solution=body,
                answer=answer,
                external_id=data["external_id"],
                source=data["source"],
                tags=split_tags(data["tags"]),
                author=request.user,
                waypoints=spans,
                note=data["note"],
            )
        except DomainError as exc:
            add_to_form(form, exc)
        else:
            messages.success(request, f"Created problem {problem.external_id}.")
            return redirect("curation:detail", problem_id=problem.pk)
    body = form.data.get("body", "") if form.is_bound else ""
    context = _editor_context(
        statement=form.data.get("statement", "") if form.is_bound else "",
        body=body,
        answer="",
        spans=[],
    )
    context.update({"form": form, "creating": True})
    return render(
        request, "curation/problem_edit.html", context, status=400 if form.is_bound else 200
    )


@require_role(*WRITERS)
@require_POST
def problem_details_update(request: HttpRequest, problem_id: int) -> HttpResponse:
    problem = _get_problem(problem_id)
    problem_services.problem_require_edit(request.user, problem)
    form = ProblemDetailsForm(request.POST)
    if form.is_valid():
        try:
            problem_services.problem_update_details(
                problem=problem,
                statement=form.cleaned_data["statement"],
                source=form.cleaned_data["source"],
                tags=split_tags(form.cleaned_data["tags"]),
            )
        except DomainError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, "Saved the problem's details.")
    else:
        messages.error(request, "The statement is required.")
    return redirect("curation:detail", problem_id=problem.pk)


@require_role(*READERS)
def problem_versions(request: HttpRequest, problem_id: int) -> HttpResponse:
    problem = _get_problem(problem_id)
    versions = list(selectors.solution_versions(problem))
    numbers = [v.number for v in versions]
    try:
        new = plain_int(request.GET.get("b", str(numbers[0])))
        old = plain_int(request.GET.get("a", str(numbers[1] if len(numbers) > 1 else numbers[0])))
    except ValueError:
        raise Http404("Version numbers are whole numbers.") from None
    by_number = {v.number: v for v in versions}
    if old not in by_number or new not in by_number:
        raise Http404("No such version.")
    diff = difflib.HtmlDiff(wrapcolumn=70).make_table(
        by_number[old].body.splitlines(),
        by_number[new].body.splitlines(),
        fromdesc=f"version {old}",
        todesc=f"version {new}",
        context=True,
        numlines=2,
    )
    context = {"problem": problem, "versions": versions, "old": old, "new": new, "diff": diff}
    return render(request, "curation/problem_versions.html", context)


@require_role(*WRITERS)
def dataset_create(request: HttpRequest) -> HttpResponse:
    form = DatasetForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            dataset = problem_services.dataset_create(created_by=request.user, **form.cleaned_data)
        except DomainError as exc:
            form.add_error(None, exc.message)
        else:
            messages.success(request, f"Created dataset {dataset.name}.")
            return redirect(reverse("curation:list") + f"?dataset={dataset.pk}")
    return render(
        request, "curation/dataset_form.html", {"form": form}, status=400 if form.errors else 200
    )


@require_role(*WRITERS)
def problem_import(request: HttpRequest) -> HttpResponse:
    form = ImportForm(request.POST or None, request.FILES or None)
    report = None
    status = 200
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        upload = data["file"]
        try:
            transfer.upload_check_size(size=upload.size)
            report = transfer.problems_import_jsonl(
                data=upload.read(),
                dataset=data["dataset"],
                new_dataset=None
                if data["dataset"]
                else transfer.NewDataset(
                    name=data["new_dataset_name"], kind=data["new_dataset_kind"] or "verifiable"
                ),
                author=request.user,
                only_valid_lines=data["only_valid_lines"],
                large_imports="job",
            )
        except DomainError as exc:
            form.add_error(None, exc.message)
            status = exc.status
        else:
            if report.job_id:
                messages.success(request, report.summary())
                return redirect("curation:import_job", job_id=report.job_id)
            status = 200 if report.imported else 400
            if report.imported:
                messages.success(request, report.summary())
    elif request.method == "POST":
        status = 400
    context = {
        "form": form,
        "report": report,
        "upload_limit_mb": settings.DAIL_UPLOAD_MAX_MB,
        "inline_max_lines": transfer.inline_max_lines(),
    }
    return render(request, "curation/import.html", context, status=status)


def _import_job(request: HttpRequest, job_id: int):
    try:
        return transfer.problem_import_job_get(job_id=job_id, user=request.user)
    except Job.DoesNotExist:
        raise Http404(f"There is no import job #{job_id}.") from None


def _import_job_page(request: HttpRequest, job, status: int = 200, error: str = "") -> HttpResponse:
    context = {
        "job": job,
        "report": transfer.ImportReport.from_dict(job.result) if job.result else None,
        "action_error": error,
    }
    template = (
        "curation/import_job.html#import-status" if request.htmx else "curation/import_job.html"
    )
    return render(request, template, context, status=status)


@require_role(*WRITERS)
def problem_import_job(request: HttpRequest, job_id: int) -> HttpResponse:
    """A large import's progress, cancel / retry, and its report (its launcher or admins)."""
    return _import_job_page(request, _import_job(request, job_id))


def _import_job_action(request: HttpRequest, job_id: int, action) -> HttpResponse:
    _import_job(request, job_id)
    try:
        action(job_id=job_id, user=request.user)
    except DomainError as exc:
        if not request.htmx:
            messages.error(request, exc.message)
            return redirect("curation:import_job", job_id=job_id)
        return _import_job_page(request, _import_job(request, job_id), exc.status, exc.message)
    if request.htmx:
        return _import_job_page(request, _import_job(request, job_id))
    return redirect("curation:import_job", job_id=job_id)


@require_role(*WRITERS)
@require_POST
def problem_import_job_cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    return _import_job_action(request, job_id, transfer.problem_import_job_cancel)


@require_role(*WRITERS)
@require_POST
def problem_import_job_retry(request: HttpRequest, job_id: int) -> HttpResponse:
    return _import_job_action(request, job_id, transfer.problem_import_job_retry)


@require_role(*READERS)
def problem_export(request: HttpRequest) -> HttpResponse:
    _form, filters = _filters(request)
    problems = selectors.problem_list(filters)
    fmt = request.GET.get("format", "jsonl")
    name = slugify(request.GET.get("name", "problems")) or "problems"
    if fmt == "parquet":
        handle = tempfile.NamedTemporaryFile(suffix=".parquet", delete=False)  # noqa: SIM115
        handle.close()
        path = transfer.problems_export_parquet(problems, Path(handle.name))
        response = FileResponse(path.open("rb"), as_attachment=True, filename=f"{name}.parquet")
        path.unlink()  # the open handle keeps the data until the response is sent
        return response
    if fmt != "jsonl":
        raise Http404("Export formats: jsonl, parquet.")
    response = HttpResponse(
        transfer.problems_export_jsonl(problems), content_type="application/jsonl"
    )
    response["Content-Disposition"] = f'attachment; filename="{name}.jsonl"'
    return response
