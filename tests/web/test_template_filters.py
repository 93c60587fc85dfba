from datetime import timedelta

import pytest

from dailweb.templatetags.dail import duration


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (42.7, "42 s"), (65, "1 min 05 s"), (3599, "59 min 59 s"), (7620, "2 h 07 min")],
)
def test_duration(seconds, text):
    assert duration(timedelta(seconds=seconds)) == text


def test_duration_of_nothing():
    assert duration(None) == "—"
