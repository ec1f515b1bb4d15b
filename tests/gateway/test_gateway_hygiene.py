"""Header and session hygiene (issue 13, finding 10): only the MCP headers the specification names travel
in either direction, and an ``Mcp-Session-Id`` works only with the grant that opened it."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import make_server
from tests.gateway.conftest import ACCEPT, INITIALIZE, PROTOCOL_VERSION, make_grant, rpc
from tests.gateway.internal_server import CannedHttpServer

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_made_up_mcp_header_does_not_reach_the_internal_server(gateway, gateway_url, internal):
    response = httpx.post(
        gateway_url(), json=INITIALIZE,
        headers={**ACCEPT, **gateway.auth, "Mcp-Subject": "admin", "Mcp-Protocol-Version": PROTOCOL_VERSION},
        timeout=10,
    )
    assert response.status_code == 200
    assert "mcp-subject" not in internal.last_headers
    assert internal.last_headers["mcp-protocol-version"] == PROTOCOL_VERSION


def test_a_made_up_mcp_response_header_does_not_reach_the_client(transactional_db, proxy, gateway_url):
    body = b'{"jsonrpc":"2.0","id":1,"result":{}}'
    canned = CannedHttpServer(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: s-1\r\nMcp-Admin: yes\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    try:
        grant = make_grant(make_server(slug="go", mcp_url=canned.url))
        response = httpx.post(gateway_url("go"), json=INITIALIZE, headers={**ACCEPT, **grant.auth}, timeout=10)
    finally:
        canned.stop()
    assert response.status_code == 200
    assert "mcp-admin" not in response.headers
    assert response.headers["mcp-session-id"].startswith("s-1.")


def test_a_session_id_replayed_with_another_grants_token_is_refused(gateway, gateway_url, internal):
    url = gateway_url()
    init = httpx.post(url, json=INITIALIZE, headers={**ACCEPT, **gateway.auth}, timeout=10)
    alices_session = init.headers["mcp-session-id"]
    mallory = make_grant(gateway.server, subject="mallory")
    internal.reset()
    replayed = httpx.post(
        url, json=rpc("tools/list", {}, id=2),
        headers={**ACCEPT, **mallory.auth, "Mcp-Session-Id": alices_session, "MCP-Protocol-Version": PROTOCOL_VERSION},
        timeout=10,
    )
    assert replayed.status_code == 404
    assert internal.requests == {}  # never reached the internal server
    # the raw internal id (what a log or the internal server could leak) is no better
    raw = alices_session.rpartition(".")[0]
    guessed = httpx.post(
        url, json=rpc("tools/list", {}, id=3),
        headers={**ACCEPT, **mallory.auth, "Mcp-Session-Id": raw, "MCP-Protocol-Version": PROTOCOL_VERSION},
        timeout=10,
    )
    assert guessed.status_code == 404
    # alice herself carries on
    own = httpx.post(
        url, json=rpc("tools/list", {}, id=4),
        headers={**ACCEPT, **gateway.auth, "Mcp-Session-Id": alices_session, "MCP-Protocol-Version": PROTOCOL_VERSION},
        timeout=10,
    )
    assert own.status_code == 200
