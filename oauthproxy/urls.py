"""The URL layout of DESIGN §2, in one table. Every OAuth URL carries the server slug (``<str:slug>``).

``proxy_site.asgi`` serves ``/mcp/<slug>`` and the ``/oauth/<slug>/...`` endpoints without Django's ASGI
handler; it finds them with this table too (``GATEWAY_PATH``, the gateway route's pattern; ``resolve()`` under
``OAUTH_PATH_PREFIX``), so a path is typed once.
"""

from django.http import JsonResponse
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from oauthproxy.authserver.views import authorize, callback, connections, consent
from oauthproxy.authserver.views.introspection import IntrospectApi
from oauthproxy.authserver.views.metadata import (
    AuthorizationServerMetadataApi,
    IdentityJwksApi,
    OpenIdConfigurationApi,
    ProtectedResourceMetadataApi,
)
from oauthproxy.authserver.views.registration import ClientConfigurationApi, ClientRegisterApi
from oauthproxy.authserver.views.token import RevocationApi, TokenApi
from oauthproxy.console import api as management
from oauthproxy.console.views import health, landing, metrics
from oauthproxy.gateway.views import gateway

GATEWAY_URL_NAME = "gateway"
# The gateway, trailing slash tolerated. ``gateway.asgi`` matches ASGI paths with this route's own pattern.
GATEWAY_ROUTE = re_path(r"^mcp/(?P<slug>[a-z0-9-]{1,64})/?$", gateway, name=GATEWAY_URL_NAME)
GATEWAY_PATH = GATEWAY_ROUTE.pattern.regex
# Where the OAuth endpoints of every server live: ``authserver.asgi`` resolves paths under it with this table.
OAUTH_PATH_PREFIX = "/oauth/"

router = DefaultRouter()
router.register("servers", management.ServerViewSet, basename="api-server")
router.register("discovery", management.DiscoveryViewSet, basename="api-discovery")
router.register("clients", management.ClientViewSet, basename="api-client")
router.register("sessions", management.SessionViewSet, basename="api-session")
router.register("audit-events", management.AuditEventViewSet, basename="api-audit-event")
router.register("destination-rules", management.DestinationRuleViewSet, basename="api-destination-rule")
router.register("tokens", management.TokenViewSet, basename="api-token")


def api_not_found(request, *args, **kwargs):
    """Anything else under /api/ is a JSON 404, like the API's own (never Django's HTML page)."""
    return JsonResponse({"detail": "Not found."}, status=404)


_as_metadata = AuthorizationServerMetadataApi.as_view()
_no_openid = OpenIdConfigurationApi.as_view()

urlpatterns = [
    path("", landing.landing, name="landing"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics, name="metrics"),
    # Discovery: RFC 8414 and RFC 9728. The OpenID locations MCP clients also try answer 404 (no ID tokens).
    path(".well-known/oauth-authorization-server/oauth/<str:slug>", _as_metadata, name="oauth-server-metadata"),
    path(".well-known/openid-configuration/oauth/<str:slug>", _no_openid, name="oauth-server-metadata-openid"),
    path(
        "oauth/<str:slug>/.well-known/openid-configuration", _no_openid, name="oauth-server-metadata-openid-suffix"
    ),
    path(
        ".well-known/oauth-protected-resource/mcp/<str:slug>",
        ProtectedResourceMetadataApi.as_view(),
        name="oauth-protected-resource-metadata",
    ),
    # Registration: RFC 7591 and RFC 7592.
    path("oauth/<str:slug>/register", ClientRegisterApi.as_view(), name="oauth-register"),
    path("oauth/<str:slug>/register/<str:client_id>", ClientConfigurationApi.as_view(), name="oauth-register-client"),
    # The user's way through: authorize, consent, the upstream's callback.
    path("oauth/<str:slug>/authorize", authorize.authorize, name="oauth-authorize"),
    path("oauth/<str:slug>/consent", consent.consent, name="oauth-consent"),
    path("oauth/<str:slug>/callback", callback.callback, name="oauth-callback"),
    # Tokens: RFC 6749/7636 token, RFC 7009 revocation, RFC 7662 introspection.
    path("oauth/<str:slug>/token", TokenApi.as_view(), name="oauth-token"),
    path("oauth/<str:slug>/revoke", RevocationApi.as_view(), name="oauth-revoke"),
    path("oauth/<str:slug>/introspect", IntrospectApi.as_view(), name="oauth-introspect"),
    # The public keys of the server's identity assertions (X-Identity-Assertion).
    path("oauth/<str:slug>/jwks.json", IdentityJwksApi.as_view(), name="oauth-jwks"),
    # A signed-in user's own connections (approved MCP clients), and disconnecting one.
    path("connections/", connections.connections, name="connections"),
    GATEWAY_ROUTE,
    # The management API, its OpenAPI document and docs.
    path("api/v1/", include(router.urls)),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    re_path(r"^api/", api_not_found),
]
