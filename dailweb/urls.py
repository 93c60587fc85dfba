"""URL configuration. Every view declares its roles (see dailweb.roles and the URL-matrix test)."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from dailweb import views

handler403 = "dailweb.views.permission_denied"

urlpatterns = [
    path("", views.home, name="home"),
    path("favicon.ico", views.favicon, name="favicon"),
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(redirect_authenticated_user=True),
        name="login",
    ),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("problems/", include("curation.urls")),
    path("jobs/", include("dailweb.jobs.urls")),
    path("", include("expansion.urls")),
    path("evaluations/", include("training.evaluations.urls")),
    path("training/", include("training.urls")),
    path("studies/", include("training.studies.urls")),
    path("admin/", admin.site.urls),
]
