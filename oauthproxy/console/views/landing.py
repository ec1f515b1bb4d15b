"""GET /: a short page saying what this service is, with the way to the admin, the API docs and health."""

from django.conf import settings
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET


@require_GET
def landing(request):
    return render(request, "oauthproxy/landing.html", {
        "base_url": settings.PUBLIC_BASE_URL,
        "admin_url": reverse("admin:index"),
        "api_docs_url": reverse("api-docs"),
        "healthz_url": reverse("healthz"),
        "readyz_url": reverse("readyz"),
    })
