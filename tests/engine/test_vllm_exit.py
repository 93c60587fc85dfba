"""How a command-line process that ran vLLM ends: `exit_after_engine`.

vLLM's threads sometimes abort the interpreter's teardown (SIGABRT after the work is done), so
the CLI and `python -m bench` leave with `os._exit` once vLLM has been imported, after
flushing their output; without vLLM they exit normally. Real subprocesses: an exit status and
what reached the pipes are what a caller sees.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import atexit, sys, types
if {with_vllm}:
    sys.modules["vllm"] = types.ModuleType("vllm")  # as if an engine had been imported
atexit.register(lambda: print("teardown ran", flush=True))
from expansion.engine.vllm_backend.availability import exit_after_engine
print("summary line", end="")          # buffered: a pipe is not a terminal
print("warning", end="", file=sys.stderr)
exit_after_engine({code})
print("never reached")
"""


def run(with_vllm: bool, code: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT.format(with_vllm=with_vllm, code=code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("code", [0, 2])
def test_after_vllm_it_flushes_and_skips_the_interpreter_teardown(code):
    done = run(with_vllm=True, code=code)
    assert done.returncode == code
    assert done.stdout == "summary line"  # flushed, and no atexit handler ran
    assert done.stderr == "warning"


@pytest.mark.parametrize("code", [0, 3])
def test_without_vllm_it_exits_normally(code):
    done = run(with_vllm=False, code=code)
    assert done.returncode == code
    assert done.stdout == "summary lineteardown ran\n"
    assert done.stderr == "warning"
