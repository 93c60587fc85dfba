"""Export of problems with their current solution version and waypoints: JSONL (the import
format, so an export imports again exactly) and a Parquet file that Hugging Face `datasets`
loads."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from curation.models import Problem
from curation.selectors import problems_with_current_versions


def _export_record(problem: Problem) -> dict[str, Any]:
    version = problem.current_version
    return {
        "problem_id": problem.external_id,
        "problem": problem.statement,
        "solution": version.body,
        "answer": problem.answer,
        "source": problem.source,
        "tags": list(problem.tags),
        "waypoints": [
            {"start": w.start, "end": w.end, "text": w.text_in(version.body), "origin": w.origin}
            for w in version.ordered_waypoints
        ],
        "dataset": problem.dataset.name,
        "solution_version": version.number,
    }


def export_records(problems: Iterable[Problem]) -> list[dict[str, Any]]:
    return [_export_record(p) for p in problems_with_current_versions(problems)]


def problems_export_jsonl(problems: Iterable[Problem]) -> bytes:
    return "".join(
        json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        for record in export_records(problems)
    ).encode("utf-8")


def problems_export_parquet(problems: Iterable[Problem], path: Path) -> Path:
    """Write a Parquet file that `datasets.load_dataset("parquet", data_files=...)` loads."""
    import datasets  # heavy; only exports need it

    records = export_records(problems)
    features = datasets.Features(
        {
            "problem_id": datasets.Value("string"),
            "problem": datasets.Value("string"),
            "solution": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "source": datasets.Value("string"),
            "tags": datasets.Sequence(datasets.Value("string")),
            "waypoints": [
                {
                    "start": datasets.Value("int32"),
                    "end": datasets.Value("int32"),
                    "text": datasets.Value("string"),
                    "origin": datasets.Value("string"),
                }
            ],
            "dataset": datasets.Value("string"),
            "solution_version": datasets.Value("int32"),
        }
    )
    datasets.Dataset.from_list(records, features=features).to_parquet(str(path))
    return path
