"""My connections (``BASE/connections/``): a user sees the MCP clients they approved and disconnects one.

1. ``connections_signin_start``: the user signs in through a server's upstream, the same login an MCP
   client's authorization uses but without a client: a ``PendingAuthorization`` with ``for_connections``,
   approved at once (the user asked for it), with the same single-use state, upstream PKCE verifier and
   browser binding (``upstream_redirect_prepare``), ending at the server's real callback.
2. ``connections_signin_complete`` (handed over by ``authorization_complete``): claims the state once for
   the browser that started it, exchanges the code, learns the subject as a real login would, then
   revokes the upstream tokens (best effort) and keeps nothing but the answer: this browser is that
   subject at that server. The view keeps it in a signed, HttpOnly cookie for
   ``CONNECTIONS_SIGNIN_SECONDS``.
3. ``connections_list`` / ``connection_disconnect``: only the signed-in subject's own live sessions at
   that server. Disconnecting ends every session of that client for them (its proxy tokens revoked),
   forgets the client's remembered consent, and revokes the upstream tokens unless another client of
   theirs at that server still uses the upstream (a shared upstream client may revoke a user's grant as
   a whole).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from django.urls import reverse
from django.utils import timezone

from oauthproxy.authserver.authorization import browser_key_is_valid, upstream_signin_start
from oauthproxy.core.audit import audit_record
from oauthproxy.core.crypto import token_checksum as checksum
from oauthproxy.core.exceptions import AccessDenied, InvalidRequest, UpstreamError
from oauthproxy.grants.sessions import subject_learn, upstream_session_revoke
from oauthproxy.models import AuditEvent, Client, Consent, McpServer, PendingAuthorization, UpstreamSession
from oauthproxy.upstream.client import UpstreamClient, upstream_nonce_expected

logger = logging.getLogger(__name__)

START_AGAIN = "Start again from My connections."


@dataclass(frozen=True)
class ConnectionsStart:
    url: str  # the upstream authorization URL
    browser_key: str  # for the sign-in cookie; only its checksum is stored


@dataclass(frozen=True)
class ConnectionsSignedIn:
    """The callback's answer for a My connections sign-in: who signed in, and where to go."""

    server_id: str
    subject: str
    url: str


@dataclass(frozen=True)
class Connection:
    """One MCP client a user approved at one server (all of its live sessions for them)."""

    client_pk: str
    client_name: str
    client_id: str
    verified_domain: str | None
    redirect_hosts: tuple[str, ...]
    first_approved: datetime
    last_used: datetime | None
    scopes: tuple[str, ...]


def connections_signin_start(*, server: McpServer) -> ConnectionsStart:
    url, browser_key = upstream_signin_start(server=server, for_connections=True)
    return ConnectionsStart(url=url, browser_key=browser_key)


def _single(params: Mapping[str, Sequence[str]], name: str) -> str:
    values = params.get(name) or []
    return values[0] if len(values) == 1 else ""


def connections_signin_complete(
    *, server: McpServer, state: str, params: Mapping[str, Sequence[str]], browser_key: str | None
) -> ConnectionsSignedIn:
    """The upstream sent the user back: learn who they are, keep no token. Raises ``OAuthError`` (a page)."""
    now = timezone.now()
    state_checksum = checksum(state)
    browser_checksum = checksum(browser_key) if browser_key_is_valid(browser_key) else ""
    claimed = PendingAuthorization.objects.filter(
        state_checksum=state_checksum, server=server, for_connections=True, browser_key_checksum=browser_checksum,
        approved_at__isnull=False, consumed_at__isnull=True, expires_at__gt=now,
    ).update(consumed_at=now)
    if claimed != 1:
        pending = PendingAuthorization.objects.filter(
            state_checksum=state_checksum, server=server, for_connections=True
        ).first()
        if pending is None or pending.consumed_at is not None:
            raise InvalidRequest("This sign-in link is not valid or was already used. " + START_AGAIN)
        if not (browser_checksum and hmac.compare_digest(browser_checksum, pending.browser_key_checksum)):
            raise AccessDenied("This sign-in was started in a different browser. " + START_AGAIN)
        raise InvalidRequest("The sign-in took too long. " + START_AGAIN)
    pending = PendingAuthorization.objects.get(state_checksum=state_checksum, server=server)
    if _single(params, "error"):
        raise AccessDenied("The sign-in was cancelled or refused at the identity provider. " + START_AGAIN)
    upstream_iss = _single(params, "iss")
    if upstream_iss and server.issuer and upstream_iss.rstrip("/") != server.issuer.rstrip("/"):
        raise InvalidRequest("The identity provider response could not be verified. " + START_AGAIN)
    code = _single(params, "code")
    if not code or len(code) > 4096:
        raise InvalidRequest("The identity provider returned no authorization code. " + START_AGAIN)
    upstream = UpstreamClient(server)
    try:
        tokens = upstream.exchange_code(code=code, code_verifier=pending.upstream_code_verifier or None)
    except UpstreamError as exc:
        logger.warning("connections sign-in server=%s: code exchange failed: %s", server.slug, exc.reason)
        raise InvalidRequest("The sign-in could not be completed at the identity provider. " + START_AGAIN)
    try:
        subject = subject_learn(server=server, tokens=tokens, nonce=upstream_nonce_expected(server, state))
    except UpstreamError as exc:
        logger.warning("connections sign-in server=%s: no subject: %s", server.slug, exc.reason)
        raise InvalidRequest("The identity provider did not say who you are. " + START_AGAIN)
    finally:
        # Nothing is kept: this login only proves who the user is.
        if tokens.refresh_token:
            upstream.revoke(token=tokens.refresh_token, token_type_hint="refresh_token")
        upstream.revoke(token=tokens.access_token, token_type_hint="access_token")
    if subject.source == "opaque":
        raise InvalidRequest(
            "This server's identity provider does not say who you are (no ID token or userinfo), so its "
            "connections cannot be listed."
        )
    logger.info("connections sign-in server=%s subject_source=%s", server.slug, subject.source)
    return ConnectionsSignedIn(server_id=str(server.pk), subject=subject.value, url=reverse("connections"))


def _sessions(*, server: McpServer, subject: str):
    return UpstreamSession.objects.filter(server=server, subject=subject, revoked_at__isnull=True)


def connections_list(*, server: McpServer, subject: str) -> list[Connection]:
    """The MCP clients ``subject`` approved at ``server`` that still hold a live session, newest first."""
    by_client: dict = {}
    for session in _sessions(server=server, subject=subject).select_related("client").order_by("created"):
        by_client.setdefault(session.client_id, []).append(session)
    connections = []
    for sessions in by_client.values():
        client = sessions[0].client
        used = [s.last_used for s in sessions if s.last_used] + ([client.last_used] if client.last_used else [])
        scopes = sorted({scope for s in sessions for scope in s.scope.split()})
        connections.append(Connection(
            client_pk=str(client.pk),
            client_name=client.name or client.client_id,
            client_id=client.client_id,
            verified_domain=client.verified_domain,
            redirect_hosts=tuple(sorted({_host(uri) for uri in client.redirect_uris.split()})),
            first_approved=sessions[0].created,
            last_used=max(used) if used else None,
            scopes=tuple(scopes),
        ))
    return sorted(connections, key=lambda c: c.first_approved, reverse=True)


def _host(uri: str) -> str:
    parts = urlsplit(uri)
    return parts.hostname or f"{parts.scheme}:"


def connection_disconnect(*, server: McpServer, subject: str, client_pk: str) -> int:
    """End every live session of this client for ``subject`` at ``server``; answers how many ended.
    Raises ``InvalidRequest`` when the client is not one of theirs (another user's is indistinguishable
    from an unknown one)."""
    live = list(_sessions(server=server, subject=subject).select_related("client"))
    ending = [s for s in live if str(s.client_id) == str(client_pk)]
    if not ending:
        raise InvalidRequest("This connection is unknown or already disconnected.")
    client: Client = ending[0].client
    # Another client of theirs still relies on the upstream: leave the upstream tokens alone there.
    keep_upstream = any(str(s.client_id) != str(client_pk) for s in live)
    for session in ending:
        upstream_session_revoke(session=session, reason="disconnected by the user (My connections)",
                                upstream=not keep_upstream)
    Consent.objects.filter(client=client).delete()
    audit_record(
        kind=AuditEvent.Kind.USER_DISCONNECTED,
        server=server,
        client=client,
        subject=subject,
        message=f"the user disconnected {client.name or client.client_id}",
        detail={"sessions": len(ending), "upstream_revoked": not keep_upstream},
    )
    return len(ending)
