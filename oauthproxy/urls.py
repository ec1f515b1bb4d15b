"""The URL layout of DESIGN §2. Every OAuth URL carries the server slug."""

from django.urls import path

from .views import health

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
]
