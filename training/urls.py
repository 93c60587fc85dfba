"""Training runs and the adapter registry, mounted at /training/ (namespace "training").
Evaluations have their own URLs: training/evaluations/urls.py."""

from django.urls import path

from training import views

app_name = "training"

urlpatterns = [
    path("", views.training_run_list, name="list"),
    path("new/", views.training_run_launch, name="launch"),
    path("adapters/", views.adapter_registry, name="registry"),
    path("<int:training_run_id>/", views.training_run_detail, name="detail"),
    path("<int:training_run_id>/metrics/", views.training_run_metrics, name="metrics"),
    path("<int:training_run_id>/cancel/", views.training_run_cancel, name="cancel"),
    path("<int:training_run_id>/retry/", views.training_run_retry, name="retry"),
    path("<int:training_run_id>/adapter.zip", views.adapter_download, name="download"),
]
