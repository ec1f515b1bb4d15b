"""RFC 7662 token introspection (``POST /oauth/<slug>/introspect``) for the resource servers of one MCP
server, authenticated with an introspection credential of that server (issued in the admin or with
``manage.py create_introspection_credential``). Tokens of other servers are inactive here (DESIGN §5.5)."""

from django.http import JsonResponse

from oauthproxy.authserver.tokens import (
    INTROSPECTION_PARAMETERS,
    form_read,
    introspection_credential_authenticate,
    token_introspect,
)
from oauthproxy.authserver.views.metadata import OpenProtocolApi
from oauthproxy.core.exceptions import InvalidClient, InvalidRequest, oauth_error_response
from oauthproxy.core.ratelimit import rate_limit_hit


class IntrospectApi(OpenProtocolApi):
    cors_allow_methods = "POST, OPTIONS"

    def post(self, request, slug: str):
        server = self.server_get(slug)
        try:
            params = dict(form_read(request._request, allowed=INTROSPECTION_PARAMETERS))
            credential = introspection_credential_authenticate(
                server=server,
                authorization=request.META.get("HTTP_AUTHORIZATION"),
                client_id=params.get("client_id"),
                client_secret=params.get("client_secret"),
            )
        except InvalidClient as exc:
            return oauth_error_response(exc, headers={"WWW-Authenticate": f'Basic realm="{server.issuer_url}"'})
        rate_limit_hit(name="introspect:credential", key=f"{server.slug}:{credential.client_id}")
        token = params.get("token")
        if not token:
            raise InvalidRequest("token is required.")
        response = JsonResponse(token_introspect(server=server, token=token))
        response["Cache-Control"] = "no-store"
        response["Pragma"] = "no-cache"
        return response
