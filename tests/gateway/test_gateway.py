"""The gateway end to end: the official MCP SDK client -> the proxy (uvicorn, ``proxy_site.asgi``) -> a
real MCP SDK server. What the internal server receives, what the client receives, and when."""

from __future__ import annotations

import asyncio
import json
import time

import anyio
import httpx
import pytest
from django.test import AsyncClient

from oauthproxy.gateway.forwarding import internal_server_pool_close
from tests.conftest import make_server
from tests.gateway.conftest import ACCEPT, INITIALIZE, PROTOCOL_VERSION, make_grant, mcp_client, messages, rpc
from tests.gateway.internal_server import CannedHttpServer, ServerThread, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("mode", ["legacy", "auto"])  # initialize handshake; 2026-07-28 per-request envelope
def test_mcp_client_works_through_the_gateway_with_the_upstream_token(gateway, gateway_url, internal, mode):
    async def scenario():
        async with mcp_client(gateway_url(), gateway.token, mode=mode) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            echoed = await client.call_tool("echo", {"text": "hello"})
            auth = await client.call_tool("echo_auth", {})
            headers = (await client.call_tool("echo_headers", {})).structured_content
            return names, echoed, auth, headers

    names, echoed, auth, headers = anyio.run(scenario)
    assert {"echo", "echo_auth", "echo_headers", "stream_progress", "slow"} <= names
    assert echoed.content[0].text == "hello"
    # The internal server sees the upstream token, never the proxy's own.
    assert auth.content[0].text == f"Bearer {gateway.upstream_token}"
    assert headers["authorization"] == f"Bearer {gateway.upstream_token}"
    seen = [h.get("authorization") for h in internal.headers]
    assert seen and set(seen) == {f"Bearer {gateway.upstream_token}"}
    assert not any(gateway.token in value for h in internal.headers for value in h.values())
    # MCP headers pass through (the 2026 envelope also needs Mcp-Method/Mcp-Name to match the body).
    assert headers["mcp-protocol-version"]
    if mode == "auto":
        assert headers["mcp-method"] == "tools/call" and headers["mcp-name"] == "echo_headers"
    assert "x-mcp-subject" not in headers and "x-mcp-client-id" not in headers


def test_progress_notifications_arrive_as_they_are_sent(gateway, gateway_url):
    count, delay = 4, 0.4

    async def scenario():
        arrivals: list[tuple[float, float]] = []

        async def on_progress(progress, total, message):
            arrivals.append((time.monotonic(), progress))

        async with mcp_client(gateway_url(), gateway.token) as client:
            start = time.monotonic()
            result = await client.call_tool(
                "stream_progress", {"count": count, "delay": delay}, progress_callback=on_progress
            )
            return start, time.monotonic(), result, arrivals

    start, done, result, arrivals = anyio.run(scenario)
    assert result.content[0].text == "done"
    assert [p for _, p in arrivals] == [1.0, 2.0, 3.0, 4.0]
    # Spread over time like the server sent them, not buffered until the result.
    assert arrivals[0][0] - start < delay
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert min(gaps) >= delay * 0.5, gaps
    assert done - arrivals[0][0] >= (count - 1) * delay * 0.8


def test_session_id_round_trip_and_delete(gateway, gateway_url, internal):
    url = gateway_url()
    with httpx.Client(headers={**ACCEPT, **gateway.auth}, timeout=10) as http:
        init = http.post(url, json=INITIALIZE)
        assert init.status_code == 200
        session_id = init.headers["mcp-session-id"]
        assert messages(init)[0]["result"]["protocolVersion"] == PROTOCOL_VERSION
        session = {"Mcp-Session-Id": session_id, "MCP-Protocol-Version": PROTOCOL_VERSION}

        initialized = http.post(url, json=rpc("notifications/initialized", id=None), headers=session)
        assert initialized.status_code == 202
        listed = http.post(url, json=rpc("tools/list", {}, id=2), headers=session)
        assert listed.status_code == 200 and listed.headers["content-type"].startswith("text/event-stream")
        assert any(t["name"] == "echo" for t in messages(listed)[0]["result"]["tools"])
        # the client holds the internal server's id sealed to its grant; the internal server sees its own
        assert session_id.startswith(internal.last_headers["mcp-session-id"] + ".")
        assert internal.last_headers["mcp-protocol-version"] == PROTOCOL_VERSION

        deleted = http.delete(url, headers=session)
        assert deleted.status_code == 200
        assert internal.requests["DELETE"] == 1
        # The internal server ended the session; the client learns it through the gateway.
        after = http.post(url, json=rpc("tools/list", {}, id=3), headers=session)
        assert after.status_code == 404


def _open_session(http: httpx.Client, url: str) -> dict[str, str]:
    init = http.post(url, json=INITIALIZE)
    session = {"Mcp-Session-Id": init.headers["mcp-session-id"], "MCP-Protocol-Version": PROTOCOL_VERSION}
    http.post(url, json=rpc("notifications/initialized", id=None), headers=session)
    return session


def test_get_stream_carries_server_messages_and_closes_upstream_when_the_client_leaves(
    gateway, gateway_url, internal
):
    url = gateway_url()
    with httpx.Client(headers={**ACCEPT, **gateway.auth}, timeout=10) as http:
        session = _open_session(http, url)
        with http.stream("GET", url, headers={**session, "Accept": "text/event-stream"}) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["x-accel-buffering"] == "no"
            assert wait_for(lambda: internal.open_streams == 1)
            # A tool that notifies outside its own request: the message travels on the GET stream.
            announce = rpc("tools/call", {"name": "announce", "arguments": {}}, id=5)
            called = http.post(url, json=announce, headers=session)
            assert messages(called)[-1]["result"]["content"][0]["text"] == "announced"
            lines = stream.iter_lines()
            data = next(line for line in lines if line.startswith("data:"))
            assert "notifications/tools/list_changed" in data
        # The client went away: the gateway closes its stream to the internal server too.
        assert wait_for(lambda: internal.open_streams == 0)


def test_idle_get_stream_gets_keepalives_then_closes(gateway, gateway_url, internal, settings):
    settings.OAUTHPROXY = {
        **settings.OAUTHPROXY,
        "GATEWAY_STREAM_KEEPALIVE_SECONDS": 0.2,
        "GATEWAY_STREAM_IDLE_TIMEOUT": 1.0,
    }
    url = gateway_url()
    with httpx.Client(headers={**ACCEPT, **gateway.auth}, timeout=10) as http:
        session = _open_session(http, url)
        start = time.monotonic()
        with http.stream("GET", url, headers={**session, "Accept": "text/event-stream"}) as stream:
            body = b"".join(stream.iter_bytes())  # ends when the gateway gives up on the silent stream
        elapsed = time.monotonic() - start
    assert body.count(b": keep-alive\n\n") >= 2
    assert 0.9 <= elapsed < 5
    assert wait_for(lambda: internal.open_streams == 0)


def test_client_credentials_and_cookies_stay_at_the_gateway(gateway, gateway_url, internal):
    internal.set_cookie = True
    url = gateway_url()
    client_headers = {
        **ACCEPT,
        **gateway.auth,
        "Cookie": "sessionid=browser-session; csrftoken=abc",
        "Origin": "https://evil.example",
        "X-MCP-Subject": "mallory",
        "X-MCP-Client-Id": "forged",
        "X-Custom": "not forwarded",
        "Last-Event-ID": "evt-41",
    }
    first = httpx.post(url, json=INITIALIZE, headers=client_headers, timeout=10)
    assert first.status_code == 200
    assert "set-cookie" not in first.headers  # the internal server's cookie is not passed on...
    received = internal.last_headers
    assert received["authorization"] == f"Bearer {gateway.upstream_token}"
    assert received["last-event-id"] == "evt-41"
    assert received["accept"] == ACCEPT["Accept"] and received["content-type"] == "application/json"
    for name in ("cookie", "origin", "x-mcp-subject", "x-mcp-client-id", "x-custom"):
        assert name not in received, name
    # ... nor kept by the gateway for the next request (of possibly another user).
    httpx.post(url, json=INITIALIZE, headers={**ACCEPT, **gateway.auth}, timeout=10)
    assert "cookie" not in internal.last_headers


def test_internal_server_receives_the_gateways_headers_and_no_client_library_defaults(
    gateway, gateway_url, internal
):
    body = json.dumps(INITIALIZE).encode()
    with httpx.Client(timeout=10) as http:
        request = http.build_request("POST", gateway_url(), content=body, headers=gateway.auth)
        for name in ("accept", "accept-encoding", "user-agent"):  # an MCP client sending the bare minimum
            del request.headers[name]
        http.send(request)
    assert internal.last_headers == {
        "host": internal.url.removeprefix("http://").removesuffix("/mcp"),
        "user-agent": "mcp-oauth-proxy",
        "accept-encoding": "identity",
        "authorization": f"Bearer {gateway.upstream_token}",
        "content-length": str(len(body)),
    }


def test_non_ascii_header_values_pass_as_sent_or_are_refused(gateway, gateway_url, internal):
    url = gateway_url()
    utf8 = "Zoë ✓".encode()
    response = httpx.post(url, json=INITIALIZE, headers={**ACCEPT, **gateway.auth, "Mcp-Param-Note": utf8}, timeout=10)
    assert response.status_code == 200
    assert internal.last_headers["mcp-param-note"].encode("latin-1") == utf8  # the same bytes
    # Bytes that are not UTF-8 cannot be sent on unchanged: refused, not altered.
    internal.reset()
    refused = httpx.post(
        url, json=INITIALIZE, headers={**ACCEPT, **gateway.auth, "Mcp-Param-Note": b"caf\xe9"}, timeout=10
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "The request header mcp-param-note cannot be forwarded."
    assert internal.requests == {}


def test_header_values_with_control_characters_are_refused(gateway, internal):
    """uvicorn refuses them before the gateway sees them; other ASGI servers and Django's route may not."""

    async def scenario():
        try:
            return await AsyncClient().post(
                "/mcp/crm", INITIALIZE, content_type="application/json",
                headers={**ACCEPT, **gateway.auth, "Mcp-Param-Note": "a\x01b"},
            )
        finally:
            await internal_server_pool_close()

    response = asyncio.run(scenario())
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "The request header mcp-param-note cannot be forwarded."
    assert internal.requests == {}


def test_internal_response_header_names_in_any_case(transactional_db, proxy, gateway_url):
    event = b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n'
    canned = CannedHttpServer(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nMcp-Session-Id: s-42\r\n"
        b"Set-Cookie: route=1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(event):x}\r\n".encode() + event + b"\r\n0\r\n\r\n"
    )
    try:
        grant = make_grant(make_server(slug="go", mcp_url=canned.url))
        response = httpx.post(gateway_url("go"), json=INITIALIZE, headers={**ACCEPT, **grant.auth}, timeout=10)
    finally:
        canned.stop()
    assert response.status_code == 200
    assert response.headers["mcp-session-id"].startswith("s-42.")  # sealed to the grant
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["x-accel-buffering"] == "no"  # recognised as a stream
    assert "set-cookie" not in response.headers
    assert response.content == event


def test_identity_headers_when_the_server_asks_for_them(gateway, gateway_url, internal):
    gateway.server.send_identity_headers = True
    gateway.server.save()
    response = httpx.post(
        gateway_url(),
        json=INITIALIZE,
        headers={**ACCEPT, **gateway.auth, "X-MCP-Subject": "mallory", "X-MCP-Client-Id": "forged"},
        timeout=10,
    )
    assert response.status_code == 200
    assert internal.last_headers["x-mcp-subject"] == "alice"
    assert internal.last_headers["x-mcp-client-id"] == gateway.client.client_id


def test_identity_header_values_are_header_safe(transactional_db, proxy, internal, gateway_url):
    server = make_server(slug="ids", mcp_url=internal.url, send_identity_headers=True)
    grant = make_grant(server, subject="Zoë Ünïcode\r\nX-Injected: 1")
    response = httpx.post(gateway_url("ids"), json=INITIALIZE, headers={**ACCEPT, **grant.auth}, timeout=10)
    assert response.status_code == 200
    assert internal.last_headers["x-mcp-subject"] == "Zo%C3%AB%20%C3%9Cn%C3%AFcode%0D%0AX-Injected%3A%201"
    assert "x-injected" not in internal.last_headers


def test_trailing_slash_is_the_same_endpoint(gateway, gateway_url):
    response = httpx.post(gateway_url() + "/", json=INITIALIZE, headers={**ACCEPT, **gateway.auth}, timeout=10)
    assert response.status_code == 200 and response.headers["mcp-session-id"]


def test_json_answers_keep_their_content_type_and_length(transactional_db, proxy, internal_json, gateway_url):
    grant = make_grant(make_server(slug="plain", mcp_url=internal_json.url))
    call = rpc("tools/call", {"name": "echo", "arguments": {"text": "json"}}, id=7)
    response = httpx.post(gateway_url("plain"), json=call, headers={**ACCEPT, **grant.auth}, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.json()["result"]["content"][0]["text"] == "json"



@pytest.fixture(scope="module")
def django_only_proxy():
    """The proxy served by Django's own ASGI handler (full middleware), without the lean /mcp/ entry."""
    from proxy_site.asgi import django_application, lifespan

    async def app(scope, receive, send):  # Django's handler, plus the lifespan that closes the pool
        handler = lifespan(receive, send) if scope["type"] == "lifespan" else django_application(scope, receive, send)
        await handler

    server = ServerThread(app, name="proxy-django")
    yield server
    server.stop()


def test_the_django_handler_streams_too(gateway, django_only_proxy, internal):
    url = f"{django_only_proxy.base_url}/mcp/crm"

    async def scenario():
        arrivals = []

        async def on_progress(progress, total, message):
            arrivals.append(time.monotonic())

        async with mcp_client(url, gateway.token) as client:
            auth = await client.call_tool("echo_auth", {})
            result = await client.call_tool(
                "stream_progress", {"count": 3, "delay": 0.4}, progress_callback=on_progress
            )
            return auth, result, arrivals, time.monotonic()

    auth, result, arrivals, done = anyio.run(scenario)
    assert auth.content[0].text == f"Bearer {gateway.upstream_token}"
    assert result.content[0].text == "done" and len(arrivals) == 3
    assert done - arrivals[0] >= 0.6  # the first notification came well before the result
