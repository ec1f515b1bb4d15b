"""Pre-registered clients and the per-server admission policy (any / known and pre-registered / pre-registered
only), enforced at registration, metadata-document resolution, authorize and token; and which registrations
expire."""

from datetime import timedelta

import pytest
import responses
from django.core.cache import cache
from django.utils import timezone

from oauthproxy.authserver.cimd import ClientMetadataDocumentError, client_resolve
from oauthproxy.authserver.registration import client_preregister, clients_expire_unused
from oauthproxy.core.exceptions import InvalidRedirectUri
from oauthproxy.models import Client, McpServer
from tests.authserver.clients import connect, register, serve_document
from tests.factories import issue_tokens, make_client, make_upstream_session, refresh
from tests.flows.helpers import authorize

KNOWN_REDIRECT = "https://claude.ai/api/mcp/auth_callback"
UNKNOWN_REDIRECT = "https://scripts.example.net/callback"


def body(redirect_uri: str) -> dict:
    return {"client_name": "x", "redirect_uris": [redirect_uri], "token_endpoint_auth_method": "none"}


def set_policy(server, policy):
    server.client_admission = policy
    server.save()


@pytest.mark.django_db
class TestPreregistered:
    def test_secret_shown_once_and_hashed_at_rest(self, server):
        registration = client_preregister(server=server, name="Cursor", redirect_uris=[KNOWN_REDIRECT],
                                          confidential=True)
        row = Client.objects.get(pk=registration.client.pk)
        assert row.registration_source == Client.RegistrationSource.MANUAL
        assert registration.client_secret and registration.client_secret not in row.client_secret
        assert row.client_secret.startswith(("pbkdf2", "argon2", "bcrypt", "scrypt"))

    def test_public_preregistered_client_completes_the_flow(self, client, server):
        registration = client_preregister(server=server, name="Gemini CLI",
                                          redirect_uris=["http://localhost:7777/oauth/callback"], confidential=False)
        assert registration.client_secret is None
        connect(client, server, registration.client.client_id, redirect_uri="http://localhost:7777/oauth/callback")

    def test_bad_redirect_uris_are_refused(self, server):
        with pytest.raises(InvalidRedirectUri, match="javascript"):
            client_preregister(server=server, name="x", redirect_uris=["javascript:alert(1)"], confidential=True)

    def test_never_expired_for_disuse(self, server):
        registration = client_preregister(server=server, name="x", redirect_uris=[KNOWN_REDIRECT], confidential=False)
        Client.objects.filter(pk=registration.client.pk).update(created=timezone.now() - timedelta(days=365))
        clients_expire_unused(older_than_seconds=1)
        assert Client.objects.filter(pk=registration.client.pk).exists()


@pytest.mark.django_db
class TestExpiry:
    def test_registrations_with_live_grants_are_kept_unused_ones_expire(self, server):
        old = timezone.now() - timedelta(days=30)
        make_client(server, name="unused")
        with_grant = make_client(server, name="with grant")
        make_upstream_session(server, with_grant)
        Client.objects.update(created=old)
        clients_expire_unused(older_than_seconds=60)
        assert list(Client.objects.values_list("name", flat=True)) == ["with grant"]


@pytest.mark.django_db
class TestAdmission:
    def test_any_client_by_default(self, client, server):
        assert server.client_admission == McpServer.ClientAdmission.ANY
        register(client, server, body(UNKNOWN_REDIRECT))

    def test_known_only_at_registration(self, client, server):
        set_policy(server, McpServer.ClientAdmission.KNOWN)
        register(client, server, body(KNOWN_REDIRECT))
        response = client.post(f"/oauth/{server.slug}/register", data=body(UNKNOWN_REDIRECT),
                               content_type="application/json")
        assert response.status_code == 400 and "known MCP clients" in response.json()["error_description"]

    def test_preregistered_only_refuses_registration_and_documents(self, client, server):
        set_policy(server, McpServer.ClientAdmission.PREREGISTERED)
        response = client.post(f"/oauth/{server.slug}/register", data=body(KNOWN_REDIRECT),
                               content_type="application/json")
        assert response.status_code == 400
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            with pytest.raises(ClientMetadataDocumentError, match="pre-registered"):
                client_resolve(server=server, client_id="https://claude.ai/oauth/claude-code-client-metadata")
            assert not mock.calls  # nothing fetched

    def test_known_only_at_metadata_documents(self, server):
        set_policy(server, McpServer.ClientAdmission.KNOWN)
        url = "https://tools.example.net/client.json"
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            serve_document(mock, {"client_id": url, "client_name": "x", "redirect_uris": [UNKNOWN_REDIRECT]})
            with pytest.raises(ClientMetadataDocumentError, match="known MCP clients"):
                client_resolve(server=server, client_id=url)

    def test_policy_tightened_later_applies_at_authorize_and_token(self, client, server):
        unknown = make_client(server, redirect_uris=[UNKNOWN_REDIRECT])
        tokens = issue_tokens(client, server, unknown)
        set_policy(server, McpServer.ClientAdmission.KNOWN)
        cache.clear()
        response = authorize(client, server, unknown, redirect_uri=UNKNOWN_REDIRECT)
        assert response.status_code == 400 and b"admits only" in response.content
        assert refresh(client, server, unknown, tokens["refresh_token"]).status_code == 401

    def test_preregistered_clients_are_admitted_under_every_policy(self, client, server):
        set_policy(server, McpServer.ClientAdmission.PREREGISTERED)
        registration = client_preregister(server=server, name="x", redirect_uris=[UNKNOWN_REDIRECT],
                                          confidential=True)
        cid, secret = registration.client.client_id, registration.client_secret
        connect(client, server, cid, redirect_uri=UNKNOWN_REDIRECT, token_auth={"client_id": cid,
                                                                                "client_secret": secret})
