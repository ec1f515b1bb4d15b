"""Revocation is immediate (issue 13, finding 9): the process that ended a session refuses its token on
the next request, and another process hears of it through PostgreSQL NOTIFY within a second, not after
the token cache lifetime (GATEWAY_CACHE_SECONDS, 5 s by default)."""

from __future__ import annotations

import time

import httpx
import psycopg
import pytest
from django.db import connection

from oauthproxy.console.clients import client_update
from oauthproxy.core.invalidation import (
    CHANNEL,
    invalidation_listen_ensure,
    invalidation_listen_stop,
    invalidation_listening,
)
from oauthproxy.grants.sessions import upstream_session_revoke
from oauthproxy.models import AccessToken, UpstreamSession
from tests.gateway.conftest import ACCEPT, INITIALIZE

pytestmark = pytest.mark.django_db(transaction=True)


def status(url: str, grant) -> int:
    return httpx.post(url, json=INITIALIZE, headers={**ACCEPT, **grant.auth}, timeout=10).status_code


def test_an_ended_session_is_refused_on_the_next_request(gateway, gateway_url, upstream):
    assert status(gateway_url(), gateway) == 200  # validated and cached
    upstream_session_revoke(session=gateway.session, reason="revoked by the test")
    assert status(gateway_url(), gateway) == 401  # at once, not after the cache lifetime


def test_a_disabled_client_is_refused_on_the_next_request(gateway, gateway_url, admin_user):
    assert status(gateway_url(), gateway) == 200
    client_update(client=gateway.client, actor=admin_user, disabled=True)
    assert status(gateway_url(), gateway) == 401


@pytest.mark.postgres  # LISTEN/NOTIFY
def test_another_process_forgets_an_ended_session_within_a_second(gateway, gateway_url, settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "INVALIDATION_LISTEN": True}
    invalidation_listen_ensure()
    try:
        deadline = time.monotonic() + 10
        while not invalidation_listening() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert invalidation_listening()
        assert status(gateway_url(), gateway) == 200
        # Another process ends the session: its own connection, its own NOTIFY; nothing here is told.
        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        with psycopg.connect(**params, autocommit=True) as other:
            sessions, tokens = UpstreamSession._meta.db_table, AccessToken._meta.db_table
            other.execute(f"UPDATE {sessions} SET revoked_at = now() WHERE id = %s", [gateway.session.pk])
            other.execute(f"DELETE FROM {tokens} WHERE upstream_session_id = %s", [gateway.session.pk])
            other.execute("SELECT pg_notify(%s, %s)", [CHANNEL, f"session:{gateway.session.pk}"])
            revoked_at = time.monotonic()
        while status(gateway_url(), gateway) == 200:
            assert time.monotonic() - revoked_at < 1.0, "still accepted a second after the revocation"
            time.sleep(0.02)
        assert time.monotonic() - revoked_at < 1.0
    finally:
        invalidation_listen_stop()
