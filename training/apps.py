from django.apps import AppConfig


class TrainingConfig(AppConfig):
    """The contrastive objective and LoRA trainer (engine/), training runs, and evaluations
    (evaluations/: their own views, URLs, forms, selectors, services and job), and studies
    (studies/: the paper's comparison run through those jobs)."""

    name = "training"
    verbose_name = "Training"

    def ready(self) -> None:
        # Registers the job kinds: training runs, and evaluations.
        from training import jobs  # noqa: F401
        from training.evaluations import jobs as evaluation_jobs  # noqa: F401
        from training.studies import signals  # noqa: F401  (studies follow their jobs)
