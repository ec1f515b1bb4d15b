"""Revocation of what MCP clients hold: their sessions (grant families), one, by filter, or a server's.

Revocation cascades: ending a session revokes its proxy tokens and, where the upstream has a revocation
endpoint, its upstream tokens (``upstream_session_revoke``). Every action is audited with its actor.
"""

from django.db.models import QuerySet

from oauthproxy.grants.sessions import upstream_session_revoke
from oauthproxy.models import McpServer, UpstreamSession

SESSION_FILTERS = ("server", "client", "subject")


class SessionFilterError(ValueError):
    """The filters of a bulk revocation are unknown or empty (revoking everything needs a server)."""


def _sessions_from(queryset_or_filters: QuerySet[UpstreamSession] | dict) -> QuerySet[UpstreamSession]:
    if isinstance(queryset_or_filters, QuerySet):
        if queryset_or_filters.model is not UpstreamSession:
            raise SessionFilterError("expected a queryset of upstream sessions")
        return queryset_or_filters
    filters = {name: value for name, value in (queryset_or_filters or {}).items() if value not in (None, "")}
    unknown = sorted(set(filters) - set(SESSION_FILTERS))
    if unknown:
        raise SessionFilterError(f"unknown filter(s) {', '.join(unknown)}; use {', '.join(SESSION_FILTERS)}")
    if not filters:
        raise SessionFilterError(f"name at least one of {', '.join(SESSION_FILTERS)}")
    return UpstreamSession.objects.filter(**filters)


def sessions_revoke(
    *, queryset_or_filters: QuerySet[UpstreamSession] | dict, actor, reason: str
) -> int:
    """Revoke every active session matching a queryset or filters (``server``, ``client``, ``subject``;
    combine them, e.g. one user's sessions at one server). Returns how many sessions were revoked.

    Each session is revoked on its own (proxy tokens at once, upstream tokens best effort), so a failing
    upstream never leaves a session half revoked at the proxy.
    """
    sessions = _sessions_from(queryset_or_filters).filter(revoked_at__isnull=True)
    revoked = 0
    for session in sessions.select_related("server", "client").order_by("created"):
        upstream_session_revoke(session=session, reason=reason, actor=actor)
        revoked += 1
    return revoked


def server_sessions_revoke(*, server: McpServer, actor, reason: str = "") -> int:
    return sessions_revoke(
        queryset_or_filters={"server": server},
        actor=actor,
        reason=reason or f"all sessions of server {server.slug} revoked by an operator",
    )
