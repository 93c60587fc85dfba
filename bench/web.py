"""`python -m bench web [--quick] [--json FILE]`: server-side timings of the web pages.

Runs against a throw-away SQLite database in a temporary directory (never your data):
- the problem list with 10,000 problems, pages 1 and 100 (p50 over repeated requests, query
  counts beside them; the tests assert that the counts do not grow);
- importing all 270 CHAMP problems (seconds, problems/s);
- the reviewer's trace page for a 2,048-token trace (p50, HTML size; targets 150 ms, 1.5 MB)
  and the review queue over 100,000 traces, pages 1 and 500 (p50; target 200 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.report import print_table, write_json


def setup_django(data_dir: Path) -> None:
    """Django on a throw-away SQLite database under `data_dir` (never your data)."""
    os.environ["DAIL_DATA_DIR"] = str(data_dir)
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    os.environ.pop("DATABASE_URL", None)
    os.environ["ALLOWED_HOSTS"] = "testserver,localhost"
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def _timed_get(client, url: str, repeats: int) -> tuple[float, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    times = []
    queries = 0
    for _ in range(repeats):
        with CaptureQueriesContext(connection) as captured:
            started = time.perf_counter()
            response = client.get(url)
            times.append(time.perf_counter() - started)
        assert response.status_code == 200, (url, response.status_code)
        queries = len(captured)
    return statistics.median(times) * 1000, queries


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench web")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--problems", type=int, default=10_000)
    parser.add_argument("--traces", type=int, default=100_000)
    args = parser.parse_args(argv)
    repeats = 5 if args.quick else 20

    with tempfile.TemporaryDirectory() as tmp:
        setup_django(Path(tmp))
        from django.test import Client

        from curation.models import Dataset, Problem, SolutionVersion
        from curation.services.champ import champ_load
        from tests.factories import make_user

        started = time.perf_counter()
        report = champ_load()
        champ_seconds = time.perf_counter() - started

        dataset = Dataset.objects.create(name="bench", kind="verifiable")
        problems = Problem.objects.bulk_create(
            Problem(
                dataset=dataset,
                external_id=f"b{i:05d}",
                statement=f"Benchmark problem {i}: find $x$.",
                answer=str(i),
                current_version_number=1,
            )
            for i in range(args.problems)
        )
        SolutionVersion.objects.bulk_create(
            SolutionVersion(problem=p, number=1, body="x = 1") for p in problems
        )
        client = Client()
        client.force_login(make_user("expert"))
        rows = []
        for label, url in (
            ("problem list, page 1", f"/problems/?dataset={dataset.pk}"),
            ("problem list, page 100", f"/problems/?dataset={dataset.pk}&page=100"),
            ("problem list, search", "/problems/?q=problem+99&page=2"),
            (
                "problem page (CHAMP)",
                f"/problems/{Problem.objects.filter(dataset__name='CHAMP').first().pk}/",
            ),
        ):
            client.get(url)  # warm caches (templates, KaTeX)
            p50, queries = _timed_get(client, url, repeats)
            rows.append(
                {
                    "page": label,
                    "p50_ms": p50,
                    "queries": queries,
                    "html_kb": len(client.get(url).content) / 1024,
                }
            )
        from tests.factories import bulk_traces, make_run

        long_run = make_run(problems=1, samples=1, tokens=2048)
        trace = long_run.traces.get()
        queue_run = make_run(problems=1, samples=1, tokens=16)
        bulk_traces(queue_run, args.traces)
        client.force_login(make_user("reviewer"))
        for label, url in (
            ("trace page, 2,048 tokens", f"/review/traces/{trace.pk}/"),
            (f"review queue ({args.traces:,} traces), page 1", "/review/"),
            (f"review queue ({args.traces:,} traces), page 500", "/review/?page=500"),
            (
                "review queue, filtered + sorted",
                f"/review/?run={queue_run.pk}&sort=fallback&correct=yes",
            ),
        ):
            client.get(url)
            p50, queries = _timed_get(client, url, repeats)
            size = len(client.get(url).content)
            rows.append({"page": label, "p50_ms": p50, "queries": queries, "html_kb": size / 1024})
        print_table(
            f"Web pages ({args.problems:,} problems + CHAMP; SQLite)",
            rows,
            ["page", "p50_ms", "queries", "html_kb"],
        )
        champ = {
            "problems": report.created,
            "seconds": champ_seconds,
            "problems_per_s": report.created / champ_seconds,
        }
        print_table("Import all of CHAMP", [champ], ["problems", "seconds", "problems_per_s"])
        write_json(args.json, {"benchmark": "web", "pages": rows, "champ_import": champ})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
