"""Expansion runs: launch (pin problems and solution versions, split into chunks, queue one
job per chunk on the `gpu` queue), execute a chunk (idempotent: finished traces are kept and
skipped), cancel and retry a run.

A chunk's problems are expanded together: the engine's batch holds samples of many problems
(a finished sequence's slot goes to the next pending one), and each problem's traces are
committed as soon as all its samples are done and scored. A worker killed mid-run loses at
most the problems in flight; a rerun of a chunk only expands the problems still missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Count

from curation.models import Problem
from curation.selectors import problems_with_current_versions
from curation.services.suggestions import partial_solution_text
from curation.spans import Span
from dailweb.errors import ConflictError, DomainError
from dailweb.jobs.models import ACTIVE_STATES, Job, JobState
from dailweb.jobs.services import job_cancel, job_launch, job_retry
from dailweb.storable import storable_text
from expansion.engine.answers import DEFAULT_KEPT_RULE, KEPT_RULES
from expansion.engine.prompts import PromptError, PromptTemplates
from expansion.engine.rollout import (
    DEFAULT_ROLLOUT_PRESET,
    RolloutConfig,
    RolloutError,
    preset_rollout_config,
)
from expansion.models import Backend, ExpansionChunk, ExpansionRun, RunProblem, Trace
from expansion.services.models import model_session_open, vllm_launch_refusal

EXPANSION_CHUNK_KIND = "expansion_chunk"
MAX_SAMPLES = 256
MAX_PROBLEMS = 5000
# A chunk's work: problems x samples x max_new_tokens. 65,536 is 32 problems x 2 samples x
# 1,024 tokens, or 8 x 4 x 2,048: about 18 minutes at the ~60 tokens/s of the 2-core CPU
# (bench rollout), and a few seconds to a minute on a GPU with vLLM, where a larger budget
# (e.g. 1-4 million tokens) keeps a chunk's engine batch full for longer (README, "Sizing").
DEFAULT_CHUNK_TOKENS = 65_536
MAX_CHUNK_TOKENS = 1 << 40


@dataclass(frozen=True)
class RunSettings:
    """What an admin chooses for a run (validated by `expansion_run_launch`)."""

    name: str
    model_path: str
    samples_per_problem: int = 4
    # The rollout settings: a named preset (`rollout.ROLLOUT_PRESETS`, '' for none) and the
    # RolloutConfig fields chosen explicitly over it; both are recorded with the run.
    preset: str = DEFAULT_ROLLOUT_PRESET
    rollout: dict[str, Any] | None = None
    kept_rule: str = DEFAULT_KEPT_RULE  # `answers.KEPT_RULES`
    adapter_path: str = ""
    backend: str = Backend.TRANSFORMERS
    templates: dict[str, Any] | None = None
    reasoning: bool = False
    # How a run is split into chunk jobs: by work (`chunk_tokens`, the default) so that every
    # chunk takes about as long, or by an explicit number of problems.
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    chunk_problems: int | None = None
    top_n: int = 5
    shortcut_threshold: float = 1.0
    require_answers: bool = True


def run_settings_check(settings: RunSettings) -> tuple[RolloutConfig, PromptTemplates]:
    try:
        config = preset_rollout_config(settings.preset, settings.rollout)
    except (RolloutError, TypeError, ValueError) as exc:
        raise DomainError(f"Rollout settings: {exc}") from exc
    if settings.kept_rule not in KEPT_RULES:
        raise DomainError(
            f"Unknown kept rule {settings.kept_rule!r}; choose one of {', '.join(KEPT_RULES)}.",
            field_errors={"kept_rule": "unknown rule"},
        )
    try:
        templates = PromptTemplates.from_dict(settings.templates or {})
    except PromptError as exc:
        raise DomainError(f"Prompt templates: {exc}") from exc
    if not 1 <= settings.samples_per_problem <= MAX_SAMPLES:
        raise DomainError(f"Samples per problem must be between 1 and {MAX_SAMPLES}.")
    if settings.chunk_problems is not None and not 1 <= settings.chunk_problems <= 1000:
        raise DomainError("Problems per chunk must be between 1 and 1000.")
    if not 1 <= settings.chunk_tokens <= MAX_CHUNK_TOKENS:
        raise DomainError(f"Work per chunk must be between 1 and {MAX_CHUNK_TOKENS} tokens.")
    if settings.backend not in Backend.values:
        raise DomainError(f"Unknown backend {settings.backend!r}.")
    if settings.backend == Backend.VLLM and (reason := vllm_launch_refusal()):
        raise DomainError(f"The vLLM backend cannot run here: {reason}.")
    if not settings.model_path.strip():
        raise DomainError("Choose a model.")
    if not settings.name.strip():
        raise DomainError("Give the run a name.")
    return config, templates


def chunk_size(settings: RunSettings, config: RolloutConfig) -> int:
    """Problems per chunk: the explicit number, or as many as fit the work budget
    (`chunk_tokens` / (samples x max_new_tokens)), at least one."""
    if settings.chunk_problems is not None:
        return settings.chunk_problems
    per_problem = settings.samples_per_problem * config.max_new_tokens
    return max(1, min(MAX_PROBLEMS, settings.chunk_tokens // per_problem))


def _check_problems(problems: list[Problem], require_answers: bool) -> None:
    offenders = []
    for problem in problems:
        if problem.current_version is None:
            offenders.append(f"{problem.external_id} (no solution)")
        elif require_answers and problem.dataset.kind == "verifiable" and not problem.answer:
            offenders.append(f"{problem.external_id} (no final answer)")
    if offenders:
        shown = ", ".join(offenders[:20]) + (
            f" and {len(offenders) - 20} more" if len(offenders) > 20 else ""
        )
        raise DomainError(
            f"Nothing was queued: {len(offenders)} problem(s) cannot be expanded: {shown}."
        )


# Problems in natural id order (1, 2, …, 10), as the problem list shows them.
PROBLEM_ORDER = ("dataset__name", "external_id_order", "external_id")


def run_problems_select(
    *, dataset=None, external_ids: Sequence[str] = (), limit: int | None = None
) -> list[int]:
    """Primary keys of the problems a run is launched on (the launch form and
    `launch_expansion` alike): the dataset's problems, or those ids (within the dataset when
    one is given), in natural id order, the first `limit` of them."""
    problems = Problem.objects.all()
    if dataset is not None:
        problems = problems.filter(dataset=dataset)
    wanted = [w for w in dict.fromkeys(external_ids) if w]
    if wanted:
        problems = problems.filter(external_id__in=wanted)
        found = set(problems.values_list("external_id", flat=True))
        unknown = [w for w in wanted if w not in found]
        if unknown:
            raise DomainError(f"Unknown problem ids: {', '.join(unknown[:20])}.")
    elif dataset is None:
        raise DomainError("Choose a dataset or list problem ids.")
    ids = list(problems.order_by(*PROBLEM_ORDER).values_list("pk", flat=True))
    return ids[:limit] if limit else ids


@transaction.atomic
def expansion_run_launch(
    *, settings: RunSettings, problem_ids: Sequence[int], launched_by
) -> ExpansionRun:
    """Create a run over `problem_ids` (their current solution versions pinned) and queue its
    chunks; refuses before anything is queued when a problem cannot be expanded."""
    config, templates = run_settings_check(settings)
    ids = list(dict.fromkeys(problem_ids))
    if not ids:
        raise DomainError("Choose at least one problem.")
    if len(ids) > MAX_PROBLEMS:
        raise DomainError(f"A run takes at most {MAX_PROBLEMS} problems.")
    problems = problems_with_current_versions(
        Problem.objects.filter(pk__in=ids).select_related("dataset").order_by(*PROBLEM_ORDER)
    )
    missing = set(ids) - {p.pk for p in problems}
    if missing:
        raise DomainError(f"Unknown problem ids: {sorted(missing)[:20]}.")
    _check_problems(problems, settings.require_answers)
    run = ExpansionRun.objects.create(
        name=settings.name.strip()[:200],
        created_by=launched_by if getattr(launched_by, "pk", None) else None,
        model_path=settings.model_path.strip(),
        adapter_path=settings.adapter_path.strip(),
        backend=settings.backend,
        rollout_config=config.to_dict(),
        rollout_preset=settings.preset,
        rollout_overrides=dict(settings.rollout or {}),
        kept_rule=settings.kept_rule,
        templates=templates.to_dict(),
        reasoning=settings.reasoning,
        samples_per_problem=settings.samples_per_problem,
        chunk_problems=chunk_size(settings, config),
        top_n=settings.top_n,
        shortcut_threshold=settings.shortcut_threshold,
    )
    run_problems = []
    for position, problem in enumerate(problems):
        version = problem.current_version
        spans = [Span(w.start, w.end, w.origin) for w in version.ordered_waypoints]
        run_problems.append(
            RunProblem.objects.create(
                run=run,
                problem=problem,
                solution_version=version,
                answer=problem.answer,
                partial_solution=partial_solution_text(
                    body=version.body, answer=problem.answer, spans=spans
                ),
                position=position,
            )
        )
    for index, start in enumerate(range(0, len(run_problems), run.chunk_problems)):
        members = run_problems[start : start + run.chunk_problems]
        job = job_launch(
            kind=EXPANSION_CHUNK_KIND,
            launched_by=launched_by,
            params={"run_id": run.pk, "chunk_index": index},
            title=f"Expansion run #{run.pk} {run.name}: chunk {index + 1}",
        )
        chunk = ExpansionChunk.objects.create(run=run, index=index, job=job)
        chunk.run_problems.set(members)
    return run


def _run_jobs(run: ExpansionRun):
    return Job.objects.filter(expansion_chunk__run=run)


def expansion_run_cancel(*, run: ExpansionRun, by) -> int:
    """Cancel every queued or running chunk; returns how many were asked to stop."""
    count = 0
    for job in _run_jobs(run).filter(state__in=ACTIVE_STATES, cancel_requested=False):
        job_cancel(job_id=job.pk, by=by)
        count += 1
    if not count:
        raise ConflictError("Nothing of this run is queued or running.")
    return count


def expansion_run_retry(*, run: ExpansionRun, by) -> int:
    """Queue the failed or cancelled chunks again; a finished run does nothing and says so."""
    retried = 0
    for job in _run_jobs(run).filter(state__in=[JobState.FAILED, JobState.CANCELLED]):
        job_retry(job_id=job.pk, by=by)
        retried += 1
    if not retried:
        if _run_jobs(run).filter(state__in=ACTIVE_STATES).exists():
            raise ConflictError("The run is still going; nothing to retry.")
        raise ConflictError("Every chunk of this run has finished; a rerun has nothing to do.")
    return retried


# --- Executing a chunk (inside the job) -----------------------------------------------------


def _summary_fields(expanded, threshold: float) -> dict[str, Any]:
    check = expanded.answer_check
    return {
        "length": len(expanded.arrays),
        "fallback_share": float(expanded.fallback_share),
        "shortcut_max": float(expanded.shortcut.max),
        "shortcut_mean_positive": float(expanded.shortcut.mean_positive),
        "shortcut_share": float(expanded.shortcut.share_above),
        "finish_reason": expanded.finish_reason,
        "error": expanded.error or "",
        "answer_extracted": storable_text(check.predicted or "") if check is not None else "",
        "answer_correct": None if check is None else bool(check.correct),
        "checkers_disagree": bool(check.disagreement) if check is not None else False,
        "kept": bool(expanded.kept),
    }


def _store_traces(run_problem: RunProblem, traces: list, threshold: float) -> int:
    """Commit one problem's traces at once; existing ones are left as they are."""
    from expansion.engine.trace_format import encode_trace

    stored = 0
    with transaction.atomic():
        existing = set(run_problem.traces.values_list("sample_index", flat=True))
        for expanded in traces:
            if expanded.sample_index in existing:
                continue
            try:
                with transaction.atomic():
                    Trace.objects.create(
                        run=run_problem.run,
                        run_problem=run_problem,
                        sample_index=expanded.sample_index,
                        data=encode_trace(expanded.arrays),
                        **_summary_fields(expanded, threshold),
                    )
                    stored += 1
            except IntegrityError:  # another attempt stored it first
                continue
    return stored


def run_problem_item(member: RunProblem):
    """The engine's view of a pinned problem (its key seeds the problem's randomness)."""
    from expansion.engine.pipeline import ExpansionItem

    return ExpansionItem(
        key=f"{member.problem.dataset_id}/{member.problem.external_id}",
        problem=member.problem.statement,
        solution=member.solution_version.body,
        partial_solution=member.partial_solution,
        answer=member.answer or None,
        label=f"problem {member.problem.external_id}",
    )


def expansion_chunk_execute(
    *,
    run_id: int,
    chunk_index: int,
    progress: Callable[[int, int, str], None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Expand the chunk's problems that do not have all their traces yet."""
    from expansion.engine.pipeline import expand_items

    run = ExpansionRun.objects.get(pk=run_id)
    chunk = ExpansionChunk.objects.get(run=run, index=chunk_index)
    members = list(
        chunk.run_problems.select_related("problem", "solution_version")
        .annotate(stored=Count("traces"))
        .order_by("position")
    )
    todo = [m for m in members if m.stored < run.samples_per_problem]
    config = RolloutConfig.from_dict(run.rollout_config)
    budget = run.samples_per_problem * config.max_new_tokens
    total = len(members) * budget
    done = (len(members) - len(todo)) * budget
    if not todo:
        progress(total, total, "nothing left to expand")
        return {"problems": len(members), "expanded_now": 0}
    model_path = Path(run.model_path)
    progress(done, total, f"loading {model_path.name}")
    vllm = run.backend == Backend.VLLM
    with model_session_open(
        model_path=model_path,
        adapter_path=run.adapter_path or None,
        engine="vllm" if vllm else "fast",
        reasoning=run.reasoning,
    ) as session:
        # vLLM (when chosen) runs the rollout; the transformers model scores finished traces.
        model, tokenizer = session.model, session.tokenizer
        if run.reasoning:  # the thinking section must not be closed during expansion
            config = dataclasses.replace(config, forbidden_token_ids=session.forbidden_token_ids)
        if vllm:
            log(f"starting vLLM on {model_path.name}")
        backend = session.backend
        # Model (and engine) loaded: the rollout starts with the prompts' prefill, which
        # reports nothing until its first tokens are decided.
        progress(done, total, f"rollout: {len(todo)} problems, 0 stored")
        items = [run_problem_item(member) for member in todo]
        # Progress in token units: each problem's budget is samples x max_new_tokens (rollout
        # 90 %, scoring 10 %), over the problems still to do; problems stopping early at EOS
        # count fully.
        base, work = done, len(todo) * budget
        shares = {"rollout": 0.0, "scoring": 0.0}
        stored_problems = [0]

        def report(stage: str, stage_done: int, stage_total: int) -> None:
            shares[stage] = stage_done / stage_total if stage_total else 0.0
            fraction = 0.9 * shares["rollout"] + 0.1 * shares["scoring"]
            progress(
                base + int(fraction * work),
                total,
                f"{stage}: {len(todo)} problems, {stored_problems[0]} stored",
            )

        def store(index: int, traces: list) -> None:
            member = todo[index]
            stored = _store_traces(member, traces, run.shortcut_threshold)
            stored_problems[0] += 1
            errors = [t for t in traces if t.finish_reason == "error"]
            tokens = sum(len(t.arrays) for t in traces)
            log(
                f"{member.problem.external_id}: stored {stored} traces, {tokens} tokens"
                + (f"; {len(errors)} failed: {errors[0].error}" if errors else "")
            )

        try:
            expand_items(
                model,
                tokenizer,
                backend,
                items,
                config=config,
                samples=run.samples_per_problem,
                templates=PromptTemplates.from_dict(run.templates),
                reasoning=run.reasoning,
                top_n=run.top_n,
                shortcut_threshold=run.shortcut_threshold,
                progress=report,
                kept_rule=run.kept_rule,  # '' (older runs): the rule they were launched with
                on_item=store,
            )
        except PromptError as exc:
            raise DomainError(f"Nothing was expanded: {exc}") from exc
    progress(total, total, f"{len(todo)} problems stored")
    return {"problems": len(members), "expanded_now": len(todo)}
