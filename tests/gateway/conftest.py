"""Fixtures for the gateway tests: the proxy served by uvicorn in this process (so it sees the test's
database rows: tests use ``django_db(transaction=True)``), internal MCP servers, and grants."""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import httpx2
import pytest
from django.db.backends.utils import CursorWrapper
from django.utils import timezone
from mcp import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from oauth2_provider.models import set_token_value

from oauthproxy.gateway.forwarding import gateway_caches_clear
from oauthproxy.models import AccessToken, Client, McpServer, UpstreamSession
from tests.conftest import make_server
from tests.gateway.internal_server import InternalMcpServer, ServerThread


@pytest.fixture(scope="session")
def proxy():
    """The proxy's real ASGI application (``proxy_site.asgi``) behind uvicorn."""
    from proxy_site.asgi import application

    server = ServerThread(application, name="proxy")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _internal_session():
    server = InternalMcpServer()
    yield server
    server.stop()


@pytest.fixture
def internal(_internal_session):
    """The internal MCP server (SSE answers, sessions), its records reset for each test."""
    _internal_session.reset()
    return _internal_session


@pytest.fixture(scope="session")
def internal_json():
    """A stateless internal MCP server answering POSTs with plain JSON."""
    server = InternalMcpServer(json_response=True, stateless=True)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_gateway_caches():
    gateway_caches_clear()
    yield
    gateway_caches_clear()


@dataclass
class Grant:
    token: str  # the proxy access token the MCP client holds
    upstream_token: str  # what the internal server must receive
    server: McpServer
    client: Client
    session: UpstreamSession
    access_token: AccessToken

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def make_grant(
    server: McpServer,
    *,
    scope: str = "openid email",
    resource: list[str] | None = None,
    expires_in: int = 3600,
    upstream_expires_in: int | None = 3600,
    upstream_refresh_token: str = "upstream-refresh-1",
    subject: str = "alice",
    client: Client | None = None,
) -> Grant:
    """A client of `server`, an upstream session and a proxy access token, as the token endpoint makes them."""
    if client is None:
        client = Client.objects.create(
            server=server,
            name="Test MCP client",
            client_type=Client.CLIENT_PUBLIC,
            authorization_grant_type=Client.GRANT_AUTHORIZATION_CODE,
            redirect_uris="http://127.0.0.1:33418/callback",
        )
    upstream_token = "upstream-access-" + secrets.token_urlsafe(12)
    session = UpstreamSession(server=server, client=client, subject=subject, scope=scope)
    session.access_token = upstream_token
    session.refresh_token = upstream_refresh_token
    if upstream_expires_in is not None:
        session.expires_at = timezone.now() + timedelta(seconds=upstream_expires_in)
    session.save()
    raw = secrets.token_urlsafe(32)
    access_token = AccessToken(
        application=client,
        upstream_session=session,
        expires=timezone.now() + timedelta(seconds=expires_in),
        scope=scope,
        resource=[server.resource_url] if resource is None else resource,
    )
    set_token_value(access_token, raw)
    access_token.save()
    assert access_token.token_checksum == hashlib.sha256(raw.encode()).hexdigest()
    assert access_token.token == ""  # only the checksum is stored
    return Grant(raw, upstream_token, server, client, session, access_token)


@pytest.fixture
def gateway(transactional_db, proxy, internal):
    """A server `crm` whose gateway forwards to the internal server, and a grant for it."""
    server = make_server(slug="crm", mcp_url=internal.url)
    return make_grant(server)


@pytest.fixture
def gateway_url(proxy):
    return lambda slug="crm": f"{proxy.base_url}/mcp/{slug}"


class QueryCounter:
    """Counts SQL statements from every thread (the gateway queries in worker threads, if at all)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def hit(self) -> None:
        with self._lock:
            self.count += 1


@pytest.fixture
def count_queries(monkeypatch):
    counter = QueryCounter()
    original_execute, original_executemany = CursorWrapper.execute, CursorWrapper.executemany

    def execute(self, *args, **kwargs):
        counter.hit()
        return original_execute(self, *args, **kwargs)

    def executemany(self, *args, **kwargs):
        counter.hit()
        return original_executemany(self, *args, **kwargs)

    monkeypatch.setattr(CursorWrapper, "execute", execute)
    monkeypatch.setattr(CursorWrapper, "executemany", executemany)
    return counter


# -- talking MCP -------------------------------------------------------------------------------------

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
PROTOCOL_VERSION = "2025-06-18"


def rpc(method: str, params: dict | None = None, *, id: int | None = 1) -> dict:
    message = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    if id is not None:
        message["id"] = id
    return message


INITIALIZE = rpc(
    "initialize",
    {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": {"name": "gateway-test", "version": "0"}},
)


def messages(response) -> list[dict]:
    """The JSON-RPC messages of a response, whether JSON or SSE."""
    if response.headers.get("content-type", "").startswith("application/json"):
        return [response.json()]
    found = []
    for line in response.text.splitlines():
        if line.startswith("data:") and line[5:].strip():
            found.append(json.loads(line[5:]))
    return found


@asynccontextmanager
async def mcp_client(url: str, token: str, *, mode: str = "legacy", read_timeout: float = 30):
    """The official MCP SDK client, with the proxy token as its bearer token."""
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(10, read=read_timeout)
    )
    async with http, McpClient(streamable_http_client(url, http_client=http), mode=mode) as client:
        yield client
