"""Each hand-written statement of ``oauthproxy.db`` and its portable ORM path write and read the same rows,
and keep the per-process caches right (``post_save``). On PostgreSQL both paths run; on SQLite (the second
pass of ``make test``) only the portable one, which is what ``make run`` uses."""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from oauthproxy.authserver.cimd import client_resolve
from oauthproxy.authserver.dot.validator import token_checksum
from oauthproxy.core.audit import audit_event
from oauthproxy.core.caching import client_cache_key, clients
from oauthproxy.db import authorization as db_authorization
from oauthproxy.db import clients as db_clients
from oauthproxy.db import sql as db_sql
from oauthproxy.db import tokens as db_tokens
from oauthproxy.db.authorization import pending_approved, pending_consumed, pending_of_state, pending_unanswered
from oauthproxy.db.clients import client_row
from oauthproxy.db.sql import row_update, rows_insert
from oauthproxy.models import AccessToken, AuditEvent, Client, PendingAuthorization, RefreshToken, UpstreamSession
from tests.factories import issue_tokens, make_client, make_upstream_session, refresh

pytestmark = pytest.mark.django_db

DB_MODULES = (db_sql, db_tokens, db_authorization, db_clients)


@pytest.fixture(params=["statements", "orm"])
def db_path(request, monkeypatch) -> str:
    """Run the test on the hand-written statements (PostgreSQL only) and on the portable ORM path."""
    if request.param == "statements":
        if connection.vendor != "postgresql":
            pytest.skip("the hand-written statements are PostgreSQL's")
    else:
        for module in DB_MODULES:
            monkeypatch.setattr(module, "fast_path", lambda: False)
    return request.param


def test_the_portable_path_is_chosen_by_the_connections_vendor():
    assert db_sql.fast_path() is (connection.vendor == "postgresql")


def test_a_client_and_its_audit_row_are_written_together_and_a_cached_miss_is_forgotten(server, db_path):
    key = client_cache_key(server_id=server.pk, client_id="new-client")
    assert clients.get(key, lambda: None) is None  # "no such client" is cached now
    client = Client(server=server, client_id="new-client", name="New", redirect_uris="http://127.0.0.1/cb",
                    client_type=Client.CLIENT_PUBLIC, authorization_grant_type=Client.GRANT_AUTHORIZATION_CODE)
    event = audit_event(kind=AuditEvent.Kind.CLIENT_REGISTERED, server=server, client=client, message="registered")
    rows_insert(client, (event, "client"))

    assert AuditEvent.objects.get(pk=event.pk).client_id == client.pk
    assert client_resolve(server=server, client_id="new-client").pk == client.pk  # post_save dropped the miss


def test_an_updated_row_and_its_audit_row(server, db_path):
    session = make_upstream_session(server, make_client(server))
    session.access_token, session.refresh_count = "at-rotated", 3
    event = audit_event(kind=AuditEvent.Kind.UPSTREAM_REFRESHED, server=server, subject="alice")
    row_update(session, ("access_token", "refresh_count"), inserting=(event,))

    stored = UpstreamSession.objects.get(pk=session.pk)
    assert (stored.access_token, stored.refresh_count) == ("at-rotated", 3)
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.UPSTREAM_REFRESHED, subject="alice").count() == 1


def test_refresh_rotation_grace_replay_and_reuse_detection(client, server, db_path):
    mcp_client = make_client(server)
    first = issue_tokens(client, server, mcp_client)
    old = RefreshToken.objects.get(token_checksum=token_checksum(first["refresh_token"]))

    rotated = refresh(client, server, mcp_client, first["refresh_token"])
    assert rotated.status_code == 200, rotated.content
    second = rotated.json()
    old.refresh_from_db()
    assert old.revoked is not None and old.access_token_id is None and old.replay_response
    new_refresh = RefreshToken.objects.get(token_checksum=token_checksum(second["refresh_token"]))
    new_access = AccessToken.objects.get(token_checksum=token_checksum(second["access_token"]))
    assert new_refresh.access_token_id == new_access.pk and new_access.source_refresh_token_id == old.pk
    assert AuditEvent.objects.filter(kind=AuditEvent.Kind.TOKEN_REFRESHED).count() == 1

    replay = refresh(client, server, mcp_client, first["refresh_token"])  # within the grace window
    assert replay.status_code == 200 and replay.content == rotated.content

    third = refresh(client, server, mcp_client, second["refresh_token"]).json()
    reuse = refresh(client, server, mcp_client, first["refresh_token"])  # two rotations old: reuse
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    assert UpstreamSession.objects.get().revoked_at is not None
    assert not AccessToken.objects.filter(token_checksum=token_checksum(third["access_token"])).exists()


def test_the_refresh_reads(server, db_path):
    mcp_client = make_client(server)
    session = make_upstream_session(server, mcp_client)
    access = AccessToken.objects.create(application=mcp_client, token="at-1", scope="openid email",
                                        expires=timezone.now() + timedelta(hours=1), upstream_session=session)
    RefreshToken.objects.create(application=mcp_client, token="rt-1", access_token=access, upstream_session=session)
    checksum = token_checksum("rt-1")

    locked = db_tokens.refresh_session_locked(checksum=checksum, client_pk=mcp_client.pk)
    assert locked.pk == session.pk and locked.access_token == session.access_token
    read = db_tokens.refresh_token_read(checksum=checksum, client_pk=mcp_client.pk, session_pk=session.pk)
    assert read.access_token_id == access.pk and read.access_token_scope == "openid email"
    assert db_tokens.refresh_session_locked(checksum=checksum, client_pk=make_client(server).pk) is None


def test_the_pending_authorization_reads_and_conditional_writes(server, db_path):
    mcp_client = make_client(server)
    now = timezone.now()
    pending = PendingAuthorization.objects.create(
        server=server, client=mcp_client, redirect_uri="http://127.0.0.1/cb", scope="openid",
        code_challenge="c" * 43, browser_key_checksum="browser", expires_at=now + timedelta(minutes=5),
    )
    found = pending_unanswered(pk=pending.pk, server_pk=server.pk)
    assert found.pk == pending.pk and found.client.pk == mcp_client.pk

    found.state_checksum, found.approved_at, found.upstream_code_verifier = "state-sum", now, "verifier-secret"
    assert pending_approved(found, now=now)
    assert not pending_approved(found, now=now)  # answered already: exactly one approval wins
    assert pending_unanswered(pk=pending.pk, server_pk=server.pk) is None

    by_state = pending_of_state(state_checksum="state-sum", server_pk=server.pk)
    assert by_state.pk == pending.pk and by_state.upstream_code_verifier == "verifier-secret"  # encrypted, bound
    assert not pending_consumed(by_state, browser_key_checksum="another browser", now=now)
    assert pending_consumed(by_state, browser_key_checksum="browser", now=now)
    assert not pending_consumed(by_state, browser_key_checksum="browser", now=now)


def test_a_try_it_test_has_no_client(server, db_path, django_user_model):
    tester = django_user_model.objects.create_user("tester")
    PendingAuthorization.objects.create(
        server=server, client=None, tester=tester, state_checksum="try-it",
        expires_at=timezone.now() + timedelta(minutes=5),
    )
    found = pending_of_state(state_checksum="try-it", server_pk=server.pk)
    assert found is not None and found.client is None


def test_the_client_row_read(server, db_path):
    mcp_client = make_client(server)
    assert client_row(server_pk=server.pk, client_id=mcp_client.client_id).pk == mcp_client.pk
    assert client_row(server_pk=server.pk, client_id="nobody") is None
