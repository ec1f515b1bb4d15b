"""The base of the OAuth protocol endpoints programs call: discovery metadata, JWKS, registration (RFC 7591,
RFC 7592), token, revocation and introspection.

One view style per kind of endpoint:

- protocol endpoints: ``ProtocolEndpoint`` subclasses (this module);
- browser pages (authorize, consent, callback, My connections): function views with the middleware stack;
- the management API (``/api/v1``): DRF.

A ``ProtocolEndpoint`` answers what every protocol endpoint answers alike, so each endpoint only says its
methods and its work (a ``get``, ``post``... handler each; HEAD comes with GET):

- no CSRF check: programs call it without cookies. It reads nothing middleware provides (no session, user,
  CSRF token or messages), so ``authserver.asgi`` may serve it past the middleware stack;
- JSON whatever the ``Accept`` header; errors are ``OAuthError``s rendered RFC-shaped by
  ``oauth_error_response`` (``no-store``), a method not allowed too (405), with the endpoint's
  ``WWW-Authenticate`` challenge where it has one (``challenge``). Every answer names the methods in ``Allow``;
- CORS for browser-based MCP clients, never with credentials (the caller authenticates in the request
  itself): a preflight (``OPTIONS``) answers 204 with the methods and headers allowed, and every answer
  carries ``Access-Control-Allow-Origin: *``;
- the MCP server of the URL's slug (``server_get``): unknown or disabled is 404 ``not_found``;
- form fields are kept out of error reports (``sensitive_post_parameters``): they carry secrets and tokens.

Caching is the endpoint's to say: ``no-store`` on anything carrying a credential, public on discovery.
"""

from django.http import HttpResponse
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.debug import sensitive_post_parameters

from oauthproxy.core.exceptions import OAuthError, oauth_error_response
from oauthproxy.core.servers import server_get_enabled
from oauthproxy.models import McpServer
from oauthproxy.models.servers import SLUG_RE

CORS_ALLOW_HEADERS = "Authorization, Content-Type, MCP-Protocol-Version"
CORS_MAX_AGE = "86400"


class ServerNotFound(OAuthError):
    """Unknown or disabled MCP server: 404 ``{"error": "not_found"}``."""

    error = "not_found"
    status = 404


@method_decorator([csrf_exempt, sensitive_post_parameters()], name="dispatch")
class ProtocolEndpoint(View):
    server: McpServer | None = None  # once ``server_get`` found it, for ``challenge``

    def dispatch(self, request, *args, **kwargs):
        try:
            response = super().dispatch(request, *args, **kwargs)
        except OAuthError as exc:
            challenge = self.challenge(exc)
            response = oauth_error_response(exc, headers={"WWW-Authenticate": challenge} if challenge else None)
        response["Allow"] = ", ".join(self._allowed_methods())
        response["Access-Control-Allow-Origin"] = "*"
        return response

    def options(self, request, *args, **kwargs):
        """The CORS preflight. HEAD is a simple method: it needs no listing."""
        response = HttpResponse(status=204)
        response["Access-Control-Allow-Methods"] = ", ".join(m for m in self._allowed_methods() if m != "HEAD")
        response["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
        response["Access-Control-Max-Age"] = CORS_MAX_AGE
        return response

    def http_method_not_allowed(self, request, *args, **kwargs):
        *others, last = [m for m in self._allowed_methods() if m not in ("HEAD", "OPTIONS")]
        usable = f"{', '.join(others)} or {last}" if others else last
        raise OAuthError(f"{request.method} is not allowed here: use {usable}.", status=405)

    def challenge(self, exc: OAuthError) -> str | None:
        """The ``WWW-Authenticate`` challenge answering ``exc``, for endpoints that authenticate their caller."""
        return None

    def server_get(self, slug: str) -> McpServer:
        server = server_get_enabled(slug=slug) if SLUG_RE.fullmatch(slug) else None
        if server is None:
            raise ServerNotFound()
        self.server = server
        return server
