"""The Celery application. Configuration lives in Django settings (CELERY_* names).

Queues: `gpu` for expansion, training and evaluation; `default` for everything else. More GPU
machines means more workers started with `-Q gpu`, nothing else.
"""

import os
import sys

from celery import Celery, signals
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dailweb.settings")

app = Celery("dailweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_queues = (Queue("default"), Queue("gpu"))
app.autodiscover_tasks(["dailweb.jobs", "training"])


@signals.worker_init.connect
def quiet_library_progress_bars(**_kwargs: object) -> None:
    """A worker's log is a file: a job reports its own progress (the job page), so the bars
    transformers and huggingface_hub draw (e.g. "Loading weights" on every model load) would
    only fill the log with carriage-return lines. Set before the pool starts; its processes,
    and the engines they spawn, inherit it."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # The libraries read it when imported; ones imported already are told directly.
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
