"""Outbound HTTP, in one place: the gateway's pool of connections to internal MCP servers (aiohttp), and
``outbound_fetch`` for every call to the outside (identity providers, client metadata documents), both
under one destination policy (``DestinationPolicy``) checked against the resolved address.

The gateway's HTTP client: kept-alive connections to internal MCP servers, shared by all requests of
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

import _socket
import asyncio
import contextvars
import heapq
import ipaddress
import re
import socket
import ssl
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import requests
import urllib3
from aiohttp.abc import AbstractResolver
from aiohttp.payload import Payload
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import create_connection
from yarl import URL

from oauthproxy.core.settings import proxy_settings

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
    """Connections to internal servers, bounded, kept alive and reused (aiohttp's ``TCPConnector``).

    Each request names its ``DestinationPolicy``: a literal address in the URL is checked before anything
    is sent, a host name when a new connection resolves it (``_PolicyResolver``: the addresses connected to
    are the addresses checked). A kept-alive connection is reused only for the same host name and port.
    """

    def __init__(self, *, max_connections: int = MAX_CONNECTIONS, keepalive_expiry: float = KEEPALIVE_EXPIRY):
        self._slots = asyncio.Semaphore(max_connections)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0,  # bounded by self._slots, whose wait has its own timeout and error
                keepalive_timeout=keepalive_expiry,
                resolver=_PolicyResolver(),
                use_dns_cache=False,  # _PolicyResolver caches per host; aiohttp's cache would skip its check
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
        policy: DestinationPolicy | None = None,
    ) -> InternalServerResponse:
        """Send the request and return the response once its headers arrived; its body is unread, and
        ``aclose()`` must be called when done with it (it frees the connection).

        ``timeout``: aiohttp's ``sock_connect`` (opening a connection) and ``sock_read`` (to the response
        headers once the body is sent, and between two body chunks; ``None`` for none). Raises one of
        ``HTTP_ERRORS``; ``PoolTimeout`` when no connection became free within ``pool_timeout``;
        ``DestinationRefused`` when *policy* (default: no special addresses) refuses the destination.
        """
        policy = policy if policy is not None else DestinationPolicy()
        if _host_literal(url.host or "") is not None:  # aiohttp does not resolve a literal address
            if reason := policy.refusal(url.host):
                raise DestinationRefused(f"destination not allowed: {reason}")
        _pool_policy.set(policy)  # this task's: read by _PolicyResolver when a connection is opened
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


RESOLVE_CACHE_SECONDS = 10.0
_pool_policy: contextvars.ContextVar[DestinationPolicy | None] = contextvars.ContextVar("pool_policy", default=None)


class _PolicyResolver(AbstractResolver):
    """aiohttp's resolver, cached per host for ``RESOLVE_CACHE_SECONDS``, answering only when every address
    passes the destination policy of the request opening the connection (else ``DestinationRefused``).
    Called only when a new connection is opened: kept-alive connections cost nothing."""

    def __init__(self) -> None:
        self._resolver = aiohttp.DefaultResolver()
        self._cache: dict[tuple[str, int, int], tuple[float, list]] = {}

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
        key = (host, port, int(family))
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is None or entry[0] < now:
            if len(self._cache) > 1000:
                self._cache.clear()
            entry = self._cache[key] = (now + RESOLVE_CACHE_SECONDS, await self._resolver.resolve(host, port, family))
        policy = _pool_policy.get() or DestinationPolicy()
        for result in entry[1]:
            if reason := policy.refusal(host, result["host"]):
                raise DestinationRefused(f"destination not allowed: {reason}")
        return entry[1]

    async def close(self) -> None:
        await self._resolver.close()


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


# -- Outbound HTTP to the outside: upstream identity providers, client metadata documents -------------
#
# Every call the proxy makes to a URL someone configured or sent (the upstream's token, revocation,
# userinfo, metadata and JWKS endpoints, discovery, the connection check, client ID metadata documents)
# goes through ``outbound_fetch``: one pooled ``requests`` session whose connections
#
# - resolve the host, check *every* address against the caller's ``DestinationPolicy`` and connect the
#   socket to a checked address (TLS still verifies the real host name), so the address checked is the
#   address used: no DNS rebinding between the check and the connect; a kept-alive connection is checked
#   again (its peer address) before each request;
# - run under a total deadline enforced on the socket: a watchdog thread shuts the socket down when the
#   deadline passes, which ends a blocked read at once, so a server sending one byte a second (headers,
#   TLS handshake or body) is cut at the deadline, not at the next per-read timeout;
# - follow no redirects, use no proxy or .netrc from the environment, and read at most ``max_bytes``.


class OutboundError(Exception):
    """An outbound call failed; ``reason`` says why for an operator (never a secret)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class OutboundTimeout(OutboundError):
    """The call's deadline passed (connecting, sending, or reading the response)."""


class OutboundConnectionError(OutboundError):
    """No connection could be opened (name not resolved, refused, reset)."""


class DestinationRefused(OutboundError):
    """The destination policy does not allow this host or address. Raised before any connection is opened,
    so the answer is the same whether or not something listens there."""


class ResponseTooLarge(OutboundError):
    """The response body is larger than the caller's ``max_bytes``."""


# Addresses nobody but a platform admin may send a request to: loopback, link-local (which includes the
# 169.254.169.254 cloud metadata service), the unspecified address, and the metadata addresses that are not
# link-local (AWS IPv6, Alibaba, Oracle). Multicast and reserved ranges are not connectable anyway.
SPECIAL_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "127.0.0.0/8", "::1/128",  # loopback
        "169.254.0.0/16", "fe80::/10",  # link-local, cloud metadata (AWS, GCP, Azure, DigitalOcean...)
        "0.0.0.0/8", "::/128",  # "this host"
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "192.0.0.192/32",  # Oracle Cloud metadata
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "224.0.0.0/4", "ff00::/8", "240.0.0.0/4",  # multicast, reserved
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SPECIAL_HOST_NAMES = ("localhost", "localhost.localdomain", "metadata.google.internal", "metadata")


def _ip(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address):
    """An address, with an IPv4 embedded in IPv6 (mapped, 6to4, NAT64, Teredo) unwrapped, so that an AAAA
    record cannot smuggle 127.0.0.1 or the metadata address past a check."""
    ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None:
            return ip.teredo[1]
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return embedded
    return ip


def address_is_special(address) -> bool:
    """Loopback, link-local, cloud metadata, unspecified, multicast or reserved."""
    ip = _ip(address)
    return any(ip.version == net.version and ip in net for net in SPECIAL_NETWORKS)


def address_is_public(address) -> bool:
    """A globally routable address (not private, shared, loopback, link-local, documentation...)."""
    ip = _ip(address)
    return ip.is_global and not address_is_special(ip)


def _host_literal(host: str):
    try:
        return _ip(host.strip("[]"))
    except ValueError:
        return None


@dataclass(frozen=True)
class DestinationPattern:
    """One allowed destination: a host name (``api.example.com``), a domain and its subdomains
    (``*.example.com``), any host (``*``), or an address or network (``10.0.0.0/8``, ``192.0.2.7``,
    ``fd12::/16``). Host-name patterns never allow a special address (loopback, link-local, metadata):
    only an address or network pattern lying wholly in a special range does ("explicitly")."""

    text: str

    @staticmethod
    def parse(text: str) -> DestinationPattern:
        """Raises ValueError with a message for the operator."""
        value = (text or "").strip().lower()
        if not value:
            raise ValueError("Empty pattern.")
        if value == "*":
            return DestinationPattern(value)
        if any(ch.isdigit() or ch == ":" for ch in value) and ("/" in value or _host_literal(value)):
            try:
                ipaddress.ip_network(value.strip("[]"), strict=False)
            except ValueError:
                raise ValueError(f"{text!r} is not an address or network (e.g. 10.0.0.0/8).")
            return DestinationPattern(str(ipaddress.ip_network(value.strip("[]"), strict=False)))
        host = value[2:] if value.startswith("*.") else value
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?", host):
            raise ValueError(
                f"{text!r} is not a host name, *.domain, *, address or network."
            )
        return DestinationPattern(value.rstrip("."))

    @property
    def network(self):
        if self.text == "*" or self.text.startswith("*.") or not any(c.isdigit() or c == ":" for c in self.text):
            return None
        try:
            return ipaddress.ip_network(self.text)
        except ValueError:
            return None

    def matches_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        if self.text == "*":
            return True
        if self.text.startswith("*."):
            return host.endswith(self.text[1:])
        return host == self.text

    def matches_address(self, ip) -> bool:
        if self.text == "*":
            return True  # any address; a special one is decided before (``is_special``)
        network = self.network
        return network is not None and network.version == ip.version and ip in network

    @property
    def is_special(self) -> bool:
        """An address or network wholly within a special range: an explicit allowance of it."""
        network = self.network
        return network is not None and any(
            network.version == net.version and network.subnet_of(net) for net in SPECIAL_NETWORKS
        )


@dataclass(frozen=True)
class DestinationPolicy:
    """Where outbound requests may go, for one caller (a server's team, an operator, a metadata fetch).

    - ``unrestricted``: anything (superusers; a server's destinations a superuser saved: ``trusted_origins``).
    - ``public_only``: globally routable addresses only (client ID metadata documents: anyone on the
      internet chooses those URLs).
    - otherwise ``patterns``: the team's allowed destinations (None: any host), where a special address
      (loopback, link-local, cloud metadata) needs a pattern naming it.

    ``trusted_origins`` are ``scheme://host:port`` values a superuser saved on the server; they pass as is.
    The ``OUTBOUND_ALLOW_SPECIAL_ADDRESSES`` setting (test and local settings only) lets special and private
    addresses through every policy.
    """

    patterns: tuple[DestinationPattern, ...] | None = None
    trusted_origins: frozenset[str] = frozenset()
    unrestricted: bool = False
    public_only: bool = False

    def refusal(self, url_or_host: str, address=None) -> str | None:
        """Why *host* (and, at connect time, its resolved *address*) is refused, or None when allowed."""
        parts = urlsplit(url_or_host) if "//" in url_or_host else None
        host = (parts.hostname if parts else url_or_host) or ""
        if self.unrestricted or (parts is not None and origin_of(url_or_host) in self.trusted_origins):
            return None
        literal = _host_literal(host)
        ip = _ip(address) if address is not None else literal
        if self.public_only:  # client metadata documents: CIMD_ALLOW_PRIVATE_ADDRESSES decides, not the below
            if ip is None or address_is_public(ip):
                return None
            return f"{host} resolves to a non-public address ({ip})"
        if proxy_settings.OUTBOUND_ALLOW_SPECIAL_ADDRESSES:
            return None
        if ip is None:  # a name, before resolution (saving a URL)
            if host.lower().rstrip(".") in _SPECIAL_HOST_NAMES or host.lower().endswith(".localhost"):
                if not any(p.is_special for p in self.patterns or ()):
                    return f"{host} is a loopback or metadata host name"
                return None
            if self.patterns is None:
                return None
            if any(p.matches_host(host) for p in self.patterns if p.network is None):
                return None
            if any(p.network is not None for p in self.patterns):
                return None  # a name may resolve into an allowed network: decided at connect time
            return f"{host} is not among the destinations allowed for this team"
        if address_is_special(ip):
            if any(p.is_special and p.matches_address(ip) for p in self.patterns or ()):
                return None
            return f"{host} is a loopback, link-local or cloud metadata address"
        if self.patterns is None:
            return None
        if any(p.matches_address(ip) for p in self.patterns):
            return None
        if literal is None and any(p.matches_host(host) for p in self.patterns if p.network is None):
            return None
        return f"{host} is not among the destinations allowed for this team"

    def check(self, url: str) -> None:
        """Raise DestinationRefused when *url*'s host is not allowed (before resolving it)."""
        if reason := self.refusal(url):
            raise DestinationRefused(f"destination not allowed: {reason}")


UNRESTRICTED = DestinationPolicy(unrestricted=True)
PUBLIC_ONLY = DestinationPolicy(public_only=True)


def origin_of(url: str) -> str:
    """``scheme://host:port`` of an absolute URL (the default port written out), '' when it has none."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme, 0)
    except ValueError:
        return ""
    if not parts.hostname:
        return ""
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme.lower()}://{host.lower()}:{port}"


@dataclass
class OutboundResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass
class _Call:
    """The one outbound call running in this context: its policy and its deadline."""

    policy: DestinationPolicy
    deadline: float  # time.monotonic()
    expired: bool = False
    finished: bool = False
    sockets: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, sock) -> None:
        with self.lock:
            if self.expired:
                _shutdown(sock)
            else:
                self.sockets.append(sock)

    def expire(self) -> None:
        with self.lock:
            if self.finished:
                return
            self.expired = True
            for sock in self.sockets:
                _shutdown(sock)

    def finish(self) -> None:
        with self.lock:
            self.finished = True
            self.sockets.clear()


def _shutdown(sock) -> None:
    try:  # the C-level shutdown, also for an SSLSocket (whose own would drop its TLS state under a reader)
        _socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Watchdog:
    """One daemon thread ending the calls whose deadline passed (a heap of deadlines)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Call]] = []
        self._condition = threading.Condition()
        self._counter = 0
        self._thread: threading.Thread | None = None

    def watch(self, call: _Call) -> None:
        with self._condition:
            self._counter += 1
            heapq.heappush(self._heap, (call.deadline, self._counter, call))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="outbound-deadlines", daemon=True)
                self._thread.start()
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._heap:
                    self._condition.wait()
                deadline, _n, call = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._condition.wait(wait)
                    continue
                heapq.heappop(self._heap)
            call.expire()


_watchdog = _Watchdog()
_current_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("outbound_call", default=None)


class _GuardedConnectionMixin:
    """Resolve, check every address against the current call's policy, connect to a checked address; put
    the socket under the call's deadline; check a reused connection's peer before each request."""

    def _new_conn(self):
        call = _current_call.get()
        policy = call.policy if call is not None else DestinationPolicy()
        host = self._dns_host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            if reason := policy.refusal(self._scheme_url(), address):
                raise _Refused(reason)
        error: OSError | None = None
        for address in addresses[:2]:
            try:
                sock = create_connection(
                    (address, self.port), self.timeout, source_address=self.source_address,
                    socket_options=self.socket_options,
                )
            except OSError as exc:
                error = exc
                continue
            if call is not None:
                call.attach(sock)
            return sock
        if isinstance(error, TimeoutError):
            raise ConnectTimeoutError(self, f"connection to {self.host} timed out")
        raise NewConnectionError(self, f"connection failed: {error}")

    def _scheme_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def request(self, *args, **kwargs):
        call = _current_call.get()
        if self.sock is not None and call is not None:  # a kept-alive connection: check its peer again
            try:
                peer = self.sock.getpeername()[0]
            except OSError:
                peer = None
            if peer is not None and (reason := call.policy.refusal(self._scheme_url(), peer)):
                self.close()
                raise _Refused(reason)
            call.attach(self.sock)
        return super().request(*args, **kwargs)


class _Refused(NewConnectionError):
    """The policy refused the destination (raised inside urllib3, turned into DestinationRefused)."""

    def __init__(self, reason: str):
        Exception.__init__(self, reason)
        self.reason = reason


class _GuardedHTTPConnection(_GuardedConnectionMixin, HTTPConnection):
    scheme = "http"


class _GuardedHTTPSConnection(_GuardedConnectionMixin, HTTPSConnection):
    scheme = "https"


class _GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPConnectionPool,
            "https": _GuardedHTTPSConnectionPool,
        }


_session: requests.Session | None = None
_session_lock = threading.Lock()


def outbound_session() -> requests.Session:
    """The one ``requests`` session for calls to the outside (connection pooling across requests). Tests
    mock HTTP with ``responses``, which intercepts it like any other session."""
    global _session
    if _session is None:
        with _session_lock:
            if _session is None:
                session = requests.Session()
                session.trust_env = False  # no HTTP(S)_PROXY or .netrc: the address check sees the real target
                adapter = _GuardedAdapter(pool_connections=32, pool_maxsize=64, max_retries=0)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                session.headers["User-Agent"] = "mcp-oauth-proxy"
                _session = session
    return _session


def outbound_fetch(
    method: str,
    url: str,
    *,
    policy: DestinationPolicy,
    timeout: float,
    max_bytes: int,
    connect_timeout: float | None = None,
    read_timeout: float | None = None,
    headers: Mapping[str, str] | None = None,
    data=None,
    decode_content: bool = True,
) -> OutboundResponse:
    """One request to the outside, its body read whole (at most *max_bytes*; 0 reads nothing), all of it
    within *timeout* seconds (a total deadline, enforced on the socket); *connect_timeout* and
    *read_timeout* bound connecting and each read within it. Raises ``DestinationRefused``,
    ``OutboundTimeout``, ``OutboundConnectionError``, ``ResponseTooLarge`` or ``OutboundError``."""
    policy.check(url)
    call = _Call(policy=policy, deadline=time.monotonic() + timeout)
    token = _current_call.set(call)
    _watchdog.watch(call)
    response = None
    try:
        response = outbound_session().request(
            method, url, headers=headers, data=data, allow_redirects=False, stream=True,
            timeout=(min(connect_timeout or timeout, timeout), min(read_timeout or timeout, timeout)),
        )
        body = b""
        if max_bytes > 0 and response.raw is not None:
            body = response.raw.read(max_bytes + 1, decode_content=decode_content)
        elif max_bytes > 0:
            body = response.content
        if len(body) > max_bytes:
            raise ResponseTooLarge(f"response larger than {max_bytes} bytes")
        if call.expired:
            raise OutboundTimeout("timed out")
        return OutboundResponse(status=response.status_code, headers=response.headers, body=body)
    except OutboundError:
        raise
    except requests.ConnectionError as exc:
        if call.expired:
            raise OutboundTimeout("timed out")
        refused = _refusal_in(exc)
        if refused is not None:
            raise DestinationRefused(f"destination not allowed: {refused}")
        if isinstance(exc, requests.ConnectTimeout):
            raise OutboundTimeout("timed out")
        raise OutboundConnectionError(f"cannot connect to {_netloc(url)}")
    except requests.Timeout:
        raise OutboundTimeout("timed out")
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        if call.expired:
            raise OutboundTimeout("timed out")
        raise OutboundError(f"request failed ({type(exc).__name__})")
    finally:
        call.finish()
        _current_call.reset(token)
        if response is not None:
            response.close()


def _refusal_in(exc: BaseException) -> str | None:
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, _Refused):
            return seen.reason
        reason = getattr(seen, "reason", None)
        if isinstance(reason, _Refused):
            return reason.reason
        seen = (seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None) or (
            reason if isinstance(reason, BaseException) else seen.__cause__ or seen.__context__
        )
    return None


def _netloc(url: str) -> str:
    try:
        return urlsplit(url).netloc
    except ValueError:
        return "?"
