"""Hostile text payloads, shared by the raw-HTML suite (tests/hostile/test_payload_pages.py)
and the Chromium suite (tests/browser/test_hostile_payloads.py).

Every payload that could run script does it through `alert(...)` or by setting
`window.__pwned`; the browser suite replaces `alert`/`confirm`/`prompt` by a function that
sets `window.__pwned`, so one sentinel tells whether anything executed. Markup that a payload
would inject into the page carries the marker `dailpwn` (as a class, id, attribute or
style), so an injected element is found even when it runs nothing.

Each payload says:
- `forbidden`: raw fragments that must never appear verbatim in a page's HTML outside its
  `application/json` blocks (they would be markup, not text). Compared case-insensitively.
- `probe`: a fragment that must be visible as text wherever a field is shown verbatim (the
  answer, a name, a note...), so a page that stops showing the field (or shows it
  double-escaped, or rendered as a template) fails too.
"""

from __future__ import annotations

from dataclasses import dataclass

SENTINEL = "__pwned"
MARKER = "dailpwn"


@dataclass(frozen=True)
class Payload:
    name: str
    text: str
    probe: str
    forbidden: tuple[str, ...] = ()

    def fit(self, limit: int, suffix: str = "") -> str:
        """The payload cut to a field's `max_length` (keeping `suffix`, for unique names)."""
        return self.text[: limit - len(suffix)] + suffix

    def __str__(self) -> str:  # pytest ids
        return self.name


PAYLOADS: tuple[Payload, ...] = (
    Payload(
        "script_tag",
        '<script>alert("script_tag")</script> <sCrIpT>window.__pwned="script_case"</ScRiPt>',
        probe='<script>alert("script_tag")</script>',
        forbidden=("<script>alert", "<script>window.__pwned"),
    ),
    Payload(
        "img_onerror",
        '"><img src=x onerror=alert("img_onerror") class=dailpwn>\'><img src=x onerror=alert(2)>',
        probe='"><img src=x onerror=alert("img_onerror")',
        forbidden=("<img src=x",),
    ),
    Payload(
        "svg_onload",
        '<svg onload=alert("svg_onload")></svg><svg/onload=alert(2)>'
        "<math><maction actiontype=statusline xlink:href=javascript:alert(3)>m</maction></math>",
        probe='<svg onload=alert("svg_onload")>',
        forbidden=("<svg onload", "<svg/onload", "<math><maction"),
    ),
    Payload(
        "attribute_breakout",
        "\" autofocus onfocus=\"alert('attr_dq')\" x=\" ' onmouseover='alert(2)' y=' "
        "` onclick=`alert(3)`",
        probe='" autofocus onfocus="alert(\'attr_dq\')"',
    ),
    Payload(
        "markdown_javascript_link",
        '[click](javascript:alert("md_link")) [caps](JaVaScRiPt:alert(2)) '
        "[entity](&#106;avascript:alert(3)) [tab](java\tscript:alert(4)) "
        "<javascript:alert(5)> ![image](javascript:alert(6)) [ref][r] "
        "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==) "
        "[vb](vbscript:msgbox(1))\n\n[r]: javascript:alert(7)",
        probe='[click](javascript:alert("md_link"))',
    ),
    Payload(
        "html_blocks",
        '<iframe src="javascript:alert(1)"></iframe><style>body{display:none}</style>'
        '<object data="javascript:alert(2)"></object><base href="javascript:alert(3)//">'
        '<meta http-equiv="refresh" content="0;url=javascript:alert(4)">'
        "<!-- --><script>alert(5)</script> <![CDATA[<script>alert(6)</script>]]>",
        probe='<iframe src="javascript:alert(1)"></iframe>',
        forbidden=("<iframe", "<style>body", "<object", "<base href", "<meta http-equiv"),
    ),
    Payload(
        "htmx_attributes",
        '<div hx-get="/jobs/" hx-trigger="load" hx-target="body" class="dailpwn">hx</div>'
        '<a hx-on:htmx:load="alert(\'hx_on\')" hx-post="/jobs/launch/worker_check/" '
        'hx-trigger="load">x</a>',
        probe='<div hx-get="/jobs/" hx-trigger="load"',
        forbidden=("<div hx-", "<a hx-"),
    ),
    Payload(
        "template_injection",
        "{{ 7*7 }} {% debug %} {{ request.user.password }} {% csrf_token %} "
        "{% load static %}{% static 'x' %} ${7*7} #{7*7} <%= 7*7 %>",
        probe="{{ 7*7 }} {% debug %} {{ request.user.password }}",
    ),
    Payload(
        "textarea_breakout",
        '</textarea><script>alert("textarea")</script><textarea>'
        '</title></pre></code></noscript><script>window.__pwned="closers"</script>',
        probe='</textarea><script>alert("textarea")</script>',
        forbidden=("<script>alert", "<script>window.__pwned"),
    ),
    Payload(
        "script_breakout",
        '</script><script>alert("script_close")</script>'
        '</SCRIPT ><script>window.__pwned="script_close2"</script><!--<script>',
        probe='</script><script>alert("script_close")</script>',
        forbidden=("<script>alert", "<script>window.__pwned"),
    ),
    Payload(
        "html_entities",
        '&lt;script&gt;alert("entity")&lt;/script&gt; &amp;lt;b&amp;gt; &#60;img src=x '
        "onerror=alert(2)&#62; &#x3C;svg onload=alert(3)&#x3E; &nbsp; & &amp; &#0; &#xD800;",
        probe='&lt;script&gt;alert("entity")&lt;/script&gt;',
        forbidden=('<script>alert("entity")', "<img src=x", "<svg onload"),
    ),
    Payload(
        "long_without_spaces",
        "Ab0_" * 1250
        + "$"
        + "x+" * 200
        + "y$"
        + "["
        + "L" * 600
        + "](http://e.x/"
        + "p" * 600
        + ")",
        probe="Ab0_Ab0_Ab0_Ab0_Ab0_",
    ),
    Payload(
        "bidi_overrides",
        "user\u202eexe.txt\u202c \u202dLTR\u202c \u2066isolate\u2069 \u200fRLM \u061c "
        "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 $\u202ex^2$",
        probe="user\u202eexe.txt\u202c \u202dLTR\u202c",
    ),
    Payload(
        "zero_width",
        "a\u200db\u200cc\u200bd\u2060e\ufefff "
        "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 x\u200d$y$\u200dz",
        probe="a\u200db\u200cc\u200bd\u2060e\ufefff",
    ),
    Payload(
        "control_characters",
        "ctl:\x01\x02\x07\x08\x0b\x0c\x0e\x1b[31mred\x1b[0m\x1f\x7f\x80\x85\x9f"
        "\u2028line\u2029para\rcr end $\x01x$",
        probe="ctl:\x01\x02\x07\x08",
    ),
    Payload(
        "internal_math_markers",
        "DAILMATH0X and DAILMATH1X DAILMATH99X [DAILMATH0X](http://example.com/DAILMATH0X) "
        "![DAILMATH0X](DAILMATH0X.png) `DAILMATH0X` $x$ `$y$` and $z$",
        probe="DAILMATH0X and DAILMATH1X DAILMATH99X",
    ),
    Payload(
        "katex_trust",
        '$\\href{javascript:alert("katex_href")}{click}$ $\\url{javascript:alert(2)}$ '
        "$\\htmlClass{dailpwn}{x}$ $\\htmlId{dailpwn}{y}$ "
        "$\\htmlStyle{color:red;background:url(javascript:alert(3))}{z}$ "
        "$\\htmlData{dailpwn=1}{w}$ $\\includegraphics{javascript:alert(4)}$ "
        "$$\\href{javascript:alert(5)}{display}$$ \\(\\url{javascript:alert(6)}\\)",
        probe='$\\href{javascript:alert("katex_href")}{click}$',
    ),
    Payload(
        "unbalanced_math",
        "costs $5 and $ 10, $$ never closed, \\( not closed, \\[ neither, $a$$b$ $$$ $x",
        probe="costs $5 and $ 10, $$ never closed",
    ),
    Payload(
        "begin_without_end",
        "$\\begin{align} x &= 1$ and $$\\begin{pmatrix} a & b$$ "
        "\\begin{equation} y \\end{align} $\\end{matrix}$ $\\left( x$ $\\frac{1$",
        probe="\\begin{equation} y \\end{align}",
    ),
    Payload(
        "lone_backslashes",
        "a \\ b \\\\ c \\$ d $\\$ e$ f $\\\\$ g \\ \\\\\\ $\\$ end \\",
        probe="a \\ b \\\\ c \\$ d",
    ),
    Payload(
        "emoji_astral",
        "\U0001f600 \U0001d518\U0001d52b\U0001d526 \U0001d7d8\U0001d7d9 "
        "\U0001f3f3\ufe0f\u200d\U0001f308 $\\text{\U0001f600}$ $\U0001d518 + x$ "
        "[\U0001f600](#\U0001f600) \U0010ffff",
        probe="\U0001f600 \U0001d518\U0001d52b\U0001d526",
    ),
)

BY_NAME = {payload.name: payload for payload in PAYLOADS}
