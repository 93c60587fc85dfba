from django.apps import AppConfig


class TrainingConfig(AppConfig):
    """The contrastive objective and LoRA trainer (engine/), training and evaluation jobs."""

    name = "training"
    verbose_name = "Training"

    def ready(self) -> None:
        from training import jobs  # noqa: F401  (registers job kinds)
