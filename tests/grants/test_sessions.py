"""The upstream session service: when the upstream token is due, refreshing it once under concurrency,
ending and revoking sessions. The upstream is mocked at the HTTP boundary only."""

import json
import threading
import time
from datetime import timedelta
from urllib.parse import parse_qs

import pytest
import responses
from django.db import connections
from django.utils import timezone

from oauthproxy.core.exceptions import UpstreamError
from oauthproxy.grants.sessions import (
    Subject,
    UpstreamSessionEnded,
    upstream_session_create,
    upstream_session_ensure_fresh,
    upstream_session_revoke,
    upstream_token_is_due,
)
from oauthproxy.models import AccessToken, AuditEvent, RefreshToken, UpstreamSession
from oauthproxy.upstream.client import TokenSet
from tests.conftest import UPSTREAM
from tests.factories import issue_tokens, make_client, make_upstream_session, run_in_threads

TOKEN_URL = f"{UPSTREAM}/token"
REVOKE_URL = f"{UPSTREAM}/revoke"


@pytest.fixture
def mcp_client(server):
    return make_client(server)


def token_calls(mock) -> int:
    return sum(1 for call in mock.calls if call.request.url == TOKEN_URL)


@pytest.mark.django_db
class TestCreate:
    def test_tokens_are_stored_encrypted(self, server, mcp_client):
        tokens = TokenSet(access_token="at-plain", refresh_token="rt-plain", expires_in=300, scope="openid")
        session = upstream_session_create(server=server, client=mcp_client, tokens=tokens,
                                          subject=Subject("sub-1", "id_token"))
        row = UpstreamSession.objects.values("access_token", "refresh_token").get(pk=session.pk)
        assert row["access_token"].startswith("enc:v1:") and "at-plain" not in row["access_token"]
        assert "rt-plain" not in row["refresh_token"]
        session = UpstreamSession.objects.get(pk=session.pk)
        assert (session.access_token, session.refresh_token) == ("at-plain", "rt-plain")
        assert session.scope == "openid" and session.subject == "sub-1"
        assert abs((session.expires_at - timezone.now()).total_seconds() - 300) < 5

    def test_no_expiry_and_no_scope(self, server, mcp_client):
        session = upstream_session_create(server=server, client=mcp_client, tokens=TokenSet(access_token="a"),
                                          subject=Subject("s", "opaque"))
        assert session.expires_at is None
        assert session.scope == " ".join(server.scopes)


@pytest.mark.django_db
class TestDue:
    def test_due_within_the_margin(self, server, mcp_client):
        assert not upstream_token_is_due(make_upstream_session(server, mcp_client, expires_in=3600))
        assert upstream_token_is_due(make_upstream_session(server, mcp_client, expires_in=30))
        assert upstream_token_is_due(make_upstream_session(server, mcp_client, expires_in=-1))
        assert not upstream_token_is_due(make_upstream_session(server, mcp_client, expires_in=30), margin=10)

    def test_no_expiry_is_never_due(self, server, mcp_client):
        assert not upstream_token_is_due(make_upstream_session(server, mcp_client, expires_in=None))

    def test_without_refresh_token_due_only_when_expired(self, server, mcp_client):
        assert not upstream_token_is_due(make_upstream_session(server, mcp_client, expires_in=30, refresh_token=""))
        assert upstream_token_is_due(make_upstream_session(server, mcp_client, expires_in=-1, refresh_token=""))


@pytest.mark.django_db
class TestEnsureFresh:
    def test_not_due_makes_no_call_and_no_query(self, server, mcp_client, upstream, django_assert_num_queries):
        session = make_upstream_session(server, mcp_client, expires_in=3600)
        with django_assert_num_queries(0):
            assert upstream_session_ensure_fresh(session=session) is session
        assert len(upstream.calls) == 0

    def test_due_refreshes_with_the_stored_credential(self, server, mcp_client, upstream):
        session = make_upstream_session(server, mcp_client, expires_in=10, refresh_token="rt-old")
        upstream.add(responses.POST, TOKEN_URL, json={"access_token": "at-new", "refresh_token": "rt-new",
                                                      "expires_in": 300, "scope": "openid"})
        fresh = upstream_session_ensure_fresh(session=session)
        assert (fresh.access_token, fresh.refresh_token, fresh.refresh_count) == ("at-new", "rt-new", 1)
        request = upstream.calls[0].request
        assert parse_qs(request.body) == {"grant_type": ["refresh_token"], "refresh_token": ["rt-old"]}
        assert request.headers["Authorization"].startswith("Basic ")
        stored = UpstreamSession.objects.get(pk=session.pk)
        assert stored.access_token == "at-new" and stored.scope == "openid"
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.UPSTREAM_REFRESHED).count() == 1

    def test_refresh_without_rotation_keeps_the_refresh_token(self, server, mcp_client, upstream):
        session = make_upstream_session(server, mcp_client, expires_in=10, refresh_token="rt-keep")
        upstream.add(responses.POST, TOKEN_URL, json={"access_token": "at-new", "expires_in": 300})
        assert upstream_session_ensure_fresh(session=session).refresh_token == "rt-keep"

    def test_stale_copy_finds_the_row_already_refreshed(self, server, mcp_client, upstream):
        session = make_upstream_session(server, mcp_client, expires_in=10)
        stale = UpstreamSession.objects.get(pk=session.pk)
        upstream.add(responses.POST, TOKEN_URL, json={"access_token": "at-new", "expires_in": 300})
        upstream_session_ensure_fresh(session=session)
        assert upstream_session_ensure_fresh(session=stale).access_token == "at-new"
        assert token_calls(upstream) == 1

    def test_rejected_access_token_forces_a_refresh_once(self, server, mcp_client, upstream):
        session = make_upstream_session(server, mcp_client, expires_in=3600, access_token="at-rejected")
        upstream.add(responses.POST, TOKEN_URL, json={"access_token": "at-new", "expires_in": 300})
        assert upstream_session_ensure_fresh(session=session, rejected_access_token="at-rejected").access_token == (
            "at-new"
        )
        # A second request that saw the same rejected token finds it replaced already.
        again = upstream_session_ensure_fresh(session=UpstreamSession.objects.get(pk=session.pk),
                                              rejected_access_token="at-rejected")
        assert again.access_token == "at-new" and token_calls(upstream) == 1

    def test_upstream_invalid_grant_raises_session_ended(self, server, mcp_client, upstream):
        session = make_upstream_session(server, mcp_client, expires_in=-1)
        upstream.add(responses.POST, TOKEN_URL, status=400, json={"error": "invalid_grant"})
        with pytest.raises(UpstreamSessionEnded):
            upstream_session_ensure_fresh(session=session)

    def test_upstream_invalid_grant_marks_the_session_ended(self, server, mcp_client, upstream):
        session = make_upstream_session(server, mcp_client, expires_in=-1)
        upstream.add(responses.POST, TOKEN_URL, status=400, json={"error": "invalid_grant"})
        with pytest.raises(UpstreamSessionEnded):
            upstream_session_ensure_fresh(session=session)
        assert UpstreamSession.objects.get(pk=session.pk).revoked_at is not None

    def test_expired_without_refresh_token_raises_session_ended(self, server, mcp_client, upstream):
        session = make_upstream_session(server, mcp_client, expires_in=-1, refresh_token="")
        with pytest.raises(UpstreamSessionEnded):
            upstream_session_ensure_fresh(session=session)
        assert len(upstream.calls) == 0

    def test_revoked_session_raises_session_ended(self, server, mcp_client):
        session = make_upstream_session(server, mcp_client)
        session.revoked_at = timezone.now()
        with pytest.raises(UpstreamSessionEnded):
            upstream_session_ensure_fresh(session=session)

    def test_upstream_down_while_still_valid_keeps_the_token(self, server, mcp_client, upstream):
        session = make_upstream_session(server, mcp_client, expires_in=30, access_token="at-still-valid")
        upstream.add(responses.POST, TOKEN_URL, status=503)
        assert upstream_session_ensure_fresh(session=session).access_token == "at-still-valid"

    def test_upstream_down_after_expiry_raises(self, server, mcp_client, upstream):
        session = make_upstream_session(server, mcp_client, expires_in=-1)
        upstream.add(responses.POST, TOKEN_URL, status=503)
        with pytest.raises(UpstreamError) as info:
            upstream_session_ensure_fresh(session=session)
        assert info.value.oauth_error == "temporarily_unavailable"
        assert UpstreamSession.objects.get(pk=session.pk).revoked_at is None

    def test_upstream_unreachable_after_expiry_raises(self, server, mcp_client, upstream):
        session = make_upstream_session(server, mcp_client, expires_in=-1)
        with pytest.raises(UpstreamError):
            upstream_session_ensure_fresh(session=session)  # nothing registered: connection refused


def slow_upstream(request):
    time.sleep(0.5)
    return 200, {}, json.dumps({"access_token": "at-once", "refresh_token": "rt-once", "expires_in": 300})


@pytest.mark.postgres  # row locks
@pytest.mark.django_db(transaction=True)
def test_concurrent_callers_refresh_once(server):
    client = make_client(server)
    session = make_upstream_session(server, client, expires_in=5)
    def work(_i):
        copy = UpstreamSession.objects.get(pk=session.pk)
        return upstream_session_ensure_fresh(session=copy).access_token

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=slow_upstream)
        results = run_in_threads(6, work)
        assert token_calls(mock) == 1
    assert UpstreamSession.objects.get(pk=session.pk).refresh_count == 1
    assert results == ["at-once"] * 6


@pytest.mark.postgres  # row locks
@pytest.mark.django_db(transaction=True)
def test_upstream_refresh_does_not_block_other_work_of_the_server(server):
    """While one session waits for the upstream, another client of the same server can still be recorded."""
    from django.db import OperationalError, connection, transaction

    session = make_upstream_session(server, make_client(server), expires_in=5)
    other_client = make_client(server)
    started = threading.Event()

    def refresh_in_background():
        try:
            started.set()
            upstream_session_ensure_fresh(session=UpstreamSession.objects.get(pk=session.pk))
        finally:
            connections.close_all()

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.POST, TOKEN_URL, callback=slow_upstream)
        thread = threading.Thread(target=refresh_in_background)
        thread.start()
        started.wait(5)
        time.sleep(0.2)  # the background refresh now holds its row lock, waiting for the upstream
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL lock_timeout = '150ms'")
                AuditEvent.objects.create(kind=AuditEvent.Kind.TOKEN_ISSUED, server=server, client=other_client)
            blocked = False
        except OperationalError:
            blocked = True
        thread.join(timeout=10)
    assert not blocked


@pytest.mark.django_db
class TestRevoke:
    def test_revoke_ends_proxy_tokens_and_asks_the_upstream(self, client, server_factory):
        server = server_factory(slug="rev", revocation_endpoint=REVOKE_URL)
        mcp_client = make_client(server)
        tokens = issue_tokens(client, server, mcp_client, access_token="up-at", refresh_token="up-rt")
        session = tokens["session"]
        with responses.RequestsMock() as mock:
            mock.add(responses.POST, REVOKE_URL, status=200)
            upstream_session_revoke(session=session, reason="admin revoked")
            assert [parse_qs(c.request.body)["token"][0] for c in mock.calls] == ["up-rt", "up-at"]
        session.refresh_from_db()
        assert session.revoked_at is not None and session.revoked_reason == "admin revoked"
        assert not AccessToken.objects.filter(upstream_session=session).exists()
        assert not RefreshToken.objects.filter(upstream_session=session, revoked__isnull=True).exists()
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.SESSION_REVOKED).count() == 1

    def test_revoke_is_idempotent(self, server, mcp_client):
        session = make_upstream_session(server, mcp_client)
        upstream_session_revoke(session=session, reason="first")
        first = UpstreamSession.objects.get(pk=session.pk).revoked_at
        upstream_session_revoke(session=session, reason="second")
        session.refresh_from_db()
        assert session.revoked_at == first and session.revoked_reason == "first"
        assert AuditEvent.objects.filter(kind=AuditEvent.Kind.SESSION_REVOKED).count() == 1

    def test_upstream_failure_does_not_undo_the_local_revocation(self, server_factory, mcp_client):
        server = server_factory(slug="rev", revocation_endpoint=REVOKE_URL)
        session = make_upstream_session(server, make_client(server))
        with responses.RequestsMock() as mock:
            mock.add(responses.POST, REVOKE_URL, status=500)
            upstream_session_revoke(session=session, reason="x")
        assert UpstreamSession.objects.get(pk=session.pk).revoked_at is not None

    def test_expired_revoked_at_is_recent(self, server, mcp_client):
        session = make_upstream_session(server, mcp_client)
        upstream_session_revoke(session=session, reason="x")
        assert timezone.now() - UpstreamSession.objects.get(pk=session.pk).revoked_at < timedelta(seconds=5)
