"""Reads for expansion runs and the reviewer's queue and trace page.

The queue never loads trace blobs (`defer("data")`) and runs a constant number of queries for
any page; the trace page loads one blob and decodes it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields

from django.db.models import Count, Q, QuerySet, Sum

from dailweb.jobs.models import ACTIVE_STATES, Job, JobState
from dailweb.labelled_fields import FieldLabel, LabelledField, labelled_fields
from expansion.engine.rollout import RolloutConfig
from expansion.engine.trace_format import decode_trace
from expansion.models import ExpansionChunk, ExpansionRun, ReviewState, ShortcutSpan, Trace, Verdict

SORTS = {
    "shortcut": "-shortcut_max",
    "shortcut_mean": "-shortcut_mean_positive",
    "shortcut_share": "-shortcut_share",
    "fallback": "-fallback_share",
    "length": "-length",
    "short": "length",
    "problem": "run_problem__position",
    "newest": "-created_at",
}


@dataclass(frozen=True)
class TraceFilters:
    run_id: int | None = None
    problem: str = ""
    state: str = ""
    correct: bool | None = None
    kept: bool | None = None
    min_shortcut: float | None = None
    min_fallback: float | None = None
    sort: str = "shortcut"


def trace_queue_ids(filters: TraceFilters) -> QuerySet:
    """Ids of the matching traces in queue order: a narrow query, so that deep pages stay
    cheap (the page's rows are then loaded by id with `traces_by_ids`)."""
    return trace_queue(filters).values_list("pk", flat=True)


def traces_by_ids(ids: list[int]) -> list[Trace]:
    rows = (
        Trace.objects.defer("data")
        .select_related("run", "run_problem__problem__dataset", "claimed_by")
        .in_bulk(ids)
    )
    return [rows[i] for i in ids if i in rows]


def run_review_counts(runs: list[ExpansionRun]) -> list[dict]:
    """Traces and reviewed traces per run, from the (run, review_state) index alone."""
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    for run_id, state, n in (
        Trace.objects.filter(run_id__in=[r.pk for r in runs])
        .values_list("run_id", "review_state")
        .annotate(n=Count("pk"))
        .order_by()
    ):
        counts[run_id][state] = n
    return [
        {
            "run": run,
            "traces": sum(counts[run.pk].values()),
            "reviewed": sum(n for s, n in counts[run.pk].items() if s != ReviewState.UNREVIEWED),
        }
        for run in runs
    ]


def trace_queue(filters: TraceFilters) -> QuerySet[Trace]:
    traces = Trace.objects.defer("data").select_related(
        "run", "run_problem__problem__dataset", "claimed_by"
    )
    if filters.run_id:
        traces = traces.filter(run_id=filters.run_id)
    if filters.problem:
        traces = traces.filter(run_problem__problem__external_id__icontains=filters.problem)
    if filters.state:
        traces = traces.filter(review_state=filters.state)
    if filters.correct is not None:
        traces = traces.filter(answer_correct=filters.correct)
    if filters.kept is not None:
        traces = traces.filter(kept=filters.kept)
    if filters.min_shortcut is not None:
        traces = traces.filter(shortcut_max__gte=filters.min_shortcut)
    if filters.min_fallback is not None:
        traces = traces.filter(fallback_share__gte=filters.min_fallback)
    return traces.order_by(SORTS.get(filters.sort, "-shortcut_max"), "pk")


@dataclass
class RunProgress:
    run: ExpansionRun
    problems: int
    expected_traces: int
    traces: int
    tokens: int
    reviewed: int
    accepted: int
    rejected: int
    chunk_states: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.traces / self.expected_traces if self.expected_traces else 0.0

    @property
    def review_percent(self) -> float:
        return 100.0 * self.reviewed / self.traces if self.traces else 0.0

    @property
    def state(self) -> str:
        states = self.chunk_states
        if any(states.get(s, 0) for s in ACTIVE_STATES):
            return JobState.RUNNING if states.get(JobState.RUNNING) else JobState.QUEUED
        if states.get(JobState.FAILED):
            return JobState.FAILED
        if states.get(JobState.CANCELLED):
            return JobState.CANCELLED
        return JobState.SUCCEEDED

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES


def run_progress(runs: list[ExpansionRun]) -> list[RunProgress]:
    """Progress and review counts of many runs in four queries."""
    ids = [r.pk for r in runs]
    problems = dict(
        ExpansionRun.objects.filter(pk__in=ids)
        .annotate(n=Count("run_problems"))
        .values_list("pk", "n")
    )
    stats = {
        row["run_id"]: row
        for row in Trace.objects.filter(run_id__in=ids)
        .values("run_id")
        .annotate(
            traces=Count("pk"),
            tokens=Sum("length"),
            reviewed=Count("pk", filter=~Q(review_state=ReviewState.UNREVIEWED)),
            accepted=Count("pk", filter=Q(review_state=ReviewState.ACCEPTED)),
            rejected=Count("pk", filter=Q(review_state=ReviewState.REJECTED)),
        )
    }
    chunk_states: dict[int, dict[str, int]] = defaultdict(dict)
    for row in (
        Job.objects.filter(expansion_chunk__run_id__in=ids)
        .values("expansion_chunk__run_id", "state")
        .annotate(n=Count("pk"))
    ):
        chunk_states[row["expansion_chunk__run_id"]][row["state"]] = row["n"]
    result = []
    for run in runs:
        row = stats.get(run.pk, {})
        result.append(
            RunProgress(
                run=run,
                problems=problems.get(run.pk, 0),
                expected_traces=problems.get(run.pk, 0) * run.samples_per_problem,
                traces=row.get("traces", 0),
                tokens=row.get("tokens") or 0,
                reviewed=row.get("reviewed", 0),
                accepted=row.get("accepted", 0),
                rejected=row.get("rejected", 0),
                chunk_states=dict(chunk_states.get(run.pk, {})),
            )
        )
    return result


def run_list() -> QuerySet[ExpansionRun]:
    return ExpansionRun.objects.select_related("created_by").order_by("-created_at", "-pk")


def run_chunks(run: ExpansionRun):
    return (
        run.chunks.select_related("job").annotate(problems=Count("run_problems")).order_by("index")
    )


ROLLOUT_LABELS: dict[str, FieldLabel] = {
    "tau": FieldLabel("Acceptance threshold τ"),
    "proposer": FieldLabel("Proposing view"),
    "acceptance": FieldLabel("Acceptance compares"),
    "max_draws": FieldLabel("Candidates before fallback (R)", "draws"),
    "top_k": FieldLabel("Top-k", "tokens"),
    "top_p": FieldLabel("Top-p"),
    "temperature": FieldLabel("Temperature"),
    "max_new_tokens": FieldLabel("Longest trace", "tokens"),
    "eos_token_ids": FieldLabel("End-of-trace token ids", empty="the model's own"),
    "forbidden_token_ids": FieldLabel("Forbidden token ids"),
    "seed": FieldLabel("Seed"),
    "block_size": FieldLabel("Draft block, initial", "tokens"),
    "max_block_size": FieldLabel("Draft block, largest", "tokens"),
    "draft_view": FieldLabel("Drafting view"),
    "max_batch_size": FieldLabel("Sequences decoded together", "sequences"),
}


def run_settings_fields(run: ExpansionRun) -> list[LabelledField]:
    """The run's rollout settings snapshot as labelled fields (what each means from the
    engine's own field help); values chosen over the preset say so."""
    helps = {f.name: f.metadata.get("help", "") for f in fields(RolloutConfig)}
    overrides = set(run.rollout_overrides or {})
    for key in overrides:
        helps[key] = (helps.get(key, "") + " Chosen over the preset.").strip()
    return labelled_fields(run.rollout_config or {}, labels=ROLLOUT_LABELS, helps=helps)


def run_current_chunk(chunks: list[ExpansionChunk]) -> tuple[ExpansionChunk | None, int]:
    """The chunk the run page follows (ETA, stage, log tail): a running one, else the next
    queued one, else the one that finished last; and how many other chunks wait in the queue."""
    current = None
    for state in (JobState.RUNNING, JobState.QUEUED):
        current = current or next((c for c in chunks if c.job.state == state), None)
    if current is None:
        finished = [c for c in chunks if c.job.finished_at]
        current = max(finished, key=lambda c: c.job.finished_at) if finished else None
    queued = sum(1 for c in chunks if c.job.state == JobState.QUEUED and c is not current)
    return current, queued


def trace_detail(trace_id: int) -> Trace:
    return Trace.objects.select_related(
        "run", "run_problem__problem__dataset", "run_problem__solution_version", "claimed_by"
    ).get(pk=trace_id)


def trace_accept_concerns(trace: Trace) -> list[str]:
    """Why accepting this trace needs a confirmation: training reads accepted traces, so a
    wrong, missing or cut-off answer should not slip in unnoticed. Empty: nothing to confirm.
    A reasoning run's trace is the thinking section alone (ungraded, cut at its token budget
    by design), so only failure counts there."""
    concerns = []
    if trace.finish_reason == "error":
        concerns.append("the trace failed")
    if trace.answer_correct is False:
        concerns.append(
            f"its final answer {trace.answer_extracted} is wrong"
            if trace.answer_extracted
            else "it has no final \\boxed{} answer"
        )
    if trace.finish_reason == "length" and not trace.run.reasoning:
        concerns.append("it was cut off at the token limit")
    return concerns


def trace_neighbours(trace: Trace) -> tuple[int | None, int | None]:
    """Previous and next trace of the same run (in problem/sample order)."""
    same_run = Trace.objects.filter(run_id=trace.run_id).order_by(
        "run_problem__position", "sample_index", "pk"
    )
    key = (trace.run_problem.position, trace.sample_index, trace.pk)
    before = (
        same_run.filter(
            Q(run_problem__position__lt=key[0])
            | Q(run_problem__position=key[0], sample_index__lt=key[1])
        )
        .reverse()
        .values_list("pk", flat=True)
        .first()
    )
    after = (
        same_run.filter(
            Q(run_problem__position__gt=key[0])
            | Q(run_problem__position=key[0], sample_index__gt=key[1])
        )
        .values_list("pk", flat=True)
        .first()
    )
    return before, after


@dataclass(frozen=True)
class Agreement:
    reviewers: int
    latest: dict[str, str]  # reviewer -> decision
    agree: bool | None  # None with fewer than two reviewers


def _with_texts(trace: Trace, spans: list[ShortcutSpan]) -> list[ShortcutSpan]:
    """Each span gets `.text`, the trace text its tokens cover (the lists show it)."""
    if spans:
        arrays = decode_trace(bytes(trace.data))
        starts, ends = arrays.char_starts, arrays.char_ends
        for span in spans:
            first = min(max(span.start_token, 0), len(arrays) - 1)
            last = min(max(span.end_token - 1, first), len(arrays) - 1)
            span.text = arrays.text[int(starts[first]) : int(ends[last])] if len(arrays) else ""
    return spans


def trace_spans(trace: Trace) -> list[ShortcutSpan]:
    """The live shortcut spans of a trace, with who marked them and their text."""
    return _with_texts(trace, list(trace.shortcut_spans.select_related("reviewer")))


def trace_deleted_spans(trace: Trace) -> list[ShortcutSpan]:
    """Spans deleted from a trace (history) with their text, newest deletion first."""
    return _with_texts(
        trace,
        list(
            ShortcutSpan.all_objects.filter(trace=trace, deleted_at__isnull=False)
            .select_related("reviewer", "deleted_by")
            .order_by("-deleted_at", "-pk")
        ),
    )


def trace_agreement(verdicts: list[Verdict]) -> Agreement:
    latest: dict[str, str] = {}
    for verdict in verdicts:  # newest first
        latest.setdefault(verdict.reviewer.username, verdict.decision)
    agree = None if len(latest) < 2 else len(set(latest.values())) == 1
    return Agreement(reviewers=len(latest), latest=latest, agree=agree)


def run_agreement(run_id: int) -> tuple[int, int]:
    """(traces judged by two or more reviewers, of which all latest verdicts agree)."""
    latest: dict[int, dict[int, str]] = defaultdict(dict)
    for trace_id, reviewer_id, decision in (
        Verdict.objects.filter(trace__run_id=run_id)
        .order_by("trace_id", "-created_at", "-pk")
        .values_list("trace_id", "reviewer_id", "decision")
    ):
        latest[trace_id].setdefault(reviewer_id, decision)
    multi = [decisions for decisions in latest.values() if len(decisions) >= 2]
    return len(multi), sum(1 for d in multi if len(set(d.values())) == 1)
