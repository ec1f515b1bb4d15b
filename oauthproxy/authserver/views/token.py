"""The token (RFC 6749, RFC 7636) and revocation (RFC 7009) endpoints of each MCP server. Thin: the work is
in ``authserver.tokens``, which answers JSON with ``Cache-Control: no-store`` whatever happens."""

from django.http import HttpResponse

from oauthproxy.authserver.tokens import EndpointResponse, revocation_request_handle, token_request_handle
from oauthproxy.authserver.views.protocol import ProtocolEndpoint


class TokenApi(ProtocolEndpoint):
    def post(self, request, slug: str) -> HttpResponse:
        return _http_response(token_request_handle(server=self.server_get(slug), request=request))


class RevocationApi(ProtocolEndpoint):
    def post(self, request, slug: str) -> HttpResponse:
        return _http_response(revocation_request_handle(server=self.server_get(slug), request=request))


def _http_response(result: EndpointResponse) -> HttpResponse:
    response = HttpResponse(result.body, status=result.status, content_type=result.headers.get("Content-Type"))
    for name, value in result.headers.items():
        response[name] = value
    return response
