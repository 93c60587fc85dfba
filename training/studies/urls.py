"""Studies, mounted at /studies/ (namespace "studies")."""

from django.urls import path

from training.studies import views

app_name = "studies"

urlpatterns = [
    path("", views.study_list, name="list"),
    path("new/", views.study_launch, name="launch"),
    path("<int:study_id>/", views.study_detail, name="detail"),
    path("<int:study_id>/cancel/", views.study_cancel, name="cancel"),
    path("<int:study_id>/retry/", views.study_retry, name="retry"),
    path("<int:study_id>/review-done/", views.study_review_done, name="review_done"),
    path("<int:study_id>/study.json", views.study_export_json, name="export_json"),
    path("<int:study_id>/report.zip", views.study_export_report, name="export_report"),
]
