"""The expansion CLI on a tiny model: output records, kept marks, input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from expansion.engine.cli import main, read_problems

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PROBLEMS = [
    {
        "problem_id": "add",
        "problem": "What is $2 + 3$?",
        "solution": "We add: $2 + 3 = \\boxed{5}$.",
        "answer": "5",
        "waypoints": ["2 + 3"],
    },
    # e1-proof style: no answer, no waypoints (the regex suggestion is used).
    {
        "problem_id": "proof-1",
        "problem": "Show that 4 is even.",
        "solution": "4 = 2 * 2 and 2x+1 is odd.",
    },
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(tmp_path: Path, model_dir: Path, *extra: str) -> tuple[int, Path]:
    source = write_jsonl(tmp_path / "in.jsonl", PROBLEMS)
    output = tmp_path / "out" / "traces.jsonl"
    code = main(
        [
            "expand",
            str(source),
            str(output),
            "--model",
            str(model_dir),
            "--device",
            "cpu",
            "--samples",
            "3",
            "--max-new-tokens",
            "12",
            "--quiet",
            "--top-n",
            "2",
            *extra,
        ]
    )
    return code, output


def test_expand_writes_one_record_per_trace(tmp_path: Path, tiny_model_dir: Path):
    code, output = run_cli(tmp_path, tiny_model_dir, "--tau", "0.5", "--seed", "4")
    assert code == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["problem_id"], r["sample_index"]) for r in records] == [
        ("add", 0),
        ("add", 1),
        ("add", 2),
        ("proof-1", 0),
        ("proof-1", 1),
        ("proof-1", 2),
    ]
    for record in records:
        tokens = record["tokens"]
        n = record["n_tokens"]
        assert 1 <= n <= 12 and len(tokens["ids"]) == n
        assert sum(tokens["char_lengths"]) == len(record["text"])
        for name in (
            "sources",
            "draws",
            "learner_logprobs",
            "privileged_logprobs",
            "negative_logprobs",
        ):
            assert len(tokens[name]) == n, name
        assert all(len(alt) == 2 for alt in tokens["negative_top_ids"])
        assert record["shortcut"]["threshold"] == 1.0
    add, proof = records[:3], records[3:]
    assert add[0]["prompt"]["partial_solution"] == (
        "The final answer is 5. Intermediate results used in the solution might include: 2 + 3."
    )
    assert all(r["answer"]["expected"] == "5" for r in add)
    correct = [bool(r["answer"]["correct"]) for r in add]
    # The release's kept rule (the default): the first correct trace of the problem only.
    assert [r["kept"] for r in add] == [
        i == correct.index(True) if True in correct else False for i in range(len(add))
    ]
    assert sum(r["kept"] for r in proof) == 1 and all(r["answer"] is None for r in proof)
    assert proof[0]["prompt"]["waypoints_suggested"]
    assert "2x+1" in proof[0]["prompt"]["partial_solution"]
    run = json.loads((output.parent / "traces.run.json").read_text())
    assert run["rollout_config"]["tau"] == 0.5 and run["rollout_config"]["seed"] == 4
    assert run["templates"]["learner"].startswith("## Problem:")
    assert run["counts"]["traces"] == 6
    assert run["kept_rule"] == "release"
    assert not (output.parent / "traces.jsonl.partial").exists()


def test_reference_engine_gives_the_same_traces(tmp_path: Path, tiny_model_dir: Path):
    ids = {}
    for engine in ("fast", "reference"):
        (tmp_path / engine).mkdir()
        settings = ("--tau", "0.5", "--engine", engine, "--dtype", "float64")
        code, output = run_cli(tmp_path / engine, tiny_model_dir, *settings)
        assert code == 0
        ids[engine] = [
            json.loads(line)["tokens"]["ids"] for line in output.read_text().splitlines()
        ]
    assert ids["fast"] == ids["reference"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "in.jsonl:2: not valid JSON"),
        (json.dumps({"problem": "", "solution": "s"}), "in.jsonl:2: 'problem'"),
        (json.dumps({"problem": "p", "solution": []}), "in.jsonl:2: 'solution'"),
        (
            json.dumps({"problem": "p", "solution": "s", "waypoints": "x"}),
            "in.jsonl:2: 'waypoints'",
        ),
        (json.dumps({"problem_id": "add", "problem": "p", "solution": "s"}), "duplicate"),
    ],
)
def test_bad_lines_are_reported_with_their_number(
    tmp_path: Path, tiny_model_dir: Path, capsys, line, message
):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(PROBLEMS[0]) + "\n" + line + "\n")
    output = tmp_path / "out.jsonl"
    code = main(["expand", str(source), str(output), "--model", str(tiny_model_dir), "--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_invalid_setting_and_missing_model_fail_cleanly(
    tmp_path: Path, tiny_model_dir: Path, capsys
):
    source = write_jsonl(tmp_path / "in.jsonl", PROBLEMS)
    assert (
        main(
            [
                "expand",
                str(source),
                str(tmp_path / "o.jsonl"),
                "--model",
                str(tiny_model_dir),
                "--tau",
                "2",
            ]
        )
        == 2
    )
    assert "tau" in capsys.readouterr().err
    assert (
        main(["expand", str(source), str(tmp_path / "o.jsonl"), "--model", str(tmp_path / "none")])
        == 2
    )
    assert "No model at" in capsys.readouterr().err


def test_a_directory_that_is_not_a_model_fails_cleanly(tmp_path: Path, capsys):
    """No traceback: the model session's loading error is the CLI's message, exit 2."""
    source = write_jsonl(tmp_path / "in.jsonl", PROBLEMS)
    (tmp_path / "empty").mkdir()
    output = tmp_path / "o.jsonl"
    code = main(["expand", str(source), str(output), "--model", str(tmp_path / "empty")])
    assert code == 2
    assert "is not a model directory: no config.json" in capsys.readouterr().err
    assert not output.exists()


def test_e1_field_names_are_read(tmp_path: Path):
    source = write_jsonl(
        tmp_path / "e1.jsonl", [{"problem_id": 17, "problem": "P", "solution": "S \\boxed{2}"}]
    )
    (problem,) = read_problems(source)
    assert (
        problem.problem_id == "17"
        and problem.answer is None
        and problem.solutions == ["S \\boxed{2}"]
    )


def test_module_entry_point_shows_help():
    completed = subprocess.run(
        [sys.executable, "-m", "expansion.engine.cli", "expand", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert completed.returncode == 0
    assert "--tau" in completed.stdout and "--samples" in completed.stdout
