"""The statements of every refresh: the session row lock, the refresh token read, and the rotation.

The two reads are written once here instead of compiled by the ORM on each request (the compilation cost
as much as the queries; ``docs/PERFORMANCE.md`` finding 4); tables and columns come from the models'
metadata.

The rotation is one SQL statement.

Rotating a refresh token is five writes: retire the refresh token presented (``revoked``, its sealed
answer for a duplicate within the grace window, no access token any more), delete its access token,
insert the new access token, insert the new refresh token pointing at it, and the audit event. Through
the ORM that is five round trips to PostgreSQL and five query compilations, about a third of a refresh's cost
(``docs/PERFORMANCE.md`` finding 4). Here they are one statement of data-modifying CTEs, built once per
process from the models' own metadata, with each value prepared by its field exactly as ``Model.save()``
prepares it (``oauthproxy.db.sql``: checksums, ``auto_now`` stamps, JSON, UUIDs). It runs
inside the caller's transaction, under the session row lock the grant took, so it is as atomic and as
serialised as the four writes were. The foreign keys between the rows are deferred (Django creates them
``DEFERRABLE INITIALLY DEFERRED``) and checked at commit.

On other databases (``fast_path()`` false) each function takes the same steps through the ORM.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache

from django.db import connection, transaction
from django.db.models import F, Field

from oauthproxy.db.sql import (
    column_list,
    db_values,
    fast_path,
    insert_fields,
    orm_insert,
    rows_read,
    saved,
    select_list,
)
from oauthproxy.models import AccessToken, AuditEvent, RefreshToken, UpstreamSession


def refresh_session_locked(*, checksum: str, client_pk) -> UpstreamSession | None:
    """The upstream session of a refresh token (by checksum, for a client), row-locked until the end of the
    caller's transaction."""
    if fast_path():
        return next(iter(rows_read(UpstreamSession, _session_lock_sql(), [checksum, client_pk])), None)
    sessions = UpstreamSession.objects.select_for_update().filter(
        refresh_tokens__token_checksum=checksum, refresh_tokens__application_id=client_pk
    )
    return next(iter(sessions[:1]), None)


def refresh_token_read(*, checksum: str, client_pk, session_pk) -> RefreshToken | None:
    """A refresh token (by checksum, for a client and session) with the scope of its access token as
    ``access_token_scope`` (None once it has none)."""
    if fast_path():
        rows = rows_read(RefreshToken, _refresh_token_sql(), [checksum, client_pk, session_pk],
                         extra=("access_token_scope",))
        return next(iter(rows), None)
    tokens = RefreshToken.objects.annotate(access_token_scope=F("access_token__scope")).filter(
        token_checksum=checksum, application_id=client_pk, upstream_session_id=session_pk
    )
    return next(iter(tokens[:1]), None)


@cache
def _session_lock_sql() -> str:
    quote = connection.ops.quote_name
    refresh = RefreshToken._meta
    session_id, client_id = (quote(refresh.get_field(name).column) for name in ("upstream_session", "application"))
    return (
        f"SELECT {select_list(UpstreamSession, 's')} FROM {quote(UpstreamSession._meta.db_table)} s"  # noqa: S608
        f" JOIN {quote(refresh.db_table)} r ON r.{session_id} = s.{quote('id')}"
        f" WHERE r.{quote('token_checksum')} = %s AND r.{client_id} = %s"
        " LIMIT 1 FOR NO KEY UPDATE OF s"
    )


@cache
def _refresh_token_sql() -> str:
    quote = connection.ops.quote_name
    refresh = RefreshToken._meta
    session_id, client_id, access_id = (
        quote(refresh.get_field(name).column) for name in ("upstream_session", "application", "access_token")
    )
    return (
        f"SELECT {select_list(RefreshToken, 'r')}, a.{quote('scope')} FROM {quote(refresh.db_table)} r"  # noqa: S608
        f" LEFT JOIN {quote(AccessToken._meta.db_table)} a ON a.{quote('id')} = r.{access_id}"
        f" WHERE r.{quote('token_checksum')} = %s AND r.{client_id} = %s AND r.{session_id} = %s LIMIT 1"
    )


def rotation_write(
    *,
    retired: RefreshToken,
    sealed_answer: str,
    now: datetime,
    access_token: AccessToken,
    refresh_token: RefreshToken,
    audit: AuditEvent,
) -> None:
    """Retire *retired* (and delete its access token), insert *access_token* and *refresh_token* (whose
    ``access_token`` becomes the new access token) and the *audit* event of the refresh. The new instances
    get their primary keys (the audit event's is not read back) and are saved."""
    if not fast_path():
        _rotation_orm(retired=retired, sealed_answer=sealed_answer, now=now, access_token=access_token,
                      refresh_token=refresh_token, audit=audit)
        return
    sql, access_fields, refresh_fields, audit_fields = _statement()
    params: list = [now, now, sealed_answer, retired.pk, retired.access_token_id]
    params += db_values(access_fields, access_token, add=True)
    params += db_values(audit_fields, audit, add=True)
    params += db_values(refresh_fields, refresh_token, add=True)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        access_pk, refresh_pk = cursor.fetchone()
    saved(access_token, access_pk)
    refresh_token.access_token = access_token
    saved(refresh_token, refresh_pk)
    saved(audit)
    _retired(retired, sealed_answer=sealed_answer, now=now)


def _rotation_orm(*, retired, sealed_answer, now, access_token, refresh_token, audit) -> None:
    with transaction.atomic():
        RefreshToken.objects.filter(pk=retired.pk).update(
            revoked=now, updated=now, access_token=None, replay_response=sealed_answer
        )
        if retired.access_token_id is not None:
            AccessToken.objects.filter(pk=retired.access_token_id).delete()
        orm_insert(access_token)
        orm_insert(audit)
        refresh_token.access_token = access_token
        orm_insert(refresh_token)
    _retired(retired, sealed_answer=sealed_answer, now=now)


def _retired(retired: RefreshToken, *, sealed_answer: str, now: datetime) -> None:
    """*retired* as its row now reads."""
    retired.revoked = retired.updated = now
    retired.access_token_id = None
    retired.replay_response = sealed_answer


@cache
def _statement() -> tuple[str, tuple[Field, ...], tuple[Field, ...], tuple[Field, ...]]:
    quote = connection.ops.quote_name
    access_table, refresh_table = quote(AccessToken._meta.db_table), quote(RefreshToken._meta.db_table)
    access_fields, audit_fields = insert_fields(AccessToken), insert_fields(AuditEvent)
    link = RefreshToken._meta.get_field("access_token")
    refresh_fields = insert_fields(RefreshToken)
    refresh_values = ", ".join("(SELECT id FROM new_access)" if field is link else "%s" for field in refresh_fields)
    # Identifiers from the models' metadata, quoted; every value is a parameter.
    sql = f"""
        WITH retired AS (
            UPDATE {refresh_table}
            SET {quote("revoked")} = %s, {quote("updated")} = %s, {quote(link.column)} = NULL,
                {quote("replay_response")} = %s
            WHERE {quote("id")} = %s
        ), dropped AS (
            DELETE FROM {access_table} WHERE {quote("id")} = %s
        ), new_access AS (
            INSERT INTO {access_table} ({column_list(access_fields)})
            VALUES ({", ".join("%s" for _ in access_fields)})
            RETURNING {quote("id")}
        ), audited AS (
            INSERT INTO {quote(AuditEvent._meta.db_table)} ({column_list(audit_fields)})
            VALUES ({", ".join("%s" for _ in audit_fields)})
        )
        INSERT INTO {refresh_table} ({column_list(refresh_fields)})
        VALUES ({refresh_values})
        RETURNING (SELECT id FROM new_access), {quote("id")}
    """  # noqa: S608
    return sql, access_fields, tuple(field for field in refresh_fields if field is not link), audit_fields
