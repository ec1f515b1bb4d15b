"""The read of a client by ``(server, client_id)`` that every request of a metadata-document client makes
when its cached copy is due.

On PostgreSQL a statement built once per process from the model's metadata; elsewhere the ORM. A read
only: no signals involved.
"""

from __future__ import annotations

from functools import cache

from django.db import connection

from oauthproxy.db.sql import fast_path, rows_read, select_list
from oauthproxy.models import Client


def client_row(*, server_pk, client_id: str) -> Client | None:
    """The stored client *client_id* of a server (``(server, client_id)`` is unique), or None."""
    if fast_path():
        return next(iter(rows_read(Client, _client_row_sql(), [server_pk, client_id])), None)
    return next(iter(Client.objects.filter(server_id=server_pk, client_id=client_id)[:1]), None)


@cache
def _client_row_sql() -> str:
    quote, client = connection.ops.quote_name, Client._meta
    server_id, client_id = (quote(client.get_field(name).column) for name in ("server", "client_id"))
    return (
        f"SELECT {select_list(Client, 'c')} FROM {quote(client.db_table)} c"  # noqa: S608 (identifiers from metadata)
        f" WHERE c.{server_id} = %s AND c.{client_id} = %s LIMIT 1"
    )
