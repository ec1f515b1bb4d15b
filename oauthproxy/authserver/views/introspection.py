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
from oauthproxy.authserver.views.protocol import ProtocolEndpoint
from oauthproxy.core.exceptions import InvalidClient, InvalidRequest, OAuthError
from oauthproxy.core.ratelimit import rate_limit_hit


class IntrospectApi(ProtocolEndpoint):
    def post(self, request, slug: str):
        server = self.server_get(slug)
        params = dict(form_read(request, allowed=INTROSPECTION_PARAMETERS))
        credential = introspection_credential_authenticate(
            server=server,
            authorization=request.META.get("HTTP_AUTHORIZATION"),
            client_id=params.get("client_id"),
            client_secret=params.get("client_secret"),
        )
        rate_limit_hit(name="introspect:credential", key=f"{server.slug}:{credential.client_id}")
        token = params.get("token")
        if not token:
            raise InvalidRequest("token is required.")
        response = JsonResponse(token_introspect(server=server, token=token))
        response["Cache-Control"] = "no-store"
        response["Pragma"] = "no-cache"
        return response

    def challenge(self, exc: OAuthError) -> str | None:
        """RFC 6749 §5.2: a failed client authentication names the Basic scheme and this server's realm."""
        if isinstance(exc, InvalidClient):
            return f'Basic realm="{self.server.issuer_url}"'
        return None
