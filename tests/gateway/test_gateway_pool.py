"""The gateway's connections to internal servers: kept alive and reused, bounded, never leaked."""

from __future__ import annotations

import asyncio
import gc
import json
import time

import httpcore
import httpx
import pytest

from oauthproxy.services.gateway import PoolTimeout, UpstreamPool
from tests.gateway.conftest import ACCEPT, INITIALIZE

pytestmark = pytest.mark.django_db(transaction=True)


def test_connections_are_kept_alive_and_reused(gateway, gateway_url, internal):
    with httpx.Client(headers={**ACCEPT, **gateway.auth}, timeout=10) as http:
        for _ in range(5):
            assert http.post(gateway_url(), json=INITIALIZE).status_code == 200
    assert len(internal.client_ports) == 5
    assert len(set(internal.client_ports)) == 1  # one connection from the gateway for all five


def test_idle_connections_expire_before_the_servers_keepalive(gateway, gateway_url, internal, monkeypatch):
    monkeypatch.setattr("oauthproxy.services.gateway.KEEPALIVE_EXPIRY", 0.2)
    with httpx.Client(headers={**ACCEPT, **gateway.auth}, timeout=10) as http:
        assert http.post(gateway_url(), json=INITIALIZE).status_code == 200
        assert http.post(gateway_url(), json=INITIALIZE).status_code == 200
        time.sleep(0.3)
        assert http.post(gateway_url(), json=INITIALIZE).status_code == 200
    first, second, third = internal.client_ports
    assert first == second != third


def _request(url: str) -> httpcore.Request:
    parsed = httpx.URL(url)
    body = json.dumps(INITIALIZE).encode()
    return httpcore.Request(
        "POST",
        httpcore.URL(scheme=parsed.raw_scheme, host=parsed.raw_host, port=parsed.port, target=parsed.raw_path),
        headers=[(b"host", parsed.netloc), (b"accept", b"application/json, text/event-stream"),
                 (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        content=body,
        extensions={"timeout": {"connect": 5, "read": 5, "write": 5}},
    )


def test_pool_is_bounded_and_a_dropped_response_frees_its_slot(_internal_session):
    url = _internal_session.url

    async def scenario():
        pool = UpstreamPool(max_connections=1)
        held = await pool.request(_request(url), pool_timeout=1)
        with pytest.raises(PoolTimeout):
            await pool.request(_request(url), pool_timeout=0.2)  # the only slot is taken
        del held  # dropped without aclose(): the finalizer gives the slot back
        gc.collect()
        await asyncio.sleep(0.05)
        response = await pool.request(_request(url), pool_timeout=1)
        assert response.status == 200
        await response.aclose()
        await pool.aclose()

    asyncio.run(scenario())
