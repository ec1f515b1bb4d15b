"""Routes for tokens (see oauthproxy/urls.py for the layout): RFC 6749/7636 token, RFC 7009 revocation and
RFC 7662 introspection, per MCP server."""

from django.urls import path

from ..apis.introspection import IntrospectApi
from ..views import token

urlpatterns = [
    path("oauth/<str:slug>/token", token.token, name="oauth-token"),
    path("oauth/<str:slug>/revoke", token.revoke, name="oauth-revoke"),
    path("oauth/<str:slug>/introspect", IntrospectApi.as_view(), name="oauth-introspect"),
]
