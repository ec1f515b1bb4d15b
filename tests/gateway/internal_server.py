"""Servers for the gateway tests, each run by uvicorn in a background thread of the test process.

- ``ServerThread(app)``: any ASGI app on a loopback port chosen at run time; ready when uvicorn says
  it started (polled, no fixed sleep). The proxy runs this way, so it sees the test's database rows.
- ``InternalMcpServer``: the internal MCP server behind the gateway, built with the official MCP Python
  SDK, wrapped in a small ASGI layer that records what reached it and can refuse chosen bearer tokens
  with 401 (like a resource server whose token the upstream revoked). ``resumable=True`` gives it an
  event store (``MemoryEventStore``): a GET with ``Last-Event-ID`` replays the SSE events that followed
  that event, answers to earlier POSTs (``tools/list`` results among them) included, as the MCP
  specification's stream resumption does.
- ``CannedHttpServer``: answers every request with the same bytes, for what uvicorn never sends (e.g.
  header names in Title-Case, as Go's net/http writes them).
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId

from tests.e2e.mcp_server import build_mcp as build_e2e_mcp

MCP_PATH = "/mcp"


class ServerThread:
    def __init__(self, app, *, name: str, ready_timeout: float = 15.0, lifespan: str = "on") -> None:
        # IPPROTO_TCP explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto says TCP;
        # with proto 0 every two-part response (headers, body) waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port: int = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{name}", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"{name} exited before it started")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start within {ready_timeout}s")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def build_mcp() -> MCPServer:
    """The end-to-end suite's internal MCP server (same tools), plus a tool that uses the GET stream."""
    mcp = build_e2e_mcp(userinfo_url=None)

    @mcp.tool()
    async def announce(ctx: Context) -> str:
        """Send notifications/tools/list_changed, which travels on the session's GET stream."""
        await ctx.session.send_tool_list_changed()
        return "announced"

    return mcp


class MemoryEventStore(EventStore):
    """Every SSE event the server sent, in order, so a client can resume a stream after any of them."""

    def __init__(self) -> None:
        self.events: list[tuple[EventId, StreamId, Any]] = []

    async def store_event(self, stream_id: StreamId, message) -> EventId:
        event_id = str(len(self.events) + 1)
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        found = [i for i, (event_id, _, _) in enumerate(self.events) if event_id == last_event_id]
        if not found:
            return None
        stream_id = self.events[found[0]][1]
        for event_id, stream, message in self.events[found[0] + 1:]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


class InternalMcpServer:
    """The SDK's streamable-HTTP app plus a recorder. ``reject_tokens``: bearer tokens answered with 401."""

    def __init__(self, *, json_response: bool = False, stateless: bool = False, resumable: bool = False) -> None:
        self.app = build_mcp().streamable_http_app(
            streamable_http_path=MCP_PATH, json_response=json_response, stateless_http=stateless,
            event_store=MemoryEventStore() if resumable else None,
        )
        self.requests: dict[str, int] = {}
        self.headers: list[dict[str, str]] = []
        self.client_ports: list[int] = []  # the gateway's connection each request came on
        self.reject_tokens: set[str] = set()
        self.rejected = 0
        self.set_cookie = False  # answer with a Set-Cookie header (the gateway must not keep or pass it)
        self.open_streams = 0  # GET streams currently open
        self._thread = ServerThread(self, name="internal-mcp")
        self.url = f"{self._thread.base_url}{MCP_PATH}"

    def stop(self) -> None:
        self._thread.stop()

    def reset(self) -> None:
        self.requests.clear()
        self.headers.clear()
        self.client_ports.clear()
        self.reject_tokens.clear()
        self.rejected = 0
        self.set_cookie = False

    @property
    def last_headers(self) -> dict[str, str]:
        return self.headers[-1]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != MCP_PATH:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests[scope["method"]] = self.requests.get(scope["method"], 0) + 1
        self.headers.append(headers)
        self.client_ports.append(scope["client"][1])
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token in self.reject_tokens:
            self.rejected += 1
            body = json.dumps({"error": "invalid_token"}).encode()
            await send({
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b'Bearer error="invalid_token", resource_metadata="http://internal/x"'),
                ],
            })
            await send({"type": "http.response.body", "body": body})
            return
        if self.set_cookie:
            send = _with_cookie(send)
        if scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        self.open_streams += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open_streams -= 1


def wait_for(predicate, timeout: float = 5.0) -> Any:
    """Poll until predicate() is truthy (for effects that happen on a server's own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def _with_cookie(send):
    async def sending(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message["headers"], (b"set-cookie", b"route=internal-1; Path=/")]}
        await send(message)

    return sending


class CannedHttpServer:
    """An HTTP/1.1 server on a loopback port that reads each request (headers and Content-Length body) and
    answers it with ``response``, keeping the connection open."""

    def __init__(self, response: bytes) -> None:
        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    length = 0
                    while (line := self.rfile.readline()) not in (b"\r\n", b""):
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if not line:
                        return
                    self.rfile.read(length)
                    self.wfile.write(response)
                    self.wfile.flush()

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/mcp"
        threading.Thread(target=self._server.serve_forever, name="canned-http", daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
