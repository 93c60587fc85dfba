"""The "expert solutions" data source of training runs: supervised fine-tuning on the current
solution version of each problem of a dataset (the paper's direct-SFT baseline).

Each record is one problem: its statement, its current solution version (number and body) and
answer, and the response trained on, which is the solution text with the answer appended in
`\\boxed{}` when the solution has no box of its own (the evaluation's checker,
`expansion.engine.answers.judge_completion`, reads the last box only, so a model trained on
unboxed solutions would never be graded correct). The prompt is the evaluation's learner
prompt (`training.engine.evaluation.evaluation_prompt_ids` with `EVALUATION_TEMPLATE`: the
learner view plus its request for a boxed answer), so SFT trains on exactly what an
evaluation asks; it is recorded in each record, like the trace records' templates. The
response ends with the tokenizer's end-of-sequence token, so the model learns to stop.

Optionally only the training side of the seeded held-out split: problems for which
`training.engine.evaluation.in_held_out_split(problem_key, fraction, seed)` is false, with the
evaluation's own `problem_key`, so an evaluation on the held-out split with the same fraction
and seed never sees a training problem.

The examples are learner-only (`TrainingExample.learner_only`): the objective is the NLL of the
response given the prompt (the existing "nll" objective and trainer). DAIL needs the three
views of expanded traces and is refused for this source.

Problems without a current solution version, and problems whose solution has no box and which
have no answer to box (proofs), are left out and counted; the counts, the dataset and the split
are recorded on the run (`TrainingRun.data_filter` with `"source": "expert_solutions"`) and in
the adapter's `dail-training.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curation.models import Dataset, Problem
from curation.selectors import problems_with_current_versions
from dailweb.errors import DomainError
from expansion.engine.answers import last_boxed_answer
from training.engine import evaluation as evaluation_engine
from training.engine.data import TrainingExample

EXPERT_SOURCE = "expert_solutions"  # TrainingRun.data_filter["source"]
EXPERT_RECORD = "expert_solution"  # a snapshot record's "source"


@dataclass(frozen=True)
class ExpertSolutionsChoice:
    """Which expert solutions to train on: a dataset, all of it (`held_out_fraction` None) or
    the training side of the seeded held-out split (fraction, seed)."""

    dataset_id: int | None
    held_out_fraction: float | None = None
    split_seed: int = 0
    # Exactly these problems of the dataset (database ids; a study's pinned training side,
    # which problems added to the dataset later do not change); empty: by the split.
    problem_ids: tuple[int, ...] = ()
    # The learner prompt the solutions follow (a study trains on the prompt it evaluates with).
    prompt_template: str = evaluation_engine.EVALUATION_TEMPLATE


def boxed_response(solution: str, answer: str) -> tuple[str, bool]:
    """The response trained on and whether a box was added: the solution as written when the
    answer checker finds a box in it, else the solution followed by the boxed answer."""
    if last_boxed_answer(solution) is not None:
        return solution, False
    return f"{solution.rstrip()}\n\nThe final answer is $\\boxed{{{answer.strip()}}}$.", True


def _dataset(choice: ExpertSolutionsChoice) -> Dataset:
    if not choice.dataset_id:
        raise DomainError(
            "Choose the dataset whose expert solutions to train on.",
            field_errors={"dataset": "required"},
        )
    dataset = Dataset.objects.filter(pk=choice.dataset_id).first()
    if dataset is None:
        raise DomainError("That dataset does not exist.", field_errors={"dataset": "unknown"})
    return dataset


def _training_side(problems: list[Problem], choice: ExpertSolutionsChoice) -> list[Problem]:
    """The problems outside the held-out split (the evaluation's split function and keys)."""
    from training.evaluations.services import problem_key

    fraction = choice.held_out_fraction
    try:
        evaluation_engine.check_seed("The split seed", choice.split_seed)
    except evaluation_engine.EvaluationError as exc:
        raise DomainError(f"{exc}.", field_errors={"split_seed": str(exc)}) from exc
    try:
        return [
            p
            for p in problems
            if not evaluation_engine.in_held_out_split(problem_key(p), fraction, choice.split_seed)
        ]
    except evaluation_engine.EvaluationError as exc:
        raise DomainError(f"{exc}.", field_errors={"held_out_fraction": str(exc)}) from exc


def expert_solution_records(
    choice: ExpertSolutionsChoice,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The snapshot records (one per problem, in the dataset's order) and the source's summary
    (what `TrainingRun.data_filter` records); refuses an empty dataset, a split that leaves no
    training problem, and a selection without a usable solution."""
    from training.evaluations.services import problem_key

    dataset = _dataset(choice)
    problems = list(Problem.objects.filter(dataset=dataset).select_related("dataset"))
    if not problems:
        raise DomainError(
            f"The dataset {dataset.name} has no problems; nothing was queued.",
            field_errors={"dataset": "empty"},
        )
    split = None
    chosen = problems
    if choice.problem_ids:
        wanted = set(choice.problem_ids)
        chosen = [p for p in problems if p.pk in wanted]
    if choice.held_out_fraction is not None:
        chosen = _training_side(chosen, choice)
        split = {"held_out_fraction": choice.held_out_fraction, "split_seed": choice.split_seed}
        if not chosen:
            raise DomainError(
                f"The held-out split (fraction {choice.held_out_fraction}, seed "
                f"{choice.split_seed}) puts all {len(problems)} problems of {dataset.name} in "
                "the held-out side: no training problem is left. Lower the fraction or change "
                "the seed; nothing was queued.",
                field_errors={"held_out_fraction": "leaves no training problem"},
            )
    records: list[dict[str, Any]] = []
    without_solution: list[str] = []
    without_answer: list[str] = []
    for problem in problems_with_current_versions(chosen):
        version = problem.current_version
        if version is None or not version.body.strip():
            without_solution.append(problem.external_id)
            continue
        if last_boxed_answer(version.body) is None and not problem.answer.strip():
            without_answer.append(problem.external_id)
            continue
        response, boxed_added = boxed_response(version.body, problem.answer)
        records.append(
            {
                "source": EXPERT_RECORD,
                "problem_pk": problem.pk,
                "problem_id": problem.external_id,
                "problem_key": problem_key(problem),
                "dataset": dataset.name,
                "problem": problem.statement,
                "solution_version": version.number,
                "solution": version.body,
                "answer": problem.answer,
                "response": response,
                "boxed_added": boxed_added,
                "prompt_template": choice.prompt_template,
                "reasoning": False,
            }
        )
    summary = {
        "source": EXPERT_SOURCE,
        "dataset_id": dataset.pk,
        "dataset": dataset.name,
        "split": split,
        "dataset_problems": len(problems),
        "held_out": len(problems) - len(chosen),
        "without_solution": len(without_solution),
        "without_answer": len(without_answer),
        "boxed_added": sum(1 for r in records if r["boxed_added"]),
        "problems": len(records),
    }
    if not records:
        reasons = []
        if without_solution:
            reasons.append(f"{len(without_solution)} have no solution")
        if without_answer:
            reasons.append(f"{len(without_answer)} have neither a boxed answer nor an answer")
        side = "on the training side of the split " if split else ""
        raise DomainError(
            f"No expert solution to train on: of the {len(chosen)} problems of {dataset.name} "
            f"{side}{', '.join(reasons)}. Write solutions (and answers) in the editor first; "
            "nothing was queued.",
            field_errors={"dataset": "no solutions"},
        )
    return records, summary


def expert_solution_example(record: dict[str, Any], tokenizer: Any) -> TrainingExample:
    """A learner-only example: the evaluation's learner prompt and the boxed solution + EOS."""
    try:
        prompt_ids = evaluation_engine.evaluation_prompt_ids(
            tokenizer, record["problem"], record["prompt_template"], bool(record["reasoning"])
        )
    except (evaluation_engine.EvaluationError, ValueError) as exc:
        raise DomainError(f"Problem {record['problem_id']}: {exc}") from exc
    response_ids = list(tokenizer(record["response"], add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response_ids.append(int(tokenizer.eos_token_id))
    return TrainingExample.learner_only(
        prompt_ids,
        response_ids,
        example_id=f"solution-{record['problem_pk']}-v{record['solution_version']}",
    )


def expert_source_description(summary: dict[str, Any]) -> str:
    """One line: "expert solutions of dataset X, train side of split (fraction f, seed s),
    N problems"."""
    split = summary.get("split")
    side = (
        f"train side of split (fraction {split['held_out_fraction']}, seed {split['split_seed']})"
        if split
        else "all problems"
    )
    count = summary.get("problems", 0)
    return (
        f"expert solutions of dataset {summary.get('dataset')}, {side}, {count} "
        f"problem{'s' if count != 1 else ''}"
    )
