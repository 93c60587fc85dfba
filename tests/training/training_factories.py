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
