"""Routes for registration (see oauthproxy/urls.py for the layout): RFC 7591 and RFC 7592, per MCP server."""

from django.urls import path

from ..apis.registration import ClientConfigurationApi, ClientRegisterApi

urlpatterns = [
    path("oauth/<str:slug>/register", ClientRegisterApi.as_view(), name="oauth-register"),
    path("oauth/<str:slug>/register/<str:client_id>", ClientConfigurationApi.as_view(), name="oauth-register-client"),
]
