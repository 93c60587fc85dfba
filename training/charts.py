"""Whether the pages can draw charts: Chart.js is served from node_modules/ when installed
(`./dev setup`); without it the evaluation and training pages show their tables only."""

from __future__ import annotations

from django.conf import settings


def charts_available() -> bool:
    return (
        getattr(settings, "CHARTJS_DIST_DIR", None) is not None
        and settings.CHARTJS_DIST_DIR.is_dir()
    )
