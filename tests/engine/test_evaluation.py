"""The evaluation engine: sampling (batched, seeded, token counts), budget truncation, answer
judging (incl. CHAMP's free-form answers), metric assembly, adapters and splits."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from expansion.engine.answers import answer_alternatives, judge_answer, judge_completion
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


def unit(tokenizer, problem="What is $1 + 1$?", indices=range(8), key="1/a#0", seed=0):
    prompt = ev.evaluation_prompt_ids(tokenizer, problem)
    return ev.SamplingUnit(key, tuple(prompt), tuple(indices), seed)


def sample_units(model, tokenizer, units, **overrides):
    return ev.generate_completions(
        "transformers", model, tokenizer, units, settings=settings(**overrides)
    )


def sample(model, tokenizer, indices=range(8), seed=0, **overrides):
    """One unit alone in its call (the call seed comes from `seed` and the unit's key)."""
    (completions,) = ev.generate_completions(
        "transformers", model, tokenizer, [unit(tokenizer, indices=indices)],
        settings=settings(seed=seed, **overrides),
    )  # fmt: skip
    return completions


# --- Sampling ---------------------------------------------------------------------------------


def test_prompt_is_the_learner_view_asking_for_a_boxed_answer(tiny_tokenizer):
    text = tiny_tokenizer.decode(ev.evaluation_prompt_ids(tiny_tokenizer, "Find $x$."))
    assert text.startswith("<|im_start|>user\n## Problem:\nFind $x$.")
    assert "Put your final answer within \\boxed{}." in text
    assert text.endswith("<|im_start|>assistant\n")


def test_the_worked_example_template_shows_one_boxed_solution_before_the_problem(
    tiny_tokenizer,
):
    assert ev.EVALUATION_TEMPLATES["default"] == ev.EVALUATION_TEMPLATE
    template = ev.EVALUATION_TEMPLATES["worked-example"]
    text = tiny_tokenizer.decode(ev.evaluation_prompt_ids(tiny_tokenizer, "Find $x$.", template))
    assert text.count("Find $x$.") == 1 and text.count("\\boxed{6}") == 1
    assert text.index("\\boxed{6}") < text.index("Find $x$.")
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


def test_sampling_is_seeded_per_call(model, tiny_tokenizer):
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
    units = [unit(tiny_tokenizer, "x", range(2))]
    ev.generate_completions(
        "transformers", model, tiny_tokenizer, units, settings=settings(max_new_tokens=5),
        on_step=steps.append,
    )  # fmt: skip
    assert steps == [1, 2, 3, 4, 5]

    class Stop(Exception):
        pass

    def cancel(step: int) -> None:
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        ev.generate_completions(
            "transformers", model, tiny_tokenizer, units, settings=settings(), on_step=cancel
        )


# --- Many units in one call ---------------------------------------------------------------------

# top_p this small keeps only the most likely token: sampling is greedy, whatever the seed, so a
# unit's completions can be compared across groupings.
GREEDY = {"temperature": 1.0, "top_p": 1e-9}


def mixed_units(tokenizer):
    """Three problems with prompts of different lengths, units of different sizes."""
    return [
        unit(tokenizer, "What is $1 + 1$?", range(0, 3), key="1/a#0"),
        unit(tokenizer, "Find all primes $p$ such that $p^2 + 2$ is prime.", range(3, 5), "1/b#1"),
        unit(tokenizer, "x", range(0, 2), key="1/c#0"),
    ]


def test_many_units_are_sampled_in_one_generate_call(model, tiny_tokenizer, monkeypatch):
    calls = []
    real = type(model).generate

    def counting(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", counting)
    units = mixed_units(tiny_tokenizer)
    out = sample_units(model, tiny_tokenizer, units)
    assert len(calls) == 1 and calls[0][0] == 3 + 2 + 2  # one row per sample, left-padded
    assert [[c.sample_index for c in cs] for cs in out] == [[0, 1, 2], [3, 4], [0, 1]]
    for completions in out:
        for c in completions:
            assert len(c.token_ids) == c.token_count <= 32
            assert tiny_tokenizer.eos_token_id not in c.token_ids
            assert c.text == tiny_tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
    # The call seed is the evaluation seed and the units it holds: same call, same samples.
    again = sample_units(model, tiny_tokenizer, units)
    assert [[c.token_ids for c in cs] for cs in again] == [[c.token_ids for c in cs] for cs in out]
    assert ev.call_seed(0, units) != ev.call_seed(0, units[:2]) != ev.call_seed(1, units[:2])


@pytest.mark.parametrize("protocol", ["workbench", "release"])
def test_left_padding_does_not_change_a_unit(tiny_model_factory, tiny_tokenizer, protocol):
    """Greedy-equivalent sampling: each unit's completions in a mixed call equal those it gets
    alone (no padding), under the presence penalty too (it sees generated tokens only)."""
    model = tiny_model_factory(torch.float64, seed=MODEL_SEED)
    units = mixed_units(tiny_tokenizer)
    together = sample_units(model, tiny_tokenizer, units, protocol=protocol, **GREEDY)
    for u, completions in zip(units, together, strict=True):
        (alone,) = sample_units(model, tiny_tokenizer, [u], protocol=protocol, **GREEDY)
        assert [c.token_ids for c in completions] == [c.token_ids for c in alone]
        assert [c.finish_reason for c in completions] == [c.finish_reason for c in alone]
    if protocol == "release":
        plain = sample_units(model, tiny_tokenizer, units, **GREEDY)
        first_pass = [
            [c.token_ids[: c.token_count - c.forced_tokens] for c in cs] for cs in together
        ]
        assert first_pass != [[c.token_ids for c in cs] for cs in plain], "the penalty applies"


def test_stop_strings_cut_each_row_of_a_mixed_call(tiny_model_factory, tiny_tokenizer, monkeypatch):
    model = tiny_model_factory(torch.float64, seed=MODEL_SEED)
    units = mixed_units(tiny_tokenizer)
    plain = sample_units(model, tiny_tokenizer, units, **GREEDY)
    # A stop string taken from the middle of the first unit's greedy text.
    text = plain[0][0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    cutting = dataclasses.replace(
        ev.EVALUATION_PROTOCOLS["release"], presence_penalty=0.0, force_answer=False,
        stop_strings=(stop,),
    )  # fmt: skip
    monkeypatch.setitem(ev.EVALUATION_PROTOCOLS, "release", cutting)
    cut = sample_units(model, tiny_tokenizer, units, protocol="release", **GREEDY)
    for plain_unit, cut_unit in zip(plain, cut, strict=True):
        for p, c in zip(plain_unit, cut_unit, strict=True):
            if stop in p.text:
                assert c.finish_reason == "stop" and c.text == p.text[: p.text.index(stop)]
                assert p.token_ids[: c.token_count] == c.token_ids
            else:
                assert (c.token_ids, c.finish_reason) == (p.token_ids, p.finish_reason)
    assert cut[0][0].finish_reason == "stop"


def test_top_k_one_is_greedy_decoding_and_no_top_k_cuts_nothing(
    tiny_model_factory, tiny_tokenizer, monkeypatch
):
    """top_k=1 at temperature 1 keeps only the most likely token: greedy decoding, whatever
    the seed; unset, transformers gets top_k=0 (no cut), not its default of 50."""
    model = tiny_model_factory(torch.float64, seed=MODEL_SEED)
    units = mixed_units(tiny_tokenizer)
    greedy = sample_units(model, tiny_tokenizer, units, **GREEDY)
    ids = lambda out: [[c.token_ids for c in cs] for cs in out]  # noqa: E731
    for seed in (0, 1):
        top1 = sample_units(model, tiny_tokenizer, units, top_k=1, seed=seed)
        assert ids(top1) == ids(greedy)
    assert ids(sample_units(model, tiny_tokenizer, units)) != ids(greedy), "sampling differs"
    seen = []
    real = type(model).generate

    def recording(self, *args, **kwargs):
        seen.append(kwargs["top_k"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", recording)
    sample_units(model, tiny_tokenizer, units[:1], max_new_tokens=2)
    sample_units(model, tiny_tokenizer, units[:1], max_new_tokens=2, top_k=20)
    assert seen == [0, 20]


def test_units_are_a_problems_missing_batches_packed_into_calls():
    chosen = settings(samples=10, batch_size=4, seed=5)
    units = ev.problem_units("1/a", [1, 2], chosen, stored={0, 1, 2, 3, 4})
    assert [u.sample_indices for u in units] == [(4, 5, 6, 7), (8, 9)]  # batch 0 is complete
    assert [u.key for u in units] == ["1/a#1", "1/a#2"]
    assert units[0].seed == ev.batch_seed(5, "1/a", 1) and units[0].prompt_ids == (1, 2)
    more = units + ev.problem_units("1/b", [3], chosen)
    sizes = [[len(u.sample_indices) for u in call] for call in ev.pack_units(more, 8)]
    assert sizes == [[4, 2], [4, 4], [2]]
    assert [len(call) for call in ev.pack_units(more, 3)] == [1, 1, 1, 1, 1]  # a big unit alone
    assert ev.generate_completions("transformers", None, None, [], settings=chosen) == []


def test_unknown_backends_are_refused_and_vllm_reports_why_it_is_missing(
    model, tiny_tokenizer, monkeypatch
):
    with pytest.raises(ev.BackendUnavailableError, match="unknown backend 'tgi'"):
        ev.generate_completions(
            "tgi", model, tiny_tokenizer, [ev.SamplingUnit("1/a#0", (1, 2), (0,), 0)],
            settings=settings(),
        )  # fmt: skip
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
        ({"top_k": 0}, "top_k"),
        ({"top_k": 1001}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_k": "20"}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),  # past the signed 64-bit column it is stored in
        ({"seed": True}, "seed"),
        ({"seed": "7"}, "seed"),
    ],
)
def test_bad_sampling_settings_are_refused(overrides, message):
    with pytest.raises(ev.EvaluationError, match=message):
        settings(**overrides)


def test_seeds_up_to_the_limit_are_taken_and_the_split_seed_is_bounded_too():
    assert settings(seed=ev.SEED_MAX).seed == 2**63 - 1
    assert ev.in_held_out_split("1/a", 0.5, ev.SEED_MAX) in (True, False)
    with pytest.raises(ev.EvaluationError, match="split seed"):
        ev.in_held_out_split("1/a", 0.5, 2**64)


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
    assert judge_answer(predicted, expected).correct


@pytest.mark.parametrize(("predicted", "expected"), NOT_EQUIVALENT)
def test_different_answers_are_not(predicted, expected):
    verdict = judge_answer(predicted, expected)
    assert not verdict.correct
    assert not verdict.disagreement


def test_champ_alternatives_are_split():
    assert answer_alternatives("C(10, 5), or equivalently 252") == [
        "C(10, 5)",
        "\\binom{10}{5}",
        "252",
    ]
    assert answer_alternatives("2^(n-1)") == ["2^(n-1)"]


def test_disagreements_are_flagged_for_a_person():
    only_symbolic = judge_answer("\\frac{1}{2}", "0.5")
    assert only_symbolic.correct and only_symbolic.math_verify and not only_symbolic.string_match
    assert only_symbolic.disagreement
    both = judge_answer("3", "3")
    assert both.correct and not both.disagreement


def test_completions_are_judged_by_their_last_box():
    verdict = judge_completion("First \\boxed{3}, no wait: \\boxed{2^{n-1}}.", "2^(n-1)")
    assert verdict.predicted == "2^{n-1}" and verdict.correct
    missing = judge_completion("I think it is 252.", "252")
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


# --- Protocols: the release's presence penalty, stop at </think>, force-answer pass ----------


def test_presence_penalty_processor_matches_a_hand_computation():
    # Prompt [5, 6], completion so far [1, 3, 1]: tokens 1 and 3 lose 1.5 once each (however
    # often they occur); prompt-only tokens 5 and 6 keep their logits (vLLM's definition).
    input_ids = torch.tensor([[5, 6, 1, 3, 1], [5, 6, 2, 2, 2]])
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]] * 2)
    out = ev.PresencePenaltyProcessor(1.5, prompt_length=2)(input_ids, scores)
    expected = torch.tensor(
        [[0.0, -0.5, 2.0, 1.5, 4.0, 5.0, 6.0, 7.0], [0.0, 1.0, 0.5, 3.0, 4.0, 5.0, 6.0, 7.0]]
    )
    assert torch.equal(out, expected)
    first_step = ev.PresencePenaltyProcessor(1.5, prompt_length=5)(input_ids, scores)
    assert torch.equal(first_step, scores)  # nothing generated yet: nothing penalised


def test_protocols_are_named_and_validated():
    assert set(ev.EVALUATION_PROTOCOLS) == {"workbench", "release"}
    release = ev.EVALUATION_PROTOCOLS["release"]
    assert (release.presence_penalty, release.stop_strings) == (1.5, ("</think>",))
    assert release.force_answer_prompt == "\n The final answer (in \\boxed{}):"
    assert release.force_answer_tokens == 100 and "eval/eval.py" in release.source
    assert settings().protocol == "workbench"
    with pytest.raises(ev.EvaluationError, match="unknown protocol"):
        settings(protocol="paper")


def test_vllm_sampling_params_follow_the_protocol():
    from vllm import SamplingParams

    workbench = ev.vllm_sampling_kwargs(settings(), seed=3, max_tokens=32, stop_token_ids={2})
    assert "presence_penalty" not in workbench and "stop" not in workbench
    assert workbench["detokenize"] is False
    release = settings(protocol="release")
    first = ev.vllm_sampling_kwargs(release, seed=3, max_tokens=32, stop_token_ids={2, 1})
    assert first["presence_penalty"] == 1.5 and first["stop"] == ["</think>"]
    assert first["detokenize"] is True and first["stop_token_ids"] == [1, 2]
    forced = ev.vllm_sampling_kwargs(
        release, seed=3, max_tokens=100, stop_token_ids={2}, first_pass=False
    )
    assert "stop" not in forced and forced["presence_penalty"] == 1.5
    params = SamplingParams(**first)  # vLLM accepts them (no engine needed)
    assert params.presence_penalty == 1.5 and params.stop == ["</think>"]
    assert SamplingParams(**forced).max_tokens == 100
    assert workbench["top_k"] == 0 and SamplingParams(**workbench).top_k == 0  # 0: no top-k
    cut = ev.vllm_sampling_kwargs(settings(top_k=20), seed=3, max_tokens=32, stop_token_ids={2})
    assert SamplingParams(**cut).top_k == 20


def test_a_stop_string_ends_the_first_pass_and_is_not_kept(tiny_tokenizer):
    protocol = ev.EVALUATION_PROTOCOLS["release"]
    ids = tiny_tokenizer("So x = 2.</think> and more", add_special_tokens=False)["input_ids"]
    completion = ev._completion(tiny_tokenizer, 0, ids, False, protocol)
    assert completion.finish_reason == "stop" and completion.text == "So x = 2."
    assert "</think>" in tiny_tokenizer.decode(list(completion.token_ids))
    assert "</think>" not in tiny_tokenizer.decode(list(completion.token_ids)[:-1])
    assert completion.token_count == len(completion.token_ids) < len(ids)
    plain = ev._completion(tiny_tokenizer, 0, ids, False, ev.EVALUATION_PROTOCOLS["workbench"])
    assert plain.finish_reason == "length" and plain.token_count == len(ids)


def test_the_force_answer_pass_runs_only_for_samples_without_a_box(tiny_tokenizer, monkeypatch):
    """The orchestration: boxless samples get one more pass on prompt + text + the force
    prompt, and its tokens are counted; a sample with a box is left alone."""
    encode = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    first = [(encode("It is \\boxed{5}."), True), (encode("It is five"), True)]
    calls = []

    def fake_rows(model, tokenizer, prompts, *, settings, max_new_tokens, **kwargs):
        calls.append(([list(p) for p in prompts], max_new_tokens))
        return first if len(calls) == 1 else [(encode(" \\boxed{5}"), True)]

    monkeypatch.setattr(ev, "_generate_rows", fake_rows)
    prompt = (1, 2, 3)
    (out,) = ev.generate_completions_transformers(
        None, tiny_tokenizer, [ev.SamplingUnit("1/a#0", prompt, (0, 1), 0)],
        settings=settings(protocol="release"),
    )  # fmt: skip
    assert len(calls) == 2  # one batch, then one force-answer pass (sample 1 only)
    assert calls[0] == ([list(prompt)] * 2, 32)
    forced_prompts, limit = calls[1]
    assert limit == 100
    assert forced_prompts == [
        list(prompt) + encode("It is five\n The final answer (in \\boxed{}):")
    ]
    boxed, forced = out
    assert boxed.forced_tokens == 0 and boxed.text == "It is \\boxed{5}."
    assert forced.forced_tokens == len(encode(" \\boxed{5}"))
    assert forced.token_count == len(encode("It is five")) + forced.forced_tokens
    assert forced.text.startswith("It is five\n The final answer") and forced.text.endswith("5}")


def test_budgets_cap_the_first_pass_and_the_forced_tokens_come_on_top():
    outcome = ev.SampleOutcome(correct=True, tokens=70, forced_tokens=20)
    assert ev.correct_within_budget(outcome, 50) and not ev.correct_within_budget(outcome, 49)


@pytest.fixture(scope="module")
def smollm(embedded_model_dir):
    from expansion.engine.models import load_model

    return load_model(embedded_model_dir, device="cpu", dtype="float32")


def test_release_protocol_on_the_real_model(smollm, monkeypatch):
    """SmolLM2 rarely boxes within 12 tokens: the boxless samples get the force-answer pass
    (here 12 tokens instead of 100, to stay fast on a CPU), its tokens are counted, and the
    same seed gives the same samples."""
    from expansion.engine.answers import judge_completion

    model, tokenizer = smollm
    short = dataclasses.replace(ev.EVALUATION_PROTOCOLS["release"], force_answer_tokens=12)
    monkeypatch.setitem(ev.EVALUATION_PROTOCOLS, "release", short)
    prompt = ev.evaluation_prompt_ids(tokenizer, "What is $2 + 3$?")
    units = [ev.SamplingUnit("1/a#0", tuple(prompt), (0, 1, 2), 0)]
    chosen = settings(
        samples=3, max_new_tokens=12, temperature=0.6, top_p=0.95, protocol="release", seed=3
    )
    (out,) = ev.generate_completions("transformers", model, tokenizer, units, settings=chosen)
    forced = [c for c in out if c.forced_tokens]
    assert forced, "the fixture should have a sample without a box"
    for c in out:
        first_text = c.text.split(short.force_answer_prompt)[0]
        assert bool(c.forced_tokens) == ("\\boxed{" not in first_text)
        assert 0 <= c.forced_tokens <= 12 and c.token_count == len(c.token_ids)
        assert c.token_count - c.forced_tokens <= 12
    for c in forced:
        assert short.force_answer_prompt in c.text
        # The prompt's own empty box is no answer: only what the model wrote after it counts.
        tail = c.text.split(short.force_answer_prompt)[1]
        assert judge_completion(c.text, "5").predicted == (
            judge_completion(tail, "5").predicted or ""
        )
    (again,) = ev.generate_completions("transformers", model, tokenizer, units, settings=chosen)
    assert [c.text for c in again] == [c.text for c in out]
