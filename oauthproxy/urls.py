"""The URL layout of DESIGN §2. Every OAuth URL carries the server slug; each area has its own module."""

from django.urls import include, path

from .views import health, metrics

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics, name="metrics"),
    # /.well-known/... (RFC 8414, RFC 9728, OIDC discovery)
    path("", include("oauthproxy.routes.discovery")),
    # /oauth/<slug>/register[/<client_id>] (RFC 7591, RFC 7592)
    path("", include("oauthproxy.routes.registration")),
    # /oauth/<slug>/authorize, /consent, /callback
    path("", include("oauthproxy.routes.authorization")),
    # /oauth/<slug>/token, /revoke, /introspect
    path("", include("oauthproxy.routes.tokens")),
    # /mcp/<slug>
    path("", include("oauthproxy.routes.gateway")),
    # /api/v1/..., /api/schema/, /api/docs/
    path("", include("oauthproxy.routes.api")),
]
