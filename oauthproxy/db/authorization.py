"""The authorization flow's reads and conditional writes of its PendingAuthorization row.

On PostgreSQL they are statements written once per process from the models' metadata instead of compiled
by the ORM on every request (the compilation cost several times what PostgreSQL spends running them;
``docs/PERFORMANCE.md`` finding 7). Values are converted and prepared by the fields themselves, as the ORM
does (decryption, encryption bound to the row, JSON). On other databases (``fast_path()`` false) the same
reads and conditional updates go through the ORM. The conditional updates are ``UPDATE ... WHERE`` on both
paths: exactly one of any number of concurrent callers wins. Nothing caches these rows (no signals).
"""

from __future__ import annotations

from datetime import datetime
from functools import cache

from django.db import connection

from oauthproxy.db.sql import db_values, fast_path, row_instance, select_list
from oauthproxy.models import Client, PendingAuthorization

APPROVAL_FIELDS = ("state_checksum", "approved_at", "expires_at", "upstream_code_verifier")


def pending_unanswered(*, pk, server_pk) -> PendingAuthorization | None:
    """A client's request not answered yet, by primary key and server (the consent page), with its client."""
    if fast_path():
        return _pending_read(_pending_unanswered_sql(), [pk, server_pk])
    rows = PendingAuthorization.objects.select_related("client").filter(
        pk=pk, server_id=server_pk, approved_at__isnull=True, client__isnull=False
    )
    return next(iter(rows[:1]), None)


def pending_of_state(*, state_checksum: str, server_pk) -> PendingAuthorization | None:
    """The request (or "Try it" test: no client) of an upstream state, by its checksum and server (the
    callback)."""
    if fast_path():
        return _pending_read(_pending_of_state_sql(), [state_checksum, server_pk])
    rows = PendingAuthorization.objects.select_related("client").filter(
        state_checksum=state_checksum, server_id=server_pk
    )
    return next(iter(rows[:1]), None)


def pending_approved(pending: PendingAuthorization, *, now: datetime) -> bool:
    """Store the approval set on *pending* (``APPROVAL_FIELDS``) if its row is still open: unanswered,
    unconsumed, unexpired. False when another request answered it first (or it expired)."""
    fields = tuple(PendingAuthorization._meta.get_field(name) for name in APPROVAL_FIELDS)
    if not fast_path():
        values = {field.attname: value for field, value in zip(fields, _saved_values(fields, pending), strict=True)}
        return PendingAuthorization.objects.filter(
            pk=pending.pk, approved_at__isnull=True, consumed_at__isnull=True, expires_at__gt=now
        ).update(**values) == 1
    with connection.cursor() as cursor:
        cursor.execute(_pending_approve_sql(), [*db_values(fields, pending, add=False), pending.pk, now])
        return cursor.rowcount == 1


def pending_consumed(pending: PendingAuthorization, *, browser_key_checksum: str, now: datetime) -> bool:
    """Consume *pending* if it is approved, unconsumed, unexpired and of this browser: True for exactly one
    of any number of concurrent callers."""
    if not fast_path():
        return PendingAuthorization.objects.filter(
            pk=pending.pk, browser_key_checksum=browser_key_checksum, approved_at__isnull=False,
            consumed_at__isnull=True, expires_at__gt=now,
        ).update(consumed_at=now) == 1
    with connection.cursor() as cursor:
        cursor.execute(_pending_consume_sql(), [now, pending.pk, browser_key_checksum, now])
        return cursor.rowcount == 1


def _saved_values(fields, pending: PendingAuthorization) -> list:
    """The values ``save()`` would store (``pre_save``: the encrypted field encrypts, bound to the row)."""
    return [field.pre_save(pending, False) for field in fields]


def _pending_read(sql: str, params: list) -> PendingAuthorization | None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return None
    split = len(PendingAuthorization._meta.concrete_fields)
    pending = row_instance(PendingAuthorization, row[:split])
    if pending.client_id is not None:  # else a "Try it" test: nothing was joined
        pending.client = row_instance(Client, row[split:])
    return pending


def _quote(name: str) -> str:
    return connection.ops.quote_name(name)


def _column(name: str) -> str:
    """The quoted column of a PendingAuthorization field."""
    return _quote(PendingAuthorization._meta.get_field(name).column)


def _pending_select(join: str, where: str) -> str:
    pending, client = PendingAuthorization._meta, Client._meta
    return (
        f"SELECT {select_list(PendingAuthorization, 'p')}, {select_list(Client, 'c')}"  # noqa: S608 (metadata)
        f" FROM {_quote(pending.db_table)} p {join} JOIN {_quote(client.db_table)} c"
        f" ON c.{_quote(client.pk.column)} = p.{_column('client')} WHERE {where} LIMIT 1"
    )


@cache
def _pending_unanswered_sql() -> str:
    return _pending_select(
        "INNER", f"p.{_column('id')} = %s AND p.{_column('server')} = %s AND p.{_column('approved_at')} IS NULL"
    )


@cache
def _pending_of_state_sql() -> str:
    return _pending_select("LEFT", f"p.{_column('state_checksum')} = %s AND p.{_column('server')} = %s")


@cache
def _pending_approve_sql() -> str:
    assignments = ", ".join(f"{_column(name)} = %s" for name in APPROVAL_FIELDS)
    return (
        f"UPDATE {_quote(PendingAuthorization._meta.db_table)} SET {assignments}"  # noqa: S608 (metadata)
        f" WHERE {_column('id')} = %s AND {_column('approved_at')} IS NULL AND {_column('consumed_at')} IS NULL"
        f" AND {_column('expires_at')} > %s"
    )


@cache
def _pending_consume_sql() -> str:
    return (
        f"UPDATE {_quote(PendingAuthorization._meta.db_table)} SET {_column('consumed_at')} = %s"  # noqa: S608
        f" WHERE {_column('id')} = %s AND {_column('browser_key_checksum')} = %s"
        f" AND {_column('approved_at')} IS NOT NULL AND {_column('consumed_at')} IS NULL"
        f" AND {_column('expires_at')} > %s"
    )
