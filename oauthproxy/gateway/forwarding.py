"""The gateway: forward MCP streamable-HTTP traffic to a server's internal ``mcp_url`` (DESIGN §4).

The client's request goes on with its MCP headers and body and with ``Authorization: Bearer <upstream
access token>`` instead of the client's own credentials; the internal server's answer comes back
unbuffered, so each SSE event reaches the client when the internal server sends it.

Cost per request is what the benchmark watches: kept-alive connections shared by all requests of a
worker (``core.http.InternalServerPool``, on aiohttp), server configuration and tokens from per-process caches
(``oauthproxy.gateway.auth``), no database query and no upstream call unless a cache entry expired or
the upstream token is due.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterable, Iterable
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

from oauthproxy.core import caching
from oauthproxy.core.destinations import destination_policies_clear
from oauthproxy.core.exceptions import InvalidToken, UpstreamError
from oauthproxy.core.http import (  # noqa: F401 (proxy_site.asgi's lifespan imports it from here)
    HTTP_ERRORS,
    DestinationRefused,
    InternalServerResponse,
    PoolTimeout,
    internal_server_pool,
    internal_server_pool_close,
)
from oauthproxy.core.settings import proxy_settings
from oauthproxy.gateway.auth import (
    TokenGrant,
    UpstreamCredential,
    gateway_auth_caches_clear,
    gateway_upstream_credential,
)
from oauthproxy.gateway.identity import gateway_identity_headers, identity_caches_clear
from oauthproxy.gateway.mcp_sessions import mcp_session_id_open, mcp_session_id_seal
from oauthproxy.gateway.servers import GatewayServer, gateway_destination_policy

logger = logging.getLogger(__name__)

# Fixed per process (and gateway_http.MAX_CONNECTIONS, KEEPALIVE_EXPIRY).
BUFFERED_RESPONSE_BYTES = 1024 * 1024  # non-SSE answers up to this size are read whole, then sent

# Request headers that go on to the internal server: the MCP headers the specification names
# (Mcp-Session-Id, MCP-Protocol-Version, Last-Event-ID; the 2026 envelope's Mcp-Method, Mcp-Name and
# Mcp-Param-<name>). Everything else stays behind, in particular the client's Authorization, Cookie,
# Origin, any X-MCP-* identity header and any other Mcp-* header it made up (issue 13, finding 10).
FORWARDED_REQUEST_HEADERS = frozenset(
    {"accept", "content-type", "last-event-id", "mcp-session-id", "mcp-protocol-version", "mcp-method", "mcp-name"}
)
MCP_PARAM_HEADER_PREFIX = "mcp-param-"
# Response headers that come back. Not WWW-Authenticate (it would describe the internal server's auth,
# not ours), Set-Cookie, hop-by-hop headers or MCP headers the specification does not name.
RETURNED_RESPONSE_HEADERS = frozenset(
    {"content-type", "content-encoding", "cache-control", "allow", "retry-after", "mcp-session-id",
     "mcp-protocol-version"}
)

USER_AGENT = "mcp-oauth-proxy"
SSE_KEEPALIVE = b": keep-alive\n\n"
_SSE_EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n")


def max_request_bytes() -> int:
    return int(proxy_settings.GATEWAY_MAX_REQUEST_BYTES)


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


def jsonrpc_error(message: str, *, request_id=None) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32000, "message": message}}


def gateway_caches_clear() -> None:
    """Forget every cached server, token and upstream credential of this process (tests, admin tools)."""
    caching.servers.clear()
    gateway_auth_caches_clear()
    identity_caches_clear()
    destination_policies_clear()


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
    internal: InternalServerResponse

    @property
    def complete(self) -> bool:
        """Whether the internal server's body has been received to its end: the chunk ``body`` yielded
        last is then the last one."""
        return self.internal.complete

    async def aclose(self) -> None:
        if self.body is not None:
            await self.body.aclose()
        await self.internal.aclose()


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
    forwarded = _forwarded_headers(server, grant, headers)
    forwarded += await gateway_identity_headers(server=server, grant=grant)
    credential = await _credential(grant)
    response = await _send(server, method, forwarded, body, credential)
    if response.status == 401 and server.forward_upstream_token:
        await response.aclose()
        logger.info("gateway %s: internal server refused the upstream token; refreshing once", server.slug)
        renewed = await _credential(grant, rejected=credential)
        if renewed.access_token != credential.access_token:
            response = await _send(server, method, forwarded, body, renewed)
        if response.status == 401:
            await response.aclose()
            raise InvalidToken("The MCP server refused this session's credentials; authorize again.")
    returned = _returned_headers(response)
    if "mcp-session-id" in returned:
        returned["mcp-session-id"] = mcp_session_id_seal(
            session_id=returned["mcp-session-id"], grant_session=grant.session_id
        )
    sse = returned.get("content-type", "").startswith("text/event-stream")
    if not sse and _small(response):
        try:
            content = await response.read()
        except HTTP_ERRORS as exc:
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
    server: GatewayServer, grant: TokenGrant, headers: Iterable[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The request headers for the internal server, all but Authorization (added per attempt). The
    client's values go on as the same bytes; a value that cannot (a control character, or bytes that
    are not UTF-8, which is what aiohttp sends) is refused with 400 rather than altered."""
    forwarded = [
        ("host", server.host_header),
        ("user-agent", USER_AGENT),
        # No compression with the internal server: bodies pass through as they are.
        ("accept-encoding", "identity"),
    ]
    for name, value in headers:
        name = name.lower()
        if name == "mcp-session-id":  # bound to the grant that opened it: unwrapped, or refused
            value = mcp_session_id_open(value=value, grant_session=grant.session_id)
            if value is None:
                raise GatewayError("Session not found.", status=404)
        if name in FORWARDED_REQUEST_HEADERS or name.startswith(MCP_PARAM_HEADER_PREFIX):
            forwarded.append((name, value if _SAFE_HEADER_VALUE.fullmatch(value) else _header_value(name, value)))
    if server.send_identity_headers:
        forwarded.append(("x-mcp-subject", _identity_value(grant.subject)))
        forwarded.append(("x-mcp-client-id", _identity_value(grant.client_id)))
    return forwarded


# Printable ASCII and tab: goes out as it is. Anything else is looked at by _header_value.
_SAFE_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
# What aiohttp refuses to send (header injection); ASGI servers refuse line breaks before we see them.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _header_value(name: str, value: str) -> str:
    """A client's header value (decoded as Latin-1, as ASGI servers and Django do) as the string whose
    UTF-8 encoding is the bytes the client sent."""
    try:
        text = value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        text = None
    if text is None or _CONTROL_CHARACTERS.search(text):
        raise GatewayError(f"The request header {name} cannot be forwarded.", status=400)
    return text


def _identity_value(value: str) -> str:
    """Header-safe: printable ASCII as is, anything else percent-encoded (UTF-8)."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe="")


async def _send(
    server: GatewayServer,
    method: str,
    forwarded: list[tuple[str, str]],
    body: bytes,
    credential: UpstreamCredential,
) -> InternalServerResponse:
    headers = forwarded
    if server.forward_upstream_token:
        headers = [*forwarded, ("authorization", "Bearer " + credential.access_token)]
    pool = internal_server_pool()
    pool_timeout = float(proxy_settings.GATEWAY_POOL_TIMEOUT)
    policy = await gateway_destination_policy(server)  # where mcp_url may lead (DESIGN §5.13); cached
    try:
        if method == "GET":
            # The long-lived SSE stream: no read timeout once it is open, but its headers are bounded.
            async with asyncio.timeout(server.stream_open_timeout):
                return await pool.request(
                    method, server.url, headers=headers, body=b"", timeout=server.stream_timeout,
                    write_timeout=server.write_timeout, pool_timeout=pool_timeout, policy=policy,
                )
        return await pool.request(
            method, server.url, headers=headers, body=body if method == "POST" else b"", timeout=server.timeout,
            write_timeout=server.write_timeout, pool_timeout=pool_timeout, policy=policy,
        )
    except DestinationRefused as exc:
        _log_failure(server, method, f"was refused: {exc.reason}")
        raise GatewayError("The MCP server is unreachable.", status=502)
    except HTTP_ERRORS as exc:
        raise _gateway_error(exc, server, method)
    except ValueError as exc:  # aiohttp refuses a header value (e.g. an upstream token with a line break)
        raise _gateway_error(exc, server, method)


def _gateway_error(exc: Exception, server: GatewayServer, method: str) -> GatewayError:
    if isinstance(exc, PoolTimeout):
        _log_failure(server, method, "found no free connection (MAX_CONNECTIONS in use)")
        return GatewayError("The gateway is busy; try again shortly.", status=503, retry_after=1)
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
        _log_failure(server, method, "timed out")
        return GatewayError("The MCP server did not answer in time.", status=504)
    if isinstance(exc, aiohttp.ClientConnectorError):
        _log_failure(server, method, f"cannot connect ({exc.os_error or type(exc).__name__})")
        return GatewayError("The MCP server is unreachable.", status=502)
    _log_failure(server, method, f"failed ({type(exc).__name__})")
    return GatewayError("The MCP server failed to answer.", status=502)


def _log_failure(server: GatewayServer, method: str, reason: str) -> None:
    logger.warning("gateway %s: %s to the internal MCP server %s", server.slug, method, reason)


def _returned_headers(response: InternalServerResponse) -> dict[str, str]:
    returned = {}
    for raw_name, raw_value in response.headers:  # as the server wrote them
        name = raw_name.decode("latin-1").lower()
        if name in RETURNED_RESPONSE_HEADERS:
            returned[name] = raw_value.decode("latin-1")
    if returned.get("content-type", "").startswith("text/event-stream"):
        returned.setdefault("cache-control", "no-cache")
        returned["x-accel-buffering"] = "no"  # nginx and friends: do not buffer the stream
    return returned


def _small(response: InternalServerResponse) -> bool:
    length = response.content_length
    return length is not None and length <= BUFFERED_RESPONSE_BYTES


async def _relay(
    response: InternalServerResponse, *, sse: bool, method: str, request_body: bytes, server: GatewayServer
) -> AsyncGenerator[bytes, None]:
    """The internal server's body, chunk by chunk as it arrives. Always closes the internal response,
    whether the body ends, fails, or the client goes away (the ASGI server cancels or closes us)."""
    at_event_boundary = True
    chunks = _with_keepalive(response.chunks()) if method == "GET" and sse else response.chunks()
    try:
        async for chunk in chunks:
            at_event_boundary = chunk.endswith(_SSE_EVENT_ENDS)
            yield chunk
    except HTTP_ERRORS as exc:
        # The status line is sent: all we can do is end the stream. For an SSE answer to a request,
        # tell the client its request failed (at an event boundary) rather than leave it waiting.
        timed_out = isinstance(exc, TimeoutError)
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
    interval = float(proxy_settings.GATEWAY_STREAM_KEEPALIVE_SECONDS)
    idle_limit = float(proxy_settings.GATEWAY_STREAM_IDLE_TIMEOUT)
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
