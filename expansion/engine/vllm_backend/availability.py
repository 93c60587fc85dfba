"""Whether vLLM can run on this machine, answered without importing it; and how a
command-line process that ran it ends (`exit_after_engine`).

Callers that only need to know (launch forms, job services, test guards) import this module:
it imports neither vLLM nor torch, so asking costs nothing where vLLM is missing or slow to
import. It knows nothing about engines, models or rollouts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys


def vllm_unavailable_reason() -> str:
    """Why vLLM cannot run on this machine ('' when it can); does not import vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "vLLM is not installed on this machine (./dev setup installs it unless "
            "DAIL_NO_VLLM=1 was set)"
        )
    return ""


def exit_after_engine(code: int) -> None:
    """End a command-line process (the CLI, `python -m bench`) with exit status `code`.

    After a vLLM engine has run, the interpreter's own teardown sometimes aborts ("terminate
    called without an active exception", SIGABRT) while destroying vLLM's threads, turning a
    finished run into a crash. Call this once the work is written and the model session
    closed: when vLLM was imported it flushes stdout and stderr and leaves without that
    teardown (`os._exit`: no atexit handlers); otherwise it exits normally.
    """
    if "vllm" not in sys.modules:
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
