from django.apps import AppConfig


class CurationConfig(AppConfig):
    """Problems, versioned expert solutions, waypoints, datasets, import/export."""

    name = "curation"
    verbose_name = "Curation"

    def ready(self) -> None:
        from curation import jobs  # noqa: F401  (registers job kinds)
