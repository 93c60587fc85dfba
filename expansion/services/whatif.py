"""What-if waypoints: re-score a finished trace's negative-reference log-probs under edited
waypoints (one prefill), to compare the shortcut heatmap before and after.

Runs in the web process with the run's model, loaded once per process and kept
(`session.kept_model_session`); meant for the embedded model and other small models (a large
model belongs on a GPU worker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dailweb.errors import DomainError
from expansion.engine.models import ModelLoadError
from expansion.engine.partial_solution import WAYPOINTS_SENTENCE, render_partial_solution
from expansion.engine.scoring import shortcut_scores, summarise_shortcuts
from expansion.engine.session import kept_model_session
from expansion.engine.trace_format import decode_trace
from expansion.models import Trace

MAX_WAYPOINTS = 50


def _loaded(trace: Trace) -> tuple[Any, Any]:
    """(model, tokenizer) of the run, from the process's kept model session (loaded once,
    replaced when the model or adapter files change)."""
    path = Path(trace.run.model_path)
    if not (path / "config.json").is_file():
        raise DomainError(f"The run's model is not on this server ({path}); cannot re-score.")
    try:
        session = kept_model_session(path, adapter=trace.run.adapter_path or None, device="cpu")
        return session.model, session.tokenizer
    except ModelLoadError as exc:
        raise DomainError(f"Cannot re-score with the run's model: {exc}") from exc


def _one_line(text: str) -> str:
    return " ".join(text.splitlines()).strip()


def trace_whatif_waypoints(*, trace: Trace) -> list[str]:
    """The waypoints the trace's s~ was made of, in order: the pinned version's waypoints
    when they still give the stored s~; otherwise (they were edited after the run) the stored
    list as one piece, which gives the same s~ again."""
    run_problem = trace.run_problem
    answer = run_problem.answer or None
    body = run_problem.solution_version.body
    texts = [
        body[w.start : w.end] for w in run_problem.solution_version.waypoints.order_by("order")
    ]
    if render_partial_solution(answer, texts) == run_problem.partial_solution:
        return texts
    _, found, listed = run_problem.partial_solution.partition(WAYPOINTS_SENTENCE.split("{")[0])
    stored = [listed.removesuffix(".")] if found else []
    if render_partial_solution(answer, stored) == run_problem.partial_solution:
        return stored
    return texts


def trace_whatif_text(*, trace: Trace) -> str:
    """The what-if box's initial text: the trace's waypoints, one per line."""
    return "\n".join(_one_line(text) for text in trace_whatif_waypoints(trace=trace))


def trace_whatif_rescore(*, trace: Trace, waypoints: list[str]) -> dict[str, Any]:
    """New log p_NR per token and the shortcut summaries before and after.

    `waypoints` are the box's lines; a line left as shown stands for the waypoint it shows (a
    waypoint with line breaks is shown on one line), so re-scoring unedited gives the real s~.
    """
    from expansion.engine.pipeline import ExpansionItem, rescore_negative
    from expansion.engine.prompts import PromptTemplates

    shown = {_one_line(text): text for text in trace_whatif_waypoints(trace=trace)}
    marks = [shown.get(w.strip(), w.strip()) for w in waypoints if w.strip()][:MAX_WAYPOINTS]
    arrays = decode_trace(bytes(trace.data))
    run_problem = trace.run_problem
    partial = render_partial_solution(run_problem.answer or None, marks)
    model, tokenizer = _loaded(trace)
    item = ExpansionItem(
        key=str(run_problem.pk),
        problem=run_problem.problem.statement,
        solution=run_problem.solution_version.body,
        partial_solution=partial,
        answer=run_problem.answer or None,
    )
    negative = rescore_negative(
        model,
        tokenizer,
        item,
        arrays.token_ids.tolist(),
        templates=PromptTemplates.from_dict(trace.run.templates),
        reasoning=trace.run.reasoning,
    )
    threshold = trace.run.shortcut_threshold
    before = summarise_shortcuts(
        shortcut_scores(arrays.negative_logprobs, arrays.privileged_logprobs), threshold
    )
    after = summarise_shortcuts(shortcut_scores(negative, arrays.privileged_logprobs), threshold)
    return {
        "partial_solution": partial,
        "negative_logprobs": [round(float(v), 3) if np.isfinite(v) else None for v in negative],
        "before": {
            "max": before.max,
            "mean_positive": before.mean_positive,
            "share_above": before.share_above,
        },
        "after": {
            "max": after.max,
            "mean_positive": after.mean_positive,
            "share_above": after.share_above,
        },
    }
