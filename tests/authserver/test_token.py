"""POST /oauth/<slug>/token: the authorization_code and refresh_token grants (RFC 6749, RFC 7636, RFC 8707).

Codes, clients and upstream sessions are made directly in the database (tests/factories.py); the upstream
identity provider is mocked at the HTTP boundary only (``responses``).
"""

import hashlib
import json
import time
from datetime import timedelta

import pytest
import responses
from django.test import Client as HttpClient
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oauthproxy.models import AccessToken, AuditEvent, Client, Grant, RefreshToken, UpstreamSession
from tests.conftest import UPSTREAM, make_server
from tests.factories import (
    DEFAULT_CODE_VERIFIER,
    DEFAULT_REDIRECT_URI,
    basic_auth,
    form_post,
    issue_tokens,
    make_client,
    make_code,
    make_upstream_session,
    redeem_code,
    refresh,
    run_in_threads,
    token_post,
)

TOKEN_URL = f"{UPSTREAM}/token"


def checksum(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def access_token_row(raw: str) -> AccessToken | None:
    return AccessToken.objects.filter(token_checksum=checksum(raw)).first()


def refresh_token_row(raw: str) -> RefreshToken | None:
    return RefreshToken.objects.filter(token_checksum=checksum(raw)).first()


def assert_error(response, status: int, error: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert body["error"] == error, body
    return body


@pytest.fixture
def http(client):
    return client


@pytest.fixture
def mcp_client(server):
    return make_client(server)


def upstream_token_calls(mock) -> int:
    return sum(1 for call in mock.calls if call.request.url == TOKEN_URL)


# -- authorization_code ---------------------------------------------------------------------------


@pytest.mark.django_db
class TestAuthorizationCode:
    def test_code_is_exchanged_for_proxy_tokens(self, http, server, mcp_client, upstream):
        session = make_upstream_session(server, mcp_client, access_token="upstream-access-1",
                                        refresh_token="upstream-refresh-1")
        code = make_code(session, mcp_client, scope="openid email")
        response = redeem_code(http, server, mcp_client, code)

        assert response.status_code == 200, response.content
        assert response["Cache-Control"] == "no-store"
        assert response["Pragma"] == "no-cache"
        assert response["Content-Type"] == "application/json"
        body = response.json()
        assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token", "scope"}
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == server.effective_access_token_lifetime
        assert body["scope"] == "openid email"
        assert "upstream" not in response.content.decode()
        assert len(upstream.calls) == 0  # the upstream is not involved

        access = access_token_row(body["access_token"])
        assert access.token == ""  # stored as a checksum only
        assert access.resource == [server.resource_url]
        assert access.upstream_session == session
        assert access.application == mcp_client
        assert abs((access.expires - timezone.now()).total_seconds() - 3600) < 10
        refresh_row = refresh_token_row(body["refresh_token"])
        assert refresh_row.token == "" and refresh_row.revoked is None
        assert refresh_row.access_token == access
        assert refresh_row.upstream_session == session
        assert refresh_row.token_family is not None
        assert Grant.objects.get(upstream_session=session).redeemed_at is not None

        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.TOKEN_ISSUED, client=mcp_client).count() == 1
        event = AuditEvent.objects.get(kind=AuditEvent.Kind.TOKEN_ISSUED)
        assert body["access_token"] not in json.dumps(event.detail) + event.message
        mcp_client.refresh_from_db()
        session.refresh_from_db()
        assert mcp_client.last_used is not None and session.last_used is not None

    def test_access_token_lifetime_is_per_server(self, http, db):
        server = make_server(slug="short", access_token_lifetime=120)
        tokens = issue_tokens(http, server, make_client(server))
        assert tokens["expires_in"] == 120

    def test_each_code_starts_its_own_refresh_family(self, http, server, mcp_client):
        first = issue_tokens(http, server, mcp_client)
        second = issue_tokens(http, server, mcp_client)
        assert refresh_token_row(first["refresh_token"]).token_family != refresh_token_row(
            second["refresh_token"]
        ).token_family

    @pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
    def test_confidential_client_authenticates_as_registered(self, http, server, auth_method):
        client = make_client(server, public=False, auth_method=auth_method)
        assert issue_tokens(http, server, client)["access_token"]

    def test_confidential_client_using_another_method_is_refused(self, http, server):
        client = make_client(server, public=False, auth_method="client_secret_basic")
        code = make_code(make_upstream_session(server, client), client)
        response = form_post(http, f"/oauth/{server.slug}/token", {
            "grant_type": "authorization_code", "code": code, "redirect_uri": DEFAULT_REDIRECT_URI,
            "code_verifier": DEFAULT_CODE_VERIFIER, "client_id": client.client_id,
            "client_secret": client.plain_client_secret,
        })
        assert_error(response, 401, "invalid_client")
        # The code was not consumed by the failed attempt.
        assert redeem_code(http, server, client, code).status_code == 200

    def test_wrong_client_secret_is_invalid_client_with_basic_challenge(self, http, server):
        client = make_client(server, public=False)
        code = make_code(make_upstream_session(server, client), client)
        response = form_post(
            http, f"/oauth/{server.slug}/token",
            {"grant_type": "authorization_code", "code": code, "redirect_uri": DEFAULT_REDIRECT_URI,
             "code_verifier": DEFAULT_CODE_VERIFIER},
            HTTP_AUTHORIZATION=basic_auth(client.client_id, "not-the-secret"),
        )
        assert_error(response, 401, "invalid_client")
        assert response["WWW-Authenticate"].startswith("Basic realm=")

    def test_confidential_client_without_secret_is_invalid_client(self, http, server):
        client = make_client(server, public=False)
        code = make_code(make_upstream_session(server, client), client)
        response = form_post(http, f"/oauth/{server.slug}/token", {
            "grant_type": "authorization_code", "code": code, "redirect_uri": DEFAULT_REDIRECT_URI,
            "code_verifier": DEFAULT_CODE_VERIFIER, "client_id": client.client_id,
        })
        assert_error(response, 401, "invalid_client")

    def test_public_client_may_send_its_id_in_basic_without_secret(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        response = form_post(
            http, f"/oauth/{server.slug}/token",
            {"grant_type": "authorization_code", "code": code, "redirect_uri": DEFAULT_REDIRECT_URI,
             "code_verifier": DEFAULT_CODE_VERIFIER},
            HTTP_AUTHORIZATION=basic_auth(mcp_client.client_id, ""),
        )
        assert response.status_code == 200, response.content

    def test_unknown_client_is_invalid_client_so_it_registers_again(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        response = form_post(http, f"/oauth/{server.slug}/token", {
            "grant_type": "authorization_code", "code": code, "redirect_uri": DEFAULT_REDIRECT_URI,
            "code_verifier": DEFAULT_CODE_VERIFIER, "client_id": "never-registered",
        })
        assert_error(response, 401, "invalid_client")

    def test_missing_client_id_is_invalid_client(self, http, server):
        response = form_post(http, f"/oauth/{server.slug}/token", {
            "grant_type": "authorization_code", "code": "x", "redirect_uri": DEFAULT_REDIRECT_URI,
            "code_verifier": DEFAULT_CODE_VERIFIER,
        })
        assert_error(response, 401, "invalid_client")

    def test_disabled_client_is_invalid_client(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        mcp_client.disabled = True
        mcp_client.save()
        assert_error(redeem_code(http, server, mcp_client, code), 401, "invalid_client")

    def test_client_with_expired_secret_is_invalid_client(self, http, server):
        client = make_client(server, public=False, client_secret_expires_at=timezone.now() - timedelta(seconds=1))
        code = make_code(make_upstream_session(server, client), client)
        assert_error(redeem_code(http, server, client, code), 401, "invalid_client")

    def test_client_of_another_server_is_invalid_client(self, http, server, mcp_client, server_factory):
        other = server_factory(slug="other")
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        response = token_post(http, other, {
            "grant_type": "authorization_code", "code": code, "redirect_uri": DEFAULT_REDIRECT_URI,
            "code_verifier": DEFAULT_CODE_VERIFIER,
        }, client=mcp_client)
        assert_error(response, 401, "invalid_client")

    def test_client_id_metadata_document_client(self, http, server, server_factory):
        """A CIMD client (its URL is its client_id) known at two servers is two clients: each server's
        tokens are its own."""
        url = "https://app.example.com/oauth/client.json"
        fresh = {"registration_source": Client.RegistrationSource.CIMD,
                 "cimd_expires_at": timezone.now() + timedelta(hours=1), "client_id": url}
        here = make_client(server, **fresh)
        other_server = server_factory(slug="other")
        there = make_client(other_server, **fresh)
        tokens = issue_tokens(http, server, here)
        assert access_token_row(tokens["access_token"]).application == here
        assert_error(refresh(http, other_server, there, tokens["refresh_token"]), 400, "invalid_grant")
        assert refresh(http, server, here, tokens["refresh_token"]).status_code == 200

    def test_code_of_another_client_is_invalid_grant_and_stays_usable(self, http, server, mcp_client):
        thief = make_client(server)
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        assert_error(redeem_code(http, server, thief, code), 400, "invalid_grant")
        assert redeem_code(http, server, mcp_client, code).status_code == 200

    def test_unknown_code_is_invalid_grant(self, http, server, mcp_client):
        assert_error(redeem_code(http, server, mcp_client, "made-up-code"), 400, "invalid_grant")

    def test_code_is_looked_up_by_hash_not_by_its_stored_value(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        stored = Grant.objects.get().code
        assert stored == checksum(code)
        assert_error(redeem_code(http, server, mcp_client, stored), 400, "invalid_grant")

    def test_expired_code_is_invalid_grant(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client, expires_in=-1)
        body = assert_error(redeem_code(http, server, mcp_client, code), 400, "invalid_grant")
        assert "expired" in body["error_description"]

    def test_code_of_ended_session_is_invalid_grant(self, http, server, mcp_client):
        session = make_upstream_session(server, mcp_client)
        code = make_code(session, mcp_client)
        UpstreamSession.objects.filter(pk=session.pk).update(revoked_at=timezone.now())
        assert_error(redeem_code(http, server, mcp_client, code), 400, "invalid_grant")

    # PKCE (DESIGN §5.3)
    def test_missing_code_verifier_is_invalid_grant(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        response = token_post(http, server, {"grant_type": "authorization_code", "code": code,
                                             "redirect_uri": DEFAULT_REDIRECT_URI}, client=mcp_client)
        assert_error(response, 400, "invalid_grant")
        assert redeem_code(http, server, mcp_client, code).status_code == 200  # not consumed

    def test_wrong_code_verifier_is_invalid_grant(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        response = redeem_code(http, server, mcp_client, code, code_verifier="x" * 43)
        assert_error(response, 400, "invalid_grant")

    def test_malformed_code_verifier_is_invalid_grant(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client, code_verifier="short")
        assert_error(redeem_code(http, server, mcp_client, code, code_verifier="short"), 400, "invalid_grant")

    def test_plain_pkce_is_never_accepted(self, http, server, mcp_client):
        """Even a plain challenge that matches (stored by something else) is refused: no downgrade."""
        verifier = "p" * 43
        code = make_code(make_upstream_session(server, mcp_client), mcp_client, code_verifier=verifier,
                         code_challenge_method="plain")
        assert_error(redeem_code(http, server, mcp_client, code, code_verifier=verifier), 400, "invalid_grant")

    def test_verifier_for_another_code_is_invalid_grant(self, http, server, mcp_client):
        session = make_upstream_session(server, mcp_client)
        code = make_code(session, mcp_client, code_verifier="a" * 50)
        assert_error(redeem_code(http, server, mcp_client, code, code_verifier="b" * 50), 400, "invalid_grant")

    # redirect URI
    def test_redirect_uri_must_match_exactly(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        for other in ("http://127.0.0.1:33418/callback/", "http://127.0.0.1:33419/callback",
                      "http://localhost:33418/callback"):
            body = assert_error(redeem_code(http, server, mcp_client, code, redirect_uri=other), 400, "invalid_grant")
            assert "redirect_uri" in body["error_description"]
        assert redeem_code(http, server, mcp_client, code).status_code == 200

    def test_missing_redirect_uri_is_invalid_request(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        response = token_post(http, server, {"grant_type": "authorization_code", "code": code,
                                             "code_verifier": DEFAULT_CODE_VERIFIER}, client=mcp_client)
        assert_error(response, 400, "invalid_request")

    # resource (RFC 8707)
    def test_resource_of_this_server_is_accepted(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        response = redeem_code(http, server, mcp_client, code, resource=server.resource_url)
        assert response.status_code == 200
        assert access_token_row(response.json()["access_token"]).resource == [server.resource_url]

    @pytest.mark.parametrize("resource", [
        "https://proxy.example.test/mcp/other", "https://evil.example/mcp/crm", "not a uri",
    ])
    def test_other_resource_is_invalid_target(self, http, server, mcp_client, resource):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        assert_error(redeem_code(http, server, mcp_client, code, resource=resource), 400, "invalid_target")

    def test_any_of_several_resources_not_ours_is_invalid_target(self, http, server, mcp_client):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        response = redeem_code(http, server, mcp_client, code,
                               resource=[server.resource_url, "https://other.example/mcp"])
        assert_error(response, 400, "invalid_target")


@pytest.mark.django_db
class TestCodeReplay:
    def test_immediate_identical_retry_is_refused_cleanly_and_first_tokens_stay_valid(
        self, http, server, mcp_client
    ):
        """DESIGN §6: a hosted client calling /token twice. The retry gets an RFC error, not a broken
        connection, and the first answer keeps working."""
        session = make_upstream_session(server, mcp_client)
        code = make_code(session, mcp_client)
        first = redeem_code(http, server, mcp_client, code)
        assert first.status_code == 200
        retry = redeem_code(http, server, mcp_client, code)
        body = assert_error(retry, 400, "invalid_grant")
        assert "already used" in body["error_description"]

        session.refresh_from_db()
        assert session.revoked_at is None
        assert access_token_row(first.json()["access_token"]) is not None
        assert refresh(http, server, mcp_client, first.json()["refresh_token"]).status_code == 200

    def test_replay_after_the_retry_window_revokes_the_tokens_issued_from_the_code(
        self, http, server, mcp_client, upstream
    ):
        session = make_upstream_session(server, mcp_client)
        code = make_code(session, mcp_client)
        first = redeem_code(http, server, mcp_client, code).json()
        Grant.objects.filter(upstream_session=session).update(redeemed_at=timezone.now() - timedelta(seconds=11))

        assert_error(redeem_code(http, server, mcp_client, code), 400, "invalid_grant")
        session.refresh_from_db()
        assert session.revoked_at is not None and "replayed" in session.revoked_reason
        assert access_token_row(first["access_token"]) is None
        assert refresh_token_row(first["refresh_token"]).revoked is not None
        assert_error(refresh(http, server, mcp_client, first["refresh_token"]), 400, "invalid_grant")

    def test_replay_without_the_verifier_revokes_even_at_once(self, http, server, mcp_client):
        session = make_upstream_session(server, mcp_client)
        code = make_code(session, mcp_client)
        first = redeem_code(http, server, mcp_client, code).json()
        assert_error(redeem_code(http, server, mcp_client, code, code_verifier="z" * 43), 400, "invalid_grant")
        session.refresh_from_db()
        assert session.revoked_at is not None
        assert access_token_row(first["access_token"]) is None

    def test_replay_with_retry_window_setting(self, http, server, mcp_client, settings):
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "CODE_RETRY_SECONDS": 0}
        session = make_upstream_session(server, mcp_client)
        code = make_code(session, mcp_client)
        redeem_code(http, server, mcp_client, code)
        assert_error(redeem_code(http, server, mcp_client, code), 400, "invalid_grant")
        session.refresh_from_db()
        assert session.revoked_at is not None


# -- refresh_token --------------------------------------------------------------------------------


@pytest.mark.django_db
class TestRefresh:
    def test_refresh_rotates_both_tokens(self, http, server, mcp_client, upstream):
        tokens = issue_tokens(http, server, mcp_client)
        response = refresh(http, server, mcp_client, tokens["refresh_token"])

        assert response.status_code == 200, response.content
        assert response["Cache-Control"] == "no-store"
        new = response.json()
        assert new["refresh_token"] != tokens["refresh_token"]
        assert new["access_token"] != tokens["access_token"]
        assert new["token_type"] == "Bearer"
        assert new["expires_in"] == server.effective_access_token_lifetime
        assert len(upstream.calls) == 0  # the upstream token was not due

        old = refresh_token_row(tokens["refresh_token"])
        assert old.revoked is not None and old.access_token is None
        assert old.replay_response.startswith("v1:")  # sealed answer, not the tokens in clear
        assert new["refresh_token"] not in old.replay_response
        assert access_token_row(tokens["access_token"]) is None  # the previous access token is retired
        current = refresh_token_row(new["refresh_token"])
        assert current.token_family == old.token_family
        assert current.revoked is None
        assert current.upstream_session_id == tokens["session"].pk
        access = access_token_row(new["access_token"])
        assert access.resource == [server.resource_url]
        assert access.upstream_session_id == tokens["session"].pk
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.TOKEN_REFRESHED).count() == 1

    def test_rotation_chain_keeps_working(self, http, server, mcp_client):
        tokens = issue_tokens(http, server, mcp_client)
        current = tokens["refresh_token"]
        for _ in range(5):
            response = refresh(http, server, mcp_client, current)
            assert response.status_code == 200
            current = response.json()["refresh_token"]
        assert RefreshToken.objects.filter(revoked__isnull=True).count() == 1
        assert RefreshToken.objects.exclude(replay_response="").count() == 5  # one per exchange, all sealed

    def test_duplicate_within_grace_gets_the_identical_answer(self, http, server, mcp_client):
        tokens = issue_tokens(http, server, mcp_client)
        first = refresh(http, server, mcp_client, tokens["refresh_token"])
        second = refresh(http, server, mcp_client, tokens["refresh_token"])
        assert second.status_code == 200
        assert second.content == first.content
        assert second["Cache-Control"] == "no-store"
        new = first.json()
        assert access_token_row(new["access_token"]) is not None
        assert refresh(http, server, mcp_client, new["refresh_token"]).status_code == 200
        session = UpstreamSession.objects.get()
        assert session.revoked_at is None
        assert RefreshToken.objects.filter(revoked__isnull=True).count() == 1

    def test_reuse_after_grace_revokes_the_family_and_ends_the_session(self, http, server, mcp_client):
        tokens = issue_tokens(http, server, mcp_client)
        new = refresh(http, server, mcp_client, tokens["refresh_token"]).json()
        RefreshToken.objects.filter(token_checksum=checksum(tokens["refresh_token"])).update(
            revoked=timezone.now() - timedelta(seconds=31)
        )
        assert_error(refresh(http, server, mcp_client, tokens["refresh_token"]), 400, "invalid_grant")

        session = UpstreamSession.objects.get()
        assert session.revoked_at is not None
        assert access_token_row(new["access_token"]) is None
        assert refresh_token_row(new["refresh_token"]).revoked is not None
        assert_error(refresh(http, server, mcp_client, new["refresh_token"]), 400, "invalid_grant")
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.REFRESH_REUSE).count() == 1

    def test_token_two_rotations_old_is_reuse_even_within_grace(self, http, server, mcp_client):
        tokens = issue_tokens(http, server, mcp_client)
        second = refresh(http, server, mcp_client, tokens["refresh_token"]).json()
        third = refresh(http, server, mcp_client, second["refresh_token"]).json()
        assert_error(refresh(http, server, mcp_client, tokens["refresh_token"]), 400, "invalid_grant")
        assert UpstreamSession.objects.get().revoked_at is not None
        assert access_token_row(third["access_token"]) is None

    def test_grace_window_follows_the_setting(self, http, server, mcp_client, settings):
        settings.OAUTH2_PROVIDER = {**settings.OAUTH2_PROVIDER, "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0}
        tokens = issue_tokens(http, server, mcp_client)
        assert refresh(http, server, mcp_client, tokens["refresh_token"]).status_code == 200
        assert_error(refresh(http, server, mcp_client, tokens["refresh_token"]), 400, "invalid_grant")
        assert UpstreamSession.objects.get().revoked_at is not None

    def test_replay_needs_the_raw_token_the_database_cannot_decrypt_it(self, http, server, mcp_client):
        tokens = issue_tokens(http, server, mcp_client)
        refresh(http, server, mcp_client, tokens["refresh_token"])
        old = refresh_token_row(tokens["refresh_token"])
        from oauthproxy.authserver.dot.validator import replay_context, replay_open

        assert replay_open(raw_token="guess", context=replay_context(old), sealed=old.replay_response) is None
        assert replay_open(raw_token=tokens["refresh_token"], context=replay_context(old),
                           sealed=old.replay_response) is not None

    def test_another_clients_refresh_token_is_invalid_grant_without_side_effects(self, http, server, mcp_client):
        tokens = issue_tokens(http, server, mcp_client)
        other = make_client(server)
        assert_error(refresh(http, server, other, tokens["refresh_token"]), 400, "invalid_grant")
        assert UpstreamSession.objects.get().revoked_at is None
        assert refresh(http, server, mcp_client, tokens["refresh_token"]).status_code == 200

    def test_refresh_token_of_another_server_is_refused(self, http, server, mcp_client, server_factory):
        tokens = issue_tokens(http, server, mcp_client)
        other = server_factory(slug="other")
        # The client itself is unknown there...
        assert_error(refresh(http, other, mcp_client, tokens["refresh_token"]), 401, "invalid_client")
        # ...and a client of that server cannot use the token either.
        assert_error(refresh(http, other, make_client(other), tokens["refresh_token"]), 400, "invalid_grant")

    def test_unknown_refresh_token_is_invalid_grant(self, http, server, mcp_client):
        assert_error(refresh(http, server, mcp_client, "nope"), 400, "invalid_grant")

    def test_expired_refresh_token_is_invalid_grant(self, http, db):
        server = make_server(slug="brief", refresh_token_lifetime=600)
        client = make_client(server)
        tokens = issue_tokens(http, server, client)
        RefreshToken.objects.filter(token_checksum=checksum(tokens["refresh_token"])).update(
            created=timezone.now() - timedelta(seconds=601)
        )
        body = assert_error(refresh(http, server, client, tokens["refresh_token"]), 400, "invalid_grant")
        assert "expired" in body["error_description"]

    def test_refresh_token_lifetime_slides_with_rotation(self, http, db):
        server = make_server(slug="brief", refresh_token_lifetime=600)
        client = make_client(server)
        tokens = issue_tokens(http, server, client)
        RefreshToken.objects.update(created=timezone.now() - timedelta(seconds=590))
        new = refresh(http, server, client, tokens["refresh_token"])
        assert new.status_code == 200
        assert refresh(http, server, client, new.json()["refresh_token"]).status_code == 200

    def test_refresh_of_ended_session_is_invalid_grant(self, http, server, mcp_client):
        from oauthproxy.grants.sessions import upstream_session_revoke

        tokens = issue_tokens(http, server, mcp_client)
        upstream_session_revoke(session=tokens["session"], reason="admin")
        assert_error(refresh(http, server, mcp_client, tokens["refresh_token"]), 400, "invalid_grant")

    def test_refresh_by_disabled_client_is_invalid_client(self, http, server, mcp_client):
        tokens = issue_tokens(http, server, mcp_client)
        mcp_client.disabled = True
        mcp_client.save()
        assert_error(refresh(http, server, mcp_client, tokens["refresh_token"]), 401, "invalid_client")

    def test_scope_may_narrow_but_not_widen(self, http, server, mcp_client):
        tokens = issue_tokens(http, server, mcp_client, scope="openid email")
        narrowed = refresh(http, server, mcp_client, tokens["refresh_token"], scope="email")
        assert narrowed.status_code == 200 and narrowed.json()["scope"] == "email"
        widened = refresh(http, server, mcp_client, narrowed.json()["refresh_token"], scope="email openid")
        assert_error(widened, 400, "invalid_scope")

    def test_scopes_the_server_does_not_offer_are_dropped_at_refresh(self, http, server, mcp_client):
        tokens = issue_tokens(http, server, mcp_client, scope="openid email")
        answer = refresh(http, server, mcp_client, tokens["refresh_token"], scope="email claudeai")
        assert answer.status_code == 200 and answer.json()["scope"] == "email"
        only_unknown = refresh(http, server, mcp_client, answer.json()["refresh_token"], scope="mcp")
        assert only_unknown.status_code == 200 and only_unknown.json()["scope"] == "email"

    def test_a_strict_server_refuses_unknown_scopes_at_refresh(self, http, server, mcp_client):
        tokens = issue_tokens(http, server, mcp_client, scope="openid email")
        server.strict_scopes = True
        server.save()
        assert_error(refresh(http, server, mcp_client, tokens["refresh_token"], scope="email admin"),
                     400, "invalid_scope")

    def test_resource_must_be_this_server(self, http, server, mcp_client):
        tokens = issue_tokens(http, server, mcp_client)
        assert_error(refresh(http, server, mcp_client, tokens["refresh_token"], resource="https://x.example/mcp"),
                     400, "invalid_target")
        assert refresh(http, server, mcp_client, tokens["refresh_token"],
                       resource=server.resource_url).status_code == 200

    def test_confidential_client_refreshes_with_its_secret(self, http, server):
        client = make_client(server, public=False)
        tokens = issue_tokens(http, server, client)
        assert refresh(http, server, client, tokens["refresh_token"]).status_code == 200
        response = form_post(http, f"/oauth/{server.slug}/token",
                             {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
                             HTTP_AUTHORIZATION=basic_auth(client.client_id, "wrong"))
        assert_error(response, 401, "invalid_client")

    @pytest.mark.postgres  # the count of PostgreSQL's statements (oauthproxy.db); elsewhere the ORM writes
    def test_refresh_path_stays_a_few_queries(self, http, server, mcp_client, django_assert_max_num_queries):
        tokens = issue_tokens(http, server, mcp_client)
        refresh(http, server, mcp_client, tokens["refresh_token"])  # warm: last_used stamped
        current = refresh(http, server, mcp_client, refresh(http, server, mcp_client, tokens["refresh_token"])
                          .json()["refresh_token"]).json()["refresh_token"]
        # server, client, session lock, refresh token, retire it, drop its access token, two inserts, audit
        # (+ the test transaction's SAVEPOINT/RELEASE); no upstream call.
        with django_assert_max_num_queries(11):
            assert refresh(http, server, mcp_client, current).status_code == 200


@pytest.mark.django_db
class TestRefreshAndTheUpstream:
    def upstream_refresh_ok(self, mock, *, access_token="upstream-at-new", refresh_token="upstream-rt-new",
                            expires_in=300):
        body = {"access_token": access_token, "token_type": "Bearer", "expires_in": expires_in}
        if refresh_token:
            body["refresh_token"] = refresh_token
        mock.add(responses.POST, TOKEN_URL, json=body)

    def test_upstream_not_due_is_not_called(self, http, server, mcp_client, upstream):
        tokens = issue_tokens(http, server, mcp_client, expires_in=3600)
        for _ in range(3):
            response = refresh(http, server, mcp_client, tokens["refresh_token"])
            tokens["refresh_token"] = response.json()["refresh_token"]
        assert len(upstream.calls) == 0

    def test_upstream_due_is_refreshed_once_and_never_handed_out(self, http, server, mcp_client, upstream):
        tokens = issue_tokens(http, server, mcp_client, expires_in=30, refresh_token="upstream-rt-old")
        self.upstream_refresh_ok(upstream)
        response = refresh(http, server, mcp_client, tokens["refresh_token"])
        assert response.status_code == 200, response.content
        assert "upstream" not in response.content.decode()
        assert upstream_token_calls(upstream) == 1
        assert "refresh_token=upstream-rt-old" in upstream.calls[0].request.body
        session = UpstreamSession.objects.get()
        assert session.access_token == "upstream-at-new"
        assert session.refresh_token == "upstream-rt-new"
        assert session.refresh_count == 1
        # Fresh now: the next proxy refresh leaves the upstream alone.
        refresh(http, server, mcp_client, response.json()["refresh_token"])
        assert upstream_token_calls(upstream) == 1

    def test_upstream_invalid_grant_ends_the_session(self, http, server, mcp_client, upstream):
        tokens = issue_tokens(http, server, mcp_client, expires_in=-5)
        upstream.add(responses.POST, TOKEN_URL, status=400, json={"error": "invalid_grant"})
        body = assert_error(refresh(http, server, mcp_client, tokens["refresh_token"]), 400, "invalid_grant")
        assert "authorize again" in body["error_description"]
        session = UpstreamSession.objects.get()
        assert session.revoked_at is not None
        assert "invalid_grant" in session.revoked_reason
        assert access_token_row(tokens["access_token"]) is None
        assert RefreshToken.objects.filter(revoked__isnull=True).count() == 0
        # Further attempts stay invalid_grant without asking the upstream again.
        assert_error(refresh(http, server, mcp_client, tokens["refresh_token"]), 400, "invalid_grant")
        assert upstream_token_calls(upstream) == 1

    def test_upstream_down_with_expired_token_is_503_and_keeps_the_session(self, http, server, mcp_client, upstream):
        tokens = issue_tokens(http, server, mcp_client, expires_in=-5)
        upstream.add(responses.POST, TOKEN_URL, status=502, body="bad gateway")
        response = refresh(http, server, mcp_client, tokens["refresh_token"])
        assert_error(response, 503, "temporarily_unavailable")
        assert response["Retry-After"]
        assert UpstreamSession.objects.get().revoked_at is None
        # The client keeps its refresh token and can retry once the upstream is back.
        upstream.replace(responses.POST, TOKEN_URL, json={"access_token": "upstream-at-2", "expires_in": 300})
        assert refresh(http, server, mcp_client, tokens["refresh_token"]).status_code == 200

    def test_upstream_unreachable_while_token_still_valid_is_fine(self, http, server, mcp_client, upstream):
        tokens = issue_tokens(http, server, mcp_client, expires_in=30)  # due (margin 60s) but valid
        response = refresh(http, server, mcp_client, tokens["refresh_token"])  # nothing registered: unreachable
        assert response.status_code == 200
        assert upstream_token_calls(upstream) == 1

    def test_upstream_without_expiry_never_refreshes(self, http, server, mcp_client, upstream):
        """GitHub OAuth apps: no expires_in, no refresh token."""
        tokens = issue_tokens(http, server, mcp_client, expires_in=None, refresh_token="")
        current = tokens["refresh_token"]
        for _ in range(3):
            response = refresh(http, server, mcp_client, current)
            assert response.status_code == 200
            current = response.json()["refresh_token"]
        assert len(upstream.calls) == 0
        assert UpstreamSession.objects.get().revoked_at is None

    def test_five_minute_upstream_tokens_do_not_end_the_session(self, http, server, mcp_client, upstream):
        """Keycloak defaults: every 5 minutes the upstream token is due; the session goes on."""
        tokens = issue_tokens(http, server, mcp_client, expires_in=300)
        current = tokens["refresh_token"]
        for round_ in range(3):
            UpstreamSession.objects.update(expires_at=timezone.now() - timedelta(seconds=1))  # 5 minutes later
            upstream.add(responses.POST, TOKEN_URL,
                         json={"access_token": f"kc-at-{round_}", "refresh_token": f"kc-rt-{round_}",
                               "expires_in": 300})
            response = refresh(http, server, mcp_client, current)
            assert response.status_code == 200, response.content
            current = response.json()["refresh_token"]
        session = UpstreamSession.objects.get()
        assert session.revoked_at is None and session.refresh_count == 3
        assert session.access_token == "kc-at-2"

    def test_expired_upstream_token_without_refresh_token_ends_the_session(self, http, server, mcp_client, upstream):
        tokens = issue_tokens(http, server, mcp_client, expires_in=-5, refresh_token="")
        assert_error(refresh(http, server, mcp_client, tokens["refresh_token"]), 400, "invalid_grant")
        assert UpstreamSession.objects.get().revoked_at is not None
        assert len(upstream.calls) == 0


# -- bad input (DESIGN §5.12) ---------------------------------------------------------------------


@pytest.mark.django_db
class TestBadInput:
    @pytest.mark.parametrize("grant_type", [
        "password", "client_credentials", "implicit", "urn:ietf:params:oauth:grant-type:device_code",
        "urn:ietf:params:oauth:grant-type:jwt-bearer", "token", "AUTHORIZATION_CODE", "🙂",
    ])
    def test_unsupported_grant_types(self, http, server, mcp_client, grant_type):
        response = token_post(http, server, {"grant_type": grant_type, "username": "u", "password": "p"},
                              client=mcp_client)
        assert_error(response, 400, "unsupported_grant_type")

    def test_missing_grant_type_is_invalid_request(self, http, server, mcp_client):
        assert_error(token_post(http, server, {"code": "x"}, client=mcp_client), 400, "invalid_request")

    def test_json_body_is_invalid_request(self, http, server, mcp_client):
        response = http.post(f"/oauth/{server.slug}/token", data=json.dumps({
            "grant_type": "refresh_token", "refresh_token": "x", "client_id": mcp_client.client_id,
        }), content_type="application/json")
        body = assert_error(response, 400, "invalid_request")
        assert "x-www-form-urlencoded" in body["error_description"]

    def test_multipart_body_is_invalid_request(self, http, server, mcp_client):
        response = http.post(f"/oauth/{server.slug}/token", data={"grant_type": "refresh_token"})
        assert_error(response, 400, "invalid_request")

    def test_parameters_in_the_url_are_invalid_request(self, http, server, mcp_client):
        response = http.post(f"/oauth/{server.slug}/token?grant_type=refresh_token&x=%zz",
                             data="refresh_token=x", content_type="application/x-www-form-urlencoded")
        assert_error(response, 400, "invalid_request")

    @pytest.mark.parametrize("name", ["grant_type", "code", "client_id", "code_verifier", "redirect_uri"])
    def test_repeated_parameter_is_invalid_request(self, http, server, mcp_client, name):
        code = make_code(make_upstream_session(server, mcp_client), mcp_client)
        data = {"grant_type": "authorization_code", "code": code, "redirect_uri": DEFAULT_REDIRECT_URI,
                "code_verifier": DEFAULT_CODE_VERIFIER, "client_id": mcp_client.client_id}
        data[name] = [data[name], data[name]]
        body = assert_error(form_post(http, f"/oauth/{server.slug}/token", data), 400, "invalid_request")
        assert name in body["error_description"]

    def test_nul_bytes_are_invalid_request(self, http, server, mcp_client):
        response = token_post(http, server, {"grant_type": "refresh_token", "refresh_token": "a\x00b"},
                              client=mcp_client)
        assert_error(response, 400, "invalid_request")

    def test_malformed_basic_credentials_are_invalid_client(self, http, server):
        for header in ("Basic !!!", "Basic " + "bm9jb2xvbg==", "Basic //79"):  # not base64 / no colon / not utf-8
            response = form_post(http, f"/oauth/{server.slug}/token",
                                 {"grant_type": "refresh_token", "refresh_token": "x"}, HTTP_AUTHORIZATION=header)
            assert_error(response, 401, "invalid_client")

    def test_basic_and_body_client_ids_must_agree(self, http, server, mcp_client):
        other = make_client(server)
        response = form_post(http, f"/oauth/{server.slug}/token",
                             {"grant_type": "refresh_token", "refresh_token": "x", "client_id": other.client_id},
                             HTTP_AUTHORIZATION=basic_auth(mcp_client.client_id, ""))
        assert_error(response, 401, "invalid_client")

    def test_two_authentication_methods_are_invalid_request(self, http, server):
        client = make_client(server, public=False)
        response = form_post(http, f"/oauth/{server.slug}/token",
                             {"grant_type": "refresh_token", "refresh_token": "x",
                              "client_secret": client.plain_client_secret},
                             HTTP_AUTHORIZATION=basic_auth(client.client_id, client.plain_client_secret))
        assert_error(response, 400, "invalid_request")

    def test_get_is_405_json(self, http, server):
        response = http.get(f"/oauth/{server.slug}/token")
        assert_error(response, 405, "invalid_request")
        assert "POST" in response["Allow"]

    def test_unknown_or_disabled_server_is_404_json(self, http, server, mcp_client):
        assert_error(form_post(http, "/oauth/nope/token", {"grant_type": "refresh_token"}), 404, "not_found")
        assert_error(form_post(http, "/oauth/Bad%20Slug/token", {"grant_type": "refresh_token"}), 404, "not_found")
        server.enabled = False
        server.save()
        assert_error(token_post(http, server, {"grant_type": "refresh_token", "refresh_token": "x"},
                                client=mcp_client), 404, "not_found")

    def test_cors_preflight_and_header(self, http, server, mcp_client):
        preflight = http.options(f"/oauth/{server.slug}/token", HTTP_ORIGIN="http://localhost:6274",
                                 HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST")
        assert preflight.status_code == 204
        assert preflight["Access-Control-Allow-Origin"] == "*"
        assert "POST" in preflight["Access-Control-Allow-Methods"]
        assert "Authorization" in preflight["Access-Control-Allow-Headers"]
        response = token_post(http, server, {"grant_type": "refresh_token", "refresh_token": "x"}, client=mcp_client)
        assert response["Access-Control-Allow-Origin"] == "*"

    def test_rate_limit_per_client_answers_429_with_retry_after(self, http, server, mcp_client, settings):
        from django.core.cache import cache

        cache.clear()
        settings.OAUTHPROXY = {**settings.OAUTHPROXY, "RATE_LIMITS": {"token:source": (3, 60)}}
        for _ in range(3):
            assert refresh(http, server, mcp_client, "x").status_code == 400
        response = refresh(http, server, mcp_client, "x")
        assert_error(response, 429, "slow_down")
        assert 1 <= int(response["Retry-After"]) <= 60
        # Another client (a hosted client's other users) is not affected.
        assert refresh(http, server, make_client(server), "x").status_code == 400
        cache.clear()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(
        fields=st.lists(
            st.tuples(
                st.sampled_from(["grant_type", "code", "redirect_uri", "code_verifier", "client_id",
                                 "client_secret", "refresh_token", "scope", "resource", "token", "x", ""]),
                st.one_of(
                    st.sampled_from(["authorization_code", "refresh_token", "password", "", "%zz", "a" * 5000,
                                     "https://proxy.example.test/mcp/crm", DEFAULT_REDIRECT_URI]),
                    st.text(max_size=60),
                ),
            ),
            max_size=8,
        ),
        authorization=st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["Basic ", "Basic Og==", "Bearer x"])),
        content_type=st.sampled_from(["application/x-www-form-urlencoded", "application/json", "text/plain", ""]),
    )
    def test_fuzzed_forms_get_rfc_errors_never_500(self, http, server, mcp_client, fields, authorization,
                                                    content_type):
        from urllib.parse import urlencode

        fields = [(name, mcp_client.client_id if name == "client_id" and value == "" else value)
                  for name, value in fields]
        headers = {}
        if authorization is not None:
            headers["HTTP_AUTHORIZATION"] = authorization.replace("\n", " ").replace("\r", " ")
        response = http.post(f"/oauth/{server.slug}/token", data=urlencode(fields), content_type=content_type,
                             **headers)
        assert 400 <= response.status_code < 500, response.content
        assert response["Cache-Control"] == "no-store"
        body = response.json()
        assert body["error"] in {"invalid_request", "invalid_client", "invalid_grant", "unauthorized_client",
                                 "unsupported_grant_type", "invalid_scope", "invalid_target", "slow_down"}


# -- concurrency on PostgreSQL (DESIGN §5.8, §4) ---------------------------------------------------


@pytest.mark.postgres  # row locks
@pytest.mark.django_db(transaction=True)
class TestConcurrency:
    def test_exactly_one_of_parallel_code_redemptions_wins(self, server):
        client = make_client(server)
        session = make_upstream_session(server, client)
        code = make_code(session, client)

        responses_ = run_in_threads(8, lambda i: redeem_code(HttpClient(), server, client, code))

        statuses = sorted(r.status_code for r in responses_)
        assert statuses == [200] + [400] * 7, [r.content for r in responses_]
        for response in responses_:
            if response.status_code == 400:
                assert response.json()["error"] == "invalid_grant"
        assert AccessToken.objects.count() == 1
        assert RefreshToken.objects.count() == 1
        # Parallel duplicates are immediate retries: the winner's tokens stay valid.
        assert UpstreamSession.objects.get().revoked_at is None

    def test_parallel_refreshes_all_get_the_same_tokens_and_one_upstream_refresh(self, server):
        client = make_client(server)
        tokens = issue_tokens(HttpClient(), server, client, expires_in=10)  # upstream due

        def slow_upstream(request):
            time.sleep(0.3)  # every other request piles up behind the first
            return 200, {}, json.dumps({"access_token": "upstream-at-new", "refresh_token": "upstream-rt-new",
                                        "expires_in": 300})

        with responses.RequestsMock() as mock:
            mock.add_callback(responses.POST, TOKEN_URL, callback=slow_upstream)
            results = run_in_threads(8, lambda i: refresh(HttpClient(), server, client, tokens["refresh_token"]))
            assert upstream_token_calls(mock) == 1

        assert all(r.status_code == 200 for r in results), [getattr(r, "content", r) for r in results]
        assert len({r.content for r in results}) == 1
        new = results[0].json()
        assert RefreshToken.objects.filter(revoked__isnull=True).count() == 1
        assert refresh_token_row(new["refresh_token"]).revoked is None
        assert len(set(RefreshToken.objects.values_list("token_family", flat=True))) == 1
        session = UpstreamSession.objects.get()
        assert session.revoked_at is None and session.refresh_count == 1
        assert refresh(HttpClient(), server, client, new["refresh_token"]).status_code == 200

    def test_parallel_refreshes_without_upstream_due_do_not_call_it(self, server):
        client = make_client(server)
        tokens = issue_tokens(HttpClient(), server, client, expires_in=3600)
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            results = run_in_threads(6, lambda i: refresh(HttpClient(), server, client, tokens["refresh_token"]))
            assert len(mock.calls) == 0
        assert all(r.status_code == 200 for r in results)
        assert len({r.content for r in results}) == 1
