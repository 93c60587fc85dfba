from django.urls import path

from expansion import views

app_name = "expansion"

urlpatterns = [
    path("models/", views.model_list, name="models"),
    path("runs/", views.run_list, name="runs"),
    path("runs/new/", views.run_launch, name="run_launch"),
    path("runs/<int:run_id>/", views.run_detail, name="run_detail"),
    path("runs/<int:run_id>/cancel/", views.run_cancel, name="run_cancel"),
    path("runs/<int:run_id>/retry/", views.run_retry, name="run_retry"),
    path("review/", views.trace_queue, name="queue"),
    path("review/next/", views.trace_next, name="next"),
    path("review/export/", views.trace_export, name="export"),
    path("review/traces/<int:trace_id>/", views.trace_page, name="trace"),
    path("review/traces/<int:trace_id>/verdict/", views.trace_verdict, name="verdict"),
    path("review/traces/<int:trace_id>/spans/", views.trace_span_add, name="span_add"),
    path("review/traces/<int:trace_id>/whatif/", views.trace_whatif, name="whatif"),
    path(
        "review/traces/<int:trace_id>/spans/<int:span_id>/delete/",
        views.trace_span_delete,
        name="span_delete",
    ),
]
