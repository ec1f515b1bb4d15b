"""Claude: claude.ai and Claude Desktop (hosted: redirect ``https://claude.ai/api/mcp/auth_callback``, DCR with
``client_secret_post`` or its hosted metadata document, scope values of its own: ``claudeai``, ``mcp``,
``read write``), and Claude Code (metadata document ``https://claude.ai/oauth/claude-code-client-metadata``,
public, loopback redirect ``http://localhost:<port>/callback``; falls back to DCR).
"""

import pytest
import responses

from oauthproxy.models import Client
from tests.authserver.clients import connect, consent_page, register, serve_document
from tests.factories import basic_auth

CLAUDE_REDIRECT = "https://claude.ai/api/mcp/auth_callback"
CLAUDE_CODE_ID = "https://claude.ai/oauth/claude-code-client-metadata"


def claude_ai_registration() -> dict:
    return {
        "client_name": "Claude",
        "redirect_uris": [CLAUDE_REDIRECT],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "client_secret_post",
        "scope": "claudeai",
    }


@pytest.mark.django_db
class TestClaudeAi:
    @pytest.mark.parametrize("scope", ["claudeai", "mcp", "read write", "openid claudeai"])
    def test_its_own_scopes_are_dropped_not_refused(self, client, server, scope):
        registered = register(client, server, claude_ai_registration())
        result = connect(client, server, registered["client_id"], redirect_uri=CLAUDE_REDIRECT, scope=scope,
                         resource=server.resource_url,
                         token_auth={"client_id": registered["client_id"],
                                     "client_secret": registered["client_secret"]})
        offered = set(server.scopes)
        granted = set(result["tokens"]["scope"].split())
        assert granted <= offered  # the issued scope says what was granted
        assert granted == ({"openid"} if scope == "openid claudeai" else offered)
        assert set(result["refreshed"]["scope"].split()) == granted

    def test_consent_shows_known_client_and_what_will_be_granted(self, client, server):
        registered = register(client, server, claude_ai_registration())
        row = Client.objects.get(client_id=registered["client_id"])
        page = consent_page(client, server, row, redirect_uri=CLAUDE_REDIRECT, scope="openid claudeai")
        assert "Known: Claude (claude.ai, Claude Desktop) (by redirect URI)" in page
        assert "<code>openid</code>" in page or "Confirm who you are" in page
        assert "claudeai" not in page  # the dropped scope is not offered on the page

    def test_a_strict_server_refuses_its_scopes(self, client, server):
        server.strict_scopes = True
        server.save()
        registered = register(client, server, claude_ai_registration())
        row = Client.objects.get(client_id=registered["client_id"])
        from tests.flows.helpers import authorize

        response = authorize(client, server, row, redirect_uri=CLAUDE_REDIRECT, scope="claudeai")
        assert response.status_code == 302 and "error=invalid_scope" in response["Location"]

    def test_preregistered_client_typed_into_advanced_settings(self, client, server):
        from oauthproxy.authserver.registration import client_preregister

        registration = client_preregister(server=server, name="Claude (team)", redirect_uris=[CLAUDE_REDIRECT],
                                          confidential=True)
        client_id, secret = registration.client.client_id, registration.client_secret
        result = connect(client, server, client_id, redirect_uri=CLAUDE_REDIRECT, scope="claudeai",
                         token_auth={"client_id": client_id, "client_secret": secret})
        assert result["tokens"]["access_token"]
        connect(client, server, client_id, redirect_uri=CLAUDE_REDIRECT, token_auth={},
                basic=basic_auth(client_id, secret))  # either way of sending the secret


@pytest.mark.django_db
class TestClaudeCode:
    def document(self) -> dict:
        return {
            "client_id": CLAUDE_CODE_ID,
            "client_name": "Claude Code",
            "client_uri": "https://claude.ai",
            "redirect_uris": ["http://localhost/callback", "http://127.0.0.1/callback"],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }

    def test_metadata_document_sequence(self, client, server):
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            serve_document(mock, self.document())
            from oauthproxy.authserver.cimd import client_resolve

            row = client_resolve(server=server, client_id=CLAUDE_CODE_ID)
            page = consent_page(client, server, row, redirect_uri="http://localhost:53682/callback")
            assert "Known: Claude Code (by metadata document)" in page
            connect(client, server, CLAUDE_CODE_ID, redirect_uri="http://localhost:53682/callback",
                    resource=server.resource_url)

    def test_dcr_fallback(self, client, server):
        registered = register(client, server, {
            "client_name": "Claude Code (crm)", "redirect_uris": ["http://localhost:53682/callback"],
            "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        })
        connect(client, server, registered["client_id"], redirect_uri="http://localhost:53682/callback")
