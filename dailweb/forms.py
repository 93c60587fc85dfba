"""The one integer parser of the boundary (forms and command lines) and the form field built on it.

Python's `int()` accepts far more than a person means by a whole number: `" 7 "`, `"1_000"`,
`"+7"`, `"٧"` (other scripts' digits) and, through Django's `IntegerField`, `"7.0"`. Every
integer typed into a form or given on a command line goes through `plain_int` instead: ASCII
digits with an optional leading minus, nothing around them (leading zeros are fine).

The field's default range is what the database stores (signed 64 bits), so no typed number
reaches a query or a column it overflows; the settings' own limits come from the engines'
configs (`RolloutConfig`, `SamplingSettings`, `DailTrainingConfig`), never re-declared here.
"""

from __future__ import annotations

import argparse
import re

from django import forms

STORAGE_MIN = -(2**63)
STORAGE_MAX = 2**63 - 1

_PLAIN_INTEGER = re.compile(r"-?[0-9]+")  # re's [0-9] is ASCII only
# Longer numbers are out of every range; int() refuses above ~4,300 digits anyway.
_MAX_DIGITS = 40


class NotPlainInteger(ValueError):
    """The text is not a plain whole number."""


class IntegerTooLong(NotPlainInteger):
    """Plain digits, but far more of them than any range allows."""

    def __init__(self, negative: bool) -> None:
        super().__init__("number too large")
        self.negative = negative


def plain_int(text: str) -> int:
    """`text` as an int if it is plain ASCII digits with an optional leading '-'; else
    `NotPlainInteger` (a ValueError)."""
    if not isinstance(text, str) or not _PLAIN_INTEGER.fullmatch(text):
        raise NotPlainInteger(f"not a whole number: {text!r}")
    if len(text.lstrip("-")) > _MAX_DIGITS:
        raise IntegerTooLong(text.startswith("-"))
    return int(text)


def plain_id(text: str | None) -> int | None:
    """An id from a query string: a plain whole number from 0 to what the database stores,
    else None (so `?run=²` or `?run=99999999999999999999` filters nothing and breaks nothing)."""
    try:
        value = plain_int(text or "")
    except NotPlainInteger:
        return None
    return value if 0 <= value <= STORAGE_MAX else None


def plain_int_argument(text: str) -> int:
    """`plain_int` as an argparse `type=` (a clear message instead of a traceback)."""
    try:
        return plain_int(text)
    except NotPlainInteger:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number (plain digits 0-9)"
        ) from None


class StrictIntegerField(forms.IntegerField):
    """An IntegerField that accepts only `plain_int` text, within [min_value, max_value]
    (default: the signed 64-bit range the database stores)."""

    default_error_messages = {
        "invalid": "Enter a whole number in plain digits 0-9 (no spaces, signs, separators "
        "or decimals).",
    }

    def __init__(self, *, min_value=None, max_value=None, **kwargs) -> None:
        super().__init__(
            min_value=STORAGE_MIN if min_value is None else min_value,
            max_value=STORAGE_MAX if max_value is None else max_value,
            **kwargs,
        )

    def to_python(self, value):
        if value in self.empty_values:
            return None
        if isinstance(value, bool):
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid")
        if isinstance(value, int):  # an initial value or data given in code
            return value
        try:
            return plain_int(str(value))
        except IntegerTooLong as exc:
            limit = self.min_value if exc.negative else self.max_value
            relation = "greater" if exc.negative else "less"
            raise forms.ValidationError(
                f"Ensure this value is {relation} than or equal to {limit}.", code="out_of_range"
            ) from None
        except NotPlainInteger:
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid") from None
