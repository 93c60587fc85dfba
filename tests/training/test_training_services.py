"""Training runs, service level: the frozen snapshot, every refusal before queueing, over-long
traces counted, shortcut spans turned into masks, a run executed in this process on a tiny
model (adapter, lineage file, metrics, download), a NaN that fails the job with the last good
checkpoint kept, a tampered snapshot refused, cancel + resume, and the negative-term warning.

The real embedded model and real workers are in test_training_job.py."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from dailweb.errors import DomainError
from dailweb.jobs import runner
from dailweb.jobs.models import Job, JobState
from dailweb.jobs.services import job_retry
from expansion.models import ReviewState, ShortcutSpan, Trace
from tests.factories import make_user
from tests.training.training_factories import make_tokenized_run, small_config
from training import selectors
from training.engine import evaluation as evaluation_engine
from training.engine.adapter_motion import lora_update_norm
from training.models import TrainingMetric, TrainingRun
from training.services import training as services

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def artifacts(settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


@pytest.fixture
def queue(broker_url, clean_queues):
    """Launching publishes to the test broker; no worker takes the messages here."""


def launch(model_dir, run_ids, **config):
    return services.training_run_launch(
        settings=services.TrainingSettings(
            name="tiny",
            base_model_path=str(model_dir),
            run_ids=run_ids,
            config=small_config(max_length=config.pop("max_length", 512), **config),
        ),
        launched_by=make_user("admin"),
    )


def run_inline(run: TrainingRun) -> Job:
    job = Job.objects.get(pk=run.job_id)
    runner.job_execute(job_id=job.pk, task_id=job.task_id, hostname="inline@test")
    job.refresh_from_db()
    return job


def test_launch_freezes_accepted_traces_and_later_verdicts_do_not_change_it(
    tiny_model_path, queue, artifacts
):
    run_data = make_tokenized_run(
        tiny_model_path, problems=2, samples=3, states=("accepted", "rejected", "unreviewed")
    )
    accepted = list(
        Trace.objects.filter(run=run_data, review_state=ReviewState.ACCEPTED).order_by("pk")
    )
    assert len(accepted) == 2
    run = launch(tiny_model_path, [run_data.pk])

    assert run.job.queue == "gpu" and run.job.kind == "training"
    assert sorted(run.trace_ids) == [t.pk for t in accepted]
    assert sorted(run.problem_ids) == sorted({t.run_problem.problem_id for t in accepted})
    assert run.excluded == {"unreviewed": 2, "rejected": 2, "needs_fix": 0}
    assert run.examples_used == 2 and run.total_steps == 2
    snapshot = Path(run.snapshot_file)
    assert snapshot.parent.parent == artifacts / "training"
    records = services.read_snapshot(snapshot, run.snapshot_sha256)
    assert [r["trace_id"] for r in records] == [t.pk for t in accepted]
    assert all(r["review_state"] == "accepted" for r in records)

    # A reviewer changes their mind and marks a span: the launched run does not change.
    Trace.objects.filter(pk=accepted[0].pk).update(review_state=ReviewState.REJECTED)
    ShortcutSpan.objects.create(
        trace=accepted[1], reviewer=make_user("reviewer"), start_token=0, end_token=3
    )
    again = services.read_snapshot(snapshot, run.snapshot_sha256)
    assert again == records and all(not r["shortcut_spans"] for r in again)


def test_an_empty_snapshot_is_refused_before_anything_is_queued(tiny_model_path, queue, artifacts):
    run_data = make_tokenized_run(tiny_model_path, samples=3, states=("rejected", "unreviewed"))
    with pytest.raises(DomainError, match="snapshot is empty") as caught:
        launch(tiny_model_path, [run_data.pk])
    assert "traces there: 1 unreviewed, 2 rejected" in caught.value.message
    assert caught.value.field_errors == {"expansion_runs": "no accepted traces"}
    assert not TrainingRun.objects.exists()
    assert not Job.objects.filter(kind="training").exists()
    assert not (artifacts / "training").exists() or not any((artifacts / "training").iterdir())


def test_traces_from_another_base_model_are_refused(tiny_model_path, queue, tmp_path):
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    mine = make_tokenized_run(tiny_model_path, samples=1)
    theirs = make_tokenized_run(tiny_model_path, samples=1)
    theirs.model_path = str(other)
    theirs.save(update_fields=["model_path"])
    with pytest.raises(DomainError, match="another base model") as caught:
        launch(tiny_model_path, [mine.pk, theirs.pk])
    assert f"#{theirs.pk}" in caught.value.message and f"#{mine.pk} " not in caught.value.message
    # The same directory reached another way (here a symbolic link) is the same model.
    link = tmp_path / "linked-model"
    link.symlink_to(tiny_model_path)
    theirs.model_path = str(link)
    theirs.save(update_fields=["model_path"])
    assert launch(tiny_model_path, [mine.pk, theirs.pk]).snapshot_traces == 2
    assert TrainingRun.objects.count() == 1


@pytest.mark.parametrize(
    ("setting", "value", "field"),
    [
        ("gamma", 1.0, "gamma"),
        ("learning_rate", 0.0, "learning_rate"),
        ("micro_batch_size", 3, "micro_batch_size"),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_field(
    tiny_model_path, queue, setting, value, field
):
    run_data = make_tokenized_run(tiny_model_path, samples=1)
    config = {**small_config(), setting: value}
    with pytest.raises(DomainError) as caught:
        services.training_run_launch(
            settings=services.TrainingSettings("x", str(tiny_model_path), [run_data.pk], config),
            launched_by=None,
        )
    assert setting in caught.value.message
    assert field in caught.value.field_errors
    assert not TrainingRun.objects.exists()


def test_a_snapshot_of_which_nothing_fits_is_refused(tiny_model_path, queue):
    run_data = make_tokenized_run(tiny_model_path, samples=2)
    with pytest.raises(DomainError, match="fits max_length = 32") as caught:
        launch(tiny_model_path, [run_data.pk], max_length=32)
    assert "2 have a prompt that alone fills it" in caught.value.message
    assert "max_length" in caught.value.field_errors
    assert not TrainingRun.objects.exists()


@pytest.mark.parametrize("policy", ["truncate", "skip"])
def test_overlong_traces_are_truncated_or_skipped_and_counted(tiny_model_path, queue, policy):
    run_data = make_tokenized_run(tiny_model_path, samples=3, long_response=400)
    tokenizer = services.load_tokenizer(tiny_model_path)
    run = launch(tiny_model_path, [run_data.pk], overlong_policy=policy, max_length=320)
    examples, _ = services.training_examples(
        services.read_snapshot(Path(run.snapshot_file), run.snapshot_sha256),
        tokenizer,
        services.context_length(tiny_model_path),
    )
    assert (
        max(e.longest_view() for e in examples)
        > 320
        >= sorted(e.longest_view() for e in examples)[-2]
    )
    if policy == "truncate":
        assert (run.overlong_truncated, run.overlong_skipped, run.examples_used) == (1, 0, 3)
        assert run.response_tokens_dropped == max(e.longest_view() for e in examples) - 320
    else:
        assert (run.overlong_truncated, run.overlong_skipped, run.examples_used) == (0, 1, 2)
        assert run.response_tokens_dropped == 0
    assert run.total_steps == run.examples_used


def test_shortcut_spans_become_the_engines_mask(tiny_model_path, queue):
    run_data = make_tokenized_run(tiny_model_path, samples=2)
    marked = Trace.objects.filter(run=run_data).order_by("pk").first()
    ShortcutSpan.objects.create(
        trace=marked, reviewer=make_user("reviewer"), start_token=2, end_token=5
    )
    run = launch(tiny_model_path, [run_data.pk])
    assert run.snapshot_spans == 1
    records = services.read_snapshot(Path(run.snapshot_file), run.snapshot_sha256)
    examples, _ = services.training_examples(
        records, services.load_tokenizer(tiny_model_path), None
    )
    by_id = {e.example_id: e for e in examples}
    mask = by_id[f"trace-{marked.pk}"].shortcut_mask
    assert [i for i, m in enumerate(mask) if m] == [2, 3, 4]
    assert all(e.shortcut_mask is None for k, e in by_id.items() if k != f"trace-{marked.pk}")
    # Prompts are built from the run's own templates: the privileged view carries the solution.
    tokenizer = services.load_tokenizer(tiny_model_path)
    privileged = tokenizer.decode(by_id[f"trace-{marked.pk}"].privileged_prompt_ids)
    assert "Solution: We have $2x + 1 = 7$" in privileged
    assert "Solution:" not in tokenizer.decode(by_id[f"trace-{marked.pk}"].learner_prompt_ids)


def test_a_run_trains_writes_its_adapter_with_lineage_and_downloads(tiny_model_path, queue, client):
    run_data = make_tokenized_run(tiny_model_path, problems=2, samples=1)
    run = launch(tiny_model_path, [run_data.pk])
    job = run_inline(run)
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    run.refresh_from_db()
    assert (job.progress_done, job.progress_total) == (2, 2)
    assert list(run.metrics.values_list("step", flat=True)) == [1, 2]
    for metric in run.metrics.all():
        assert metric.kl_privileged >= 0 and metric.kl_negative >= 0 and metric.lr > 0
        assert metric.loss == pytest.approx(
            metric.kl_privileged - 0.1 * metric.kl_negative, rel=1e-3, abs=1e-5
        )
    assert run.final_metrics["step"] == 2

    adapter = Path(run.adapter_path)
    assert adapter == Path(run.output_dir) / "adapter"
    evaluation_engine.check_adapter_base(adapter, tiny_model_path)  # evaluations accept it
    snapshot = evaluation_engine.adapter_training_problem_ids(adapter)
    assert snapshot is not None and snapshot.problem_ids == set(run.problem_ids)
    lineage = json.loads((adapter / "dail-training.json").read_text())
    assert lineage["training_run"] == run.pk and lineage["job"] == job.pk
    assert lineage["snapshot"]["sha256"] == run.snapshot_sha256
    assert lineage["config"]["gamma"] == 0.1 and lineage["base_model"] == run.base_model_path
    # The release's normalisation and the safe span policy are the defaults, recorded.
    assert lineage["loss_normalisation"] == "per_sequence" == run.config["loss_normalisation"]
    assert lineage["shortcut_policy"] == "drop_position"
    # How far the adapter moved is measured from the adapter written, and recorded.
    assert run.update_norm == pytest.approx(lora_update_norm(adapter)) and run.update_norm > 0
    assert not run.did_not_move and "LoRA update norm" in job.log
    first = run.metrics.get(step=1)
    assert run.final_metrics["first_loss"] == first.loss and run.final_metrics["first_step"] == 1
    assert lineage["adapter_update"] == {
        "update_norm": run.update_norm,
        "did_not_move": False,
        "first_loss": first.loss,
        "last_loss": run.final_metrics["loss"],
    }
    assert "snapshot: 2 accepted traces" in job.log and "adapter written" in job.log

    client.force_login(make_user("admin"))
    registry = client.get("/training/adapters/").content.decode()
    assert f"#{run.pk} tiny" in registry and run.snapshot_sha256[:12] in registry
    response = client.get(f"/training/{run.pk}/adapter.zip")
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    names = set(archive.namelist())
    folder = f"dail-adapter-{run.pk}"
    assert {f"{folder}/adapter_config.json", f"{folder}/dail-training.json"} <= names
    assert f"{folder}/adapter_model.safetensors" in names


def test_a_nan_loss_fails_the_job_and_keeps_the_last_good_checkpoint(
    tiny_model_path, queue, monkeypatch
):
    from training.engine import trainer as trainer_module

    real_loss = trainer_module.dail_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # step 3 (one trace per step)
            return loss * float("nan"), {**metrics, "total": float("nan")}
        return loss, metrics

    monkeypatch.setattr(trainer_module, "dail_loss", poisoned)
    run_data = make_tokenized_run(tiny_model_path, samples=4)
    run = launch(tiny_model_path, [run_data.pk])
    job = run_inline(run)
    run.refresh_from_db()
    assert job.state == JobState.FAILED
    assert "diverged" in job.error and "step 3" in job.error
    assert "checkpoint-2, is kept" in job.error
    assert Path(run.last_checkpoint).name == "checkpoint-2"
    assert (Path(run.last_checkpoint) / "adapter_model.safetensors").is_file()
    assert not run.adapter_path and not (Path(run.output_dir) / "adapter").exists()
    assert list(run.metrics.values_list("step", flat=True)) == [1, 2]


def test_a_changed_snapshot_file_is_refused_by_the_job(tiny_model_path, queue):
    import gzip

    run_data = make_tokenized_run(tiny_model_path, samples=2)
    run = launch(tiny_model_path, [run_data.pk])
    path = Path(run.snapshot_file)
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    path.write_bytes(gzip.compress(b"".join(lines[:1])))  # one trace gone
    job = run_inline(run)
    assert job.state == JobState.FAILED
    assert "changed since launch" in job.error
    assert not TrainingMetric.objects.filter(run=run).exists()


def test_cancel_stops_at_a_step_keeps_the_checkpoint_and_retry_resumes(
    tiny_model_path, queue, monkeypatch
):
    monkeypatch.setattr(runner, "CANCEL_CHECK_INTERVAL", 0.0)
    real_row = services._metric_row

    def cancel_after_step_2(run, step, epoch, metrics):
        real_row(run, step, epoch, metrics)
        if step == 2:
            Job.objects.filter(pk=run.job_id).update(cancel_requested=True)

    monkeypatch.setattr(services, "_metric_row", cancel_after_step_2)
    run_data = make_tokenized_run(tiny_model_path, samples=4)
    run = launch(tiny_model_path, [run_data.pk])
    job = run_inline(run)
    run.refresh_from_db()
    assert job.state == JobState.CANCELLED, job.error + job.log
    assert Path(run.last_checkpoint).name == "checkpoint-2" and not run.adapter_path
    assert job.progress_done == 2 and "stopped at step 2" in job.log

    monkeypatch.setattr(services, "_metric_row", real_row)
    job_retry(job_id=job.pk, by=None)
    job = run_inline(run)
    run.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and job.attempt == 2
    assert job.result["resumed_from"] == "checkpoint-2" and job.result["global_step"] == 4
    assert list(run.metrics.values_list("step", flat=True)) == [1, 2, 3, 4]
    assert "resuming from checkpoint-2" in job.log
    assert Path(run.adapter_path, "dail-training.json").is_file()


def _metrics(run, rows):
    for step, (loss, kl_ps, kl_nr) in enumerate(rows, start=1):
        TrainingMetric.objects.create(
            run=run, step=step, epoch=step / 10, loss=loss, kl_privileged=kl_ps,
            kl_negative=kl_nr, lr=1e-4,
        )  # fmt: skip


def test_the_page_warns_when_the_negative_term_dominates(tiny_model_path, queue):
    run = launch(tiny_model_path, [make_tokenized_run(tiny_model_path, samples=1).pk])
    assert selectors.negative_term_warning(run) == ""
    # gamma = 0.1: 0.1 * 3.0 > 0.2 on two steps only, then on three.
    _metrics(run, [(0.5, 0.6, 1.0), (0.0, 0.2, 3.0), (0.0, 0.2, 3.0)])
    assert selectors.negative_term_warning(run) == ""
    TrainingMetric.objects.create(
        run=run, step=4, epoch=0.4, loss=0.01, kl_privileged=0.2, kl_negative=3.0, lr=1e-4
    )
    warning = selectors.negative_term_warning(run)
    assert "dominates" in warning and "last 3 steps" in warning and "step 4" in warning
    # A negative total loss warns at once.
    TrainingMetric.objects.filter(run=run).delete()
    _metrics(run, [(-0.01, 0.5, 0.1)])
    assert "negative" in selectors.negative_term_warning(run)
    # NLL runs have no negative term.
    run.objective = "nll"
    assert selectors.negative_term_warning(run) == ""


# ---- what reviewers accepted, made visible; warm-up that would train nothing ---------------


def flag_traces(run_data) -> dict[str, int]:
    """Give the accepted traces of `make_tokenized_run(problems=2, samples=3)` known flags:
    samples 1 are incorrect and not kept (the factory's), one sample 0 is truncated, one
    sample 2 has no answer. Returns trace ids by role."""
    traces = list(Trace.objects.filter(run=run_data).order_by("run_problem__position", "pk"))
    Trace.objects.filter(run=run_data).update(answer_extracted="3")
    truncated, unanswered = traces[0], traces[5]
    Trace.objects.filter(pk=truncated.pk).update(finish_reason="length")
    Trace.objects.filter(pk=unanswered.pk).update(answer_extracted="", answer_correct=False)
    return {"truncated": truncated.pk, "unanswered": unanswered.pk}


def test_flagged_accepted_traces_are_counted_and_left_out_only_when_chosen(tiny_model_path, queue):
    run_data = make_tokenized_run(tiny_model_path, problems=2, samples=3)
    ids = flag_traces(run_data)
    assert services.accepted_trace_flags(run_ids=[run_data.pk]) == {
        "incorrect": 3,  # the two samples 1 and the unanswered one
        "no_answer": 1,
        "truncated": 1,
        "not_kept": 2,
    }
    # Default: nothing is left out, and the counts are recorded.
    kept_all = launch(tiny_model_path, [run_data.pk])
    assert kept_all.snapshot_traces == 6 and kept_all.data_filter["leave_out"] == []
    assert kept_all.data_filter["left_out_total"] == 0
    assert kept_all.data_filter["flagged"]["incorrect"] == 3

    chosen = services.training_run_launch(
        settings=services.TrainingSettings(
            name="clean",
            base_model_path=str(tiny_model_path),
            run_ids=[run_data.pk],
            config=small_config(max_length=512),
            leave_out=["truncated", "incorrect"],
        ),
        launched_by=make_user("admin"),
    )
    incorrect = set(
        Trace.objects.filter(run=run_data, answer_correct=False).values_list("pk", flat=True)
    )
    left_out = incorrect | {ids["truncated"]}
    assert len(left_out) == 4
    assert set(chosen.trace_ids) == set(kept_all.trace_ids) - left_out
    records = services.read_snapshot(Path(chosen.snapshot_file), chosen.snapshot_sha256)
    assert {r["trace_id"] for r in records} == set(chosen.trace_ids)
    assert chosen.data_filter == {
        "leave_out": ["incorrect", "truncated"],  # in the flags' order
        "flagged": {"incorrect": 3, "no_answer": 1, "truncated": 1, "not_kept": 2},
        "left_out": {"incorrect": 3, "truncated": 1},
        "left_out_total": 4,
    }
    assert chosen.data_filter_rows[0] == ("incorrect answer", 3, 3)
    assert chosen.data_filter_rows[1] == ("no answer found", 1, None)  # kept in


def test_leaving_every_trace_out_or_an_unknown_flag_is_refused(tiny_model_path, queue):
    run_data = make_tokenized_run(tiny_model_path, samples=2)
    Trace.objects.filter(run=run_data).update(answer_correct=False)
    for leave_out, message in ((["incorrect"], "2 accepted but left out"), (["wrong"], "wrong")):
        with pytest.raises(DomainError, match=message):
            services.training_run_plan(
                settings=services.TrainingSettings(
                    "x", str(tiny_model_path), [run_data.pk], small_config(), leave_out
                )
            )
    assert not TrainingRun.objects.exists()


def test_a_warm_up_not_shorter_than_the_planned_steps_is_refused_on_its_field(
    tiny_model_path, queue, artifacts
):
    """Found in review: 2 traces, 1 step of batch 2, 2 warm-up steps: it trained at lr 0."""
    run_data = make_tokenized_run(tiny_model_path, samples=2)
    for warmup in (1, 2):
        with pytest.raises(DomainError, match="1 planned optimizer step") as caught:
            launch(tiny_model_path, [run_data.pk], effective_batch_size=2, warmup_steps=warmup)
        assert "warmup_steps" in caught.value.field_errors
    assert not TrainingRun.objects.exists() and not Job.objects.filter(kind="training").exists()
    assert not (artifacts / "training").exists() or not any((artifacts / "training").iterdir())
    # One warm-up step of two planned: step 2 runs at the full learning rate.
    run = launch(tiny_model_path, [run_data.pk], warmup_steps=1)
    assert run.total_steps == 2


def test_the_plan_says_what_a_launch_would_train_on_and_writes_nothing(
    tiny_model_path, queue, artifacts
):
    run_data = make_tokenized_run(tiny_model_path, problems=2, samples=3)
    flag_traces(run_data)
    plan = services.training_run_plan(
        settings=services.TrainingSettings(
            "x", str(tiny_model_path), [run_data.pk], small_config(epochs=2), ["not_kept"]
        )
    )
    assert (plan.examples_used, plan.left_out_total, plan.planned_steps) == (4, 2, 8)
    assert plan.flag_rows[3] == ("not kept by the run's kept rule", 2, 2)
    assert not TrainingRun.objects.exists() and not (artifacts / "training").exists()


def test_an_adapter_that_did_not_move_is_marked_and_evaluation_warns(tiny_model_path, tmp_path):
    from tests.training.training_factories import make_training_run
    from training.engine.config import DailTrainingConfig
    from training.engine.trainer import load_model_with_lora

    still = tmp_path / "still" / "adapter"
    load_model_with_lora(
        tiny_model_path, DailTrainingConfig(lora_r=4, device="cpu")
    ).save_pretrained(still)
    assert lora_update_norm(still) == 0.0
    # An adapter on disk that no run recorded is measured from its files.
    assert selectors.adapter_did_not_move(str(still))
    run = make_training_run(
        job_state="succeeded", name="never moved", adapter_path=str(still), update_norm=0.0
    )
    moved = make_training_run(
        job_state="succeeded", name="moved", adapter_path=str(tmp_path / "x"), update_norm=0.5
    )
    assert run.did_not_move and not moved.did_not_move
    assert selectors.adapter_did_not_move(str(still)) and not selectors.adapter_did_not_move(
        moved.adapter_path
    )
    assert [r.pk for r in selectors.adapters_that_did_not_move()] == [run.pk]

    from django.test import Client

    client = Client()
    client.force_login(make_user("admin"))
    for url in (f"/training/{run.pk}/", "/training/", "/training/adapters/"):
        page = client.get(url).content.decode()
        assert "did not move" in page, url
        assert f'data-testid="did-not-move-{moved.pk}"' not in page
    page = client.get("/evaluations/new/").content.decode()
    assert 'data-testid="adapters-did-not-move"' in page and str(still) in page
    chosen = client.post("/evaluations/new/", {"adapter_path": str(still)}).content.decode()
    assert 'data-testid="chosen-adapter-did-not-move"' in chosen
