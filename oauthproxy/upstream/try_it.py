""""Try it": an admin runs a server's real upstream login in their own browser and sees what the upstream
answers (who logged in, which scopes, how long the token lives, whether a refresh token came), without an
MCP client and without leaving anything behind.

1. ``try_it_start`` stores a ``PendingAuthorization`` with the admin as ``tester`` (and no client),
   approved at once (the admin asked for it), with the same single-use state (stored as a checksum),
   upstream PKCE verifier and browser binding as a real flow (``upstream_redirect_prepare``). It answers
   the upstream authorization URL, whose redirect URI is the server's real callback, and the random key
   the view keeps in the test's own browser cookie.
2. ``try_it_complete`` runs at ``/oauth/<slug>/callback`` (the callback view hands the test's states over,
   ``authorization.callback_pending_read``): it claims the state once, for the browser and the admin that
   started the test, exchanges the code with the configured auth method, learns the subject as a real login
   would, then revokes the upstream tokens (best effort) and stores no session, grant or token. The outcome
   is one audit event (``admin.try_it``, actor = the admin) whose detail the admin result page shows. No
   token value is ever kept, logged, audited or shown.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from django.urls import reverse
from django.utils import timezone

from oauthproxy.authserver.authorization import browser_key_is_valid, upstream_signin_start
from oauthproxy.core.audit import audit_record
from oauthproxy.core.crypto import token_checksum
from oauthproxy.core.exceptions import AccessDenied, InvalidRequest, UpstreamError
from oauthproxy.grants.sessions import subject_learn
from oauthproxy.models import AuditEvent, McpServer, PendingAuthorization
from oauthproxy.upstream.client import TokenSet, UpstreamClient, upstream_nonce_expected

logger = logging.getLogger(__name__)

START_AGAIN = "Start the test again from the server's page in the admin."
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _text(value: str, *, limit: int) -> str:
    """Upstream-supplied text, shown and audited: bounded, without control characters."""
    return _CONTROL_RE.sub(" ", value)[:limit]


def _single(params: Mapping[str, Sequence[str]], name: str) -> str:
    values = params.get(name) or []
    return values[0] if len(values) == 1 else ""


class TryItUnavailable(Exception):
    """The test cannot start; ``reason`` says why, for the admin."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TryItStart:
    url: str  # the upstream authorization URL
    browser_key: str  # for the test's cookie; only its checksum is stored


@dataclass
class TryItResult:
    """What the result page shows (and the audit event keeps). Facts about the tokens, never a token."""

    ok: bool = False
    step: str = "authorization"  # where it ended: authorization, code exchange, subject, done
    reason: str = ""  # the proxy's account of a failure, with the upstream's reason
    upstream_error: str = ""
    upstream_error_description: str = ""
    auth_method: str = ""
    pkce: bool = True
    callback_url: str = ""
    requested_scopes: list[str] = field(default_factory=list)
    tokens_received: bool = False
    granted_scopes: list[str] | None = None  # None: the token response did not say
    token_type: str = ""
    expires_in: int | None = None
    refresh_token_issued: bool = False
    id_token_present: bool = False
    subject: str = ""
    subject_source: str = ""  # id_token, userinfo or opaque
    revocation: str = ""  # revoked, partly revoked, refused, no revocation endpoint

    def as_detail(self) -> dict:
        return {"try_it": True, **asdict(self)}


def try_it_start(*, server: McpServer, actor) -> TryItStart:
    """Begin an admin's test login at the upstream of ``server``. Raises ``TryItUnavailable``."""
    if not server.enabled:
        raise TryItUnavailable(
            "This server is disabled: its callback URL answers 404, so the upstream could not send you back. "
            "Enable it first."
        )
    if not getattr(actor, "is_authenticated", False):
        raise TryItUnavailable("Log in to the admin first.")
    url, browser_key = upstream_signin_start(server=server, tester=actor)
    logger.info("try it started server=%s by=%s", server.slug, actor.get_username())
    return TryItStart(url=url, browser_key=browser_key)


def _claim(*, server: McpServer, state: str, browser_key: str | None, user) -> PendingAuthorization | None:
    """The test of this state, consumed exactly once, for the browser and the admin that started it.
    ``None`` when it expired (identified, right browser and admin). Raises ``OAuthError`` (a page)."""
    state_checksum = token_checksum(state)
    now = timezone.now()
    tester_id = user.pk if getattr(user, "is_authenticated", False) and user.is_staff else None
    claimed = PendingAuthorization.objects.filter(
        state_checksum=state_checksum,
        server=server,
        tester__isnull=False,
        tester_id=tester_id,
        browser_key_checksum=token_checksum(browser_key) if browser_key_is_valid(browser_key) else "",
        approved_at__isnull=False,
        consumed_at__isnull=True,
        expires_at__gt=now,
    ).update(consumed_at=now)
    pending = (
        PendingAuthorization.objects.select_related("server")
        .filter(state_checksum=state_checksum, server=server, tester__isnull=False)
        .first()
    )
    if pending is None:
        raise InvalidRequest("This test sign-in link is not valid. " + START_AGAIN)
    if claimed == 1:
        return pending
    if pending.consumed_at is not None:
        raise InvalidRequest("This test sign-in was already completed. " + START_AGAIN)
    if tester_id is None or pending.tester_id != tester_id:
        raise AccessDenied(
            "This test sign-in was started by another admin, or you are no longer logged in to the admin. "
            + START_AGAIN
        )
    if not (browser_key_is_valid(browser_key)
            and hmac.compare_digest(token_checksum(browser_key), pending.browser_key_checksum)):
        raise AccessDenied("This test sign-in was started in a different browser. " + START_AGAIN)
    if not PendingAuthorization.objects.filter(pk=pending.pk, consumed_at__isnull=True).update(consumed_at=now):
        raise InvalidRequest("This test sign-in was already completed. " + START_AGAIN)
    return None


def try_it_complete(
    *, server: McpServer, state: str, params: Mapping[str, Sequence[str]], browser_key: str | None, user
) -> str:
    """The upstream sent the admin back: finish the test and answer the URL of its result page. Raises
    ``OAuthError`` (a page) when the request is not the admin's own open test."""
    pending = _claim(server=server, state=state, browser_key=browser_key, user=user)
    result = TryItResult(
        auth_method=server.upstream_auth_method,
        pkce=server.use_pkce,
        callback_url=server.callback_url,
        requested_scopes=list(server.scopes or []),
    )
    if pending is None:
        result.reason = "The sign-in at the upstream took longer than the state lifetime; the test expired."
        return _finish(server=server, user=user, result=result)

    upstream_error = _single(params, "error")
    if upstream_error:
        result.upstream_error = _text(upstream_error, limit=100)
        result.upstream_error_description = _text(_single(params, "error_description"), limit=500)
        result.reason = f"The upstream redirected back with error={result.upstream_error}" + (
            f": {result.upstream_error_description}" if result.upstream_error_description else "."
        )
        return _finish(server=server, user=user, result=result)

    upstream_iss = _single(params, "iss")
    if upstream_iss and server.issuer and upstream_iss.rstrip("/") != server.issuer.rstrip("/"):
        result.reason = (
            f"The upstream named itself {_text(upstream_iss, limit=200)!r} (iss), not the configured issuer "
            f"{server.issuer!r}: a real login would be refused."
        )
        return _finish(server=server, user=user, result=result)

    code = _single(params, "code")
    if not code or len(code) > 4096 or _CONTROL_RE.search(code):
        result.reason = "The upstream redirected back without a usable authorization code."
        return _finish(server=server, user=user, result=result)

    upstream = UpstreamClient(server)
    result.step = "code exchange"
    try:
        tokens = upstream.exchange_code(code=code, code_verifier=pending.upstream_code_verifier or None)
    except UpstreamError as exc:
        result.reason = exc.reason
        result.upstream_error = exc.upstream_error
        return _finish(server=server, user=user, result=result)
    _describe_tokens(result, tokens)
    result.step = "subject"
    try:
        subject = subject_learn(server=server, tokens=tokens, nonce=upstream_nonce_expected(server, state))
    except UpstreamError as exc:
        result.reason = f"Tokens were issued, but the subject could not be learnt: {exc.reason}"
    else:
        result.ok = True
        result.step = "done"
        result.subject, result.subject_source = subject.value, subject.source
    finally:
        result.revocation = _revoke(upstream, tokens)
    return _finish(server=server, user=user, result=result)


def _describe_tokens(result: TryItResult, tokens: TokenSet) -> None:
    result.tokens_received = True
    result.granted_scopes = tokens.scope.split() if tokens.scope else None
    result.token_type = tokens.token_type
    result.expires_in = tokens.expires_in
    result.refresh_token_issued = bool(tokens.refresh_token)
    result.id_token_present = bool(tokens.id_token)


def _revoke(upstream: UpstreamClient, tokens: TokenSet) -> str:
    """Best effort: the test keeps nothing, so its upstream tokens should not outlive it either."""
    if not upstream.server.revocation_endpoint:
        return "no revocation endpoint"
    done = [upstream.revoke(token=tokens.access_token, token_type_hint="access_token")]
    if tokens.refresh_token:
        done.append(upstream.revoke(token=tokens.refresh_token, token_type_hint="refresh_token"))
    if all(done):
        return "revoked"
    return "partly revoked" if any(done) else "refused"


def _finish(*, server: McpServer, user, result: TryItResult) -> str:
    if result.ok:
        message = f"try it: signed in as {result.subject} (subject from {result.subject_source})"
    else:
        message = f"try it failed at {result.step}: {result.reason}"
    event = audit_record(
        kind=AuditEvent.Kind.ADMIN_TRY_IT,
        server=server,
        actor=user,
        subject=result.subject,
        message=message,
        detail=result.as_detail(),
    )
    return reverse("admin:oauthproxy_mcpserver_try_it_result", args=[server.pk, event.pk])


def try_it_result_get(*, server: McpServer, event_id: int, user) -> TryItResult | None:
    """The outcome of one of ``user``'s own tests of ``server``, or ``None``."""
    event = AuditEvent.objects.filter(
        pk=event_id, server=server, kind=AuditEvent.Kind.ADMIN_TRY_IT, actor_id=user.pk
    ).first()
    if event is None:
        return None
    known = TryItResult.__dataclass_fields__
    return TryItResult(**{name: value for name, value in (event.detail or {}).items() if name in known})
