"""Natural order of problem ids: `1, 2, …, 10` rather than `1, 10, 11, …, 2`.

`natural_sort_key` is stored with each problem (`Problem.external_id_order`, set when the
problem is created), so every list and selection sorts in the database, page by page. Plain
Python (no Django).
"""

from __future__ import annotations

import re

_DIGITS = re.compile(r"\d+")


def natural_sort_key(text: str) -> str:
    """A string that sorts like `text` read naturally: each run of digits becomes its length
    (two digits) and the digits without leading zeros, so `7` -> `017` sorts before `10` ->
    `0210`; letters compare without case."""

    def number(match: re.Match[str]) -> str:
        digits = match.group(0).lstrip("0") or "0"
        return f"{min(len(digits), 99):02d}{digits}"

    return _DIGITS.sub(number, text.casefold())
