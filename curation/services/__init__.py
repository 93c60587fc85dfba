"""Curation services (writes), by topic: `problems` (datasets, problems, solution versions,
waypoints), `suggestions` (suggested waypoints, partial solutions, prompt previews),
`transfer` (JSONL / Parquet import and export) and `champ` (the CHAMP package)."""
