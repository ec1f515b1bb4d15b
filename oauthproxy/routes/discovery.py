"""Routes for discovery (see oauthproxy/urls.py for the layout): RFC 8414 (plus the OpenID discovery
locations MCP clients also try) and RFC 9728, per MCP server."""

from django.urls import path

from ..apis.metadata import AuthorizationServerMetadataApi, ProtectedResourceMetadataApi

_as_metadata = AuthorizationServerMetadataApi.as_view()

urlpatterns = [
    path(".well-known/oauth-authorization-server/oauth/<str:slug>", _as_metadata, name="oauth-server-metadata"),
    path(".well-known/openid-configuration/oauth/<str:slug>", _as_metadata, name="oauth-server-metadata-openid"),
    path("oauth/<str:slug>/.well-known/openid-configuration", _as_metadata, name="oauth-server-metadata-openid-suffix"),
    path(
        ".well-known/oauth-protected-resource/mcp/<str:slug>",
        ProtectedResourceMetadataApi.as_view(),
        name="oauth-protected-resource-metadata",
    ),
]
