"""Server-side Markdown + LaTeX rendering."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

import pytest

from dailweb.rendering import MathSpan, find_math_spans, render_markdown, render_source_with_math


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


# --- Math is a token of the Markdown parse (issue 12, defect 2) -------------------------------
# The old renderer swapped formulas out as `DAILMATH<n>X` and back in after Markdown: user text
# holding that token crashed every page showing it, or put KaTeX HTML into attributes.

MARKER_TEXTS = [
    "Plain DAILMATH0X and DAILMATH99X, then $x^2$.",
    "DAILMATH0X alone",
    "[link](DAILMATH0X) and $y$",
    "![DAILMATH0X](DAILMATH0X) with $z$",
    "![alt DAILMATH1X](https://example.org/DAILMATH0X.png) $a$ $b$",
    "`DAILMATH0X` and $$c$$",
]


@pytest.mark.parametrize("text", MARKER_TEXTS)
def test_user_text_never_reaches_an_internal_marker(text):
    rendered = str(render_markdown(text).html)
    # Every DAILMATH in the source survives as text (or as an attribute value): nothing is
    # swapped for a formula, and no KaTeX markup lands inside a tag.
    assert rendered.count("DAILMATH") == text.count("DAILMATH")
    for tag in re.findall(r"<(?:a|img)\b[^>]*>", rendered):
        assert "katex" not in tag and "<math" not in tag and "&lt;math" not in tag
    assert rendered.count("<math") == len(find_math_spans(text))


def test_marker_in_link_and_image_attributes_is_kept_as_written():
    rendered = str(render_markdown("$x$ [a](DAILMATH0X) ![DAILMATH0X](DAILMATH0X)").html)
    assert '<a href="DAILMATH0X">a</a>' in rendered
    assert '<img src="DAILMATH0X" alt="DAILMATH0X"' in rendered


def test_formula_in_image_alt_is_its_source_as_plain_text():
    rendered = str(render_markdown(r"![area $\pi r^2$](disk.png)").html)
    assert r'alt="area \pi r^2"' in rendered


def test_math_inside_code_stays_code():
    rendered = str(render_markdown("Inline `$x$` and\n\n```\n$$y$$ \\(z\\)\n```\n\n    $w$\n").html)
    assert "<code>$x$</code>" in rendered
    assert "$$y$$ \\(z\\)" in rendered and "<code>$w$" in rendered
    assert "<math" not in rendered
    assert find_math_spans("Inline `$x$` and $y$") == [MathSpan(17, 20, "y", False)]


def test_escaped_dollar_is_a_literal_dollar():
    rendered = str(render_markdown(r"It costs \$5 and \$6, not $x$.").html)
    assert "costs $5 and $6" in rendered
    assert rendered.count("<math") == 1


@pytest.mark.parametrize(
    ("text", "display"),
    [
        ("$x^2$", False),
        (r"\(x^2\)", False),
        ("$$x^2$$", True),
        (r"\[x^2\]", True),
        ("Before\n\n$$\nx^2\n$$\n\nafter", True),
        ("Before\n\n\\[\nx^2\n\\]\n\nafter", True),
        ("text $$x^2$$ text", True),
        ("text \\[x^2\\] text", True),
        ("\\begin{align}\nx^2 &= 1\n\\end{align}", True),
    ],
)
def test_every_delimiter_still_typesets(text, display):
    rendered = render_markdown(text)
    html = str(rendered.html)
    assert html.count("<math") == 1 and not rendered.math_errors
    assert ('display="block"' in html) is display
    assert ("math-display" in html) is display
    # Markdown did not eat the backslashes of \( \[ before KaTeX saw them.
    assert "\\(" not in html and "\\[" not in html


@pytest.mark.parametrize(
    "text",
    [
        "<script>alert(1)</script> $x$",
        '"><img src=x onerror=alert(1)> $x$',
        "[click](javascript:alert(1)) $x$",
        "![img](javascript:alert(1)) $x$",
        '[t](https://e.org "a\\" onmouseover=\\"alert(1)") $x$',
        r"$\href{javascript:alert(1)}{x}$ $\url{javascript:alert(1)}$",
        r"$\htmlClass{x}{y}$ $\htmlStyle{color:red}{y}$",
        "$<script>alert(1)</script>$",
        "`<script>alert(1)</script>`",
    ],
)
def test_hostile_text_is_escaped_or_neutralised(text):
    for html in (str(render_markdown(text).html), str(render_source_with_math(text))):
        tags = _tags(html)
        assert "script" not in {name for name, _ in tags}
        for _name, attrs in tags:
            assert not [a for a, _ in attrs if a.startswith("on")], attrs
            for attr, value in attrs:
                if attr in {"href", "src"}:
                    assert not (value or "").strip().lower().startswith("javascript:"), attrs


def _tags(html: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Every start tag of `html` with its attributes, as a browser's tokenizer reads them."""
    tags = []

    class Collector(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, attrs))

    Collector().feed(html)
    return tags


def test_source_pane_formulas_follow_the_markdown_parse():
    text = "a `$x$` b $y$\n> quoted $z$\n\n| $p$ | $p$ |\n|---|---|\n| $q$ | \\$ |"
    spans = find_math_spans(text)
    assert [text[s.start : s.end] for s in spans] == ["$y$", "$z$", "$p$", "$p$", "$q$"]
    assert len({s.start for s in spans}) == len(spans)  # the two `$p$` cells are told apart
    html = render_source_with_math(text)
    assert html.count('class="src-math"') == 5
    # The source pane shows every character once, in order (offsets for waypoint marking).
    pieces = re.findall(r'data-start="(\d+)" data-end="(\d+)"', html)
    assert [int(a) for a, _ in pieces][0] == 0 and int(pieces[-1][1]) == len(text)
    assert all(int(b) == int(a2) for (_, b), (a2, _) in zip(pieces, pieces[1:], strict=False))


def test_source_pane_offsets_with_crlf_and_multiline_math():
    text = "One $a$\r\n\r\n$$\r\nb\r\n$$\r\n\r\n- item \\(c\r\n  d\\)\r\n"
    spans = find_math_spans(text)
    assert [text[s.start : s.end] for s in spans] == ["$a$", "$$\r\nb\r\n$$", "\\(c\r\n  d\\)"]
    assert [s.display for s in spans] == [False, True, False]


@pytest.mark.django_db
def test_pages_showing_a_problem_with_marker_text_load(client):
    from django.urls import reverse

    from tests.factories import make_problem, make_user
    from tests.training.factories import make_evaluation

    statement = "Find $x$ where DAILMATH0X [l](DAILMATH0X) ![DAILMATH0X](DAILMATH0X)"
    solution = "DAILMATH0X so $x = 1$ and DAILMATH99X [see](DAILMATH1X)"
    author = make_user("admin")  # the only role that sees both curation and evaluations
    problem = make_problem(author=author, statement=statement, solution=solution, answer="1")
    evaluation = make_evaluation(on_problems=[problem], samples=1)
    client.force_login(author)
    pages = [
        client.get(reverse("curation:detail", args=[problem.pk])),
        client.get(reverse("curation:edit", args=[problem.pk])),
        client.post(
            reverse("curation:editor_preview"),
            {"body": solution, "answer": "1", "statement": statement, "waypoints": "[]"},
            HTTP_HX_REQUEST="true",
        ),
        client.get(
            reverse("evaluations:problem", kwargs={"problem_id": problem.pk})
            + f"?ids={evaluation.pk}"
        ),
    ]
    for response in pages:
        assert response.status_code == 200, response.request["PATH_INFO"]
        assert "DAILMATH0X" in response.content.decode()


@pytest.mark.parametrize("text", ["> \\[\n> a+b\n> \\]", "> $$\n> a+b\n> $$"])
def test_display_math_in_a_quote_leaves_the_quote_markers_out(text):
    rendered = render_markdown(text)
    assert "<blockquote>" in rendered.html and not rendered.math_errors
    assert "&gt;" not in rendered.html.split("<annotation")[1].split("</annotation>")[0]
    [span] = find_math_spans(text)
    assert (span.tex, span.display, span.start, span.end) == ("a+b", True, 2, len(text))
