"""The gateway: forward MCP streamable-HTTP traffic to a server's internal ``mcp_url`` (DESIGN §4).

The client's request goes on with its MCP headers and body and with ``Authorization: Bearer <upstream
access token>`` instead of the client's own credentials; the internal server's answer comes back
unbuffered, so each SSE event reaches the client when the internal server sends it.

Cost per request is what the benchmark watches: kept-alive connections shared by all requests of a
worker (``UpstreamPool``), server configuration and tokens from per-process caches
(``oauthproxy.gateway_auth``), no database query and no upstream call unless a cache entry expired or
the upstream token is due.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, Iterable
from dataclasses import dataclass
from urllib.parse import quote
from uuid import UUID

import httpcore
import httpx
from django.conf import settings
from django.utils.module_loading import import_string

from ..exceptions import InvalidToken, UpstreamError
from ..gateway_auth import (
    SingleFlight,
    TokenGrant,
    TTLCache,
    UpstreamCredential,
    gateway_auth_caches_clear,
    gateway_upstream_credential,
    run_in_db_thread,
)
from ..models import McpServer

logger = logging.getLogger(__name__)

# Defaults; a deployment overrides each with OAUTHPROXY["GATEWAY_<NAME>"] (e.g. GATEWAY_READ_TIMEOUT).
SERVER_CACHE_SECONDS = 30.0  # how long a worker keeps a server's configuration
CONNECT_TIMEOUT = 5.0  # seconds to open a connection to the internal server
READ_TIMEOUT = 120.0  # POST/DELETE: seconds to the response headers, and between two body chunks
WRITE_TIMEOUT = 30.0  # seconds to send the request body
POOL_TIMEOUT = 5.0  # seconds to wait for a free connection when MAX_CONNECTIONS are in use
STREAM_KEEPALIVE_SECONDS = 15.0  # GET SSE: send the client an SSE comment after this much silence
STREAM_IDLE_TIMEOUT = 600.0  # GET SSE: close the stream after this long without a byte from upstream
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # the largest request body the gateway forwards

# Fixed per process.
BUFFERED_RESPONSE_BYTES = 1024 * 1024  # non-SSE answers up to this size are read whole, then sent
MAX_CONNECTIONS = 1000  # open connections to internal servers; each open SSE stream holds one
MAX_IDLE_CONNECTIONS = 100  # kept-alive idle connections per internal server
# Idle connections are dropped after this long: below the keep-alive timeout of common servers
# (uvicorn: 5 s), so the gateway does not send a request down a connection the server is closing.
KEEPALIVE_EXPIRY = 4.0

# Request headers that go on to the internal server, plus every MCP header (Mcp-Session-Id,
# MCP-Protocol-Version, Mcp-Method, Mcp-Name, Mcp-Param-*). Everything else stays behind, in
# particular the client's Authorization, Cookie, Origin and any X-MCP-* identity headers it made up.
FORWARDED_REQUEST_HEADERS = frozenset({"accept", "content-type", "last-event-id"})
# Response headers that come back, plus every MCP header. Not WWW-Authenticate (it would describe the
# internal server's auth, not ours), Set-Cookie or hop-by-hop headers.
RETURNED_RESPONSE_HEADERS = frozenset({"content-type", "content-encoding", "cache-control", "allow", "retry-after"})
MCP_HEADER_PREFIX = "mcp-"

USER_AGENT = b"mcp-oauth-proxy"
SSE_KEEPALIVE = b": keep-alive\n\n"
_SSE_EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n")

# What httpcore raises for a failed exchange (it has no common base class).
_HTTP_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    httpcore.ProxyError,
)


def _setting(name: str, default: float) -> float:
    return float(settings.OAUTHPROXY.get(f"GATEWAY_{name}", default))


def max_request_bytes() -> int:
    return int(_setting("MAX_REQUEST_BYTES", MAX_REQUEST_BYTES))


# -- errors ------------------------------------------------------------------------------------------

class GatewayError(Exception):
    """The gateway cannot give an answer from the internal server; rendered as a JSON-RPC error."""

    status = 502

    def __init__(self, message: str, *, status: int | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        if status:
            self.status = status
        self.retry_after = retry_after


class PoolTimeout(httpcore.TimeoutException):
    """No connection became free within the pool timeout."""


def jsonrpc_error(message: str, *, request_id=None) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32000, "message": message}}


# -- servers -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GatewayServer:
    """An enabled MCP server as the gateway sees it: a snapshot, safe to share between requests."""

    id: UUID
    slug: str
    send_identity_headers: bool
    resource_url: str
    resource_metadata_url: str
    scopes: tuple[str, ...]
    required_scopes: frozenset[str]
    url: httpcore.URL | None  # the parsed mcp_url (None: not configured, or not a usable URL)
    host_header: bytes
    timeout: dict  # httpcore request extensions for POST and DELETE
    stream_timeout: dict  # the same for GET (the SSE stream): no read timeout
    stream_open_timeout: float  # GET: seconds to the response headers


_UNKNOWN_SERVER = object()  # cached for unknown or disabled slugs: probing them costs no query either
_servers: TTLCache[GatewayServer | object] = TTLCache(maxsize=1000)
_server_loads = SingleFlight()


async def gateway_server_get(*, slug: str) -> GatewayServer | None:
    """The enabled server with this slug (``None``: unknown or disabled), from a per-process cache.

    Configuration changes reach the gateway within ``OAUTHPROXY["GATEWAY_SERVER_CACHE_SECONDS"]`` (30 s
    by default). Disabling a server stops its tokens sooner: token validation re-reads the server with
    the token, every ``GATEWAY_CACHE_SECONDS``.
    """
    cached = _servers.get(slug)
    if cached is None:
        cached = await _server_loads.run(slug, lambda: _server_load(slug))
    return None if cached is _UNKNOWN_SERVER else cached


async def _server_load(slug: str) -> GatewayServer | object:
    server = await run_in_db_thread(lambda: McpServer.objects.enabled().filter(slug=slug).first(), cache_load=True)
    snapshot = gateway_server_snapshot(server) if server is not None else _UNKNOWN_SERVER
    _servers.set(slug, snapshot, ttl=_setting("SERVER_CACHE_SECONDS", SERVER_CACHE_SECONDS))
    return snapshot


def gateway_server_snapshot(server: McpServer) -> GatewayServer:
    """The gateway's view of a server. Timeouts are per server; today every server gets the
    deployment's values (the GATEWAY_* settings, defaults above)."""
    connect = _setting("CONNECT_TIMEOUT", CONNECT_TIMEOUT)
    read = _setting("READ_TIMEOUT", READ_TIMEOUT)
    write = _setting("WRITE_TIMEOUT", WRITE_TIMEOUT)
    url, host_header = _parse_mcp_url(server.mcp_url)
    return GatewayServer(
        id=server.id,
        slug=server.slug,
        send_identity_headers=server.send_identity_headers,
        resource_url=server.resource_url,
        resource_metadata_url=server.resource_metadata_url,
        scopes=tuple(server.scopes or ()),
        required_scopes=frozenset(gateway_required_scopes(server)),
        url=url,
        host_header=host_header,
        timeout={"timeout": {"connect": connect, "read": read, "write": write}},
        # The relay bounds an idle stream instead (STREAM_IDLE_TIMEOUT).
        stream_timeout={"timeout": {"connect": connect, "read": None, "write": write}},
        stream_open_timeout=read,
    )


def _parse_mcp_url(mcp_url: str) -> tuple[httpcore.URL | None, bytes]:
    if not mcp_url:
        return None, b""
    try:
        url = httpx.URL(mcp_url)  # parsing (IDNA, IPv6, default ports) as httpx does it
    except httpx.InvalidURL:
        return None, b""
    if url.scheme not in ("http", "https") or not url.host:
        return None, b""
    return httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path), url.netloc


def gateway_required_scopes(server: McpServer) -> Iterable[str]:
    """Scopes a token must carry at this server's gateway, else ``403 insufficient_scope`` (MCP step-up).

    None by default. ``OAUTHPROXY["GATEWAY_REQUIRED_SCOPES"]`` may name a function ``(server) ->
    iterable of scopes`` (a dotted path, like django-oauth-toolkit's swap points) for deployments that
    need step-up.
    """
    hook = settings.OAUTHPROXY.get("GATEWAY_REQUIRED_SCOPES")
    if not hook:
        return ()
    return import_string(hook)(server) if isinstance(hook, str) else hook(server)


def gateway_caches_clear() -> None:
    """Forget every cached server, token and upstream credential of this process (tests, admin tools)."""
    _servers.clear()
    gateway_auth_caches_clear()


# -- connections to internal servers -----------------------------------------------------------------

class UpstreamPool:
    """Kept-alive HTTP/1.1 connections to internal servers, shared by all requests of an event loop.

    httpx's pool (``httpcore.AsyncConnectionPool``) rescans every connection on every request and
    probes each idle one with a system call; with a few dozen connections (one per concurrent request
    or open SSE stream) that cost more CPU than the rest of the gateway together. This pool takes the
    most recently used idle connection of the origin (one check), opens a new connection when none is
    idle, and takes the connection back when the response is closed. The HTTP itself (h11, TLS,
    timeouts) is httpcore's, the layer httpx is built on. No cookies are kept: an internal server's
    cookie must never reach another user's request.
    """

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS) -> None:
        self._idle: dict[tuple[bytes, bytes, int | None], list[tuple[httpcore.AsyncHTTPConnection, float]]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        # The system trust store (and SSL_CERT_FILE/SSL_CERT_DIR): internal servers often use a company CA.
        self._ssl_context = ssl.create_default_context()

    async def request(self, request: httpcore.Request, *, pool_timeout: float) -> httpcore.Response:
        """Send the request; the response's stream must be closed (it frees the connection)."""
        try:
            async with asyncio.timeout(pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise PoolTimeout("no free connection")
        try:
            origin = request.url.origin
            key = (origin.scheme, origin.host, origin.port)
            connection = await self._idle_connection(key) or httpcore.AsyncHTTPConnection(
                origin=origin, ssl_context=self._ssl_context, keepalive_expiry=KEEPALIVE_EXPIRY
            )
            response = await connection.handle_async_request(request)
        except BaseException:
            self._slots.release()
            raise
        response.stream = _PooledStream(response.stream, self, key, connection)
        return response

    def _lost(self, connection: httpcore.AsyncHTTPConnection) -> None:
        """A response was dropped without being closed: free its slot and connection anyway."""
        self._slots.release()
        asyncio.get_running_loop().create_task(connection.aclose())

    async def _idle_connection(self, key) -> httpcore.AsyncHTTPConnection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle and now - idle[0][1] > KEEPALIVE_EXPIRY:  # the oldest first: no system call needed
            await idle.pop(0)[0].aclose()
        while idle:
            connection, _ = idle.pop()
            if connection.is_idle() and not connection.has_expired():  # has_expired: closed by the server?
                return connection
            await connection.aclose()
        return None

    async def _release(self, key, connection: httpcore.AsyncHTTPConnection) -> None:
        self._slots.release()
        idle = self._idle.setdefault(key, [])
        if connection.is_idle() and len(idle) < MAX_IDLE_CONNECTIONS:
            idle.append((connection, time.monotonic()))
        else:
            await connection.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection, _ in connections:
                await connection.aclose()


class _PooledStream:
    """A response body that gives its connection back to the pool when closed (exactly once).

    Should a caller drop it unclosed (e.g. a Django streaming response the client left before its body
    was started), a finalizer still frees the slot: a lost slot would otherwise be lost for good.
    """

    def __init__(self, stream, pool: UpstreamPool, key, connection: httpcore.AsyncHTTPConnection) -> None:
        self._stream, self._pool, self._key, self._connection = stream, pool, key, connection
        self._finalizer = weakref.finalize(
            self, _call_soon_threadsafe, asyncio.get_running_loop(), pool._lost, connection
        )

    async def __aiter__(self):
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        self._finalizer.detach()
        try:
            await self._stream.aclose()  # an unfinished response closes the connection itself
        finally:
            await self._pool._release(self._key, connection)


def _call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    # Finalizers run wherever the garbage collector runs; the pool belongs to its loop's thread.
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: so are its connections
        pass


# One pool per event loop: connections belong to the loop that opened them. A production worker has one
# loop, hence one pool for all requests and servers.
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, UpstreamPool] = weakref.WeakKeyDictionary()


def gateway_upstream_pool() -> UpstreamPool:
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = UpstreamPool()
    return pool


async def gateway_upstream_pool_close() -> None:
    """Close this event loop's kept-alive connections (ASGI lifespan shutdown)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.aclose()


# -- forwarding --------------------------------------------------------------------------------------

@dataclass(slots=True)
class ForwardedResponse:
    """The internal server's answer: ``content`` when it was small and not a stream (read whole, so it
    goes out in one piece with a Content-Length), else ``body`` to stream. Call ``aclose()`` when done
    with ``body`` (also when it was never read): it releases the internal connection."""

    status: int
    headers: dict[str, str]
    content: bytes | None
    body: AsyncGenerator[bytes, None] | None
    upstream: httpcore.Response

    async def aclose(self) -> None:
        if self.body is not None:
            await self.body.aclose()
        await self.upstream.aclose()


async def gateway_forward(
    *,
    server: GatewayServer,
    grant: TokenGrant,
    method: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
) -> ForwardedResponse:
    """Send the client's request on to the internal server and return its answer.

    When the internal server answers 401 to a token we believed fresh, the upstream token is refreshed
    once and the request retried: it is safe, the body is in memory and nothing reached the client yet.

    Raises ``GatewayError`` (502 unreachable or broken, 503 busy or upstream IdP down, 504 timed out)
    and ``InvalidToken`` (the session ended, or the internal server keeps refusing its credential).
    """
    forwarded = _forwarded_headers(server, grant, headers, body if method == "POST" else None)
    credential = await _credential(grant)
    response = await _send(server, method, forwarded, body, credential)
    if response.status == 401:
        await response.aclose()
        logger.info("gateway %s: internal server refused the upstream token; refreshing once", server.slug)
        renewed = await _credential(grant, rejected=credential)
        if renewed.access_token != credential.access_token:
            response = await _send(server, method, forwarded, body, renewed)
        if response.status == 401:
            await response.aclose()
            raise InvalidToken("The MCP server refused this session's credentials; authorize again.")
    returned = _returned_headers(response)
    sse = returned.get("content-type", "").startswith("text/event-stream")
    if not sse and _small(response):
        try:
            content = b"".join([chunk async for chunk in response.stream])
        except _HTTP_ERRORS as exc:
            raise _gateway_error(exc, server, method)
        finally:
            await response.aclose()
        return ForwardedResponse(response.status, returned, content, None, response)
    body_stream = _relay(response, sse=sse, method=method, request_body=body, server=server)
    return ForwardedResponse(response.status, returned, None, body_stream, response)


async def _credential(grant: TokenGrant, *, rejected: UpstreamCredential | None = None) -> UpstreamCredential:
    try:
        return await gateway_upstream_credential(
            grant=grant, rejected_access_token=rejected.access_token if rejected else None
        )
    except UpstreamError as exc:
        logger.warning("gateway: upstream token refresh failed: %s", exc.reason)
        raise GatewayError(
            "The identity provider is unavailable; try again shortly.", status=503, retry_after=5
        )


def _forwarded_headers(
    server: GatewayServer, grant: TokenGrant, headers: Iterable[tuple[str, str]], body: bytes | None
) -> list[tuple[bytes, bytes]]:
    """The request headers for the internal server, all but Authorization (added per attempt)."""
    forwarded = [
        (b"host", server.host_header),
        (b"user-agent", USER_AGENT),
        # No compression with the internal server: bodies pass through as they are.
        (b"accept-encoding", b"identity"),
    ]
    for name, value in headers:
        name = name.lower()
        if name in FORWARDED_REQUEST_HEADERS or name.startswith(MCP_HEADER_PREFIX):
            forwarded.append((name.encode("latin-1"), value.encode("latin-1")))
    if server.send_identity_headers:
        forwarded.append((b"x-mcp-subject", _identity_value(grant.subject)))
        forwarded.append((b"x-mcp-client-id", _identity_value(grant.client_id)))
    if body is not None:
        forwarded.append((b"content-length", str(len(body)).encode()))
    return forwarded


def _identity_value(value: str) -> bytes:
    """Header-safe: printable ASCII as is, anything else percent-encoded (UTF-8)."""
    if value.isascii() and value.isprintable():
        return value.encode()
    return quote(value, safe="").encode()


async def _send(
    server: GatewayServer,
    method: str,
    forwarded: list[tuple[bytes, bytes]],
    body: bytes,
    credential: UpstreamCredential,
) -> httpcore.Response:
    headers = [*forwarded, (b"authorization", b"Bearer " + credential.access_token.encode("latin-1"))]
    pool = gateway_upstream_pool()
    pool_timeout = _setting("POOL_TIMEOUT", POOL_TIMEOUT)
    try:
        if method == "GET":
            # The long-lived SSE stream: no read timeout once it is open, but its headers are bounded.
            request = httpcore.Request(method, server.url, headers=headers, extensions=server.stream_timeout)
            async with asyncio.timeout(server.stream_open_timeout):
                return await pool.request(request, pool_timeout=pool_timeout)
        content = body if method == "POST" else None
        request = httpcore.Request(method, server.url, headers=headers, content=content, extensions=server.timeout)
        return await pool.request(request, pool_timeout=pool_timeout)
    except (*_HTTP_ERRORS, TimeoutError) as exc:
        raise _gateway_error(exc, server, method)


def _gateway_error(exc: Exception, server: GatewayServer, method: str) -> GatewayError:
    if isinstance(exc, PoolTimeout):
        _log_failure(server, method, "found no free connection (MAX_CONNECTIONS in use)")
        return GatewayError("The gateway is busy; try again shortly.", status=503, retry_after=1)
    if isinstance(exc, httpcore.TimeoutException | TimeoutError):
        _log_failure(server, method, "timed out")
        return GatewayError("The MCP server did not answer in time.", status=504)
    if isinstance(exc, httpcore.ConnectError):
        _log_failure(server, method, f"cannot connect ({exc or type(exc).__name__})")
        return GatewayError("The MCP server is unreachable.", status=502)
    _log_failure(server, method, f"failed ({type(exc).__name__})")
    return GatewayError("The MCP server failed to answer.", status=502)


def _log_failure(server: GatewayServer, method: str, reason: str) -> None:
    logger.warning("gateway %s: %s to the internal MCP server %s", server.slug, method, reason)


def _returned_headers(response: httpcore.Response) -> dict[str, str]:
    returned = {}
    for raw_name, raw_value in response.headers:  # h11 gives lower-case names
        name = raw_name.decode("latin-1")
        if name in RETURNED_RESPONSE_HEADERS or name.startswith(MCP_HEADER_PREFIX):
            returned[name] = raw_value.decode("latin-1")
    if returned.get("content-type", "").startswith("text/event-stream"):
        returned.setdefault("cache-control", "no-cache")
        returned["x-accel-buffering"] = "no"  # nginx and friends: do not buffer the stream
    return returned


def _small(response: httpcore.Response) -> bool:
    for name, value in response.headers:
        if name == b"content-length":
            return value.isdigit() and int(value) <= BUFFERED_RESPONSE_BYTES
    return False


async def _relay(
    response: httpcore.Response, *, sse: bool, method: str, request_body: bytes, server: GatewayServer
) -> AsyncGenerator[bytes, None]:
    """The internal server's body, chunk by chunk as it arrives. Always closes the internal response,
    whether the body ends, fails, or the client goes away (the ASGI server cancels or closes us)."""
    at_event_boundary = True
    chunks = _with_keepalive(response.stream) if method == "GET" and sse else aiter(response.stream)
    try:
        async for chunk in chunks:
            at_event_boundary = chunk.endswith(_SSE_EVENT_ENDS)
            yield chunk
    except _HTTP_ERRORS as exc:
        # The status line is sent: all we can do is end the stream. For an SSE answer to a request,
        # tell the client its request failed (at an event boundary) rather than leave it waiting.
        timed_out = isinstance(exc, httpcore.TimeoutException)
        _log_failure(server, method, "timed out mid-response" if timed_out else f"broke ({type(exc).__name__})")
        request_id = _request_id(request_body) if sse and at_event_boundary else None
        if request_id is not None:
            message = "The MCP server did not answer in time." if timed_out else "The MCP server failed to answer."
            data = json.dumps(jsonrpc_error(message, request_id=request_id), separators=(",", ":"))
            yield f"event: message\ndata: {data}\n\n".encode()
    finally:
        await chunks.aclose()
        await response.aclose()


async def _with_keepalive(stream: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
    """A GET SSE stream with an SSE comment sent whenever the internal server is silent for a while, so
    load balancers keep the connection; closed after ``STREAM_IDLE_TIMEOUT`` of silence (the client
    reconnects, resuming with Last-Event-ID). The pending read is never cancelled between keep-alives."""
    interval = _setting("STREAM_KEEPALIVE_SECONDS", STREAM_KEEPALIVE_SECONDS)
    idle_limit = _setting("STREAM_IDLE_TIMEOUT", STREAM_IDLE_TIMEOUT)
    loop = asyncio.get_running_loop()
    chunks = aiter(stream)
    pending: asyncio.Future | None = None
    at_event_boundary = True
    last_data = loop.time()
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait((pending,), timeout=interval)
            if not done:
                if loop.time() - last_data >= idle_limit:
                    return
                if at_event_boundary:
                    yield SSE_KEEPALIVE
                continue
            finished, pending = pending, None
            try:
                chunk = finished.result()
            except StopAsyncIteration:
                return
            last_data = loop.time()
            at_event_boundary = chunk.endswith(_SSE_EVENT_ENDS)
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.wait((pending,))
        await chunks.aclose()


def _request_id(body: bytes):
    """The JSON-RPC id of a single request in ``body``, else None (only parsed on failure)."""
    try:
        message = json.loads(body)
    except ValueError:
        return None
    if isinstance(message, dict) and "method" in message and isinstance(message.get("id"), str | int):
        return message["id"]
    return None
