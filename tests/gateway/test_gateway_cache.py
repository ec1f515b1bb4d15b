"""The hot path: no database query for a cached valid token, revocation within the cache TTL, token
expiry on every request, one load for a burst of cold requests; and the cache itself."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from django.db import connections
from django.test import AsyncClient

from oauthproxy.gateway.auth import TTLCache
from oauthproxy.gateway.forwarding import internal_server_pool_close
from tests.conftest import make_server
from tests.gateway.conftest import ACCEPT, INITIALIZE, make_grant, rpc

pytestmark = pytest.mark.django_db(transaction=True)


def post(url: str, auth: dict, http: httpx.Client | None = None) -> httpx.Response:
    return (http or httpx).post(url, json=INITIALIZE, headers={**ACCEPT, **auth}, timeout=10)


def test_cached_valid_token_costs_no_database_query(gateway, gateway_url, count_queries):
    with httpx.Client() as http:
        assert post(gateway_url(), gateway.auth, http).status_code == 200  # loads server and token
        loaded = count_queries.count
        for _ in range(20):
            assert post(gateway_url(), gateway.auth, http).status_code == 200
    assert loaded >= 2
    assert count_queries.count == loaded  # not a single query for the 20 requests after the first


def test_refused_tokens_and_unknown_slugs_are_cached_too(gateway, gateway_url, count_queries):
    bogus = {"Authorization": "Bearer not-a-real-token-0123456789"}
    with httpx.Client() as http:
        assert post(gateway_url(), bogus, http).status_code == 401
        assert post(gateway_url("nope"), bogus, http).status_code == 404
        loaded = count_queries.count
        for _ in range(5):
            assert post(gateway_url(), bogus, http).status_code == 401
            assert post(gateway_url("nope"), bogus, http).status_code == 404
    assert count_queries.count == loaded


def test_revocation_takes_effect_within_the_cache_ttl(gateway, gateway_url, settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "GATEWAY_CACHE_SECONDS": 1.0}
    with httpx.Client() as http:
        assert post(gateway_url(), gateway.auth, http).status_code == 200
        gateway.access_token.revoke()  # DOT revocation deletes the row
        revoked_at = time.monotonic()
        while post(gateway_url(), gateway.auth, http).status_code == 200:
            assert time.monotonic() - revoked_at < 3, "revoked token still accepted after the cache TTL"
            time.sleep(0.05)
        refused_after = time.monotonic() - revoked_at
    assert refused_after <= 1.0 + 0.5


def test_disabling_a_server_stops_its_tokens_within_the_token_ttl_then_404(gateway, gateway_url, settings):
    settings.OAUTHPROXY = {
        **settings.OAUTHPROXY, "GATEWAY_CACHE_SECONDS": 0.5, "SERVER_CACHE_SECONDS": 1.5
    }
    assert post(gateway_url(), gateway.auth).status_code == 200
    gateway.server.enabled = False
    gateway.server.save()
    disabled_at = time.monotonic()
    statuses = []
    while not statuses or statuses[-1][1] != 404:
        assert time.monotonic() - disabled_at < 4
        statuses.append((time.monotonic() - disabled_at, post(gateway_url(), gateway.auth).status_code))
        time.sleep(0.05)
    first_refusal = next(t for t, status in statuses if status != 200)
    assert first_refusal <= 0.5 + 0.4  # the token: refused once its cache entry expired
    assert statuses[-1][0] <= 1.5 + 0.4  # the server: unknown once its own entry expired
    assert {status for _, status in statuses} <= {200, 401, 404}


def test_a_cached_token_still_expires_on_time(transactional_db, proxy, internal, gateway_url, count_queries):
    grant = make_grant(make_server(slug="crm", mcp_url=internal.url), expires_in=2)
    with httpx.Client() as http:
        assert post(gateway_url(), grant.auth, http).status_code == 200
        loaded = count_queries.count
        deadline = grant.access_token.expires.timestamp()
        while True:
            status = post(gateway_url(), grant.auth, http).status_code
            if status == 401:
                break
            assert time.time() < deadline + 0.5
            time.sleep(0.05)
    assert time.time() >= deadline
    assert count_queries.count == loaded  # refused from the cache: expiry is checked on every request


def test_a_burst_of_cold_requests_loads_the_token_once(gateway, gateway_url, count_queries):
    async def burst():
        async with httpx.AsyncClient(headers={**ACCEPT, **gateway.auth}, timeout=10) as http:
            return await asyncio.gather(*(http.post(gateway_url(), json=INITIALIZE) for _ in range(10)))

    answers = asyncio.run(burst())
    assert [a.status_code for a in answers] == [200] * 10
    # one for the server, one for its team's destination rules (cached with it), one for the token and session
    assert count_queries.count == 3


def test_django_route_serves_the_gateway_too(transactional_db, proxy, internal_json, count_queries):
    """Through Django's own handler and middleware (not the lean ASGI entry), in one event loop as an ASGI
    server runs it: same answers, and the middleware (sessions, auth, CSRF, messages) touches no database
    either."""
    grant = make_grant(make_server(slug="plain", mcp_url=internal_json.url))
    call = rpc("tools/call", {"name": "echo", "arguments": {"text": "via django"}}, id=3)

    async def scenario():
        client, headers = AsyncClient(), {**ACCEPT, **grant.auth}
        try:
            first = await client.post("/mcp/plain", call, content_type="application/json", headers=headers)
            loaded = count_queries.count
            second = await client.post("/mcp/plain/", call, content_type="application/json", headers=headers)
            again = count_queries.count
            refused = await client.post("/mcp/plain", call, content_type="application/json")
        finally:
            await internal_server_pool_close()  # what the ASGI lifespan does at shutdown
        return first, second, refused, loaded, again

    first, second, refused, loaded, again = asyncio.run(scenario())
    assert first.status_code == 200 and first.json()["result"]["content"][0]["text"] == "via django"
    assert second.status_code == 200
    assert again == loaded
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer resource_metadata=")


# -- the cache itself --------------------------------------------------------------------------------

def test_ttl_cache_expires_entries(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("oauthproxy.gateway.auth.time.monotonic", lambda: now[0])
    cache = TTLCache(maxsize=10)
    cache.set("a", 1, ttl=5)
    assert cache.get("a") == 1
    now[0] += 4.9
    assert cache.get("a") == 1
    now[0] += 0.2
    assert cache.get("a") is None and len(cache) == 0


def test_ttl_cache_evicts_the_least_recently_used():
    cache = TTLCache(maxsize=3)
    for key in "abc":
        cache.set(key, key, ttl=60)
    assert cache.get("a") == "a"  # a is now the most recently used
    cache.set("d", "d", ttl=60)
    assert cache.get("b") is None
    assert [cache.get(k) for k in "acd"] == ["a", "c", "d"]
    assert len(cache) == 3


def test_database_outage_cached_tokens_keep_working_others_get_503(gateway, gateway_url, monkeypatch):
    with httpx.Client() as http:
        assert post(gateway_url(), gateway.auth, http).status_code == 200
        # The database goes away: new connections (the gateway's worker threads open one per cache
        # miss) fail; the connection of this test's own thread stays usable for the teardown.
        if connections["default"].vendor == "postgresql":
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                closed_port = sock.getsockname()[1]
            monkeypatch.setitem(connections.settings["default"], "PORT", closed_port)
        else:  # SQLite: a database file that cannot be opened
            monkeypatch.setitem(connections.settings["default"], "NAME", "/nonexistent-directory/db.sqlite3")
        assert post(gateway_url(), gateway.auth, http).status_code == 200
        unknown = post(gateway_url(), {"Authorization": "Bearer another-token-not-in-the-cache"}, http)
    assert unknown.status_code == 503
    assert unknown.headers["retry-after"] == "5"
    assert unknown.json()["error"]["message"] == "The gateway is temporarily unavailable; try again shortly."
