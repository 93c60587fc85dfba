"""Markdown + LaTeX to safe HTML, on the server (one place for the whole workbench).

- Math is part of the Markdown parse (markdown-it-py with mdit-py-plugins' dollarmath and
  amsmath, plus our `\\(…\\)` / `\\[…\\]` rules): `$…$`, `$$…$$`, `\\(…\\)`, `\\[…\\]` and
  top-level `\\begin{align}`-style environments become math tokens; `\\$` is a literal
  dollar; code spans and code blocks stay code. No user text is ever swapped for a marker.
- Math tokens are rendered by KaTeX running inside the `pykatex` extension: no JavaScript in
  the browser. With KaTeX's CSS installed (`./dev setup`) the output is KaTeX's HTML +
  MathML, else MathML alone, which browsers render natively.
- Raw HTML is disabled, so `<script>` in any text is shown as text, never executed; formulas
  are tokens of their own, so they can never land inside a link's or an image's attribute.
- LaTeX that KaTeX cannot parse is shown inline as an error (the source stays as written).
- `render_source_with_math` keeps the source's characters and line breaks and only typesets
  the formulas the Markdown parse found (`find_math_spans`); every piece carries its character
  span (`data-start`, `data-end`), so a selection made in the browser maps back to exact
  offsets in the source (waypoint marking).
"""

from __future__ import annotations

import bisect
import functools
import html
import os
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pykatex
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.rules_block import StateBlock
from markdown_it.rules_inline import StateInline
from markdown_it.token import Token
from mdit_py_plugins.amsmath import amsmath_plugin
from mdit_py_plugins.dollarmath.index import math_block_dollar, math_inline_dollar


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


def _katex_output() -> str:
    # MathML only, which browsers render natively: KaTeX's HTML output positions every glyph
    # with inline style="" attributes, which the Content-Security-Policy (style-src 'self')
    # blocks. KaTeX's CSS still sets the formulas' size and the display-math layout.
    return "mathml"


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


# --- Math in the Markdown parse -------------------------------------------------------------

# Token types of the math rules; every display one is typeset in display mode.
_INLINE_MATH = {"math_inline", "math_inline_double"}
_DISPLAY_MATH = {"math_inline_double", "math_block", "amsmath"}
_BLOCK_MATH = {"math_block", "amsmath"}

InlineRule = Callable[[StateInline, bool], bool]
BlockRule = Callable[[StateBlock, int, int, bool], bool]


def _with_offsets(rule: InlineRule) -> InlineRule:
    """An inline math rule that also records where its token lies in the inline source
    (`meta["offsets"]`): `find_math_spans` maps it back to the document."""

    def rule_with_offsets(state: StateInline, silent: bool) -> bool:
        start = state.pos
        if not rule(state, silent):
            return False
        if not silent:
            state.tokens[-1].meta["offsets"] = (start, state.pos)
        return True

    return rule_with_offsets


def _single_block_formula(rule: BlockRule) -> BlockRule:
    """dollarmath's `$$` block, refused when it would swallow a `$$` (a line `$$a`, then
    `b$$ c`, then `d$$`): the lines are then a paragraph whose inline rules find each formula."""

    def rule_checked(state: StateBlock, start_line: int, end_line: int, silent: bool) -> bool:
        count, line = len(state.tokens), state.line
        if not rule(state, start_line, end_line, silent):
            return False
        if not silent and "$$" in state.tokens[-1].content:
            del state.tokens[count:]
            state.line = line
            return False
        return True

    return rule_checked


def _math_inline_bracket(state: StateInline, silent: bool) -> bool:
    r"""`\(…\)` (inline) and `\[…\]` inside a paragraph (display). Runs before the escape rule,
    which would otherwise read `\(` as an escaped parenthesis; `\\(` never gets here (the escape
    rule takes `\\` first)."""
    src, pos = state.src, state.pos
    if src[pos] != "\\" or pos + 1 >= state.posMax or src[pos + 1] not in "([":
        return False
    bracket = src[pos + 1]
    closing = src.find("\\)" if bracket == "(" else "\\]", pos + 2, state.posMax)
    if closing <= pos + 2 or not src[pos + 2 : closing].strip():
        return False
    if not silent:
        token = state.push("math_inline" if bracket == "(" else "math_inline_double", "math", 0)
        token.content = src[pos + 2 : closing]
        token.markup = src[pos : pos + 2]
    state.pos = closing + 2
    return True


def _math_block_bracket(state: StateBlock, start_line: int, end_line: int, silent: bool) -> bool:
    r"""`\[…\]` starting a block and closed at the end of one of its lines."""
    if state.is_code_block(start_line):
        return False
    start = state.bMarks[start_line] + state.tShift[start_line]
    if not state.src.startswith("\\[", start):
        return False
    closing = state.src.find("\\]", start + 2)
    if closing < 0 or not state.src[start + 2 : closing].strip():
        return False
    line = start_line
    while line < end_line and state.eMarks[line] < closing + 2:
        line += 1
    if line >= end_line or state.src[closing + 2 : state.eMarks[line]].strip():
        return False  # `\[a\] and more` is a paragraph; the inline rule takes the formula
    if not silent:
        token = state.push("math_block", "math", 0)
        token.block = True
        # Line by line from each line's content start, so a quote's `> ` stays out.
        lines = [(start + 2, state.eMarks[start_line])]
        lines += [(state.bMarks[n], state.eMarks[n]) for n in range(start_line + 1, line + 1)]
        lines[-1] = (lines[-1][0], closing)
        token.content = "\n".join(state.src[a:b] for a, b in lines)
        token.markup = "\\["
        token.map = [start_line, line + 1]
    state.line = line + 1
    return True


def _render_math(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    token = tokens[idx]
    display = token.type in _DISPLAY_MATH
    rendered, error = render_tex(token.content.strip(), display)
    if error:
        env.setdefault("math_errors", []).append(error)
    if token.type in _BLOCK_MATH:
        return f'<div class="math-display">{rendered}</div>\n'
    if display:  # inside a paragraph: a span (CSS makes it a block), as a <div> may not be
        return f'<span class="math-display">{rendered}</span>'
    return rendered


class _Renderer(RendererHTML):
    def renderInlineAsText(self, tokens, options, env):  # noqa: N802 - markdown-it's name
        """An image's alt text keeps its formulas as written (the base drops them)."""
        return "".join(
            token.content
            if token.type in _INLINE_MATH
            else super(_Renderer, self).renderInlineAsText([token], options, env)
            for token in tokens or []
        )


def _markdown_parser() -> MarkdownIt:
    md = MarkdownIt(
        "commonmark",
        {"html": False, "linkify": False, "typographer": False},
        renderer_cls=_Renderer,
    )
    md.enable("table")
    md.enable("strikethrough")
    # `$x$` needs no space inside its dollars and no digit outside them, so "$5 and $6" stays
    # text; `$$…$$` inside a paragraph is display math (as `\[…\]` is).
    dollar_inline = math_inline_dollar(allow_space=False, allow_digits=False, allow_double=True)
    md.inline.ruler.before("escape", "math_inline", _with_offsets(dollar_inline))
    md.inline.ruler.before("escape", "math_inline_bracket", _with_offsets(_math_inline_bracket))
    dollar_block = math_block_dollar(allow_labels=False, allow_blank_lines=True)
    md.block.ruler.before("fence", "math_block", _single_block_formula(dollar_block))
    md.block.ruler.before("fence", "math_block_bracket", _math_block_bracket)
    amsmath_plugin(md)
    for kind in (*_INLINE_MATH, *_BLOCK_MATH):
        md.add_render_rule(kind, _render_math)
    return md


# Built once: a parser is not cheap to construct, and parsing does not change it.
_markdown = _markdown_parser()


@dataclass(frozen=True)
class Rendered:
    html: SafeString
    math_errors: list[MathError]


def render_markdown(text: str) -> Rendered:
    """Markdown + LaTeX as safe HTML, with the list of formulas KaTeX could not parse."""
    env: dict[str, Any] = {"math_errors": []}
    body = _markdown.render(text, env)
    # markdown-it escapes all text and attributes; math tokens are KaTeX output.
    return Rendered(html=mark_safe(body), math_errors=env["math_errors"])  # noqa: S308


# --- Formulas in the source (offsets) ---------------------------------------------------------

# markdown-it's own line breaks (its normalize rule), so line numbers agree with token maps.
_LINE_BREAK = re.compile(r"\r\n?|\n")

_CLOSING = {"$$": "$$", "\\[": "\\]"}


class _SourceLines:
    """The source split into markdown-it's lines, with each line's offset in the source."""

    def __init__(self, text: str) -> None:
        self.text = text
        # markdown-it reads NUL as U+FFFD (same length), so compare lines the way it saw them.
        self.lines = _LINE_BREAK.split(text.replace("\0", "\ufffd"))
        self.starts = [0] + [m.end() for m in _LINE_BREAK.finditer(text)]
        self.cursor: dict[int, int] = {}  # line -> column after the last text located on it

    def locate(self, line: int, piece: str, anywhere: bool) -> int | None:
        """Column of `piece` (a line of a token's inline text) in source line `line`, at or
        after the last piece located there. A paragraph's line is the end of its source line
        (after container markers such as `> ` or `- `); a heading's or a cell's is inside."""
        if line >= len(self.lines):
            return None
        source, after = self.lines[line], self.cursor.get(line, 0)
        column = -1
        if not anywhere:
            for candidate in (source, source.rstrip()):
                if candidate.endswith(piece) and len(candidate) - len(piece) >= after:
                    column = len(candidate) - len(piece)
                    break
        if column < 0:
            column = source.find(piece, after)
        if column < 0:
            return None
        self.cursor[line] = column + len(piece)
        return self.starts[line] + column


def _inline_spans(token: Token, source: _SourceLines, in_table: bool) -> list[MathSpan]:
    """The formulas of one inline token (a paragraph, heading or cell), mapped from offsets in
    its text to offsets in the source, line by line. A formula whose lines cannot be found
    exactly (a tab expanded by a list's indentation) is left out: shown as source text."""
    if not token.map or not token.children:
        return []
    pieces = token.content.split("\n")
    piece_starts = [0]
    for piece in pieces[:-1]:
        piece_starts.append(piece_starts[-1] + len(piece) + 1)
    located = [source.locate(token.map[0] + i, piece, in_table) for i, piece in enumerate(pieces)]

    def to_source(offset: int) -> int | None:
        i = bisect.bisect_right(piece_starts, offset) - 1
        return None if located[i] is None else located[i] + offset - piece_starts[i]

    spans = []
    for child in token.children:  # an image's alt text is parsed apart: not walked
        if child.type not in _INLINE_MATH or "offsets" not in child.meta:
            continue
        start, end = child.meta["offsets"]
        source_start, source_last = to_source(start), to_source(end - 1)
        if source_start is None or source_last is None:
            continue
        if source.text.startswith(child.markup, source_start):
            spans.append(
                MathSpan(
                    source_start,
                    source_last + 1,
                    child.content.strip(),
                    child.type in _DISPLAY_MATH,
                )
            )
    return spans


def _block_span(token: Token, source: _SourceLines) -> MathSpan | None:
    """A block formula: from its opening delimiter on its first line to the end of its last."""
    if not token.map:
        return None
    if token.type == "amsmath":
        opening = "\\begin{"
        closing = "\\end{" + token.meta["environment"] + token.meta["numbered"] + "}"
        last = token.map[1]  # amsmath's map ends on the closing line, not after it
    else:
        opening, closing, last = token.markup, _CLOSING[token.markup], token.map[1] - 1
    first = token.map[0]
    if last >= len(source.lines):
        return None
    column = source.lines[first].find(opening)
    last_line = source.lines[last].rstrip()
    if column < 0 or not last_line.endswith(closing):
        return None
    return MathSpan(
        source.starts[first] + column,
        source.starts[last] + len(last_line),
        token.content.strip(),
        True,
    )


def find_math_spans(text: str) -> list[MathSpan]:
    """The formulas of `text` as the Markdown parse finds them (not in code, `\\$` is a
    dollar), in order, with the offsets of their delimiters in `text`."""
    source = _SourceLines(text)
    spans: list[MathSpan] = []
    in_table = False
    for token in _markdown.parse(text):
        if token.type in ("table_open", "table_close"):
            in_table = token.type == "table_open"
        elif token.type == "inline":
            spans.extend(_inline_spans(token, source, in_table))
        elif token.type in _BLOCK_MATH:
            span = _block_span(token, source)
            if span is not None:
                spans.append(span)
    # Offsets are rebuilt from the parse, so keep only what is ordered and disjoint.
    ordered: list[MathSpan] = []
    for span in sorted(spans, key=lambda s: s.start):
        if not ordered or span.start >= ordered[-1].end:
            ordered.append(span)
    return ordered


def render_source_with_math(text: str, marks: Sequence[tuple[int, int]] = ()) -> SafeString:
    """The source with its formulas typeset and every piece tagged with its character span.

    `marks` (non-overlapping spans, e.g. waypoints) are highlighted: text is split at their
    edges and pieces inside mark number n get `class="mark mark-n"`. A formula inside a mark
    is typeset and highlighted whole; a formula a mark covers only in part is shown as its
    source, so the highlight shows exactly what the mark covers.
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
        if any(
            span.start < m_end
            and m_start < span.end
            and not (m_start <= span.start <= span.end <= m_end)
            for m_start, m_end in marks
        ):
            # A mark covers part of this formula: its source is shown, so the highlight
            # covers exactly the marked characters (a typeset formula is one piece).
            plain(span.start, span.end)
            cursor = span.end
            continue
        rendered, _error = render_tex(span.tex, span.display)
        parts.append(
            f'<span class="{classes("src-math", span.start, span.end)}" '
            f'data-start="{span.start}" data-end="{span.end}" '
            f'title="{html.escape(text[span.start : span.end])}">{rendered}</span>'
        )
        cursor = span.end
    plain(cursor, len(text))
    return mark_safe("".join(parts))  # noqa: S308 - every piece escaped or KaTeX output


# --- Short pieces: list cells, excerpts, waypoints ---------------------------------------------


def render_inline(text: str) -> SafeString:
    """One line of Markdown + LaTeX without a paragraph around it (list cells, waypoints)."""
    env: dict[str, Any] = {"math_errors": []}
    return mark_safe(_markdown.renderInline(text, env))  # noqa: S308 - escaped by markdown-it


def render_excerpt(text: str, limit: int = 140) -> SafeString:
    """The start of `text` (about `limit` characters, never ending inside a formula), on one
    line, with its formulas typeset."""
    flat = " ".join(text.split())
    if len(flat) > limit:
        cut = limit
        for span in find_math_spans(flat):
            if span.start < cut < span.end:
                # A formula longer than the excerpt is kept whole up to twice the limit.
                cut = span.end if span.end <= 2 * limit else span.start
                break
        flat = flat[:cut].rstrip() + "…"
    return render_inline(flat)


def render_spans_of(text: str, spans: Sequence[tuple[int, int]]) -> list[SafeString]:
    """Each span of `text` typeset (waypoint lists): a piece of a formula's TeX as math, other
    text as inline Markdown; TeX that KaTeX cannot typeset alone is shown as code."""
    formulas = find_math_spans(text)
    rendered: list[SafeString] = []
    for start, end in spans:
        piece = text[start:end]
        inside = next((f for f in formulas if f.start < start and end < f.end), None)
        if inside is not None and piece.strip():
            html_out, error = render_tex(piece.strip(), False)
            rendered.append(
                mark_safe(html_out)  # noqa: S308 - KaTeX output
                if error is None
                else mark_safe(f"<code>{html.escape(piece)}</code>")  # noqa: S308 - escaped
            )
        else:
            rendered.append(render_inline(piece))
    return rendered
