"""Export of reviewed traces: exactly the records training reads.

One record per trace: the problem and the pinned solution version, the partial solution s~,
the trace text, token ids, character offsets, the three log-probs, sources, the reviewers'
verdicts (history, newest first) and marked shortcut spans. Rejected traces are exported
only when asked for (training never uses them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from django.db.models import Prefetch, QuerySet

from expansion.engine.trace_format import decode_trace
from expansion.models import ReviewState, ShortcutSpan, Trace, Verdict

EXPORT_BATCH = 200


def _float_list(values) -> list[float]:
    return [round(float(v), 4) for v in values]


def reviewed_traces(*, run_ids: Iterable[int], states: Iterable[str]) -> QuerySet[Trace]:
    return (
        Trace.objects.filter(run_id__in=list(run_ids), review_state__in=list(states))
        .select_related("run", "run_problem__problem__dataset", "run_problem__solution_version")
        .prefetch_related(
            Prefetch("verdicts", queryset=Verdict.objects.select_related("reviewer")),
            Prefetch("shortcut_spans", queryset=ShortcutSpan.objects.select_related("reviewer")),
        )
        .order_by("run_id", "run_problem__position", "sample_index")
    )


def trace_record(trace: Trace) -> dict[str, Any]:
    arrays = decode_trace(bytes(trace.data))
    run_problem = trace.run_problem
    problem = run_problem.problem
    return {
        "trace_id": trace.pk,
        "run_id": trace.run_id,
        "model_path": trace.run.model_path,
        "adapter_path": trace.run.adapter_path,
        "reasoning": trace.run.reasoning,
        "templates": trace.run.templates,
        "dataset": problem.dataset.name,
        "problem_id": problem.external_id,
        "problem": problem.statement,
        "solution_version": run_problem.solution_version.number,
        "solution": run_problem.solution_version.body,
        "answer": run_problem.answer,
        "partial_solution": run_problem.partial_solution,
        "sample_index": trace.sample_index,
        "text": arrays.text,
        "token_ids": [int(t) for t in arrays.token_ids],
        "char_starts": [int(s) for s in arrays.char_starts],
        "char_ends": [int(e) for e in arrays.char_ends],
        "sources": ["privileged" if s else "learner" for s in arrays.sources],
        "learner_logprobs": _float_list(arrays.learner_logprobs),
        "privileged_logprobs": _float_list(arrays.privileged_logprobs),
        "negative_logprobs": _float_list(arrays.negative_logprobs),
        "answer_correct": trace.answer_correct,
        "kept": trace.kept,
        "review_state": trace.review_state,
        "verdicts": [
            {
                "reviewer": v.reviewer.username,
                "decision": v.decision,
                "note": v.note,
                "at": v.created_at.isoformat(),
            }
            for v in trace.verdicts.all()
        ],
        "shortcut_spans": [
            {
                "start_token": s.start_token,
                "end_token": s.end_token,
                "note": s.note,
                "reviewer": s.reviewer.username,
            }
            for s in trace.shortcut_spans.all()
        ],
    }


def iter_records(traces: QuerySet[Trace]) -> Iterator[dict[str, Any]]:
    for trace in traces.iterator(chunk_size=EXPORT_BATCH):
        yield trace_record(trace)


def export_jsonl(traces: QuerySet[Trace], path: Path) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for record in iter_records(traces):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def export_parquet(traces: QuerySet[Trace], path: Path) -> int:
    """A Parquet file that `datasets.load_dataset("parquet", data_files=...)` loads."""
    import datasets

    records = list(iter_records(traces))
    for record in records:  # nested free-form dicts as JSON text, everything else typed
        record["templates"] = json.dumps(record["templates"])
    datasets.Dataset.from_list(records).to_parquet(str(path))
    return len(records)


DEFAULT_STATES = (ReviewState.ACCEPTED,)
