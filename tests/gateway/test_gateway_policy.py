"""Access and tool policies at the gateway: tools/list filtered (JSON, SSE, paginated, batched, on every
stream: a replay on a resumed GET stream, the standalone GET stream, an answer to another request),
refused tools/call answered by the gateway without reaching the internal server (also when the method is
spelled with JSON escapes), policy changes reaching existing sessions from the cached server snapshot."""

from __future__ import annotations

import json
from contextlib import contextmanager
from types import SimpleNamespace

import anyio
import httpx
import pytest
from django.core.cache import cache

from oauthproxy.core import metrics
from oauthproxy.core.caching import server_cache_clear
from oauthproxy.gateway import forwarding, policy
from oauthproxy.grants.access import UserClaims
from oauthproxy.models import AuditEvent
from tests.conftest import make_server
from tests.e2e import mcp_server
from tests.gateway.conftest import ACCEPT, PROTOCOL_VERSION, make_grant, mcp_client, messages, rpc
from tests.gateway.internal_server import CannedHttpServer, InternalMcpServer

pytestmark = pytest.mark.django_db(transaction=True)

ADMIN_ONLY = [{"tools": ["admin_*"], "groups": ["admins"]}]


@pytest.fixture(autouse=True)
def _tool_calls_reset():
    mcp_server.TOOL_CALLS.clear()
    cache.clear()  # the refusal audit's counters (SQLite hands a rolled-back primary key out again)
    yield
    mcp_server.TOOL_CALLS.clear()


def with_claims(grant, *, email: str = "alice@example.com", groups: list[str] = ()):
    grant.session.claims = json.dumps({"email": email, "groups": list(groups)})
    grant.session.save()
    return grant


def refused_count(slug: str) -> float:
    return metrics.GATEWAY_TOOLS_REFUSED.labels(server=slug)._value.get()


def post(url: str, grant, body, **headers) -> httpx.Response:
    return httpx.post(url, json=body, headers={**ACCEPT, "MCP-Protocol-Version": PROTOCOL_VERSION, **grant.auth,
                                                **headers}, timeout=10)


def test_user_outside_the_tool_group_sees_a_filtered_list_and_is_refused_without_reaching_the_server(
    transactional_db, proxy, internal, gateway_url
):
    server = make_server(slug="crm", mcp_url=internal.url, tool_policy=ADMIN_ONLY)
    grant = with_claims(make_grant(server), groups=["sales"])
    before = refused_count("crm")

    async def scenario():
        async with mcp_client(gateway_url(), grant.token) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            echoed = await client.call_tool("echo", {"text": "hi"})
            try:
                await client.call_tool("admin_reset", {})
            except Exception as exc:  # the SDK raises the JSON-RPC error
                return names, echoed, str(exc)
            return names, echoed, None

    names, echoed, error = anyio.run(scenario)
    assert "admin_reset" not in names and {"echo", "slow"} <= names
    assert echoed.content[0].text == "hi"
    assert error is not None and "admin_reset" in error and "admins" in error
    assert mcp_server.TOOL_CALLS == []  # the internal server never saw the call
    assert refused_count("crm") == before + 1
    event = AuditEvent.objects.get(kind=AuditEvent.Kind.ACCESS_DENIED)
    assert "admin_reset" in event.message and event.subject == "alice"
    assert event.detail["tool"] == "admin_reset" and event.detail["count"] == 1


def test_user_in_the_tool_group_sees_and_calls_the_tool(transactional_db, proxy, internal, gateway_url):
    server = make_server(slug="crm", mcp_url=internal.url, tool_policy=ADMIN_ONLY)
    grant = with_claims(make_grant(server), groups=["sales", "admins"])

    async def scenario():
        async with mcp_client(gateway_url(), grant.token) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            return names, await client.call_tool("admin_reset", {})

    names, result = anyio.run(scenario)
    assert "admin_reset" in names
    assert result.content[0].text == "reset"
    assert mcp_server.TOOL_CALLS == ["admin_reset"]


def test_server_without_tool_policy_lists_and_calls_every_tool(gateway, gateway_url, internal, monkeypatch):
    from oauthproxy.gateway import views

    def must_not_parse(**kwargs):
        raise AssertionError("the tool policy must not look at requests of a server without one")

    monkeypatch.setattr(views, "tool_plan", must_not_parse)
    monkeypatch.setattr(views, "tool_response_filter", must_not_parse)

    async def scenario():
        async with mcp_client(gateway_url(), gateway.token) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            return names, await client.call_tool("admin_reset", {})

    names, result = anyio.run(scenario)
    assert "admin_reset" in names and result.content[0].text == "reset"


def test_json_answers_are_filtered(transactional_db, proxy, internal_json, gateway_url):
    server = make_server(slug="crm", mcp_url=internal_json.url, tool_policy=ADMIN_ONLY)
    grant = with_claims(make_grant(server), groups=["sales"])
    listed = post(gateway_url(), grant, rpc("tools/list", {}, id=7))
    assert listed.status_code == 200 and listed.headers["content-type"].startswith("application/json")
    names = {tool["name"] for tool in listed.json()["result"]["tools"]}
    assert "admin_reset" not in names and "echo" in names

    refused = post(gateway_url(), grant, rpc("tools/call", {"name": "admin_reset", "arguments": {}}, id=8))
    assert refused.status_code == 200
    error = refused.json()
    assert error["id"] == 8 and "admin_reset" in error["error"]["message"]
    assert error["error"]["data"] == {"tool": "admin_reset", "reason": "The tool admin_reset is only for members "
                                      "of: admins."}
    assert mcp_server.TOOL_CALLS == []


def test_batch_all_refused_is_answered_by_the_gateway(transactional_db, proxy, internal_json, gateway_url):
    server = make_server(slug="crm", mcp_url=internal_json.url, tool_policy=ADMIN_ONLY)
    grant = with_claims(make_grant(server), groups=[])
    posts_before = internal_json.requests.get("POST", 0)
    batch = [rpc("tools/call", {"name": "admin_reset"}, id=1), rpc("tools/call", {"name": "admin_purge"}, id=2)]
    response = post(gateway_url(), grant, batch)
    assert response.status_code == 200
    answers = response.json()
    assert [a["id"] for a in answers] == [1, 2]
    assert all("not available to you" in a["error"]["message"] for a in answers)
    assert internal_json.requests.get("POST", 0) == posts_before


def _canned(content_type: bytes, body: bytes) -> CannedHttpServer:
    return CannedHttpServer(
        b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    )


@contextmanager
def behind_the_policy(internal: CannedHttpServer):
    """The grant of a user in sales (not admins) on server "paged", whose internal server is *internal*."""
    try:
        server = make_server(slug="paged", mcp_url=internal.url, tool_policy=ADMIN_ONLY)
        yield with_claims(make_grant(server), groups=["sales"])
    finally:
        internal.stop()


PAGE = {"jsonrpc": "2.0", "id": 3, "result": {"tools": [{"name": "echo"}, {"name": "admin_reset"}],
                                              "nextCursor": "page-2"}}


def test_a_paginated_sse_page_is_filtered_and_keeps_its_cursor(transactional_db, proxy, gateway_url):
    progress = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x"}}
    body = (b"event: message\ndata: " + json.dumps(progress).encode() + b"\n\n"
            + b"id: ev-1\nevent: message\ndata: " + json.dumps(PAGE).encode() + b"\n\n")
    with behind_the_policy(_canned(b"text/event-stream", body)) as grant:
        response = post(gateway_url("paged"), grant, rpc("tools/list", {"cursor": "page-1"}, id=3))
    assert response.status_code == 200
    found = messages(response)
    assert found[0] == progress  # other events pass as they are
    assert found[1]["result"] == {"tools": [{"name": "echo"}], "nextCursor": "page-2"}
    assert "id: ev-1" in response.text  # the event id survives (resumption)


def test_a_large_streamed_json_answer_is_filtered(transactional_db, proxy, gateway_url, monkeypatch):
    monkeypatch.setattr(forwarding, "BUFFERED_RESPONSE_BYTES", 10)  # not read whole by the forwarder
    with behind_the_policy(_canned(b"application/json", json.dumps(PAGE).encode())) as grant:
        response = post(gateway_url("paged"), grant, rpc("tools/list", {}, id=3))
    assert response.json()["result"] == {"tools": [{"name": "echo"}], "nextCursor": "page-2"}


def test_batch_with_a_refused_call_goes_on_without_it_and_answers_are_merged(
    transactional_db, proxy, gateway_url
):
    answer = [PAGE, {"jsonrpc": "2.0", "id": 4, "result": {"content": []}}]
    with behind_the_policy(_canned(b"application/json", json.dumps(answer).encode())) as grant:
        batch = [rpc("tools/list", {}, id=3), rpc("tools/call", {"name": "echo"}, id=4),
                 rpc("tools/call", {"name": "admin_reset"}, id=5)]
        response = post(gateway_url("paged"), grant, batch)
    answers = {a["id"]: a for a in response.json()}
    assert answers[3]["result"]["tools"] == [{"name": "echo"}]
    assert "result" in answers[4]
    assert "admin_reset" in answers[5]["error"]["message"]


def test_an_access_policy_change_reaches_existing_sessions(transactional_db, proxy, internal_json, gateway_url):
    server = make_server(slug="crm", mcp_url=internal_json.url, access={"groups": ["sales"]})
    grant = with_claims(make_grant(server), groups=["sales"])
    assert post(gateway_url(), grant, rpc("tools/list", {}, id=1)).status_code == 200

    server.access = {"groups": ["finance"]}
    server.save()
    server_cache_clear()  # what the server cache lifetime (SERVER_CACHE_SECONDS) does on other instances
    refused = post(gateway_url(), grant, rpc("tools/list", {}, id=2))
    assert refused.status_code == 401
    assert "no longer allowed" in refused.headers["www-authenticate"]


def test_access_by_email_domain_at_the_gateway(transactional_db, proxy, internal_json, gateway_url):
    server = make_server(slug="crm", mcp_url=internal_json.url, access={"email_domains": ["example.com"]})
    allowed = with_claims(make_grant(server, subject="a"), email="a@example.com")
    other = with_claims(make_grant(server, subject="b"), email="b@elsewhere.org")
    assert post(gateway_url(), allowed, rpc("tools/list", {}, id=1)).status_code == 200
    assert post(gateway_url(), other, rpc("tools/list", {}, id=1)).status_code == 401


# -- tools/list results on every stream (issue 14) ------------------------------------------------------

RESUMABLE_VERSION = "2025-11-25"  # the version whose streams start with a priming event (resumption)


@pytest.fixture(scope="module")
def internal_resumable():
    """An internal MCP server with an event store: a GET with Last-Event-ID replays a stream's events."""
    server = InternalMcpServer(resumable=True)
    yield server
    server.stop()


def _event_ids(text: str) -> list[str]:
    return [line[3:].strip() for line in text.splitlines() if line.startswith("id:")]


def _replayed_tool_names(url: str, grant) -> tuple[set[str], set[str]]:
    """List the tools on a POST, then resume that POST's stream after its first event (the priming event):
    (the names on the POST's answer, the names on the answer the internal server replays on the GET)."""
    headers = {**ACCEPT, "MCP-Protocol-Version": RESUMABLE_VERSION, **grant.auth}
    init = httpx.post(url, headers=headers, timeout=10, json=rpc("initialize", {
        "protocolVersion": RESUMABLE_VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}))
    assert init.status_code == 200
    headers["Mcp-Session-Id"] = init.headers["mcp-session-id"]
    assert httpx.post(url, headers=headers, json=rpc("notifications/initialized", id=None), timeout=10).is_success
    listed = httpx.post(url, headers=headers, json=rpc("tools/list", {}, id=2), timeout=10)
    posted = {tool["name"] for m in messages(listed) if m for tool in m["result"]["tools"]}
    first_event = _event_ids(listed.text)[0]
    replayed = None
    with httpx.stream("GET", url, headers={**headers, "Last-Event-ID": first_event}, timeout=10) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("data:") and '"result"' in line:
                replayed = {tool["name"] for tool in json.loads(line[5:])["result"]["tools"]}
                break
    assert replayed is not None, "the internal server replayed no answer"
    return posted, replayed


def test_a_tools_list_answer_replayed_on_a_resumed_stream_is_filtered(
    transactional_db, proxy, internal_resumable, gateway_url
):
    server = make_server(slug="crm", mcp_url=internal_resumable.url, tool_policy=ADMIN_ONLY)
    seller = with_claims(make_grant(server, subject="seller"), groups=["sales"])
    admin = with_claims(make_grant(server, subject="admin"), groups=["admins"])

    posted, replayed = _replayed_tool_names(gateway_url(), seller)
    assert "admin_reset" not in replayed and {"echo", "slow"} <= replayed
    assert replayed == posted

    posted, replayed = _replayed_tool_names(gateway_url(), admin)  # the replay does carry the tool
    assert "admin_reset" in replayed and replayed == posted


def _sse(*messages_: dict, end: bytes = b"\n\n", eol: bytes = b"\n") -> bytes:
    return b"".join(b"id: e" + str(i).encode() + eol + b"event: message" + eol + b"data: "
                    + json.dumps(m).encode() + end for i, m in enumerate(messages_))


@pytest.mark.parametrize(("end", "eol"), [(b"\n\n", b"\n"), (b"\r\n\r\n", b"\r\n"), (b"\r\r", b"\r"),
                                          (b"\n\r\n", b"\n")])
def test_the_standalone_get_stream_is_filtered_whatever_the_line_endings(
    transactional_db, proxy, gateway_url, end, eol
):
    notice = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
    answer = {**PAGE, "id": "not-a-request-the-gateway-saw"}
    with behind_the_policy(_canned(b"text/event-stream", _sse(notice, answer, end=end, eol=eol))) as grant:
        response = httpx.get(gateway_url("paged"), headers={**ACCEPT, **grant.auth, "Last-Event-ID": "e0"},
                             timeout=10)
    assert response.status_code == 200
    assert "admin_reset" not in response.text
    found = messages(response)
    assert found[0] == notice
    assert found[1]["result"] == {"tools": [{"name": "echo"}], "nextCursor": "page-2"}


def test_a_tools_list_result_answering_another_request_is_filtered(transactional_db, proxy, gateway_url):
    # A POST naming no tools/ method (its id reused by a tools/list elsewhere, or 1.0 read as 1): the
    # answer is recognized by its shape.
    with behind_the_policy(_canned(b"application/json", json.dumps({**PAGE, "id": 1}).encode())) as grant:
        pinged = post(gateway_url("paged"), grant, rpc("ping", id=1))
        listed = post(gateway_url("paged"), grant, {"jsonrpc": "2.0", "method": "tools/list", "id": 1.0})
    assert pinged.json()["result"]["tools"] == [{"name": "echo"}]
    assert listed.json()["result"]["tools"] == [{"name": "echo"}]


def test_an_sse_event_split_across_chunks_is_filtered():
    """The internal server's chunks may end anywhere: inside an event, between the CR and LF of a line
    ending, or inside the "tools" key itself."""
    answer = {**PAGE, "id": 9}
    stream = _sse({"jsonrpc": "2.0", "method": "notifications/message", "params": {}}, answer,
                  end=b"\r\n\r\n", eol=b"\r\n")

    async def one_byte_at_a_time():
        for byte in stream:
            yield bytes([byte])

    async def relayed() -> bytes:
        out = []
        gen = policy._sse_filtered(SimpleNamespace(complete=False), one_byte_at_a_time(),
                                   server=SimpleNamespace(slug="x", tool_policy=ADMIN_ONLY),
                                   user=UserClaims(subject="a", groups=("sales",)), refusals=[])
        async for chunk in gen:
            out.append(chunk)
        return b"".join(out)

    text = anyio.run(relayed).decode()
    assert "admin_reset" not in text
    found = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    assert found[1]["result"] == {"tools": [{"name": "echo"}], "nextCursor": "page-2"}
    assert "id: e1" in text


def test_an_sse_event_naming_tools_that_cannot_be_read_is_dropped(transactional_db, proxy, gateway_url):
    broken = b'event: message\ndata: {"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"admin_reset"}\n\n'
    with behind_the_policy(_canned(b"Text/Event-Stream", broken + _sse({"jsonrpc": "2.0", "method": "ping"}))) as grant:
        response = httpx.get(gateway_url("paged"), headers={**ACCEPT, **grant.auth}, timeout=10)
    assert "admin_reset" not in response.text
    assert messages(response) == [{"jsonrpc": "2.0", "method": "ping"}]


@pytest.mark.parametrize("method", [rb'"tools\/call"', rb'"\u0074ools/call"', rb'"tools/\u0063all"'])
def test_a_tools_call_spelled_with_json_escapes_is_refused(
    transactional_db, proxy, internal_json, gateway_url, method
):
    server = make_server(slug="crm", mcp_url=internal_json.url, tool_policy=ADMIN_ONLY)
    grant = with_claims(make_grant(server), groups=["sales"])
    body = b'{"jsonrpc":"2.0","id":5,"method":' + method + b',"params":{"name":"admin_reset","arguments":{}}}'
    response = httpx.post(gateway_url(), content=body, timeout=10,
                          headers={**ACCEPT, "MCP-Protocol-Version": PROTOCOL_VERSION, **grant.auth})
    assert response.status_code == 200
    assert response.json()["error"]["data"]["tool"] == "admin_reset"
    assert mcp_server.TOOL_CALLS == []


@pytest.mark.parametrize("headers", [
    {"Mcp-Method": "tools/call", "Mcp-Name": "admin_reset"},  # routes to the tool the body does not name
    {"Mcp-Method": "tools/call"},  # the body is a ping
    {"Mcp-Name": "admin_reset"},
])
def test_routing_headers_that_do_not_mirror_the_body_are_refused(
    transactional_db, proxy, internal_json, gateway_url, headers
):
    """SEP-2243: an internal server may route on Mcp-Method / Mcp-Name rather than the body; a request whose
    headers name a tool the policy did not check never reaches it."""
    server = make_server(slug="crm", mcp_url=internal_json.url, tool_policy=ADMIN_ONLY)
    grant = with_claims(make_grant(server), groups=["sales"])
    posts_before = internal_json.requests.get("POST", 0)
    response = post(gateway_url(), grant, rpc("ping", id=3), **headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == policy.INVALID_REQUEST_CODE
    assert "Mcp-Method" in response.json()["error"]["message"]
    assert internal_json.requests.get("POST", 0) == posts_before
    assert mcp_server.TOOL_CALLS == []


def test_routing_headers_that_mirror_the_body_pass(transactional_db, proxy, internal_json, gateway_url):
    server = make_server(slug="crm", mcp_url=internal_json.url, tool_policy=ADMIN_ONLY)
    grant = with_claims(make_grant(server), groups=["sales"])
    call = rpc("tools/call", {"name": "echo", "arguments": {"text": "hi"}}, id=4)
    response = post(gateway_url(), grant, call, **{"Mcp-Method": "tools/call", "Mcp-Name": "echo"})
    assert response.status_code == 200 and not response.json()["result"].get("isError")
    assert "hi" in json.dumps(response.json()["result"]["content"])
    refused = post(gateway_url(), grant, {**call, "params": {"name": "admin_reset", "arguments": {}}},
                   **{"Mcp-Method": "tools/call", "Mcp-Name": "admin_reset"})
    assert refused.json()["error"]["data"]["tool"] == "admin_reset"
    assert mcp_server.TOOL_CALLS == []


def test_a_body_naming_tools_that_the_gateway_cannot_read_is_not_forwarded(
    transactional_db, proxy, internal_json, gateway_url
):
    server = make_server(slug="crm", mcp_url=internal_json.url, tool_policy=ADMIN_ONLY)
    grant = with_claims(make_grant(server), groups=["sales"])
    posts_before = internal_json.requests.get("POST", 0)
    # Not UTF-8 (a lenient parser would read it with a replacement character); nested past json's limit.
    for body in (b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"admin_reset"},"x":"\xff"}',
                 b'{"method":"tools/call","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        response = httpx.post(gateway_url(), content=body, timeout=10,
                              headers={**ACCEPT, "MCP-Protocol-Version": PROTOCOL_VERSION, **grant.auth})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == policy.PARSE_ERROR_CODE
    assert internal_json.requests.get("POST", 0) == posts_before
    assert mcp_server.TOOL_CALLS == []


def test_a_compressed_answer_is_not_passed_unfiltered(transactional_db, proxy, gateway_url):
    gzipped = CannedHttpServer(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                               b"Content-Length: 4\r\n\r\n\x1f\x8b\x08\x00")
    with behind_the_policy(gzipped) as grant:
        response = post(gateway_url("paged"), grant, rpc("tools/list", {}, id=3))
    assert response.status_code == 502


# -- refused calls in the audit log, bounded (issue 14) -------------------------------------------------


def refusal_rows(**filters) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(kind=AuditEvent.Kind.ACCESS_DENIED, detail__step="tools/call",
                                          **filters).order_by("pk"))


def test_a_looping_client_writes_one_audit_row_per_tool_and_user_with_the_count(
    transactional_db, proxy, internal_json, gateway_url
):
    server = make_server(slug="crm", mcp_url=internal_json.url, tool_policy=ADMIN_ONLY)
    alice = with_claims(make_grant(server, subject="alice"), groups=["sales"])
    bob = with_claims(make_grant(server, subject="bob"), groups=["sales"])
    before = refused_count("crm")
    for i in range(12):
        assert "error" in post(gateway_url(), alice, rpc("tools/call", {"name": "admin_reset"}, id=i)).json()
    post(gateway_url(), alice, rpc("tools/call", {"name": "admin_purge"}, id=99))
    post(gateway_url(), bob, rpc("tools/call", {"name": "admin_reset"}, id=1))

    assert refused_count("crm") == before + 14  # the metric counts every refusal
    rows = refusal_rows()
    assert len(rows) == 3
    looping = [row for row in rows if row.subject == "alice" and row.detail["tool"] == "admin_reset"]
    assert len(looping) == 1
    assert looping[0].detail["count"] == 8  # raised at 2, 4, 8: within a factor of two until the window ends
    assert "8 times in 60 s" in looping[0].message
    assert {(row.subject, row.detail["tool"], row.detail["count"]) for row in rows if row is not looping[0]} == {
        ("alice", "admin_purge", 1), ("bob", "admin_reset", 1)}
    assert mcp_server.TOOL_CALLS == []


def test_the_next_window_gets_a_row_of_its_own_and_settles_the_last_ones_count(transactional_db):
    server = make_server(slug="crm", tool_policy=ADMIN_ONLY)
    window = policy.REFUSAL_AUDIT_WINDOW
    start = 1_000_000 * window  # the start of a window
    refused = [("admin_reset", "The tool admin_reset is only for members of: admins.")]

    def refuse(at: float) -> None:
        policy.tool_refusals_record(server_id=server.pk, subject="alice", client_id="c1", refused=refused, now=at)

    for i in range(20):
        refuse(start + i)
    [row] = refusal_rows()
    assert row.detail["count"] == 16 and row.detail["window_seconds"] == window

    refuse(start + window + 1)
    first, second = refusal_rows()
    assert first.pk == row.pk and first.detail["count"] == 20  # the final count, once the window is over
    assert second.detail["count"] == 1 and second.detail["window_start"] > first.detail["window_start"]


def test_invented_tool_names_do_not_fill_the_audit_log(transactional_db):
    server = make_server(slug="crm", tool_policy=ADMIN_ONLY)
    refused = [(f"admin_{i}", "only for admins") for i in range(50)]
    policy.tool_refusals_record(server_id=server.pk, subject="alice", client_id="c1", refused=refused,
                                now=1_000_000.0)
    rows = refusal_rows()
    assert len(rows) == policy.REFUSAL_AUDIT_TOOLS + 1
    assert "further ones are not recorded" in rows[-1].message
    policy.tool_refusals_record(server_id=server.pk, subject="bob", client_id="c1", refused=refused[:1],
                                now=1_000_000.0)
    assert refusal_rows(subject="bob")[0].detail["tool"] == "admin_0"  # another user: rows of their own
