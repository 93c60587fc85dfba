"""Template context about installed front-end assets."""

from __future__ import annotations

from django.conf import settings


def assets(request) -> dict:
    return {"katex_css": settings.KATEX_DIST_DIR.is_dir()}
