"""Reading a page's HTML the way an attacker hopes the browser will: where could user text
have become markup?

`scan_html(html, payloads)` returns findings (strings; empty when the page is clean):
- every `<script>` is either an external script from /static/ (no inline code) or an
  `application/json` data block whose content has no `<` (so no `</script` can close it
  early: json_script writes `\\u003C`) and parses as JSON;
- no event-handler attribute (`on…`), no `srcdoc`, no attribute name that is not a plain
  name (markup spliced into a tag), no `javascript:` / `vbscript:` / `data:` URL in a URL
  attribute, no `dailpwn` marker in an id, class, name or style, no style with `url(` or
  `expression(`, no data attribute named by a payload;
- no iframe, object, embed, frame, base, applet, `<style>` element or `<meta http-equiv>`;
- none of the payloads' forbidden raw fragments outside the JSON blocks.

`visible_text(html)` is the page's text as a reader sees it (entities decoded, scripts
left out), for checking that a field is shown as text.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

from tests.hostile.payloads import MARKER

_SCRIPT = re.compile(r"<script\b([^>]*)>(.*?)</script\s*>", re.IGNORECASE | re.DOTALL)
_ATTRIBUTE_NAME = re.compile(r"^[a-z_:][-a-z0-9_:.]*$")
URL_ATTRIBUTES = {
    "href", "src", "action", "formaction", "xlink:href", "poster", "data", "background",
    "cite", "manifest", "codebase", "dynsrc", "lowsrc", "ping",
}  # fmt: skip
FORBIDDEN_TAGS = {"iframe", "object", "embed", "frame", "frameset", "base", "applet", "style"}
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff]")


def _attributes(fragment: str) -> dict[str, str]:
    parser = _TagAttributes()
    parser.feed(f"<x {fragment}>")
    return parser.attributes


class _TagAttributes(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.attributes: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        self.attributes = {name: value or "" for name, value in attrs}


def _dangerous_url(value: str) -> bool:
    compact = _CONTROL_OR_SPACE.sub("", value).lower()
    return compact.startswith(("javascript:", "vbscript:", "data:"))


class _Scanner(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.findings: list[str] = []
        self.text: list[str] = []
        self._skip = 0  # inside script/style

    def handle_starttag(self, tag, attrs):
        self._check(tag, attrs)
        if tag in ("script", "style"):
            self._skip += 1

    def handle_startendtag(self, tag, attrs):
        self._check(tag, attrs)

    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)

    def _check(self, tag, attrs):
        found = self.findings
        if tag in FORBIDDEN_TAGS:
            found.append(f"<{tag}> element")
        for name, value in attrs:
            value = value or ""
            where = f"<{tag} {name}={value[:80]!r}>"
            if not _ATTRIBUTE_NAME.match(name):
                found.append(f"malformed attribute name (markup inside a tag): {where}")
            elif name.startswith("on"):
                found.append(f"event handler attribute: {where}")
            elif name in ("srcdoc",) or (tag == "meta" and name == "http-equiv"):
                found.append(f"dangerous attribute: {where}")
            elif name in URL_ATTRIBUTES and _dangerous_url(value):
                found.append(f"script URL: {where}")
            elif name in ("id", "class", "name", "for") and MARKER in value:
                found.append(f"payload marker in {name}: {where}")
            elif name == "style" and re.search(
                rf"{MARKER}|url\s*\(|expression\s*\(|javascript", value, re.IGNORECASE
            ):
                found.append(f"payload style: {where}")
            elif name.startswith("data-") and MARKER in name:
                found.append(f"payload data attribute: {where}")


def json_blocks(html: str) -> list[tuple[dict[str, str], str]]:
    """(attributes, content) of every `<script type="application/json">` block."""
    return [
        (_attributes(match.group(1)), match.group(2))
        for match in _SCRIPT.finditer(html)
        if _attributes(match.group(1)).get("type", "").lower() == "application/json"
    ]


def scan_html(html: str, payloads=()) -> list[str]:
    findings: list[str] = []
    opened = len(re.findall(r"<script\b", html, re.IGNORECASE))
    closed = len(re.findall(r"</script\s*>", html, re.IGNORECASE))
    if opened != closed:
        findings.append(f"{opened} <script> tags but {closed} </script>: a script was broken")
    outside = []
    cursor = 0
    for match in _SCRIPT.finditer(html):
        outside.append(html[cursor : match.start()])
        cursor = match.end()
        attributes, content = _attributes(match.group(1)), match.group(2)
        kind = attributes.get("type", "").lower()
        if kind == "application/json":
            if "<" in content:
                findings.append(
                    f"JSON block #{attributes.get('id', '?')} contains '<' "
                    f"(could close the script): {content[content.index('<') :][:80]!r}"
                )
            try:
                json.loads(content)
            except ValueError as exc:
                findings.append(f"JSON block #{attributes.get('id', '?')} is not JSON: {exc}")
        elif content.strip():
            findings.append(f"inline script: {content.strip()[:100]!r}")
        elif not attributes.get("src", "").startswith("/static/"):
            findings.append(f"script from outside /static/: {attributes.get('src')!r}")
    outside.append(html[cursor:])
    rest = "".join(outside)
    lowered = rest.lower()
    for payload in payloads:
        for fragment in payload.forbidden:
            if fragment.lower() in lowered:
                at = lowered.index(fragment.lower())
                findings.append(
                    f"raw {fragment!r} of payload {payload.name}: {rest[max(0, at - 60) : at + 80]!r}"
                )
    scanner = _Scanner()
    scanner.feed(rest)
    scanner.close()
    findings.extend(scanner.findings)
    return findings


def visible_text(html: str) -> str:
    scanner = _Scanner()
    scanner.feed(_SCRIPT.sub("", html))
    scanner.close()
    return "".join(scanner.text)
