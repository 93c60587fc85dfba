from django.urls import path

from expansion import views

app_name = "expansion"

urlpatterns = [
    path("", views.model_list, name="models"),
]
