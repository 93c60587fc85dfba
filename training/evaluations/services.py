"""Evaluations: launch (pin the problem set, check the model and adapter, queue one job on the
`gpu` queue), execute (sample, judge and store; resumable), cancel, retry, and a person's
ruling on a sample.

Refused at launch, before anything is queued: a problem set without final answers (pass@k
needs verifiable answers), k larger than n, a missing base model or adapter, an adapter
trained on another base model, problems that were in the adapter's training snapshot (unless
the admin explicitly allows it, in which case they stay flagged everywhere), and a backend
that cannot run here.

Execution draws several problems' sample batches in one backend call (up to
`settings.EVALUATION_MAX_BATCH_SIZE` sequences) and commits each problem's samples of a call
as soon as the call returns; a retried job samples only the batches still missing and stores
only the missing samples (on vLLM each sample is seeded by itself, so the result is the same
as an uninterrupted run; on transformers a call is seeded by the units it holds, so a resumed
evaluation draws its missing samples with the seeds of its own calls; see the engine).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings
from django.db import IntegrityError, transaction
from django.db.models import Count
from django.utils import timezone

from curation.models import Dataset, DatasetKind, Problem
from dailweb.errors import ConflictError, DomainError
from dailweb.jobs.models import ACTIVE_STATES, JobState
from dailweb.jobs.services import job_cancel, job_launch, job_retry
from dailweb.storable import storable_text
from expansion.engine.answers import judge_completion
from expansion.services.models import model_session_open, vllm_launch_refusal
from training.engine import evaluation as engine
from training.models import (
    Evaluation,
    EvaluationBackend,
    EvaluationProblem,
    EvaluationSample,
    EvaluationSplit,
    Ruling,
)

EVALUATION_KIND = "evaluation"
MAX_PROBLEMS = 5000


def problem_key(problem: Problem) -> str:
    """A problem's stable key (seeds and splits): dataset id and external id."""
    return f"{problem.dataset_id}/{problem.external_id}"


@dataclass(frozen=True)
class ProblemSetChoice:
    """Which problems to evaluate on (recorded with the evaluation)."""

    split: str = EvaluationSplit.ALL
    dataset_id: int | None = None
    held_out_fraction: float = 0.2
    split_seed: int = 0
    problem_ids: str = ""  # external ids, comma/space separated (split "ids")
    limit: int | None = None

    def params(self) -> dict[str, Any]:
        recorded: dict[str, Any] = {"limit": self.limit}
        if self.split == EvaluationSplit.HELD_OUT:
            recorded.update(fraction=self.held_out_fraction, seed=self.split_seed)
        if self.split == EvaluationSplit.IDS:
            recorded["external_ids"] = _split_ids(self.problem_ids)
        return recorded


@dataclass(frozen=True)
class EvaluationSettings:
    """What an admin chooses for an evaluation (validated by `evaluation_launch`)."""

    name: str
    base_model_path: str
    problem_set: ProblemSetChoice
    adapter_path: str = ""
    backend: str = EvaluationBackend.TRANSFORMERS
    samples_per_problem: int = 8
    ks: Sequence[int] = (1, 2, 4, 8)
    budgets: Sequence[int] = (256, 512)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int | None = None  # None: no top-k cut
    seed: int = 0
    batch_size: int = 8
    prompt_template: str = engine.EVALUATION_TEMPLATE
    reasoning: bool = False
    allow_training_overlap: bool = False
    protocol: str = engine.DEFAULT_PROTOCOL  # engine.EVALUATION_PROTOCOLS


def _split_ids(text: str) -> list[str]:
    return [w for w in re.split(r"[\s,]+", text or "") if w]


def evaluation_problem_set(choice: ProblemSetChoice) -> list[Problem]:
    """The problems a choice selects, in dataset and id order; refuses empty or unknown ones."""
    if choice.split not in EvaluationSplit.values:
        raise DomainError(f"Unknown split {choice.split!r}.")
    problems = Problem.objects.select_related("dataset").order_by("dataset__name", "external_id")
    dataset = None
    if choice.dataset_id:
        dataset = Dataset.objects.filter(pk=choice.dataset_id).first()
        if dataset is None:
            raise DomainError("That dataset does not exist.", field_errors={"dataset": "unknown"})
        problems = problems.filter(dataset=dataset)
    if choice.split == EvaluationSplit.IDS:
        wanted = _split_ids(choice.problem_ids)
        if not wanted:
            raise DomainError(
                "List the problem ids to evaluate on.", field_errors={"problem_ids": "empty"}
            )
        chosen = list(problems.filter(external_id__in=wanted))
        unknown = sorted(set(wanted) - {p.external_id for p in chosen})
        if unknown:
            raise DomainError(
                f"Unknown problem ids{' in ' + dataset.name if dataset else ''}: "
                f"{', '.join(unknown[:20])}.",
                field_errors={"problem_ids": "unknown ids"},
            )
    else:
        if dataset is None:
            raise DomainError("Choose a dataset.", field_errors={"dataset": "required"})
        chosen = list(problems)
        if choice.split == EvaluationSplit.HELD_OUT:
            try:
                engine.check_seed("The split seed", choice.split_seed)
            except engine.EvaluationError as exc:
                raise DomainError(f"{exc}.", field_errors={"split_seed": str(exc)}) from exc
            try:
                chosen = [
                    p
                    for p in chosen
                    if engine.in_held_out_split(
                        problem_key(p), choice.held_out_fraction, choice.split_seed
                    )
                ]
            except engine.EvaluationError as exc:
                raise DomainError(str(exc), field_errors={"held_out_fraction": str(exc)}) from exc
    if choice.limit:
        chosen = chosen[: choice.limit]
    if not chosen:
        raise DomainError("The chosen problem set is empty.")
    if len(chosen) > MAX_PROBLEMS:
        raise DomainError(f"An evaluation takes at most {MAX_PROBLEMS} problems.")
    return chosen


def _check_answers(problems: list[Problem]) -> None:
    proofs = sorted({p.dataset.name for p in problems if p.dataset.kind == DatasetKind.PROOF})
    missing = [p.external_id for p in problems if not p.answer.strip()]
    if proofs or missing:
        shown = ", ".join(missing[:20]) + (
            f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        )
        raise DomainError(
            "pass@k needs problems with verifiable final answers; "
            + (f"{', '.join(proofs)} holds proofs. " if proofs else "")
            + (f"{len(missing)} problem(s) have no answer: {shown}." if missing else "")
            + " Nothing was queued."
        )


def _check_model(base_model_path: str, adapter_path: str) -> None:
    base = Path(base_model_path)
    if not base_model_path.strip():
        raise DomainError("Choose a base model.", field_errors={"base_model_path": "required"})
    if not base.exists():
        raise DomainError(
            f"No base model at {base}: the path does not exist.",
            field_errors={"base_model_path": "does not exist"},
        )
    if base.is_dir() and (base / "adapter_config.json").is_file():
        raise DomainError(
            f"{base} is a LoRA adapter, not a base model: put it under Adapter and choose its "
            "base model.",
            field_errors={"base_model_path": "an adapter"},
        )
    if base.is_dir() and not (base / "config.json").is_file():
        raise DomainError(
            f"{base} is not a model directory: it has no config.json.",
            field_errors={"base_model_path": "no config.json"},
        )
    if adapter_path:
        try:
            engine.check_adapter_base(adapter_path, base)
        except engine.AdapterError as exc:
            raise DomainError(str(exc), field_errors={"adapter_path": str(exc)}) from exc


def _training_overlap(
    adapter_path: str, problems: list[Problem], allow: bool
) -> tuple[str, set[int]]:
    """(snapshot file or '', ids of chosen problems the adapter was trained on)."""
    if not adapter_path:
        return "", set()
    try:
        snapshot = engine.adapter_training_problem_ids(adapter_path)
    except engine.AdapterError as exc:
        raise DomainError(
            str(exc), field_errors={"adapter_path": "unreadable training snapshot"}
        ) from exc
    if snapshot is None:
        return "", set()
    overlap = {p.pk for p in problems} & snapshot.problem_ids
    if overlap and not allow:
        names = [p.external_id for p in problems if p.pk in overlap]
        raise DomainError(
            f"{len(overlap)} of the {len(problems)} problems were in this adapter's training "
            f"data ({snapshot.source}): {', '.join(names[:20])}"
            + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            + ". Evaluate on a held-out split, or tick “evaluate anyway” to keep them flagged.",
            field_errors={"allow_training_overlap": "overlap with training data"},
        )
    return str(snapshot.source), overlap


@transaction.atomic
def evaluation_launch(*, settings: EvaluationSettings, launched_by) -> Evaluation:
    """Create an evaluation (problems and answers pinned) and queue its job on `gpu`."""
    if not settings.name.strip():
        raise DomainError("Give the evaluation a name.", field_errors={"name": "required"})
    reason = (
        vllm_launch_refusal()
        if settings.backend == EvaluationBackend.VLLM
        else engine.backend_unavailable_reason(settings.backend)
    )
    if reason:
        raise DomainError(
            f"The {settings.backend} backend cannot run evaluations: {reason}. Choose "
            "transformers.",
            field_errors={"backend": reason},
        )
    try:
        engine.check_seed("seed", settings.seed)
    except engine.EvaluationError as exc:
        raise DomainError(f"Settings: {exc}.", field_errors={"seed": str(exc)}) from exc
    try:
        budgets = engine.validate_budgets(settings.budgets)
        sampling = engine.SamplingSettings(
            samples=settings.samples_per_problem,
            max_new_tokens=budgets[-1],
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            seed=settings.seed,
            batch_size=settings.batch_size,
            protocol=settings.protocol,
        )
    except engine.EvaluationError as exc:
        raise DomainError(f"Settings: {exc}.") from exc
    try:
        ks = engine.validate_ks(settings.ks, sampling.samples)
    except engine.EvaluationError as exc:
        raise DomainError(f"{exc}.", field_errors={"ks": str(exc)}) from exc
    if "{problem}" not in settings.prompt_template:
        raise DomainError(
            "The prompt template must contain {problem}.",
            field_errors={"prompt_template": "no {problem}"},
        )
    adapter_path = settings.adapter_path.strip()
    _check_model(settings.base_model_path.strip(), adapter_path)
    problems = evaluation_problem_set(settings.problem_set)
    _check_answers(problems)
    snapshot, overlap = _training_overlap(adapter_path, problems, settings.allow_training_overlap)

    choice = settings.problem_set
    evaluation = Evaluation.objects.create(
        name=settings.name.strip()[:200],
        created_by=launched_by if getattr(launched_by, "pk", None) else None,
        base_model_path=str(Path(settings.base_model_path.strip()).resolve()),
        adapter_path=str(Path(adapter_path).resolve()) if adapter_path else "",
        backend=settings.backend,
        dataset_id=choice.dataset_id,
        split=choice.split,
        split_params=choice.params(),
        samples_per_problem=sampling.samples,
        ks=ks,
        budgets=budgets,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
        batch_size=sampling.batch_size,
        prompt_template=settings.prompt_template,
        reasoning=settings.reasoning,
        protocol=sampling.protocol,
        training_snapshot=snapshot,
        training_overlap=len(overlap),
        overlap_allowed=bool(overlap) and settings.allow_training_overlap,
    )
    EvaluationProblem.objects.bulk_create(
        EvaluationProblem(
            evaluation=evaluation,
            problem=problem,
            answer=problem.answer.strip(),
            position=position,
            in_training=problem.pk in overlap,
        )
        for position, problem in enumerate(problems)
    )
    evaluation.job = job_launch(
        kind=EVALUATION_KIND,
        launched_by=launched_by,
        params={"evaluation_id": evaluation.pk},
        title=f"Evaluation #{evaluation.pk} {evaluation.name}",
    )
    evaluation.save(update_fields=["job"])
    return evaluation


def evaluation_cancel(*, evaluation: Evaluation, by) -> None:
    if evaluation.job is None or evaluation.job.state not in ACTIVE_STATES:
        raise ConflictError("This evaluation is not queued or running.")
    job_cancel(job_id=evaluation.job_id, by=by)


def evaluation_retry(*, evaluation: Evaluation, by) -> None:
    """Queue the evaluation's job again; samples already stored are kept and not redrawn."""
    if evaluation.job is None or evaluation.job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise ConflictError("Only a failed or cancelled evaluation can be retried.")
    job_retry(job_id=evaluation.job_id, by=by)


@transaction.atomic
def evaluation_sample_rule(*, sample_id: int, ruling: str, note: str = "", by) -> EvaluationSample:
    """Record a person's ruling on a sample ('' clears it); it overrides the checkers."""
    if ruling not in ("", *Ruling.values):
        raise DomainError(f"Unknown ruling {ruling!r}; choose correct or incorrect.")
    sample = EvaluationSample.objects.select_for_update().get(pk=sample_id)
    sample.ruling = ruling
    sample.ruling_note = note.strip()[:2000] if ruling else ""
    sample.ruled_by = by if ruling else None
    sample.ruled_at = timezone.now() if ruling else None
    sample.save(update_fields=["ruling", "ruling_note", "ruled_by", "ruled_at"])
    return sample


# --- Executing an evaluation (inside its job) ------------------------------------------------


def _sample_row(member: EvaluationProblem, completion: engine.Completion) -> EvaluationSample:
    verdict = judge_completion(completion.text, member.answer)
    return EvaluationSample(
        eval_problem=member,
        sample_index=completion.sample_index,
        text=storable_text(completion.text),
        token_count=completion.token_count,
        forced_tokens=completion.forced_tokens,
        finish_reason=completion.finish_reason,
        answer_extracted=storable_text(verdict.predicted or ""),
        # An empty box (the force-answer prompt's own `\\boxed{}`) is no answer.
        has_answer=bool(verdict.predicted and verdict.predicted.strip()),
        math_verify=verdict.math_verify,
        string_match=verdict.string_match,
        auto_correct=verdict.correct,
        checkers_disagree=verdict.disagreement,
    )


def _store_samples(member: EvaluationProblem, completions: list[engine.Completion]) -> int:
    """Commit one problem's samples of a call; samples another attempt stored first are left
    as they are."""
    stored = 0
    with transaction.atomic():
        for completion in completions:
            try:
                with transaction.atomic():
                    _sample_row(member, completion).save()
                    stored += 1
            except IntegrityError:
                continue
    return stored


def evaluation_execute(
    *,
    evaluation_id: int,
    progress: Callable[[int, int, str], None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Sample, judge and store every missing sample of the evaluation (progress in samples)."""
    evaluation = Evaluation.objects.get(pk=evaluation_id)
    n = evaluation.samples_per_problem
    members = list(
        evaluation.problems.select_related("problem")
        .annotate(stored=Count("samples"))
        .order_by("position")
    )
    total = len(members) * n
    done = sum(min(m.stored, n) for m in members)
    todo = [m for m in members if m.stored < n]
    if not todo:
        progress(total, total, "nothing left to sample")
        return _summary(evaluation, sampled_now=0)
    reason = engine.backend_unavailable_reason(evaluation.backend)
    if reason:
        raise DomainError(f"The {evaluation.backend} backend cannot run here: {reason}.")
    sampling = engine.SamplingSettings(
        samples=n,
        max_new_tokens=evaluation.max_new_tokens,
        temperature=evaluation.temperature,
        top_p=evaluation.top_p,
        top_k=evaluation.top_k,
        seed=evaluation.seed,
        batch_size=evaluation.batch_size,
        protocol=evaluation.protocol,
        max_batch_size=django_settings.EVALUATION_MAX_BATCH_SIZE,
    )
    progress(done, total, f"loading {evaluation.model_label}")
    _check_model(evaluation.base_model_path, evaluation.adapter_path)
    vllm = evaluation.backend == EvaluationBackend.VLLM
    with model_session_open(
        model_path=evaluation.base_model_path,
        adapter_path=evaluation.adapter_path or None,
        engine="vllm" if vllm else "fast",
    ) as session:
        # The sampler: a vLLM engine whose learner view is the adapter (the transformers model
        # is never loaded), or the transformers model with its adapter.
        tokenizer = session.tokenizer
        sampler = session.backend if vllm else session.model
        log(f"loaded {evaluation.model_label}; {len(todo)} of {len(members)} problems to sample")
        return _sample_members(
            evaluation, members, todo, sampler, tokenizer, sampling, progress, log
        )


def _sample_members(
    evaluation: Evaluation,
    members: list,
    todo: list,
    model: Any,
    tokenizer: Any,
    sampling: engine.SamplingSettings,
    progress: Callable[[int, int, str], None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Draw the missing units of `todo`, several problems per backend call (`pack_units`),
    and after each call store every unit's missing samples (one transaction per problem)."""
    n = evaluation.samples_per_problem
    total = len(members) * n
    done = sum(min(m.stored, n) for m in members)
    units: list[engine.SamplingUnit] = []
    member_of: dict[str, Any] = {}  # unit key -> its EvaluationProblem
    stored_of: dict[int, set[int]] = {}  # member pk -> sample indices already stored
    units_left: dict[int, int] = {}  # member pk -> units not yet stored
    for member in todo:
        stored_of[member.pk] = set(member.samples.values_list("sample_index", flat=True))
        prompt_ids = engine.evaluation_prompt_ids(
            tokenizer, member.problem.statement, evaluation.prompt_template, evaluation.reasoning
        )
        member_units = engine.problem_units(
            problem_key(member.problem), prompt_ids, sampling, stored=stored_of[member.pk]
        )
        units.extend(member_units)
        member_of.update((unit.key, member) for unit in member_units)
        units_left[member.pk] = len(member_units)
    calls = engine.pack_units(units, sampling.max_batch_size)
    sampled_now = 0
    finished = 0
    for number, call in enumerate(calls, start=1):
        in_call = list({member_of[unit.key].pk: member_of[unit.key] for unit in call}.values())
        names = in_call[0].problem.external_id + (
            f" … {in_call[-1].problem.external_id}" if len(in_call) > 1 else ""
        )
        stage = (
            f"call {number}/{len(calls)}: {len(in_call)} "
            f"{'problem' if len(in_call) == 1 else 'problems'} ({names}), "
            f"{sum(len(unit.sample_indices) for unit in call)} sequences"
        )
        progress(done, total, stage)
        per_unit = engine.generate_completions(
            evaluation.backend,
            model,
            tokenizer,
            call,
            settings=sampling,
            on_step=lambda _step, _done=done, _stage=stage: progress(_done, total, _stage),
        )
        # Whole units are drawn (a call's seed covers them); only missing samples are stored.
        missing: dict[int, list[engine.Completion]] = {member.pk: [] for member in in_call}
        for unit, completions in zip(call, per_unit, strict=True):
            member = member_of[unit.key]
            missing[member.pk] += [
                c for c in completions if c.sample_index not in stored_of[member.pk]
            ]
            units_left[member.pk] -= 1
        for member in in_call:
            sampled_now += _store_samples(member, missing[member.pk])
            done += len(missing[member.pk])
            stored_of[member.pk].update(c.sample_index for c in missing[member.pk])
            if units_left[member.pk] == 0:
                finished += 1
                _log_problem(member, f"{finished}/{len(todo)}", log)
        progress(done, total, stage)
    return _summary(evaluation, sampled_now=sampled_now)


def _log_problem(member: EvaluationProblem, label: str, log: Callable[[str], None]) -> None:
    samples = list(member.samples.all())
    log(
        f"{member.problem.external_id} ({label}): {sum(s.auto_correct for s in samples)} of "
        f"{len(samples)} correct, {sum(s.has_answer for s in samples)} with a boxed answer, "
        f"mean {sum(s.token_count for s in samples) / max(len(samples), 1):.0f} tokens"
    )


def _summary(evaluation: Evaluation, *, sampled_now: int) -> dict[str, Any]:
    samples = EvaluationSample.objects.filter(eval_problem__evaluation=evaluation)
    return {
        "problems": evaluation.problems.count(),
        "samples": samples.count(),
        "sampled_now": sampled_now,
        "auto_correct": samples.filter(auto_correct=True).count(),
        "checkers_disagree": samples.filter(checkers_disagree=True).count(),
    }
