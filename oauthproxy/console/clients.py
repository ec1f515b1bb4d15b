"""Operator actions on registered MCP clients: rename, disable or enable, delete (its sessions revoked
first, ``grants.revocation.sessions_revoke``). Every action is audited with its actor; the admin and the
management API both call these.
"""

from oauthproxy.core.audit import audit_record
from oauthproxy.grants.revocation import sessions_revoke
from oauthproxy.models import AuditEvent, Client


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
