"""Evaluations, mounted at /evaluations/ (namespace "evaluations")."""

from django.urls import path

from training.evaluations import views

app_name = "evaluations"

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
