"""Server-side Markdown + LaTeX rendering."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from dailweb.rendering import find_math_spans, render_markdown, render_source_with_math


def test_math_delimiters_and_escaped_dollars():
    text = r"Cost \$5. Inline $x^2$, display $$\frac{a}{b}$$, \(y\) and \[z\]."
    spans = find_math_spans(text)
    assert [(s.tex, s.display) for s in spans] == [
        ("x^2", False),
        (r"\frac{a}{b}", True),
        ("y", False),
        ("z", True),
    ]


def test_markdown_with_math_escapes_html_and_reports_bad_latex():
    rendered = render_markdown(r"**bold** $x^2$ <script>alert(1)</script> $\frac{1$")
    assert "<strong>bold</strong>" in rendered.html
    assert "<math" in rendered.html
    assert "<script>" not in rendered.html and "&lt;script&gt;" in rendered.html
    assert [e.tex for e in rendered.math_errors] == [r"\frac{1"]
    assert 'class="math-error"' in rendered.html


def test_source_pane_keeps_offsets_and_marks():
    text = "a $x$ b c"
    html = render_source_with_math(text, marks=[(6, 7)])
    assert 'data-start="0" data-end="2"' in html
    assert 'class="src-math" data-start="2" data-end="5"' in html
    assert 'class="src mark mark-1" data-start="6" data-end="7">b<' in html


def test_rendering_from_many_threads_at_once_is_safe():
    # KaTeX runs in one QuickJS runtime; a threaded server must not crash it.
    formulas = [rf"\sum_{{i=1}}^{{{n}}} i^{{{n % 7}}}" for n in range(200)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda f: render_markdown(f"${f}$").html, formulas))
    assert all("<math" in html for html in results)
