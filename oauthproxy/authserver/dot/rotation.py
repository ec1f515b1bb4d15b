"""A refresh token rotation written in one SQL statement.

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
"""

from __future__ import annotations

from datetime import datetime
from functools import cache

from django.db import connection
from django.db.models import Field

from oauthproxy.db.sql import column_list, db_values, insert_fields, saved
from oauthproxy.models import AccessToken, AuditEvent, RefreshToken


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
    sql, access_fields, refresh_fields, audit_fields = _statement()
    params: list = [now, now, sealed_answer, retired.pk, retired.access_token_id]
    params += db_values(access_fields, access_token, add=True)
    params += db_values(audit_fields, audit, add=True)
    params += db_values(refresh_fields, refresh_token, add=True)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        access_pk, refresh_pk = cursor.fetchone()
    saved(access_token, access_pk)
    saved(refresh_token, refresh_pk)
    saved(audit)
    refresh_token.access_token = access_token
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
