"""A database error is an outage (503 with Retry-After) only when the database cannot be reached; any other
database error is a bug: a 500 with its traceback in the log. SQLite reports a syntax error as
``OperationalError``, the class PostgreSQL uses for a refused connection, so the class alone cannot decide."""

import asyncio
import logging
from unittest import mock

import httpx
import pytest
from django.db import DatabaseError, InterfaceError, OperationalError, connection
from django.test import Client as HttpClient

from oauthproxy.db.errors import database_unreachable
from proxy_site.asgi import application  # imported here: it sets logging up again, which caplog must follow


def _syntax_error() -> DatabaseError:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELEC 1")
    except DatabaseError as exc:
        return exc
    raise AssertionError("the statement ran")


def _failing_view_part(*args, **kwargs):
    with connection.cursor() as cursor:
        cursor.execute("SELEC 1")


@pytest.mark.django_db
def test_a_syntax_error_is_not_an_outage():
    assert not database_unreachable(_syntax_error())


def test_a_lost_connection_is_an_outage():
    assert database_unreachable(InterfaceError("connection already closed"))
    assert database_unreachable(OperationalError("could not connect to server"))  # no answer from a server
    assert not database_unreachable(ValueError("not a database error"))


def test_postgresql_answers_are_judged_by_their_sqlstate():
    def answered(sqlstate: str) -> OperationalError:
        cause = type("PsycopgError", (Exception,), {"sqlstate": sqlstate})("x")
        error = OperationalError("x")
        error.__cause__ = cause
        return error

    assert database_unreachable(answered("08006"))  # connection failure
    assert database_unreachable(answered("57P01"))  # admin shutdown
    assert database_unreachable(answered("53300"))  # too many connections
    assert not database_unreachable(answered("42601"))  # syntax error
    assert not database_unreachable(answered("40P01"))  # deadlock: a bug to fix, not an outage


@pytest.mark.django_db
def test_a_syntax_error_on_a_page_is_a_500_not_a_503(server, caplog):
    http = HttpClient(raise_request_exception=False)
    with mock.patch("oauthproxy.authserver.views.authorize.server_get_enabled", side_effect=_failing_view_part):
        response = http.get(f"/oauth/{server.slug}/authorize?client_id=x")
    assert response.status_code == 500
    assert "Retry-After" not in response


@pytest.mark.django_db(transaction=True)  # the endpoint runs on the endpoint threads
def test_a_syntax_error_at_an_endpoint_is_a_500_with_its_traceback_logged(server, caplog):
    async def call():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
            return await client.post(f"/oauth/{server.slug}/token", content=b"grant_type=refresh_token",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})

    caplog.set_level(logging.ERROR)
    with mock.patch("oauthproxy.authserver.views.protocol.server_get_enabled", side_effect=_failing_view_part):
        response = asyncio.run(call())
    assert response.status_code == 500
    assert "Retry-After" not in response.headers
    logged = [record for record in caplog.records if record.exc_info]
    assert logged and "SELEC" in logged[-1].getMessage() + str(logged[-1].exc_info[1])


def test_sqlite_answers_are_judged_by_their_result_code(tmp_path):
    import sqlite3

    def failed(sql: str, path: str) -> OperationalError:
        try:
            sqlite3.connect(path).execute(sql)
        except sqlite3.OperationalError as cause:
            error = OperationalError(str(cause))
            error.__cause__ = cause
            return error
        raise AssertionError("the statement ran")

    assert database_unreachable(failed("SELECT 1", str(tmp_path / "missing-directory" / "db.sqlite3")))
    assert not database_unreachable(failed("SELEC 1", ":memory:"))
    assert not database_unreachable(failed("SELECT * FROM no_such_table", ":memory:"))
