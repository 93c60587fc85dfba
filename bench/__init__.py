"""Benchmarks: `python -m bench <name> [--quick] [--json FILE]`.

Every benchmark measures ratios against a baseline run in the same process, prints a table
and writes JSON. Timings are never pass/fail tests.
"""
