from django.urls import path

from training import views

app_name = "training"

urlpatterns = [
    path("", views.evaluation_list, name="list"),
    path("new/", views.evaluation_launch, name="launch"),
    path("compare/", views.evaluation_compare, name="compare"),
    path("compare/export/", views.evaluation_export, name="export"),
    path("problems/<int:problem_id>/", views.evaluation_problem, name="problem"),
    path("samples/<int:sample_id>/rule/", views.sample_rule, name="rule"),
    path("<int:evaluation_id>/", views.evaluation_detail, name="detail"),
    path("<int:evaluation_id>/cancel/", views.evaluation_cancel, name="cancel"),
    path("<int:evaluation_id>/retry/", views.evaluation_retry, name="retry"),
]

# Training runs and the adapter registry, mounted at /training/ (namespace "training_runs").
training_run_urls = (
    [
        path("", views.training_run_list, name="list"),
        path("new/", views.training_run_launch, name="launch"),
        path("adapters/", views.adapter_registry, name="registry"),
        path("<int:training_run_id>/", views.training_run_detail, name="detail"),
        path("<int:training_run_id>/metrics/", views.training_run_metrics, name="metrics"),
        path("<int:training_run_id>/cancel/", views.training_run_cancel, name="cancel"),
        path("<int:training_run_id>/retry/", views.training_run_retry, name="retry"),
        path("<int:training_run_id>/adapter.zip", views.adapter_download, name="download"),
    ],
    "training_runs",
)
