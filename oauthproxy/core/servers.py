"""Read-side queries, kept in one place so views and admin ask the same question the same way."""

from collections.abc import Callable
from typing import TypeVar

from django.db.models import QuerySet

from oauthproxy.core.caching import servers
from oauthproxy.models import McpServer

V = TypeVar("V")


def servers_visible_to(*, user) -> QuerySet[McpServer]:
    """Superusers see every server; other staff see their teams' servers only."""
    if user.is_superuser:
        return McpServer.objects.all()
    return McpServer.objects.filter(team__in=user.groups.all())


def _server_enabled_read(slug: str) -> McpServer | None:
    return next(iter(McpServer.objects.filter(slug=slug, enabled=True)[:1]), None)


def server_get_enabled(*, slug: str) -> McpServer | None:
    """The enabled server at this slug, from the per-process cache (``caching.servers``, a few seconds)."""
    return servers.get(slug, lambda: _server_enabled_read(slug))


def server_view_cached(*, slug: str, make: Callable[[McpServer | None], V]) -> V | object:
    """``make``'s view of the enabled server at this slug (``None``: unknown or disabled) from the same
    cache, or ``caching.MISS``; never queries (async callers)."""
    return servers.view(slug, make)


def server_view_load(*, slug: str, make: Callable[[McpServer | None], V]) -> V:
    """Read the enabled server at this slug into the cache and return ``make``'s view of it (a query:
    run it in a worker thread)."""
    return servers.view_load(slug, lambda: _server_enabled_read(slug), make)
