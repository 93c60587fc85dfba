"""Small factories for test data."""

from __future__ import annotations

import itertools

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from dailweb.jobs.models import Job, JobState

_counter = itertools.count(1)


def make_user(role: str | None = None, username: str | None = None, password: str = "pw"):
    User = get_user_model()
    user = User.objects.create_user(username=username or f"user{next(_counter)}", password=password)
    if role:
        user.groups.add(Group.objects.get_or_create(name=role)[0])
    return user


def make_job(state: str = JobState.QUEUED, kind: str = "worker_check", **fields) -> Job:
    defaults = {
        "title": "test job",
        "queue": "default",
        "params": {"steps": 3, "seconds_per_step": 0},
        "task_id": f"task-{next(_counter)}",
    }
    defaults.update(fields)
    return Job.objects.create(kind=kind, state=state, **defaults)


def make_dataset(name: str | None = None, kind: str = "verifiable"):
    from curation.models import Dataset

    return Dataset.objects.create(name=name or f"dataset-{next(_counter)}", kind=kind)


def make_problem(
    author=None,
    dataset=None,
    statement: str = "Find $x$ if $2x + 1 = 7$.",
    solution: str = "We have $2x + 1 = 7$, so $2x = 6$ and $x = 3$. The answer is $3$.",
    answer: str = "3",
    waypoints=(),
):
    from curation.services.problems import problem_create

    return problem_create(
        dataset=dataset or make_dataset(),
        statement=statement,
        solution=solution,
        answer=answer,
        author=author,
        waypoints=list(waypoints),
    )


def make_trace_arrays(tokens: int = 32, seed: int = 0, text_piece: str = "x = $a^2$ and "):
    """A trace of `tokens` tokens with plausible per-token data (random numbers, real text)."""
    import numpy as np

    from expansion.engine.trace_format import TraceArrays

    rng = np.random.default_rng(seed)
    pieces = [text_piece[i % len(text_piece)] for i in range(tokens)]
    top = 5
    return TraceArrays(
        text="".join(pieces),
        token_ids=rng.integers(0, 49152, size=tokens),
        char_lengths=np.ones(tokens, dtype=np.int64),
        sources=(rng.random(tokens) < 0.2).astype(np.int8),
        draws=rng.integers(1, 5, size=tokens).astype(np.int8),
        learner_logprobs=-rng.random(tokens).astype(np.float32) * 3,
        privileged_logprobs=-rng.random(tokens).astype(np.float32) * 3,
        negative_logprobs=-rng.random(tokens).astype(np.float32) * 3,
        privileged_top_ids=rng.integers(0, 49152, size=(tokens, top)),
        privileged_top_logprobs=-rng.random((tokens, top)).astype(np.float32) * 5,
        negative_top_ids=rng.integers(0, 49152, size=(tokens, top)),
        negative_top_logprobs=-rng.random((tokens, top)).astype(np.float32) * 5,
    )


def make_run(
    problems: int = 2,
    samples: int = 2,
    tokens: int = 32,
    model_path: str = "/nonexistent",
    **fields,
):
    """An expansion run with stored traces (no model involved)."""
    from curation.services.suggestions import partial_solution_text
    from expansion.engine.prompts import PromptTemplates
    from expansion.engine.rollout import RolloutConfig
    from expansion.engine.trace_format import encode_trace
    from expansion.models import ExpansionRun, RunProblem, Trace

    run = ExpansionRun.objects.create(
        name=fields.pop("name", "test run"),
        model_path=model_path,
        rollout_config=RolloutConfig().to_dict(),
        templates=PromptTemplates().to_dict(),
        samples_per_problem=samples,
        **fields,
    )
    dataset = make_dataset()
    for position in range(problems):
        problem = make_problem(dataset=dataset)
        version = problem.versions.get()
        run_problem = RunProblem.objects.create(
            run=run,
            problem=problem,
            solution_version=version,
            answer=problem.answer,
            partial_solution=partial_solution_text(
                body=version.body, answer=problem.answer, spans=[]
            ),
            position=position,
        )
        for sample in range(samples):
            arrays = make_trace_arrays(tokens, seed=position * 100 + sample)
            scores = arrays.negative_logprobs - arrays.privileged_logprobs
            Trace.objects.create(
                run=run,
                run_problem=run_problem,
                sample_index=sample,
                data=encode_trace(arrays),
                length=tokens,
                fallback_share=float(arrays.sources.mean()),
                shortcut_max=float(scores.max()),
                shortcut_mean_positive=float(scores.clip(0).mean()),
                shortcut_share=float((scores > 1).mean()),
                finish_reason="eos",
                answer_correct=sample % 2 == 0,
                kept=sample % 2 == 0,
            )
    return run


def bulk_traces(run, count: int, tokens: int = 16) -> None:
    """Add `count` traces to the first problem-slot of `run` quickly (one shared small blob)."""
    import random

    from expansion.engine.trace_format import encode_trace
    from expansion.models import RunProblem, Trace

    run_problem = RunProblem.objects.filter(run=run).first()
    blob = encode_trace(make_trace_arrays(tokens))
    rng = random.Random(0)
    start = run_problem.traces.count()
    batch = []
    for index in range(start, start + count):
        batch.append(
            Trace(
                run=run,
                run_problem=run_problem,
                sample_index=index,
                data=blob,
                length=tokens,
                fallback_share=rng.random(),
                shortcut_max=rng.uniform(-1, 6),
                shortcut_mean_positive=rng.random(),
                shortcut_share=rng.random(),
                finish_reason="eos",
                answer_correct=rng.random() < 0.5,
                kept=rng.random() < 0.5,
            )
        )
        if len(batch) == 5000:
            Trace.objects.bulk_create(batch)
            batch = []
    Trace.objects.bulk_create(batch)
