"""The LoRA trainer, its data layout and its config, on a tiny random Llama (seconds on a CPU)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.training_fixtures import make_examples, save_tiny_llama
from training.engine import trainer as trainer_module
from training.engine.adapter_motion import did_not_move, lora_update_norm
from training.engine.config import LORA_TARGETS, DailTrainingConfig
from training.engine.data import DailCollator, TrainingExample, fit_to_length
from training.engine.objective import dail_loss, kl_divergence
from training.engine.trainer import (
    TrainingDataError,
    TrainingDiverged,
    build_trainer,
    load_model_with_lora,
    objective_loss,
    train_adapter,
)
from training.engine.views import reference_logits, response_logits

pytestmark = pytest.mark.engine


def tiny_config(**overrides) -> DailTrainingConfig:
    values = dict(
        effective_batch_size=2,
        micro_batch_size=1,
        epochs=3,
        learning_rate=1e-2,
        warmup_steps=1,
        lora_r=4,
        lora_alpha=8,
        checkpoint_every=2,
        checkpoints_to_keep=None,
        max_length=64,
        device="cpu",
    )
    values.update(overrides)
    return DailTrainingConfig(**values)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def peaky_model_dir(tmp_path_factory) -> Path:
    """Larger initial weights: peaked, context-dependent distributions, so the views differ."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("peaky") / "model"
    source = save_tiny_llama(tmp_path_factory.mktemp("peaky-src") / "model")
    config = AutoConfig.from_pretrained(source)
    config.initializer_range = 0.4
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# ---- data ----------------------------------------------------------------------------------


def test_collated_views_line_up_with_unbatched_forwards(model_dir):
    """Gathering each right-padded view at its position map gives, row by row, the logits of
    that trace run alone (no attention mask needed) -- for prompts of different lengths."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    examples = make_examples(3, seed=5)
    batch = DailCollator()(examples)
    for view in ("learner", "privileged", "negative"):
        with torch.no_grad():
            batched = response_logits(
                model, batch[f"{view}_input_ids"], batch[f"{view}_positions"]
            )  # (B, T, V)
        for i, example in enumerate(examples):
            prompt = example.prompt(view)
            ids = torch.tensor([[*prompt, *example.response_ids]])
            with torch.no_grad():
                alone = model(input_ids=ids).logits[0]  # (L, V)
            size = len(example.response_ids)
            expected = alone[len(prompt) - 1 : len(prompt) - 1 + size]  # predicts each r_t
            torch.testing.assert_close(batched[i, :size], expected, rtol=1e-5, atol=1e-5)
            # ...and the response tensors hold r_t at the same step t.
            assert batch["response_ids"][i, :size].tolist() == list(example.response_ids)
    assert batch["response_mask"].sum().item() == sum(len(e.response_ids) for e in examples)


def test_collator_carries_the_shortcut_marks():
    example = TrainingExample([1, 2], [3, 4, 5], [6], [7, 8, 9], shortcut_mask=[0, 1, 1])
    batch = DailCollator()([example, *make_examples(1)])
    assert batch["shortcut_mask"][0].tolist()[:3] == [False, True, True]
    assert not batch["shortcut_mask"][1].any()


def test_overlong_traces_are_truncated_or_skipped_and_counted():
    fits = TrainingExample([1] * 3, [1] * 5, [1] * 4, [2] * 5)  # longest view 10
    long = TrainingExample([1] * 3, [1] * 8, [1] * 4, [2] * 6, shortcut_mask=[1] * 6)  # 14
    hopeless = TrainingExample([1] * 3, [1] * 12, [1] * 4, [2] * 2)  # prompt alone 12
    kept, counts = fit_to_length([fits, long, hopeless], 12, "truncate")
    assert [len(e.response_ids) for e in kept] == [5, 4]
    assert kept[1].shortcut_mask == (True,) * 4
    assert counts.as_dict() == {
        "truncated": 1,
        "skipped": 0,
        "prompt_too_long": 1,
        "response_tokens_dropped": 2,
    }
    kept, counts = fit_to_length([fits, long, hopeless], 12, "skip")
    assert kept == [fits] and (counts.skipped, counts.prompt_too_long) == (1, 1)
    # NLL reads only the learner view: the long privileged prompt does not matter then.
    kept, counts = fit_to_length([fits, long, hopeless], 12, "skip", views=("learner",))
    assert len(kept) == 3 and counts.skipped == 0


def test_examples_refuse_inconsistent_input():
    with pytest.raises(ValueError, match="shortcut_mask"):
        TrainingExample([1], [2], [3], [4, 5], shortcut_mask=[True])
    with pytest.raises(ValueError, match="privileged_prompt_ids"):
        TrainingExample([1], [], [3], [4])
    with pytest.raises(ValueError, match="response_ids"):
        TrainingExample([1], [2], [3], [])


# ---- config --------------------------------------------------------------------------------


def test_config_defaults_are_the_release_values():
    config = DailTrainingConfig()
    assert (config.objective, config.gamma, config.kl_direction) == ("dail", 0.1, "reverse")
    assert (config.lora_r, config.lora_alpha, config.lora_dropout) == (32, 32, 0.0)
    assert config.lora_targets == LORA_TARGETS
    assert (config.learning_rate, config.warmup_steps, config.weight_decay) == (2e-4, 5, 0.01)
    assert config.effective_batch_size == 16 and config.checkpoint_every == 50
    assert config.micro_batch_size * config.gradient_accumulation_steps == 16
    instruct = DailTrainingConfig.for_model_kind("instruct")
    reasoning = DailTrainingConfig.for_model_kind("reasoning", gamma=0.0)
    assert (instruct.epochs, instruct.max_length) == (5, 12288)
    assert (reasoning.epochs, reasoning.max_length, reasoning.gamma) == (3, 2048, 0.0)
    assert DailTrainingConfig.from_dict(config.to_dict()) == config
    # Ours, not the paper's: no unbounded push on marked tokens; the release's loss mean.
    assert (config.shortcut_policy, config.loss_normalisation) == ("drop_position", "per_sequence")


def test_settings_stored_before_loss_normalisation_existed_load_as_those_runs_trained():
    stored = {**DailTrainingConfig().to_dict(), "shortcut_policy": "drop_pull"}
    del stored["loss_normalisation"]
    old = DailTrainingConfig.from_dict(stored)
    assert (old.loss_normalisation, old.shortcut_policy) == ("per_token", "drop_pull")


def test_planned_steps_and_the_warm_up_rule():
    config = DailTrainingConfig(effective_batch_size=4, micro_batch_size=2, warmup_steps=2)
    # per epoch ceil(ceil(9 / 2) / 2) = 3 steps, times 3 epochs
    assert config.planned_steps(9) == 9 and config.planned_steps(2) == 3
    config.check_warmup(3)  # 2 warm-up steps < 3 planned: the third runs at the full rate
    for planned in (2, 1):
        with pytest.raises(ValueError, match="warmup_steps"):
            config.check_warmup(planned)
    DailTrainingConfig(warmup_steps=0).check_warmup(1)  # no warm-up: the first step trains


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gamma", -0.1),
        ("gamma", 1.0),
        ("objective", "grpo"),
        ("kl_direction", "both"),
        ("lora_r", 0),
        ("learning_rate", 0.0),
        ("micro_batch_size", 3),
        ("epochs", 0),
        ("max_length", 1),
        ("overlong_policy", "wrap"),
        ("warmup_steps", -1),
        ("checkpoint_every", 0),
        ("lora_dropout", 1.0),
        ("max_grad_norm", float("nan")),
        ("loss_normalisation", "per_word"),
        ("shortcut_policy", "drop_everything"),
        # Seeds are bounded (numpy takes 32-bit seeds) and JSON types are checked.
        ("seed", -1),
        ("seed", 2**31),
        ("seed", 2**64),
        ("seed", True),
        ("seed", "7"),
        ("epochs", 3.0),
        ("gamma", "0.1"),
        ("reference_cache", 1),
        ("checkpoints_to_keep", 2.5),
    ],
)
def test_config_refuses_out_of_range_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        DailTrainingConfig(**{field: value})


def test_config_takes_seeds_up_to_its_limit():
    from training.engine.config import SEED_MAX

    assert DailTrainingConfig(seed=SEED_MAX).seed == 2**31 - 1
    assert DailTrainingConfig.from_dict({"seed": 0, "checkpoints_to_keep": None}).seed == 0


def test_config_from_dict_refuses_unknown_settings():
    with pytest.raises(ValueError, match="gamme"):
        DailTrainingConfig.from_dict({"gamme": 0.2})


# ---- the three views -----------------------------------------------------------------------


def test_reference_views_are_the_frozen_base_model(model_dir):
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    peft_model = load_model_with_lora(model_dir, config)
    for name, param in peft_model.named_parameters():  # make the adapter matter
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = DailCollator()(make_examples(3, seed=2))

    fused = reference_logits(peft_model, batch, fuse=True)
    separate = reference_logits(peft_model, batch, fuse=False)
    for view, got, got_separately in zip(("privileged", "negative"), fused, separate, strict=True):
        with torch.no_grad():
            expected = response_logits(base, batch[f"{view}_input_ids"], batch[f"{view}_positions"])
        mask = batch["response_mask"]
        torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_separately[mask], expected[mask], rtol=1e-5, atol=1e-5)
        assert not got.requires_grad
    learner = response_logits(peft_model, batch["learner_input_ids"], batch["learner_positions"])
    with torch.no_grad():
        base_learner = response_logits(base, batch["learner_input_ids"], batch["learner_positions"])
    assert learner.requires_grad  # the adapter is back on for the learner
    assert (learner - base_learner).abs().max() > 1e-2
    # Only LoRA parameters are trainable: one copy of the base weights, frozen.
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_body_and_output_layer_give_the_models_own_logits(model_dir):
    from transformers import AutoModelForCausalLM

    from training.engine import views

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert views.splits_into_body_and_head(model)
    batch = DailCollator()(make_examples(3, seed=8))
    with torch.no_grad():
        split = views.response_logits(
            model, batch["privileged_input_ids"], batch["privileged_positions"]
        )
        whole = views._logits_via_forward(
            model, batch["privileged_input_ids"], batch["privileged_positions"]
        )
    mask = batch["response_mask"]
    torch.testing.assert_close(split[mask], whole[mask], rtol=1e-5, atol=1e-5)


def test_reference_cache_gives_the_recomputed_loss(model_dir, tmp_path):
    from training.engine.reference_cache import ReferenceCache

    config = tiny_config(gamma=0.2)
    peft_model = load_model_with_lora(model_dir, config)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    batch = DailCollator()(make_examples(3, seed=6))
    plain, _ = objective_loss(peft_model, batch, config)
    cache = ReferenceCache(tmp_path / "cache", {"model": "tiny"})
    first, _ = objective_loss(peft_model, batch, config, reference_cache=cache)
    second, _ = objective_loss(peft_model, batch, config, reference_cache=cache)
    assert (cache.misses, cache.hits) == (1, 1)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3  # one entry per trace
    torch.testing.assert_close(first, plain, rtol=0, atol=0)
    torch.testing.assert_close(second, plain, rtol=1e-6, atol=1e-7)

    # The cache holds the frozen views only: a different learner prompt still hits it...
    moved = make_examples(3, seed=6)
    moved[0] = dataclasses.replace(moved[0], learner_prompt_ids=(9, 9, 9))
    objective_loss(peft_model, DailCollator()(moved), config, reference_cache=cache)
    assert cache.hits == 2
    # ...and a cache made for another model is emptied when opened.
    ReferenceCache(tmp_path / "cache", {"model": "other"})
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


@pytest.mark.parametrize("normalisation", ["per_sequence", "per_token"])
def test_accumulated_micro_batches_equal_one_batch_in_the_trainer(
    normalisation, model_dir, tmp_path
):
    """Trainer's gradient accumulation divides by the whole accumulated batch: its sequences
    (per_sequence) or its response tokens (per_token)."""
    examples = make_examples(2, seed=3)
    assert len(examples[0].response_ids) != len(examples[1].response_ids)
    collate = DailCollator()
    grads = []
    expected_items = (
        len(examples)
        if normalisation == "per_sequence"
        else sum(len(e.response_ids) for e in examples)
    )
    for micro, parts in ((1, [examples[:1], examples[1:]]), (2, [examples])):
        config = tiny_config(micro_batch_size=micro, gamma=0.3, loss_normalisation=normalisation)
        peft_model = load_model_with_lora(model_dir, config)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.fill_(0.1)
        trainer = build_trainer(peft_model, examples, config, tmp_path / f"m{micro}")
        batches, tokens = trainer.get_batch_samples(
            iter([collate(p) for p in parts]), len(parts), torch.device("cpu")
        )
        assert tokens == expected_items
        for batch in batches:
            trainer.training_step(peft_model, batch, tokens)
        grads.append(
            {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        )
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


# ---- training runs -------------------------------------------------------------------------


def mean_kl_to_privileged(peft_model, examples) -> float:
    batch = DailCollator()(examples)
    privileged, _ = reference_logits(peft_model, batch)
    with torch.no_grad():
        learner = response_logits(
            peft_model, batch["learner_input_ids"], batch["learner_positions"]
        )
    return kl_divergence(learner, privileged)[batch["response_mask"]].mean().item()


def test_overfitting_four_traces_pulls_the_learner_toward_the_privileged_view(
    peaky_model_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    examples = make_examples(4, seed=1)
    config = tiny_config(epochs=15, learning_rate=2e-2, lora_r=8, lora_alpha=16)
    untrained = load_model_with_lora(peaky_model_dir, config)
    before = mean_kl_to_privileged(untrained, examples)
    result = train_adapter(peaky_model_dir, examples, config, tmp_path / "run")

    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(peaky_model_dir), result.adapter_dir
    )
    after = mean_kl_to_privileged(trained, examples)
    print(
        f"KL(learner || PS): {before:.4f} -> {after:.4f}; loss {result.history[0]['loss']:.4f}"
        f" -> {result.history[-1]['loss']:.4f}"
    )
    assert before > 0.05  # the views really differ at the start
    assert after < 0.3 * before
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    assert result.history[-1]["kl_privileged"] < result.history[0]["kl_privileged"]
    assert {"loss", "kl_privileged", "kl_negative", "lr", "grad_norm"} <= result.history[0].keys()


def test_nll_objective_trains_on_the_response_tokens(peaky_model_dir, tmp_path):
    config = tiny_config(objective="nll", epochs=10, learning_rate=2e-2, lora_r=8)
    result = train_adapter(peaky_model_dir, make_examples(4, seed=1), config, tmp_path / "nll")
    losses = [h["nll"] for h in result.history]
    assert result.status == "completed"
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    """Six optimizer steps (3 epochs x 2), run twice with one seed."""
    examples = make_examples(4)
    runs = []
    for name in ("first", "second"):
        events = []
        result = train_adapter(
            model_dir,
            examples,
            tiny_config(),
            tmp_path_factory.mktemp(name),
            on_progress=events.append,
        )
        runs.append((result, events))
    return examples, runs


def test_progress_reports_every_step(uninterrupted):
    _, [(result, events), _] = uninterrupted
    assert result.status == "completed" and result.global_step == result.total_steps == 6
    assert tiny_config().planned_steps(4) == 6  # what the launch computes, before training
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(e.total_steps == 6 for e in events)
    assert events[-1].epoch == pytest.approx(3.0)
    rates = [e.metrics["lr"] for e in events]
    assert rates[0] < rates[1] == pytest.approx(1e-2)  # one warm-up step, then the peak
    assert rates[1:] == sorted(rates[1:], reverse=True) and rates[-1] < rates[1]  # linear decay
    assert events[0].metrics["tokens"] > 0


def test_same_seed_gives_the_same_adapter(uninterrupted, model_dir, tmp_path):
    examples, [(first, _), (second, _)] = uninterrupted
    assert_same_weights(adapter_weights(first.adapter_dir), adapter_weights(second.adapter_dir))
    other = train_adapter(model_dir, examples, tiny_config(seed=7), tmp_path / "other-seed")
    a, b = adapter_weights(first.adapter_dir), adapter_weights(other.adapter_dir)
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_reference_cache_skips_recomputation_without_changing_the_result(
    uninterrupted, model_dir, tmp_path
):
    examples, [(cached, _), _] = uninterrupted
    assert cached.reference_cache == "on"
    assert cached.reference_cache_hits == 8  # epochs 2 and 3: 2 steps x 2 micro-batches each
    assert not (cached.adapter_dir.parent / "reference_cache").exists()  # removed when done
    recomputed = train_adapter(
        model_dir, examples, tiny_config(reference_cache=False), tmp_path / "no-cache"
    )
    assert recomputed.reference_cache.startswith("off") and recomputed.reference_cache_hits == 0
    a, b = adapter_weights(cached.adapter_dir), adapter_weights(recomputed.adapter_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)
    too_small = train_adapter(
        model_dir, examples, tiny_config(reference_cache_limit_gb=0.0), tmp_path / "limit"
    )
    assert too_small.reference_cache.startswith("off (needs")


def test_resume_after_a_crash_gives_the_uninterrupted_result(uninterrupted, model_dir, tmp_path):
    examples, [(reference, _), _] = uninterrupted

    def crash(progress):
        if progress.step == 3:
            raise RuntimeError("worker killed")

    with pytest.raises(RuntimeError, match="worker killed"):
        train_adapter(model_dir, examples, tiny_config(), tmp_path, on_progress=crash)
    assert trainer_module.last_complete_checkpoint(tmp_path / "checkpoints").name == "checkpoint-2"

    resumed = train_adapter(model_dir, examples, tiny_config(), tmp_path)
    assert resumed.resumed_from.name == "checkpoint-2"
    assert resumed.status == "completed" and resumed.global_step == reference.global_step
    assert [h["step"] for h in resumed.history] == [3, 4, 5, 6]
    assert_same_weights(
        adapter_weights(resumed.adapter_dir), adapter_weights(reference.adapter_dir)
    )


def test_cancellation_keeps_the_last_checkpoint_and_can_resume(uninterrupted, model_dir, tmp_path):
    examples, [(reference, _), _] = uninterrupted
    seen = []

    def should_stop() -> bool:
        return len(seen) >= 3

    cancelled = train_adapter(
        model_dir,
        examples,
        tiny_config(),
        tmp_path,
        on_progress=seen.append,
        should_stop=should_stop,
    )
    assert cancelled.status == "cancelled" and cancelled.adapter_dir is None
    assert cancelled.global_step == 3
    assert cancelled.last_checkpoint.name == "checkpoint-3"
    assert (cancelled.last_checkpoint / "adapter_model.safetensors").is_file()

    assert (tmp_path / "reference_cache").is_dir()  # kept for the resumed run

    resumed = train_adapter(model_dir, examples, tiny_config(), tmp_path)
    assert resumed.resumed_from.name == "checkpoint-3" and resumed.global_step == 6
    assert resumed.reference_cache_hits == 6  # steps 4-6 read epoch 1's references from disk
    assert_same_weights(
        adapter_weights(resumed.adapter_dir), adapter_weights(reference.adapter_dir)
    )


def test_resume_refuses_other_settings_or_data(uninterrupted, model_dir, tmp_path):
    examples, _ = uninterrupted
    train_adapter(model_dir, examples, tiny_config(epochs=1), tmp_path)
    with pytest.raises(TrainingDataError, match="gamma"):
        train_adapter(model_dir, examples, tiny_config(epochs=1, gamma=0.2), tmp_path)
    with pytest.raises(TrainingDataError, match="other training data"):
        train_adapter(model_dir, make_examples(4, seed=9), tiny_config(epochs=1), tmp_path)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nan_stops_training_and_keeps_the_last_good_checkpoint(
    where, uninterrupted, model_dir, tmp_path, monkeypatch
):
    examples, _ = uninterrupted
    calls = []

    def poisoned(learner_logits, *args, **kwargs):
        loss, metrics = dail_loss(learner_logits, *args, **kwargs)
        calls.append(1)
        if len(calls) == 7:  # the first micro-batch of step 4
            if where == "loss":
                return loss * float("nan"), {**metrics, "total": float("nan")}
            # finite value, NaN gradient: d/dx sqrt(x) at 0 is inf, times 0
            return loss + torch.sqrt(learner_logits.sum() * 0), metrics
        return loss, metrics

    monkeypatch.setattr(trainer_module, "dail_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 4"):
        train_adapter(model_dir, examples, tiny_config(), tmp_path)
    last = trainer_module.last_complete_checkpoint(tmp_path / "checkpoints")
    assert last.name == "checkpoint-2"
    assert all(w.isfinite().all() for w in adapter_weights(last).values())
    assert not (tmp_path / "adapter").exists()


def test_saved_adapter_is_a_standard_peft_lora_directory(uninterrupted, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, [(result, _), _] = uninterrupted
    adapter_config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    assert set(adapter_config["target_modules"]) == set(LORA_TARGETS)
    assert adapter_config["base_model_name_or_path"] == str(model_dir)
    weights = adapter_weights(result.adapter_dir)
    # vLLM's LoRA loader expects exactly these names: no modules_to_save, no embeddings.
    assert all(
        name.startswith("base_model.model.model.layers.") and ".lora_" in name for name in weights
    )

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    state = loaded.state_dict()
    for name, tensor in weights.items():
        torch.testing.assert_close(state[name.replace(".weight", ".default.weight")], tensor)
    ids = torch.tensor([[1, 5, 9, 2, 7, 7, 3]])
    with torch.no_grad():
        adapted = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            plain = loaded(input_ids=ids).logits
        merged = loaded.merge_and_unload()(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-4  # the adapter changed the model
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_update_norm_is_the_frobenius_norm_of_the_lora_update(uninterrupted, model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, [(result, _), _] = uninterrupted
    # Independently: merge the adapter and compare each weight with the base model's.
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base_weights = {n: w.detach().double().clone() for n, w in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, result.adapter_dir).merge_and_unload()
    squared = sum(
        float(((w.detach().double() - base_weights[n]) ** 2).sum())
        for n, w in merged.state_dict().items()
    )
    assert squared > 0
    assert result.update_norm == pytest.approx(math.sqrt(squared), rel=1e-3)
    assert lora_update_norm(result.adapter_dir) == result.update_norm
    assert not did_not_move(result.update_norm)

    fresh = load_model_with_lora(model_dir, tiny_config())  # peft starts every lora_B at 0
    fresh.save_pretrained(tmp_path / "fresh")
    assert lora_update_norm(tmp_path / "fresh") == 0.0
    assert did_not_move(0.0) and not did_not_move(None)


def test_a_run_that_never_leaves_warm_up_is_refused(model_dir, tmp_path):
    """2 traces, batch 2, 1 epoch: one optimizer step, the first of a warm-up (lr 0)."""
    config = tiny_config(epochs=1, warmup_steps=1)
    assert config.planned_steps(2) == 1
    with pytest.raises(TrainingDataError, match="warmup_steps"):
        train_adapter(model_dir, make_examples(2), config, tmp_path)
    assert not (tmp_path / "adapter").exists()


def test_objective_loss_runs_both_objectives_on_one_batch(model_dir):
    peft_model = load_model_with_lora(model_dir, tiny_config())
    batch = DailCollator()(make_examples(2, seed=4))
    for objective in ("dail", "nll"):
        loss, metrics = objective_loss(peft_model, batch, tiny_config(objective=objective))
        loss.backward()
        assert loss.isfinite() and metrics["tokens"] == batch["response_mask"].sum().item()
    # lora_B starts at zero, so only lora_B has a gradient on the first backward.
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_no_example_fits_is_a_clear_error(model_dir, tmp_path):
    with pytest.raises(TrainingDataError, match="max_length=8"):
        train_adapter(model_dir, make_examples(2), tiny_config(max_length=8), tmp_path)


def embedded_examples(model_dir) -> list[TrainingExample]:
    """Two traces of the embedded model in the three DAIL views (the method's prompts, short)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def prompt(text: str) -> list[int]:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
        )["input_ids"]

    cases = [
        ("What is 12 * 13?", "12*13 = 12*10 + 12*3 = 156.", "156",
         "12 * 13 = 12 * 10 + 12 * 3 = 120 + 36 = 156. \\boxed{156}"),
        ("What is 3^4?", "3^4 = 9 * 9 = 81.", "81",
         "3^4 = 3^2 * 3^2 = 9 * 9 = 81. \\boxed{81}"),
    ]  # fmt: skip
    examples = []
    for problem, solution, answer, response in cases:
        head = f"## Problem:\n{problem}\n\n"
        examples.append(
            TrainingExample(
                prompt(head + "Begin your step-by-step thinking process.\n"),
                prompt(head + f"## Reference Solution(s):\n{solution}\n"),
                prompt(head + f"Hint: The final answer is {answer}.\nBegin your thinking."),
                tokenizer(response, add_special_tokens=False)["input_ids"],
            )
        )
    return examples


def response_log_probs(peft_model, prompt, response, *, adapter: bool) -> torch.Tensor:
    """`(T, V)` log-probabilities of the model at the response positions after `prompt`."""
    ids = torch.tensor([[*prompt, *response]])
    if adapter:
        logits = peft_model(input_ids=ids).logits[0]
    else:
        with peft_model.disable_adapter():
            logits = peft_model(input_ids=ids).logits[0]
    start = len(prompt) - 1  # the logit predicting response token 0
    return torch.log_softmax(logits[start : start + len(response)].double(), -1)


def kl_to_privileged_on_training_positions(peft_model, examples, *, adapter: bool) -> float:
    """Mean KL(learner || PS) over the response positions, computed here from plain forwards
    (not through the engine's views): the learner with the adapter on or off, PS always off."""
    values = []
    peft_model.eval()
    with torch.no_grad():
        for example in examples:
            response = list(example.response_ids)
            learner = response_log_probs(
                peft_model, example.learner_prompt_ids, response, adapter=adapter
            )
            privileged = response_log_probs(
                peft_model, example.privileged_prompt_ids, response, adapter=False
            )
            kl = (learner.exp() * (learner - privileged)).sum(-1)  # (T,) KL(learner || PS)
            values.extend(kl.tolist())
    return sum(values) / len(values)


@pytest.mark.slow
def test_the_all_warm_up_launch_is_refused_on_the_embedded_model(embedded_model_dir, tmp_path):
    """The case found in review: 2 traces, batch 2, 1 epoch and 5 warm-up steps gave one step
    at learning rate 0 and an adapter whose lora_B were all exactly 0."""
    config = DailTrainingConfig(
        effective_batch_size=2, epochs=1, lora_r=8, lora_alpha=8, max_length=256, device="cpu"
    )
    assert config.planned_steps(2) == 1 and config.warmup_steps == 5
    with pytest.raises(TrainingDataError, match=r"warmup_steps \(5\).*1 planned"):
        train_adapter(embedded_model_dir, embedded_examples(embedded_model_dir), config, tmp_path)
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_a_tiny_dail_run_on_the_embedded_model_moves_the_learner_toward_the_privileged_view(
    embedded_model_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    examples = embedded_examples(embedded_model_dir)
    config = DailTrainingConfig(
        effective_batch_size=2,
        epochs=4,
        warmup_steps=1,
        learning_rate=1e-3,
        lora_r=8,
        lora_alpha=8,
        max_length=256,
        device="cpu",
        reference_cache=False,
    )
    result = train_adapter(embedded_model_dir, examples, config, tmp_path)
    assert result.status == "completed" and result.global_step == config.planned_steps(2) == 4
    assert all(math.isfinite(h["loss"]) for h in result.history)

    weights = adapter_weights(result.adapter_dir)
    assert any(w.abs().max() > 0 for n, w in weights.items() if "lora_B" in n)
    assert result.update_norm > 1e-3 and not did_not_move(result.update_norm)

    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(embedded_model_dir), result.adapter_dir
    )
    before = kl_to_privileged_on_training_positions(trained, examples, adapter=False)
    after = kl_to_privileged_on_training_positions(trained, examples, adapter=True)
    print(f"KL(learner || PS) on the training positions: base {before:.4f} -> adapter {after:.4f}")
    assert before > 0.05  # the privileged view really differs from the learner's
    assert after < 0.9 * before
