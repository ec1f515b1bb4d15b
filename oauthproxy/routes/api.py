"""Routes for the management API: /api/v1/..., its OpenAPI document /api/schema/ and docs /api/docs/."""

from django.http import JsonResponse
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from ..apis import management

router = DefaultRouter()
router.register("servers", management.ServerViewSet, basename="api-server")
router.register("discovery", management.DiscoveryViewSet, basename="api-discovery")
router.register("clients", management.ClientViewSet, basename="api-client")
router.register("sessions", management.SessionViewSet, basename="api-session")
router.register("audit-events", management.AuditEventViewSet, basename="api-audit-event")
router.register("tokens", management.TokenViewSet, basename="api-token")



def api_not_found(request, *args, **kwargs):
    """Anything else under /api/ is a JSON 404, like the API's own (never Django's HTML page)."""
    return JsonResponse({"detail": "Not found."}, status=404)


urlpatterns = [
    path("api/v1/", include(router.urls)),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    re_path(r"^api/", api_not_found),
]
