"""The upstream token behind the gateway: refreshed when due, refreshed once and retried when the internal
server refuses it, and the session ended cleanly when the upstream refuses the refresh. The upstream
token endpoint is mocked with ``responses`` (the refresh runs in this process, in a worker thread)."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

import anyio
import httpx
import pytest
import responses

from tests.conftest import UPSTREAM, make_server
from tests.gateway.conftest import ACCEPT, INITIALIZE, make_grant, mcp_client

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN_ENDPOINT = f"{UPSTREAM}/token"
REFRESHED = {
    "access_token": "upstream-access-refreshed",
    "refresh_token": "upstream-refresh-2",
    "expires_in": 3600,
    "token_type": "Bearer",
}


def post(url: str, grant) -> httpx.Response:
    return httpx.post(url, json=INITIALIZE, headers={**ACCEPT, **grant.auth}, timeout=10)


def refresh_calls(idp: responses.RequestsMock) -> list[dict]:
    return [parse_qs(call.request.body) for call in idp.calls if call.request.url == TOKEN_ENDPOINT]


def test_internal_401_refreshes_once_and_retries(gateway, gateway_url, internal):
    internal.reject_tokens.add(gateway.upstream_token)
    with responses.RequestsMock() as idp:
        idp.post(TOKEN_ENDPOINT, json=REFRESHED)

        async def scenario():
            async with mcp_client(gateway_url(), gateway.token) as client:
                first = await client.call_tool("echo_auth", {})
                second = await client.call_tool("echo_auth", {})
                return first.content[0].text, second.content[0].text

        first, second = anyio.run(scenario)
        calls = refresh_calls(idp)
    assert first == second == "Bearer upstream-access-refreshed"
    assert internal.rejected == 1  # the retried request went through; later ones used the new token
    assert len(calls) == 1
    assert calls[0]["grant_type"] == ["refresh_token"] and calls[0]["refresh_token"] == ["upstream-refresh-1"]
    gateway.session.refresh_from_db()
    assert gateway.session.access_token == "upstream-access-refreshed"
    assert gateway.session.refresh_token == "upstream-refresh-2"
    assert gateway.session.refresh_count == 1


def test_internal_keeps_refusing_after_the_refresh_is_401_for_the_client(gateway, gateway_url, internal):
    internal.reject_tokens.update({gateway.upstream_token, REFRESHED["access_token"]})
    with responses.RequestsMock() as idp:
        idp.post(TOKEN_ENDPOINT, json=REFRESHED)
        response = post(gateway_url(), gateway)
        assert len(refresh_calls(idp)) == 1
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert 'resource_metadata="https://proxy.example.test/' in response.headers["www-authenticate"]
    assert "internal" not in response.headers["www-authenticate"]  # not the internal server's challenge
    assert internal.rejected == 2


def test_upstream_refusing_the_refresh_ends_the_session(gateway, gateway_url, internal):
    internal.reject_tokens.add(gateway.upstream_token)
    with responses.RequestsMock() as idp:
        idp.post(TOKEN_ENDPOINT, status=400, json={"error": "invalid_grant", "error_description": "revoked"})
        response = post(gateway_url(), gateway)
        again = post(gateway_url(), gateway)
        assert len(refresh_calls(idp)) == 1
    assert response.status_code == 401 and 'error="invalid_token"' in response.headers["www-authenticate"]
    assert again.status_code == 401
    gateway.session.refresh_from_db()
    assert gateway.session.revoked_at is not None
    assert internal.rejected == 1


def test_no_refresh_token_means_no_retry(transactional_db, proxy, internal, gateway_url):
    grant = make_grant(make_server(slug="crm", mcp_url=internal.url), upstream_refresh_token="")
    internal.reject_tokens.add(grant.upstream_token)
    with responses.RequestsMock() as idp:
        response = post(gateway_url(), grant)
        assert refresh_calls(idp) == []
    assert response.status_code == 401 and 'error="invalid_token"' in response.headers["www-authenticate"]


def test_due_upstream_token_is_refreshed_before_forwarding_and_only_once(
    transactional_db, proxy, internal, gateway_url
):
    # Expires in 30 s, inside the 60 s refresh margin: due.
    grant = make_grant(make_server(slug="crm", mcp_url=internal.url), upstream_expires_in=30)
    with responses.RequestsMock() as idp:
        idp.post(TOKEN_ENDPOINT, json=REFRESHED)
        for _ in range(3):
            assert post(gateway_url(), grant).status_code == 200
            assert internal.last_headers["authorization"] == "Bearer upstream-access-refreshed"
        assert len(refresh_calls(idp)) == 1


def test_concurrent_requests_with_a_due_token_refresh_upstream_once(transactional_db, proxy, internal, gateway_url):
    grant = make_grant(make_server(slug="crm", mcp_url=internal.url), upstream_expires_in=30)

    async def burst():
        async with httpx.AsyncClient(headers={**ACCEPT, **grant.auth}, timeout=10) as http:
            return await asyncio.gather(*(http.post(gateway_url(), json=INITIALIZE) for _ in range(8)))

    with responses.RequestsMock() as idp:
        idp.post(TOKEN_ENDPOINT, json=REFRESHED)
        answers = asyncio.run(burst())
        assert len(refresh_calls(idp)) == 1
    assert [a.status_code for a in answers] == [200] * 8
    assert {h["authorization"] for h in internal.headers} == {"Bearer upstream-access-refreshed"}


def test_upstream_down_with_a_still_valid_token_uses_it_and_backs_off(transactional_db, proxy, internal, gateway_url):
    grant = make_grant(make_server(slug="crm", mcp_url=internal.url), upstream_expires_in=30)
    with responses.RequestsMock() as idp:
        idp.post(TOKEN_ENDPOINT, status=503, body="unavailable")
        for _ in range(3):
            assert post(gateway_url(), grant).status_code == 200
            assert internal.last_headers["authorization"] == f"Bearer {grant.upstream_token}"
        assert len(refresh_calls(idp)) == 1  # retried after a pause, not on every request


def test_upstream_down_with_an_expired_token_is_503(transactional_db, proxy, internal, gateway_url):
    grant = make_grant(make_server(slug="crm", mcp_url=internal.url), upstream_expires_in=-10)
    with responses.RequestsMock() as idp:
        idp.post(TOKEN_ENDPOINT, status=503, body="unavailable")
        response = post(gateway_url(), grant)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json()["error"]["message"] == "The identity provider is unavailable; try again shortly."
    assert internal.requests == {}
