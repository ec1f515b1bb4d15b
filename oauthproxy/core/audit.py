"""Recording what happened for operators. Callers pass reasons, never tokens or secrets."""

import logging

from oauthproxy.db.sql import row_insert
from oauthproxy.models import AuditEvent

logger = logging.getLogger("oauthproxy.audit")


def audit_record(**fields) -> AuditEvent:
    """Write and log an audit event (the fields of ``audit_event``)."""
    event = audit_event(**fields)
    row_insert(event)  # one precompiled INSERT: audit rows are written on every token request
    audit_logged(event)
    return event


def audit_event(
    *,
    kind: str,
    server=None,
    client=None,
    actor=None,
    subject: str = "",
    message: str = "",
    detail: dict | None = None,
) -> AuditEvent:
    """An audit event, not saved yet: for callers that write it in one statement with the row it is about
    (then ``audit_logged`` once it is written)."""
    return AuditEvent(
        kind=kind,
        server=server,
        client=client,
        actor=actor if getattr(actor, "is_authenticated", False) else None,
        subject=subject[:255],
        message=message[:2000],
        detail=detail or {},
    )


def audit_logged(event: AuditEvent) -> None:
    logger.info(
        "%s server=%s client=%s subject=%s %s",
        event.kind,
        getattr(event.server, "slug", "-"),
        getattr(event.client, "client_id", "-"),
        event.subject or "-",
        event.message,
    )
