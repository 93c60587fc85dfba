from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "dailweb.jobs"
    label = "jobs"
    verbose_name = "Jobs"

    def ready(self) -> None:
        from dailweb.jobs import builtin_kinds, launchers, signals  # noqa: F401  (registration)
