"""The training run page shows its settings as labelled fields (human labels, units, what each
means) rather than the config's code names (issue 16, item 6, on the training run page)."""

from __future__ import annotations

import re
from html import unescape

import pytest
from django.test import Client
from django.urls import reverse

from dailweb.labelled_fields import format_value
from tests.factories import make_user
from tests.training.training_factories import make_training_run, small_config

pytestmark = pytest.mark.django_db


def _text_of(page: str) -> str:
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", page)))


def _run_page(run) -> str:
    client = Client()
    client.force_login(make_user("admin"))
    return client.get(reverse("training:detail", args=[run.pk])).content.decode()


def test_training_settings_are_labelled_fields_not_code_names():
    run = make_training_run(config=small_config(learning_rate=3e-4, checkpoint_every=10))
    page = _run_page(run)
    settings = page.split('data-testid="training-settings"')[1].split("</dl>")[0]
    text = _text_of(settings)
    assert "Peak learning rate 0.0003" in text and "Peak learning rate (AdamW)." in text
    assert "LoRA rank r 4" in text and "LoRA alpha α 8" in text
    assert "Longest view 128 tokens" in text and "Checkpoint every 10 steps" in text
    assert "Traces per optimizer step 1" in text and "Warm-up 0 steps" in text
    assert "Checkpoints kept all" in text  # None means every checkpoint is kept
    assert "LoRA target modules q_proj, k_proj" in text
    # No setting appears under its code name anywhere on the page.
    for code_name in ("learning_rate", "lora_r", "loss_normalisation", "effective_batch_size"):
        assert code_name not in _text_of(page)
    # The objective and the loss normalisation are in the summary, with their explanation.
    summary = _text_of(page.split('data-testid="loss-normalisation">')[1].split("</dd>")[0])
    assert summary.startswith("per_sequence (release")


def test_a_unit_after_one_is_singular():
    assert format_value(1, unit="steps") == "1 step"
    assert format_value(2, unit="steps") == "2 steps"
    assert format_value(1.5, unit="tokens") == "1.5 tokens"
    assert format_value(True, unit="steps") == "yes steps"  # units are for numbers only
