from django.apps import AppConfig


class TrainingConfig(AppConfig):
    """The contrastive objective and LoRA trainer (engine/), training and evaluation jobs."""

    name = "training"
    verbose_name = "Training"
