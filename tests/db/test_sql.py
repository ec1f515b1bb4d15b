"""The precompiled row writes (``oauthproxy.db.sql``) and the one-statement rotation write the same rows as the
ORM: field preparation (auto_now, encryption, JSON, checksums) included."""

from datetime import timedelta

import pytest
from django.utils import timezone

from oauthproxy.core.crypto import token_checksum
from oauthproxy.db.sql import row_insert, row_update
from oauthproxy.models import AccessToken, AuditEvent, RefreshToken, UpstreamSession
from tests.factories import issue_tokens, make_client, make_upstream_session, refresh

pytestmark = pytest.mark.django_db


def test_row_insert_writes_what_save_writes(server):
    client = make_client(server)
    event = AuditEvent(kind=AuditEvent.Kind.TOKEN_REFRESHED, server=server, client=client, subject="alice",
                       detail={"grant_type": "refresh_token"})
    row_insert(event)
    stored = AuditEvent.objects.get(pk=event.pk)
    assert (stored.kind, stored.server_id, stored.client_id, stored.subject) == (
        AuditEvent.Kind.TOKEN_REFRESHED, server.pk, client.pk, "alice"
    )
    assert stored.detail == {"grant_type": "refresh_token"}
    assert abs(stored.created - timezone.now()) < timedelta(seconds=5)  # auto_now_add applied
    assert not event._state.adding


def test_row_update_encrypts_like_save_and_touches_only_the_named_columns(server):
    session = make_upstream_session(server, make_client(server))
    session.access_token = "at-rotated"
    session.refresh_count = 7
    session.subject = "not-written"
    row_update(session, ("access_token", "refresh_count"))
    stored = UpstreamSession.objects.get(pk=session.pk)
    assert stored.access_token == "at-rotated"  # decrypts: bound to its row as save() binds it
    assert stored.refresh_count == 7
    assert stored.subject != "not-written"
    raw = UpstreamSession.objects.filter(pk=session.pk).values_list("access_token", flat=True).get()
    assert "at-rotated" not in raw  # encrypted at rest


def test_a_rotation_retires_the_old_pair_and_links_the_new_one(client, server):
    mcp_client = make_client(server)
    first = issue_tokens(client, server, mcp_client)
    old_refresh = RefreshToken.objects.get(token_checksum=token_checksum(first["refresh_token"]))
    old_access_pk = old_refresh.access_token_id

    second = refresh(client, server, mcp_client, first["refresh_token"]).json()

    old_refresh.refresh_from_db()
    assert old_refresh.revoked is not None and old_refresh.access_token_id is None
    assert old_refresh.replay_response.startswith("v1:")  # the sealed answer for a duplicate
    assert not AccessToken.objects.filter(pk=old_access_pk).exists()
    new_refresh = RefreshToken.objects.get(token_checksum=token_checksum(second["refresh_token"]))
    new_access = AccessToken.objects.get(token_checksum=token_checksum(second["access_token"]))
    assert new_refresh.access_token_id == new_access.pk
    assert new_access.source_refresh_token_id == old_refresh.pk
    assert new_refresh.token_family == old_refresh.token_family
    assert new_refresh.upstream_session_id == new_access.upstream_session_id == old_refresh.upstream_session_id
    assert new_refresh.revoked is None and new_access.expires > timezone.now()
    assert new_access.scope == first["scope"] == second["scope"]


@pytest.mark.postgres  # rows_read serves the PostgreSQL statements only
def test_rows_read_builds_the_instances_the_orm_builds(server):
    from django.db import connection

    from oauthproxy.db.sql import rows_read, select_list

    session = make_upstream_session(server, make_client(server))
    table = connection.ops.quote_name(UpstreamSession._meta.db_table)
    [read] = rows_read(
        UpstreamSession, f"SELECT {select_list(UpstreamSession, 's')}, 42 FROM {table} s WHERE s.id = %s",
        [session.pk], extra=("answer",),
    )
    orm = UpstreamSession.objects.get(pk=session.pk)
    for field in UpstreamSession._meta.concrete_fields:
        assert getattr(read, field.attname) == getattr(orm, field.attname), field.name
    assert read.access_token == orm.access_token != ""  # decrypted as the ORM decrypts
    assert read.answer == 42
    assert not read._state.adding


@pytest.mark.postgres  # one statement on PostgreSQL; elsewhere one INSERT per row (tests/db/test_paths.py)
def test_rows_insert_writes_a_row_and_the_rows_that_point_at_it_in_one_statement(server, django_assert_num_queries):
    from oauthproxy.db.sql import rows_insert
    from oauthproxy.models import Client

    client = Client(server=server, name="Linked", client_id="linked-client", redirect_uris="http://127.0.0.1/cb",
                    client_type=Client.CLIENT_PUBLIC, authorization_grant_type=Client.GRANT_AUTHORIZATION_CODE)
    events = [AuditEvent(kind=AuditEvent.Kind.CLIENT_REGISTERED, server=server, message=str(n)) for n in range(2)]
    with django_assert_num_queries(1):
        rows_insert(client, *((event, "client") for event in events))
    stored = Client.objects.get(pk=client.pk)
    assert stored.client_id == "linked-client" and stored.server_id == server.pk
    assert sorted(AuditEvent.objects.filter(client=stored).values_list("message", flat=True)) == ["0", "1"]
    assert all(event.client is client and event.pk for event in events)


def test_row_insert_of_a_model_whose_primary_key_is_set_in_python(server):
    session = UpstreamSession(server=server, client=make_client(server), subject="bob", access_token="at-1",
                              refresh_token="rt-1")
    row_insert(session)
    assert UpstreamSession.objects.get(pk=session.pk).access_token == "at-1"
