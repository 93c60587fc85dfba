"""Training pages: the launch form (scaled defaults, range errors, service refusals), the run
page (status partial that polls only while running, the negative-term warning, snapshot and
over-long counts, chart data), the metrics endpoint, the list, the registry, downloads, and
the `launch_training` management command."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from dailweb.jobs.models import Job
from tests.factories import make_user
from tests.training.training_factories import make_tokenized_run, make_training_run, small_config
from training.models import TrainingRun
from training.services.training import training_defaults

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def artifacts(settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


def admin_client() -> Client:
    client = Client()
    client.force_login(make_user("admin"))
    return client


def form_data(model_dir, run_ids, **overrides) -> dict:
    defaults = training_defaults()
    data = {
        "name": "from the form",
        "expansion_runs": [str(i) for i in run_ids],
        "base_model_path": str(model_dir),
        **{k: str(v) for k, v in defaults.items() if not isinstance(v, list | bool | type(None))},
        "lora_targets": defaults["lora_targets"],
        "max_length": "512",
        "effective_batch_size": "1",
        "micro_batch_size": "1",
        "warmup_steps": "1",  # shorter than the 2 steps of the usual 2 traces
    }
    return data | overrides


def test_launch_form_offers_scaled_defaults_and_says_so(tiny_model_path):
    run_data = make_tokenized_run(tiny_model_path, samples=3, states=("accepted", "rejected"))
    page = admin_client().get("/training/new/").content.decode()
    assert "scaled for the embedded SmolLM2-135M" in page
    assert 'name="max_length" value="1024"' in page and "Release: 2048 (reasoning)" in page
    assert 'name="effective_batch_size" value="4"' in page and "Release: 16." in page
    assert 'name="gamma" value="0.1"' in page
    assert f"#{run_data.pk} test run — 2 accepted of 3 traces" in page
    for target in ("q_proj", "down_proj"):
        assert f'value="{target}"' in page


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("gamma", "1.5", "less than or equal to 0.999"),
        ("learning_rate", "0", "greater than or equal to"),
        ("micro_batch_size", "3", "must divide effective_batch_size"),
        ("lora_r", "0", "greater than or equal to 1"),
    ],
)
def test_hyperparameters_out_of_range_are_form_errors(tiny_model_path, field, value, message):
    run_data = make_tokenized_run(tiny_model_path, samples=1)
    data = form_data(tiny_model_path, [run_data.pk], **{field: value})
    if field == "micro_batch_size":
        data["effective_batch_size"] = "4"
    response = admin_client().post("/training/new/", data)
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert field in errors and message in " ".join(errors[field])
    assert not TrainingRun.objects.exists()


def test_launch_from_the_form_queues_a_gpu_job(tiny_model_path, broker_url, clean_queues):
    run_data = make_tokenized_run(tiny_model_path, samples=2)
    response = admin_client().post("/training/new/", form_data(tiny_model_path, [run_data.pk]))
    assert response.status_code == 302, response.content.decode()[-3000:]
    run = TrainingRun.objects.get()
    assert response["Location"] == f"/training/{run.pk}/"
    assert run.job.queue == "gpu" and run.job.state == "queued"
    assert run.config["max_length"] == 512 and run.config["effective_batch_size"] == 1
    assert run.total_steps == 2


def test_the_form_shows_service_refusals(tiny_model_path, tmp_path):
    empty = make_tokenized_run(tiny_model_path, samples=2, states=("unreviewed",))
    response = admin_client().post("/training/new/", form_data(tiny_model_path, [empty.pk]))
    assert response.status_code == 400
    assert "The snapshot is empty" in response.content.decode()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    response = admin_client().post("/training/new/", form_data(other, [empty.pk]))
    assert response.status_code == 400
    assert "another base model" in response.content.decode()
    assert not Job.objects.exists()


def test_run_page_polls_only_while_running_and_warns_when_the_push_dominates():
    run = make_training_run(
        job_state="running", metrics=[(0.1, 0.2, 3.0), (0.05, 0.1, 3.0), (0.01, 0.1, 4.0)]
    )
    client = admin_client()
    page = client.get(f"/training/{run.pk}/").content.decode()
    assert 'hx-trigger="every 2s"' in page
    assert 'data-testid="negative-term-warning"' in page and "dominates" in page
    assert 'id="chart-kl-negative"' in page and 'id="chart-lr"' in page
    data = json.loads(
        page.split('id="training-chart-data" type="application/json">')[1].split("<")[0]
    )
    assert [p["step"] for p in data["points"]] == [1, 2, 3] and data["active"] is True
    partial = client.get(f"/training/{run.pk}/", headers={"HX-Request": "true"}).content.decode()
    assert partial.lstrip().startswith('<section id="training-status"')
    assert "every 2s" in partial

    Job.objects.filter(pk=run.job_id).update(state="succeeded")
    partial = client.get(f"/training/{run.pk}/", headers={"HX-Request": "true"}).content.decode()
    assert "hx-trigger" not in partial

    calm = make_training_run(metrics=[(0.2, 0.3, 1.0)] * 4)
    assert "negative-term-warning" not in client.get(f"/training/{calm.pk}/").content.decode()


def test_run_page_shows_the_snapshot_and_what_fitting_did():
    run = make_training_run(
        snapshot_traces=7,
        examples_used=6,
        overlong_truncated=2,
        overlong_skipped=0,
        prompt_too_long=1,
        response_tokens_dropped=140,
        excluded={"unreviewed": 3, "rejected": 2, "needs_fix": 0},
        source_runs=[{"id": 99, "name": "run x", "accepted": 7}],
    )
    page = admin_client().get(f"/training/{run.pk}/").content.decode()
    assert "<strong>6 used</strong>" in page
    assert "2 truncated (140 tokens cut), 0 skipped, 1 with a prompt alone too long" in page
    assert "3 unreviewed, 2 rejected" in page and "#99 run x" in page


def test_nll_runs_draw_no_kl_charts():
    run = make_training_run(objective="nll")
    page = admin_client().get(f"/training/{run.pk}/").content.decode()
    assert 'id="chart-loss"' in page and 'id="chart-kl-privileged"' not in page


def test_metrics_endpoint_returns_the_steps_after_the_last_one_drawn():
    run = make_training_run(metrics=[(0.3, 0.4, 1.0), (0.2, 0.3, 1.0), (0.1, 0.2, 1.0)])
    client = admin_client()
    document = client.get(f"/training/{run.pk}/metrics/?after=1").json()
    assert [p["step"] for p in document["points"]] == [2, 3]
    assert document["points"][0]["kl_privileged"] == 0.3
    assert document["attempt"] == 1 and document["active"] is True
    assert document["gamma"] == 0.1 and document["warning"] == ""
    assert client.get(f"/training/{run.pk}/metrics/?after=3").json()["points"] == []


def test_registry_lists_only_runs_with_adapters_and_downloads_404_without_one(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    done = make_training_run(
        job_state="succeeded",
        name="finished one",
        adapter_path=str(adapter),
        final_metrics={"step": 4, "loss": 0.1234, "kl_privileged": 0.2, "kl_negative": 0.8},
    )
    running = make_training_run(name="still running")
    gone = make_training_run(job_state="succeeded", name="moved away", adapter_path="/gone")
    client = admin_client()
    page = client.get("/training/adapters/").content.decode()
    assert "finished one" in page and "still running" not in page
    assert "loss 0.1234" in page and "directory missing" in page
    assert client.get(f"/training/{done.pk}/adapter.zip").status_code == 200
    assert client.get(f"/training/{running.pk}/adapter.zip").status_code == 404
    assert client.get(f"/training/{gone.pk}/adapter.zip").status_code == 404


def test_list_page_and_navigation_for_admins_only():
    make_training_run(name="listed run")
    page = admin_client().get("/training/").content.decode()
    assert "listed run" in page and 'href="/training/new/"' in page
    assert 'aria-current="page">Training' in page
    reviewer = Client()
    reviewer.force_login(make_user("reviewer"))
    assert 'href="/training/"' not in reviewer.get("/").content.decode()
    assert reviewer.get("/training/").status_code == 403


def test_cancel_and_retry_buttons_call_the_services(broker_url, clean_queues):
    run = make_training_run(job_state="running")
    client = admin_client()
    client.post(f"/training/{run.pk}/cancel/")
    assert Job.objects.get(pk=run.job_id).cancel_requested
    failed = make_training_run(job_state="failed")
    client.post(f"/training/{failed.pk}/retry/")
    job = Job.objects.get(pk=failed.job_id)
    assert job.state == "queued" and job.attempt == 2


def test_launch_training_command(tiny_model_path, broker_url, clean_queues):
    run_data = make_tokenized_run(tiny_model_path, samples=2)
    out = StringIO()
    call_command(
        "launch_training",
        "--runs", str(run_data.pk),
        "--model", str(tiny_model_path),
        "--objective", "nll",
        "--config", json.dumps({"max_length": 512, "effective_batch_size": 1, "warmup_steps": 1}),
        stdout=out,
    )  # fmt: skip
    run = TrainingRun.objects.get()
    assert (
        f"Queued training run #{run.pk}" in out.getvalue() and "2 of 2 accepted" in out.getvalue()
    )
    assert run.objective == "nll" and run.config["epochs"] == 1  # the embedded scale
    with pytest.raises(CommandError, match="gamma must be in"):
        call_command(
            "launch_training", "--runs", str(run_data.pk), "--model", str(tiny_model_path),
            "--config", '{"gamma": 2}',
        )  # fmt: skip
    empty = make_tokenized_run(tiny_model_path, samples=1, states=("rejected",))
    with pytest.raises(CommandError, match="snapshot is empty"):
        call_command("launch_training", "--runs", str(empty.pk), "--model", str(tiny_model_path))
    assert TrainingRun.objects.count() == 1
    # --leave-out: the run's traces both incorrect (the factory: sample 1), one left out.
    call_command(
        "launch_training", "--runs", str(run_data.pk), "--model", str(tiny_model_path),
        "--leave-out", "incorrect",
        "--config", json.dumps({"max_length": 512, "effective_batch_size": 1, "warmup_steps": 0}),
        stdout=out,
    )  # fmt: skip
    latest = TrainingRun.objects.order_by("-pk").first()
    assert latest.snapshot_traces == 1 and latest.data_filter["left_out"] == {"incorrect": 1}
    assert "1 more accepted left out by --leave-out" in out.getvalue()


def test_the_form_checks_data_and_steps_without_launching(tiny_model_path):
    run_data = make_tokenized_run(tiny_model_path, samples=3)  # sample 1: incorrect, not kept
    page_before = admin_client().get("/training/new/").content.decode()
    assert "(of those accepted: 1 incorrect answer" in page_before  # counts beside the run
    data = form_data(tiny_model_path, [run_data.pk], preview="1", epochs="2")
    data["leave_out"] = ["incorrect"]
    response = admin_client().post("/training/new/", data)
    assert response.status_code == 200
    page = response.content.decode()
    assert 'data-testid="training-plan"' in page
    plan = response.context["plan"]
    assert (plan.examples_used, plan.planned_steps, plan.left_out_total) == (2, 4, 1)
    assert "<strong>4</strong> = ceil(ceil(2 / 1) / 1) × 2 epoch(s)" in page
    assert "1 incorrect answer — 1 left out" in page
    assert not TrainingRun.objects.exists() and not Job.objects.exists()


def test_a_warm_up_as_long_as_the_run_is_an_error_on_its_field(tiny_model_path):
    run_data = make_tokenized_run(tiny_model_path, samples=2)
    response = admin_client().post(
        "/training/new/", form_data(tiny_model_path, [run_data.pk], warmup_steps="2")
    )
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert "must be below the 2 planned optimizer step(s), or 0" in " ".join(errors["warmup_steps"])
    assert "first step of a warm-up runs at learning rate 0" in response.content.decode()
    assert not TrainingRun.objects.exists()


def test_run_page_shows_normalisation_policies_and_what_was_left_out():
    legacy_config = small_config(shortcut_policy="drop_pull")
    del legacy_config["loss_normalisation"]  # stored before the setting existed
    old = make_training_run(config=legacy_config)
    page = admin_client().get(f"/training/{old.pk}/").content.decode()
    assert old.loss_normalisation == "per_token"
    assert "per_token (mean over all tokens" in page and "recorded before the setting" in page
    assert "not counted (launched before flags were counted)" in page

    new = make_training_run(
        data_filter={
            "leave_out": ["incorrect"],
            "flagged": {"incorrect": 3, "no_answer": 0, "truncated": 2, "not_kept": 1},
            "left_out": {"incorrect": 3},
            "left_out_total": 3,
        }
    )
    page = admin_client().get(f"/training/{new.pk}/").content.decode()
    assert "per_sequence (release" in page and "recorded before" not in page
    assert "3 incorrect answer (<strong>3 left out</strong>)" in page
    assert "2 truncated at the token budget (kept in)" in page
    assert "3 accepted traces left out in all" in page
