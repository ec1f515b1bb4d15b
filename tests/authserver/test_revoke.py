"""POST /oauth/<slug>/revoke (RFC 7009): a client's own token ends its whole grant, upstream included."""

import hashlib
from urllib.parse import parse_qs

import pytest
import responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oauthproxy.models import AccessToken, AuditEvent, RefreshToken, UpstreamSession
from tests.conftest import UPSTREAM
from tests.factories import basic_auth, form_post, issue_tokens, make_client, refresh, token_post

REVOKE_URL = f"{UPSTREAM}/revoke"


def checksum(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def revoke(http, server, client, token, **extra):
    return token_post(http, server, {"token": token, **extra}, client=client, endpoint="revoke")


def assert_ok(response):
    assert response.status_code == 200, response.content
    assert response["Cache-Control"] == "no-store"


def grant_is_ended(tokens) -> bool:
    session = UpstreamSession.objects.get(pk=tokens["session"].pk)
    return (
        session.revoked_at is not None
        and not AccessToken.objects.filter(upstream_session=session).exists()
        and not RefreshToken.objects.filter(upstream_session=session, revoked__isnull=True).exists()
    )


@pytest.fixture
def http(client):
    return client


@pytest.fixture
def revocable_server(server_factory):
    return server_factory(slug="revocable", revocation_endpoint=REVOKE_URL)


@pytest.fixture
def upstream():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add(responses.POST, REVOKE_URL, status=200)
        yield mock


@pytest.mark.django_db
class TestRevoke:
    @pytest.mark.parametrize("which,hint", [
        ("access_token", "access_token"), ("access_token", ""), ("refresh_token", "refresh_token"),
        ("refresh_token", ""), ("refresh_token", "access_token"), ("access_token", "something_else"),
    ])
    def test_revoking_a_token_ends_its_grant_upstream_too(self, http, revocable_server, upstream, which, hint):
        client = make_client(revocable_server)
        tokens = issue_tokens(http, revocable_server, client, access_token="up-at", refresh_token="up-rt")
        other_grant = issue_tokens(http, revocable_server, client)

        assert_ok(revoke(http, revocable_server, client, tokens[which], token_type_hint=hint))

        assert grant_is_ended(tokens)
        assert "RFC 7009" in UpstreamSession.objects.get(pk=tokens["session"].pk).revoked_reason
        assert_error = refresh(http, revocable_server, client, tokens["refresh_token"])
        assert assert_error.status_code == 400 and assert_error.json()["error"] == "invalid_grant"
        # The upstream was asked to revoke both of its tokens, with the proxy's credential.
        sent = [parse_qs(call.request.body) for call in upstream.calls]
        assert {(s["token"][0], s["token_type_hint"][0]) for s in sent} == {
            ("up-rt", "refresh_token"), ("up-at", "access_token"),
        }
        assert all(call.request.headers["Authorization"].startswith("Basic ") for call in upstream.calls)
        # The client's other grant is untouched.
        assert not grant_is_ended(other_grant)
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.TOKEN_REVOKED, client=client).count() == 1
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.SESSION_REVOKED).count() == 1

    def test_revoking_twice_is_fine(self, http, revocable_server, upstream):
        client = make_client(revocable_server)
        tokens = issue_tokens(http, revocable_server, client)
        assert_ok(revoke(http, revocable_server, client, tokens["refresh_token"]))
        assert_ok(revoke(http, revocable_server, client, tokens["refresh_token"]))
        assert_ok(revoke(http, revocable_server, client, tokens["access_token"]))
        assert len(upstream.calls) == 2  # once per upstream token

    def test_upstream_without_revocation_endpoint_is_not_called(self, http, server):
        client = make_client(server)
        tokens = issue_tokens(http, server, client)
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            assert_ok(revoke(http, server, client, tokens["access_token"]))
            assert len(mock.calls) == 0
        assert grant_is_ended(tokens)

    def test_upstream_revocation_failure_does_not_fail_the_request(self, http, revocable_server):
        client = make_client(revocable_server)
        tokens = issue_tokens(http, revocable_server, client)
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            mock.add(responses.POST, REVOKE_URL, status=503)
            assert_ok(revoke(http, revocable_server, client, tokens["access_token"]))
        assert grant_is_ended(tokens)

    def test_unknown_token_is_200(self, http, server):
        client = make_client(server)
        tokens = issue_tokens(http, server, client)
        assert_ok(revoke(http, server, client, "no-such-token"))
        assert not grant_is_ended(tokens)
        assert not AuditEvent.objects.filter(kind=AuditEvent.Kind.TOKEN_REVOKED).exists()

    def test_another_clients_token_is_200_and_nothing_is_revoked(self, http, server):
        owner, other = make_client(server), make_client(server)
        tokens = issue_tokens(http, server, owner)
        assert_ok(revoke(http, server, other, tokens["access_token"]))
        assert_ok(revoke(http, server, other, tokens["refresh_token"]))
        assert not grant_is_ended(tokens)
        assert refresh(http, server, owner, tokens["refresh_token"]).status_code == 200

    def test_token_of_another_server_is_200_and_nothing_is_revoked(self, http, server, server_factory):
        other_server = server_factory(slug="other")
        tokens = issue_tokens(http, server, make_client(server))
        assert_ok(revoke(http, other_server, make_client(other_server), tokens["access_token"]))
        assert not grant_is_ended(tokens)

    def test_client_of_another_server_is_invalid_client(self, http, server, server_factory):
        other_server = server_factory(slug="other")
        client = make_client(server)
        tokens = issue_tokens(http, server, client)
        response = revoke(http, other_server, client, tokens["access_token"])
        assert response.status_code == 401 and response.json()["error"] == "invalid_client"
        assert not grant_is_ended(tokens)

    def test_confidential_client_must_authenticate(self, http, server):
        client = make_client(server, public=False)
        tokens = issue_tokens(http, server, client)
        response = form_post(http, f"/oauth/{server.slug}/revoke", {"token": tokens["access_token"]},
                             HTTP_AUTHORIZATION=basic_auth(client.client_id, "wrong"))
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"
        assert response["Cache-Control"] == "no-store"
        assert response["WWW-Authenticate"].startswith("Basic")
        response = form_post(http, f"/oauth/{server.slug}/revoke",
                             {"token": tokens["access_token"], "client_id": client.client_id})
        assert response.status_code == 401
        assert not grant_is_ended(tokens)
        assert_ok(revoke(http, server, client, tokens["access_token"]))
        assert grant_is_ended(tokens)

    def test_missing_token_is_invalid_request(self, http, server):
        client = make_client(server)
        response = token_post(http, server, {}, client=client, endpoint="revoke")
        assert response.status_code == 400 and response.json()["error"] == "invalid_request"
        assert response["Cache-Control"] == "no-store"

    def test_unknown_client_is_invalid_client(self, http, server):
        response = form_post(http, f"/oauth/{server.slug}/revoke", {"token": "x", "client_id": "nobody"})
        assert response.status_code == 401 and response.json()["error"] == "invalid_client"

    def test_json_body_and_get_are_refused_cleanly(self, http, server):
        response = http.post(f"/oauth/{server.slug}/revoke", data='{"token": "x"}', content_type="application/json")
        assert response.status_code == 400 and response.json()["error"] == "invalid_request"
        response = http.get(f"/oauth/{server.slug}/revoke")
        assert response.status_code == 405 and response["Cache-Control"] == "no-store"

    def test_revoking_a_rotated_refresh_token_ends_the_grant(self, http, server):
        client = make_client(server)
        tokens = issue_tokens(http, server, client)
        new = refresh(http, server, client, tokens["refresh_token"]).json()
        assert_ok(revoke(http, server, client, tokens["refresh_token"]))
        assert grant_is_ended(tokens)
        assert AccessToken.objects.filter(token_checksum=checksum(new["access_token"])).count() == 0


@pytest.mark.django_db
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fields=st.lists(st.tuples(st.sampled_from(["token", "token_type_hint", "client_id", "client_secret", "x"]),
                              st.text(max_size=40)), max_size=6),
    authorization=st.one_of(st.none(), st.sampled_from(["Basic ", "Basic Og==", "Bearer x", "Basic !!"])),
    content_type=st.sampled_from(["application/x-www-form-urlencoded", "application/json", ""]),
)
def test_fuzzed_revocation_requests_never_500(client, server, fields, authorization, content_type):
    from urllib.parse import urlencode

    headers = {"HTTP_AUTHORIZATION": authorization} if authorization else {}
    response = client.post(f"/oauth/{server.slug}/revoke", data=urlencode(fields), content_type=content_type,
                           **headers)
    assert response.status_code in (200, 400, 401, 429), response.content
    assert response["Cache-Control"] == "no-store"
    if response.status_code != 200:
        assert response.json()["error"] in {"invalid_request", "invalid_client", "slow_down"}
