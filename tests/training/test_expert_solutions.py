"""Training on the expert solutions of a dataset (the paper's direct-SFT baseline): the records
come from the current solution versions, boxed where the solution has no box, after the
evaluation's learner prompt; the training side of the held-out split is the complement of the
evaluation's split; refusals before anything is queued; the lineage on the run, the page, the
registry and the adapter's dail-training.json (so an evaluation sees the overlap); the launch
form and `launch_training --expert-solutions`. A tiny model runs one job in this process.

The real embedded model learning the solutions: test_expert_solutions_model.py."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from curation.models import Problem
from curation.services.problems import solution_revise
from dailweb.errors import DomainError
from dailweb.jobs import runner
from dailweb.jobs.models import Job, JobState
from expansion.engine.answers import judge_completion
from tests.factories import make_dataset, make_problem, make_user
from tests.training.training_factories import make_tokenized_run, small_config
from training.engine import evaluation as evaluation_engine
from training.evaluations.services import ProblemSetChoice, evaluation_problem_set, problem_key
from training.models import TrainingRun
from training.services import training as services
from training.services.expert_solutions import (
    ExpertSolutionsChoice,
    boxed_response,
    expert_solution_example,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def artifacts(settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return settings.ARTIFACTS_DIR


@pytest.fixture
def queue(broker_url, clean_queues):
    """Launching publishes to the test broker; no worker takes the messages here."""


def make_problems(count: int, dataset=None):
    dataset = dataset or make_dataset()
    return dataset, [
        make_problem(
            dataset=dataset,
            statement=f"Compute {i} + 1.",
            solution=f"Adding one gives {i + 1}.",
            answer=str(i + 1),
        )
        for i in range(count)
    ]


def expert_settings(
    model_dir, dataset, fraction=None, seed=0, **config
) -> services.TrainingSettings:
    config.setdefault("objective", "nll")
    return services.TrainingSettings(
        name="sft",
        base_model_path=str(model_dir),
        config=small_config(max_length=config.pop("max_length", 512), **config),
        expert_solutions=ExpertSolutionsChoice(
            dataset_id=dataset.pk if dataset else None, held_out_fraction=fraction, split_seed=seed
        ),
    )


def launch(model_dir, dataset, **kwargs) -> TrainingRun:
    return services.training_run_launch(
        settings=expert_settings(model_dir, dataset, **kwargs), launched_by=make_user("admin")
    )


def nothing_queued() -> bool:
    return not TrainingRun.objects.exists() and not Job.objects.filter(kind="training").exists()


# --- Records --------------------------------------------------------------------------------


def test_boxed_response_adds_a_box_the_answer_checker_reads_only_where_there_is_none():
    added, was_added = boxed_response("So $x = 3$.\n", "3")
    assert was_added and added.startswith("So $x = 3$.")
    assert judge_completion(added, "3").correct
    assert not judge_completion("So $x = 3$.", "3").correct  # why the box is added
    own = "Hence $\\boxed{\\frac{1}{2}}$ and we are done."
    assert boxed_response(own, "1/2") == (own, False)


def test_records_are_the_current_solution_versions_boxed(tiny_model_path, queue):
    dataset, problems = make_problems(2)
    solution_revise(problem=problems[1], body="Second thoughts: it is $\\boxed{2}$.")
    run = launch(tiny_model_path, dataset)

    records = services.read_snapshot(Path(run.snapshot_file), run.snapshot_sha256)
    assert [r["problem_pk"] for r in records] == [p.pk for p in problems]
    assert [r["solution_version"] for r in records] == [1, 2]
    assert records[0]["response"] == "Adding one gives 1.\n\nThe final answer is $\\boxed{1}$."
    assert records[1]["response"] == "Second thoughts: it is $\\boxed{2}$."
    assert [r["boxed_added"] for r in records] == [True, False]
    assert all(r["prompt_template"] == evaluation_engine.EVALUATION_TEMPLATE for r in records)

    assert run.objective == "nll" and run.source_runs == [] and run.trace_ids == []
    assert sorted(run.problem_ids) == sorted(p.pk for p in problems)
    assert (run.snapshot_traces, run.examples_used, run.total_steps) == (2, 2, 2)
    assert run.data_filter == {
        "source": "expert_solutions",
        "dataset_id": dataset.pk,
        "dataset": dataset.name,
        "split": None,
        "dataset_problems": 2,
        "held_out": 0,
        "without_solution": 0,
        "without_answer": 0,
        "boxed_added": 1,
        "problems": 2,
    }
    assert services.training_source_description(run) == (
        f"expert solutions of dataset {dataset.name}, all problems, 2 problems"
    )
    assert run.job.queue == "gpu" and run.job.kind == "training"


def test_an_example_is_the_evaluation_prompt_then_the_boxed_solution_and_eos(tiny_model_path):
    from tests.training.training_factories import tokenizer_for

    tokenizer = tokenizer_for(tiny_model_path)
    record = {
        "problem_pk": 7,
        "problem_id": "p7",
        "problem": "Compute 1 + 1.",
        "solution_version": 3,
        "response": "It is $\\boxed{2}$.",
        "prompt_template": evaluation_engine.EVALUATION_TEMPLATE,
        "reasoning": False,
    }
    example = expert_solution_example(record, tokenizer)
    assert list(example.learner_prompt_ids) == evaluation_engine.evaluation_prompt_ids(
        tokenizer, "Compute 1 + 1."
    )
    assert example.is_learner_only and example.example_id == "solution-7-v3"
    assert tokenizer.decode(example.response_ids[:-1]) == record["response"]
    assert example.response_ids[-1] == tokenizer.eos_token_id


def test_the_training_side_is_the_complement_of_the_evaluations_held_out_split(
    tiny_model_path, queue
):
    dataset, problems = make_problems(16)
    run = launch(tiny_model_path, dataset, fraction=0.25, seed=5)
    held_out = evaluation_problem_set(
        ProblemSetChoice(
            split="held_out", dataset_id=dataset.pk, held_out_fraction=0.25, split_seed=5
        )
    )
    held_out_ids = {p.pk for p in held_out}
    assert 0 < len(held_out_ids) < 16
    assert set(run.problem_ids) == {p.pk for p in problems} - held_out_ids
    assert run.data_filter["split"] == {"held_out_fraction": 0.25, "split_seed": 5}
    assert run.data_filter["held_out"] == len(held_out_ids)
    assert all(
        not evaluation_engine.in_held_out_split(problem_key(p), 0.25, 5)
        for p in Problem.objects.filter(pk__in=run.problem_ids)
    )
    assert services.training_source_description(run) == (
        f"expert solutions of dataset {dataset.name}, train side of split (fraction 0.25, "
        f"seed 5), {16 - len(held_out_ids)} problems"
    )


def test_problems_without_a_solution_or_an_answer_to_box_are_left_out_and_counted(
    tiny_model_path, queue
):
    dataset, problems = make_problems(3)
    Problem.objects.filter(pk=problems[0].pk).update(current_version_number=0)  # no version
    Problem.objects.filter(pk=problems[1].pk).update(answer="")  # nothing to box
    run = launch(tiny_model_path, dataset, epochs=1)
    assert run.problem_ids == [problems[2].pk]
    assert (run.data_filter["without_solution"], run.data_filter["without_answer"]) == (1, 1)


def test_learner_only_examples_collate_for_nll_and_are_refused_for_dail():
    from training.engine.data import VIEWS, DailCollator, TrainingExample, views_for

    example = TrainingExample.learner_only((5, 6, 7), (8, 9), example_id="solution-1-v1")
    batch = DailCollator(0, views_for("nll"))([example])
    assert batch["learner_input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["learner_positions"].tolist() == [[2, 3]]
    with pytest.raises(ValueError, match="solution-1-v1 has the learner view only"):
        DailCollator(0, VIEWS)([example])
    with pytest.raises(ValueError, match="both given or both empty"):
        TrainingExample((1,), (2,), (), (3,))


# --- Refusals -------------------------------------------------------------------------------


def test_dail_on_expert_solutions_is_refused(tiny_model_path, queue):
    dataset, _ = make_problems(2)
    with pytest.raises(DomainError, match="cannot train on expert solutions") as caught:
        launch(tiny_model_path, dataset, objective="dail")
    assert "objective" in caught.value.field_errors
    assert nothing_queued()


def test_an_empty_dataset_or_none_chosen_is_refused(tiny_model_path, queue):
    with pytest.raises(DomainError, match="has no problems") as caught:
        launch(tiny_model_path, make_dataset(name="empty"))
    assert caught.value.field_errors == {"dataset": "empty"}
    with pytest.raises(DomainError, match="Choose the dataset"):
        launch(tiny_model_path, None)
    assert nothing_queued()


def test_a_dataset_without_solutions_is_refused(tiny_model_path, queue):
    dataset, problems = make_problems(2)
    Problem.objects.filter(pk__in=[p.pk for p in problems]).update(current_version_number=0)
    with pytest.raises(DomainError, match="No expert solution to train on: .*2 have no solution"):
        launch(tiny_model_path, dataset)
    assert nothing_queued()


def test_a_split_that_leaves_no_training_problem_is_refused(tiny_model_path, queue):
    dataset, problems = make_problems(1)
    seed = next(
        s
        for s in range(100)
        if evaluation_engine.in_held_out_split(problem_key(problems[0]), 0.5, s)
    )
    with pytest.raises(DomainError, match="no training problem is left") as caught:
        launch(tiny_model_path, dataset, fraction=0.5, seed=seed)
    assert "held_out_fraction" in caught.value.field_errors
    with pytest.raises(DomainError, match="fraction must be in \\(0, 1\\)"):
        launch(tiny_model_path, dataset, fraction=1.0)
    assert nothing_queued()


def test_two_data_sources_at_once_are_refused(tiny_model_path, queue):
    dataset, _ = make_problems(1)
    traces = make_tokenized_run(tiny_model_path, samples=1)
    settings = expert_settings(tiny_model_path, dataset)
    both = services.TrainingSettings(**{**settings.__dict__, "run_ids": [traces.pk]})
    with pytest.raises(DomainError, match="Choose one data source"):
        services.training_run_launch(settings=both, launched_by=None)
    assert nothing_queued()


# --- The job, the lineage and the pages -----------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_run_trains_and_records_its_lineage_where_evaluation_reads_it(tiny_model_path, queue):
    dataset, problems = make_problems(8)
    run = launch(tiny_model_path, dataset, fraction=0.25, seed=1)
    job = Job.objects.get(pk=run.job_id)
    runner.job_execute(job_id=job.pk, task_id=job.task_id, hostname="inline@test")
    job.refresh_from_db()
    run.refresh_from_db()
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    assert "snapshot: expert solutions of dataset" in job.log
    assert [m.nll is not None for m in run.metrics.order_by("step")] == [True] * run.total_steps

    trained = evaluation_engine.adapter_training_problem_ids(run.adapter_path)
    assert trained is not None and trained.problem_ids == frozenset(run.problem_ids)
    lineage = json.loads((Path(run.adapter_path) / "dail-training.json").read_text())
    assert lineage["snapshot"]["source"] == services.training_source_description(run)
    assert lineage["snapshot"]["data_filter"]["split"] == {
        "held_out_fraction": 0.25,
        "split_seed": 1,
    }

    client = Client()
    client.force_login(make_user("admin"))
    page = client.get(f"/training/{run.pk}/").content.decode()
    description = services.training_source_description(run)
    assert description[0].upper() + description[1:] in page
    assert "NLL (SFT on the expert solutions)" in page
    registry = client.get("/training/adapters/").content.decode()
    assert description in registry


def test_the_launch_form_launches_a_run_on_expert_solutions(tiny_model_path, queue):
    dataset, problems = make_problems(4)
    defaults = services.training_defaults()
    data = {
        "name": "SFT from the form",
        "data_source": "expert_solutions",
        "dataset": str(dataset.pk),
        "held_out_fraction": "0.5",
        "split_seed": "3",
        "base_model_path": str(tiny_model_path),
        **{k: str(v) for k, v in defaults.items() if not isinstance(v, list | bool | type(None))},
        "objective": "nll",
        "lora_targets": defaults["lora_targets"],
        "max_length": "512",
        "effective_batch_size": "1",
        "micro_batch_size": "1",
        "warmup_steps": "0",
    }
    client = Client()
    client.force_login(make_user("admin"))
    page = client.get("/training/new/").content.decode()
    assert 'value="expert_solutions"' in page and dataset.name in page

    preview = client.post("/training/new/", {**data, "preview": "1"})
    assert preview.status_code == 200
    assert "Expert solutions of dataset" in preview.content.decode()
    assert nothing_queued()

    dail = client.post("/training/new/", {**data, "objective": "dail"})
    assert dail.status_code == 400
    assert "cannot train on expert solutions" in dail.content.decode()
    assert "objective" in dail.context["form"].errors

    response = client.post("/training/new/", data)
    assert response.status_code == 302, response.content.decode()[-2000:]
    run = TrainingRun.objects.get()
    expected = {
        p.pk for p in problems if not evaluation_engine.in_held_out_split(problem_key(p), 0.5, 3)
    }
    assert set(run.problem_ids) == expected
    assert run.data_filter["split"] == {"held_out_fraction": 0.5, "split_seed": 3}


def test_the_form_refuses_a_missing_dataset_with_a_field_error(tiny_model_path, queue):
    client = Client()
    client.force_login(make_user("admin"))
    defaults = services.training_defaults()
    data = {
        "name": "SFT",
        "data_source": "expert_solutions",
        "base_model_path": str(tiny_model_path),
        **{k: str(v) for k, v in defaults.items() if not isinstance(v, list | bool | type(None))},
        "objective": "nll",
        "lora_targets": defaults["lora_targets"],
    }
    response = client.post("/training/new/", data)
    assert response.status_code == 400
    form = response.context["form"]
    assert "Choose the dataset" in " ".join(form.non_field_errors())
    assert form.errors["dataset"] == ["required"]
    assert nothing_queued()


def test_launch_training_command_takes_expert_solutions(tiny_model_path, queue):
    dataset, problems = make_problems(6)
    config = {k: v for k, v in small_config(max_length=512).items() if k != "objective"}
    out = StringIO()
    call_command(
        "launch_training",
        "--expert-solutions", dataset.name,
        "--held-out-fraction", "0.5",
        "--split-seed", "2",
        "--model", str(tiny_model_path),
        "--config", json.dumps(config),
        stdout=out,
    )  # fmt: skip
    run = TrainingRun.objects.get()
    assert run.objective == "nll" and run.name == f"nll on the expert solutions of {dataset.name}"
    assert services.training_source_description(run) in out.getvalue()
    expected = {
        p.pk for p in problems if not evaluation_engine.in_held_out_split(problem_key(p), 0.5, 2)
    }
    assert set(run.problem_ids) == expected

    with pytest.raises(CommandError, match="cannot train on expert solutions"):
        call_command(
            "launch_training", "--expert-solutions", dataset.name, "--objective", "dail",
            "--model", str(tiny_model_path),
        )  # fmt: skip
    with pytest.raises(CommandError, match="no dataset named 'nope'"):
        call_command("launch_training", "--expert-solutions", "nope")
    with pytest.raises(CommandError, match="not allowed with argument"):
        call_command("launch_training", "--expert-solutions", dataset.name, "--runs", "1")
    assert TrainingRun.objects.count() == 1
