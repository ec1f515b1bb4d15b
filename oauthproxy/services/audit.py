"""Recording what happened for operators. Callers pass reasons, never tokens or secrets."""

import logging

from ..models import AuditEvent
from ..sql import row_insert

logger = logging.getLogger("oauthproxy.audit")


def audit_record(
    *,
    kind: str,
    server=None,
    client=None,
    actor=None,
    subject: str = "",
    message: str = "",
    detail: dict | None = None,
) -> AuditEvent:
    event = AuditEvent(
        kind=kind,
        server=server,
        client=client,
        actor=actor if getattr(actor, "is_authenticated", False) else None,
        subject=subject[:255],
        message=message[:2000],
        detail=detail or {},
    )
    row_insert(event)  # one precompiled INSERT: audit rows are written on every token request
    logger.info(
        "%s server=%s client=%s subject=%s %s",
        kind,
        getattr(server, "slug", "-"),
        getattr(client, "client_id", "-"),
        subject or "-",
        message,
    )
    return event
