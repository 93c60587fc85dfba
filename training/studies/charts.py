"""Line charts as standalone SVG 1.1 documents, for a study's report and its export.

One function, `line_chart_svg`: series of (x, y) points with optional intervals (drawn as a
translucent band, or an error bar for a lone point), axes with ticks and grid lines, a legend.
Made to be printed and read by everyone: an Okabe-Ito (colour-blind-safe) palette, and each
series also has its own dash pattern and marker shape, so it survives greyscale.

Pages serve these under a strict Content-Security-Policy, so the SVG uses presentation
attributes only (`fill=`, `stroke=`), never a `style=` attribute or a `<style>` element.
Labels are user text: every string is escaped, and characters XML cannot carry are dropped.

This module knows nothing about studies, metrics or Django: it draws numbers it is given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

WIDTH, HEIGHT = 680, 360
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 64, 450, 44, 304  # the plotting area
LEGEND_LEFT, LEGEND_TOP, LEGEND_ROW = 466, 52, 20
LEGEND_CHARS = 26  # longer labels are shortened in the legend (the full one is its <title>)
X_PAD = 14  # keeps the first and last points off the axes

# Okabe & Ito (2008), without yellow (too pale on white) until the others are used up.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
DASHES = ("", "7 4", "2 3", "9 3 2 3", "4 2", "12 4", "1 3", "6 2 2 2")
MARKERS = ("circle", "square", "diamond", "triangle", "triangle-down")

# XML 1.0 cannot carry these characters at all, not even escaped.
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class ChartPoint:
    x: float
    y: float
    low: float | None = None  # the interval around y, when there is one
    high: float | None = None


@dataclass(frozen=True)
class ChartSeries:
    label: str
    points: Sequence[ChartPoint] = field(default_factory=tuple)


def _clean(value: object) -> str:
    """One line of text XML can carry."""
    return _NOT_XML.sub("", re.sub(r"[\t\n\r]", " ", str(value)))


def _text(value: object) -> str:
    """Element content."""
    return escape(_clean(value))


def _attr(value: object) -> str:
    """An attribute value, quotes included."""
    return quoteattr(_clean(value))


def _num(value: float) -> str:
    """A coordinate: fixed precision, so the same chart gives the same bytes."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _tick_label(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _finite(*values: float | None) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _y_ticks(y_min: float, y_max: float) -> list[float]:
    """Round steps (1, 2 or 5 times a power of ten), at most 8 ticks."""
    span = y_max - y_min
    magnitude = 10 ** math.floor(math.log10(span))
    step = next(m * magnitude for m in (0.1, 0.2, 0.5, 1, 2, 5, 10) if span / (m * magnitude) <= 7)
    first = math.ceil(y_min / step - 1e-9)
    ticks = []
    index = first
    while index * step <= y_max + step * 1e-9:
        ticks.append(round(index * step, 12))
        index += 1
    return ticks


def _marker(shape: str, x: float, y: float, colour: str) -> str:
    fill = f'fill="{colour}" stroke="#ffffff" stroke-width="0.8"'
    if shape == "circle":
        return f'<circle cx="{_num(x)}" cy="{_num(y)}" r="3.6" {fill}/>'
    if shape == "square":
        return f'<rect x="{_num(x - 3.3)}" y="{_num(y - 3.3)}" width="6.6" height="6.6" {fill}/>'
    corners = {
        "diamond": ((0, -4.6), (4.6, 0), (0, 4.6), (-4.6, 0)),
        "triangle": ((0, -4.6), (4.2, 3.4), (-4.2, 3.4)),
        "triangle-down": ((0, 4.6), (4.2, -3.4), (-4.2, -3.4)),
    }[shape]
    points = " ".join(f"{_num(x + dx)},{_num(y + dy)}" for dx, dy in corners)
    return f'<polygon points="{points}" {fill}/>'


def line_chart_svg(
    *,
    title: str,
    x_label: str,
    y_label: str,
    series: Sequence[ChartSeries],
    x_log2: bool = False,
    y_min: float = 0.0,
    y_max: float = 1.0,
    y_format: str = "{:.0%}",
) -> str:
    """A standalone SVG document (640 x 360) of one line per series.

    x ticks sit at the data's x values (log2-spaced when `x_log2`, which needs x > 0); y runs
    from `y_min` to `y_max` (values outside are clamped to the edge) with ticks formatted by
    `y_format`. Points whose x or y is not a finite number are left out. With no points at
    all, the chart says "no data"."""
    if not (math.isfinite(y_min) and math.isfinite(y_max) and y_min < y_max):
        raise ValueError(f"y_min must be below y_max; got {y_min!r}, {y_max!r}")
    if x_log2 and any(p.x <= 0 for s in series for p in s.points if _finite(p.x)):
        raise ValueError("a log2 x axis needs every x > 0")
    drawn = [sorted((p for p in s.points if _finite(p.x, p.y)), key=lambda p: p.x) for s in series]
    xs = sorted({p.x for points in drawn for p in points})

    def position(x: float) -> float:
        return math.log2(x) if x_log2 else x

    def px(x: float) -> float:
        if len(xs) == 1:
            return (PLOT_LEFT + PLOT_RIGHT) / 2
        low, high = position(xs[0]), position(xs[-1])
        width = PLOT_RIGHT - PLOT_LEFT - 2 * X_PAD
        return PLOT_LEFT + X_PAD + (position(x) - low) / (high - low) * width

    def py(y: float) -> float:
        clamped = min(max(y, y_min), y_max)
        return PLOT_BOTTOM - (clamped - y_min) / (y_max - y_min) * (PLOT_BOTTOM - PLOT_TOP)

    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label={_attr(title)} font-family="sans-serif" font-size="11" fill="#222222">',
        f"<title>{_text(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{WIDTH / 2:g}" y="24" text-anchor="middle" font-size="14" '
        f'font-weight="bold">{_text(title)}</text>',
    ]

    # Grid, ticks and axes.
    out.append('<g stroke="#d9d9d9" stroke-width="1">')
    for tick in _y_ticks(y_min, y_max):
        out.append(
            f'<line x1="{PLOT_LEFT}" y1="{_num(py(tick))}" x2="{PLOT_RIGHT}" y2="{_num(py(tick))}"/>'
        )
    for x in xs:
        out.append(
            f'<line x1="{_num(px(x))}" y1="{PLOT_TOP}" x2="{_num(px(x))}" y2="{PLOT_BOTTOM}"/>'
        )
    out.append("</g>")
    out.append('<g font-size="10">')
    for tick in _y_ticks(y_min, y_max):
        out.append(
            f'<text x="{PLOT_LEFT - 6}" y="{_num(py(tick) + 3.5)}" text-anchor="end">'
            f"{_text(y_format.format(tick))}</text>"
        )
    for x in xs:
        out.append(
            f'<text x="{_num(px(x))}" y="{PLOT_BOTTOM + 15}" text-anchor="middle">'
            f"{_text(_tick_label(x))}</text>"
        )
    out.append("</g>")
    out.append(
        f'<path d="M {PLOT_LEFT} {PLOT_TOP} V {PLOT_BOTTOM} H {PLOT_RIGHT}" fill="none" '
        'stroke="#444444" stroke-width="1"/>'
    )
    out.append(
        f'<text x="{(PLOT_LEFT + PLOT_RIGHT) / 2:g}" y="{PLOT_BOTTOM + 36}" '
        f'text-anchor="middle">{_text(x_label)}{", log2 scale" if x_log2 else ""}</text>'
    )
    y_middle = (PLOT_TOP + PLOT_BOTTOM) / 2
    out.append(
        f'<text x="16" y="{y_middle:g}" text-anchor="middle" '
        f'transform="rotate(-90 16 {y_middle:g})">{_text(y_label)}</text>'
    )

    if not xs:
        out.append(
            f'<text x="{(PLOT_LEFT + PLOT_RIGHT) / 2:g}" y="{y_middle:g}" text-anchor="middle" '
            'font-size="16" fill="#666666">no data</text>'
        )

    # Bands first, so every line is drawn over every band.
    for index, points in enumerate(drawn):
        colour = PALETTE[index % len(PALETTE)]
        # (x, low, high) of the points that have an interval.
        spans = [
            (px(p.x), py(p.low), py(p.high))
            for p in points
            if p.low is not None and p.high is not None and _finite(p.low, p.high)
        ]
        if len(spans) >= 2:
            upper = [f"{_num(x)},{_num(high)}" for x, _, high in spans]
            lower = [f"{_num(x)},{_num(low)}" for x, low, _ in reversed(spans)]
            out.append(
                f'<polygon points="{" ".join(upper + lower)}" fill="{colour}" '
                'fill-opacity="0.14" stroke="none"/>'
            )
        elif spans:
            x, bottom, top = spans[0]
            out.append(
                f'<path d="M {_num(x)} {_num(top)} V {_num(bottom)} M {_num(x - 4)} {_num(top)} '
                f'H {_num(x + 4)} M {_num(x - 4)} {_num(bottom)} H {_num(x + 4)}" '
                f'fill="none" stroke="{colour}" stroke-width="1.2"/>'
            )

    for index, (item, points) in enumerate(zip(series, drawn, strict=True)):
        if not points:
            continue
        colour, dash = PALETTE[index % len(PALETTE)], DASHES[index % len(DASHES)]
        shape = MARKERS[index % len(MARKERS)]
        coordinates = " ".join(f"{_num(px(p.x))},{_num(py(p.y))}" for p in points)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f"<g><title>{_text(item.label)}</title>")
        out.append(
            f'<polyline points="{coordinates}" fill="none" stroke="{colour}" '
            f'stroke-width="2"{dash_attr}/>'
        )
        out.extend(_marker(shape, px(p.x), py(p.y), colour) for p in points)
        out.append("</g>")

    # Legend.
    rows = (PLOT_BOTTOM - LEGEND_TOP) // LEGEND_ROW
    shown = series if len(series) <= rows else series[: rows - 1]
    for index, item in enumerate(shown):
        colour, dash = PALETTE[index % len(PALETTE)], DASHES[index % len(DASHES)]
        y = LEGEND_TOP + index * LEGEND_ROW
        label = _clean(item.label)
        suffix = "" if drawn[index] else " (no data)"
        room = LEGEND_CHARS - len(suffix)
        short = (label if len(label) <= room else label[: room - 1] + "…") + suffix
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f"<g><title>{_text(label)}</title>")
        out.append(
            f'<line x1="{LEGEND_LEFT}" y1="{y}" x2="{LEGEND_LEFT + 26}" y2="{y}" '
            f'stroke="{colour}" stroke-width="2"{dash_attr}/>'
        )
        out.append(_marker(MARKERS[index % len(MARKERS)], LEGEND_LEFT + 13, y, colour))
        out.append(f'<text x="{LEGEND_LEFT + 32}" y="{y + 4}">{_text(short)}</text>')
        out.append("</g>")
    if len(shown) < len(series):
        y = LEGEND_TOP + len(shown) * LEGEND_ROW
        out.append(
            f'<text x="{LEGEND_LEFT + 32}" y="{y + 4}">'
            f"+{len(series) - len(shown)} more series</text>"
        )

    out.append("</svg>")
    return "\n".join(out) + "\n"
