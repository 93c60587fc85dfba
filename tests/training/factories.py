"""Evaluations with stored samples (no model involved)."""

from __future__ import annotations

from dailweb.jobs.models import JobState
from tests.factories import make_dataset, make_job, make_problem


def make_evaluation(
    problems: int = 2,
    samples: int = 2,
    *,
    job_state: str = JobState.SUCCEEDED,
    correct=lambda p, s: s == 0,
    tokens=lambda p, s: 10 + 5 * s,
    answers=None,
    dataset=None,
    on_problems=None,
    **fields,
):
    """An evaluation over `problems` new problems with `samples` stored samples each.

    `correct(p, s)` / `tokens(p, s)` say whether sample s of problem p is correct and how many
    tokens it used. A correct sample boxes the answer; a wrong one boxes something else.
    `on_problems`: evaluate these existing problems instead of new ones."""
    from training.engine.evaluation import EVALUATION_TEMPLATE
    from training.engine.metrics import default_ks
    from training.models import Evaluation, EvaluationProblem, EvaluationSample

    dataset = dataset or (on_problems[0].dataset if on_problems else make_dataset())
    settings = {
        "name": "test evaluation",
        "base_model_path": "/models/base",
        "split": "all",
        "samples_per_problem": samples,
        "ks": default_ks(samples),
        "budgets": [16, 64],
        "temperature": 0.6,
        "top_p": 0.95,
        "prompt_template": EVALUATION_TEMPLATE,
        "dataset": dataset,
    } | fields
    job = make_job(state=job_state, kind="evaluation", queue="gpu", params={})
    evaluation = Evaluation.objects.create(job=job, **settings)
    job.params = {"evaluation_id": evaluation.pk}
    job.save(update_fields=["params"])
    for p in range(len(on_problems) if on_problems else problems):
        if on_problems:
            problem, answer = on_problems[p], on_problems[p].answer
        else:
            answer = answers[p] if answers else str(p + 3)
            problem = make_problem(
                dataset=dataset, statement=f"Compute $x_{p}$, the ${p}$th value.", answer=answer
            )
        member = EvaluationProblem.objects.create(
            evaluation=evaluation, problem=problem, answer=answer, position=p
        )
        for s in range(samples):
            ok = correct(p, s)
            EvaluationSample.objects.create(
                eval_problem=member,
                sample_index=s,
                text=f"We find $x = {answer if ok else 0}$, so \\boxed{{{answer if ok else 0}}}.",
                token_count=tokens(p, s),
                finish_reason="eos",
                answer_extracted=answer if ok else "0",
                has_answer=True,
                math_verify=ok,
                string_match=ok,
                auto_correct=ok,
            )
    return evaluation
