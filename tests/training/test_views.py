"""Evaluation pages: launch form (errors at the boundary and from the service), detail,
comparison (charts' data, tables with intervals), drill-down with math, rulings, exports."""

from __future__ import annotations

import csv
import io
import json

import pytest
from django.test import Client
from django.urls import reverse

from curation.models import Problem
from tests.factories import make_dataset, make_problem, make_user
from tests.training.factories import make_evaluation
from training.models import Evaluation, EvaluationSample

pytestmark = pytest.mark.django_db


def client_for(role: str) -> Client:
    client = Client()
    client.force_login(make_user(role))
    return client


def launch_data(dataset, base, **overrides) -> dict:
    return {
        "name": "smoke",
        "base_model_path": str(base),
        "adapter_path": "",
        "backend": "transformers",
        "dataset": dataset.pk,
        "split": "all",
        "held_out_fraction": "0.2",
        "split_seed": "0",
        "samples_per_problem": "4",
        "ks": "1, 2, 4",
        "budgets": "8, 16",
        "temperature": "0.6",
        "top_p": "0.95",
        "seed": "0",
        "batch_size": "4",
        "prompt_template": "## Problem:\n{problem}\n\nPut your final answer within \\boxed{}.\n",
    } | overrides


def test_launch_form_offers_vllm_where_it_is_installed():
    body = client_for("admin").get(reverse("evaluations:launch")).content.decode()
    assert '<option value="vllm">vLLM (with LoRA adapters)</option>' in body
    assert "cannot run here" not in body


def test_launch_form_shows_why_vllm_cannot_be_chosen(monkeypatch):
    from expansion.engine.vllm_backend import availability

    monkeypatch.setattr(
        availability, "vllm_unavailable_reason", lambda: "vLLM is not installed here"
    )
    for url in (reverse("evaluations:launch"), reverse("expansion:run_launch")):
        response = client_for("admin").get(url)
        assert response.status_code == 200
        body = response.content.decode()
        assert "not available: vLLM is not installed here" in body  # the choice's label
        assert "cannot run here: vLLM is not installed here" in body  # the hint


def test_launch_refuses_k_larger_than_n_at_the_form(tiny_model_path):
    dataset = make_dataset()
    make_problem(dataset=dataset)
    response = client_for("admin").post(
        reverse("evaluations:launch"), launch_data(dataset, tiny_model_path, ks="1, 8")
    )
    assert response.status_code == 400
    assert "k = 8 is larger than n = 4" in response.content.decode()
    assert not Evaluation.objects.exists()


def test_launch_maps_service_refusals_to_form_errors(tiny_model_path, tmp_path):
    dataset = make_dataset(kind="proof")
    make_problem(dataset=dataset, answer="")
    client = client_for("admin")
    response = client.post(reverse("evaluations:launch"), launch_data(dataset, tiny_model_path))
    assert response.status_code == 400
    assert "pass@k needs problems with verifiable final answers" in response.content.decode()
    verifiable = make_dataset()
    make_problem(dataset=verifiable)
    missing = tmp_path / "no-such-adapter"
    response = client.post(
        reverse("evaluations:launch"),
        launch_data(verifiable, tiny_model_path, adapter_path=str(missing)),
    )
    assert response.status_code == 400
    assert f"No adapter at {missing}: the path does not exist." in response.content.decode()
    assert not Evaluation.objects.exists()


def test_launch_creates_the_evaluation_and_its_job(tiny_model_path, broker_url, clean_queues):
    dataset = make_dataset()
    make_problem(dataset=dataset)
    response = client_for("admin").post(
        reverse("evaluations:launch"), launch_data(dataset, tiny_model_path)
    )
    evaluation = Evaluation.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse(
        "evaluations:detail", kwargs={"evaluation_id": evaluation.pk}
    )
    assert evaluation.job.state == "queued" and evaluation.budgets == [8, 16]


def test_detail_tells_plainly_what_the_model_did():
    evaluation = make_evaluation(problems=2, samples=2, correct=lambda p, s: False)
    body = (
        client_for("reviewer")
        .get(reverse("evaluations:detail", kwargs={"evaluation_id": evaluation.pk}))
        .content.decode()
    )
    assert "0 of 4 samples correct (0.0 %)" in body
    assert "0 of 2 problems solved by at least one sample" in body
    assert "0.0 % [0.0, 0.0]" in body  # pass@k with its (empty) interval, not hidden


def test_detail_polls_while_running_and_reloads_once_finished():
    running = make_evaluation(job_state="running")
    client = client_for("admin")
    url = reverse("evaluations:detail", kwargs={"evaluation_id": running.pk})
    partial = client.get(url, headers={"HX-Request": "true"})
    assert 'hx-trigger="every 2s"' in partial.content.decode() and "HX-Refresh" not in partial
    running.job.state = "succeeded"
    running.job.save()
    done = client.get(url, headers={"HX-Request": "true"})
    assert done["HX-Refresh"] == "true" and "every 2s" not in done.content.decode()


def test_comparison_has_chart_data_tables_and_warnings():
    first = make_evaluation(problems=2, samples=2, name="base")
    second = make_evaluation(problems=2, samples=2, name="tuned", correct=lambda p, s: True)
    response = client_for("reviewer").get(
        reverse("evaluations:compare") + f"?ids={first.pk}&ids={second.pk}"
    )
    body = response.content.decode()
    assert response.status_code == 200
    assert "vendor/chartjs/chart.umd.min.js" in body and "js/eval_charts.js" in body
    start = body.index('<script id="eval-chart-data" type="application/json">') + len(
        '<script id="eval-chart-data" type="application/json">'
    )
    data = json.loads(body[start : body.index("</script>", start)])
    assert [e["id"] for e in data["evaluations"]] == [first.pk, second.pk]
    assert data["ks"] == [1, 2] and data["budgets"] == [16, 64]
    assert data["evaluations"][1]["pass_at_k"][0]["value"] == pytest.approx(1.0)
    assert data["evaluations"][0]["budget_curves"]["1"][0] == {
        "budget": 16,
        "value": 0.5,
        "low": 0.5,
        "high": 0.5,
    }
    assert "100.0 % [100.0, 100.0]" in body
    assert "different problem sets" in body


def test_chart_js_is_served_from_our_static_files():
    response = Client().get("/static/vendor/chartjs/chart.umd.min.js")
    assert response.status_code == 200
    assert b"Chart.js v4.6.1" in b"".join(response.streaming_content)[:200]


def test_exports_csv_and_json():
    evaluation = make_evaluation(problems=2, samples=2)
    client = client_for("reviewer")
    url = reverse("evaluations:export")
    response = client.get(url + f"?ids={evaluation.pk}&format=csv")
    assert response["Content-Type"] == "text/csv"
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    overall = [r for r in rows if r["scope"] == "overall"]
    assert [(r["k"], float(r["pass_at_k"])) for r in overall] == [("1", 0.5), ("2", 1.0)]
    assert len([r for r in rows if r["scope"] == "problem"]) == 4
    document = json.loads(client.get(url + f"?ids={evaluation.pk}&format=json").content)
    assert document["evaluations"][0]["metrics"]["pass_at_k"][0]["value"] == pytest.approx(0.5)
    assert client.get(url + "?format=csv").status_code == 400


def test_drill_down_renders_samples_with_math_and_records_a_ruling():
    evaluation = make_evaluation(problems=1, samples=2)
    EvaluationSample.objects.filter(sample_index=1).update(
        checkers_disagree=True, math_verify=True, auto_correct=True
    )
    problem = Problem.objects.get(pk=evaluation.problems.get().problem_id)
    client = client_for("reviewer")
    url = (
        reverse("evaluations:problem", kwargs={"problem_id": problem.pk}) + f"?ids={evaluation.pk}"
    )
    body = client.get(url).content.decode()
    assert "<math" in body  # $x = 3$ typeset by KaTeX on the server
    assert "checkers disagree" in body and "Sample 2" in body
    flagged = EvaluationSample.objects.get(sample_index=1)
    response = client.post(
        reverse("evaluations:rule", kwargs={"sample_id": flagged.pk}),
        {"ruling": "incorrect", "note": "boxed the wrong thing", "next": url},
    )
    assert response.status_code == 302 and response["Location"] == f"{url}#sample-{flagged.pk}"
    flagged.refresh_from_db()
    assert (flagged.ruling, flagged.ruling_note, flagged.correct) == (
        "incorrect",
        "boxed the wrong thing",
        False,
    )
    assert "Ruled incorrect by" in client.get(url).content.decode()
    # An outside address in `next` is ignored.
    response = client.post(
        reverse("evaluations:rule", kwargs={"sample_id": flagged.pk}),
        {"ruling": "", "next": "https://evil.example/"},
    )
    assert response["Location"].startswith(
        reverse("evaluations:problem", kwargs={"problem_id": problem.pk})
    )


def test_experts_cannot_read_evaluations():
    evaluation = make_evaluation()
    client = client_for("expert")
    assert (
        client.get(
            reverse("evaluations:detail", kwargs={"evaluation_id": evaluation.pk})
        ).status_code
        == 403
    )
    assert client.get(reverse("evaluations:list")).status_code == 403


def test_the_protocol_is_chosen_on_the_form_and_shown_on_the_pages(
    tiny_model_path, broker_url, clean_queues
):
    dataset = make_dataset()
    make_problem(dataset=dataset)
    client = client_for("admin")
    form = client.get(reverse("evaluations:launch")).content.decode()
    assert 'name="protocol"' in form and "eval/eval.py" in form
    response = client.post(
        reverse("evaluations:launch"), launch_data(dataset, tiny_model_path, protocol="release")
    )
    assert response.status_code == 302, response.content.decode()[-2000:]
    evaluation = Evaluation.objects.get()
    assert evaluation.protocol == "release"
    detail = client.get(reverse("evaluations:detail", args=[evaluation.pk])).content.decode()
    assert 'data-testid="protocol-setting"' in detail and "presence_penalty=1.5" in detail
    plain = make_evaluation(problems=1, samples=2)
    compare = client.get(
        reverse("evaluations:compare") + f"?ids={plain.pk}&ids={evaluation.pk}"
    ).content.decode()
    assert "Not comparable: the evaluations used different sampling protocols" in compare


def test_top_k_is_optional_on_the_form_refused_when_not_1_to_1000_and_shown(
    tiny_model_path, broker_url, clean_queues
):
    dataset = make_dataset()
    make_problem(dataset=dataset)
    client = client_for("admin")
    assert 'name="top_k"' in client.get(reverse("evaluations:launch")).content.decode()
    for bad in ("0", "twenty", "2.5", "1001"):
        response = client.post(
            reverse("evaluations:launch"), launch_data(dataset, tiny_model_path, top_k=bad)
        )
        assert response.status_code == 400, bad
    assert not Evaluation.objects.exists()
    response = client.post(reverse("evaluations:launch"), launch_data(dataset, tiny_model_path))
    assert response.status_code == 302 and Evaluation.objects.get().top_k is None  # blank: none
    response = client.post(
        reverse("evaluations:launch"), launch_data(dataset, tiny_model_path, top_k="20")
    )
    assert response.status_code == 302
    evaluation = Evaluation.objects.order_by("pk").last()
    assert evaluation.top_k == 20
    detail = client.get(reverse("evaluations:detail", args=[evaluation.pk])).content.decode()
    assert "Temperature / top-p / top-k" in detail and "0.6 / 0.95 / 20" in detail
    listing = client.get(reverse("evaluations:list")).content.decode()
    assert "top-k 20" in listing and "top-k none" in listing
