"""What every OAuth protocol endpoint answers alike (``authserver.views.protocol.ProtocolEndpoint``): the CORS
preflight, a wrong method, an unknown server, JSON whatever the Accept header; through Django and through
the ASGI entry's direct path."""

import pytest
from django.urls import reverse

from oauthproxy.authserver.asgi import PROGRAM_URL_NAMES
from oauthproxy.authserver.views.protocol import ProtocolEndpoint
from oauthproxy.urls import urlpatterns
from tests.authserver.test_asgi import asgi_request

GET_ONLY = ("GET", "POST")  # (a method it has, a method it has not)
POST_ONLY = ("POST", "GET")
# URL name: (its other URL arguments, a method it has, a method it has not, Allow)
ENDPOINTS = {
    "oauth-server-metadata": ({}, *GET_ONLY, "GET, HEAD, OPTIONS"),
    "oauth-server-metadata-openid": ({}, *GET_ONLY, "GET, HEAD, OPTIONS"),
    "oauth-server-metadata-openid-suffix": ({}, *GET_ONLY, "GET, HEAD, OPTIONS"),
    "oauth-protected-resource-metadata": ({}, *GET_ONLY, "GET, HEAD, OPTIONS"),
    "oauth-jwks": ({}, *GET_ONLY, "GET, HEAD, OPTIONS"),
    "oauth-register": ({}, *POST_ONLY, "POST, OPTIONS"),
    "oauth-register-client": ({"client_id": "some-client"}, "GET", "POST", "GET, PUT, DELETE, HEAD, OPTIONS"),
    "oauth-token": ({}, *POST_ONLY, "POST, OPTIONS"),
    "oauth-revoke": ({}, *POST_ONLY, "POST, OPTIONS"),
    "oauth-introspect": ({}, *POST_ONLY, "POST, OPTIONS"),
}


def url(name: str, slug: str = "crm") -> str:
    return reverse(name, kwargs={"slug": slug, **ENDPOINTS[name][0]})


def assert_rfc_error(response, status: int, error: str) -> None:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    assert response["Access-Control-Allow-Origin"] == "*"
    assert response.json()["error"] == error


def test_every_protocol_endpoint_is_a_protocol_endpoint_and_listed_here():
    """One view style per kind of endpoint: the table above covers every ProtocolEndpoint route, and only
    those (the browser pages and the management API are other styles)."""
    names = {
        pattern.name for pattern in urlpatterns
        if issubclass(getattr(pattern.callback, "view_class", object), ProtocolEndpoint)
    }
    assert names == set(ENDPOINTS)


@pytest.mark.django_db
@pytest.mark.parametrize("name", ENDPOINTS)
class TestEveryProtocolEndpoint:
    def test_cors_preflight(self, client, server, name):
        _kwargs, method, _other, allow = ENDPOINTS[name]
        response = client.options(
            url(name), HTTP_ORIGIN="http://localhost:6274", HTTP_ACCESS_CONTROL_REQUEST_METHOD=method,
            HTTP_ACCESS_CONTROL_REQUEST_HEADERS="authorization, content-type, mcp-protocol-version",
        )
        assert response.status_code == 204
        assert response["Access-Control-Allow-Origin"] == "*"
        assert response["Access-Control-Allow-Methods"] == allow.replace("HEAD, ", "")
        assert response["Access-Control-Allow-Headers"] == "Authorization, Content-Type, MCP-Protocol-Version"
        assert response["Access-Control-Max-Age"] == "86400"
        assert response["Allow"] == allow
        assert "Access-Control-Allow-Credentials" not in response

    @pytest.mark.parametrize("slug", ["crm", "nope"])
    def test_a_wrong_method_is_an_rfc_405_before_the_server_is_looked_up(self, client, server, name, slug):
        _kwargs, _method, other, allow = ENDPOINTS[name]
        response = client.generic(other, url(name, slug), HTTP_ACCEPT="text/html")
        assert_rfc_error(response, 405, "invalid_request")
        assert response["Allow"] == allow
        assert other in response.json()["error_description"]

    def test_an_unknown_server_is_an_rfc_404(self, client, server, name):
        _kwargs, method, _other, allow = ENDPOINTS[name]
        response = client.generic(method, url(name, "nope"), HTTP_ACCEPT="text/html")
        assert_rfc_error(response, 404, "not_found")
        assert response["Allow"] == allow


@pytest.mark.django_db(transaction=True)  # the views run on the endpoint threads
@pytest.mark.parametrize("name", sorted(PROGRAM_URL_NAMES))
def test_the_direct_asgi_path_answers_the_same(server, name):
    _kwargs, method, other, allow = ENDPOINTS[name]
    preflight = asgi_request("OPTIONS", url(name), headers={"Origin": "http://localhost:6274"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Methods"] == allow.replace("HEAD, ", "")
    wrong = asgi_request(other, url(name), headers={"Accept": "text/html"})
    assert wrong.status_code == 405
    assert wrong.headers["Content-Type"] == "application/json"
    assert wrong.headers["Cache-Control"] == "no-store"
    assert wrong.headers["Access-Control-Allow-Origin"] == "*"
    assert wrong.headers["Allow"] == allow
    assert wrong.json()["error"] == "invalid_request"
