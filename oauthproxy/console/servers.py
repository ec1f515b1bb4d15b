"""Create, update, import and export MCP server configurations."""

from dataclasses import dataclass, field

from django.db import transaction

from oauthproxy.console.changes import trusted_actor
from oauthproxy.console.documents import DOCUMENT_FIELDS, ServerDocumentSerializer
from oauthproxy.core.audit import audit_record
from oauthproxy.core.http import origin_of
from oauthproxy.grants.revocation import server_sessions_revoke
from oauthproxy.models import AuditEvent, McpServer

SECRET_FIELDS = frozenset({"client_secret"})


class ServerDocumentError(Exception):
    """One or more documents are invalid; ``errors`` lists (document index, field, message)."""

    def __init__(self, errors: list[tuple[int, str, str]]):
        self.errors = errors
        super().__init__(f"{len(errors)} error(s) in the server configuration")


@dataclass
class ImportReport:
    created: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)


def _flatten_errors(index: int, detail, prefix: str = "") -> list[tuple[int, str, str]]:
    if isinstance(detail, dict):
        out = []
        for key, value in detail.items():
            name = "" if key == "non_field_errors" else (f"{prefix}.{key}" if prefix else str(key))
            out.extend(_flatten_errors(index, value, name))
        return out
    if isinstance(detail, list) and detail and all(not isinstance(d, (dict, list)) for d in detail):
        return [(index, prefix, str(message)) for message in detail]
    if isinstance(detail, list):
        out = []
        for position, value in enumerate(detail):
            if value:
                out.extend(_flatten_errors(index, value, f"{prefix}[{position}]"))
        return out
    return [(index, prefix, str(detail))]


def server_document(*, server: McpServer) -> dict:
    """The configuration document of a server, without its secret."""
    return dict(ServerDocumentSerializer(server).data)


def servers_import(*, documents: list, actor=None) -> ImportReport:
    """Create or update servers by slug, all or nothing. Raises ServerDocumentError listing every problem."""
    if not isinstance(documents, list):
        raise ServerDocumentError([(-1, "", "The file must contain a list of server objects.")])
    errors: list[tuple[int, str, str]] = []
    seen: dict[str, int] = {}
    validated: list[tuple[McpServer | None, dict]] = []
    existing = {s.slug: s for s in McpServer.objects.filter(
        slug__in=[d.get("slug") for d in documents if isinstance(d, dict) and isinstance(d.get("slug"), str)]
    )}
    for index, document in enumerate(documents):
        if not isinstance(document, dict):
            errors.append((index, "", "Each entry must be an object (a mapping of field names to values)."))
            continue
        unknown = sorted(set(document) - set(DOCUMENT_FIELDS))
        for name in unknown:
            errors.append((index, name, f"Unknown field. Known fields: {', '.join(DOCUMENT_FIELDS)}."))
        slug = document.get("slug")
        if isinstance(slug, str):
            if slug in seen:
                errors.append((index, "slug", f"Duplicate slug {slug!r} (also entry {seen[slug] + 1})."))
            seen[slug] = index
        instance = existing.get(slug) if isinstance(slug, str) else None
        serializer = ServerDocumentSerializer(
            instance=instance, data=document, partial=instance is not None, context={"actor": actor}
        )
        if not serializer.is_valid():
            errors.extend(_flatten_errors(index, serializer.errors))
            continue
        validated.append((instance, serializer.validated_data))
    if errors:
        raise ServerDocumentError(errors)

    report = ImportReport()
    with transaction.atomic():
        for instance, data in validated:
            if instance is None:
                server = McpServer(**data)
                server.full_clean()
                server_save(server=server, actor=actor, message_prefix="import: ")
                report.created.append(server.slug)
                continue
            for name, value in data.items():
                setattr(instance, name, value)
            changed = server_save(server=instance, actor=actor, message_prefix="import: ")
            if changed:
                report.changed[instance.slug] = changed
            else:
                report.unchanged.append(instance.slug)
    return report


def _shown(name: str, value):
    if name == "team":
        return value.name if value is not None else None
    return value


def _trusted_origins(*, before: McpServer | None, server: McpServer, actor) -> list[str]:
    in_use = {origin_of(url) for url in server.destination_urls.values()} - {""}
    if trusted_actor(actor):
        return sorted(in_use)
    return sorted(set(before.trusted_origins if before is not None else ()) & in_use)


def server_save(*, server: McpServer, actor, message_prefix: str = "") -> list[str]:
    """Save a validated server and audit the change (``admin.change``): who, which fields, old and new
    values, never a secret's value. Returns the names of the fields that changed ([] when none did; every
    audited field when the server is new)."""
    with transaction.atomic():
        before = McpServer.objects.filter(pk=server.pk).select_related("team").first()
        server.trusted_origins = _trusted_origins(before=before, server=server, actor=actor)
        if before is None:
            server.save()
            audit_record(
                kind=AuditEvent.Kind.ADMIN_CHANGE,
                server=server,
                actor=actor,
                message=f"{message_prefix}server {server.slug} created",
                detail={"object": "server", "action": "created", "slug": server.slug},
            )
            return list(DOCUMENT_FIELDS)
        changes: dict[str, object] = {}
        for name in DOCUMENT_FIELDS:
            old, new = getattr(before, name), getattr(server, name)
            if old == new:
                continue
            if name in SECRET_FIELDS:
                changes[name] = "changed"
            else:
                changes[name] = {"from": _shown(name, old), "to": _shown(name, new)}
        if not changes:
            if server.trusted_origins != before.trusted_origins:
                McpServer.objects.filter(pk=server.pk).update(trusted_origins=server.trusted_origins)
            return []
        server.save()
        described = [f"{name} changed" if name in SECRET_FIELDS else name for name in changes]
        audit_record(
            kind=AuditEvent.Kind.ADMIN_CHANGE,
            server=server,
            actor=actor,
            message=f"{message_prefix}server {server.slug}: " + ", ".join(described),
            detail={"object": "server", "action": "changed", "slug": server.slug, "fields": list(changes),
                    "changes": changes},
        )
    return list(changes)


def destination_rule_audit(*, rule, actor, action: str) -> None:
    """Record a change of the outbound destination policy (a rule created, changed or deleted)."""
    team = rule.team.name if rule.team_id else None
    audit_record(
        kind=AuditEvent.Kind.ADMIN_CHANGE,
        actor=actor,
        message=f"destination rule {rule.pattern} for {team or 'every team'} {action}",
        detail={"object": "destination_rule", "action": action, "team": team, "pattern": rule.pattern},
    )


def server_delete(*, server: McpServer, actor) -> int:
    """Delete a server after revoking its sessions (upstream too); returns how many were revoked.
    The audit event stays (its server link becomes empty; the slug is in its detail)."""
    revoked = server_sessions_revoke(
        server=server, actor=actor, reason=f"server {server.slug} deleted by an operator"
    )
    audit_record(
        kind=AuditEvent.Kind.ADMIN_CHANGE,
        server=server,
        actor=actor,
        message=f"server {server.slug} deleted",
        detail={"object": "server", "action": "deleted", "slug": server.slug, "sessions_revoked": revoked},
    )
    server.delete()
    return revoked



def servers_export(*, queryset=None) -> list[dict]:
    servers = (queryset if queryset is not None else McpServer.objects.all()).select_related("team")
    return [server_document(server=server) for server in servers.order_by("slug")]
