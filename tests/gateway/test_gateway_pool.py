"""The gateway's connections to internal servers: kept alive and reused, bounded, never leaked, and never
stuck on a server that stops reading."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time

import aiohttp
import httpx
import pytest
from yarl import URL

from oauthproxy.core.http import InternalServerPool, PoolTimeout
from tests.conftest import make_server
from tests.gateway.conftest import ACCEPT, INITIALIZE, make_grant, rpc
from tests.gateway.internal_server import InternalMcpServer

pytestmark = pytest.mark.django_db(transaction=True)


def test_connections_are_kept_alive_and_reused(transactional_db, proxy, gateway_url):
    internal = InternalMcpServer()  # its own, so that no connection of an earlier test is idle in the pool
    try:
        grant = make_grant(make_server(slug="crm", mcp_url=internal.url))
        with httpx.Client(headers={**ACCEPT, **grant.auth}, timeout=10) as http:
            for _ in range(5):
                assert http.post(gateway_url(), json=INITIALIZE).status_code == 200
    finally:
        internal.stop()
    assert len(internal.client_ports) == 5
    assert len(set(internal.client_ports)) == 1  # one connection from the gateway for all five


async def _initialize(pool: InternalServerPool, url: str, *, pool_timeout: float = 1):
    """One MCP initialize sent with the pool, as the gateway sends it."""
    return await pool.request(
        "POST",
        URL(url),
        headers=[("accept", ACCEPT["Accept"]), ("content-type", "application/json")],
        body=json.dumps(INITIALIZE).encode(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=5),
        write_timeout=5,
        pool_timeout=pool_timeout,
    )


def test_idle_connections_expire_before_the_servers_keepalive(internal):
    async def scenario():
        pool = InternalServerPool(keepalive_expiry=0.2)
        try:
            for pause in (0, 0, 0.3):
                await asyncio.sleep(pause)
                response = await _initialize(pool, internal.url)
                assert response.status == 200
                await response.read()
                await response.aclose()
        finally:
            await pool.aclose()

    asyncio.run(scenario())
    first, second, third = internal.client_ports
    assert first == second != third


def test_pool_is_bounded_and_a_dropped_response_frees_its_slot(internal):
    async def scenario():
        pool = InternalServerPool(max_connections=1)
        try:
            held = await _initialize(pool, internal.url)
            with pytest.raises(PoolTimeout):
                await _initialize(pool, internal.url, pool_timeout=0.2)  # the only slot is taken
            del held  # dropped without aclose(): the finalizer gives the slot back
            gc.collect()
            await asyncio.sleep(0.05)
            response = await _initialize(pool, internal.url)
            assert response.status == 200
            await response.aclose()
        finally:
            await pool.aclose()

    asyncio.run(scenario())


def test_an_internal_server_that_stops_reading_is_504_after_the_write_timeout(
    transactional_db, proxy, gateway_url, settings
):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "GATEWAY_WRITE_TIMEOUT": 0.5}
    # Accepts connections (the kernel does) and never reads them: the request body cannot be sent.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as black_hole:
        black_hole.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(8)
        port = black_hole.getsockname()[1]
        grant = make_grant(make_server(slug="crm", mcp_url=f"http://127.0.0.1:{port}/mcp"))
        big = rpc("tools/call", {"name": "echo", "arguments": {"text": "x" * 15_000_000}})
        start = time.monotonic()
        response = httpx.post(gateway_url(), json=big, headers={**ACCEPT, **grant.auth}, timeout=30)
        elapsed = time.monotonic() - start
    assert response.status_code == 504
    assert response.json()["error"]["message"] == "The MCP server did not answer in time."
    assert elapsed < 10  # the read timeout (120 s) never started: the body was not sent
