"""Settings, parameters and results shown as labelled fields (a definition list with human
labels and units) instead of a raw dict. The one formatter of such values for every page
(`templates/_labelled_fields.html` renders the rows)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LabelledField:
    label: str
    value: str
    help: str = ""


@dataclass(frozen=True)
class FieldLabel:
    """How one key is shown: its label, the unit after its value, what an empty value means."""

    label: str
    unit: str = ""
    empty: str = "none"


def humanize_key(key: str) -> str:
    """`max_new_tokens` -> `Max new tokens` (for keys without a label of their own)."""
    text = key.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def format_value(value: Any, *, unit: str = "", empty: str = "none") -> str:
    """One value as text: yes/no, lists joined, numbers without float noise, a unit after.

    Units are written as English plurals ("tokens", "steps"); a value of exactly 1 takes the
    singular (the unit without its final "s": "1 step")."""
    if value is None or value == "" or (isinstance(value, list | tuple | dict) and not value):
        return empty
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list | tuple):
        text = ", ".join(format_value(item) for item in value)
    elif isinstance(value, dict):
        text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    else:
        text = str(value)
    if unit and value == 1 and not isinstance(value, bool) and unit.endswith("s"):
        unit = unit[:-1]
    return f"{text} {unit}" if unit else text


def labelled_fields(
    values: Mapping[str, Any],
    *,
    labels: Mapping[str, FieldLabel] | None = None,
    helps: Mapping[str, str] | None = None,
) -> list[LabelledField]:
    """Rows for `values`: labelled keys first, in the labels' order, then the others sorted."""
    labels = labels or {}
    helps = helps or {}
    ordered = [key for key in labels if key in values]
    ordered += sorted(key for key in values if key not in labels)
    rows = []
    for key in ordered:
        label = labels.get(key) or FieldLabel(humanize_key(key))
        rows.append(
            LabelledField(
                label=label.label,
                value=format_value(values[key], unit=label.unit, empty=label.empty),
                help=helps.get(key, ""),
            )
        )
    return rows
