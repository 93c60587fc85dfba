"""Malformed and hostile import files, through the import page and through
`manage.py import_problems`: both must refuse with the same messages and line numbers, exit
non-zero on the command line, and leave the database as it was (datasets included)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, ManagementUtility, call_command
from django.urls import reverse

from curation.models import Dataset, Problem, SolutionVersion, Waypoint
from curation.services.transfer import EMPTY_FILE_MESSAGE, problems_import_jsonl
from tests.factories import make_dataset, make_user

pytestmark = pytest.mark.django_db

NEW_NAME = "hostile-target"
GOOD = {
    "problem_id": "G1",
    "problem": "Compute $1+2$.",
    "solution": "Add: $1+2=3$. So the answer is $3$.",
    "answer": "3",
    "tags": ["arith"],
    "waypoints": ["$1+2=3$"],
}


def line(record: dict | None = None, **fields) -> bytes:
    return json.dumps({**(record or GOOD), **fields}).encode() + b"\n"


def good_then(*lines: bytes) -> bytes:
    """A good first line (it must not be imported either), then the given lines."""
    return line() + b"".join(item if item.endswith(b"\n") else item + b"\n" for item in lines)


S = GOOD["solution"]
DEEP = b'{"problem": ' + b"[" * 50_000 + b"]" * 50_000 + b', "solution": "s"}'

# (case, file, [(line number, text its message must contain), ...]): every bad line, in order.
BAD_FILES = [
    ("not json", good_then(b"{oops"), [(2, "not valid JSON: Expecting property name")]),
    (
        "unterminated string: no 'at at'",
        good_then(b'{"problem": "p", "solution": "never ends'),
        [(2, "not valid JSON: Unterminated string starting at column 30")],
    ),
    ("nested too deeply", good_then(DEEP), [(2, "nested too deeply")]),
    (
        "5,000-digit offset",
        good_then(line(waypoints=[[0, 1]]).replace(b"[0, 1]", b"[0, 1" + b"0" * 5000 + b"]")),
        [(2, "outside the solution")],
    ),
    (
        "5,000-digit answer",
        good_then(line(problem_id="X").replace(b'"answer": "3"', b'"answer": 1' + b"0" * 5000)),
        [(2, "field 'answer': is 5,001 characters long; the limit is 2,000")],
    ),
    (
        "unpaired surrogates",
        good_then(
            b'{"problem": "\\ud800", "solution": "s"}',
            b'{"problem": "p", "solution": "s", "tags": ["\\udfff"]}',
            b'{"problem": "p", "solution": "s", "waypoints": ["\\ud83d"]}',
            b'{"problem": "p", "solution": "ok \\ude00"}',
        ),
        [
            (2, "field 'problem': contains an unpaired surrogate (\\ud800) at character 1"),
            (3, "tag 1 contains an unpaired surrogate (\\udfff)"),
            (4, "waypoint 1 contains an unpaired surrogate (\\ud83d)"),
            (5, "field 'solution': contains an unpaired surrogate (\\ude00) at character 4"),
        ],
    ),
    (
        "NUL character",
        good_then(b'{"problem": "p\\u0000", "solution": "s"}'),
        [(2, "field 'problem': contains a NUL character")],
    ),
    (
        "not UTF-8",
        good_then('{"problem": "café", "solution": "s"}'.encode("latin-1")),
        [(2, "is not UTF-8 text (byte b'\\xe9' at column 17)")],
    ),
    (
        "lines that are not objects",
        good_then(b"[1, 2]", b'"text"', b"5", b"null", b"true"),
        [
            (2, "a line must be a JSON object, not an array"),
            (3, "a line must be a JSON object, not a string"),
            (4, "a line must be a JSON object, not a number"),
            (5, "a line must be a JSON object, not null"),
            (6, "a line must be a JSON object, not true/false"),
        ],
    ),
    (
        "wrong types, field by field",
        good_then(
            line(problem=5),
            line(solution=["s"]),
            line(answer=True),
            line(answer={"value": 3}),
            line(problem_id=1.5),
            line(problem_id=["G9"]),
            line(source=[]),
            line(tags="arith"),
            line(tags=[1]),
            line(waypoints="$1+2=3$"),
            line(waypoints=[True]),
            line(waypoints=[[0]]),
            line(waypoints=[{"start": 0}]),
            line(waypoints=[[0.5, 2]]),
            line(waypoints=[{"start": 0, "end": 3, "origin": "robot"}]),
            line(waypoints=[{"start": 0, "end": 3, "text": 5}]),
        ),
        [
            (2, "field 'problem': must be a string, not a number"),
            (3, "field 'solution': must be a string, not an array"),
            (4, "field 'answer': must be a string or a number, not true/false"),
            (5, "field 'answer': must be a string or a number, not an object"),
            (6, "field 'problem_id': must be a string or a whole number, not a number"),
            (7, "field 'problem_id': must be a string or a whole number, not an array"),
            (8, "field 'source': must be a string or a number, not an array"),
            (9, "field 'tags': must be an array of strings, not a string"),
            (10, "field 'tags': tag 1 must be a string, not a number"),
            (11, "field 'waypoints': must be an array, not a string"),
            (12, "waypoint 1 must be a string, "),
            (13, "waypoint 1 must be a string, "),
            (14, "waypoint 1: an object needs 'start' and 'end'"),
            (15, "waypoint 1: start and end must be whole numbers"),
            (16, "waypoint 1: origin must be 'expert' or 'suggested', not 'robot'"),
            (17, "waypoint 1: text must be a string, not a number"),
        ],
    ),
    (
        "missing, null and empty",
        good_then(
            json.dumps({"solution": "s"}).encode(),
            json.dumps({"problem": None, "solution": "s"}).encode(),
            json.dumps({"problem": "  ", "solution": "s"}).encode(),
            json.dumps({"problem": "p"}).encode(),
        ),
        [
            (2, "field 'problem': is missing"),
            (3, "field 'problem': is null, not a string"),
            (4, "field 'problem': is empty"),
            (5, "field 'solution': is missing"),
        ],
    ),
    (
        "too long for its column",
        good_then(
            line(problem_id="x" * 201),
            line(problem_id="L2", source="s" * 501),
            line(problem_id="L3", answer="a" * 2001),
            line(problem_id="L4", problem="p" * 50_001),
            line(problem_id="L5", solution="s" * 200_001, waypoints=None),
            line(problem_id="L6", tags=["t" * 101]),
            line(problem_id="L7", tags=[f"t{i}" for i in range(51)]),
            line(problem_id="L\n8"),
        ),
        [
            (2, "field 'problem_id': is 201 characters long; the limit is 200"),
            (3, "field 'source': is 501 characters long; the limit is 500"),
            (4, "field 'answer': is 2,001 characters long; the limit is 2,000"),
            (5, "field 'problem': is 50,001 characters long; the limit is 50,000"),
            (6, "field 'solution': is 200,001 characters long; the limit is 200,000"),
            (7, "tag 1 is longer than 100 characters"),
            (8, "has 51 tags; the limit is 50"),
            (9, "must not contain line breaks or control characters"),
        ],
    ),
    (
        "waypoints that do not fit the solution",
        good_then(
            line(waypoints=[[0, len(S) + 1]]),
            line(waypoints=[[-1, 3]]),
            line(waypoints=[[3, 3]]),
            line(waypoints=[[0, 10], [5, 12]]),
            line(waypoints=["not in it"]),
            line(waypoints=[[4, 5]]),
            line(waypoints=[{"start": 0, "end": 3, "text": "Sub"}]),
        ),
        [
            (2, f"waypoint 1 [0, {len(S) + 1}] is outside the solution (0–{len(S)}) or empty"),
            (3, "waypoint 1 [-1, 3] is outside the solution"),
            (4, "waypoint 1 [3, 3] is outside the solution"),
            (5, "overlap"),
            (6, "waypoint 1 'not in it' does not occur in the solution"),
            (7, "is only white space"),
            (8, "waypoint 1: the span [0, 3] holds 'Add', not 'Sub'"),
        ],
    ),
    (
        "duplicates and non-JSON numbers",
        good_then(
            b'{"problem": "p", "problem": "q", "solution": "s"}',
            line(),
            line(problem_id="N").replace(b'"answer": "3"', b'"answer": NaN'),
        ),
        [
            (2, "the key 'problem' appears twice in one object"),
            (3, "field 'problem_id': duplicate problem_id 'G1' (first on line 1)"),
            (4, "not valid JSON: NaN is not a JSON number"),
        ],
    ),
]


@dataclass
class Outcome:
    refused: bool
    errors: list[str]  # one per bad line, as printed
    message: str  # the summary, or the refusal of the whole file


def database_state() -> tuple:
    return (
        sorted(Dataset.objects.values_list("name", flat=True)),
        sorted(Problem.objects.values_list("external_id", "statement", "answer", "author_id")),
        SolutionVersion.objects.count(),
        sorted(Waypoint.objects.values_list("version_id", "start", "end")),
    )


def via_web(client, user, data: bytes, dataset: Dataset | None = None) -> Outcome:
    client.force_login(user)
    form = {"dataset": dataset.pk} if dataset else {"new_dataset_name": NEW_NAME}
    response = client.post(
        reverse("curation:import"), {"file": SimpleUploadedFile("f.jsonl", data), **form}
    )
    assert response.status_code == 400, response.status_code
    report = response.context["report"]
    html = response.content.decode()
    if report is None:
        refusal = " ".join(response.context["form"].non_field_errors())
        assert refusal
        return Outcome(True, [], refusal)
    assert "Nothing imported" in html
    for error in report.errors:
        assert f"<td>{error.line}</td>" in html
    return Outcome(not report.imported, [str(e) for e in report.errors], report.summary())


def via_cli(tmp_path, user, data: bytes, dataset: str = NEW_NAME) -> Outcome:
    path = tmp_path / "f.jsonl"
    path.write_bytes(data)
    stderr, stdout = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError) as refused:
        call_command(
            "import_problems",
            str(path),
            "--dataset",
            dataset,
            "--as",
            user.username,
            stderr=stderr,
            stdout=stdout,
        )
    assert refused.value.returncode == 1  # the exit status on the command line
    assert stdout.getvalue() == ""
    errors = [text.removeprefix(f"{path}: ") for text in stderr.getvalue().splitlines()]
    return Outcome(True, errors, str(refused.value))


@pytest.fixture
def expert():
    return make_user("expert", username="mallory")


@pytest.mark.parametrize(("case", "data", "expected"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_lines_same_report_on_web_and_cli(case, data, expected, client, expert, tmp_path):
    before = database_state()
    web = via_web(client, expert, data)
    assert database_state() == before
    cli = via_cli(tmp_path, expert, data)
    assert database_state() == before
    assert web == cli
    assert len(web.errors) == len(expected), web.errors
    for printed, (number, text) in zip(web.errors, expected, strict=True):
        assert printed.startswith(f"line {number}:") or printed.startswith(f"line {number},")
        assert text in printed, printed
        assert "at at" not in printed
    total = data.rstrip(b"\n").count(b"\n") + 1
    assert web.message == f"Nothing imported: {len(expected)} of {total} lines have errors."
    assert not Dataset.objects.filter(name=NEW_NAME).exists()


FILE_REFUSALS = [
    ("empty", b"", EMPTY_FILE_MESSAGE),
    ("blank lines", b"\n  \r\n\n", EMPTY_FILE_MESSAGE),
    ("only a byte order mark", b"\xef\xbb\xbf", EMPTY_FILE_MESSAGE),
    ("over the upload limit", b" " * (1024 * 1024 + 1), "the upload limit is 1 MB"),
]


@pytest.mark.parametrize(
    ("case", "data", "message"), FILE_REFUSALS, ids=[c[0] for c in FILE_REFUSALS]
)
def test_whole_file_refusals_same_on_web_and_cli(
    case, data, message, client, expert, tmp_path, settings
):
    settings.DAIL_UPLOAD_MAX_MB = 1
    before = database_state()
    web = via_web(client, expert, data)
    cli = via_cli(tmp_path, expert, data)
    assert web == cli
    assert message in web.message and web.errors == []
    assert database_state() == before


def test_changing_someone_elses_problems_same_on_web_and_cli(client, expert, tmp_path):
    owner = make_user("expert", username="olga")
    shared = make_dataset(name="shared")
    problems_import_jsonl(dataset=shared, data=line() + line(problem_id="G2"), author=owner)
    problems_import_jsonl(dataset=shared, data=line(problem_id="SYS"))  # the system's
    data = (
        line(problem_id="NEW")
        + line(answer="4")
        + line(problem_id="G2")  # identical: unchanged, allowed
        + line(problem_id="SYS", tags=["mine now"])
        + b"{oops\n"
    )
    before = database_state()
    web = via_web(client, expert, data, dataset=shared)
    cli = via_cli(tmp_path, expert, data, dataset="shared")
    assert web == cli
    assert web.errors == [
        "line 2, field 'problem_id': problem 'G1' belongs to olga; only its author or an admin "
        "may change it, and this line changes its answer",
        "line 4, field 'problem_id': problem 'SYS' has no author (the system loaded it); only "
        "its author or an admin may change it, and this line changes its tags",
        "line 5: not valid JSON: Expecting property name enclosed in double quotes at column 2",
    ]
    assert database_state() == before


def test_reviewers_cannot_import_on_the_command_line(tmp_path):
    outcome = via_cli(tmp_path, make_user("reviewer", username="rita"), line())
    assert (
        outcome.message == "rita may not import problems: importing needs the expert or admin role."
    )
    assert not Dataset.objects.exists()


@pytest.mark.django_db(transaction=True)  # the command closes its database connections
def test_the_command_exits_with_status_1_and_says_why(tmp_path, expert, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    utility = ManagementUtility(
        ["manage.py", "import_problems", str(path), "--dataset", NEW_NAME, "--as", "mallory"]
    )
    with pytest.raises(SystemExit) as exited:
        utility.execute()
    assert exited.value.code == 1
    assert EMPTY_FILE_MESSAGE in capsys.readouterr().err
    assert not Dataset.objects.exists()


CARELESS_BUT_FINE = (
    b"\xef\xbb\xbf"  # a byte order mark
    + json.dumps({**GOOD, "solution": "Add:\r\n$1+2=3$.", "waypoints": [[6, 13]]}).encode()
    + b"\r\n\r\n"  # CRLF line breaks and a blank line
    + b'{"problem_id": 2, "problem": "p", "solution": "s", "answer": 0}\r\n'
)


def test_careless_files_import_the_same_on_web_and_cli(client, expert, tmp_path):
    client.force_login(expert)
    response = client.post(
        reverse("curation:import"),
        {"file": SimpleUploadedFile("f.jsonl", CARELESS_BUT_FINE), "new_dataset_name": "web"},
    )
    assert response.status_code == 200, response.context["report"].errors
    web_summary = response.context["report"].summary()
    path = tmp_path / "f.jsonl"
    path.write_bytes(CARELESS_BUT_FINE)
    stdout = io.StringIO()
    call_command("import_problems", str(path), "--dataset", "cli", "--as", "mallory", stdout=stdout)
    assert (
        stdout.getvalue().strip()
        == web_summary
        == ("Imported 2 problems: 2 new, 0 updated, 0 unchanged.")
    )
    for name in ("web", "cli"):
        first = Problem.objects.get(dataset__name=name, external_id="G1")
        second = Problem.objects.get(dataset__name=name, external_id="2")
        version = first.versions.get()
        assert version.body == "Add:\n$1+2=3$."
        assert [w.text for w in version.waypoints.all()] == ["$1+2=3$"]
        assert second.answer == "0"
        assert first.author == expert


PAYLOAD = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'


def test_payloads_quoted_in_reports_are_escaped_on_the_import_and_job_pages(client, expert):
    from curation.services.transfer import ImportReport, LineError
    from tests.factories import make_job

    client.force_login(expert)
    data = line(waypoints=[PAYLOAD]) + line(problem_id=PAYLOAD, tags=[PAYLOAD], source=1)
    response = client.post(
        reverse("curation:import"),
        {"file": SimpleUploadedFile("f.jsonl", data), "new_dataset_name": PAYLOAD},
    )
    html = response.content.decode()
    assert response.status_code == 400 and "<script>window.__xss" not in html
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html  # the waypoint's message
    report = ImportReport(
        total_lines=1,
        errors=[LineError(1, PAYLOAD, PAYLOAD)],
        dropped_waypoints={PAYLOAD: [PAYLOAD]},
    )
    job = make_job(
        kind="problem_import",
        state="succeeded",
        launched_by=expert,
        title=PAYLOAD,
        result={**report.to_dict(), "imported": True},
    )
    page = client.get(reverse("curation:import_job", args=[job.pk])).content.decode()
    assert "<script>window.__xss" not in page and 'onerror="window' not in page
    assert page.count("&lt;script&gt;window.__xss=1&lt;/script&gt;") >= 4


def test_without_as_the_command_imports_as_the_system(tmp_path):
    owner = make_user("expert", username="olga")
    shared = make_dataset(name="shared")
    problems_import_jsonl(dataset=shared, data=line(), author=owner)
    path = tmp_path / "f.jsonl"
    path.write_bytes(line(answer="4") + line(problem_id="NEW"))
    stdout = io.StringIO()
    call_command("import_problems", str(path), "--dataset", "shared", stdout=stdout)
    assert stdout.getvalue().strip() == "Imported 2 problems: 1 new, 1 updated, 0 unchanged."
    assert Problem.objects.get(external_id="G1").answer == "4"  # every right
    assert Problem.objects.get(external_id="NEW").author is None  # no author
