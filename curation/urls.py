from django.urls import path

from curation import views

app_name = "curation"

urlpatterns = [
    path("", views.problem_list, name="list"),
    path("new/", views.problem_create, name="create"),
    path("import/", views.problem_import, name="import"),
    path("import/jobs/<int:job_id>/", views.problem_import_job, name="import_job"),
    path(
        "import/jobs/<int:job_id>/cancel/",
        views.problem_import_job_cancel,
        name="import_job_cancel",
    ),
    path(
        "import/jobs/<int:job_id>/retry/", views.problem_import_job_retry, name="import_job_retry"
    ),
    path("export/", views.problem_export, name="export"),
    path("datasets/new/", views.dataset_create, name="dataset_create"),
    path("editor/preview/", views.editor_preview, name="editor_preview"),
    path("<int:problem_id>/", views.problem_detail, name="detail"),
    path("<int:problem_id>/edit/", views.problem_edit, name="edit"),
    path("<int:problem_id>/details/", views.problem_details_update, name="details"),
    path("<int:problem_id>/versions/", views.problem_versions, name="versions"),
]
