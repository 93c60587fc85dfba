"""What the reviewer's trace page shows of a trace: the text with its math typeset and every
token addressable, and the per-token numbers (as compact JSON for the page's script).

Tokens and formulas: a formula is typeset whole (KaTeX cannot typeset half a formula), so the
tokens that make it up form one group (`data-i`..`data-j`), coloured by their largest
shortcut score; every other token is its own element. The raw view shows each token as it is.

The pinned s~ is shown as the editor shows it (`curation.services.suggestions`), formulas typeset.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.utils.safestring import SafeString, mark_safe

from curation.services.suggestions import partial_solution_html, partial_solution_text
from curation.spans import Span
from dailweb.rendering import find_math_spans, render_inline, render_tex
from expansion.engine.tokenizer_cache import cached_tokenizer
from expansion.engine.trace_format import TraceArrays


def tokenizer_for(model_path: str):
    """The run's tokenizer (the process's one cache), or None when the model is not here."""
    try:
        return cached_tokenizer(model_path)
    except Exception:  # a broken tokenizer must not break the page
        return None


def decode_ids(tokenizer, ids: set[int]) -> dict[int, str]:
    if tokenizer is None:
        return {i: f"#{i}" for i in ids}
    ordered = sorted(ids)
    texts = tokenizer.batch_decode([[i] for i in ordered], skip_special_tokens=False)
    return dict(zip(ordered, texts, strict=True))


def _round(value: float) -> float | None:
    return None if not math.isfinite(value) else round(float(value), 3)


@dataclass
class TraceDisplay:
    html: SafeString
    data_json: str  # per-token data for the page's script
    tokens: int
    bytes: int


def token_payload(trace: TraceArrays, tokenizer) -> dict[str, Any]:
    """Per-token arrays: text, source, draws, the three log-probs, PS/NR alternatives."""
    starts, ends = trace.char_starts, trace.char_ends
    ids = {
        int(i)
        for i in np.concatenate([trace.privileged_top_ids.ravel(), trace.negative_top_ids.ravel()])
    }
    names = decode_ids(tokenizer, ids)

    def alternatives(top_ids: np.ndarray, top_lps: np.ndarray, row: int) -> list[list[Any]]:
        return [
            [names[int(i)], _round(lp)] for i, lp in zip(top_ids[row], top_lps[row], strict=True)
        ]

    return {
        "text": [trace.text[int(s) : int(e)] for s, e in zip(starts, ends, strict=True)],
        "source": trace.sources.astype(int).tolist(),
        "draws": trace.draws.astype(int).tolist(),
        "lp": [
            [_round(a), _round(b), _round(c)]
            for a, b, c in zip(
                trace.learner_logprobs,
                trace.privileged_logprobs,
                trace.negative_logprobs,
                strict=True,
            )
        ],
        "ps_top": [
            alternatives(trace.privileged_top_ids, trace.privileged_top_logprobs, r)
            for r in range(len(trace))
        ],
        "nr_top": [
            alternatives(trace.negative_top_ids, trace.negative_top_logprobs, r)
            for r in range(len(trace))
        ],
    }


def trace_html(trace: TraceArrays) -> SafeString:
    """The text with formulas typeset; tokens as `<span class="t" data-i>`, formula groups as
    `<span class="tm" data-i data-j>`."""
    text = trace.text
    starts = [int(s) for s in trace.char_starts]
    ends = [int(e) for e in trace.char_ends]
    parts: list[str] = []
    formulas = find_math_spans(text)
    f_index = 0
    i = 0
    count = len(starts)
    while i < count:
        # Skip formulas that end before this token.
        while f_index < len(formulas) and formulas[f_index].end <= starts[i]:
            f_index += 1
        formula = formulas[f_index] if f_index < len(formulas) else None
        if formula is not None and starts[i] < formula.end and ends[i] > formula.start:
            j = i
            while j + 1 < count and starts[j + 1] < formula.end:
                j += 1
            group_start, group_end = starts[i], ends[j]
            rendered, _error = render_tex(formula.tex, formula.display)
            before = html.escape(text[group_start : max(group_start, formula.start)])
            after = html.escape(text[min(group_end, formula.end) : group_end])
            parts.append(
                f'<span class="tm" data-i="{i}" data-j="{j}" tabindex="-1" '
                f'title="{html.escape(text[formula.start : formula.end])}">{before}{rendered}{after}</span>'
            )
            f_index += 1
            i = j + 1
            continue
        parts.append(
            f'<span class="t" data-i="{i}">{html.escape(text[starts[i] : ends[i]])}</span>'
        )
        i += 1
    return mark_safe("".join(parts))  # noqa: S308 - escaped above, or KaTeX output


def trace_display(trace: TraceArrays, tokenizer) -> TraceDisplay:
    payload = json.dumps(token_payload(trace, tokenizer), ensure_ascii=False, separators=(",", ":"))
    # Safe inside <script type="application/json"> (as Django's json_script escapes it).
    payload = payload.replace("<", "\\u003C").replace(">", "\\u003E").replace("&", "\\u0026")
    body = trace_html(trace)
    return TraceDisplay(
        html=body, data_json=payload, tokens=len(trace), bytes=len(payload) + len(body)
    )


def pinned_partial_solution_html(
    *, pinned: str, body: str, answer: str, waypoints: Sequence[Span]
) -> SafeString:
    """The s~ a run pinned, with its answer and waypoints typeset as the editor shows them,
    when the solution version's waypoints still give that s~; otherwise (edited after the
    run) the pinned text itself with its `$…$` formulas typeset."""
    if partial_solution_text(body=body, answer=answer, spans=waypoints) == pinned:
        return partial_solution_html(body=body, answer=answer, spans=waypoints)
    return render_inline(pinned)
