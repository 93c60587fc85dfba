"""A study's charts (SVG) and Markdown report, from a document built of real metrics."""

from __future__ import annotations

import copy
import json
import re
import xml.etree.ElementTree as ET

import pytest
from markdown_it import MarkdownIt

from training.engine.evaluation import SampleOutcome, evaluation_metrics
from training.engine.metrics import paired_difference
from training.studies import charts
from training.studies.charts import PALETTE, ChartPoint, ChartSeries, line_chart_svg
from training.studies.report import (
    BUDGET_CHART,
    PASS_AT_K_CHART,
    markdown_report,
    markdown_text,
    report_files,
    study_charts,
)

pytestmark = pytest.mark.engine

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = "| x <img src=x> [a](javascript:1) `code` # *b* $x$\nnext"


# --- Charts ----------------------------------------------------------------------------------


def polyline_points(svg: str) -> list[list[tuple[float, float]]]:
    root = ET.fromstring(svg)
    return [
        [tuple(map(float, pair.split(","))) for pair in line.get("points").split()]
        for line in root.iter(f"{SVG}polyline")
    ]


def test_chart_parses_and_has_one_polyline_per_non_empty_series():
    svg = line_chart_svg(
        title="pass@k",
        x_label="k",
        y_label="pass@k",
        series=[
            ChartSeries("a", [ChartPoint(1, 0.1, 0.05, 0.2), ChartPoint(2, 0.2, 0.1, 0.3)]),
            ChartSeries("empty", []),
            ChartSeries("b", [ChartPoint(1, 0.3), ChartPoint(2, 0.35), ChartPoint(4, 0.5)]),
        ],
    )
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    assert (root.get("width"), root.get("height"), root.get("viewBox")) == (
        str(charts.WIDTH),
        str(charts.HEIGHT),
        f"0 0 {charts.WIDTH} {charts.HEIGHT}",
    )
    assert root.get("role") == "img" and root.get("aria-label") == "pass@k"
    assert root.find(f"{SVG}title").text == "pass@k"
    assert [len(points) for points in polyline_points(svg)] == [2, 3]
    # The interval band of series a, and no inline styles anywhere (strict CSP).
    assert len([p for p in root.iter(f"{SVG}polygon") if p.get("fill-opacity")]) == 1
    assert not any(element.get("style") for element in root.iter())
    assert root.find(f".//{SVG}style") is None
    # Lines differ by dash pattern as well as by colour.
    lines = list(root.iter(f"{SVG}polyline"))
    assert lines[0].get("stroke") != lines[1].get("stroke")
    assert lines[0].get("stroke-dasharray") != lines[1].get("stroke-dasharray")
    assert "(no data)" in svg


def test_chart_labels_are_escaped():
    label = '<script>alert(1)</script> & "x"'
    svg = line_chart_svg(
        title=label,
        x_label=label,
        y_label=label,
        series=[ChartSeries(label, [ChartPoint(1, 0.5)])],
    )
    root = ET.fromstring(svg)
    assert "<script" not in svg
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp;" in svg
    assert not [element for element in root.iter() if element.tag.endswith("script")]
    assert root.get("aria-label") == label
    texts = ["".join(element.itertext()) for element in root.iter(f"{SVG}text")]
    assert texts.count(label) >= 2  # the title and the axis labels


def test_chart_drops_characters_xml_cannot_carry():
    svg = line_chart_svg(
        title="a\x00b\x1bc", x_label="x", y_label="y", series=[ChartSeries("s\x07", [])]
    )
    assert ET.fromstring(svg).get("aria-label") == "abc"


def test_x_positions_increase_with_x_and_log2_spaces_powers_of_two_evenly():
    points = [ChartPoint(x, 0.5) for x in (8, 1, 4, 2)]
    linear = polyline_points(
        line_chart_svg(title="t", x_label="x", y_label="y", series=[ChartSeries("s", points)])
    )[0]
    xs = [x for x, _ in linear]
    assert xs == sorted(xs) and len(set(xs)) == 4
    gaps = [b - a for a, b in zip(xs, xs[1:], strict=False)]
    assert gaps[2] == pytest.approx(4 * gaps[0], abs=0.05)  # 1, 2, 4, 8 on a linear axis

    logged = polyline_points(
        line_chart_svg(
            title="t", x_label="x", y_label="y", series=[ChartSeries("s", points)], x_log2=True
        )
    )[0]
    xs = [x for x, _ in logged]
    gaps = [b - a for a, b in zip(xs, xs[1:], strict=False)]
    assert gaps[0] > 0
    assert gaps == pytest.approx([gaps[0]] * 3, abs=0.02)


def test_y_is_clamped_to_the_range_and_higher_values_sit_higher():
    svg = line_chart_svg(
        title="t",
        x_label="x",
        y_label="y",
        series=[ChartSeries("s", [ChartPoint(1, -0.5), ChartPoint(2, 0.5), ChartPoint(3, 7)])],
    )
    (low, middle, high) = [y for _, y in polyline_points(svg)[0]]
    assert low > middle > high  # SVG's y grows downwards
    assert middle == pytest.approx((low + high) / 2)


def test_intervals_become_a_band_in_x_order_or_an_error_bar_for_a_lone_point():
    svg = line_chart_svg(
        title="t",
        x_label="x",
        y_label="y",
        series=[
            ChartSeries("band", [ChartPoint(4, 0.5, 0.4, 0.6), ChartPoint(1, 0.2, 0.1, 0.3)]),
            ChartSeries("bar", [ChartPoint(2, 0.5, 0.25, 0.75)]),
        ],
    )
    root = ET.fromstring(svg)
    (band,) = [p for p in root.iter(f"{SVG}polygon") if p.get("fill-opacity")]
    corners = [tuple(map(float, pair.split(","))) for pair in band.get("points").split()]
    xs = [x for x, _ in corners]
    assert xs[0] < xs[1] and xs[2] > xs[3]
    bars = [p for p in root.iter(f"{SVG}path") if p.get("stroke") == PALETTE[1]]
    assert len(bars) == 1


@pytest.mark.parametrize("series", [[], [ChartSeries("nothing", [])]])
def test_no_data_is_still_a_valid_chart(series):
    svg = line_chart_svg(title="t", x_label="x", y_label="y", series=series)
    root = ET.fromstring(svg)
    assert "no data" in "".join(root.itertext())
    assert polyline_points(svg) == []


def test_log2_refuses_x_at_or_below_zero():
    with pytest.raises(ValueError, match="x > 0"):
        line_chart_svg(
            title="t",
            x_label="x",
            y_label="y",
            series=[ChartSeries("s", [ChartPoint(0, 1)])],
            x_log2=True,
        )


# --- The document ----------------------------------------------------------------------------

KS, BUDGETS = [1, 2, 4], [8, 16]


def outcomes(correct: dict[str, int], tokens: int) -> dict[str, list[SampleOutcome]]:
    """4 samples per problem, the first `correct[p]` right; correct samples use `tokens`."""
    return {
        problem: [SampleOutcome(i < c, tokens if i < c else 16) for i in range(4)]
        for problem, c in correct.items()
    }


BASE = {f"p{i}": (1 if i % 3 == 0 else 0) for i in range(12)}
DAIL = {f"p{i}": min(4, c + 2) for i, c in enumerate(BASE.values())}  # clearly better
SFT = {p: (c + 1 if i % 2 else max(0, c - 1)) for i, (p, c) in enumerate(BASE.items())}


def comparison(arm: str, against: str, a: dict, b: dict, k: int) -> dict:
    result = paired_difference(
        {p: (4, c) for p, c in a.items()}, {p: (4, c) for p, c in b.items()}, k
    )
    return {"arm": arm, "against": against, **result.to_dict()}


def make_document(*, base_label: str = "Base model", comparisons: list | None = None) -> dict:
    base = evaluation_metrics(outcomes(BASE, 12), KS, BUDGETS).to_dict()
    dail = evaluation_metrics(outcomes(DAIL, 6), KS, BUDGETS).to_dict()
    sft = evaluation_metrics(outcomes(SFT, 10), KS, BUDGETS).to_dict()
    return {
        "format": "dail-study/1",
        "study": {
            "id": 3,
            "name": "gen-12",
            "state": "done",
            "created_at": "2026-12-02T14:00:00+00:00",
            "dataset": "generated",
            "base_model": "/models/smol_lm",
            "split": {
                "held_out_fraction": 0.3,
                "seed": 0,
                "training_problems": 28,
                "held_out_problems": 12,
            },
            "acceptance": "automatic: every kept trace accepted (no reviewer saw them)",
            "expansion": {
                "run_id": 7,
                "preset": "release-dail",
                "samples_per_problem": 2,
                "max_new_tokens": 96,
                "traces": 56,
                "kept": 40,
                "kept_rule": "answer_correct",
                "accepted": 31,
            },
            "evaluation": {
                "protocol": "workbench: plain sampling",
                "samples_per_problem": 4,
                "ks": KS,
                "budgets": BUDGETS,
                "temperature": 1.0,
                "top_p": 0.95,
                "top_k": 20,
                "max_new_tokens": 16,
                "seed": 0,
            },
        },
        "arms": [
            {
                "key": "base",
                "label": base_label,
                "description": "the model as it is",
                "state": "done",
                "training": None,
                "evaluation_id": 11,
                "metrics": base,
            },
            {
                "key": "sft",
                "label": "SFT on expert solutions",
                "description": "",
                "state": "done",
                "training": {
                    "run_id": 4,
                    "objective": "sft",
                    "gamma": None,
                    "data": "28 expert solutions",
                    "examples": 28,
                    "steps": 10,
                    "adapter_path": "/runs/4/adapter",
                    "snapshot_sha256": "0123456789abcdef" * 4,
                    "final_loss": 0.75,
                },
                "evaluation_id": 12,
                "metrics": sft,
            },
            {
                "key": "dail",
                "label": "DAIL (γ 0.1)",
                "description": "contrastive",
                "state": "done",
                "training": {
                    "run_id": 5,
                    "objective": "dail",
                    "gamma": 0.1,
                    "data": "31 accepted traces of run #7",
                    "examples": 31,
                    "steps": 12,
                    "adapter_path": "/runs/5/adapter",
                    "snapshot_sha256": "fedcba9876543210" * 4,
                    "final_loss": 0.12,
                },
                "evaluation_id": 13,
                "metrics": dail,
            },
            {
                "key": "dail-g0",
                "label": "DAIL (γ 0)",
                "state": "training",
                "training": {"run_id": 6, "objective": "dail", "gamma": 0.0},
                "evaluation_id": None,
                "metrics": None,
            },
        ],
        "comparisons": (
            comparisons
            if comparisons is not None
            else [
                comparison("dail", "base", DAIL, BASE, 1),
                comparison("sft", "base", SFT, BASE, 1),
            ]
        ),
    }


def table(markdown: str, heading: str) -> list[list[str]]:
    """The rows (cells split on unescaped pipes) of the first table after `heading`."""
    section = markdown.split(f"## {heading}\n", 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            rows.append([cell.strip() for cell in cells])
        elif rows:
            break
    return rows


def percent(estimate: dict) -> str:
    return (
        f"{100 * estimate['value']:.1f} % [{100 * estimate['low']:.1f}, "
        f"{100 * estimate['high']:.1f}]"
    )


# --- The report ------------------------------------------------------------------------------


def test_results_table_matches_the_document():
    document = make_document()
    markdown = markdown_report(document)
    rows = table(markdown, "Results")
    assert rows[0] == [
        "Arm",
        "Training data",
        "pass@1 [95 % CI]",
        "pass@4 [95 % CI]",
        "Mean tokens",
        "Correct samples",
    ]
    assert len(rows) == 2 + len(document["arms"])
    for row, arm in zip(rows[2:5], document["arms"][:3], strict=True):
        metrics = arm["metrics"]
        by_k = {e["k"]: e for e in metrics["pass_at_k"]}
        assert row[0] == markdown_text(arm["label"])
        assert row[2] == percent(by_k[1])
        assert row[3] == percent(by_k[4])
        assert row[4] == f"{metrics['mean_tokens']:.1f}"
        assert row[5] == f"{metrics['correct_samples']} / {metrics['samples']}"
    assert rows[2][1] == "none (not trained)"
    assert rows[4][1] == "31 accepted traces of run #7"
    # The arm still training has no metrics: said so, no numbers.
    assert rows[5][2] == "not evaluated (training)"
    assert rows[5][3:] == ["—", "—", "—"]
    # DAIL solves more than the base model, and the table shows it.
    assert float(rows[4][2].split()[0]) > float(rows[2][2].split()[0])


def test_setup_states_every_number_of_the_document():
    markdown = markdown_report(make_document())
    setup = markdown.split("## Setup\n", 1)[1].split("## Results", 1)[0]
    for fact in (
        "generated",
        "28 training problems",
        "12 held-out problems",
        "held-out fraction 0.3, seed 0",
        "/models/smol\\_lm",
        "automatic: every kept trace accepted (no reviewer saw them)",
        "run #7, preset release-dail, 2 samples per problem, up to 96 new tokens: 56 traces, "
        "40 kept, 31 accepted (kept by answer\\_correct)",
        "n = 4 samples per held-out problem; k = 1, 2, 4; token budgets 8, 16; temperature "
        "1.0, top-p 0.95, top-k 20; up to 16 new tokens; seed 0",
    ):
        assert fact in setup, fact
    assert markdown.startswith("# Study: gen-12\n")


def test_comparisons_table_and_sentence_for_a_clear_difference():
    document = make_document()
    markdown = markdown_report(document)
    rows = table(markdown, "Paired comparisons")
    assert rows[0] == ["Arm vs against", "k", "Difference [95 % CI]", "Better / worse / ties"]
    dail = document["comparisons"][0]
    assert dail["low"] > 0  # constructed so: DAIL solves 2 more samples of 4 everywhere
    assert rows[2] == [
        "DAIL (γ 0.1) vs Base model",
        "1",
        f"+{100 * dail['value']:.1f} points [{100 * dail['low']:.1f}, {100 * dail['high']:.1f}]",
        f"{dail['better']} / {dail['worse']} / {dail['ties']} of 12",
    ]
    sentence = (
        f"- DAIL (γ 0.1) beats Base model at k=1 by +{100 * dail['value']:.1f} points "
        f"[{100 * dail['low']:.1f}, {100 * dail['high']:.1f}]."
    )
    assert sentence in markdown.splitlines()
    sft = document["comparisons"][1]
    assert sft["low"] <= 0 <= sft["high"]
    assert "SFT on expert solutions beats" not in markdown
    assert "SFT on expert solutions falls behind" not in markdown
    assert "distinguishable from noise" not in markdown


def test_a_worse_arm_is_said_to_fall_behind():
    markdown = markdown_report(
        make_document(comparisons=[comparison("base", "dail", BASE, DAIL, 2)])
    )
    assert re.search(r"^- Base model falls behind DAIL \(γ 0\.1\) at k=2 by -\d", markdown, re.M)


def test_no_distinguishable_difference_is_said_plainly():
    document = make_document(comparisons=[comparison("sft", "base", SFT, BASE, 1)])
    markdown = markdown_report(document)
    assert (
        "No difference is distinguishable from noise at this size (12 problems): every 95 % "
        "interval contains 0."
    ) in markdown
    assert " beats " not in markdown and " falls behind " not in markdown
    no_comparisons = markdown_report(make_document(comparisons=[]))
    assert "No paired comparisons" in no_comparisons


def test_lineage_of_every_arm():
    markdown = markdown_report(make_document())
    lineage = markdown.split("## Lineage\n", 1)[1]
    sft = lineage.split("### SFT on expert solutions\n", 1)[1].split("### ", 1)[0]
    assert "- **Training:** run #4, objective sft\n" in sft
    assert "- **Data:** 28 expert solutions (28 examples, 10 steps, final loss 0.75)" in sft
    assert "- **Data snapshot SHA-256:** `0123456789ab`…" in sft
    assert "- **Adapter:** /runs/4/adapter" in sft
    assert "- **Evaluation:** #12" in sft
    base = lineage.split("### Base model\n", 1)[1].split("### ", 1)[0]
    assert "- **Training:** none" in base and "- **Evaluation:** #11" in base
    pending = lineage.split("### DAIL (γ 0)\n", 1)[1]
    assert "gamma 0.0" in pending
    assert "- **Evaluation:** not evaluated (training)" in pending


def test_charts_are_listed_as_images_when_given():
    document = make_document()
    charts = study_charts(document)
    markdown = markdown_report(document, chart_files=charts)
    assert f"]({PASS_AT_K_CHART})" in markdown and f"]({BUDGET_CHART})" in markdown
    assert "![" not in markdown_report(document)


def test_hostile_names_are_inert():
    document = make_document(base_label=HOSTILE)
    document["study"]["name"] = HOSTILE
    document["arms"][1]["training"]["data"] = HOSTILE
    document["arms"][1]["training"]["adapter_path"] = HOSTILE
    document["study"]["acceptance"] = HOSTILE
    markdown = markdown_report(document, chart_files=study_charts(document))
    assert "<img" not in markdown and "](javascript" not in markdown.replace("\\](", "")
    # Rendered with raw HTML allowed: still no image, link, code or extra cell.
    html = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)
    assert '<img src="x"' not in html and "<img src=x" not in html
    assert "javascript:" not in re.sub(r">[^<]*<", "><", html)  # only as text, never an attr
    assert "<code>code</code>" not in html and "<em>b</em>" not in html
    assert "&lt;img src=x&gt;" in html
    results = table(markdown, "Results")
    assert all(len(row) == len(results[0]) for row in results)
    assert results[2][0] == markdown_text(HOSTILE)
    assert "\n" not in markdown_text(HOSTILE) and markdown_text("# x").startswith("\\#")
    # One heading per arm and the title: no heading injected by a name.
    assert len(re.findall(r"^# ", markdown, re.M)) == 1
    # The chart of a hostile label is still one SVG without a script.
    for svg in study_charts(document).values():
        root = ET.fromstring(svg)
        assert not [element for element in root.iter() if element.tag.endswith("script")]


def test_same_document_same_bytes():
    document = make_document()
    first = report_files(document)
    again = report_files(copy.deepcopy(document))
    assert first == again


def test_report_files():
    document = make_document()
    files = report_files(document)
    assert list(files) == ["study.json", "report.md", PASS_AT_K_CHART, BUDGET_CHART]
    assert json.loads(files["study.json"]) == document
    assert files["study.json"] == json.dumps(document, indent=2, sort_keys=True)
    assert files["report.md"] == markdown_report(document, chart_files=study_charts(document))
    for name in (PASS_AT_K_CHART, BUDGET_CHART):
        root = ET.fromstring(files[name])
        # One line per evaluated arm (3 of 4); pass@k has a point per k, the other per budget.
        lines = list(root.iter(f"{SVG}polyline"))
        assert len(lines) == 3
        expected = len(KS) if name == PASS_AT_K_CHART else len(BUDGETS)
        assert all(len(line.get("points").split()) == expected for line in lines)


def test_a_document_missing_optional_parts_still_renders():
    document = {"format": "dail-study/1", "study": {"name": "bare"}, "arms": [{"key": "base"}]}
    markdown = markdown_report(document)
    assert markdown.startswith("# Study: bare\n")
    assert "- **Expansion:** none" in markdown
    assert "no top-k" in markdown
    assert "not evaluated (unknown state)" in markdown
    files = report_files(document)
    for name in (PASS_AT_K_CHART, BUDGET_CHART):
        assert "no data" in "".join(ET.fromstring(files[name]).itertext())
