"""Expansion services (writes), by topic: `models` (base models and the embedded model),
`runs` (expansion runs, chunks and traces), `review` (verdicts, shortcut spans, claiming)."""

from expansion.services.models import (  # noqa: F401  (the app's public service names)
    MODEL_PREPARE_KIND,
    base_model_dir,
    base_tokenizer,
    embedded_model_prepare,
    embedded_model_prepare_launch,
    embedded_model_status,
    prompt_texts_for_preview,
)
