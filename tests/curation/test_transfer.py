"""JSONL import/export, e1 files, Parquet for `datasets`, CHAMP, and every kind of bad input."""

from __future__ import annotations

import json

import pytest

from curation.models import Problem, SolutionVersion
from curation.services.champ import champ_load
from curation.services.transfer import (
    problems_export_jsonl,
    problems_export_parquet,
    problems_import_jsonl,
)
from dailweb.errors import DomainError
from tests.factories import make_dataset

pytestmark = pytest.mark.django_db


def jsonl(*records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


GOOD = {
    "problem_id": "A1",
    "problem": "Compute $1+2$.",
    "solution": "Add: $1+2=3$. So the answer is $3$.",
    "answer": "3",
    "source": "made up",
    "tags": ["arith"],
    "waypoints": ["$1+2=3$"],
}


def test_import_creates_problems_with_waypoints():
    dataset = make_dataset()
    report = problems_import_jsonl(dataset=dataset, data=jsonl(GOOD, {**GOOD, "problem_id": "A2"}))
    assert report.imported and report.created == 2 and not report.errors
    problem = Problem.objects.get(external_id="A1")
    version = problem.versions.get()
    assert [w.text for w in version.waypoints.all()] == ["$1+2=3$"]
    assert problem.tags == ["arith"] and problem.answer == "3"


def test_e1_lines_take_the_answer_from_the_last_box():
    dataset = make_dataset(kind="verifiable")
    e1 = {
        "problem_id": "1985-1",
        "problem": "Find n.",
        "solution": "First \\boxed{2}, but finally $n = \\boxed{\\frac{1}{2}}$.",
    }
    report = problems_import_jsonl(dataset=dataset, data=jsonl(e1))
    assert report.imported
    assert Problem.objects.get(external_id="1985-1").answer == "\\frac{1}{2}"


def test_span_waypoints_are_accepted():
    dataset = make_dataset()
    line = {**GOOD, "waypoints": [[5, 12], {"start": 30, "end": 33}]}
    report = problems_import_jsonl(dataset=dataset, data=jsonl(line))
    assert report.imported
    version = Problem.objects.get().versions.get()
    assert [(w.start, w.end) for w in version.waypoints.all()] == [(5, 12), (30, 33)]


BAD_LINES = [
    (b'{"problem": "x", "solution": ', "not valid JSON"),
    (b'["a list"]', "must be a JSON object"),
    (json.dumps({"solution": "s"}).encode(), "field 'problem': is missing or empty"),
    (json.dumps({"problem": "p", "solution": 5}).encode(), "field 'solution'"),
    (
        json.dumps({**GOOD, "problem_id": "BAD", "tags": "one"}).encode(),
        "field 'tags': must be a list of strings",
    ),
    (
        json.dumps({**GOOD, "problem_id": "BAD", "waypoints": ["not there"]}).encode(),
        "does not occur in the solution",
    ),
    (
        json.dumps({**GOOD, "problem_id": "BAD", "waypoints": [[0, 999]]}).encode(),
        "outside the solution text",
    ),
    (
        json.dumps({**GOOD, "problem_id": "BAD", "waypoints": [[0, 10], [5, 12]]}).encode(),
        "overlap",
    ),
    ('{"problem": "caf\xe9"}'.encode("latin-1"), "not UTF-8"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_a_bad_line_is_reported_with_its_number_and_nothing_imported(line, message):
    dataset = make_dataset()
    data = jsonl(GOOD) + line + b"\n" + jsonl({**GOOD, "problem_id": "A3"})
    report = problems_import_jsonl(dataset=dataset, data=data)
    assert not report.imported
    assert [e.line for e in report.errors] == [2]
    assert message in str(report.errors[0])
    assert str(report.errors[0]).startswith("line 2")
    assert Problem.objects.count() == 0
    assert "Nothing imported" in report.summary()


def test_only_valid_lines_when_asked():
    dataset = make_dataset()
    data = jsonl(GOOD) + b"{broken\n" + jsonl({**GOOD, "problem_id": "A3"})
    report = problems_import_jsonl(dataset=dataset, data=data, only_valid_lines=True)
    assert report.imported and report.created == 2
    assert [e.line for e in report.errors] == [2]
    assert "1 bad lines skipped" in report.summary()


def test_duplicate_ids_in_one_file_are_errors():
    report = problems_import_jsonl(dataset=make_dataset(), data=jsonl(GOOD, GOOD))
    assert not report.imported
    assert "duplicate problem_id 'A1' (first on line 1)" in str(report.errors[0])


def test_file_over_the_limit_is_refused(settings):
    settings.DAIL_UPLOAD_MAX_MB = 1
    with pytest.raises(DomainError, match="upload limit is 1 MB"):
        problems_import_jsonl(dataset=make_dataset(), data=b" " * (2 * 1024 * 1024))
    assert Problem.objects.count() == 0


def test_reimport_updates_never_duplicates():
    dataset = make_dataset()
    problems_import_jsonl(dataset=dataset, data=jsonl(GOOD))
    again = problems_import_jsonl(dataset=dataset, data=jsonl(GOOD))
    assert again.unchanged == 1 and again.created == again.updated == 0
    changed = {**GOOD, "solution": GOOD["solution"] + " Done.", "waypoints": None}
    report = problems_import_jsonl(dataset=dataset, data=jsonl(changed))
    assert report.updated == 1
    problem = Problem.objects.get()
    assert problem.versions.count() == 2
    current = problem.versions.get(number=2)
    assert [w.text for w in current.waypoints.all()] == ["$1+2=3$"]  # carried forward


def test_html_is_stored_as_text():
    payload = {**GOOD, "problem": "<script>alert('x')</script> Solve $x$."}
    problems_import_jsonl(dataset=make_dataset(), data=jsonl(payload))
    assert Problem.objects.get().statement.startswith(
        "<script>"
    )  # kept verbatim, escaped on display


def test_export_then_import_round_trips_exactly():
    source = make_dataset(name="src")
    lines = [
        GOOD,
        {**GOOD, "problem_id": "B", "answer": "", "waypoints": [[0, 4]], "tags": []},
        {
            **GOOD,
            "problem_id": "C",
            "solution": "Line one\n\nLine two $\\frac{1}{2}$",
            "waypoints": [],
        },
    ]
    problems_import_jsonl(dataset=source, data=jsonl(*lines))
    exported = problems_export_jsonl(Problem.objects.filter(dataset=source))
    target = make_dataset(name="dst")
    report = problems_import_jsonl(dataset=target, data=exported)
    assert report.imported and report.created == 3
    again = problems_export_jsonl(Problem.objects.filter(dataset=target))
    strip = lambda data: [  # noqa: E731 - the dataset name differs by construction
        {k: v for k, v in json.loads(line).items() if k != "dataset"} for line in data.splitlines()
    ]
    assert strip(again) == strip(exported)
    assert len(strip(again)) == 3


def test_parquet_export_loads_with_datasets(tmp_path):
    import datasets

    problems_import_jsonl(dataset=make_dataset(), data=jsonl(GOOD, {**GOOD, "problem_id": "Z"}))
    path = problems_export_parquet(Problem.objects.all(), tmp_path / "out.parquet")
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert loaded.num_rows == 2
    row = loaded[0]
    assert row["problem"] == GOOD["problem"]
    assert row["waypoints"][0]["text"] == "$1+2=3$"
    assert row["solution_version"] == 1


def test_champ_loads_270_problems_with_answers_and_waypoints_inside_solutions():
    report = champ_load()
    assert report.created == 270
    problems = Problem.objects.filter(dataset__name="CHAMP")
    assert problems.count() == 270
    assert not problems.filter(answer="").exists()
    versions = SolutionVersion.objects.filter(problem__dataset__name="CHAMP").prefetch_related(
        "waypoints"
    )
    with_waypoints = 0
    for version in versions:
        assert "@@" not in version.body
        for waypoint in version.waypoints.all():
            assert 0 <= waypoint.start < waypoint.end <= len(version.body)
            assert waypoint.origin == "suggested"
        with_waypoints += bool(version.waypoints.all())
    assert with_waypoints > 100  # the hints give most problems suggested waypoints
    example = Problem.objects.get(external_id="P_Combinatorics_6")
    assert example.answer == "2^(n-1)"
    assert "$n$" in example.statement
    again = champ_load()
    assert again.unchanged == 270 and Problem.objects.count() == 270
