"""Markdown + LaTeX to safe HTML, on the server (one place for the whole workbench).

- Math is found by `find_math_spans` (`$$…$$`, `\\[…\\]`, `$…$`, `\\(…\\)`; `\\$` is a literal
  dollar) and rendered by KaTeX running inside the `pykatex` extension: no JavaScript in the
  browser. With KaTeX's CSS installed (`./dev setup`) the output is KaTeX's HTML + MathML,
  else MathML alone, which browsers render natively.
- Markdown is rendered by markdown-it-py with raw HTML disabled, so `<script>` in any text is
  shown as text, never executed.
- LaTeX that KaTeX cannot parse is shown inline as an error (the source stays as written).
- `render_source_with_math` keeps the source's characters and line breaks and only typesets
  the formulas; every piece carries its character span (`data-start`, `data-end`), so a
  selection made in the browser maps back to exact offsets in the source (waypoint marking).
"""

from __future__ import annotations

import functools
import html
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pykatex
from django.conf import settings
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt


@dataclass(frozen=True)
class MathSpan:
    start: int  # offset of the opening delimiter in the source
    end: int  # offset just after the closing delimiter
    tex: str
    display: bool


@dataclass(frozen=True)
class MathError:
    tex: str
    message: str


# Order matters: display delimiters before inline ones.
_MATH_PATTERN = re.compile(
    r"(?<!\\)\$\$(?P<dd>.+?)(?<!\\)\$\$"
    r"|\\\[(?P<bd>.+?)\\\]"
    r"|(?<![\\$])\$(?!\s)(?P<di>[^$\n]*?[^\s\\$])\$(?!\d)"
    r"|(?<!\\)\$(?P<d1>[^\s$\\])\$"
    r"|\\\((?P<bi>.+?)\\\)",
    re.DOTALL,
)


def find_math_spans(text: str) -> list[MathSpan]:
    """The formulas in `text`, in order, with the offsets of their delimiters."""
    spans = []
    for match in _MATH_PATTERN.finditer(text):
        if match.group("dd") is not None:
            spans.append(MathSpan(match.start(), match.end(), match.group("dd"), True))
        elif match.group("bd") is not None:
            spans.append(MathSpan(match.start(), match.end(), match.group("bd"), True))
        else:
            tex = match.group("di") or match.group("d1") or match.group("bi")
            spans.append(MathSpan(match.start(), match.end(), tex, False))
    return spans


def _katex_output() -> str:
    return "htmlAndMathml" if settings.KATEX_DIST_DIR.is_dir() else "mathml"


# pykatex runs KaTeX in one embedded QuickJS runtime that belongs to the first thread that
# uses it: a call from another thread fails ("size exceeded") or crashes the process. A
# threaded web server therefore sends every render to one dedicated thread.
_katex_thread: ThreadPoolExecutor | None = None
_katex_thread_lock = threading.Lock()


def _katex_executor() -> ThreadPoolExecutor:
    global _katex_thread
    with _katex_thread_lock:
        if _katex_thread is None:
            _katex_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="katex")
        return _katex_thread


def _forget_katex_thread() -> None:  # a forked child (Celery pool) has no such thread
    global _katex_thread
    _katex_thread = None


os.register_at_fork(after_in_child=_forget_katex_thread)


def _katex(tex: str, display: bool, output: str) -> tuple[str, str]:
    try:
        return pykatex.renderToString(tex, displayMode=display, output=output), ""
    except pykatex.ParseError as exc:
        return "", str(exc)


@functools.lru_cache(maxsize=8192)
def _render_tex_cached(tex: str, display: bool, output: str) -> tuple[str, str]:
    return _katex_executor().submit(_katex, tex, display, output).result()


def render_tex(tex: str, display: bool = False) -> tuple[str, MathError | None]:
    """KaTeX HTML for one formula, or an inline error box (and the error) if it does not parse."""
    rendered, error = _render_tex_cached(tex, display, _katex_output())
    if not error:
        return rendered, None
    box = (
        f'<span class="math-error" title="{html.escape(error)}" role="note">'
        f"{html.escape(tex)}</span>"
    )
    return box, MathError(tex=tex, message=error)


_markdown = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
_markdown.enable("table")
_markdown.enable("strikethrough")

_PLACEHOLDER = "DAILMATH{}X"
_PLACEHOLDER_PATTERN = re.compile(r"DAILMATH(\d+)X")


@dataclass(frozen=True)
class Rendered:
    html: SafeString
    math_errors: list[MathError]


def render_markdown(text: str) -> Rendered:
    """Markdown + LaTeX as safe HTML, with the list of formulas KaTeX could not parse."""
    spans = find_math_spans(text)
    pieces: list[str] = []
    formulas: list[str] = []
    errors: list[MathError] = []
    cursor = 0
    for index, span in enumerate(spans):
        pieces.append(text[cursor : span.start])
        rendered, error = render_tex(span.tex, span.display)
        if error:
            errors.append(error)
        formulas.append(f'<div class="math-display">{rendered}</div>' if span.display else rendered)
        pieces.append(_PLACEHOLDER.format(index))
        cursor = span.end
    pieces.append(text[cursor:])
    body = _markdown.render("".join(pieces))
    body = _PLACEHOLDER_PATTERN.sub(lambda m: formulas[int(m.group(1))], body)
    return Rendered(html=mark_safe(body), math_errors=errors)  # noqa: S308 - escaped above


def render_source_with_math(text: str, marks: Sequence[tuple[int, int]] = ()) -> SafeString:
    """The source with its formulas typeset and every piece tagged with its character span.

    `marks` (non-overlapping spans, e.g. waypoints) are highlighted: text is split at their
    edges and pieces inside mark number n get `class="mark mark-n"` (formulas inside or
    overlapping a mark are highlighted whole).
    """
    parts: list[str] = []
    edges = sorted({0, len(text), *(p for mark in marks for p in mark if 0 <= p <= len(text))})

    def mark_of(start: int, end: int) -> int | None:
        for number, (m_start, m_end) in enumerate(marks, start=1):
            if start < m_end and m_start < end:
                return number
        return None

    def classes(base: str, start: int, end: int) -> str:
        number = mark_of(start, end)
        return base if number is None else f"{base} mark mark-{number}"

    def plain(start: int, end: int) -> None:
        cuts = [start] + [e for e in edges if start < e < end] + [end]
        for a, b in zip(cuts, cuts[1:], strict=False):
            if b > a:
                parts.append(
                    f'<span class="{classes("src", a, b)}" data-start="{a}" data-end="{b}">'
                    f"{html.escape(text[a:b])}</span>"
                )

    cursor = 0
    for span in find_math_spans(text):
        plain(cursor, span.start)
        rendered, _error = render_tex(span.tex, span.display)
        parts.append(
            f'<span class="{classes("src-math", span.start, span.end)}" '
            f'data-start="{span.start}" data-end="{span.end}" '
            f'title="{html.escape(text[span.start : span.end])}">{rendered}</span>'
        )
        cursor = span.end
    plain(cursor, len(text))
    return mark_safe("".join(parts))  # noqa: S308 - every piece escaped or KaTeX output
