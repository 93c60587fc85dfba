from django.apps import AppConfig


class ExpansionConfig(AppConfig):
    """Models, the mixed-policy rollout (engine/), expansion runs and the reviewer's audit."""

    name = "expansion"
    verbose_name = "Expansion"

    def ready(self) -> None:
        from expansion import jobs  # noqa: F401  (registers job kinds)
