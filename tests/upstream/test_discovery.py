"""Upstream discovery, the connection check and audited server saves, against mocked upstreams."""

import base64
import json
from urllib.parse import parse_qs, urlsplit

import pytest
import responses
from django.contrib.auth.models import Group, User
from django.core.exceptions import ValidationError

from oauthproxy.console.servers import server_delete, server_save
from oauthproxy.core.http import UNRESTRICTED
from oauthproxy.models import AuditEvent, McpServer, UpstreamSession
from oauthproxy.upstream.check import server_connection_check
from oauthproxy.upstream.discovery import (
    DiscoveryError,
    issuer_metadata_urls,
    server_discovery_apply,
    upstream_discover,
)
from tests.conftest import UPSTREAM
from tests.factories import make_client, make_upstream_session

SECRET = "upstream-secret-value-123"


def oidc_metadata(issuer: str = UPSTREAM, **overrides) -> dict:
    document = {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/auth",
        "token_endpoint": f"{issuer}/oauth/token",
        "revocation_endpoint": f"{issuer}/oauth/revoke",
        "userinfo_endpoint": f"{issuer}/userinfo",
        "jwks_uri": f"{issuer}/jwks",
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_post", "client_secret_basic"],
        "code_challenge_methods_supported": ["plain", "S256"],
        "scopes_supported": ["openid", "profile", "email", "offline_access", "groups", "api:read"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "response_types_supported": ["code"],
    }
    document.update(overrides)
    return {k: v for k, v in document.items() if v is not None}


@pytest.fixture
def operator(db):
    return User.objects.create_superuser("ops", password="pw")


class TestMetadataLocations:
    def test_issuer_without_path(self):
        assert issuer_metadata_urls("https://idp.example.com") == [
            "https://idp.example.com/.well-known/oauth-authorization-server",
            "https://idp.example.com/.well-known/openid-configuration",
        ]

    def test_issuer_with_path_uses_path_insertion_first(self):
        assert issuer_metadata_urls("https://idp.example.com/realms/acme/") == [
            "https://idp.example.com/.well-known/oauth-authorization-server/realms/acme",
            "https://idp.example.com/.well-known/openid-configuration/realms/acme",
            "https://idp.example.com/realms/acme/.well-known/openid-configuration",
        ]


@pytest.mark.django_db
class TestDiscover:
    def test_fills_endpoints_methods_pkce_and_scopes_from_oidc_metadata(self, upstream):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", status=404)
        upstream.get(f"{UPSTREAM}/.well-known/openid-configuration", json=oidc_metadata())
        result = upstream_discover(issuer=UPSTREAM, policy=UNRESTRICTED)
        assert result.metadata_url == f"{UPSTREAM}/.well-known/openid-configuration"
        assert result.values == {
            "issuer": UPSTREAM,
            "authorization_endpoint": f"{UPSTREAM}/auth",
            "token_endpoint": f"{UPSTREAM}/oauth/token",
            "revocation_endpoint": f"{UPSTREAM}/oauth/revoke",
            "userinfo_endpoint": f"{UPSTREAM}/userinfo",
            # The proxy's own preference, among what the upstream supports (private_key_jwt is not ours).
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "use_pkce": True,
            "scopes": ["openid", "email", "profile", "offline_access"],
        }
        assert result.scopes_supported[-1] == "api:read"
        assert result.code_challenge_methods_supported == ["plain", "S256"]
        assert result.notes == []

    def test_rfc8414_path_insertion_for_an_issuer_with_a_path(self, upstream):
        issuer = f"{UPSTREAM}/realms/acme"
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server/realms/acme",
                     json=oidc_metadata(issuer, scopes_supported=None))
        result = upstream_discover(issuer=issuer, policy=UNRESTRICTED)
        assert result.values["token_endpoint"] == f"{issuer}/oauth/token"
        assert "scopes" not in result.values

    def test_issuer_mismatch_is_refused(self, upstream):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server",
                     json=oidc_metadata("https://evil.example.com"))
        with pytest.raises(DiscoveryError, match="names the issuer 'https://evil.example.com'"):
            upstream_discover(issuer=UPSTREAM, policy=UNRESTRICTED)

    def test_trailing_slash_difference_takes_the_upstreams_spelling(self, upstream):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", json=oidc_metadata(UPSTREAM + "/"))
        assert upstream_discover(issuer=UPSTREAM, policy=UNRESTRICTED).values["issuer"] == UPSTREAM + "/"

    def test_missing_token_endpoint_is_refused(self, upstream):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", json=oidc_metadata(token_endpoint=None))
        with pytest.raises(DiscoveryError, match="no token_endpoint"):
            upstream_discover(issuer=UPSTREAM, policy=UNRESTRICTED)

    def test_nothing_found_lists_every_url_tried_and_why(self, upstream):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", body="<html>", status=200)
        # the OIDC URL is not mocked: a connection error
        with pytest.raises(DiscoveryError) as info:
            upstream_discover(issuer=UPSTREAM, policy=UNRESTRICTED)
        assert "oauth-authorization-server: not JSON" in info.value.reason
        assert "openid-configuration: cannot connect to idp.example.com" in info.value.reason

    @pytest.mark.parametrize("issuer", ["http://idp.example.com", "ftp://idp.example.com", "not a url", "",
                                        "https://idp.example.com/?tenant=1"])
    def test_unacceptable_issuers_are_refused_without_a_request(self, upstream, issuer):
        with pytest.raises(DiscoveryError):
            upstream_discover(issuer=issuer, policy=UNRESTRICTED)
        assert len(upstream.calls) == 0

    def test_upstream_without_pkce_or_refresh_or_our_auth_methods(self, upstream):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", json=oidc_metadata(
            code_challenge_methods_supported=None, revocation_endpoint=None,
            token_endpoint_auth_methods_supported=["private_key_jwt"], grant_types_supported=["authorization_code"],
        ))
        result = upstream_discover(issuer=UPSTREAM, policy=UNRESTRICTED)
        assert "use_pkce" not in result.values
        assert "token_endpoint_auth_methods_supported" not in result.values
        notes = " ".join(result.notes)
        assert "does not advertise PKCE" in notes
        assert "supports none of the proxy's client authentication methods" in notes
        assert "refresh_token grant" in notes
        assert "No revocation endpoint" in notes

    def test_public_upstream_client_gets_none_and_s256_less_upstream_turns_pkce_off(self, upstream):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", json=oidc_metadata(
            token_endpoint_auth_methods_supported=["none"], code_challenge_methods_supported=["plain"]))
        result = upstream_discover(issuer=UPSTREAM, policy=UNRESTRICTED)
        assert result.values["token_endpoint_auth_methods_supported"] == ["none"]
        assert result.values["use_pkce"] is False


@pytest.mark.django_db
class TestApplyAndSave:
    def test_apply_changes_the_server_and_audits_old_and_new_values(self, upstream, server, operator):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", json=oidc_metadata())
        result = upstream_discover(issuer=UPSTREAM, policy=UNRESTRICTED)
        changed = server_discovery_apply(server=server, result=result, actor=operator)
        server.refresh_from_db()
        assert server.token_endpoint == f"{UPSTREAM}/oauth/token"
        assert server.scopes == ["openid", "email", "offline_access"]  # chosen scopes are kept
        assert set(changed) == {"issuer", "authorization_endpoint", "token_endpoint", "revocation_endpoint",
                                "userinfo_endpoint", "token_endpoint_auth_methods_supported"}
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.ADMIN_CHANGE)
        assert event.actor == operator and event.server == server
        assert event.message.startswith("discovery applied: server crm: ")
        assert event.detail["changes"]["token_endpoint"] == {"from": f"{UPSTREAM}/token",
                                                             "to": f"{UPSTREAM}/oauth/token"}

    def test_apply_chosen_fields_only(self, upstream, server, operator):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server", json=oidc_metadata())
        result = upstream_discover(issuer=UPSTREAM, policy=UNRESTRICTED)
        assert server_discovery_apply(server=server, result=result, actor=operator, fields=["scopes"]) == ["scopes"]
        server.refresh_from_db()
        assert server.scopes == ["openid", "email", "profile", "offline_access"]
        assert server.token_endpoint == f"{UPSTREAM}/token"

    def test_apply_refuses_what_the_server_cannot_use_and_saves_nothing(self, upstream, server, operator):
        upstream.get(f"{UPSTREAM}/.well-known/oauth-authorization-server",
                     json=oidc_metadata(token_endpoint="http://idp.example.com/token"))
        result = upstream_discover(issuer=UPSTREAM, policy=UNRESTRICTED)
        with pytest.raises(ValidationError) as info:
            server_discovery_apply(server=server, result=result, actor=operator)
        assert "token_endpoint" in info.value.message_dict
        assert McpServer.objects.get(pk=server.pk).token_endpoint == f"{UPSTREAM}/token"
        assert not AuditEvent.objects.exists()

    def test_secret_changes_are_audited_without_the_secret(self, server, operator):
        server.client_secret = "a-brand-new-secret-456"
        server.name = "CRM 2"
        assert server_save(server=server, actor=operator) == ["name", "client_secret"]
        event = AuditEvent.objects.get()
        assert event.message == "server crm: name, client_secret changed"
        assert event.detail["changes"]["client_secret"] == "changed"
        text = json.dumps(event.detail) + event.message
        assert "a-brand-new-secret-456" not in text and SECRET not in text

    def test_team_changes_name_the_team_and_no_change_records_nothing(self, server, operator):
        server.team = Group.objects.create(name="team-a")
        server_save(server=server, actor=operator)
        assert AuditEvent.objects.get().detail["changes"]["team"] == {"from": None, "to": "team-a"}
        assert server_save(server=server, actor=operator) == []
        assert AuditEvent.objects.count() == 1

    def test_creation_is_audited(self, operator, db):
        server = McpServer(slug="new", name="New", authorization_endpoint=f"{UPSTREAM}/a",
                           token_endpoint=f"{UPSTREAM}/t", client_id="c", client_secret="s3cr3t-value")
        server.full_clean()
        server_save(server=server, actor=operator)
        event = AuditEvent.objects.get()
        assert (event.kind, event.message, event.detail["action"]) == ("admin.change", "server new created",
                                                                      "created")
        assert "s3cr3t-value" not in json.dumps(event.detail)

    def test_delete_revokes_sessions_first(self, server, operator, upstream):
        session = make_upstream_session(server, make_client(server))
        assert server_delete(server=server, actor=operator) == 1
        assert not McpServer.objects.exists() and not UpstreamSession.objects.filter(pk=session.pk).exists()
        kinds = sorted(AuditEvent.objects.values_list("kind", flat=True))
        assert kinds == ["admin.change", "session.revoked"]
        assert AuditEvent.objects.get(kind="admin.change").detail["slug"] == "crm"


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
