"""Evaluations: admins launch, cancel and retry them; reviewers and admins read the results,
compare evaluations, drill down to each problem's samples, rule on flagged samples and
export."""

from __future__ import annotations

import csv

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from curation.models import Problem
from dailweb.errors import DomainError, add_to_form
from dailweb.forms import plain_id
from dailweb.rendering import render_markdown
from dailweb.roles import Role, require_role
from expansion.forms import label_unavailable_vllm
from training.charts import charts_available
from training.evaluations import selectors, services
from training.evaluations.forms import EvaluationLaunchForm, RulingForm
from training.models import Evaluation, EvaluationSample

READERS = (Role.REVIEWER, Role.ADMIN)
EVALUATIONS_PER_PAGE = 25
MAX_COMPARED = 8


def _ids(request: HttpRequest) -> list[int]:
    ids = [i for i in map(plain_id, request.GET.getlist("ids")) if i is not None]
    return list(dict.fromkeys(ids))[:MAX_COMPARED]


def _get(evaluation_id: int) -> Evaluation:
    try:
        return selectors.evaluation_get(evaluation_id)
    except Evaluation.DoesNotExist:
        raise Http404(f"There is no evaluation #{evaluation_id}.") from None


@require_role(*READERS)
def evaluation_list(request: HttpRequest) -> HttpResponse:
    page = Paginator(selectors.evaluation_list(), EVALUATIONS_PER_PAGE).get_page(
        request.GET.get("page")
    )
    any_active = any(e.job and e.job.is_active for e in page.object_list)
    context = {"page": page, "any_active": any_active}
    template = "evaluations/list.html#evaluation-table" if request.htmx else "evaluations/list.html"
    return render(request, template, context)


@require_role(Role.ADMIN)
def evaluation_launch(request: HttpRequest) -> HttpResponse:
    from expansion.services import base_model_dir

    form = EvaluationLaunchForm(
        request.POST or None, initial={"base_model_path": str(base_model_dir())}
    )
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            data = form.cleaned_data
            try:
                evaluation = services.evaluation_launch(
                    settings=services.EvaluationSettings(
                        name=data["name"],
                        base_model_path=data["base_model_path"],
                        adapter_path=data["adapter_path"],
                        backend=data["backend"],
                        problem_set=services.ProblemSetChoice(
                            split=data["split"],
                            dataset_id=data["dataset"].pk if data["dataset"] else None,
                            held_out_fraction=data["held_out_fraction"] or 0.2,
                            split_seed=data["split_seed"] or 0,
                            problem_ids=data["problem_ids"],
                            limit=data["limit"],
                        ),
                        samples_per_problem=data["samples_per_problem"],
                        ks=data["ks"],
                        budgets=data["budgets"],
                        temperature=data["temperature"],
                        top_p=data["top_p"],
                        top_k=data["top_k"],
                        protocol=data["protocol"],
                        seed=data["seed"],
                        batch_size=data["batch_size"],
                        prompt_template=data["prompt_template"],
                        reasoning=data["reasoning"],
                        allow_training_overlap=data["allow_training_overlap"],
                    ),
                    launched_by=request.user,
                )
            except DomainError as exc:
                add_to_form(form, exc)
                status = exc.status
            else:
                messages.success(request, f"Launched evaluation #{evaluation.pk} on the gpu queue.")
                return redirect("evaluations:detail", evaluation_id=evaluation.pk)
    context = {
        "form": form,
        "vllm_reason": label_unavailable_vllm(form.fields["backend"]),
        "adapters": _known_adapters(),
    }
    return render(request, "evaluations/launch.html", context, status=status)


def _known_adapters() -> list[str]:
    """Adapter directories under the artifacts directory (suggestions for the form)."""
    root = settings.ARTIFACTS_DIR
    if not root.is_dir():
        return []
    found = [str(p.parent) for p in root.glob("**/adapter_config.json")]
    return sorted(found)[:50]


@require_role(*READERS)
def evaluation_detail(request: HttpRequest, evaluation_id: int) -> HttpResponse:
    evaluation = _get(evaluation_id)
    if request.htmx:
        response = render(
            request, "evaluations/detail.html#evaluation-status", {"evaluation": evaluation}
        )
        if not (evaluation.job and evaluation.job.is_active):
            response["HX-Refresh"] = "true"  # finished: reload once to show the results
        return response
    comparison = selectors.evaluation_comparison([evaluation.pk])
    context = {
        "evaluation": evaluation,
        "comparison": comparison,
        "result": comparison.results[0],
        "flagged": selectors.flagged_samples(evaluation),
        "charts": charts_available(),
        "ids_query": f"ids={evaluation.pk}",
    }
    return render(request, "evaluations/detail.html", context)


@require_role(Role.ADMIN)
@require_POST
def evaluation_cancel(request: HttpRequest, evaluation_id: int) -> HttpResponse:
    evaluation = _get(evaluation_id)
    try:
        services.evaluation_cancel(evaluation=evaluation, by=request.user)
        messages.success(request, "Asked the evaluation to stop; samples stored so far are kept.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("evaluations:detail", evaluation_id=evaluation.pk)


@require_role(Role.ADMIN)
@require_POST
def evaluation_retry(request: HttpRequest, evaluation_id: int) -> HttpResponse:
    evaluation = _get(evaluation_id)
    try:
        services.evaluation_retry(evaluation=evaluation, by=request.user)
        messages.success(request, "Queued again; samples already stored are not drawn again.")
    except DomainError as exc:
        messages.error(request, exc.message)
    return redirect("evaluations:detail", evaluation_id=evaluation.pk)


@require_role(*READERS)
def evaluation_compare(request: HttpRequest) -> HttpResponse:
    ids = _ids(request)
    comparison = selectors.evaluation_comparison(ids)
    context = {
        "comparison": comparison,
        "charts": charts_available(),
        "ids_query": "&".join(f"ids={r.evaluation.pk}" for r in comparison.results),
        "choices": selectors.evaluation_list()[:50],
        "chosen": {r.evaluation.pk for r in comparison.results},
    }
    return render(request, "evaluations/compare.html", context)


@require_role(*READERS)
def evaluation_export(request: HttpRequest) -> HttpResponse:
    ids = _ids(request)
    fmt = request.GET.get("format", "csv")
    if not ids or fmt not in {"csv", "json"}:
        return HttpResponse(
            "Choose evaluations (?ids=1&ids=2) and a format (csv or json).",
            status=400,
            content_type="text/plain",
        )
    comparison = selectors.evaluation_comparison(ids)
    name = f"evaluations-{'-'.join(str(r.evaluation.pk) for r in comparison.results)}"
    if fmt == "json":
        response = JsonResponse(
            selectors.export_document(comparison), json_dumps_params={"indent": 2}
        )
        response["Content-Disposition"] = f'attachment; filename="{name}.json"'
        return response
    response = HttpResponse(content_type="text/csv")
    response["Content-Disposition"] = f'attachment; filename="{name}.csv"'
    writer = csv.DictWriter(response, fieldnames=selectors.EXPORT_COLUMNS)
    writer.writeheader()
    writer.writerows(selectors.export_rows(comparison))
    return response


@require_role(*READERS)
def evaluation_problem(request: HttpRequest, problem_id: int) -> HttpResponse:
    ids = _ids(request)
    try:
        problem, columns = selectors.problem_samples(problem_id, ids)
    except Problem.DoesNotExist:
        raise Http404(f"There is no problem #{problem_id}.") from None
    rendered = {}
    for column in columns:
        for sample in column.samples:
            rendered[sample.pk] = render_markdown(sample.text).html
    context = {
        "problem": problem,
        "statement": render_markdown(problem.statement).html,
        "columns": columns,
        "rendered": rendered,
        "ids_query": "&".join(f"ids={c.evaluation.pk}" for c in columns),
        "here": request.get_full_path(),
    }
    return render(request, "evaluations/problem.html", context)


@require_role(*READERS)
@require_POST
def sample_rule(request: HttpRequest, sample_id: int) -> HttpResponse:
    if not EvaluationSample.objects.filter(pk=sample_id).exists():
        raise Http404(f"There is no sample #{sample_id}.")
    form = RulingForm(request.POST)
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        target = ""
    if not form.is_valid():
        messages.error(request, "Choose correct, incorrect or no ruling.")
    else:
        try:
            sample = services.evaluation_sample_rule(
                sample_id=sample_id,
                ruling=form.cleaned_data["ruling"],
                note=form.cleaned_data["note"],
                by=request.user,
            )
        except DomainError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(
                request,
                f"Sample {sample.sample_index + 1}: "
                + (
                    f"ruled {sample.get_ruling_display().lower()}."
                    if sample.ruling
                    else "ruling cleared; the checkers decide."
                ),
            )
    if not target:
        sample = EvaluationSample.objects.select_related("eval_problem").get(pk=sample_id)
        target = reverse(
            "evaluations:problem", kwargs={"problem_id": sample.eval_problem.problem_id}
        ) + (f"?ids={sample.eval_problem.evaluation_id}")
    return redirect(f"{target}#sample-{sample_id}")
