"""What the gateway answers itself: 401/403 with their challenges, 404, 405, 413, and 502/503/504 when
the internal server is down, slow or not configured (JSON-RPC-shaped bodies, never a hang)."""

from __future__ import annotations

import socket
import time

import anyio
import httpx
import pytest
from mcp import MCPError

from tests.conftest import make_server
from tests.gateway.conftest import ACCEPT, INITIALIZE, PROTOCOL_VERSION, make_grant, mcp_client, messages, rpc

pytestmark = pytest.mark.django_db(transaction=True)

RESOURCE_METADATA = "https://proxy.example.test/.well-known/oauth-protected-resource/mcp/crm"


def post(url: str, headers: dict | None = None, body: dict = INITIALIZE, timeout: float = 10) -> httpx.Response:
    return httpx.post(url, json=body, headers={**ACCEPT, **(headers or {})}, timeout=timeout)


def challenge(response: httpx.Response) -> str:
    return response.headers["www-authenticate"]


def test_missing_token_is_401_with_resource_metadata_and_scope(gateway, gateway_url, internal):
    response = post(gateway_url())
    assert response.status_code == 401
    assert challenge(response) == (
        f'Bearer resource_metadata="{RESOURCE_METADATA}", scope="openid email offline_access"'
    )
    assert response.headers["cache-control"] == "no-store"
    assert internal.requests == {}  # nothing reached the internal server


@pytest.mark.parametrize(
    "authorization",
    ["Basic dXNlcjpwYXNz", "bearer", "Token abc"],
    ids=["basic", "empty-bearer", "other-scheme"],
)
def test_no_bearer_token_is_treated_as_missing(gateway, gateway_url, authorization):
    response = post(gateway_url(), {"Authorization": authorization})
    assert response.status_code == 401
    assert "error=" not in challenge(response)
    assert f'resource_metadata="{RESOURCE_METADATA}"' in challenge(response)


@pytest.mark.parametrize(
    "token",
    ["not-a-proxy-token-" + "x" * 20, "has spaces in it", "bad\"quote", "a" * 5000],
    ids=["unknown", "spaces", "quote", "huge"],
)
def test_bad_token_is_401_invalid_token(gateway, gateway_url, internal, token):
    response = post(gateway_url(), {"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert challenge(response).startswith('Bearer error="invalid_token", error_description="')
    assert f'resource_metadata="{RESOURCE_METADATA}"' in challenge(response)
    assert 'scope="openid email offline_access"' in challenge(response)
    assert response.json()["error"] == "invalid_token"
    assert internal.requests == {}


def test_expired_token_is_401(transactional_db, proxy, internal, gateway_url):
    grant = make_grant(make_server(slug="crm", mcp_url=internal.url), expires_in=-5)
    response = post(gateway_url(), grant.auth)
    assert response.status_code == 401
    assert 'error="invalid_token"' in challenge(response) and "expired" in challenge(response)


def test_token_of_a_disabled_client_is_401(gateway, gateway_url):
    gateway.client.disabled = True
    gateway.client.save()
    response = post(gateway_url(), gateway.auth)
    assert response.status_code == 401 and 'error="invalid_token"' in challenge(response)


def test_token_of_an_ended_session_is_401(gateway, gateway_url):
    gateway.session.revoked_at = gateway.session.created
    gateway.session.save()
    response = post(gateway_url(), gateway.auth)
    assert response.status_code == 401 and 'error="invalid_token"' in challenge(response)


def test_token_for_server_a_is_refused_at_server_b(gateway, gateway_url, internal):
    make_server(slug="billing", mcp_url=internal.url, scopes=["billing.read"])
    assert post(gateway_url("crm"), gateway.auth).status_code == 200
    response = post(gateway_url("billing"), gateway.auth)
    assert response.status_code == 401
    assert 'error="invalid_token"' in challenge(response)
    assert 'resource_metadata="https://proxy.example.test/.well-known/oauth-protected-resource/mcp/billing"' in (
        challenge(response)
    )
    assert 'scope="billing.read"' in challenge(response)


@pytest.mark.parametrize(
    "resource",
    [["https://proxy.example.test/mcp/billing"], ["https://elsewhere.example/mcp/crm"], []],
    ids=["other-server", "other-host", "unbound"],
)
def test_token_must_name_this_resource(transactional_db, proxy, internal, gateway_url, resource):
    grant = make_grant(make_server(slug="crm", mcp_url=internal.url), resource=resource)
    response = post(gateway_url(), grant.auth)
    assert response.status_code == 401 and 'error="invalid_token"' in challenge(response)


def require_admin_scope(server):
    """GATEWAY_REQUIRED_SCOPES hook for the step-up test."""
    return ["admin"] if server.slug == "crm" else []


def test_insufficient_scope_is_403_step_up(transactional_db, proxy, internal, gateway_url, settings):
    settings.OAUTHPROXY = {
        **settings.OAUTHPROXY,
        "GATEWAY_REQUIRED_SCOPES": "tests.gateway.test_gateway_refusals.require_admin_scope",
    }
    server = make_server(slug="crm", mcp_url=internal.url)
    weak = make_grant(server, scope="openid email")
    response = post(gateway_url(), weak.auth)
    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"
    assert challenge(response).startswith('Bearer error="insufficient_scope"')
    assert f'resource_metadata="{RESOURCE_METADATA}"' in challenge(response)
    assert 'scope="openid email offline_access admin"' in challenge(response)
    strong = make_grant(server, scope="openid email admin", client=weak.client)
    assert post(gateway_url(), strong.auth).status_code == 200


def test_unknown_and_disabled_servers_are_404(transactional_db, proxy, internal, gateway_url):
    grant = make_grant(make_server(slug="crm", mcp_url=internal.url, enabled=False))
    for slug in ("crm", "nope", "x" * 65):
        response = post(gateway_url(slug), grant.auth)
        assert response.status_code == 404, slug
        assert "www-authenticate" not in response.headers
    assert response.status_code == 404
    body = post(gateway_url("nope")).json()
    assert body["jsonrpc"] == "2.0" and body["id"] is None and body["error"]["code"] == -32000


def test_other_methods_are_405(gateway, gateway_url):
    response = httpx.put(gateway_url(), json=INITIALIZE, headers=gateway.auth, timeout=10)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST, DELETE"


def test_request_body_over_the_limit_is_413(gateway, gateway_url, internal, settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "GATEWAY_MAX_REQUEST_BYTES": 1000}
    big = rpc("tools/call", {"name": "echo", "arguments": {"text": "x" * 2000}})
    response = post(gateway_url(), gateway.auth, body=big)
    assert response.status_code == 413
    assert internal.requests == {}


def test_server_without_internal_url_is_503(transactional_db, proxy, gateway_url):
    grant = make_grant(make_server(slug="crm", mcp_url=""))
    response = post(gateway_url(), grant.auth)
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "This MCP server has no usable internal URL configured."


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_internal_server_down_is_502(transactional_db, proxy, gateway_url):
    grant = make_grant(make_server(slug="crm", mcp_url=f"http://127.0.0.1:{_closed_port()}/mcp"))
    start = time.monotonic()
    response = post(gateway_url(), grant.auth)
    assert time.monotonic() - start < 5
    assert response.status_code == 502
    assert response.json() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32000, "message": "The MCP server is unreachable."},
    }


def test_internal_server_too_slow_is_504(transactional_db, proxy, internal_json, gateway_url, settings):
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "GATEWAY_READ_TIMEOUT": 0.5}
    grant = make_grant(make_server(slug="crm", mcp_url=internal_json.url))
    slow = rpc("tools/call", {"name": "slow", "arguments": {"seconds": 3}}, id=4)
    start = time.monotonic()
    response = post(gateway_url(), grant.auth, body=slow)
    assert 0.4 < time.monotonic() - start < 2.5
    assert response.status_code == 504
    assert response.json()["error"] == {"code": -32000, "message": "The MCP server did not answer in time."}


def test_internal_server_silent_mid_stream_ends_the_request_with_an_error(gateway, gateway_url, settings):
    """With SSE the status line is already out when the internal server goes quiet: the client gets a
    JSON-RPC error for its request on the stream instead of waiting forever."""
    settings.OAUTHPROXY = {**settings.OAUTHPROXY, "GATEWAY_READ_TIMEOUT": 0.7}
    url = gateway_url()
    with httpx.Client(headers={**ACCEPT, **gateway.auth}, timeout=10) as http:
        init = http.post(url, json=INITIALIZE)
        session = {"Mcp-Session-Id": init.headers["mcp-session-id"], "MCP-Protocol-Version": PROTOCOL_VERSION}
        http.post(url, json=rpc("notifications/initialized", id=None), headers=session)
        start = time.monotonic()
        call = rpc("tools/call", {"name": "slow", "arguments": {"seconds": 3}}, id=9)
        slow = http.post(url, json=call, headers=session)
        elapsed = time.monotonic() - start
    assert slow.status_code == 200 and 0.6 < elapsed < 2.5
    assert messages(slow) == [
        {"jsonrpc": "2.0", "id": 9, "error": {"code": -32000, "message": "The MCP server did not answer in time."}}
    ]


def test_mcp_client_sees_a_clean_error_when_the_internal_server_is_down(transactional_db, proxy, gateway_url):
    grant = make_grant(make_server(slug="crm", mcp_url=f"http://127.0.0.1:{_closed_port()}/mcp"))

    async def scenario():
        async with mcp_client(gateway_url(), grant.token):
            pass

    with pytest.raises(BaseExceptionGroup) as raised:
        anyio.run(scenario)
    # The SDK hands the gateway's JSON-RPC error to the caller as it is.
    assert raised.group_contains(MCPError, match="^The MCP server is unreachable.$")
