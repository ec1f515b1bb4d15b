"""Read-side queries, kept in one place so views and admin ask the same question the same way."""

from django.db.models import QuerySet

from oauthproxy.core.caching import servers
from oauthproxy.models import McpServer


def servers_visible_to(*, user) -> QuerySet[McpServer]:
    """Superusers see every server; other staff see their teams' servers only."""
    if user.is_superuser:
        return McpServer.objects.all()
    return McpServer.objects.filter(team__in=user.groups.all())


def server_get_enabled(*, slug: str) -> McpServer | None:
    """The enabled server at this slug, from the per-process cache (``caching.servers``, a few seconds)."""
    return servers.get(slug, lambda: next(iter(McpServer.objects.filter(slug=slug, enabled=True)[:1]), None))
