"""The study pages: the launch form (preview, then Launch), refusals as form errors, roles, the
detail page with results (charts, pass@k, paired comparisons, lineage), the exports, and a
hostile study name escaped everywhere. Services and their jobs: test_study_services.py."""

from __future__ import annotations

import io
import json
import re
import zipfile

import pytest
from django.test import Client
from django.urls import reverse

from dailweb.jobs.models import Job
from expansion.models import ExpansionRun
from tests.factories import make_dataset, make_problem, make_user
from tests.training.training_factories import make_study
from training.models import Study, StudyArm, StudyState

pytestmark = pytest.mark.django_db

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


@pytest.fixture(autouse=True)
def artifacts(settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"


@pytest.fixture
def queue(broker_url, clean_queues):
    """Launching probes and publishes to the test broker (nothing runs the jobs here)."""


def client_for(role: str) -> Client:
    client = Client()
    client.force_login(make_user(role))
    return client


def dataset_with_problems(count: int = 8):
    dataset = make_dataset()
    for index in range(count):
        a, b = index + 2, index + 3
        make_problem(
            dataset=dataset,
            statement=f"Compute ${a} + {b}$.",
            solution=f"${a} + {b} = {a + b}$, so $\\boxed{{{a + b}}}$.",
            answer=str(a + b),
        )
    return dataset


def form_data(dataset, model_dir, **overrides) -> dict:
    data = {
        "name": "view study",
        "dataset": dataset.pk,
        "base_model_path": str(model_dir),
        "held_out_fraction": "0.5",
        "split_seed": "0",
        "training_limit": "",
        "held_out_limit": "",
        "arms": ["base", "sft_solutions", "dail"],
        "acceptance": "automatic",
        "preset": "release_dail",
        "samples_per_problem": "1",
        "expansion_max_new_tokens": "3",
        "kept_rule": "all",
        "epochs": "1",
        "learning_rate": "0.0002",
        "effective_batch_size": "1",
        "max_length": "256",
        "lora_r": "4",
        "protocol": "workbench",
        "evaluation_samples": "2",
        "budgets": "3, 2",
        "temperature": "1.0",
        "top_p": "1.0",
        "top_k": "",
        "evaluation_seed": "0",
        "prompt_template": "{problem}",
    }
    return data | overrides


def test_the_form_offers_every_setting_with_the_defaults():
    page = client_for("admin").get(reverse("studies:launch")).content.decode()
    for name in re.findall(r"\b\w+\b", "name dataset base_model_path held_out_fraction split_seed "
                           "training_limit held_out_limit arms acceptance preset "
                           "samples_per_problem expansion_max_new_tokens kept_rule epochs "
                           "learning_rate effective_batch_size max_length lora_r protocol "
                           "evaluation_samples budgets temperature top_p top_k evaluation_seed "
                           "prompt_template"):  # fmt: skip
        assert f'name="{name}"' in page, name
    # Every arm ticked, automatic acceptance chosen and saying that no reviewer saw the traces.
    assert len(re.findall(r'name="arms" value="\w+"[^>]*checked', page)) == 5
    assert re.search(r'name="acceptance" value="automatic"[^>]*checked', page)
    assert "no reviewer saw them" in page
    assert 'name="confirm"' not in page  # no Launch button before a preview


def test_preview_shows_the_split_and_estimate_and_creates_nothing(tiny_model_path):
    dataset = dataset_with_problems(8)
    response = client_for("admin").post(
        reverse("studies:launch"), form_data(dataset, tiny_model_path)
    )
    page = response.content.decode()
    assert response.status_code == 200, page
    assert 'data-testid="study-plan"' in page
    split = re.search(r'data-testid="plan-split">(.*?)</dd>', page, re.S).group(1)
    numbers = [int(n) for n in re.findall(r"<strong>(\d+)</strong>", split)]
    assert sum(numbers) == 8 and all(numbers)
    assert re.search(r'data-testid="plan-total"><strong>\d+ min</strong>', page)
    assert "Expansion" in page and "Evaluation" in page
    assert 'name="confirm" value="yes"' in page
    assert not Study.objects.exists() and not Job.objects.exists()
    # A hostile name comes back escaped in the form.
    response = client_for("admin").post(
        reverse("studies:launch"), form_data(dataset, tiny_model_path, name=HOSTILE)
    )
    assert response.status_code == 200
    assert "<script>alert" not in response.content.decode()


def test_launch_creates_the_study_and_queues_its_expansion(tiny_model_path, queue):
    dataset = dataset_with_problems(8)
    admin = client_for("admin")
    response = admin.post(
        reverse("studies:launch"), form_data(dataset, tiny_model_path, confirm="yes")
    )
    study = Study.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("studies:detail", args=[study.pk])
    assert list(study.arms.values_list("key", flat=True)) == ["base", "sft_solutions", "dail"]
    assert study.training_settings["lora_r"] == 4
    assert study.evaluation_settings["budgets"] == [2, 3]
    run = ExpansionRun.objects.get()
    assert study.expansion_run == run
    assert Job.objects.filter(expansion_chunk__run=run).exists()
    page = admin.get(response["Location"]).content.decode()
    assert "expansion run #" in page and 'hx-trigger="every' in page


def test_a_refused_split_says_why_and_creates_nothing(tiny_model_path, queue):
    dataset = dataset_with_problems(1)
    response = client_for("admin").post(
        reverse("studies:launch"), form_data(dataset, tiny_model_path, confirm="yes")
    )
    page = response.content.decode()
    assert response.status_code == 400
    assert "a study needs both" in page and "nothing was queued" in page
    assert not Study.objects.exists() and not Job.objects.exists()


def test_a_config_refusal_lands_beside_its_field(tiny_model_path):
    dataset = dataset_with_problems(8)
    response = client_for("admin").post(
        reverse("studies:launch"), form_data(dataset, tiny_model_path, learning_rate="2")
    )
    page = response.content.decode()
    assert response.status_code == 400
    assert re.search(
        r'name="learning_rate".*?<small class="error">learning_rate must be', page, re.S
    )
    assert 'data-testid="study-plan"' not in page


def test_reviewers_read_but_cannot_launch_cancel_or_retry():
    running = make_study()
    failed = make_study(state=StudyState.FAILED)
    reviewer = client_for("reviewer")
    assert reviewer.get(reverse("studies:list")).status_code == 200
    page = reviewer.get(reverse("studies:detail", args=[running.pk])).content.decode()
    assert "Cancel study" not in page
    assert reviewer.get(reverse("studies:launch")).status_code == 403
    assert reviewer.post(reverse("studies:cancel", args=[running.pk])).status_code == 403
    assert reviewer.post(reverse("studies:retry", args=[failed.pk])).status_code == 403
    waiting = make_study(state=StudyState.AWAITING_REVIEW)
    assert reviewer.post(reverse("studies:review_done", args=[waiting.pk])).status_code == 403
    page = reviewer.get(reverse("studies:detail", args=[waiting.pk])).content.decode()
    assert 'data-testid="review-box"' in page and "Review done: train now" not in page
    running.refresh_from_db()
    assert running.state == StudyState.RUNNING
    assert "New study" not in reviewer.get(reverse("studies:list")).content.decode()
    assert client_for("expert").get(reverse("studies:list")).status_code == 403


def test_admin_cancels_a_running_study_and_a_conflict_is_a_message():
    study = make_study()
    admin = client_for("admin")
    response = admin.post(reverse("studies:cancel", args=[study.pk]), follow=True)
    study.refresh_from_db()
    assert study.state == StudyState.CANCELLED
    assert "Cancelled the study" in response.content.decode()
    again = admin.post(reverse("studies:cancel", args=[study.pk]), follow=True)
    assert "This study is not running." in again.content.decode()
    # The buttons' htmx post gets a client-side redirect, not the page.
    review = admin.post(reverse("studies:review_done", args=[study.pk]), HTTP_HX_REQUEST="true")
    assert review["HX-Redirect"] == reverse("studies:detail", args=[study.pk])


def test_detail_with_results_shows_charts_tables_comparisons_and_lineage():
    study = make_study(results=True, problems=6, samples=4)
    page = client_for("reviewer").get(reverse("studies:detail", args=[study.pk])).content.decode()
    assert page.count("<svg") == 2 and "<?xml" not in page
    for key in ("base", "sft_solutions", "dail"):
        assert f'data-testid="arm-result-{key}"' in page
    # pass@1 of each arm as the document computes it, and pass@k for every k up to n.
    from training.studies import selectors

    document = selectors.study_document(study)
    for arm in document["arms"]:
        first = arm["metrics"]["pass_at_k"][0]
        assert f"{100 * first['value']:.1f} %" in page
        assert [p["k"] for p in arm["metrics"]["pass_at_k"]] == [1, 2, 3, 4]
    comparisons = document["comparisons"]
    assert comparisons
    table = re.search(r'id="comparison-table".*?</table>', page, re.S).group(0)
    assert table.count("<tr") == len(comparisons) + 1
    for c in comparisons:
        assert f"{100 * c['value']:+.1f}".replace("+0.0", "0.0").replace("-0.0", "0.0") in table
    assert "interval" in table and ("excludes 0" in table or "contains 0" in table)
    lineage = re.search(r'id="study-lineage".*?</section>', page, re.S).group(0)
    run = StudyArm.objects.get(study=study, key="dail").training_run
    assert f"#{run.pk}" in lineage and run.snapshot_sha256[:12] in lineage
    assert "/artifacts/dail/adapter" in lineage
    assert 'hx-trigger="every' in page  # still running: polled


def test_detail_without_results_says_so_and_a_finished_study_stops_polling():
    study = make_study(state=StudyState.SUCCEEDED, step="done")
    client = client_for("admin")
    page = client.get(reverse("studies:detail", args=[study.pk])).content.decode()
    assert 'data-testid="no-results"' in page and "<svg" not in page
    assert 'hx-trigger="every' not in page
    partial = client.get(reverse("studies:detail", args=[study.pk]), HTTP_HX_REQUEST="true")
    assert partial["HX-Refresh"] == "true"
    assert "<html" not in partial.content.decode()


def test_the_status_partial_reloads_the_page_only_when_results_change():
    study = make_study(results=True, problems=2, samples=2)
    client = client_for("admin")
    url = reverse("studies:detail", args=[study.pk])
    same = client.get(url, {"evaluated": "3"}, HTTP_HX_REQUEST="true")
    assert "HX-Refresh" not in same and 'id="study-status"' in same.content.decode()
    changed = client.get(url, {"evaluated": "2"}, HTTP_HX_REQUEST="true")
    assert changed["HX-Refresh"] == "true"


def test_exports_json_and_zip():
    study = make_study(results=True, problems=3, samples=2)
    client = client_for("reviewer")
    response = client.get(reverse("studies:export_json", args=[study.pk]))
    assert response.status_code == 200
    assert f'filename="study-{study.pk}.json"' in response["Content-Disposition"]
    document = json.loads(response.content)
    assert document["format"] == "dail-study/1" and len(document["arms"]) == 3
    response = client.get(reverse("studies:export_report", args=[study.pk]))
    assert f'filename="study-{study.pk}-report.zip"' in response["Content-Disposition"]
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = {name.rsplit("/", 1)[-1]: name for name in archive.namelist()}
    assert {"report.md", "study.json", "pass_at_k.svg"} <= set(names)
    report = archive.read(names["report.md"]).decode()
    assert report.startswith("# Study: test study") and "## Paired comparisons" in report


def test_a_hostile_name_is_escaped_on_every_page():
    study = make_study(name=HOSTILE, results=True, problems=2, samples=2)
    client = client_for("admin")
    for url in (
        reverse("studies:list"),
        reverse("studies:detail", args=[study.pk]),
    ):
        page = client.get(url).content.decode()
        assert "<script>alert" not in page and "<img src=x" not in page, url
        assert "&lt;script&gt;alert" in page, url
    partial = client.get(reverse("studies:detail", args=[study.pk]), HTTP_HX_REQUEST="true")
    assert "<img src=x" not in partial.content.decode()


def test_unknown_study_is_404():
    assert client_for("admin").get(reverse("studies:detail", args=[999999])).status_code == 404


def test_an_interval_that_excludes_zero_is_said_in_words():
    # The DAIL arm solves every sample, the base model none: DAIL is better beyond doubt.
    study = make_study(
        arms=("base", "dail"), results=True, problems=6, samples=2, correct=lambda i, p, s: i == 1
    )
    page = client_for("reviewer").get(reverse("studies:detail", args=[study.pk])).content.decode()
    table = re.search(r'id="comparison-table".*?</table>', page, re.S).group(0)
    assert "<strong>better: the interval excludes 0</strong>" in table
    assert "+100.0" in table and "contains 0" not in table
