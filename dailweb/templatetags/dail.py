"""Template filters of the workbench."""

from __future__ import annotations

from datetime import timedelta

from django import template
from django.utils.safestring import SafeString

from dailweb.labelled_fields import LabelledField, labelled_fields
from dailweb.rendering import render_excerpt

register = template.Library()


@register.filter
def duration(value: timedelta | None) -> str:
    """`timedelta` as '42 s', '3 min 05 s' or '2 h 07 min'; '—' for None."""
    if value is None:
        return "—"
    seconds = max(0, int(value.total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@register.filter
def width_class(percent: float | None) -> str:
    """A progress bar's width as a class (`w-0` … `w-100`, defined in app.css).

    The Content-Security-Policy allows no inline `style` attributes, so a bar's width cannot be
    written into the page as `style="width: …"`.
    """
    try:
        value = round(float(percent or 0))
    except (TypeError, ValueError):
        value = 0
    return f"w-{max(0, min(100, value))}"


@register.filter
def as_fields(values: dict | None) -> list[LabelledField]:
    """A dict (a job's parameters or result) as labelled fields for `_labelled_fields.html`."""
    return labelled_fields(values or {})


@register.filter
def last_lines(value: str | None, count: int = 20) -> str:
    """The last `count` lines of a text (a log's tail)."""
    lines = (value or "").rstrip("\n").split("\n")
    return "\n".join(lines[-max(1, int(count)) :])


@register.filter
def excerpt(value: str | None, limit: int = 140) -> SafeString:
    """The start of a Markdown + LaTeX text on one line, its formulas typeset (list cells)."""
    return render_excerpt(value or "", int(limit))
