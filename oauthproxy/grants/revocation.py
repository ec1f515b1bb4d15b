"""Operator actions on what MCP clients hold: registered clients and their sessions (grant families).

Revocation cascades: ending a session revokes its proxy tokens and, where the upstream has a revocation
endpoint, its upstream tokens (``upstream_session_revoke``). Every action is audited with its actor.
"""

from django.db.models import QuerySet

from oauthproxy.core.audit import audit_record
from oauthproxy.grants.sessions import upstream_session_revoke
from oauthproxy.models import AuditEvent, Client, McpServer, UpstreamSession

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


def client_update(*, client: Client, actor, name: str | None = None, disabled: bool | None = None) -> list[str]:
    """Rename, disable or enable a client. Returns the fields that changed (audited as ``admin.change``).

    A disabled client can no longer authorize, redeem codes or refresh; its sessions stay until they are
    revoked (``sessions_revoke``) so re-enabling it restores service.
    """
    changes: dict[str, dict] = {}
    if name is not None and name != client.name:
        changes["name"] = {"from": client.name, "to": name}
        client.name = name
    if disabled is not None and disabled != client.disabled:
        changes["disabled"] = {"from": client.disabled, "to": disabled}
        client.disabled = disabled
    if not changes:
        return []
    client.save(update_fields=[*changes, "updated"])
    if list(changes) == ["disabled"]:
        message = "client disabled" if disabled else "client enabled"
    else:
        message = "changed " + ", ".join(changes)
    audit_record(
        kind=AuditEvent.Kind.ADMIN_CHANGE,
        server=client.server,
        client=client,
        actor=actor,
        message=message,
        detail={"object": "client", "client_id": client.client_id, "fields": list(changes), "changes": changes},
    )
    return list(changes)


def client_delete(*, client: Client, actor) -> int:
    """Delete a client after revoking its sessions (upstream too). Returns how many sessions were revoked.
    Its audit history stays, naming the deleted client in the event's detail."""
    revoked = sessions_revoke(
        queryset_or_filters={"client": client},
        actor=actor,
        reason=f"client {client.client_id} deleted by an operator",
    )
    audit_record(
        kind=AuditEvent.Kind.CLIENT_DELETED,
        server=client.server,
        client=client,
        actor=actor,
        message=f"client {client.name or client.client_id} deleted by an operator",
        detail={"client_id": client.client_id, "name": client.name, "sessions_revoked": revoked},
    )
    client.delete()
    return revoked
