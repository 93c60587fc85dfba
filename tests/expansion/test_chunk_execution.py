"""An expansion chunk executed in-process on a tiny model (the job code without a worker): what
it reports while it works, and that the scores it stores are scoring's numbers although the
rollout recorded the privileged view's on the way (an independent re-scoring of the stored
traces from their prompts)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from expansion.engine import pipeline, rollout_fast
from expansion.engine.pipeline import view_prompts_for
from expansion.engine.prompts import PromptTemplates
from expansion.engine.scoring import ScoringRequest, score_traces
from expansion.engine.trace_format import decode_trace
from expansion.models import Trace
from expansion.services.runs import (
    RunSettings,
    expansion_chunk_execute,
    expansion_run_launch,
    run_problem_item,
)
from tests.factories import make_dataset, make_problem, make_user

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("single_torch_thread")]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch

    from tests.engine.conftest import build_tiny_tokenizer, make_tiny_model

    path = tmp_path_factory.mktemp("chunk-tiny-model")
    make_tiny_model(torch.float32, seed=3).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def test_a_chunk_reports_the_rollout_before_its_prefill_and_stores_scorings_numbers(
    tiny_model_dir, broker_url, clean_queues, monkeypatch
):
    dataset = make_dataset(kind="verifiable")
    problems = [
        make_problem(
            dataset=dataset,
            statement=f"Compute ${n} + {n + 1}$.",
            solution=f"${n} + {n + 1} = {2 * n + 1}$, so the answer is $\\boxed{{{2 * n + 1}}}$.",
            answer=str(2 * n + 1),
        )
        for n in range(3)
    ]
    run = expansion_run_launch(
        settings=RunSettings(
            name="chunk",
            model_path=str(tiny_model_dir),
            samples_per_problem=2,
            rollout={"tau": 1.0, "max_new_tokens": 12, "seed": 4},
            top_n=3,
        ),
        problem_ids=[p.pk for p in problems],
        launched_by=make_user("admin"),
    )
    events: list[str] = []
    real_rollout = rollout_fast.TransformersBackend.rollout

    def rollout(self, *args, **kwargs):
        events.append("<rollout starts>")
        return real_rollout(self, *args, **kwargs)

    monkeypatch.setattr(rollout_fast.TransformersBackend, "rollout", rollout)
    expansion_chunk_execute(
        run_id=run.pk,
        chunk_index=0,
        progress=lambda done, total, message: events.append(message),
        log=lambda message: None,
    )
    # "loading", then a rollout message before the engine starts (the prefill reports
    # nothing): a progress bar leaves "loading" once the model is loaded.
    assert events[0].startswith("loading")
    assert events[1] == "rollout: 3 problems, 0 stored"
    assert events[2] == "<rollout starts>"
    assert events[-1] == "3 problems stored"

    # The stored scores against scoring the stored traces afresh under all three views.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    members = list(run.run_problems.select_related("problem", "solution_version"))
    prompts = view_prompts_for(
        tokenizer,
        [run_problem_item(m) for m in members],
        PromptTemplates.from_dict(run.templates),
        reasoning=False,
        max_prompt_tokens=None,
    )
    traces = list(Trace.objects.filter(run=run).select_related("run_problem"))
    assert len(traces) == 6
    position = {m.pk: n for n, m in enumerate(members)}
    stored, requests = [], []
    for trace in traces:
        arrays = decode_trace(bytes(trace.data))
        p = prompts[position[trace.run_problem_id]]
        stored.append(arrays)
        requests.append(
            ScoringRequest(p.learner_ids, p.privileged_ids, p.negative_ids, arrays.token_ids)
        )
    assert sum(len(a) for a in stored) > 20
    close = {"rtol": 1e-3, "atol": 1e-3}  # traces store log-probs as float16
    for arrays, fresh in zip(stored, score_traces(model, requests, top_n=3), strict=True):
        for view in ("learner", "privileged", "negative"):
            expected = getattr(fresh, f"{view}_logprobs")
            np.testing.assert_allclose(getattr(arrays, f"{view}_logprobs"), expected, **close)
        np.testing.assert_array_equal(arrays.privileged_top_ids, fresh.privileged_top_ids)
        np.testing.assert_allclose(
            arrays.privileged_top_logprobs, fresh.privileged_top_logprobs, **close
        )


def test_an_answer_read_from_a_trace_with_nul_bytes_is_stored(
    tiny_model_dir, broker_url, clean_queues, monkeypatch
):
    """A model can emit NUL; PostgreSQL text columns refuse it. The answer read from such a
    trace is stored with U+FFFD in its place (the trace's own text lives in the blob)."""
    dataset = make_dataset(kind="verifiable")
    problem = make_problem(dataset=dataset, statement="Compute $1 + 1$.", answer="2")
    real = pipeline.mark_kept

    def answers_with_nul(texts, expected, **kwargs):
        kept, checks = real(texts, expected, **kwargs)
        return kept, [dataclasses.replace(c, predicted="2\x00") for c in checks]

    monkeypatch.setattr(pipeline, "mark_kept", answers_with_nul)
    run = expansion_run_launch(
        settings=RunSettings(
            name="nul", model_path=str(tiny_model_dir), samples_per_problem=2,
            rollout={"max_new_tokens": 4},
        ),
        problem_ids=[problem.pk],
        launched_by=make_user("admin"),
    )  # fmt: skip
    expansion_chunk_execute(run_id=run.pk, chunk_index=0, progress=lambda *a: None, log=print)
    answers = list(Trace.objects.filter(run=run).values_list("answer_extracted", flat=True))
    assert answers == ["2\ufffd", "2\ufffd"]
