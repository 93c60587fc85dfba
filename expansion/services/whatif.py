"""What-if waypoints: re-score a finished trace's negative-reference log-probs under edited
waypoints (one prefill), to compare the shortcut heatmap before and after.

Runs in the web process with the run's model, loaded once per process and kept; meant for
the embedded model and other small models (a large model belongs on a GPU worker).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from dailweb.errors import DomainError
from expansion.engine.partial_solution import render_partial_solution
from expansion.engine.scoring import shortcut_scores, summarise_shortcuts
from expansion.engine.trace_format import decode_trace
from expansion.models import Trace

MAX_WAYPOINTS = 50


@functools.lru_cache(maxsize=1)
def _model(path: str, adapter: str, stamp: float):
    from expansion.engine.models import load_model

    return load_model(path, device="cpu", adapter=adapter or None)


def _loaded(trace: Trace):
    path = Path(trace.run.model_path)
    if not (path / "config.json").is_file():
        raise DomainError(f"The run's model is not on this server ({path}); cannot re-score.")
    return _model(str(path), trace.run.adapter_path, (path / "config.json").stat().st_mtime)


def trace_whatif_rescore(*, trace: Trace, waypoints: list[str]) -> dict[str, Any]:
    """New log p_NR per token and the shortcut summaries before and after."""
    from expansion.engine.pipeline import ExpansionItem, rescore_negative
    from expansion.engine.prompts import PromptTemplates

    marks = [w.strip() for w in waypoints if w.strip()][:MAX_WAYPOINTS]
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
