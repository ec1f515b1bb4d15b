"""The connection check (``upstream/check.py``): what an operator's "Check connection" reports for each part of
a server's configuration, against mocked upstreams, and that the client secret never appears in it."""

import base64
from urllib.parse import parse_qs, urlsplit

import pytest
import responses

from oauthproxy.upstream.check import server_connection_check
from tests.conftest import UPSTREAM
from tests.factories import oidc_metadata

SECRET = "upstream-secret-value-123"  # the conftest server's client secret


def statuses(check) -> dict[str, str]:
    return {result.name: result.status for result in check.results}


def detail_of(check, name: str) -> str:
    return next(r.detail for r in check.results if r.name == name)


@pytest.fixture
def healthy(upstream, server):
    """A consistent upstream: metadata matching the server, a login page, invalid_grant for the fake code."""
    server.issuer = UPSTREAM
    server.revocation_endpoint = f"{UPSTREAM}/revoke"
    server.save()
    upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", json=oidc_metadata(
        authorization_endpoint=f"{UPSTREAM}/authorize", token_endpoint=f"{UPSTREAM}/token",
        revocation_endpoint=f"{UPSTREAM}/revoke", userinfo_endpoint=None,
    ))
    upstream.get(f"{UPSTREAM}/authorize", status=302, headers={"Location": f"{UPSTREAM}/login?x=1"})
    upstream.post(f"{UPSTREAM}/token", status=400, json={"error": "invalid_grant",
                                                          "error_description": "code not found"})
    upstream.get(f"{UPSTREAM}/revoke", status=405)
    upstream.get("http://crm.internal:8080/mcp", status=401)
    return server


@pytest.mark.django_db
class TestConnectionCheck:
    def test_a_healthy_configuration_passes_and_names_the_callback(self, healthy, upstream):
        check = server_connection_check(server=healthy)
        assert check.ok, check.results
        assert check.callback_url == "https://proxy.example.test/oauth/crm/callback"
        assert statuses(check) == {
            "Callback URL": "info",
            "Upstream metadata": "ok",
            "Authorization endpoint": "ok",
            "Client credential at the token endpoint": "ok",
            "Revocation endpoint": "ok",
            "Internal MCP server": "ok",
        }
        assert "https://proxy.example.test/oauth/crm/callback" in detail_of(check, "Callback URL")
        # The credential test exchanged a made-up code with the configured method (Basic), and the
        # authorization probe carried the client ID and callback, PKCE included.
        token_call = next(c for c in upstream.calls if c.request.url == f"{UPSTREAM}/token")
        assert token_call.request.headers["Authorization"].startswith("Basic ")
        assert parse_qs(token_call.request.body)["grant_type"] == ["authorization_code"]
        authorize_call = next(c for c in upstream.calls if c.request.url.startswith(f"{UPSTREAM}/authorize"))
        query = parse_qs(urlsplit(authorize_call.request.url).query)
        assert query["client_id"] == ["proxy-client"]
        assert query["redirect_uri"] == ["https://proxy.example.test/oauth/crm/callback"]
        assert query["code_challenge_method"] == ["S256"]

    def test_a_wrong_credential_is_told_apart_from_a_bad_code(self, healthy, upstream):
        upstream.replace(responses.POST, f"{UPSTREAM}/token", status=401, json={"error": "invalid_client"})
        check = server_connection_check(server=healthy)
        assert not check.ok
        assert statuses(check)["Client credential at the token endpoint"] == "error"
        assert "rejected the client credential" in detail_of(check, "Client credential at the token endpoint")
        assert check.summary == "1 problem(s), 0 warning(s)"

    def test_github_style_answers(self, healthy, upstream):
        upstream.replace(responses.POST, f"{UPSTREAM}/token", status=200, json={"error": "bad_verification_code"})
        assert statuses(server_connection_check(server=healthy))["Client credential at the token endpoint"] == "ok"
        upstream.replace(responses.POST, f"{UPSTREAM}/token", status=200,
                         json={"error": "incorrect_client_credentials"})
        assert statuses(server_connection_check(server=healthy))["Client credential at the token endpoint"] == "error"

    def test_unreachable_token_endpoint(self, healthy, upstream):
        upstream.replace(responses.POST, f"{UPSTREAM}/token", status=503, body="down")
        check = server_connection_check(server=healthy)
        assert statuses(check)["Client credential at the token endpoint"] == "error"
        assert "HTTP 503" in detail_of(check, "Client credential at the token endpoint")

    def test_metadata_inconsistencies_are_reported(self, healthy, upstream):
        upstream.replace(responses.GET, f"{UPSTREAM}/.well-known/oauth-authorization-server", json=oidc_metadata(
            authorization_endpoint=f"{UPSTREAM}/authorize", token_endpoint=f"{UPSTREAM}/v2/token",
            token_endpoint_auth_methods_supported=["client_secret_post"], code_challenge_methods_supported=["plain"],
            scopes_supported=["openid", "email"], grant_types_supported=["authorization_code"],
        ))
        check = server_connection_check(server=healthy)
        found = statuses(check)
        assert found["Metadata: token_endpoint"] == "warning"
        assert f"{UPSTREAM}/v2/token" in detail_of(check, "Metadata: token_endpoint")
        assert found["Metadata: auth method"] == "error"
        assert "client_secret_basic" in detail_of(check, "Metadata: auth method")
        assert found["Metadata: PKCE"] == "warning"
        assert "offline_access" in detail_of(check, "Metadata: scopes")
        assert found["Metadata: refresh tokens"] == "warning"

    def test_authorization_endpoint_sending_the_user_straight_back_with_an_error(self, healthy, upstream):
        upstream.replace(responses.GET, f"{UPSTREAM}/authorize", status=302, headers={
            "Location": "https://proxy.example.test/oauth/crm/callback?error=invalid_scope&state=x"})
        check = server_connection_check(server=healthy)
        assert statuses(check)["Authorization endpoint"] == "error"
        assert "error=invalid_scope" in detail_of(check, "Authorization endpoint")

    def test_authorization_endpoint_refusing_the_request_hints_at_the_callback(self, healthy, upstream):
        upstream.replace(responses.GET, f"{UPSTREAM}/authorize", status=400, body="invalid redirect_uri")
        check = server_connection_check(server=healthy)
        assert statuses(check)["Authorization endpoint"] == "warning"
        assert "callback URL https://proxy.example.test/oauth/crm/callback" in detail_of(check,
                                                                                         "Authorization endpoint")

    def test_without_issuer_the_metadata_check_is_skipped_and_nothing_reachable_is_an_error(self, server, upstream):
        check = server_connection_check(server=server)
        found = statuses(check)
        assert found["Upstream metadata"] == "skipped"
        assert found["Authorization endpoint"] == "error"
        assert found["Client credential at the token endpoint"] == "error"
        assert found["Internal MCP server"] == "warning"  # not the upstream: a warning only

    def test_the_secret_never_appears_in_the_results(self, healthy, upstream):
        check = server_connection_check(server=healthy)
        text = " ".join(f"{r.name} {r.detail}" for r in check.results)
        assert SECRET not in text
        assert base64.b64encode(f"proxy-client:{SECRET}".encode()).decode() not in text
