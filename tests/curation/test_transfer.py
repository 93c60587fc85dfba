"""JSONL import/export, e1 files, Parquet for `datasets`, CHAMP, and every kind of bad input."""

from __future__ import annotations

import json

import pytest

from curation.models import Dataset, Problem, SolutionVersion
from curation.services.champ import champ_load
from curation.services.transfer import (
    EMPTY_FILE_MESSAGE,
    NewDataset,
    parse_jsonl,
    problem_upsert,
    problems_export_jsonl,
    problems_export_parquet,
    problems_import_jsonl,
)
from curation.services.transfer.import_write import ImportReport, import_check, write_in_batches
from dailweb.errors import DomainError
from tests.factories import make_dataset, make_user

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
    (json.dumps({"solution": "s"}).encode(), "field 'problem': is missing"),
    (json.dumps({"problem": "p", "solution": 5}).encode(), "field 'solution'"),
    (
        json.dumps({**GOOD, "problem_id": "BAD", "tags": "one"}).encode(),
        "field 'tags': must be an array of strings, not a string",
    ),
    (
        json.dumps({**GOOD, "problem_id": "BAD", "waypoints": ["not there"]}).encode(),
        "does not occur in the solution",
    ),
    (
        json.dumps({**GOOD, "problem_id": "BAD", "waypoints": [[0, 999]]}).encode(),
        "outside the solution",
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


# --- Rights: an import may change only what its importer may edit (issue 12, defect 1) ------


@pytest.fixture
def owner():
    return make_user("expert", username="olga")


@pytest.fixture
def intruder():
    return make_user("expert", username="ivan")


def test_an_expert_cannot_change_another_experts_problem_by_import(owner, intruder):
    dataset = make_dataset()
    problems_import_jsonl(dataset=dataset, data=jsonl(GOOD), author=owner)
    hijack = {**GOOD, "solution": "Hijacked: $1+2=3$ twice.", "answer": "4"}
    report = problems_import_jsonl(
        dataset=dataset, data=jsonl({**GOOD, "problem_id": "NEW"}, hijack), author=intruder
    )
    assert not report.imported
    assert [str(e) for e in report.errors] == [
        "line 2, field 'problem_id': problem 'A1' belongs to olga; only its author or an admin "
        "may change it, and this line changes its solution, answer, waypoints"
    ]
    problem = Problem.objects.get(external_id="A1")
    assert problem.answer == "3" and problem.versions.count() == 1
    assert not Problem.objects.filter(external_id="NEW").exists()  # all or nothing


def test_an_identical_line_for_someone_elses_problem_is_unchanged(owner, intruder):
    dataset = make_dataset()
    problems_import_jsonl(dataset=dataset, data=jsonl(GOOD), author=owner)
    report = problems_import_jsonl(
        dataset=dataset, data=jsonl(GOOD, {**GOOD, "problem_id": "B"}), author=intruder
    )
    assert report.imported and (report.unchanged, report.created) == (1, 1)
    assert Problem.objects.get(external_id="A1").author == owner


def test_experts_change_their_own_and_admins_everyones(owner):
    dataset = make_dataset()
    problems_import_jsonl(dataset=dataset, data=jsonl(GOOD), author=owner)
    mine = problems_import_jsonl(
        dataset=dataset, data=jsonl({**GOOD, "tags": ["mine"]}), author=owner
    )
    assert mine.imported and mine.updated == 1
    admin = make_user("admin")
    theirs = problems_import_jsonl(
        dataset=dataset, data=jsonl({**GOOD, "answer": "three", "waypoints": None}), author=admin
    )
    assert theirs.imported and theirs.updated == 1
    assert Problem.objects.get(external_id="A1").answer == "three"


def test_problems_loaded_by_the_system_are_for_admins_only(intruder):
    dataset = make_dataset(name="CHAMP-like")
    problems_import_jsonl(dataset=dataset, data=jsonl(GOOD))  # the system: no author
    report = problems_import_jsonl(
        dataset=dataset, data=jsonl({**GOOD, "problem": "Changed."}), author=intruder
    )
    assert not report.imported
    assert "has no author (the system loaded it)" in report.errors[0].message
    assert "changes its statement" in report.errors[0].message
    assert Problem.objects.get().statement == GOOD["problem"]


def test_only_valid_lines_skips_the_lines_the_importer_may_not_edit(owner, intruder):
    dataset = make_dataset()
    problems_import_jsonl(dataset=dataset, data=jsonl(GOOD), author=owner)
    report = problems_import_jsonl(
        dataset=dataset,
        data=jsonl({**GOOD, "answer": "5"}, {**GOOD, "problem_id": "C"}),
        author=intruder,
        only_valid_lines=True,
    )
    assert report.imported and report.created == 1 and [e.line for e in report.errors] == [1]
    assert Problem.objects.get(external_id="A1").answer == "3"


def test_reviewers_may_not_import():
    with pytest.raises(DomainError, match="needs the expert or admin role"):
        problems_import_jsonl(
            dataset=make_dataset(), data=jsonl(GOOD), author=make_user("reviewer")
        )
    assert Problem.objects.count() == 0


def test_rights_are_checked_again_when_writing(owner, intruder):
    # A problem that appears between the check and the write (someone else imported it).
    dataset = make_dataset()
    parsed = parse_jsonl(jsonl({**GOOD, "answer": "9"}), dataset_kind="verifiable")
    problems_import_jsonl(dataset=dataset, data=jsonl(GOOD), author=owner)
    with pytest.raises(DomainError, match="belongs to olga"):
        problem_upsert(dataset, parsed.problems[0], intruder, ImportReport(), enforce_rights=True)
    assert Problem.objects.get().answer == "3"


# --- Careless and hostile files (issue 12, defect 3) ------------------------------------


def test_every_bad_line_is_reported_database_stage_included(owner, intruder):
    dataset = make_dataset()
    problems_import_jsonl(
        dataset=dataset, data=jsonl(GOOD, {**GOOD, "problem_id": "A2"}), author=owner
    )
    data = (
        jsonl({**GOOD, "problem_id": "NEW"}, {**GOOD, "answer": "7"})
        + b"{oops\n"
        + jsonl({**GOOD, "problem_id": "A2", "tags": ["stolen"]})
    )
    report = problems_import_jsonl(dataset=dataset, data=data, author=intruder)
    assert not report.imported
    assert [(e.line, e.field) for e in report.errors] == [
        (2, "problem_id"),
        (3, ""),
        (4, "problem_id"),
    ]
    assert "changes its tags" in report.errors[2].message
    assert report.summary() == "Nothing imported: 3 of 4 lines have errors."
    assert Problem.objects.count() == 2


def test_a_refused_import_into_a_new_dataset_creates_no_dataset():
    bad = jsonl(GOOD) + b"{oops\n"
    report = problems_import_jsonl(new_dataset=NewDataset("fresh", "proof"), data=bad)
    assert not report.imported and not Dataset.objects.filter(name="fresh").exists()
    again = problems_import_jsonl(new_dataset=NewDataset("fresh", "proof"), data=jsonl(GOOD))
    assert again.imported and Dataset.objects.get(name="fresh").problems.count() == 1


def test_a_taken_name_is_refused_before_the_file_is_read():
    make_dataset(name="taken")
    with pytest.raises(DomainError, match="exists already"):
        problems_import_jsonl(new_dataset=NewDataset("taken", "proof"), data=b"{oops\n")


def test_crlf_solutions_keep_their_waypoints_on_the_same_text():
    solution = "Step one.\r\nThen $x=2$.\r\n\r\nSo $y=4$."
    y, x = solution.index("$y=4$"), solution.index("$x=2$")
    line = {
        **GOOD,
        "solution": solution,
        "waypoints": [[y, y + 5], {"start": x, "end": x + 5, "text": "$x=2$"}, "So"],
    }
    data = jsonl(line).replace(b"\n", b"\r\n")  # and the file's own line breaks are CRLF
    report = problems_import_jsonl(dataset=make_dataset(), data=data)
    assert report.imported, report.errors
    version = Problem.objects.get().versions.get()
    assert version.body == "Step one.\nThen $x=2$.\n\nSo $y=4$."
    assert [w.text for w in version.waypoints.order_by("order")] == ["$y=4$", "$x=2$", "So"]


def test_numbers_are_stored_as_their_text():
    data = (
        b'{"problem_id": 7, "problem": "p", "solution": "s \\\\boxed{9}", "answer": 0, '
        b'"source": 1999}\n'
        b'{"problem_id": 8, "problem": "p", "solution": "s", "answer": 1.50}\n'
    )
    report = problems_import_jsonl(dataset=make_dataset(), data=data)
    assert report.imported, report.errors
    seven, eight = Problem.objects.order_by("external_id")
    assert (seven.external_id, seven.answer, seven.source) == ("7", "0", "1999")
    assert eight.answer == "1.50"


def test_a_utf8_byte_order_mark_is_accepted():
    report = problems_import_jsonl(dataset=make_dataset(), data=b"\xef\xbb\xbf" + jsonl(GOOD))
    assert report.imported and report.created == 1


@pytest.mark.parametrize("data", [b"", b"\n\n", b"\xef\xbb\xbf", b"  \r\n \n"])
def test_an_empty_file_is_refused(data):
    with pytest.raises(DomainError) as refused:
        problems_import_jsonl(new_dataset=NewDataset("empty", "proof"), data=data)
    assert refused.value.message == EMPTY_FILE_MESSAGE
    assert not Dataset.objects.filter(name="empty").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            b'{"problem": "p", "solution": "unterminated',
            "not valid JSON: Unterminated string starting at column 30",
        ),
        (b'{"problem": 5, "solution": "s"}', "field 'problem': must be a string, not a number"),
        (b'{"problem": "p", "solution": ""}', "field 'solution': is empty"),
        (
            b'{"problem": "p", "solution": "s", "answer": true}',
            "must be a string or a number, not true/false",
        ),
        (b'{"problem": "' + b"x" * 50_001 + b'", "solution": "s"}', "the limit is 50,000"),
        (b'{"problem": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (
            b'{"problem": "p", "solution": "s", "waypoints": [[0, 1' + b"0" * 5000 + b"]]}",
            "outside the solution",
        ),
        (
            b'{"problem": "p", "solution": "s", "answer": 1' + b"0" * 5000 + b"}",
            "the limit is 2,000",
        ),
        (b'{"problem": "\\ud800", "solution": "s"}', "unpaired surrogate (\\ud800) at character 1"),
        (b'{"problem": "p", "solution": "a\\u0000b"}', "NUL character"),
        (b'{"problem": "p", "problem": "q", "solution": "s"}', "the key 'problem' appears twice"),
        (b'{"problem": "p", "solution": "s", "answer": NaN}', "NaN is not a JSON number"),
    ],
)
def test_hostile_lines_get_one_clear_message(line, message):
    report = problems_import_jsonl(dataset=make_dataset(kind="proof"), data=line + b"\n")
    assert not report.imported
    assert len(report.errors) == 1 and report.errors[0].line == 1
    assert message in str(report.errors[0])
    assert "at at" not in str(report.errors[0])
    assert Problem.objects.count() == 0


def test_a_line_with_several_problems_gets_one_entry_naming_each():
    line = b'{"problem": 1, "solution": [], "tags": "x"}\n'
    report = problems_import_jsonl(dataset=make_dataset(), data=line)
    assert len(report.errors) == 1
    assert str(report.errors[0]) == (
        "line 1: field 'problem': must be a string, not a number; field 'solution': must be a "
        "string, not an array; field 'tags': must be an array of strings, not a string"
    )


# --- Batched writes (issue 12, defect 4): cancel between batches, resume without duplicates --


def test_batches_stop_when_asked_and_resume_after_the_committed_line(settings):
    settings.DAIL_IMPORT_BATCH_LINES = 2
    dataset = make_dataset()
    lines = [
        {**GOOD, "problem_id": f"B{i}"} if i % 2 else {**GOOD, "problem_id": ""} for i in range(7)
    ]
    parsed = parse_jsonl(jsonl(*lines), dataset_kind=dataset.kind)
    report, items = import_check(parsed, dataset=dataset, author=None)
    committed: list[int] = []
    write_in_batches(
        items=items,
        dataset=dataset,
        author=None,
        only_valid_lines=False,
        report=report,
        on_batch_committed=lambda done, total: committed.append(done),
        should_stop=lambda: len(committed) == 2,
    )
    assert report.cancelled and not report.imported
    assert committed == [2, 4] and Problem.objects.count() == 4
    rest = [item for item in items if item.line > committed[-1]]
    again = ImportReport(total_lines=parsed.total_lines)
    write_in_batches(
        items=rest,
        dataset=dataset,
        author=None,
        only_valid_lines=False,
        report=again,
        on_batch_committed=lambda done, total: committed.append(done),
    )
    assert again.imported and again.created == 3 and committed[-1] == 7
    assert Problem.objects.count() == 7  # lines without an id were not written twice
