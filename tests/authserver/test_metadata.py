from urllib.parse import urlsplit

import pytest

BASE = "https://proxy.example.test"
AS_METADATA_PATHS = ["/.well-known/oauth-authorization-server/oauth/{slug}"]
OPENID_PATHS = [
    "/.well-known/openid-configuration/oauth/{slug}",
    "/oauth/{slug}/.well-known/openid-configuration",
]
PRM_PATH = "/.well-known/oauth-protected-resource/mcp/{slug}"
ALL_PATHS = [*AS_METADATA_PATHS, PRM_PATH]


def rfc8414_metadata_path(issuer: str) -> str:
    """RFC 8414 §3.1: insert the well-known segment between the host and the issuer's path."""
    return "/.well-known/oauth-authorization-server" + urlsplit(issuer).path


@pytest.mark.django_db
class TestAuthorizationServerMetadata:
    @pytest.mark.parametrize("path", AS_METADATA_PATHS)
    def test_document(self, client, server, path):
        response = client.get(path.format(slug=server.slug))
        assert response.status_code == 200
        assert response["Content-Type"] == "application/json"
        doc = response.json()
        issuer = f"{BASE}/oauth/crm"
        assert doc["issuer"] == issuer == server.issuer_url
        assert doc["authorization_endpoint"] == f"{issuer}/authorize"
        assert doc["token_endpoint"] == f"{issuer}/token"
        assert doc["registration_endpoint"] == f"{issuer}/register"
        assert doc["revocation_endpoint"] == f"{issuer}/revoke"
        assert doc["introspection_endpoint"] == f"{issuer}/introspect"
        assert doc["response_types_supported"] == ["code"]
        assert doc["response_modes_supported"] == ["query"]
        assert doc["grant_types_supported"] == ["authorization_code", "refresh_token"]
        assert doc["code_challenge_methods_supported"] == ["S256"]
        assert doc["token_endpoint_auth_methods_supported"] == [
            "none", "client_secret_basic", "client_secret_post", "private_key_jwt"
        ]
        assert "RS256" in doc["token_endpoint_auth_signing_alg_values_supported"]
        assert not {"none", "HS256"} & set(doc["token_endpoint_auth_signing_alg_values_supported"])
        assert "none" in doc["revocation_endpoint_auth_methods_supported"]
        assert doc["introspection_endpoint_auth_methods_supported"] == ["client_secret_basic", "client_secret_post"]
        assert doc["scopes_supported"] == ["openid", "email", "offline_access"]
        assert doc["client_id_metadata_document_supported"] is True
        assert doc["authorization_response_iss_parameter_supported"] is True
        assert doc["protected_resources"] == [f"{BASE}/mcp/crm"]

    def test_issuer_is_the_server_issuer_byte_for_byte(self, client, server):
        assert client.get(AS_METADATA_PATHS[0].format(slug="crm")).json()["issuer"] == server.issuer_url


@pytest.mark.django_db
class TestOpenIdLocations:
    """The proxy issues no ID tokens: the OpenID locations answer 404 rather than a partial OpenID
    Provider document, and RFC 8414 stays the source of truth (what MCP clients fall back to)."""

    @pytest.mark.parametrize("path", OPENID_PATHS)
    def test_openid_configuration_is_not_served(self, client, server, path):
        response = client.get(path.format(slug=server.slug))
        assert response.status_code == 404
        assert response.json()["error"] == "not_found"
        assert "oauth-authorization-server" in response.json()["error_description"]
        assert "jwks_uri" not in response.content.decode()

    @pytest.mark.parametrize("path", OPENID_PATHS)
    def test_also_for_unknown_servers(self, client, server, path):
        assert client.get(path.format(slug="nope")).status_code == 404

    def test_rfc8414_document_is_still_served(self, client, server):
        doc = client.get(AS_METADATA_PATHS[0].format(slug=server.slug)).json()
        assert doc["issuer"] == server.issuer_url
        assert "id_token_signing_alg_values_supported" not in doc

    def test_reachable_where_rfc8414_says_for_its_issuer(self, client, server):
        response = client.get(rfc8414_metadata_path(server.issuer_url))
        assert response.json()["issuer"] == server.issuer_url

    def test_each_server_has_its_own_issuer(self, client, server, server_factory):
        server_factory(slug="billing", name="Billing", scopes=["billing:read"])
        doc = client.get("/.well-known/oauth-authorization-server/oauth/billing").json()
        assert doc["issuer"] == f"{BASE}/oauth/billing"
        assert doc["token_endpoint"] == f"{BASE}/oauth/billing/token"
        assert doc["scopes_supported"] == ["billing:read"]

    def test_plain_json_even_for_a_browser(self, client, server):
        response = client.get("/.well-known/oauth-authorization-server/oauth/crm", HTTP_ACCEPT="text/html")
        assert response.status_code == 200
        assert response.json()["issuer"] == server.issuer_url


@pytest.mark.django_db
class TestProtectedResourceMetadata:
    def test_document(self, client, server):
        response = client.get(PRM_PATH.format(slug="crm"))
        assert response.status_code == 200
        assert response.json() == {
            "resource": f"{BASE}/mcp/crm",
            "authorization_servers": [f"{BASE}/oauth/crm"],
            "scopes_supported": ["openid", "email", "offline_access"],
            "bearer_methods_supported": ["header"],
            "resource_name": "CRM tools",
        }

    def test_matches_the_server_urls(self, client, server):
        doc = client.get(urlsplit(server.resource_metadata_url).path).json()
        assert doc["resource"] == server.resource_url
        assert doc["authorization_servers"] == [server.issuer_url]

    def test_the_authorization_server_it_names_can_be_discovered(self, client, server):
        issuer = client.get(PRM_PATH.format(slug="crm")).json()["authorization_servers"][0]
        assert client.get(rfc8414_metadata_path(issuer)).json()["issuer"] == issuer


@pytest.mark.django_db
class TestHeaders:
    @pytest.mark.parametrize("path", ALL_PATHS)
    def test_cacheable_and_cors_open(self, client, server, path):
        response = client.get(path.format(slug="crm"), HTTP_ORIGIN="https://inspector.example")
        assert response["Cache-Control"] == "public, max-age=300"
        assert response["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in response

    @pytest.mark.parametrize("path", ALL_PATHS)
    def test_cors_preflight_allows_the_mcp_protocol_header(self, client, server, path):
        response = client.options(
            path.format(slug="crm"),
            HTTP_ORIGIN="https://inspector.example",
            HTTP_ACCESS_CONTROL_REQUEST_METHOD="GET",
            HTTP_ACCESS_CONTROL_REQUEST_HEADERS="mcp-protocol-version",
        )
        assert response.status_code == 204
        assert response["Access-Control-Allow-Origin"] == "*"
        assert "GET" in response["Access-Control-Allow-Methods"]
        assert "MCP-Protocol-Version" in response["Access-Control-Allow-Headers"]

    def test_other_methods_are_not_allowed(self, client, server):
        response = client.post("/.well-known/oauth-authorization-server/oauth/crm")
        assert response.status_code == 405


@pytest.mark.django_db
class TestUnknownServers:
    @pytest.mark.parametrize("path", ALL_PATHS)
    def test_unknown_slug_is_a_json_404(self, client, server, path):
        response = client.get(path.format(slug="nope"))
        assert response.status_code == 404
        assert response.json() == {"error": "not_found"}

    @pytest.mark.parametrize("path", ALL_PATHS)
    def test_disabled_server_is_a_json_404(self, client, server, path):
        server.enabled = False
        server.save()
        response = client.get(path.format(slug="crm"))
        assert response.status_code == 404
        assert response.json() == {"error": "not_found"}
        assert "max-age" not in response.get("Cache-Control", "")

    @pytest.mark.parametrize("slug", ["CRM", "crm%00", "crm%0A", "a" * 300, "..", "%F0%9F%92%A9"])
    def test_odd_slugs_are_a_json_404(self, client, server, slug):
        response = client.get(f"/.well-known/oauth-authorization-server/oauth/{slug}")
        assert response.status_code == 404
        assert response.json() == {"error": "not_found"}
