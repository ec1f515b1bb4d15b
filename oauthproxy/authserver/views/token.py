"""The token (RFC 6749, RFC 7636) and revocation (RFC 7009) endpoints of each MCP server. Thin: the work is
in ``services.tokens``.

Both answer JSON with ``Cache-Control: no-store`` whatever happens, are called by programs without cookies
(no CSRF), and allow cross-origin calls from browser-based MCP clients (never with credentials: the
client authenticates in the request itself).
"""

from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.debug import sensitive_post_parameters

from oauthproxy.authserver.tokens import (
    EndpointResponse,
    oauth_error_endpoint_response,
    revocation_request_handle,
    token_request_handle,
)
from oauthproxy.core.exceptions import OAuthError
from oauthproxy.core.servers import server_get_enabled
from oauthproxy.models.servers import SLUG_RE

CORS_ALLOW_HEADERS = "Authorization, Content-Type"


@csrf_exempt
@sensitive_post_parameters()
def token(request, slug: str) -> HttpResponse:
    return _endpoint(request, slug, token_request_handle)


@csrf_exempt
@sensitive_post_parameters()
def revoke(request, slug: str) -> HttpResponse:
    return _endpoint(request, slug, revocation_request_handle)


def _endpoint(request, slug: str, handle) -> HttpResponse:
    if request.method == "OPTIONS":  # CORS preflight
        response = HttpResponse(status=204)
        response["Access-Control-Allow-Methods"] = "POST, OPTIONS"
        response["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
        response["Access-Control-Max-Age"] = "86400"
        return _cors(response)
    server = server_get_enabled(slug=slug) if SLUG_RE.fullmatch(slug) else None
    if server is None:
        result = oauth_error_endpoint_response(
            OAuthError("No MCP server is configured at this address.", error="not_found", status=404), server=None
        )
    elif request.method != "POST":
        result = oauth_error_endpoint_response(
            OAuthError("Use POST.", error="invalid_request", status=405), server=server
        )
        result.headers["Allow"] = "POST, OPTIONS"
    else:
        result = handle(server=server, request=request)
    return _cors(_http_response(result))


def _http_response(result: EndpointResponse) -> HttpResponse:
    response = HttpResponse(result.body, status=result.status, content_type=result.headers.get("Content-Type"))
    for name, value in result.headers.items():
        response[name] = value
    return response


def _cors(response: HttpResponse) -> HttpResponse:
    response["Access-Control-Allow-Origin"] = "*"
    return response
