"""Template filters of the evaluation pages."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()


@register.filter
def percent(value: float | None, digits: int = 1) -> str:
    """0.1234 -> '12.3 %'; '—' for None."""
    if value is None:
        return "—"
    return f"{100 * float(value):.{int(digits)}f} %"


@register.filter
def interval(estimate: Any) -> str:
    """An Estimate as '12.3 % [4.0, 20.1]'; '—' when there is none."""
    if estimate is None:
        return "—"
    return f"{100 * estimate.value:.1f} % [{100 * estimate.low:.1f}, {100 * estimate.high:.1f}]"


@register.filter
def lookup(mapping: Any, key: Any) -> Any:
    """mapping[key] for dicts and lists (None when missing)."""
    try:
        return mapping[key]
    except (KeyError, IndexError, TypeError):
        return None
