"""The gateway's HTTP client: kept-alive connections to internal MCP servers, shared by all requests of
an event loop (one ``InternalServerPool`` per loop; a production worker has one loop).

The wire work is aiohttp's (asyncio-native, llhttp's C parser, headers and small bodies sent in one
write): about a third of the CPU per exchange that httpx/httpcore took (h11's pure-Python parser and
anyio's per-operation cancel scopes). What this module adds on top:

- a bound on open connections (``max_connections``) with its own wait timeout, so that "no free
  connection" (the gateway is busy) is told apart from "the internal server is slow";
- a write timeout: aiohttp has connect and read timeouts only, and does not start its read timeout before
  the request body is sent, so a server that stops reading would hold a request forever;
- no cookies (an internal server's cookie must never reach another user's request), no redirects, no
  proxy from the environment, no decompression (bodies pass through as they are), and none of
  aiohttp's own default headers: the caller's headers go out as given.
"""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import AsyncGenerator, Iterable

import aiohttp
from aiohttp.payload import Payload
from yarl import URL

MAX_CONNECTIONS = 1000  # open connections to internal servers; each open SSE stream holds one
# Idle connections are dropped after this long: below the keep-alive timeout of common servers
# (uvicorn: 5 s), so the gateway does not send a request down a connection the server is closing.
KEEPALIVE_EXPIRY = 4.0

# aiohttp adds these unless told not to; the gateway sends exactly the headers it chose (Host too).
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

_WRITE_SLICE = 64 * 1024  # request bodies go out in slices of this size (_BoundedBody)

# What a failed exchange raises: aiohttp's errors (its timeouts are also TimeoutError) and the
# timeouts of this module.
HTTP_ERRORS = (aiohttp.ClientError, TimeoutError)


class PoolTimeout(TimeoutError):
    """No connection became free within the pool timeout."""


class InternalServerPool:
    """Connections to internal servers, bounded, kept alive and reused (aiohttp's ``TCPConnector``)."""

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS, keepalive_expiry: float = KEEPALIVE_EXPIRY):
        self._slots = asyncio.Semaphore(max_connections)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,  # bounded by self._slots, whose wait has its own timeout and error
                keepalive_timeout=keepalive_expiry,
                # The system trust store (and SSL_CERT_FILE/SSL_CERT_DIR): internal servers often use a
                # company CA.
                ssl=ssl.create_default_context(),
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            auto_decompress=False,
            trust_env=False,
        )

    async def request(
        self,
        method: str,
        url: URL,
        *,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        timeout: aiohttp.ClientTimeout,
        write_timeout: float,
        pool_timeout: float,
    ) -> InternalServerResponse:
        """Send the request and return the response once its headers arrived; its body is unread, and
        ``aclose()`` must be called when done with it (it frees the connection).

        ``timeout``: aiohttp's ``sock_connect`` (opening a connection) and ``sock_read`` (to the response
        headers once the body is sent, and between two body chunks; ``None`` for none). Raises one of
        ``HTTP_ERRORS``; ``PoolTimeout`` when no connection became free within ``pool_timeout``.
        """
        if self._slots.locked():
            try:
                async with asyncio.timeout(pool_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise PoolTimeout("no free connection")
        else:
            await self._slots.acquire()  # does not wait
        try:
            response = await self._session.request(
                method,
                url,
                headers=headers,
                data=_BoundedBody(body, write_timeout=write_timeout) if body else None,
                timeout=timeout,
                allow_redirects=False,
            )
        except BaseException:
            self._slots.release()
            raise
        return InternalServerResponse(response, self._slots)

    async def aclose(self) -> None:
        await self._session.close()


class InternalServerResponse:
    """An internal server's response: ``status``, ``headers`` (raw byte pairs, as sent) and a body to read
    once, whole (``read()``) or chunk by chunk as it arrives (``chunks()``).

    ``aclose()`` frees the connection: back to the pool when the body was read to its end, else closed.
    Should a caller drop the response unclosed (e.g. a Django streaming response the client left before
    its body was started), a finalizer still frees its slot (aiohttp frees the connection): a lost slot
    would otherwise be lost for good.
    """

    def __init__(self, response: aiohttp.ClientResponse, slots: asyncio.Semaphore) -> None:
        self._response = response
        self._slots: asyncio.Semaphore | None = slots
        self.status: int = response.status
        self.headers: tuple[tuple[bytes, bytes], ...] = response.raw_headers
        self._finalizer = weakref.finalize(self, _call_soon_threadsafe, asyncio.get_running_loop(), slots.release)

    @property
    def content_length(self) -> int | None:
        return self._response.content_length

    @property
    def complete(self) -> bool:
        """The body has been received to its end, and read (or nothing was left to read)."""
        return self._response.content.at_eof()

    async def read(self) -> bytes:
        return await self._response.read()

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        content = self._response.content
        while chunk := await content.readany():
            yield chunk

    async def aclose(self) -> None:
        slots, self._slots = self._slots, None
        if slots is None:
            return
        self._finalizer.detach()
        slots.release()
        if self.complete:
            self._response.release()
        else:
            self._response.close()


class _BoundedBody(Payload):
    """A request body whose sending is bounded by the write timeout. When it expires aiohttp ends the
    exchange with the ``TimeoutError`` (waiting for the response raises it). Written in slices, so that
    each waits for the connection to take the one before (aiohttp drains past 64 KiB)."""

    _autoclose = True  # bytes in memory: nothing to close

    def __init__(self, value: bytes, *, write_timeout: float) -> None:
        super().__init__(value)
        self._size = len(value)
        self._write_timeout = write_timeout

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._value.decode(encoding, errors)

    async def write(self, writer) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer, content_length: int | None) -> None:
        body = memoryview(self._value)[:content_length]
        async with asyncio.timeout(self._write_timeout):
            for start in range(0, len(body), _WRITE_SLICE):
                await writer.write(body[start : start + _WRITE_SLICE])


def _call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    # Finalizers run wherever the garbage collector runs; the pool belongs to its loop's thread.
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: so are its connections
        pass


# One pool per event loop: connections belong to the loop that opened them.
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, InternalServerPool] = weakref.WeakKeyDictionary()


def internal_server_pool() -> InternalServerPool:
    """This event loop's pool, created on first use."""
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = InternalServerPool()
    return pool


async def internal_server_pool_close() -> None:
    """Close this event loop's kept-alive connections (ASGI lifespan shutdown)."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.aclose()
