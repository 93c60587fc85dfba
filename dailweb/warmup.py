"""Warm a web server process before it answers: what the first page would otherwise load.

Measured on a fresh process (issue 16, item 8): the first page spent ~5 s importing the
URLconf (the expansion views import torch and transformers) and the first page with a prompt
preview (problem, new problem, editor) ~2-7 s more loading the base model's tokenizer;
KaTeX's first formula costs ~50 ms. `warm_web_process` does all three once, at start-up.

It is called from `dailweb.wsgi`, the web server's entry point (gunicorn under `manage.py up`,
and `runserver`), so management commands, Celery workers and tests do not pay for it.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


def warm_web_process() -> dict[str, float]:
    """Load the URLconf, the base tokenizer (when the model is prepared) and KaTeX; returns
    the seconds each took. A failure is logged, never raised: the page reports it later."""
    timings: dict[str, float] = {}

    def step(name, action) -> None:
        started = time.perf_counter()
        try:
            action()
        except Exception:  # noqa: BLE001 - warming must never stop the server from starting
            logger.exception("Warming %s failed; the first page will load it.", name)
        timings[name] = time.perf_counter() - started

    from django.urls import get_resolver

    from dailweb.rendering import render_tex
    from expansion.services import base_tokenizer

    step("urlconf", lambda: get_resolver().url_patterns)
    step("tokenizer", base_tokenizer)
    step("katex", lambda: render_tex("x^2"))
    logger.info(
        "Web process warmed in %.1f s (%s).",
        sum(timings.values()),
        ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items()),
    )
    return timings
