from django.apps import AppConfig


class DailwebConfig(AppConfig):
    """Roles (groups), the home page and the project-wide templates."""

    name = "dailweb"
    verbose_name = "DAIL workbench"
