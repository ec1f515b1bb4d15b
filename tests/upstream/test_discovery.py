"""Upstream discovery and audited server saves, against mocked upstreams (the connection check: test_check.py)."""


import pytest
from django.core.exceptions import ValidationError

from oauthproxy.core.http import UNRESTRICTED
from oauthproxy.models import AuditEvent, McpServer
from oauthproxy.upstream.discovery import (
    DiscoveryError,
    issuer_metadata_urls,
    server_discovery_apply,
    upstream_discover,
)
from tests.conftest import UPSTREAM
from tests.factories import oidc_metadata

SECRET = "upstream-secret-value-123"


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
