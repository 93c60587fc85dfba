"""The evaluation engine: sampling (batched, seeded, token counts), budget truncation, answer
judging (incl. CHAMP's free-form answers), metric assembly, adapters and splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.engine import evaluation as ev
from training.engine.metrics import pass_at_k

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("single_torch_thread")]

# Model seed 7 ends some samples with EOS and runs others to the limit (both branches).
MODEL_SEED = 7


@pytest.fixture
def model(tiny_model_factory):
    return tiny_model_factory(torch.float32, seed=MODEL_SEED)


def settings(**overrides) -> ev.SamplingSettings:
    values = {"samples": 8, "max_new_tokens": 32, "temperature": 1.0, "top_p": 1.0, "batch_size": 8}
    return ev.SamplingSettings(**(values | overrides))


def sample(model, tokenizer, indices=range(8), seed=1, **overrides):
    prompt = ev.evaluation_prompt_ids(tokenizer, "What is $1 + 1$?")
    return ev.generate_completions(
        "transformers", model, tokenizer, prompt, indices, settings=settings(**overrides), seed=seed
    )


# --- Sampling ---------------------------------------------------------------------------------


def test_prompt_is_the_learner_view_asking_for_a_boxed_answer(tiny_tokenizer):
    text = tiny_tokenizer.decode(ev.evaluation_prompt_ids(tiny_tokenizer, "Find $x$."))
    assert text.startswith("<|im_start|>user\n## Problem:\nFind $x$.")
    assert "Put your final answer within \\boxed{}." in text
    assert text.endswith("<|im_start|>assistant\n")


def test_token_counts_stop_at_the_first_eos(model, tiny_tokenizer):
    completions = sample(model, tiny_tokenizer)
    assert [c.sample_index for c in completions] == list(range(8))
    reasons = {c.finish_reason for c in completions}
    assert reasons == {"eos", "length"}, "the fixture should exercise both endings"
    for c in completions:
        if c.finish_reason == "length":
            assert c.token_count == 32
        else:
            assert c.token_count < 32
        # The counted tokens hold no EOS, and the text is exactly their decoding.
        assert len(c.token_ids) == c.token_count
        assert tiny_tokenizer.eos_token_id not in c.token_ids
        assert c.text == tiny_tokenizer.decode(list(c.token_ids), skip_special_tokens=True)


def test_sampling_is_seeded_per_batch(model, tiny_tokenizer):
    first = sample(model, tiny_tokenizer, seed=7)
    again = sample(model, tiny_tokenizer, seed=7)
    other = sample(model, tiny_tokenizer, seed=8)
    assert [c.text for c in first] == [c.text for c in again]
    assert [c.text for c in first] != [c.text for c in other]


def test_batch_seeds_and_batches_are_stable():
    assert ev.sample_batches(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert ev.batch_seed(0, "1/a", 2) == ev.batch_seed(0, "1/a", 2)
    assert len({ev.batch_seed(0, "1/a", b) for b in range(3)}) == 3
    assert ev.batch_seed(0, "1/a", 0) != ev.batch_seed(1, "1/a", 0)


def test_a_lower_budget_is_a_prefix_of_the_full_generation(model, tiny_tokenizer):
    """Generating once at the largest budget and truncating equals generating at the lower
    budget: same tokens up to it, and the samples that finished within it are identical."""
    full = sample(model, tiny_tokenizer, max_new_tokens=32)
    short = sample(model, tiny_tokenizer, max_new_tokens=12)
    finished_early = [f for f in full if f.token_count <= 12 and f.finish_reason == "eos"]
    assert finished_early, "the fixture should have a sample that ends within 12 tokens"
    for f, s in zip(full, short, strict=True):
        if f.finish_reason == "eos" and f.token_count <= 12:
            assert (s.token_ids, s.text, s.finish_reason) == (f.token_ids, f.text, "eos")
        else:
            assert s.finish_reason == "length" and s.token_count == 12
            assert s.token_ids == f.token_ids[:12]


def test_each_step_is_reported_and_can_stop_the_batch(model, tiny_tokenizer):
    steps = []
    prompt = ev.evaluation_prompt_ids(tiny_tokenizer, "x")
    ev.generate_completions(
        "transformers", model, tiny_tokenizer, prompt, range(2), settings=settings(max_new_tokens=5),
        seed=0, on_step=steps.append,
    )  # fmt: skip
    assert steps == [1, 2, 3, 4, 5]

    class Stop(Exception):
        pass

    def cancel(step: int) -> None:
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        ev.generate_completions(
            "transformers", model, tiny_tokenizer, prompt, range(2), settings=settings(),
            seed=0, on_step=cancel,
        )  # fmt: skip


def test_unknown_backends_are_refused_and_vllm_reports_why_it_is_missing(
    model, tiny_tokenizer, monkeypatch
):
    with pytest.raises(ev.BackendUnavailableError, match="unknown backend 'tgi'"):
        ev.generate_completions(
            "tgi", model, tiny_tokenizer, [1, 2], [0], settings=settings(), seed=0
        )
    assert ev.backend_unavailable_reason("transformers") == ""
    # Whether vLLM is installed here or not, the engine passes on the installation's own answer.
    monkeypatch.setattr(ev, "vllm_unavailable_reason", lambda: "vLLM is not installed")
    assert ev.backend_unavailable_reason("vllm") == "vLLM is not installed"
    monkeypatch.setattr(ev, "vllm_unavailable_reason", lambda: "")
    assert ev.backend_unavailable_reason("vllm") == ""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"samples": 0}, "samples"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": 0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_sampling_settings_are_refused(overrides, message):
    with pytest.raises(ev.EvaluationError, match=message):
        settings(**overrides)


def test_k_larger_than_n_is_refused():
    assert ev.validate_ks([4, 1, 2, 2], 4) == [1, 2, 4]
    with pytest.raises(ev.EvaluationError, match="k = 8 is larger than n = 4"):
        ev.validate_ks([1, 8], 4)
    with pytest.raises(ev.EvaluationError):
        ev.validate_ks([], 4)
    assert ev.validate_budgets([512, 128, 512]) == [128, 512]
    with pytest.raises(ev.EvaluationError):
        ev.validate_budgets([0, 16])


# --- Answers ------------------------------------------------------------------------------------

EQUIVALENT = [
    ("252", "C(10, 5), or equivalently 252"),
    ("\\binom{10}{5}", "C(10, 5), or equivalently 252"),
    ("C(10,5)", "C(10, 5), or equivalently 252"),
    ("2^{n-1}", "2^(n-1)"),
    ("2^(n-1)", "2^(n-1)"),
    ("\\text{No}", "No"),
    ("No, it is not possible.", "No"),
    ("yes", "Yes"),
    ("239", "239"),
    ("\\frac{1}{2}", "1/2"),
    ("0.5", "\\frac{1}{2}"),
    ("x = 3", "3"),
    ("\\dfrac{\\sqrt{2}}{2}", "\\frac{\\sqrt{2}}{2}"),
    ("n+1", "1+n"),
]
NOT_EQUIVALENT = [
    ("251", "C(10, 5), or equivalently 252"),
    ("2^{n}", "2^(n-1)"),
    ("2^{n+1}", "2^(n-1)"),
    ("Yes", "No"),
    ("Not possible", "No"),
    ("Nope", "No"),
    ("238", "239"),
    ("(1, 2)", "(2, 1)"),
    ("\\frac{1}{3}", "0.5"),
]


@pytest.mark.parametrize(("predicted", "expected"), EQUIVALENT)
def test_equivalent_answers_are_correct(predicted, expected):
    assert ev.judge_answer(predicted, expected).correct


@pytest.mark.parametrize(("predicted", "expected"), NOT_EQUIVALENT)
def test_different_answers_are_not(predicted, expected):
    verdict = ev.judge_answer(predicted, expected)
    assert not verdict.correct
    assert not verdict.disagreement


def test_champ_alternatives_are_split():
    assert ev.answer_alternatives("C(10, 5), or equivalently 252") == [
        "C(10, 5)",
        "\\binom{10}{5}",
        "252",
    ]
    assert ev.answer_alternatives("2^(n-1)") == ["2^(n-1)"]


def test_disagreements_are_flagged_for_a_person():
    only_symbolic = ev.judge_answer("\\frac{1}{2}", "0.5")
    assert only_symbolic.correct and only_symbolic.math_verify and not only_symbolic.string_match
    assert only_symbolic.disagreement
    both = ev.judge_answer("3", "3")
    assert both.correct and not both.disagreement


def test_completions_are_judged_by_their_last_box():
    verdict = ev.judge_completion("First \\boxed{3}, no wait: \\boxed{2^{n-1}}.", "2^(n-1)")
    assert verdict.predicted == "2^{n-1}" and verdict.correct
    missing = ev.judge_completion("I think it is 252.", "252")
    assert missing.predicted is None and not missing.correct and not missing.disagreement


# --- Metrics ------------------------------------------------------------------------------------


def outcome(correct: bool, tokens: int) -> ev.SampleOutcome:
    return ev.SampleOutcome(correct=correct, tokens=tokens)


def test_metrics_per_budget_count_only_samples_within_it():
    outcomes = {
        "a": [outcome(True, 10), outcome(True, 30), outcome(False, 5), outcome(False, 48)],
        "b": [outcome(False, 48), outcome(False, 48), outcome(True, 47), outcome(False, 2)],
    }
    metrics = ev.evaluation_metrics(outcomes, ks=[1, 2], budgets=[48, 16], resamples=200)
    assert metrics.budgets == (16, 48)
    assert metrics.problems["a"].correct_by_budget == {16: 1, 48: 2}
    assert metrics.problems["b"].correct_by_budget == {16: 0, 48: 1}
    at_16 = metrics.by_budget[16].overall[2].value
    assert at_16 == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(4, 0, 2)) / 2)
    at_48 = metrics.by_budget[48].overall[1].value
    assert at_48 == pytest.approx((2 / 4 + 1 / 4) / 2)
    # The largest budget is max_new_tokens: every sample fits, so it equals the overall curve.
    assert metrics.overall.overall[2].value == metrics.by_budget[48].overall[2].value
    assert metrics.mean_tokens == pytest.approx(sum([10, 30, 5, 48, 48, 48, 47, 2]) / 8)
    assert metrics.mean_tokens_correct == pytest.approx((10 + 30 + 47) / 3)
    assert (metrics.samples, metrics.correct_samples) == (8, 3)
    for report in (metrics.overall, *metrics.by_budget.values()):
        for estimate in report.overall.values():
            assert estimate.low <= estimate.value <= estimate.high


def test_metrics_serialise_for_charts_and_exports():
    outcomes = {
        "a": [outcome(True, 3), outcome(False, 9)],
        "b": [outcome(False, 1), outcome(False, 2)],
    }
    data = ev.evaluation_metrics(outcomes, ks=[1, 2], budgets=[4, 9], resamples=100).to_dict()
    json.dumps(data)  # JSON-ready
    assert [p["k"] for p in data["pass_at_k"]] == [1, 2]
    assert data["pass_at_k"][0]["value"] == pytest.approx(0.25)
    assert [p["budget"] for p in data["budget_curves"]["1"]] == [4, 9]
    assert data["per_problem"]["a"]["correct_by_budget"] == {"4": 1, "9": 1}
    assert data["mean_tokens_correct"] == 3


def test_metrics_refuse_k_beyond_the_samples():
    with pytest.raises(ev.EvaluationError, match="larger than n"):
        ev.evaluation_metrics({"a": [outcome(True, 1)] * 2}, ks=[4], budgets=[8])


# --- Adapters and splits ------------------------------------------------------------------------


def write_adapter(path: Path, base: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return path


def test_adapter_base_model_must_be_the_chosen_one(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    adapter = write_adapter(tmp_path / "adapter", str(base))
    ev.check_adapter_base(adapter, tmp_path / "." / "base")  # same path, spelled differently
    with pytest.raises(ev.AdapterError, match="belongs to the base model"):
        ev.check_adapter_base(adapter, other)
    remote = write_adapter(tmp_path / "remote", "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ev.AdapterError, match="not a local path"):
        ev.check_adapter_base(remote, base)


def test_missing_or_broken_adapters_get_clear_errors(tmp_path):
    with pytest.raises(ev.AdapterError, match="does not exist"):
        ev.check_adapter_base(tmp_path / "nope", tmp_path)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ev.AdapterError, match="no adapter_config.json"):
        ev.adapter_base_model(tmp_path / "plain")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ev.AdapterError, match="Cannot read"):
        ev.adapter_base_model(broken)


def test_training_problem_ids_come_from_dail_training_json(tmp_path):
    adapter = write_adapter(tmp_path / "run" / "adapter", "/base")
    assert ev.adapter_training_problem_ids(adapter) is None
    (tmp_path / "run" / "dail-training.json").write_text(json.dumps({"problem_ids": [3, 5]}))
    parent = ev.adapter_training_problem_ids(adapter)
    assert parent.problem_ids == {3, 5} and parent.source == tmp_path / "run" / "dail-training.json"
    (adapter / "dail-training.json").write_text(json.dumps({"problem_ids": ["7"], "note": "x"}))
    assert ev.adapter_training_problem_ids(adapter).problem_ids == {7}  # beside the adapter first
    (adapter / "dail-training.json").write_text(json.dumps({"problems": [1]}))
    with pytest.raises(ev.AdapterError, match="problem_ids"):
        ev.adapter_training_problem_ids(adapter)


def test_held_out_split_is_seeded_stable_and_about_the_fraction():
    keys = [f"1/p{i}" for i in range(2000)]
    held = [k for k in keys if ev.in_held_out_split(k, 0.2, seed=0)]
    assert 0.17 < len(held) / len(keys) < 0.23
    assert held == [k for k in keys[:5000] if ev.in_held_out_split(k, 0.2, seed=0)]
    assert held != [k for k in keys if ev.in_held_out_split(k, 0.2, seed=1)]
    with pytest.raises(ev.EvaluationError):
        ev.in_held_out_split("1/p", 1.0, seed=0)
