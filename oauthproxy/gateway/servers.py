"""The servers as the gateway sees them: immutable snapshots of enabled servers, from the one server cache.

A snapshot holds what forwarding needs, parsed once per cached row: the internal server's URL and Host
header, the timeouts, the scopes a token must carry.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from uuid import UUID

import aiohttp
from django.utils.module_loading import import_string
from yarl import URL

from oauthproxy.core.caching import MISS, SingleFlight
from oauthproxy.core.destinations import team_destination_policy_cached, team_destination_policy_peek
from oauthproxy.core.http import UNRESTRICTED, DestinationPolicy, origin_of
from oauthproxy.core.servers import server_view_cached, server_view_load
from oauthproxy.core.settings import proxy_settings
from oauthproxy.core.threads import run_in_db_thread
from oauthproxy.grants.access import access_is_restricted
from oauthproxy.models import McpServer


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
    url: URL | None  # the parsed mcp_url (None: not configured, or not a usable URL)
    host_header: str
    timeout: aiohttp.ClientTimeout  # connect and read timeouts for POST and DELETE
    stream_timeout: aiohttp.ClientTimeout  # the same for GET (the SSE stream): no read timeout
    stream_open_timeout: float  # GET: seconds to the response headers
    write_timeout: float  # seconds to send the request body
    # The access and tool policies (gateway/policy.py); None / empty: none, nothing to check or parse.
    access: dict | None = None
    tool_policy: tuple = ()
    # Identity assertion (gateway.identity): signed for `audience` (the mcp_url) by `issuer_url`.
    identity_assertion: bool = False
    forward_upstream_token: bool = True
    issuer_url: str = ""
    audience: str = ""
    # The destination policy (DESIGN §5.13): the team whose rules apply, unless a superuser saved mcp_url.
    team_id: int | None = None
    mcp_url_trusted: bool = False


_UNKNOWN_SERVER = object()  # the view of an unknown or disabled slug: probing them costs no query either
_server_loads = SingleFlight()


async def gateway_server_get(*, slug: str) -> GatewayServer | None:
    """The enabled server with this slug (``None``: unknown or disabled), from THE server cache
    (``core.caching.servers``, ``proxy_settings.SERVER_CACHE_SECONDS``; a hit costs no query).

    Disabling a server stops its tokens within that time, or sooner: token validation re-reads the
    server with the token, every ``GATEWAY_CACHE_SECONDS``.
    """
    snapshot = server_view_cached(slug=slug, make=_snapshot_or_unknown)
    if snapshot is MISS:
        snapshot = await _server_loads.run(slug, lambda: run_in_db_thread(
            server_view_load, slug=slug, make=_snapshot_or_unknown, cache_load=True
        ))
    return None if snapshot is _UNKNOWN_SERVER else snapshot


def _snapshot_or_unknown(server: McpServer | None) -> GatewayServer | object:
    # A copy: the cached row is shared, and GATEWAY_REQUIRED_SCOPES hooks receive the instance.
    return _UNKNOWN_SERVER if server is None else gateway_server_snapshot(copy.copy(server))


def gateway_server_snapshot(server: McpServer) -> GatewayServer:
    """The gateway's view of a server. Timeouts are per server; today every server gets the
    deployment's values (the GATEWAY_* settings)."""
    connect = float(proxy_settings.GATEWAY_CONNECT_TIMEOUT)
    read = float(proxy_settings.GATEWAY_READ_TIMEOUT)
    write = float(proxy_settings.GATEWAY_WRITE_TIMEOUT)
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
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read),
        # The relay bounds an idle stream instead (GATEWAY_STREAM_IDLE_TIMEOUT).
        stream_timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=None),
        stream_open_timeout=read,
        write_timeout=write,
        access=dict(server.access) if access_is_restricted(server.access) else None,
        tool_policy=tuple(server.tool_policy or ()),
        identity_assertion=server.identity_assertion,
        forward_upstream_token=server.forward_upstream_token,
        issuer_url=server.issuer_url,
        audience=server.mcp_url,
        team_id=server.team_id,
        mcp_url_trusted=origin_of(server.mcp_url) in (server.trusted_origins or ()),
    )


_policy_loads = SingleFlight()


async def gateway_destination_policy(server: GatewayServer) -> DestinationPolicy:
    """Where *server*'s mcp_url may lead: anywhere when a superuser saved it, else its team's policy, read
    once per ``SERVER_CACHE_SECONDS`` per team (``core.destinations``; the pool checks it when a connection
    is opened)."""
    if server.mcp_url_trusted:
        return UNRESTRICTED
    policy = team_destination_policy_peek(team_id=server.team_id)
    if policy is None:
        policy = await _policy_loads.run(("destinations", server.team_id), lambda: run_in_db_thread(
            team_destination_policy_cached, team_id=server.team_id, cache_load=True
        ))
    return policy


def _parse_mcp_url(mcp_url: str) -> tuple[URL | None, str]:
    """The URL to send to and the Host header (IDNA, IPv6 brackets, the port unless the default).
    Credentials and a fragment in ``mcp_url`` are not sent."""
    if not mcp_url:
        return None, ""
    try:
        url = URL(mcp_url)
        if url.scheme not in ("http", "https") or not url.host:
            return None, ""
        return url.with_user(None).with_fragment(None), url.host_port_subcomponent
    except ValueError:  # e.g. a port out of range
        return None, ""


def gateway_required_scopes(server: McpServer) -> Iterable[str]:
    """Scopes a token must carry at this server's gateway, else ``403 insufficient_scope`` (MCP step-up).

    None by default. ``proxy_settings.GATEWAY_REQUIRED_SCOPES`` may name a function ``(server) ->
    iterable of scopes`` (a dotted path, like django-oauth-toolkit's swap points) for deployments that
    need step-up.
    """
    hook = proxy_settings.GATEWAY_REQUIRED_SCOPES
    if not hook:
        return ()
    return import_string(hook)(server) if isinstance(hook, str) else hook(server)


