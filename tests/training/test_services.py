"""Evaluation services: launch (and every refusal), execution with a real tiny model
(resumable, seeded), judging, rulings, and the metrics the selectors compute."""

from __future__ import annotations

import dataclasses
import json

import pytest

from curation.models import Problem
from dailweb.errors import DomainError
from dailweb.jobs.models import Job
from tests.factories import make_dataset, make_problem, make_user
from tests.training.conftest import write_adapter
from tests.training.factories import make_evaluation
from training.engine import evaluation as engine
from training.evaluations import selectors, services
from training.models import Evaluation, EvaluationSample

pytestmark = pytest.mark.django_db


@pytest.fixture
def queue(broker_url, clean_queues):
    """Launching publishes to the test broker; the messages are purged between tests."""


def problems(count: int = 3, dataset=None, answers=None):
    dataset = dataset or make_dataset()
    return dataset, [
        make_problem(
            dataset=dataset,
            statement=f"Find $x$ if $x = {i}$.",
            answer=(answers or {}).get(i, str(i)),
        )
        for i in range(count)
    ]


def launch(base, dataset=None, **overrides):
    choice = overrides.pop("problem_set", None) or services.ProblemSetChoice(dataset_id=dataset.pk)
    values = {
        "name": "eval",
        "base_model_path": str(base),
        "problem_set": choice,
        "samples_per_problem": 4,
        "ks": [1, 2, 4],
        "budgets": [4, 8],
        "temperature": 1.0,
        "top_p": 1.0,
        "batch_size": 2,
    } | overrides
    return services.evaluation_launch(
        settings=services.EvaluationSettings(**values), launched_by=make_user("admin")
    )


def nothing_created() -> bool:
    return not Evaluation.objects.exists() and not Job.objects.exists()


# --- Launch ------------------------------------------------------------------------------------


def test_launch_pins_problems_and_answers_and_queues_one_gpu_job(queue, tiny_model_path):
    dataset, chosen = problems(3)
    evaluation = launch(tiny_model_path, dataset)
    assert [m.problem_id for m in evaluation.problems.order_by("position")] == [
        p.pk for p in chosen
    ]
    assert [m.answer for m in evaluation.problems.order_by("position")] == ["0", "1", "2"]
    assert evaluation.job.queue == "gpu" and evaluation.job.kind == services.EVALUATION_KIND
    assert evaluation.job.params == {"evaluation_id": evaluation.pk}
    assert (evaluation.ks, evaluation.budgets, evaluation.max_new_tokens) == ([1, 2, 4], [4, 8], 8)
    assert evaluation.split == "all" and evaluation.split_params == {"limit": None}
    assert evaluation.base_model_path == str(tiny_model_path.resolve())


def test_held_out_split_is_recorded_and_selects_by_seeded_hash(queue, tiny_model_path):
    dataset, chosen = problems(12)
    choice = services.ProblemSetChoice(
        split="held_out", dataset_id=dataset.pk, held_out_fraction=0.5, split_seed=3
    )
    evaluation = launch(tiny_model_path, problem_set=choice)
    expected = [p.pk for p in chosen if engine.in_held_out_split(services.problem_key(p), 0.5, 3)]
    assert 0 < len(expected) < 12
    assert sorted(evaluation.problems.values_list("problem_id", flat=True)) == sorted(expected)
    assert evaluation.split_params == {"limit": None, "fraction": 0.5, "seed": 3}


def test_listed_ids_are_checked(queue, tiny_model_path):
    dataset, chosen = problems(3)
    choice = services.ProblemSetChoice(
        split="ids", dataset_id=dataset.pk, problem_ids=f"{chosen[2].external_id}, nope"
    )
    with pytest.raises(DomainError, match="Unknown problem ids.*nope"):
        launch(tiny_model_path, problem_set=choice)
    choice = services.ProblemSetChoice(split="ids", problem_ids=chosen[2].external_id)
    evaluation = launch(tiny_model_path, problem_set=choice)
    assert list(evaluation.problems.values_list("problem_id", flat=True)) == [chosen[2].pk]
    assert evaluation.split_params["external_ids"] == [chosen[2].external_id]


def test_a_problem_set_without_answers_is_refused(queue, tiny_model_path):
    dataset, chosen = problems(3)
    Problem.objects.filter(pk=chosen[1].pk).update(answer="")
    with pytest.raises(
        DomainError, match=f"1 problem\\(s\\) have no answer: {chosen[1].external_id}"
    ):
        launch(tiny_model_path, dataset)
    assert nothing_created()


def test_a_proof_dataset_is_refused(queue, tiny_model_path):
    dataset, _ = problems(2, dataset=make_dataset(kind="proof"))
    with pytest.raises(DomainError, match="holds proofs"):
        launch(tiny_model_path, dataset)
    assert nothing_created()


def test_k_larger_than_n_is_refused(queue, tiny_model_path):
    dataset, _ = problems(2)
    with pytest.raises(DomainError, match="k = 8 is larger than n = 4") as caught:
        launch(tiny_model_path, dataset, ks=[1, 8])
    assert "ks" in caught.value.field_errors
    assert nothing_created()


def test_a_missing_base_model_or_adapter_gets_a_clear_error(queue, tiny_model_path, tmp_path):
    dataset, _ = problems(2)
    with pytest.raises(DomainError, match="No base model at .*does not exist"):
        launch(tmp_path / "missing-model", dataset)
    with pytest.raises(DomainError, match="No adapter at .*does not exist") as caught:
        launch(tiny_model_path, dataset, adapter_path=str(tmp_path / "missing-adapter"))
    assert "adapter_path" in caught.value.field_errors
    assert nothing_created()


def test_an_adapter_of_another_base_model_is_refused(queue, tiny_model_path, tmp_path):
    dataset, _ = problems(2)
    other = tmp_path / "other-base"
    other.mkdir()
    adapter = write_adapter(tmp_path / "adapter", other)
    with pytest.raises(
        DomainError, match="belongs to the base model .*other-base, not to the chosen"
    ):
        launch(tiny_model_path, dataset, adapter_path=str(adapter))
    assert nothing_created()
    # The same adapter pointed at the right base model is accepted (paths compared resolved).
    write_adapter(adapter, tiny_model_path.parent / "." / tiny_model_path.name)
    assert launch(tiny_model_path, dataset, adapter_path=str(adapter)).adapter_path == str(adapter)


def test_problems_from_the_adapters_training_data_are_refused_or_flagged(
    queue, tiny_model_path, tiny_adapter_path
):
    dataset, chosen = problems(3)
    snapshot = tiny_adapter_path.parent / "dail-training.json"
    snapshot.write_text(json.dumps({"problem_ids": [chosen[1].pk, 999999]}))
    with pytest.raises(
        DomainError,
        match=f"1 of the 3 problems were in this adapter's training data.*{chosen[1].external_id}",
    ):
        launch(tiny_model_path, dataset, adapter_path=str(tiny_adapter_path))
    assert nothing_created()
    evaluation = launch(
        tiny_model_path, dataset, adapter_path=str(tiny_adapter_path), allow_training_overlap=True
    )
    assert (evaluation.training_overlap, evaluation.overlap_allowed) == (1, True)
    assert evaluation.training_snapshot == str(snapshot)
    flagged = evaluation.problems.filter(in_training=True)
    assert list(flagged.values_list("problem_id", flat=True)) == [chosen[1].pk]
    assert "training data" in " ".join(selectors.evaluation_comparison([evaluation.pk]).warnings)


def test_vllm_is_refused_with_the_reason_where_it_cannot_run(queue, tiny_model_path, monkeypatch):
    from expansion.engine.vllm_backend import availability

    monkeypatch.setattr(
        availability, "vllm_unavailable_reason", lambda: "vLLM is not installed here"
    )
    dataset, _ = problems(1)
    with pytest.raises(
        DomainError, match="vllm backend cannot run evaluations: vLLM is not installed here"
    ):
        launch(tiny_model_path, dataset, backend="vllm")
    assert nothing_created()


# --- Execution ---------------------------------------------------------------------------------


class Stop(Exception):
    pass


def stored(evaluation) -> dict[tuple[int, int], tuple[int, str, int]]:
    return {
        (s.eval_problem.position, s.sample_index): (s.pk, s.text, s.token_count)
        for s in EvaluationSample.objects.filter(
            eval_problem__evaluation=evaluation
        ).select_related("eval_problem")
    }


def counting_calls(monkeypatch) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Spy on the engine's sampling (the real function still runs): each call's units."""
    calls = []
    real = engine.generate_completions

    def counting(backend, model, tokenizer, units, **kwargs):
        calls.append([(unit.key.split("/")[1], unit.sample_indices) for unit in units])
        return real(backend, model, tokenizer, units, **kwargs)

    monkeypatch.setattr(engine, "generate_completions", counting)
    return calls


def test_execution_batches_problems_stores_every_sample_and_resumes(
    queue, tiny_model_path, monkeypatch, settings
):
    """Units (a problem's batch of 2 samples) are packed into calls of up to 8 sequences:
    3 problems take 2 calls. Interrupted after the first call, the retry samples only the
    missing problem's units."""
    settings.EVALUATION_MAX_BATCH_SIZE = 8
    dataset, chosen = problems(3)
    ids = [p.external_id for p in chosen]
    calls = counting_calls(monkeypatch)
    reference = launch(tiny_model_path, dataset, name="uninterrupted")
    stages = []
    services.evaluation_execute(
        evaluation_id=reference.pk, progress=lambda d, t, s: stages.append(s), log=lambda m: None
    )
    assert calls == [
        [(f"{ids[0]}#0", (0, 1)), (f"{ids[0]}#1", (2, 3)), (f"{ids[1]}#0", (0, 1)),
         (f"{ids[1]}#1", (2, 3))],
        [(f"{ids[2]}#0", (0, 1)), (f"{ids[2]}#1", (2, 3))],
    ]  # fmt: skip
    assert any(stage.startswith("call 1/2: 2 problems") for stage in stages)
    full = stored(reference)
    assert len(full) == 12  # every sample once (the unique constraint would refuse a second)
    assert all(0 <= tokens <= 8 for _, _, tokens in full.values())

    # Interrupted after the first call, as a cancel would stop it.
    resumed = launch(tiny_model_path, dataset, name="interrupted")
    seen = []

    def stop_after_first_call(done, total, stage):
        seen.append((done, total))
        if done >= 8:
            raise Stop

    calls.clear()
    with pytest.raises(Stop):
        services.evaluation_execute(
            evaluation_id=resumed.pk, progress=stop_after_first_call, log=lambda m: None
        )
    partial = stored(resumed)
    assert sorted(partial) == [(p, i) for p in (0, 1) for i in range(4)]
    assert seen[-1] == (8, 12)

    calls.clear()
    progress = []
    logged = []
    summary = services.evaluation_execute(
        evaluation_id=resumed.pk,
        progress=lambda d, t, s: progress.append((d, t)),
        log=logged.append,
    )
    assert calls == [[(f"{ids[2]}#0", (0, 1)), (f"{ids[2]}#1", (2, 3))]]  # only the missing
    assert progress[0] == (8, 12) and progress[-1] == (12, 12)
    assert summary["sampled_now"] == 4 and summary["samples"] == 12
    assert [m.split(" ")[0] for m in logged[1:]] == [ids[2]]  # one line per problem sampled
    after = stored(resumed)
    assert all(after[key][0] == partial[key][0] for key in partial)  # earlier rows untouched
    # The retry's call holds the same units as the uninterrupted run's second call, so it has
    # the same seed and the same samples (a call is seeded by the units it holds).
    assert {k: v[1:] for k, v in after.items()} == {k: v[1:] for k, v in full.items()}

    calls.clear()
    again = services.evaluation_execute(
        evaluation_id=resumed.pk, progress=lambda *a: None, log=lambda m: None
    )
    assert calls == [] and again["sampled_now"] == 0


def test_a_cancel_mid_call_stores_none_of_the_call(queue, tiny_model_path, monkeypatch):
    dataset, _ = problems(2)
    evaluation = launch(tiny_model_path, dataset)

    def cancel_mid_call(done, total, stage):
        if stage.startswith("call 1/1") and done == 0 and cancel_mid_call.steps == 3:
            raise Stop
        cancel_mid_call.steps += 1

    cancel_mid_call.steps = 0
    with pytest.raises(Stop):
        services.evaluation_execute(
            evaluation_id=evaluation.pk, progress=cancel_mid_call, log=lambda m: None
        )
    assert stored(evaluation) == {}


def test_a_missing_sample_is_redrawn_and_its_batch_mate_kept(queue, tiny_model_path, monkeypatch):
    """Semantics on transformers: the retry's call holds only the missing unit, so its seed
    (and the redrawn sample) differs from the first call's; only the missing sample is
    stored."""
    dataset, _ = problems(1)
    evaluation = launch(tiny_model_path, dataset)
    services.evaluation_execute(
        evaluation_id=evaluation.pk, progress=lambda *a: None, log=lambda m: None
    )
    before = stored(evaluation)
    EvaluationSample.objects.filter(eval_problem__evaluation=evaluation, sample_index=3).delete()
    calls = counting_calls(monkeypatch)
    summary = services.evaluation_execute(
        evaluation_id=evaluation.pk, progress=lambda *a: None, log=lambda m: None
    )
    assert [[indices for _, indices in call] for call in calls] == [[(2, 3)]]
    assert summary["sampled_now"] == 1
    after = stored(evaluation)
    assert sorted(after) == sorted(before)
    assert all(after[k] == before[k] for k in before if k != (0, 3))  # batch-mate kept


def test_execution_with_an_adapter(queue, tiny_model_path, tiny_adapter_path):
    dataset, _ = problems(1)
    base = launch(tiny_model_path, dataset, name="base", samples_per_problem=2, ks=[1, 2])
    tuned = launch(
        tiny_model_path,
        dataset,
        name="tuned",
        samples_per_problem=2,
        ks=[1, 2],
        adapter_path=str(tiny_adapter_path),
    )
    for evaluation in (base, tuned):
        services.evaluation_execute(
            evaluation_id=evaluation.pk, progress=lambda *a: None, log=lambda m: None
        )
    assert len(stored(tuned)) == 2
    # The adapter changes the weights, so the same seeds give different samples.
    assert [v[1:] for v in stored(tuned).values()] != [v[1:] for v in stored(base).values()]


def test_samples_are_judged_and_a_ruling_overrides_the_checkers(
    queue, tiny_model_path, monkeypatch
):
    dataset, _ = problems(2, answers={0: "1/2", 1: "C(10, 5), or equivalently 252"})
    scripted = {
        "1/2": ["so \\boxed{\\frac{1}{2}}", "\\boxed{1/2}", "no box", "\\boxed{3}"],
        "C(10, 5), or equivalently 252": [
            "\\boxed{252}",
            "\\boxed{251}",
            "\\boxed{\\binom{10}{5}}",
            "hmm",
        ],
    }

    def fake_generate(backend, model, tokenizer, units, *, settings, on_step=None):
        return [
            [
                engine.Completion(i, scripted[answers[unit.prompt_ids]][i], 3 + i, "eos")
                for i in unit.sample_indices
            ]
            for unit in units
        ]

    answers = {}  # prompt ids -> the problem's answer
    real_prompt = engine.evaluation_prompt_ids

    def remember_answer(tokenizer, problem, template, reasoning):
        ids = real_prompt(tokenizer, problem, template, reasoning)
        answers[tuple(ids)] = Problem.objects.get(statement=problem).answer
        return ids

    monkeypatch.setattr(engine, "generate_completions", fake_generate)
    monkeypatch.setattr(engine, "evaluation_prompt_ids", remember_answer)
    evaluation = launch(tiny_model_path, dataset)
    summary = services.evaluation_execute(
        evaluation_id=evaluation.pk, progress=lambda *a: None, log=lambda m: None
    )
    samples = {
        (s.eval_problem.position, s.sample_index): s
        for s in EvaluationSample.objects.select_related("eval_problem")
    }
    assert [samples[(0, i)].auto_correct for i in range(4)] == [True, True, False, False]
    assert [samples[(1, i)].auto_correct for i in range(4)] == [True, False, True, False]
    assert samples[(0, 0)].checkers_disagree  # only math-verify saw \frac{1}{2} = 1/2
    assert not samples[(0, 2)].has_answer and samples[(0, 2)].answer_extracted == ""
    assert summary["auto_correct"] == 4

    before = selectors.evaluation_result(evaluation).metrics
    assert before.overall.overall[1].value == pytest.approx(0.5)
    reviewer = make_user("reviewer")
    services.evaluation_sample_rule(
        sample_id=samples[(0, 3)].pk, ruling="correct", note="3 is fine here", by=reviewer
    )
    result = selectors.evaluation_result(evaluation)
    assert result.metrics.overall.overall[1].value == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert (result.rulings, result.overturned) == (1, 1)
    services.evaluation_sample_rule(sample_id=samples[(0, 0)].pk, ruling="incorrect", by=reviewer)
    assert selectors.evaluation_result(evaluation).pending_rulings == result.pending_rulings - 1
    services.evaluation_sample_rule(sample_id=samples[(0, 3)].pk, ruling="", by=reviewer)
    cleared = EvaluationSample.objects.get(pk=samples[(0, 3)].pk)
    assert (cleared.ruling, cleared.ruled_by, cleared.correct) == ("", None, False)
    with pytest.raises(DomainError, match="Unknown ruling"):
        services.evaluation_sample_rule(sample_id=cleared.pk, ruling="maybe", by=reviewer)


# --- Selectors ---------------------------------------------------------------------------------


def test_results_count_budgets_and_leave_incomplete_problems_out():
    evaluation = make_evaluation(problems=2, samples=2, tokens=lambda p, s: 10 if s == 0 else 40)
    result = selectors.evaluation_result(evaluation)
    assert (result.samples, result.correct_samples, result.complete_problems) == (4, 2, 2)
    assert result.metrics.by_budget[16].overall[1].value == pytest.approx(0.5)
    assert result.metrics.overall.overall[2].value == pytest.approx(1.0)

    late = make_evaluation(
        problems=1, samples=2, correct=lambda p, s: False, tokens=lambda p, s: 100
    )
    EvaluationSample.objects.filter(eval_problem__evaluation=late, sample_index=1).delete()
    partial = selectors.evaluation_result(late)
    assert partial.metrics is None and partial.complete_problems == 0 and partial.samples == 1


def test_comparison_warns_about_different_problem_sets_and_exports():
    first = make_evaluation(problems=2, samples=2)
    second = make_evaluation(problems=1, samples=2, temperature=1.0)
    comparison = selectors.evaluation_comparison([first.pk, second.pk, 999999])
    assert [r.evaluation.pk for r in comparison.results] == [first.pk, second.pk]
    assert any("different problem sets" in w for w in comparison.warnings)
    assert any("Different temperature" in w for w in comparison.warnings)
    assert len(comparison.problems) == 3 and comparison.problems[0]["rows"].count(None) == 1
    rows = selectors.export_rows(comparison)
    overall = [r for r in rows if r["scope"] == "overall" and r["evaluation_id"] == first.pk]
    assert [(r["k"], r["pass_at_k"]) for r in overall] == [
        (1, pytest.approx(0.5)),
        (2, pytest.approx(1.0)),
    ]
    assert {r["budget"] for r in rows if r["scope"] == "budget"} == {16, 64}
    document = selectors.export_document(comparison)
    json.dumps(document)
    assert document["evaluations"][1]["metrics"]["problems"] == 1


# --- Protocols -----------------------------------------------------------------------------------


def test_launch_records_the_protocol_and_refuses_unknown_ones(queue, tiny_model_path):
    dataset, _ = problems(2)
    assert launch(tiny_model_path, dataset).protocol == "workbench"
    release = launch(tiny_model_path, dataset, protocol="release")
    assert release.protocol == "release" and "presence_penalty=1.5" in release.protocol_description
    count = Evaluation.objects.count()
    with pytest.raises(DomainError, match="unknown protocol 'paper'"):
        launch(tiny_model_path, dataset, protocol="paper")
    assert Evaluation.objects.count() == count


def test_release_protocol_execution_stores_the_forced_tokens(queue, tiny_model_path):
    """The tiny random model never boxes: every sample gets the force-answer pass, whose
    tokens are stored with the sample (and counted in its tokens, not in its budget)."""
    dataset, _ = problems(1)
    evaluation = launch(tiny_model_path, dataset, protocol="release", samples_per_problem=2, ks=[1])
    services.evaluation_execute(
        evaluation_id=evaluation.pk, progress=lambda *a: None, log=lambda m: None
    )
    samples = list(EvaluationSample.objects.filter(eval_problem__evaluation=evaluation))
    assert len(samples) == 2 and all(s.forced_tokens > 0 for s in samples)
    assert all("The final answer (in \\boxed{}):" in s.text for s in samples)
    assert not any(s.has_answer and not s.answer_extracted for s in samples)
    result = selectors.evaluation_result(evaluation)
    assert result.forced == 2 and result.forced_tokens == sum(s.forced_tokens for s in samples)


def test_comparison_flags_evaluations_under_different_protocols():
    first = make_evaluation(problems=1, samples=2)
    second = make_evaluation(problems=1, samples=2, protocol="release", on_problems=None)
    comparison = selectors.evaluation_comparison([first.pk, second.pk])
    assert any("Not comparable" in w and "release, workbench" in w for w in comparison.warnings)
    same = selectors.evaluation_comparison([first.pk, make_evaluation(problems=1).pk])
    assert not any("protocol" in w for w in same.warnings)


def test_launch_records_top_k_and_the_sampler_gets_it(queue, tiny_model_path, monkeypatch):
    dataset, _ = problems(1)
    assert launch(tiny_model_path, dataset).top_k is None  # unset: no top-k cut
    evaluation = launch(tiny_model_path, dataset, top_k=20, samples_per_problem=2, ks=[1])
    evaluation.refresh_from_db()
    assert evaluation.top_k == 20
    seen = []
    real = engine.generate_completions

    def recording(backend, model, tokenizer, units, *, settings, **kwargs):
        seen.append(settings.top_k)
        return real(backend, model, tokenizer, units, settings=settings, **kwargs)

    monkeypatch.setattr(engine, "generate_completions", recording)
    services.evaluation_execute(
        evaluation_id=evaluation.pk, progress=lambda *a: None, log=lambda m: None
    )
    assert seen and set(seen) == {20}
    count = Evaluation.objects.count()
    for bad in (0, 1001):
        with pytest.raises(DomainError, match="top_k"):
            launch(tiny_model_path, dataset, top_k=bad)
    assert Evaluation.objects.count() == count


def test_comparison_flags_evaluations_with_different_top_k():
    first = make_evaluation(problems=1, samples=2)
    second = make_evaluation(problems=1, samples=2, top_k=20, on_problems=None)
    comparison = selectors.evaluation_comparison([first.pk, second.pk])
    assert "Different top-k: 20, none." in comparison.warnings
    assert len(comparison.results) == 2  # still compared, with the warning
    same = selectors.evaluation_comparison([first.pk, make_evaluation(problems=1).pk])
    assert not any("top-k" in w for w in same.warnings)


def test_generated_text_with_nul_bytes_is_stored(queue, tiny_model_path, monkeypatch):
    """A model can emit NUL (a byte-fallback token); PostgreSQL text columns refuse it, which
    failed the whole evaluation. It is stored as U+FFFD, and the answer is still judged."""
    dataset, _ = problems(1, answers={0: "7"})
    real = engine.generate_completions
    generated: dict[int, str] = {}

    def with_nul(backend, model, tokenizer, units, **kwargs):
        out = []
        for completions in real(backend, model, tokenizer, units, **kwargs):
            out.append([])
            for c in completions:
                generated[c.sample_index] = f"\x00{c.text}\x00 so \\boxed{{7}}, \\boxed{{7\x00}}"
                out[-1].append(dataclasses.replace(c, text=generated[c.sample_index]))
        return out

    monkeypatch.setattr(engine, "generate_completions", with_nul)
    evaluation = launch(tiny_model_path, dataset, samples_per_problem=2, ks=[1, 2])
    services.evaluation_execute(
        evaluation_id=evaluation.pk, progress=lambda *a: None, log=lambda m: None
    )
    samples = list(EvaluationSample.objects.filter(eval_problem__evaluation=evaluation))
    assert len(samples) == 2
    for sample in samples:
        assert sample.text == generated[sample.sample_index].replace("\x00", "\ufffd")
        assert sample.answer_extracted == "7\ufffd"  # the last box, stored as read
