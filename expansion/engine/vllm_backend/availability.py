"""Whether vLLM can run on this machine, answered without importing it.

Callers that only need to know (launch forms, job services, test guards) import this module:
it imports neither vLLM nor torch, so asking costs nothing where vLLM is missing or slow to
import. It knows nothing about engines, models or rollouts.
"""

from __future__ import annotations

import importlib.util


def vllm_unavailable_reason() -> str:
    """Why vLLM cannot run on this machine ('' when it can); does not import vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "vLLM is not installed on this machine (./dev setup installs it unless "
            "DAIL_NO_VLLM=1 was set)"
        )
    return ""
