"""A study's report: its charts (SVG), a Markdown write-up, and the files of its export.

Everything here reads the study's JSON document (format `dail-study/1`, built by the study
selector; its shape is in `markdown_report`'s docstring) and nothing else: no Django, no
database, no files. Optional keys may be missing or None; the report says "—" for them.

Names, descriptions and paths are user text: in Markdown they are escaped so that they can
neither break a table (`|`, newlines), nor open code, emphasis, headings or links (backticks,
`*`, `_`, a leading `#`, `[`/`]`), nor carry HTML (`<`/`>` become entities), nor start math (`$`).
The same document always gives the same bytes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from training.studies.charts import ChartPoint, ChartSeries, line_chart_svg

PASS_AT_K_CHART = "pass_at_k.svg"
BUDGET_CHART = "pass_at_k_by_budget.svg"
CHART_TITLES = {
    PASS_AT_K_CHART: "pass@k on the held-out problems, per arm",
    BUDGET_CHART: "pass@1 against the token budget, per arm",
}
DASH = "—"
SHA_SHOWN = 12  # hex digits of a snapshot's SHA-256 shown in the lineage

_LINE_BREAKS = re.compile(r"\r\n|[\r\n\t\v\f\u0085\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]|~$])")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


# --- Formatting ------------------------------------------------------------------------------


def markdown_text(value: object) -> str:
    """User text as inert Markdown for one line or one table cell."""
    text = _CONTROL.sub("", _LINE_BREAKS.sub(" ", str(value))).strip()
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MARKDOWN_PUNCTUATION.sub(r"\\\1", text)
    return "\\" + text if text.startswith("#") else text  # a `#` elsewhere is plain text


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _plain(value: object) -> str:
    """A number as the document has it (1.0 stays 1.0, 0.1 stays 0.1); text escaped."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return DASH
        return f"{value:.1f}" if value.is_integer() else f"{value:.6g}"
    return markdown_text(value) or DASH


def _fixed(value: float, digits: int = 1) -> str:
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0"


def _points(value: float) -> str:
    """A difference of rates in percentage points, signed."""
    text = _fixed(100 * value)
    return text if text.startswith("-") or float(text) == 0 else f"+{text}"


def _percent_with_interval(estimate: object) -> str:
    """ "10.0 % [7.0, 13.0]" from {"value", "low", "high"} (rates in [0, 1])."""
    if not isinstance(estimate, Mapping):
        return DASH
    value, low, high = (_number(estimate.get(key)) for key in ("value", "low", "high"))
    if value is None:
        return DASH
    text = f"{_fixed(100 * value)} %"
    if low is not None and high is not None:
        text += f" [{_fixed(100 * low)}, {_fixed(100 * high)}]"
    return text


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _sequence(value: object) -> Sequence[Any]:
    return value if isinstance(value, list | tuple) else ()


def _run(value: object) -> str:
    return f"#{value}" if isinstance(value, int) and not isinstance(value, bool) else _plain(value)


def _table_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# --- The document ----------------------------------------------------------------------------


def _arms(document: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [arm for arm in _sequence(document.get("arms")) if isinstance(arm, Mapping)]


def _arm_label(arm: Mapping[str, Any]) -> str:
    return str(arm.get("label") or arm.get("key") or "unnamed arm")


def _metrics(arm: Mapping[str, Any]) -> Mapping[str, Any] | None:
    metrics = arm.get("metrics")
    return metrics if isinstance(metrics, Mapping) else None


def _pass_at(metrics: Mapping[str, Any], k: int) -> Mapping[str, Any] | None:
    for row in _sequence(metrics.get("pass_at_k")):
        if isinstance(row, Mapping) and row.get("k") == k:
            return row
    return None


def _confidence_percent(document: Mapping[str, Any]) -> str:
    for arm in _arms(document):
        confidence = _number((_metrics(arm) or {}).get("confidence"))
        if confidence is not None:
            return f"{100 * confidence:g} %"
    return "95 %"


def _largest_k(document: Mapping[str, Any]) -> int | None:
    ks = [
        k
        for k in _sequence(_mapping(_mapping(document.get("study")).get("evaluation")).get("ks"))
        if isinstance(k, int) and not isinstance(k, bool)
    ]
    for arm in _arms(document):
        ks += [
            k
            for k in _sequence((_metrics(arm) or {}).get("ks"))
            if isinstance(k, int) and not isinstance(k, bool)
        ]
    return max(ks) if ks else None


# --- Charts ----------------------------------------------------------------------------------


def _chart_points(rows: object, x_key: str) -> list[ChartPoint]:
    points = []
    for row in _sequence(rows):
        if not isinstance(row, Mapping):
            continue
        x, y = _number(row.get(x_key)), _number(row.get("value"))
        if x is None or y is None:
            continue
        points.append(ChartPoint(x, y, _number(row.get("low")), _number(row.get("high"))))
    return points


def _y_max(series: Sequence[ChartSeries]) -> float:
    """The next tenth above the highest value or interval end (at most 1, at least 0.1), so
    a study whose arms all solve 5 % does not draw flat lines along the bottom."""
    tops = [max(p.y, p.high if p.high is not None else p.y) for s in series for p in s.points]
    if not tops:
        return 1.0
    return min(1.0, max(0.1, math.ceil(max(tops) * 10 - 1e-9) / 10))


def study_charts(document: Mapping[str, Any]) -> dict[str, str]:
    """File name -> SVG: pass@k against k (log2 x), and pass@1 against the token budget; one
    series per evaluated arm, intervals drawn as bands."""
    evaluated = [(arm, metrics) for arm in _arms(document) if (metrics := _metrics(arm))]
    by_k = [
        ChartSeries(_arm_label(arm), _chart_points(metrics.get("pass_at_k"), "k"))
        for arm, metrics in evaluated
    ]
    by_budget = [
        ChartSeries(
            _arm_label(arm),
            _chart_points(_mapping(metrics.get("budget_curves")).get("1"), "budget"),
        )
        for arm, metrics in evaluated
    ]
    return {
        PASS_AT_K_CHART: line_chart_svg(
            title=CHART_TITLES[PASS_AT_K_CHART],
            x_label="k (samples per problem)",
            y_label="pass@k",
            series=by_k,
            x_log2=True,
            y_max=_y_max(by_k),
        ),
        BUDGET_CHART: line_chart_svg(
            title=CHART_TITLES[BUDGET_CHART],
            x_label="token budget",
            y_label="pass@1",
            series=by_budget,
            y_max=_y_max(by_budget),
        ),
    }


# --- Markdown --------------------------------------------------------------------------------


def _setup(study: Mapping[str, Any]) -> list[str]:
    split = _mapping(study.get("split"))
    expansion = study.get("expansion")
    evaluation = _mapping(study.get("evaluation"))
    lines = ["## Setup", ""]
    lines.append(f"- **Dataset:** {_plain(study.get('dataset'))}")
    lines.append(
        f"- **Held-out split:** {_plain(split.get('training_problems'))} training problems, "
        f"{_plain(split.get('held_out_problems'))} held-out problems (held-out fraction "
        f"{_plain(split.get('held_out_fraction'))}, seed {_plain(split.get('seed'))})"
    )
    lines.append(f"- **Base model:** {_plain(study.get('base_model'))}")
    lines.append(f"- **Trace acceptance:** {_plain(study.get('acceptance'))}")
    if isinstance(expansion, Mapping):
        kept = (
            f"{_plain(expansion.get('kept'))} kept, " if expansion.get("kept") is not None else ""
        )
        rule = (
            f" (kept by {_plain(expansion.get('kept_rule'))})" if expansion.get("kept_rule") else ""
        )
        lines.append(
            f"- **Expansion:** run {_run(expansion.get('run_id'))}, preset "
            f"{_plain(expansion.get('preset'))}, {_plain(expansion.get('samples_per_problem'))} "
            f"samples per problem, up to {_plain(expansion.get('max_new_tokens'))} new tokens: "
            f"{_plain(expansion.get('traces'))} traces, {kept}"
            f"{_plain(expansion.get('accepted'))} accepted{rule}"
        )
    else:
        lines.append("- **Expansion:** none")
    ks = ", ".join(_plain(k) for k in _sequence(evaluation.get("ks"))) or DASH
    budgets = ", ".join(_plain(b) for b in _sequence(evaluation.get("budgets"))) or DASH
    lines.append(
        f"- **Evaluation:** {_plain(evaluation.get('protocol'))}; n = "
        f"{_plain(evaluation.get('samples_per_problem'))} samples per held-out problem; "
        f"k = {ks}; token budgets {budgets}; temperature {_plain(evaluation.get('temperature'))}"
        f", top-p {_plain(evaluation.get('top_p'))}, "
        + (
            f"top-k {_plain(evaluation.get('top_k'))}"
            if evaluation.get("top_k") is not None
            else "no top-k"
        )
        + f"; up to {_plain(evaluation.get('max_new_tokens'))} new tokens"
        + (f"; seed {_plain(evaluation.get('seed'))}" if "seed" in evaluation else "")
    )
    return [*lines, ""]


def _training_data(arm: Mapping[str, Any]) -> str:
    training = arm.get("training")
    if not isinstance(training, Mapping):
        return "none (not trained)"
    return _plain(training.get("data"))


def _not_evaluated(arm: Mapping[str, Any]) -> str:
    return f"not evaluated ({_plain(arm.get('state') or 'unknown state')})"


def _results(document: Mapping[str, Any], confidence: str) -> list[str]:
    largest = _largest_k(document)
    ks = [1] if largest in (None, 1) else [1, largest]
    header = ["Arm", "Training data"]
    header += [f"pass@{k} [{confidence} CI]" for k in ks]
    header += ["Mean tokens", "Correct samples"]
    lines = [
        "## Results",
        "",
        "pass@k is the unbiased estimator over n samples per problem; intervals are "
        f"{confidence} percentile bootstraps over the held-out problems.",
        "",
        _table_row(header),
        _table_row(["---"] * len(header)),
    ]
    for arm in _arms(document):
        cells = [markdown_text(_arm_label(arm)), _training_data(arm)]
        metrics = _metrics(arm)
        if metrics is None:
            cells += [_not_evaluated(arm)] + [DASH] * (len(header) - 3)
        else:
            cells += [_percent_with_interval(_pass_at(metrics, k)) for k in ks]
            mean_tokens = _number(metrics.get("mean_tokens"))
            cells.append(DASH if mean_tokens is None else _fixed(mean_tokens))
            cells.append(
                f"{_plain(metrics.get('correct_samples'))} / {_plain(metrics.get('samples'))}"
            )
        lines.append(_table_row(cells))
    return [*lines, ""]


def _charts(chart_files: Mapping[str, str]) -> list[str]:
    lines = ["## Charts", ""]
    for name in chart_files:
        alt = CHART_TITLES.get(name, name)
        lines += [f"![{markdown_text(alt)}]({quote(name)})", ""]
    return lines


def _comparisons(document: Mapping[str, Any], confidence: str) -> list[str]:
    labels = {str(arm.get("key")): _arm_label(arm) for arm in _arms(document)}
    comparisons = [c for c in _sequence(document.get("comparisons")) if isinstance(c, Mapping)]
    lines = ["## Paired comparisons", ""]
    if not comparisons:
        return [*lines, "No paired comparisons: fewer than two arms have been evaluated.", ""]
    lines += [
        "Each row: the first arm's pass@k minus the other's, averaged over the problems both "
        "were evaluated on, in percentage points, with a paired bootstrap interval (the same "
        "resampled problems for both arms). Better / worse / ties: problems where the first "
        "arm's pass@k was higher / lower / the same.",
        "",
        _table_row(
            ["Arm vs against", "k", f"Difference [{confidence} CI]", "Better / worse / ties"]
        ),
        _table_row(["---"] * 4),
    ]
    sentences = []
    for comparison in comparisons:
        arm = labels.get(str(comparison.get("arm")), str(comparison.get("arm")))
        against = labels.get(str(comparison.get("against")), str(comparison.get("against")))
        value, low, high = (_number(comparison.get(key)) for key in ("value", "low", "high"))
        k = _plain(comparison.get("k"))
        difference = DASH
        if value is not None:
            difference = f"{_points(value)} points"
            if low is not None and high is not None:
                difference += f" [{_fixed(100 * low)}, {_fixed(100 * high)}]"
        counts = " / ".join(_plain(comparison.get(key)) for key in ("better", "worse", "ties"))
        lines.append(
            _table_row(
                [
                    f"{markdown_text(arm)} vs {markdown_text(against)}",
                    k,
                    difference,
                    f"{counts} of {_plain(comparison.get('problems'))}",
                ]
            )
        )
        if value is None or low is None or high is None or low <= 0 <= high:
            continue
        verb = "beats" if low > 0 else "falls behind"
        sentences.append(
            f"- {markdown_text(arm)} {verb} {markdown_text(against)} at k={k} by "
            f"{_points(value)} points [{_fixed(100 * low)}, {_fixed(100 * high)}]."
        )
    lines.append("")
    if sentences:
        lines += sentences
    else:
        problems = [
            p for c in comparisons if isinstance(p := c.get("problems"), int) and p is not True
        ]
        size = f" ({max(problems)} problems)" if problems else ""
        lines.append(
            f"No difference is distinguishable from noise at this size{size}: every "
            f"{confidence} interval contains 0."
        )
    return [*lines, ""]


def _lineage(document: Mapping[str, Any]) -> list[str]:
    lines = ["## Lineage", ""]
    for arm in _arms(document):
        lines += [f"### {markdown_text(_arm_label(arm))}", ""]
        lines.append(f"- **Key:** {_plain(arm.get('key'))}")
        if arm.get("description"):
            lines.append(f"- **Description:** {_plain(arm.get('description'))}")
        lines.append(f"- **State:** {_plain(arm.get('state'))}")
        training = arm.get("training")
        if isinstance(training, Mapping):
            gamma = training.get("gamma")
            lines.append(
                f"- **Training:** run {_run(training.get('run_id'))}, objective "
                f"{_plain(training.get('objective'))}"
                + (f", gamma {_plain(gamma)}" if gamma is not None else "")
            )
            sizes = [
                f"{_plain(training.get(key))} {unit}"
                for key, unit in (("examples", "examples"), ("steps", "steps"))
                if training.get(key) is not None
            ]
            if training.get("final_loss") is not None:
                sizes.append(f"final loss {_plain(training.get('final_loss'))}")
            lines.append(
                f"- **Data:** {_plain(training.get('data'))}"
                + (f" ({', '.join(sizes)})" if sizes else "")
            )
            sha = training.get("snapshot_sha256")
            if isinstance(sha, str) and _HEX.match(sha):
                shown = f"`{sha[:SHA_SHOWN]}`" + ("…" if len(sha) > SHA_SHOWN else "")
            else:
                shown = _plain(sha)
            lines.append(f"- **Data snapshot SHA-256:** {shown}")
            lines.append(f"- **Adapter:** {_plain(training.get('adapter_path'))}")
        else:
            lines.append("- **Training:** none (the base model as it is)")
        evaluation_id = arm.get("evaluation_id")
        if _metrics(arm) is not None:
            evaluation = _run(evaluation_id)
        elif evaluation_id is not None:
            evaluation = f"{_run(evaluation_id)}, {_not_evaluated(arm)}"
        else:
            evaluation = _not_evaluated(arm)
        lines.append(f"- **Evaluation:** {evaluation}")
        lines.append("")
    return lines


def markdown_report(
    document: Mapping[str, Any], *, chart_files: Mapping[str, str] | None = None
) -> str:
    """The study as a Markdown report: setup, results table, charts, paired comparisons and
    each arm's lineage.

    `document` is the study's export (`format` "dail-study/1"): `study` (id, name, state,
    created_at, dataset, base_model, split, acceptance, expansion or None, evaluation), `arms`
    (key, label, description, state, training or None, evaluation_id, metrics: an
    `EvaluationMetrics.to_dict()` or None) and `comparisons` (`PairedDifference.to_dict()`
    plus `arm` and `against` keys). `chart_files`: file name -> SVG (as `study_charts`
    returns), each linked as an image by its file name; the SVG itself is not read."""
    study = _mapping(document.get("study"))
    confidence = _confidence_percent(document)
    name = study.get("name") or (f"#{study['id']}" if "id" in study else "unnamed")
    facts = [
        f"study {_run(study.get('id'))}" if study.get("id") is not None else "",
        f"state {_plain(study.get('state'))}" if study.get("state") else "",
        f"created {_plain(study.get('created_at'))}" if study.get("created_at") else "",
        f"export format {_plain(document.get('format'))}" if document.get("format") else "",
    ]
    lines = [f"# Study: {markdown_text(name)}", ""]
    if any(facts):
        text = ", ".join(fact for fact in facts if fact)
        lines += [text[0].upper() + text[1:] + ".", ""]
    lines += _setup(study)
    lines += _results(document, confidence)
    if chart_files:
        lines += _charts(chart_files)
    lines += _comparisons(document, confidence)
    lines += _lineage(document)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def report_files(document: Mapping[str, Any]) -> dict[str, str]:
    """Every file of a study's export: the document, the report and its charts."""
    charts = study_charts(document)
    return {
        "study.json": json.dumps(document, indent=2, sort_keys=True),
        "report.md": markdown_report(document, chart_files=charts),
        **charts,
    }
