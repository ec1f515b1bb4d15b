"""Upstream sessions: the upstream tokens behind a grant. Creating one after login, keeping its access
token fresh (exactly one upstream refresh per grant under concurrency, across processes and hosts),
and ending it.
"""

import json
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from oauthproxy.core.audit import audit_event, audit_logged, audit_record
from oauthproxy.core.exceptions import UpstreamError
from oauthproxy.core.settings import proxy_settings
from oauthproxy.db.sql import row_update
from oauthproxy.grants.access import UserClaims, access_decide, policy_needs_claims, user_claims_from
from oauthproxy.grants.quotas import QuotaExceeded, quota_consume
from oauthproxy.models import AuditEvent, Client, McpServer, UpstreamSession
from oauthproxy.upstream.client import TokenSet, UpstreamClient, expires_at_from

logger = logging.getLogger(__name__)


class UpstreamSessionEnded(Exception):
    """The upstream no longer honours this session (e.g. ``invalid_grant`` on refresh); the client must
    authorize again."""


@dataclass(frozen=True)
class Subject:
    value: str
    source: str  # id_token, userinfo or opaque
    claims: UserClaims | None = None  # what the policies and the identity assertion read (None: nothing known)

    @property
    def user(self) -> UserClaims:
        return self.claims or UserClaims(subject=self.value)


def subject_learn(*, server: McpServer, tokens: TokenSet, nonce: str | None = None) -> Subject:
    """Who logged in: the ID token's ``sub``, else userinfo's ``sub`` (or GitHub-style ``id``), else an
    opaque identifier for this grant alone; with the user's claims (email, groups, name: what the access
    policies and the identity assertion read), from the ID token and, when it lacks them, userinfo.
    ``nonce``: what the login sent (``upstream_nonce_expected``); the ID token must carry it."""
    client = UpstreamClient(server)
    if tokens.id_token:
        claims = client.id_token_claims(id_token=tokens.id_token, nonce=nonce)
        subject = str(claims["sub"])
        claims = _with_userinfo(server, client, claims, access_token=tokens.access_token, subject=subject)
        return Subject(subject, "id_token", user_claims_from(subject=subject, claims=claims,
                                                             groups_claim=server.groups_claim))
    if server.userinfo_endpoint:
        info = client.userinfo(access_token=tokens.access_token)
        for claim in ("sub", "id", "user_id", "login", "email"):
            if info.get(claim) not in (None, ""):
                subject = str(info[claim])
                return Subject(subject, "userinfo", user_claims_from(subject=subject, claims=info,
                                                                     groups_claim=server.groups_claim))
        raise UpstreamError("userinfo: no subject claim (sub, id, user_id, login, email)", oauth_error="server_error")
    value = "grant:" + secrets.token_hex(12)
    return Subject(value, "opaque", UserClaims(subject=value))


def _with_userinfo(server: McpServer, client: UpstreamClient, claims: dict, *, access_token: str, subject: str) -> dict:
    """ID token claims completed from userinfo when the server uses claims (access policies, identity
    assertion) and the ID token lacks the email or groups (or, for the identity assertion, the name):
    many upstreams put them only in userinfo. Userinfo of another subject is ignored (OIDC Core §5.3.2)."""
    if not server.userinfo_endpoint or not server_uses_claims(server):
        return claims
    known = user_claims_from(subject=subject, claims=claims, groups_claim=server.groups_claim)
    if known.email and known.groups and (known.name or not server.identity_assertion):
        return claims
    info = client.userinfo(access_token=access_token)
    if str(info.get("sub", "")) != subject:
        return claims
    return {**info, **{name: value for name, value in claims.items() if value not in (None, "", [])}}


def server_uses_claims(server: McpServer) -> bool:
    """Whether the user's claims matter for this server: its access or tool policies look at them, or its
    identity assertion carries them. Only then are they completed from userinfo and re-read at refresh."""
    return server.identity_assertion or policy_needs_claims(access=server.access, tool_policy=server.tool_policy)


def session_user(session: UpstreamSession) -> UserClaims:
    """The claims kept on a session, as the policies and the identity assertion read them."""
    try:
        stored = json.loads(session.claims) if session.claims else None
    except ValueError:
        stored = None
    return UserClaims.from_stored(subject=session.subject, stored=stored if isinstance(stored, dict) else None)


def upstream_session_create(
    *, server: McpServer, client: Client, tokens: TokenSet, subject: Subject
) -> UpstreamSession:
    session = UpstreamSession(
        server=server,
        client=client,
        subject=subject.value,
        subject_source=subject.source,
        scope=tokens.scope or " ".join(server.scopes or []),
        token_type=tokens.token_type,
        expires_at=expires_at_from(tokens.expires_in),
    )
    session.access_token = tokens.access_token
    session.refresh_token = tokens.refresh_token
    session.claims = json.dumps(subject.user.as_stored())
    session.save()
    return session


def upstream_token_due_at(session: UpstreamSession, *, margin: int | None = None) -> datetime | None:
    """THE "upstream refresh is due" rule, as the moment the session's upstream token becomes due
    (``None``: never, the upstream gave no expiry). Due ``margin`` seconds
    (``proxy_settings.UPSTREAM_REFRESH_MARGIN``) before it expires; a session whose refresh token is
    missing is due only when actually expired (refreshing early is impossible; ending it early would cut
    users off). The gateway caches this moment (``gateway.auth``); everyone else asks
    ``upstream_token_is_due``."""
    if session.expires_at is None:
        return None
    if not session.refresh_token:
        return session.expires_at
    if margin is None:
        margin = proxy_settings.UPSTREAM_REFRESH_MARGIN
    return session.expires_at - timedelta(seconds=margin)


def upstream_token_is_due(session: UpstreamSession, *, margin: int | None = None) -> bool:
    """Whether the session's upstream token is due for a refresh now (``upstream_token_due_at``)."""
    due_at = upstream_token_due_at(session, margin=margin)
    return due_at is not None and due_at <= timezone.now()


def upstream_session_ensure_fresh(
    *, session: UpstreamSession, rejected_access_token: str | None = None, locked: bool = False
) -> UpstreamSession:
    """Return the session with an upstream access token that is not due, refreshing it if needed.

    ``rejected_access_token``: the internal server answered 401 to this (supposedly fresh) token; refresh
    unless a concurrent request already replaced it.

    The refresh runs under ``SELECT ... FOR UPDATE`` of the session row: concurrent callers on any
    process or host wait for the first, re-read the row, and find it fresh, so the upstream sees one
    refresh per grant. Raises ``UpstreamSessionEnded`` when the upstream refuses the refresh token (or
    the token expired with nothing to refresh it), ``UpstreamError`` when the upstream is unreachable and
    the current token is already expired.

    ``locked``: the caller's transaction already holds this row's lock and read the row under it (the
    refresh grant does), so it is refreshed in place without a second lock; its ``server`` and ``client``
    should be set already (they are read otherwise).
    """
    if session.revoked_at is not None:
        raise UpstreamSessionEnded("session revoked")

    def needs_refresh(row: UpstreamSession) -> bool:
        if rejected_access_token is not None and row.refresh_token:
            return row.access_token == rejected_access_token
        return upstream_token_is_due(row)

    if not needs_refresh(session):
        return session
    if locked:
        failure = _refresh_locked(session, needs_refresh=needs_refresh, rejected=rejected_access_token is not None)
        if failure is not None:
            raise failure
        return session
    with transaction.atomic():
        # Lock the session row only (of=self): the server and client rows must stay free for the inserts
        # (audit events, tokens) that other requests make while this one waits for the upstream.
        locked = _locked_session(session.pk)
        failure = _refresh_locked(locked, needs_refresh=needs_refresh, rejected=rejected_access_token is not None)
    # Raised only after the block commits, so an ended session and its audit trail are kept.
    if failure is not None:
        raise failure
    return locked


def _locked_session(pk) -> UpstreamSession:
    return (
        UpstreamSession.objects.select_for_update(of=("self",)).select_related("server", "client").get(pk=pk)
    )


def _refresh_locked(locked: UpstreamSession, *, needs_refresh, rejected: bool) -> Exception | None:
    """Refresh a locked session in place. Returns the exception for the caller to raise, if any."""
    if locked.revoked_at is not None:
        return UpstreamSessionEnded("session revoked")
    if not needs_refresh(locked):
        return None  # another request refreshed it while we waited for the lock
    if not locked.refresh_token:
        _end(locked, reason="upstream access token expired and the upstream issued no refresh token")
        return UpstreamSessionEnded(locked.revoked_reason)
    try:
        # Counted only for refreshes that really go upstream (requests that waited for the lock and found
        # the token fresh returned above).
        quota_consume(client=locked.client, operation="refresh")
    except QuotaExceeded as exc:
        if not rejected and locked.expires_at and locked.expires_at > timezone.now():
            return None  # still valid for now: keep using it
        # Callers treat it like an unreachable upstream: retry later, the session stays.
        return UpstreamError(exc.description, oauth_error="temporarily_unavailable")
    try:
        tokens = UpstreamClient(locked.server).refresh(refresh_token=locked.refresh_token)
    except UpstreamError as exc:
        if exc.oauth_error == "invalid_grant":
            _end(locked, reason=f"upstream refused the refresh token: {exc.reason}")
            return UpstreamSessionEnded(locked.revoked_reason)
        audit_record(
            kind=AuditEvent.Kind.UPSTREAM_FAILURE, server=locked.server, client=locked.client,
            subject=locked.subject, message=exc.reason,
        )
        if not rejected and locked.expires_at and locked.expires_at > timezone.now():
            return None  # still valid for a little while: use it, retry the refresh next time
        return exc
    refused = _access_recheck(locked, tokens)
    if refused is not None:
        return refused
    locked.access_token = tokens.access_token
    if tokens.refresh_token:  # rotation; otherwise keep the one we have
        locked.refresh_token = tokens.refresh_token
    locked.expires_at = expires_at_from(tokens.expires_in)
    locked.token_type = tokens.token_type
    if tokens.scope:
        locked.scope = tokens.scope
    locked.refresh_count += 1
    locked.refreshed_at = timezone.now()
    event = audit_event(kind=AuditEvent.Kind.UPSTREAM_REFRESHED, server=locked.server, client=locked.client,
                        subject=locked.subject)
    row_update(locked, ("access_token", "refresh_token", "expires_at", "token_type", "scope", "refresh_count",
                        "refreshed_at", "claims"), inserting=(event,))
    audit_logged(event)
    return None


def _access_recheck(locked: UpstreamSession, tokens: TokenSet) -> Exception | None:
    """After an upstream refresh: re-read the user's claims (the refresh's ID token, else userinfo) and
    end the session when the server's access policy no longer admits the user. The claims kept on the
    session are updated (set on ``locked``, saved by the caller), so the policies and the identity
    assertion see them within ``GATEWAY_CACHE_SECONDS``. Claims that cannot be re-read (the upstream
    sends neither) keep their last known values."""
    server = locked.server
    if not server_uses_claims(server):
        return None
    user = session_user(locked)
    try:
        if tokens.id_token or (server.userinfo_endpoint and locked.subject_source != "opaque"):
            learned = subject_learn(server=server, tokens=tokens)
            if learned.value == locked.subject:
                user = learned.user
    except UpstreamError as exc:
        # The claims could not be read this time: keep the last known ones rather than end the session.
        logger.warning("upstream refresh: claims of server=%s not re-read: %s", server.slug, exc.reason)
    locked.claims = json.dumps(user.as_stored())
    decision = access_decide(access=server.access, user=user)
    if decision.allowed:
        return None
    upstream = UpstreamClient(server)
    _end(locked, reason=f"no longer admitted by the access policy: {decision.reason}")
    audit_record(kind=AuditEvent.Kind.ACCESS_DENIED, server=server, client=locked.client, subject=locked.subject,
                 message=f"session ended at upstream refresh: {decision.reason}", detail={"step": "refresh"})
    for token, hint in ((tokens.refresh_token, "refresh_token"), (tokens.access_token, "access_token")):
        if token:
            upstream.revoke(token=token, token_type_hint=hint)
    return UpstreamSessionEnded(locked.revoked_reason)


def _end(session: UpstreamSession, *, reason: str) -> None:
    """Mark the session ended and revoke every proxy token of it (the caller holds the row lock)."""
    session.revoked_at = timezone.now()
    session.revoked_reason = reason[:200]
    session.save(update_fields=["revoked_at", "revoked_reason"])
    _revoke_proxy_tokens(session)
    audit_record(kind=AuditEvent.Kind.SESSION_REVOKED, server=session.server, client=session.client,
                 subject=session.subject, message=reason)


def _revoke_proxy_tokens(session: UpstreamSession) -> None:
    now = timezone.now()
    session.refresh_tokens.filter(revoked__isnull=True).update(revoked=now, access_token=None)
    session.access_tokens.all().delete()


def upstream_session_revoke(*, session: UpstreamSession, reason: str, actor=None, upstream: bool = True) -> None:
    """End a session at the proxy and, where the upstream has a revocation endpoint, at the upstream
    (``upstream=False``: at the proxy only)."""
    with transaction.atomic():
        locked = _locked_session(session.pk)
        if locked.revoked_at is not None:
            return
        locked.revoked_at = timezone.now()
        locked.revoked_reason = reason[:200]
        locked.save(update_fields=["revoked_at", "revoked_reason"])
        _revoke_proxy_tokens(locked)
        refresh_token, access_token = locked.refresh_token, locked.access_token
    audit_record(kind=AuditEvent.Kind.SESSION_REVOKED, server=locked.server, client=locked.client, actor=actor,
                 subject=locked.subject, message=reason)
    if not upstream:
        return
    client = UpstreamClient(locked.server)
    if refresh_token:
        client.revoke(token=refresh_token, token_type_hint="refresh_token")
    if access_token:
        client.revoke(token=access_token, token_type_hint="access_token")
