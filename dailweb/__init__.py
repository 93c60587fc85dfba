"""The DAIL workbench's project package: settings, URLs, the Celery app, roles and the shared
job machinery (`dailweb.jobs`)."""

from dailweb.celery import app as celery_app

__all__ = ["celery_app"]
