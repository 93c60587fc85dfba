"""Reads for evaluations: the list, results (metrics computed from the stored samples, with
people's rulings applied), comparisons of several evaluations, a problem's samples, exports.

Metrics cover the problems whose n samples are all stored, so a running evaluation shows its
results so far; the page says how many problems that is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Count, Q, QuerySet

from curation.models import Problem
from training.engine import evaluation as engine
from training.engine.metrics import Estimate
from training.models import Evaluation, EvaluationProblem, EvaluationSample, Ruling


def evaluation_list() -> QuerySet[Evaluation]:
    evaluations = Evaluation.objects.select_related("job", "dataset", "created_by")
    return evaluations.order_by("-created_at", "-id").annotate(
        problem_count=Count("problems", distinct=True),
        sample_count=Count("problems__samples", distinct=True),
        pending_rulings=Count(
            "problems__samples",
            filter=Q(problems__samples__checkers_disagree=True, problems__samples__ruling=""),
            distinct=True,
        ),
        correct_count=Count(
            "problems__samples",
            filter=Q(problems__samples__ruling=Ruling.CORRECT)
            | Q(problems__samples__ruling="", problems__samples__auto_correct=True),
            distinct=True,
        ),
    )


def evaluation_get(evaluation_id: int) -> Evaluation:
    return Evaluation.objects.select_related("job", "dataset", "created_by").get(pk=evaluation_id)


@dataclass
class ProblemRow:
    """One problem of one evaluation: counts and pass@k (None until all n samples exist)."""

    eval_problem_id: int
    problem_id: int
    external_id: str
    dataset: str
    in_training: bool
    samples: int
    correct: int
    boxed: int
    flagged: int
    pending: int
    mean_tokens: float | None
    pass_at_k: dict[int, Estimate] = field(default_factory=dict)
    largest_k: int = 0

    @property
    def pass_at_largest_k(self) -> Estimate | None:
        return self.pass_at_k.get(self.largest_k)


@dataclass
class EvaluationResult:
    evaluation: Evaluation
    metrics: engine.EvaluationMetrics | None
    problems: list[ProblemRow]
    complete_problems: int
    samples: int
    correct_samples: int
    boxed: int
    truncated: int  # samples that hit max_new_tokens without finishing
    flagged: int
    pending_rulings: int
    rulings: int
    overturned: int  # rulings that differ from the checkers' verdict
    forced: int = 0  # samples given a force-answer pass (release protocol)
    forced_tokens: int = 0  # tokens those passes generated (counted in the samples' tokens)

    @property
    def correct_share(self) -> float | None:
        return self.correct_samples / self.samples if self.samples else None

    @property
    def solved_problems(self) -> int:
        return sum(1 for p in self.problems if p.correct)

    @property
    def total_problems(self) -> int:
        return len(self.problems)

    @property
    def in_training(self) -> int:
        return sum(p.in_training for p in self.problems)

    @property
    def label(self) -> str:
        return f"#{self.evaluation.pk} {self.evaluation.name}"

    def chart_series(self) -> dict[str, Any]:
        data = self.metrics.to_dict() if self.metrics else {"pass_at_k": [], "budget_curves": {}}
        return {
            "id": self.evaluation.pk,
            "label": self.label,
            "model": self.evaluation.model_label,
            "pass_at_k": data["pass_at_k"],
            "budget_curves": data["budget_curves"],
        }


def evaluation_results(evaluations: Sequence[Evaluation]) -> list[EvaluationResult]:
    """Results of several evaluations: two queries whatever their size."""
    ids = [e.pk for e in evaluations]
    members = defaultdict(list)
    for member in (
        EvaluationProblem.objects.filter(evaluation_id__in=ids)
        .select_related("problem__dataset")
        .order_by("evaluation_id", "position")
    ):
        members[member.evaluation_id].append(member)
    samples = defaultdict(list)
    for row in EvaluationSample.objects.filter(eval_problem__evaluation_id__in=ids).values_list(
        "eval_problem_id",
        "token_count",
        "auto_correct",
        "ruling",
        "has_answer",
        "checkers_disagree",
        "finish_reason",
        "forced_tokens",
    ):
        samples[row[0]].append(row[1:])
    results = []
    for evaluation in evaluations:
        n = evaluation.samples_per_problem
        rows: list[ProblemRow] = []
        outcomes: dict[str, list[engine.SampleOutcome]] = {}
        totals = defaultdict(int)
        for member in members[evaluation.pk]:
            stored = samples[member.pk]
            judged = []
            for tokens, auto, ruling, boxed, disagree, finish, forced in stored:
                correct = ruling == Ruling.CORRECT if ruling else auto
                judged.append(
                    engine.SampleOutcome(correct=correct, tokens=tokens, forced_tokens=forced)
                )
                totals["forced"] += bool(forced)
                totals["forced_tokens"] += forced
                totals["correct"] += correct
                totals["truncated"] += finish == "length"
                totals["boxed"] += boxed
                totals["flagged"] += disagree
                totals["pending"] += disagree and not ruling
                totals["rulings"] += bool(ruling)
                totals["overturned"] += bool(ruling) and correct != auto
            rows.append(
                ProblemRow(
                    eval_problem_id=member.pk,
                    problem_id=member.problem_id,
                    external_id=member.problem.external_id,
                    dataset=member.problem.dataset.name,
                    in_training=member.in_training,
                    samples=len(stored),
                    correct=sum(o.correct for o in judged),
                    boxed=sum(s[3] for s in stored),
                    flagged=sum(s[4] for s in stored),
                    pending=sum(bool(s[4] and not s[2]) for s in stored),
                    mean_tokens=sum(o.tokens for o in judged) / len(judged) if judged else None,
                    largest_k=max(evaluation.ks),
                )
            )
            if len(stored) >= n:
                outcomes[str(member.problem_id)] = judged[:n]
            totals["samples"] += len(stored)
        metrics = None
        if outcomes:
            metrics = engine.evaluation_metrics(
                outcomes, evaluation.ks, evaluation.budgets, seed=evaluation.seed
            )
            for row in rows:
                row.pass_at_k = metrics.overall.per_problem.get(str(row.problem_id), {})
        results.append(
            EvaluationResult(
                evaluation=evaluation,
                metrics=metrics,
                problems=rows,
                complete_problems=len(outcomes),
                samples=totals["samples"],
                correct_samples=totals["correct"],
                boxed=totals["boxed"],
                truncated=totals["truncated"],
                flagged=totals["flagged"],
                pending_rulings=totals["pending"],
                rulings=totals["rulings"],
                overturned=totals["overturned"],
                forced=totals["forced"],
                forced_tokens=totals["forced_tokens"],
            )
        )
    return results


def evaluation_result(evaluation: Evaluation) -> EvaluationResult:
    return evaluation_results([evaluation])[0]


@dataclass
class Comparison:
    results: list[EvaluationResult]
    ks: list[int]  # every k any evaluation reports
    budgets: list[int]
    warnings: list[str]
    problems: list[dict[str, Any]]  # union of problems: id, name, and each evaluation's row

    def chart_data(self) -> dict[str, Any]:
        return {
            "ks": self.ks,
            "budgets": self.budgets,
            "evaluations": [r.chart_series() for r in self.results],
        }


def _differences(
    evaluations: Sequence[Evaluation], problem_sets: list[frozenset[int]]
) -> list[str]:
    warnings = []
    protocols = {e.protocol for e in evaluations}
    if len(protocols) > 1:
        warnings.append(
            f"Not comparable: the evaluations used different sampling protocols "
            f"({', '.join(sorted(protocols))}); the release protocol's presence penalty, stop "
            "at </think> and forced answers change what is counted."
        )
    if len(set(problem_sets)) > 1:
        common = frozenset.intersection(*problem_sets)
        warnings.append(
            f"The evaluations ran on different problem sets ({', '.join(str(len(s)) for s in problem_sets)} "
            f"problems; {len(common)} in common): their numbers are not directly comparable."
        )
    for label, attribute in (
        ("samples per problem (n)", "samples_per_problem"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top-k", "top_k"),
        ("prompt template", "prompt_template"),
    ):
        values = {getattr(e, attribute) for e in evaluations}
        if len(values) > 1:
            shown = (
                ", ".join(sorted("none" if v is None else str(v) for v in values))
                if attribute != "prompt_template"
                else ""
            )
            warnings.append(f"Different {label}{': ' + shown if shown else ''}.")
    overlapping = [f"#{e.pk}" for e in evaluations if e.training_overlap]
    if overlapping:
        warnings.append(
            f"{', '.join(overlapping)} include problems from the adapter's training data "
            "(flagged ▲ below): those numbers overstate what the adapter learned."
        )
    return warnings


def evaluation_comparison(evaluation_ids: Iterable[int]) -> Comparison:
    ids = list(dict.fromkeys(int(i) for i in evaluation_ids))
    found = {
        e.pk: e for e in Evaluation.objects.select_related("job", "dataset").filter(pk__in=ids)
    }
    evaluations = [found[i] for i in ids if i in found]
    results = evaluation_results(evaluations)
    ks = sorted({k for e in evaluations for k in e.ks})
    budgets = sorted({b for e in evaluations for b in e.budgets})
    sets = [frozenset(p.problem_id for p in r.problems) for r in results]
    by_problem: dict[int, dict[str, Any]] = {}
    for column, result in enumerate(results):
        for row in result.problems:
            entry = by_problem.setdefault(
                row.problem_id,
                {
                    "problem_id": row.problem_id,
                    "name": f"{row.dataset}/{row.external_id}",
                    "rows": [None] * len(results),
                },
            )
            entry["rows"][column] = row
    problems = sorted(by_problem.values(), key=lambda e: e["name"])
    return Comparison(
        results, ks, budgets, _differences(evaluations, sets) if results else [], problems
    )


@dataclass
class ProblemSamples:
    evaluation: Evaluation
    member: EvaluationProblem | None
    samples: list[EvaluationSample]


def problem_samples(
    problem_id: int, evaluation_ids: Iterable[int]
) -> tuple[Problem, list[ProblemSamples]]:
    """A problem and, for each evaluation, its pinned answer and samples (in sample order)."""
    problem = Problem.objects.select_related("dataset").get(pk=problem_id)
    ids = list(dict.fromkeys(int(i) for i in evaluation_ids))
    evaluations = {e.pk: e for e in Evaluation.objects.filter(pk__in=ids)}
    members = {
        m.evaluation_id: m
        for m in EvaluationProblem.objects.filter(
            problem=problem, evaluation_id__in=ids
        ).prefetch_related("samples__ruled_by")
    }
    return problem, [
        ProblemSamples(
            evaluations[i], members.get(i), list(members[i].samples.all()) if i in members else []
        )
        for i in ids
        if i in evaluations
    ]


def flagged_samples(evaluation: Evaluation, limit: int = 200) -> QuerySet[EvaluationSample]:
    """Samples whose checkers disagree, those without a ruling first."""
    return (
        EvaluationSample.objects.filter(eval_problem__evaluation=evaluation, checkers_disagree=True)
        .select_related("eval_problem__problem", "ruled_by")
        .order_by("-ruling", "eval_problem__position", "sample_index")[:limit]
    )


# --- Exports ---------------------------------------------------------------------------------

EXPORT_COLUMNS = [
    "evaluation_id", "evaluation", "model", "adapter", "scope", "problem", "k", "budget",
    "pass_at_k", "low", "high", "samples", "correct", "mean_tokens",
]  # fmt: skip


def export_rows(comparison: Comparison) -> list[dict[str, Any]]:
    """Flat rows for CSV: overall pass@k, pass@k at each budget, and per-problem pass@k."""
    rows = []
    for result in comparison.results:
        e, m = result.evaluation, result.metrics
        if m is None:
            continue
        base = {
            "evaluation_id": e.pk,
            "evaluation": e.name,
            "model": e.base_model_path,
            "adapter": e.adapter_path,
        }
        for k in m.ks:
            est = m.overall.overall[k]
            rows.append({**base, "scope": "overall", "problem": "", "k": k, "budget": "",
                         "pass_at_k": est.value, "low": est.low, "high": est.high,
                         "samples": m.samples, "correct": m.correct_samples,
                         "mean_tokens": m.mean_tokens})  # fmt: skip
            for budget in m.budgets:
                est = m.by_budget[budget].overall[k]
                rows.append({**base, "scope": "budget", "problem": "", "k": k, "budget": budget,
                             "pass_at_k": est.value, "low": est.low, "high": est.high,
                             "samples": m.samples, "correct": "", "mean_tokens": ""})  # fmt: skip
        for row in result.problems:
            for k, est in row.pass_at_k.items():
                rows.append({**base, "scope": "problem", "problem": f"{row.dataset}/{row.external_id}",
                             "k": k, "budget": "", "pass_at_k": est.value, "low": est.low,
                             "high": est.high, "samples": row.samples, "correct": row.correct,
                             "mean_tokens": row.mean_tokens})  # fmt: skip
    return rows


def export_document(comparison: Comparison) -> dict[str, Any]:
    """The JSON export: settings, metrics and per-problem results of each evaluation."""
    documents = []
    for result in comparison.results:
        e = result.evaluation
        documents.append(
            {
                "id": e.pk,
                "name": e.name,
                "state": e.job.state if e.job else None,
                "base_model_path": e.base_model_path,
                "adapter_path": e.adapter_path,
                "backend": e.backend,
                "dataset": e.dataset.name if e.dataset else None,
                "split": e.split,
                "split_params": e.split_params,
                "samples_per_problem": e.samples_per_problem,
                "ks": e.ks,
                "budgets": e.budgets,
                "temperature": e.temperature,
                "top_p": e.top_p,
                "top_k": e.top_k,
                "seed": e.seed,
                "prompt_template": e.prompt_template,
                "training_snapshot": e.training_snapshot,
                "problems_in_training_data": result.in_training,
                "complete_problems": result.complete_problems,
                "samples_with_boxed_answer": result.boxed,
                "samples_flagged": result.flagged,
                "rulings": result.rulings,
                "metrics": result.metrics.to_dict() if result.metrics else None,
                "problems": [
                    {
                        "problem_id": row.problem_id,
                        "name": f"{row.dataset}/{row.external_id}",
                        "in_training": row.in_training,
                        "samples": row.samples,
                        "correct": row.correct,
                        "boxed": row.boxed,
                        "mean_tokens": row.mean_tokens,
                    }
                    for row in result.problems
                ],
            }
        )
    return {"warnings": comparison.warnings, "evaluations": documents}
