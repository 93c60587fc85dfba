"""Import and export of problems: JSONL (our schema, which also accepts the paper's e1 field
names), the CHAMP package (`curation.services.champ`), and a Parquet file that Hugging Face
`datasets` loads.

Schema of one JSONL line (export writes all fields; import needs `problem` and `solution`):

    {"problem_id": "P_1", "problem": "...", "solution": "...", "answer": "239",
     "source": "AIME 1999 #5", "tags": ["algebra"],
     "waypoints": ["x=239", {"start": 10, "end": 15}, [20, 24]],
     "dataset": "aime", "solution_version": 2}

- `waypoints`: strings (found in the solution, first occurrence not taken by an earlier
  waypoint), `{"start","end"}` objects or `[start, end]` pairs, in order. An exported waypoint
  carries `text` and `origin` too; on import the span wins and the text must match it.
- e1 files (`problem_id`, `problem`, `solution` with the answer in `\\boxed{}`): when
  `answer` is absent in a verifiable dataset, the last `\\boxed{}` of the solution is used.

Re-importing a problem id that the dataset already has UPDATES it: a changed solution or
answer becomes a new solution version (waypoints from the file, else carried forward), a
changed statement/source/tags is updated in place, and an identical line is counted as
unchanged. Nothing is ever duplicated.

Modules: `jsonl_read` (the file, line by line, no database), `import_write` (rights,
existing problems, writes, the report), `jsonl_import` (the one import service),
`import_job` (large imports as a job), `export`.
"""

from curation.services.transfer.export import (
    export_records,
    problems_export_jsonl,
    problems_export_parquet,
)
from curation.services.transfer.import_job import (
    IMPORT_JOB_KIND,
    import_uploads_sweep,
    problem_import_job_cancel,
    problem_import_job_execute,
    problem_import_job_get,
    problem_import_job_retry,
)
from curation.services.transfer.import_write import (
    ImportReport,
    NewDataset,
    problem_upsert,
)
from curation.services.transfer.jsonl_import import (
    inline_max_lines,
    problems_import_jsonl,
    upload_check_size,
    upload_limit_bytes,
)
from curation.services.transfer.jsonl_read import (
    EMPTY_FILE_MESSAGE,
    LineError,
    ParsedProblem,
    parse_jsonl,
)

__all__ = [
    "EMPTY_FILE_MESSAGE",
    "IMPORT_JOB_KIND",
    "ImportReport",
    "LineError",
    "NewDataset",
    "ParsedProblem",
    "export_records",
    "import_uploads_sweep",
    "inline_max_lines",
    "parse_jsonl",
    "problem_import_job_cancel",
    "problem_import_job_execute",
    "problem_import_job_get",
    "problem_import_job_retry",
    "problem_upsert",
    "problems_export_jsonl",
    "problems_export_parquet",
    "problems_import_jsonl",
    "upload_check_size",
    "upload_limit_bytes",
]
