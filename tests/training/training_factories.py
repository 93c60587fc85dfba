"""Expansion runs whose traces a real tokenizer produced, for the training-run tests.

`make_run` (tests/factories.py) stores random token ids; training reads token ids, so these
helpers replace each trace's ids by the base model's own tokenization of a plausible response
(+ EOS), with the text and character offsets that go with them. Short prompt templates keep
the three views small (a run's templates are data, editable per run), so a step of the real
135M model takes about a second on a CPU.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from expansion.engine.prompts import PromptTemplates
from tests.factories import make_run

SHORT_TEMPLATES = PromptTemplates(
    learner="{problem}",
    privileged="{problem}\nSolution: {solution}",
    negative="{problem}\nHint: {partial_solution}",
).to_dict()

RESPONSES = (
    "From 2x + 1 = 7 we get 2x = 6, so x = 3. The answer is \\boxed{3}.",
    "Subtract 1: 2x = 6. Divide by 2: x = 3, hence \\boxed{3}.",
    "We solve 2x + 1 = 7. Then x = (7 - 1) / 2 = 3. \\boxed{3}",
)


def tokenizer_for(model_dir: Path | str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def make_tokenized_run(
    model_dir: Path | str,
    *,
    problems: int = 1,
    samples: int = 3,
    states=("accepted",),
    responses=RESPONSES,
    long_response: int | None = None,
    templates: dict | None = None,
    **fields,
):
    """An expansion run on `model_dir` whose traces are real tokenizations of `responses`.

    `states` is cycled over the traces in order (review states). `long_response`: the last
    trace gets that many extra tokens (for over-long tests)."""
    from expansion.engine.trace_format import char_offsets, encode_trace
    from expansion.models import Trace
    from tests.factories import make_trace_arrays

    run = make_run(
        problems=problems, samples=samples, tokens=4, model_path=str(model_dir), **fields
    )
    run.templates = templates or SHORT_TEMPLATES
    run.save(update_fields=["templates"])
    tokenizer = tokenizer_for(model_dir)
    traces = list(Trace.objects.filter(run=run).order_by("run_problem__position", "sample_index"))
    for index, trace in enumerate(traces):
        text = responses[index % len(responses)]
        if long_response and index == len(traces) - 1:
            text = text + " Check: 2 * 3 + 1 = 7." * (long_response // 8 + 1)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if long_response and index == len(traces) - 1:
            ids = ids[: 20 + long_response]
        ids = [*ids, tokenizer.eos_token_id]
        decoded, lengths = char_offsets(tokenizer, ids)
        arrays = dataclasses.replace(
            make_trace_arrays(len(ids), seed=index),
            text=decoded,
            token_ids=np.asarray(ids, dtype=np.int64),
            char_lengths=lengths,
        )
        trace.data = encode_trace(arrays)
        trace.length = len(ids)
        trace.review_state = states[index % len(states)]
        trace.save(update_fields=["data", "length", "review_state"])
    return run


def small_config(**overrides) -> dict:
    """DailTrainingConfig values for a 2-3 step run on a handful of short traces."""
    from training.engine.config import DailTrainingConfig

    values = {
        "effective_batch_size": 1,
        "micro_batch_size": 1,
        "epochs": 1,
        "max_length": 128,
        "warmup_steps": 0,
        "checkpoint_every": 1,
        "checkpoints_to_keep": None,
        "lora_r": 4,
        "lora_alpha": 8,
        "reference_cache": False,
    }
    return DailTrainingConfig(**{**values, **overrides}).to_dict()


def make_training_run(*, job_state: str = "running", metrics=(), **fields):
    """A training-run row with its job and optional metric rows (no model, no files).

    `metrics`: (loss, kl_privileged, kl_negative) per step."""
    from tests.factories import make_job
    from training.models import TrainingMetric, TrainingRun

    job = make_job(state=job_state, kind="training", queue="gpu", params={})
    values = {
        "name": "row only",
        "base_model_path": "/models/base",
        "objective": "dail",
        "config": small_config(),
        "snapshot_file": "/nonexistent/snapshot.jsonl.gz",
        "snapshot_sha256": "0" * 64,
        "output_dir": "/nonexistent",
        "total_steps": 4,
        "job": job,
    } | fields
    run = TrainingRun.objects.create(**values)
    job.params = {"training_run_id": run.pk}
    job.save(update_fields=["params"])
    for step, (loss, kl_ps, kl_nr) in enumerate(metrics, start=1):
        TrainingMetric.objects.create(
            run=run, step=step, epoch=step / 4, loss=loss, kl_privileged=kl_ps,
            kl_negative=kl_nr, lr=2e-4 * step / 4,
        )  # fmt: skip
    return run


def make_study(
    *,
    arms=("base", "sft_solutions", "dail"),
    state: str = "running",
    step: str = "evaluation",
    results: bool = False,
    problems: int = 4,
    samples: int = 4,
    correct=None,
    dataset=None,
    **fields,
):
    """A study row with its arms (no model, no files, no broker).

    `results`: each trained arm gets a succeeded training-run row and every arm a succeeded
    evaluation of `samples` samples on the same `problems` held-out problems; `correct(i, p, s)`
    says whether sample s of problem p is correct for the i-th arm (default: later arms solve
    more)."""
    from tests.factories import make_dataset, make_problem
    from tests.training.factories import make_evaluation
    from training.engine.evaluation import DEFAULT_PROTOCOL, EVALUATION_TEMPLATE
    from training.models import Study, StudyArm
    from training.studies.plan import ARMS

    dataset = dataset or make_dataset()
    held_out = [
        make_problem(dataset=dataset, statement=f"Compute ${p} + {p}$.", answer=str(2 * p))
        for p in range(problems)
    ]
    training = [make_problem(dataset=dataset, statement="Compute $1 + 1$.", answer="2")]
    ks = list(range(1, samples + 1))
    values = {
        "name": "test study",
        "dataset": dataset,
        "base_model_path": "/models/base",
        "held_out_fraction": 0.5,
        "training_problem_ids": [p.pk for p in training],
        "held_out_problem_ids": [p.pk for p in held_out],
        "acceptance": "automatic",
        "expansion_settings": {
            "preset": "release_dail",
            "samples_per_problem": 2,
            "rollout": {"max_new_tokens": 16},
            "kept_rule": "every_correct",
        },
        "training_settings": {"epochs": 1},
        "evaluation_settings": {
            "protocol": DEFAULT_PROTOCOL,
            "samples_per_problem": samples,
            "ks": ks,
            "budgets": [16, 64],
            "temperature": 0.6,
            "top_p": 0.95,
            "top_k": None,
            "seed": 0,
            "prompt_template": EVALUATION_TEMPLATE,
        },
        "estimate": {},
        "state": state,
        "step": step,
    } | fields
    study = Study.objects.create(**values)
    correct = correct or (lambda i, p, s: s < (p + i) % (samples + 1))
    for position, key in enumerate(arms):
        spec = ARMS[key]
        arm = StudyArm.objects.create(study=study, key=key, position=position)
        if not results:
            continue
        if spec.trains:
            arm.training_run = make_training_run(
                job_state="succeeded",
                name=f"{study.name}: {spec.label}",
                objective=spec.objective,
                config=small_config(gamma=spec.gamma),
                adapter_path=f"/artifacts/{key}/adapter",
                final_metrics={"loss": 0.5 + position},
            )
        arm.evaluation = make_evaluation(
            samples=samples,
            on_problems=held_out,
            name=f"{study.name}: {spec.label}",
            ks=ks,
            correct=lambda p, s, i=position: correct(i, p, s),
        )
        arm.save(update_fields=["training_run", "evaluation"])
    return study
