"""Launching expansion runs (no worker): refusals before anything is queued, pinning, chunks."""

from __future__ import annotations

import pytest

from dailweb.errors import DomainError
from dailweb.jobs.models import Job
from expansion.engine.vllm_backend import availability
from expansion.models import ExpansionRun, RunProblem
from expansion.services.runs import RunSettings, expansion_run_launch
from tests.factories import make_dataset, make_problem, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def queue(broker_url, clean_queues):
    """Launching publishes to the test broker; the messages are purged between tests."""


def launch(problems, **settings):
    return expansion_run_launch(
        settings=RunSettings(name="run", model_path="/models/any", **settings),
        problem_ids=[p.pk for p in problems],
        launched_by=make_user("admin"),
    )


def nothing_created() -> bool:
    return not (ExpansionRun.objects.exists() or Job.objects.exists())


def test_problems_without_answers_are_refused_with_the_offenders(queue):
    dataset = make_dataset(kind="verifiable")
    good = make_problem(dataset=dataset, statement="Find $x$ if $x = 1$.", answer="1")
    bad = [
        make_problem(dataset=dataset, statement=f"Find $y$ if $y = {i}$.", answer="")
        for i in range(2)
    ]
    with pytest.raises(DomainError) as caught:
        launch([good, *bad])
    message = caught.value.message
    assert "Nothing was queued: 2 problem(s) cannot be expanded" in message
    for problem in bad:
        assert f"{problem.external_id} (no final answer)" in message
    assert good.external_id not in message
    assert nothing_created()
    # Proof-style use: answers not required.
    run = launch([good, *bad], require_answers=False)
    assert RunProblem.objects.filter(run=run).count() == 3


def test_problems_without_a_solution_are_refused(queue):
    problem = make_problem()
    problem.versions.all().delete()
    with pytest.raises(DomainError, match=rf"{problem.external_id} \(no solution\)"):
        launch([problem])
    assert nothing_created()


def test_vllm_is_refused_where_it_cannot_run(queue, monkeypatch, settings):
    monkeypatch.setattr(availability, "vllm_unavailable_reason", lambda: "vLLM is not installed")
    problem = make_problem()
    with pytest.raises(DomainError, match="vLLM backend cannot run here: vLLM is not installed"):
        launch([problem], backend="vllm")
    assert nothing_created()
    # A web server without vLLM whose GPU workers have it (docker/): launching is allowed.
    settings.VLLM_ON_WORKERS = True
    assert launch([problem], backend="vllm").backend == "vllm"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"backend": "sglang"}, "Unknown backend 'sglang'"),
        ({"samples_per_problem": 0}, "Samples per problem must be between 1 and"),
        ({"chunk_problems": 0}, "Problems per chunk must be between 1 and 1000"),
        ({"chunk_tokens": 0}, "Work per chunk must be between 1 and"),
        ({"rollout": {"tau": 1.5}}, "tau"),
    ],
)
def test_bad_settings_are_refused(queue, settings, message):
    with pytest.raises(DomainError, match=message):
        launch([make_problem()], **settings)
    assert nothing_created()


def test_launch_pins_versions_and_splits_into_gpu_chunks(queue):
    dataset = make_dataset()
    problems = [
        make_problem(dataset=dataset, statement=f"Find $x$ if $x = {i}$.", answer=str(i))
        for i in range(5)
    ]
    run = launch(problems, chunk_problems=2, backend="vllm")
    assert run.backend == "vllm"
    chunks = list(run.chunks.order_by("index"))
    assert [c.run_problems.count() for c in chunks] == [2, 2, 1]
    assert {c.job.queue for c in chunks} == {"gpu"}
    for member in RunProblem.objects.filter(run=run):
        newest = member.problem.versions.order_by("-number").first()
        assert member.solution_version_id == newest.pk
        assert member.partial_solution  # s~ rendered at launch


@pytest.mark.parametrize(
    ("samples", "tokens", "chunk_tokens", "sizes"),
    [
        (2, 64, 256, [2, 2, 2, 1]),  # 2 problems x 2 samples x 64 tokens per chunk
        (4, 64, 256, [1] * 7),  # one problem's work already fills the budget
        (1, 64, 10_000, [7]),
        (2, 100, 399, [1] * 7),  # never zero problems
    ],
)
def test_chunks_are_sized_by_work(queue, samples, tokens, chunk_tokens, sizes):
    problems = [make_problem() for _ in range(7)]
    run = launch(
        problems,
        samples_per_problem=samples,
        rollout={"max_new_tokens": tokens},
        chunk_tokens=chunk_tokens,
    )
    assert [c.run_problems.count() for c in run.chunks.order_by("index")] == sizes
    assert run.chunk_problems == max(1, chunk_tokens // (samples * tokens))  # recorded


def test_launch_command_sizes_chunks_by_work(queue):
    from django.core.management import call_command

    problem = make_problem()
    for _ in range(4):
        make_problem(dataset=problem.dataset)
    call_command(
        "launch_expansion",
        "--dataset",
        problem.dataset.name,
        "--model",
        "/models/any",
        "--samples",
        "2",
        "--rollout",
        '{"max_new_tokens": 100}',
        "--chunk-tokens",
        "400",
    )
    run = ExpansionRun.objects.get()
    assert [c.run_problems.count() for c in run.chunks.order_by("index")] == [2, 2, 1]


# --- Presets and kept rules (recorded with the run) -------------------------------------------


def test_the_default_preset_is_the_release_dail_data_and_is_recorded(queue):
    run = launch([make_problem()])
    assert run.rollout_preset == "release_dail" and run.rollout_config["tau"] == 1.0
    assert run.rollout_overrides == {}
    assert run.rollout_config["top_k"] == 20 and run.rollout_config["temperature"] == 1.0
    assert run.kept_rule == "release"


def test_explicit_settings_override_the_preset_and_both_are_recorded(queue):
    run = launch(
        [make_problem()],
        preset="mixed_policy",
        rollout={"max_draws": 3, "max_new_tokens": 64},
        kept_rule="every_correct",
    )
    assert run.rollout_preset == "mixed_policy"
    assert run.rollout_overrides == {"max_draws": 3, "max_new_tokens": 64}
    config = run.rollout_config
    assert (config["tau"], config["max_draws"], config["max_new_tokens"]) == (0.8, 3, 64)
    assert run.kept_rule == "every_correct"
    assert "prob_threshold_non_reasoning" in run.rollout_preset_description
    assert "every correct trace" in run.kept_rule_description


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"preset": "fastest"}, "unknown preset 'fastest'"), ({"kept_rule": "best"}, "kept rule")],
)
def test_unknown_presets_and_kept_rules_are_refused(queue, settings, message):
    with pytest.raises(DomainError, match=message):
        launch([make_problem()], **settings)
    assert nothing_created()


def test_runs_without_a_recorded_rule_read_as_the_old_behaviour():
    from expansion.engine.answers import kept_rule_description

    assert ExpansionRun._meta.get_field("kept_rule").default == ""
    assert "before kept rules were named" in kept_rule_description("")


def test_the_launch_form_sends_the_preset_and_only_the_fields_typed_over_it():
    from expansion.forms import RunLaunchForm

    data = {
        "name": "r",
        "model_path": "/m",
        "backend": "transformers",
        "samples_per_problem": "2",
        "preset": "pure_learner",
        "tau": "",
        "temperature": "0.7",
        "max_new_tokens": "64",
        "seed": "5",
        "chunk_tokens": "4096",
        "kept_rule": "all",
    }
    form = RunLaunchForm(data)
    assert form.is_valid(), form.errors
    assert form.cleaned_data["preset"] == "pure_learner"
    assert form.rollout_settings() == {"temperature": 0.7, "max_new_tokens": 64, "seed": 5}
    assert form.fields["tau"].widget.attrs["placeholder"] == "preset: 0.0"
    assert "training_file_utils.py" in form.fields["preset"].help_text


def test_launch_expansion_command_takes_a_preset(queue):
    from django.core.management import call_command

    problem = make_problem()
    call_command(
        "launch_expansion",
        "--dataset",
        problem.dataset.name,
        "--model",
        "/models/any",
        "--preset",
        "mixed_policy",
        "--rollout",
        '{"seed": 9}',
        "--kept-rule",
        "every_correct",
    )
    run = ExpansionRun.objects.get()
    assert (run.rollout_preset, run.rollout_overrides) == ("mixed_policy", {"seed": 9})
    assert run.rollout_config["tau"] == 0.8 and run.kept_rule == "every_correct"
