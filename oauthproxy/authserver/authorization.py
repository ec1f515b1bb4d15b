"""The authorization flow of DESIGN §4: authorize → consent → upstream login → callback → proxy code.

Three steps, each a service the (thin) views call:

1. ``authorization_request_validate`` checks an authorize request. Until the client and its exact redirect
   URI are known, failures raise ``OAuthError`` and are shown as a page (never redirected, §5.4); after
   that they raise ``ErrorRedirect`` carrying the client's ``state`` and our ``iss`` (RFC 9207).
   ``authorization_begin`` stores the validated request server-side (a ``PendingAuthorization`` without
   an upstream state yet), bound to the browser, and answers where the browser goes next: the consent
   page, or the upstream directly when this browser remembered consent for this client and redirect URI.
2. ``consent_request_get`` finds the request the consent page shows (same server, same browser, open);
   ``authorization_approve`` / ``authorization_deny`` answer it. Only approval creates the upstream
   ``state`` (random, single use, short-lived, stored as a checksum, §5.7) and the proxy's own upstream
   PKCE verifier.
3. ``authorization_complete`` handles the upstream callback: claims the state exactly once, exchanges the
   upstream code, learns the subject, stores the upstream session and a proxy authorization code (stored
   only as its SHA-256), and answers the client redirect URL.

Browser binding: the views keep a random key in an HttpOnly cookie; only its SHA-256 is stored.

An admin's "Try it" test of a server (``upstream.try_it``) shares the upstream half: the same state, PKCE
and browser binding (``upstream_redirect_prepare``), and the same callback URL, where
the callback view hands a test's state (``callback_pending_read``) to ``try_it_complete``.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import uuid
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from django.db import transaction
from django.urls import reverse
from django.utils import timezone
from oauth2_provider.settings import oauth2_settings

from oauthproxy.authserver.cimd import client_resolve
from oauthproxy.authserver.known_clients import client_known, client_row_admitted
from oauthproxy.authserver.redirect_uris import FORBIDDEN_SCHEMES, MAX_REDIRECT_URI_LENGTH, redirect_uri_matches
from oauthproxy.core import metrics
from oauthproxy.core.audit import audit_record
from oauthproxy.core.crypto import pkce_s256_challenge, token_checksum
from oauthproxy.core.exceptions import (
    AccessDenied,
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    OAuthError,
    UnauthorizedClient,
    UpstreamError,
)
from oauthproxy.core.ratelimit import rate_limit_check, rate_limit_count, rate_limit_hit
from oauthproxy.core.settings import proxy_settings
from oauthproxy.db.authorization import pending_approved, pending_consumed, pending_of_state, pending_unanswered
from oauthproxy.grants.access import access_decide
from oauthproxy.grants.quotas import QuotaExceeded, quota_consume
from oauthproxy.grants.sessions import Subject, subject_learn, upstream_session_create
from oauthproxy.models import AuditEvent, Client, Consent, Grant, McpServer, PendingAuthorization
from oauthproxy.upstream.client import TokenSet, UpstreamClient, upstream_nonce_expected

logger = logging.getLogger(__name__)

# RFC 7636 §4.2: BASE64URL(SHA256(verifier)) is 43 characters; allow the ABNF's full length range.
_CODE_CHALLENGE_RE = re.compile(r"^[A-Za-z0-9_-]{43,128}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_BROWSER_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
MAX_STATE_LENGTH = 2048
MAX_CLIENT_ID_LENGTH = 255
# Parameters that must not repeat (RFC 6749 §3.1) and that we read.
_SINGLE_PARAMS = (
    "response_type",
    "state",
    "code_challenge",
    "code_challenge_method",
    "scope",
    "response_mode",
)


# -- errors ----------------------------------------------------------------------------------------


class ErrorRedirect(Exception):
    """An OAuth error for a client whose redirect URI is trusted: sent there, with its state and ``iss``."""

    def __init__(self, error: OAuthError, *, redirect_uri: str, state: str, issuer: str):
        super().__init__(error.description)
        self.error = error
        self.redirect_uri = redirect_uri
        self.state = state
        self.issuer = issuer

    @property
    def url(self) -> str:
        return client_redirect_url(
            redirect_uri=self.redirect_uri,
            params={
                "error": self.error.error,
                "error_description": self.error.description or None,
                "state": self.state or None,
                "iss": self.issuer,
            },
        )


class AccessRefused(Exception):
    """The server's access policy refuses the user who just signed in upstream: show a page that says so
    (which server, which account, whom to ask), with a way back to the client carrying ``access_denied``."""

    def __init__(self, *, server: McpServer, client_name: str, account: str, client_url: str):
        super().__init__("access denied by the server's access policy")
        self.server = server
        self.client_name = client_name
        self.account = account
        self.client_url = client_url

    @property
    def team(self) -> str:
        return self.server.team.name if self.server.team_id else ""


def client_redirect_url(*, redirect_uri: str, params: Mapping[str, str | None]) -> str:
    """The redirect URI with response parameters added to its query (RFC 6749 §3.1.2: a query the
    registered URI already has is kept). ``None`` values are left out."""
    parts = urlsplit(redirect_uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [(name, value) for name, value in params.items() if value is not None]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))


# -- small helpers -----------------------------------------------------------------------------------


def browser_key_new() -> str:
    return secrets.token_urlsafe(32)


def browser_key_is_valid(value: str | None) -> bool:
    return bool(value) and _BROWSER_KEY_RE.fullmatch(value) is not None


def _browser_matches(pending: PendingAuthorization, browser_key: str | None) -> bool:
    if not browser_key_is_valid(browser_key):
        return False
    return hmac.compare_digest(token_checksum(browser_key), pending.browser_key_checksum)


def _pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, pkce_s256_challenge(verifier)


def _one(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    """The single value of a parameter, ``None`` when absent; repeated parameters are invalid."""
    values = params.get(name) or []
    if not values:
        return None
    if len(values) > 1:
        raise InvalidRequest(f"The {name} parameter must not be repeated.")
    return values[0]


def _text(value: str, *, limit: int) -> str:
    """Upstream-supplied text for the audit log: bounded, without control characters."""
    return _CONTROL_RE.sub(" ", value)[:limit]


def _redirect_uri_registered(client: Client, redirect_uri: str) -> bool:
    """Exactly registered (loopback port excepted), and never a script or browser-internal scheme whatever
    is stored (defence in depth, §5.4)."""
    try:
        scheme = urlsplit(redirect_uri).scheme.lower()
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False
    if scheme in FORBIDDEN_SCHEMES:
        return False
    return redirect_uri_matches(client.redirect_uris.split(), redirect_uri)


def _client_name(client: Client) -> str:
    return client.name or str((client.metadata or {}).get("client_name") or "") or client.client_id


# -- step 1: authorize -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthorizationRequest:
    """An authorize request that passed every check."""

    server: McpServer
    client: Client
    redirect_uri: str
    state: str
    code_challenge: str
    scopes: tuple[str, ...]
    resource: str


def authorization_client_verify(
    *, server: McpServer, params: Mapping[str, Sequence[str]], source: str = ""
) -> tuple[Client, str]:
    """The client and its redirect URI, both verified for this server. Raises ``OAuthError`` (shown as a
    page: nothing is trusted enough to redirect to yet).

    ``source``: the caller's address. Every request counts against ``authorize:source`` (address and
    client_id together); the client's own ``authorize:client`` limit is only checked here and counted by
    ``authorization_request_validate`` once the whole request proved valid, so a stranger's junk naming
    a victim's client_id cannot lock the victim out (issue 13, finding 3)."""
    client_id = _one(params, "client_id")
    if not client_id:
        raise InvalidRequest("The request has no client_id.")
    if len(client_id) > MAX_CLIENT_ID_LENGTH or _CONTROL_RE.search(client_id):
        raise InvalidClient("This application is not registered with this server.")
    # Before resolving: resolving a metadata-document client may fetch a URL.
    rate_limit_hit(name="authorize:source", key=f"{server.slug}:{source}:{client_id}")
    rate_limit_check(name="authorize:client", key=f"{server.slug}:{client_id}")
    client = client_resolve(server=server, client_id=client_id)
    if client is None or client.server_id != server.pk:
        raise InvalidClient(
            "This application is not registered with this server. Ask the application to register again."
        )
    if not client_row_admitted(server=server, client=client):
        raise InvalidClient("This server admits only the clients its administrator allows; ask them to add this one.")
    redirect_uri = _one(params, "redirect_uri")
    if not redirect_uri:
        raise InvalidRequest("The request has no redirect_uri.")
    if (
        len(redirect_uri) > MAX_REDIRECT_URI_LENGTH
        or _CONTROL_RE.search(redirect_uri)
        or not _redirect_uri_registered(client, redirect_uri)
    ):
        raise InvalidRequest("The redirect_uri is not registered for this application.")
    return client, redirect_uri


def authorization_request_validate(
    *, server: McpServer, params: Mapping[str, Sequence[str]], source: str = ""
) -> AuthorizationRequest:
    """Validate an authorization request (RFC 6749 §4.1.1, RFC 7636, RFC 8707, OAuth 2.1).

    Raises ``OAuthError`` while the redirect URI is not trusted (render it as a page), ``ErrorRedirect``
    afterwards.
    """
    client, redirect_uri = authorization_client_verify(server=server, params=params, source=source)

    raw_state = (params.get("state") or [""])[0]
    state = raw_state if len(raw_state) <= MAX_STATE_LENGTH and not _CONTROL_RE.search(raw_state) else ""

    def fail(error: OAuthError) -> ErrorRedirect:
        return ErrorRedirect(error, redirect_uri=redirect_uri, state=state, issuer=server.issuer_url)

    try:
        values = {name: _one(params, name) for name in _SINGLE_PARAMS}
    except InvalidRequest as exc:
        raise fail(exc)
    if state != raw_state:
        raise fail(InvalidRequest(f"The state must be at most {MAX_STATE_LENGTH} printable characters."))
    if params.get("request"):
        raise fail(OAuthError("Request objects are not supported.", error="request_not_supported"))
    if params.get("request_uri"):
        raise fail(OAuthError("Request URIs are not supported.", error="request_uri_not_supported"))

    response_type = values["response_type"]
    if not response_type:
        raise fail(InvalidRequest("The request has no response_type."))
    if response_type != "code":
        raise fail(OAuthError("Only response_type=code is supported.", error="unsupported_response_type"))
    if values["response_mode"] not in (None, "query"):
        raise fail(InvalidRequest("Only response_mode=query is supported."))
    if not client.is_usable(None):
        raise fail(UnauthorizedClient("This application has been disabled by the administrator."))

    # PKCE (OAuth 2.1, DESIGN §5.3): S256 only, required, no downgrade to plain.
    code_challenge = values["code_challenge"]
    if not code_challenge:
        raise fail(InvalidRequest("PKCE is required: send code_challenge with code_challenge_method=S256."))
    if values["code_challenge_method"] != "S256":
        raise fail(InvalidRequest("Only code_challenge_method=S256 is supported."))
    if not _CODE_CHALLENGE_RE.fullmatch(code_challenge):
        raise fail(InvalidRequest("The code_challenge must be 43 to 128 characters of base64url."))

    # RFC 8707: the only resource here is this server's canonical MCP URL.
    resources = list(dict.fromkeys(params.get("resource") or []))
    if any(resource != server.resource_url for resource in resources):
        raise fail(InvalidTarget(f"The only resource of this authorization server is {server.resource_url}."))

    try:
        scopes = scopes_grantable(server=server, requested=values["scope"])
    except InvalidScope as exc:
        raise fail(exc)

    rate_limit_count(name="authorize:client", key=f"{server.slug}:{client.client_id}")  # a valid request
    return AuthorizationRequest(
        server=server,
        client=client,
        redirect_uri=redirect_uri,
        state=state,
        code_challenge=code_challenge,
        scopes=scopes,
        resource=resources[0] if resources else "",
    )


def scopes_grantable(*, server: McpServer, requested: str | None) -> tuple[str, ...]:
    """The scopes an authorization request gets (RFC 6749 §3.3): the requested ones this server offers,
    in the order asked; all of the server's scopes when none was asked for or none of those asked for is
    offered. Scopes the server does not offer are dropped (hosted clients send their own, e.g. claude.ai's
    ``claudeai``), and the token's ``scope`` tells the client what it got; a server with ``strict_scopes``
    refuses them instead (``InvalidScope``)."""
    available = list(server.scopes or [])
    wanted = list(dict.fromkeys((requested or "").split()))
    unknown = [scope for scope in wanted if scope not in available]
    if unknown and server.strict_scopes:
        raise InvalidScope("Unknown scope requested; this server offers: " + " ".join(available))
    granted = tuple(scope for scope in wanted if scope in available)
    return granted or tuple(available)


def consent_is_remembered(*, client: Client, redirect_uri: str, scopes: Sequence[str], browser_key: str) -> bool:
    """This browser approved this client for this exact redirect URI (and at least these scopes) and
    the approval has not expired. Never per client alone (DESIGN §4)."""
    if not browser_key_is_valid(browser_key):
        return False
    consents = Consent.objects.filter(
        browser_key_checksum=token_checksum(browser_key),
        client=client,
        redirect_uri=redirect_uri,
        expires_at__gt=timezone.now(),
    )
    wanted = set(scopes)
    return any(wanted <= set(consent.scope.split()) for consent in consents)


def authorization_begin(*, auth_request: AuthorizationRequest, browser_key: str, browser_is_new: bool = False) -> str:
    """Store the validated request, bound to this browser, and answer the URL to send the browser to:
    the consent page, or the upstream when consent is remembered. ``browser_is_new``: the key was made for
    this request, so this browser has remembered nothing yet (no query to find out)."""
    now = timezone.now()
    pending = PendingAuthorization(
        server=auth_request.server,
        client=auth_request.client,
        browser_key_checksum=token_checksum(browser_key),
        redirect_uri=auth_request.redirect_uri,
        client_state=auth_request.state,
        code_challenge=auth_request.code_challenge,
        code_challenge_method="S256",
        scope=" ".join(auth_request.scopes),
        resource=auth_request.resource,
        expires_at=now + timedelta(seconds=proxy_settings.UPSTREAM_STATE_LIFETIME),
    )
    metrics.authorization_started(server=auth_request.server.slug)
    if not browser_is_new and consent_is_remembered(
        client=auth_request.client,
        redirect_uri=auth_request.redirect_uri,
        scopes=auth_request.scopes,
        browser_key=browser_key,
    ):
        url = _approve(pending, now=now)
        _audit_consent_given(pending, remember=False, remembered=True)
        return url
    pending.save()
    consent_url = reverse("oauth-consent", kwargs={"slug": auth_request.server.slug})
    return f"{consent_url}?{urlencode({'request': str(pending.pk)})}"


# -- step 2: consent -----------------------------------------------------------------------------------


def consent_request_get(*, server: McpServer, request_id: str | None, browser_key: str | None) -> PendingAuthorization:
    """The authorization request a consent page shows or answers: of this server, started in this
    browser, still open. Raises ``OAuthError`` (shown as a page)."""
    try:
        pk = uuid.UUID(request_id or "")
    except ValueError:
        raise InvalidRequest("This consent link is not valid. Start again from your application.")
    pending = pending_unanswered(pk=pk, server_pk=server.pk)
    if pending is None:
        raise InvalidRequest("This authorization request is unknown or was already answered.")
    pending.server = pending.client.server = server
    if not _browser_matches(pending, browser_key):
        raise AccessDenied(
            "This authorization was started in a different browser. Start again from your application "
            "in this browser."
        )
    if pending.consumed_at is not None:
        raise InvalidRequest("This authorization request was already answered.")
    if pending.expires_at <= timezone.now():
        raise InvalidRequest("This authorization request has expired. Start again from your application.")
    if not _redirect_uri_registered(pending.client, pending.redirect_uri):
        raise InvalidRequest("The application's redirect URI changed. Start again from your application.")
    return pending


@dataclass(frozen=True)
class ConsentDetails:
    """What the consent page shows; every value is client- or admin-supplied text, escaped on render."""

    server_name: str
    client_name: str
    client_id: str
    verified_domain: str | None
    registered_by_admin: bool
    redirect_host: str
    redirect_is_local: bool
    scopes: tuple[str, ...]
    upstream_host: str
    remember_days: int
    client_scopes: tuple[str, ...] = ()  # what the application asked the proxy for (its `scope` parameter)
    known_client: str = ""  # the catalog's name and the basis of the match (known_clients), or ""

    @property
    def scope_items(self) -> list[tuple[str, str]]:
        """Each upstream scope with a plain-language description where it is a well-known one."""
        return [(scope, _SCOPE_DESCRIPTIONS.get(scope, "")) for scope in self.scopes]

    @property
    def client_scope_items(self) -> list[tuple[str, str]]:
        """Each scope the application asked for, described like the upstream's."""
        return [(scope, _SCOPE_DESCRIPTIONS.get(scope, "")) for scope in self.client_scopes]


_SCOPE_DESCRIPTIONS = {
    "openid": "Confirm who you are",
    "profile": "Your name and basic profile",
    "email": "Your email address",
    "address": "Your postal address",
    "phone": "Your phone number",
    "offline_access": "Stay connected while you are away",
}


def consent_details(*, pending: PendingAuthorization) -> ConsentDetails:
    server, client = pending.server, pending.client
    parts = urlsplit(pending.redirect_uri)
    host = parts.hostname or ""
    is_local = host in ("localhost", "127.0.0.1", "::1")
    if parts.netloc:
        redirect_host = f"[{host}]" if ":" in host else host
        if parts.port and not is_local:
            redirect_host += f":{parts.port}"
    else:  # private-use scheme (RFC 8252 §7.1), e.g. com.example.app:/callback
        redirect_host = f"{parts.scheme}:"
    remember_seconds = proxy_settings.CONSENT_REMEMBER_SECONDS
    return ConsentDetails(
        server_name=server.name,
        client_name=_client_name(client),
        client_id=client.client_id,
        verified_domain=client.verified_domain,
        registered_by_admin=client.registration_source == Client.RegistrationSource.MANUAL,
        redirect_host=redirect_host,
        redirect_is_local=is_local,
        scopes=tuple(server.scopes or []),
        upstream_host=urlsplit(server.authorization_endpoint).hostname or "",
        remember_days=max(remember_seconds // 86400, 0) if remember_seconds > 0 else 0,
        client_scopes=tuple(dict.fromkeys((pending.scope or "").split())),
        known_client=known.label if (known := client_known(client)) else "",
    )


def authorization_approve(*, pending: PendingAuthorization, remember: bool) -> str:
    """The user approved: create the upstream state and PKCE verifier, optionally remember the consent
    for (this browser, client, redirect URI), and answer the upstream authorization URL.

    One conditional UPDATE approves the request: of concurrent answers (a double click, a replayed form)
    exactly one changes the row; the others are told it was already answered."""
    now = timezone.now()
    if not pending.client.is_usable(None):
        raise InvalidRequest("This application has been disabled by the administrator.")
    if pending.approved_at is not None or pending.consumed_at is not None or pending.expires_at <= now:
        raise InvalidRequest("This authorization request was already answered or has expired.")
    _quota_consume(pending)  # before the row changes: a refused trip leaves the request open, as it was
    state, code_challenge = _upstream_state_assign(pending, now=now)
    remember_seconds = proxy_settings.CONSENT_REMEMBER_SECONDS
    remember = remember and remember_seconds > 0
    with transaction.atomic() if remember else nullcontext():
        if not pending_approved(pending, now=now):
            raise InvalidRequest("This authorization request was already answered or has expired.")
        if remember:
            Consent.objects.filter(
                browser_key_checksum=pending.browser_key_checksum,
                client=pending.client,
                redirect_uri=pending.redirect_uri,
            ).delete()
            Consent.objects.create(
                browser_key_checksum=pending.browser_key_checksum,
                client=pending.client,
                redirect_uri=pending.redirect_uri,
                scope=pending.scope,
                expires_at=now + timedelta(seconds=remember_seconds),
            )
    _audit_consent_given(pending, remember=remember, remembered=False)
    return UpstreamClient(pending.server).authorization_url(state=state, code_challenge=code_challenge)


def _approve(pending: PendingAuthorization, *, now: datetime) -> str:
    """Give the request its upstream state and verifier, save it, and answer the upstream URL."""
    _quota_consume(pending)
    return upstream_redirect_prepare(pending, now=now)


def _quota_consume(pending: PendingAuthorization) -> None:
    """Each trip upstream spends the client's share of the shared upstream client's quota; a client over
    its budget is sent back with ``temporarily_unavailable`` instead of hammering the upstream."""
    server = pending.server
    try:
        quota_consume(client=pending.client, operation="authorize")
    except QuotaExceeded as exc:
        metrics.authorization_failed(server=server.slug, reason="quota")
        raise ErrorRedirect(exc, redirect_uri=pending.redirect_uri, state=pending.client_state,
                            issuer=server.issuer_url)


def upstream_signin_start(*, server: McpServer, **purpose) -> tuple[str, str]:
    """A sign-in at the upstream without an MCP client (Try it: ``tester=``; My connections:
    ``for_connections=True``): ``(upstream authorization URL, browser key)``; only the key's checksum is
    stored, the key goes into the starting browser's cookie."""
    now = timezone.now()
    browser_key = browser_key_new()
    pending = PendingAuthorization(
        server=server,
        browser_key_checksum=token_checksum(browser_key),
        redirect_uri="",
        scope=" ".join(server.scopes or []),
        expires_at=now,  # set with the state
        **purpose,
    )
    return upstream_redirect_prepare(pending, now=now), browser_key


def upstream_redirect_prepare(pending: PendingAuthorization, *, now: datetime) -> str:
    """Approve ``pending`` for the trip upstream: a random single-use state (stored as its checksum only,
    short-lived) and the proxy's own PKCE verifier; save it and answer the upstream authorization URL."""
    state, code_challenge = _upstream_state_assign(pending, now=now)
    pending.save()
    return UpstreamClient(pending.server).authorization_url(state=state, code_challenge=code_challenge)


def _upstream_state_assign(pending: PendingAuthorization, *, now: datetime) -> tuple[str, str | None]:
    """Set the approval on ``pending`` (not saved): the checksum of a new random state, the approval
    time, the short state lifetime and, with PKCE upstream, a new verifier. Answers the state and the
    code challenge, which only the upstream URL carries."""
    state = secrets.token_urlsafe(32)
    pending.state_checksum = token_checksum(state)
    pending.approved_at = now
    pending.expires_at = now + timedelta(seconds=proxy_settings.UPSTREAM_STATE_LIFETIME)
    code_challenge = None
    if pending.server.use_pkce:
        verifier, code_challenge = _pkce_pair()
        pending.upstream_code_verifier = verifier
    return state, code_challenge


def _audit_consent_given(pending: PendingAuthorization, *, remember: bool, remembered: bool) -> None:
    audit_record(
        kind=AuditEvent.Kind.CONSENT_GIVEN,
        server=pending.server,
        client=pending.client,
        message=("remembered consent" if remembered else "consent given") + f" for {pending.redirect_uri}",
        detail={
            "redirect_uri": pending.redirect_uri,
            "scope": pending.scope,
            "remember": remember,
            "remembered": remembered,
        },
    )


def authorization_deny(*, pending: PendingAuthorization) -> str:
    """The user refused: close the request and answer the client redirect with ``access_denied``."""
    closed = PendingAuthorization.objects.filter(
        pk=pending.pk, approved_at__isnull=True, consumed_at__isnull=True
    ).update(consumed_at=timezone.now())
    if not closed:
        raise InvalidRequest("This authorization request was already answered.")
    metrics.authorization_failed(server=pending.server.slug, reason="consent_denied")
    audit_record(
        kind=AuditEvent.Kind.CONSENT_DENIED,
        server=pending.server,
        client=pending.client,
        message=f"consent denied for {pending.redirect_uri}",
        detail={"redirect_uri": pending.redirect_uri, "scope": pending.scope},
    )
    return _pending_error_url(pending, AccessDenied("The user denied the request."))


# -- step 3: callback ------------------------------------------------------------------------------------


def _pending_error_url(pending: PendingAuthorization, error: OAuthError) -> str:
    return ErrorRedirect(
        error, redirect_uri=pending.redirect_uri, state=pending.client_state, issuer=pending.server.issuer_url
    ).url


def _pending_claim(
    *, server: McpServer, pending: PendingAuthorization | None, browser_key: str | None
) -> PendingAuthorization:
    """Consume ``pending`` (the client authorization of an upstream ``state``, as read) exactly once, even
    under concurrency (one atomic conditional UPDATE; the row count says who won). Raises ``OAuthError``
    (a page) or ``ErrorRedirect`` (expired, but identified and in the right browser)."""
    if pending is None:
        raise InvalidRequest("This sign-in link is not valid. Start again from your application.")
    now = timezone.now()
    browser_checksum = token_checksum(browser_key) if browser_key_is_valid(browser_key) else ""
    if pending_consumed(pending, browser_key_checksum=browser_checksum, now=now):
        pending.consumed_at = now
        return pending
    # Why not: a page, since nothing proves this browser may be sent to the client. (The row was read
    # before the UPDATE: a request that consumed it in between is caught by the conditional UPDATE below.)
    if pending.consumed_at is not None:
        raise InvalidRequest("This sign-in was already completed. Start again from your application.")
    if not _browser_matches(pending, browser_key):
        raise AccessDenied(
            "This sign-in was started in a different browser. Start again from your application in this browser."
        )
    # Identified, right browser, expired: the client can be told.
    expired = PendingAuthorization.objects.filter(pk=pending.pk, consumed_at__isnull=True).update(consumed_at=now)
    if not expired:
        raise InvalidRequest("This sign-in was already completed. Start again from your application.")
    if not _redirect_uri_registered(pending.client, pending.redirect_uri):
        raise InvalidRequest("The application's redirect URI changed. Start again from your application.")
    metrics.authorization_failed(server=server.slug, reason="expired")
    raise ErrorRedirect(
        AccessDenied("The sign-in took too long. Please try again."),
        redirect_uri=pending.redirect_uri,
        state=pending.client_state,
        issuer=server.issuer_url,
    )


def _upstream_failure(
    pending: PendingAuthorization, *, reason: str, step: str, upstream_error: str = "", description: str = ""
) -> None:
    detail = {"step": step}
    if upstream_error:
        detail["upstream_error"] = upstream_error
    if description:
        detail["upstream_error_description"] = description
    audit_record(
        kind=AuditEvent.Kind.UPSTREAM_FAILURE,
        server=pending.server,
        client=pending.client,
        message=reason,
        detail=detail,
    )


def callback_pending_read(
    *, server: McpServer, params: Mapping[str, Sequence[str]]
) -> tuple[str, PendingAuthorization | None]:
    """The ``state`` of the upstream's redirect back to ``/oauth/<slug>/callback`` and the pending flow it
    names (``None``: none). The callback view hands a flow whose ``tester_id`` is set (an admin's "Try it"
    test) to ``upstream.try_it.try_it_complete``, any other to ``authorization_complete``. Raises
    ``InvalidRequest`` for a missing or malformed state."""
    state = _one(params, "state")
    if not state:
        raise InvalidRequest("The sign-in response has no state. Start again from your application.")
    if len(state) > 512 or _CONTROL_RE.search(state):
        raise InvalidRequest("This sign-in link is not valid. Start again from your application.")
    return state, pending_of_state(state_checksum=token_checksum(state), server_pk=server.pk)


def authorization_complete(
    *,
    server: McpServer,
    pending: PendingAuthorization | None,
    params: Mapping[str, Sequence[str]],
    browser_key: str | None,
) -> str:
    """Finish the MCP client's flow ``pending`` (from ``callback_pending_read``) at the upstream's redirect
    back; answer the client redirect URL (with a proxy authorization code, or an OAuth error). Raises
    ``OAuthError`` when the request cannot be tied to a pending authorization of this browser (render it
    as a page)."""
    if pending is not None:
        pending.server = pending.client.server = server
    try:
        pending = _pending_claim(server=server, pending=pending, browser_key=browser_key)
    except ErrorRedirect as exc:
        return exc.url
    client = pending.client
    if not _redirect_uri_registered(client, pending.redirect_uri):
        raise InvalidRequest("The application's redirect URI changed. Start again from your application.")

    def error_url(error: str, description: str, *, reason: str) -> str:
        metrics.authorization_failed(server=server.slug, reason=reason)
        return _pending_error_url(pending, OAuthError(description, error=error))

    if not client.is_usable(None):
        return error_url("unauthorized_client", "This application has been disabled by the administrator.",
                         reason="client_disabled")

    upstream_error = (params.get("error") or [""])[0]
    if upstream_error:
        upstream_error = _text(upstream_error, limit=100)
        description = _text((params.get("error_description") or [""])[0], limit=300)
        _upstream_failure(
            pending,
            reason=f"upstream authorization failed: {upstream_error}" + (f" ({description})" if description else ""),
            step="authorization",
            upstream_error=upstream_error,
            description=description,
        )
        if upstream_error == "access_denied":
            return error_url("access_denied", "The sign-in was cancelled or refused at the identity provider.",
                             reason="upstream_denied")
        if upstream_error == "temporarily_unavailable":
            return error_url("temporarily_unavailable", "The identity provider is temporarily unavailable.",
                             reason="upstream_error")
        return error_url("server_error", "The identity provider reported an error.", reason="upstream_error")

    # RFC 9207 mix-up defence: an upstream that names itself must name the configured issuer.
    upstream_iss = (params.get("iss") or [""])[0]
    if upstream_iss and server.issuer and upstream_iss.rstrip("/") != server.issuer.rstrip("/"):
        _upstream_failure(
            pending,
            reason=f"upstream callback iss {_text(upstream_iss, limit=200)!r} is not the configured issuer",
            step="authorization",
        )
        return error_url("server_error", "The identity provider response could not be verified.",
                         reason="upstream_error")

    try:
        code = _one(params, "code")
    except InvalidRequest:
        code = None
    if not code or len(code) > 4096 or _CONTROL_RE.search(code):
        _upstream_failure(pending, reason="upstream callback without a usable code", step="authorization")
        return error_url("server_error", "The identity provider returned no authorization code.",
                         reason="upstream_error")

    upstream = UpstreamClient(server)
    tokens: TokenSet | None = None
    try:
        tokens = upstream.exchange_code(code=code, code_verifier=pending.upstream_code_verifier or None)
        nonce = upstream_nonce_expected(server, _one(params, "state") or "")  # what this login sent
        subject = subject_learn(server=server, tokens=tokens, nonce=nonce)
    except UpstreamError as exc:
        if tokens is not None:  # exchanged but unusable: do not leave live upstream tokens behind
            _upstream_tokens_discard(upstream, tokens)
        _upstream_failure(pending, reason=exc.reason, step="code exchange", upstream_error=exc.upstream_error)
        if exc.oauth_error == "temporarily_unavailable":
            return error_url("temporarily_unavailable", "The identity provider is temporarily unavailable.",
                             reason="code_exchange")
        return error_url("server_error", "The sign-in could not be completed at the identity provider.",
                         reason="code_exchange")

    decision = access_decide(access=server.access, user=subject.user)
    if not decision.allowed:
        _access_refused(pending, upstream=upstream, tokens=tokens, subject=subject, reason=decision.reason)

    raw_code = secrets.token_urlsafe(32)
    with transaction.atomic():
        session = upstream_session_create(server=server, client=client, tokens=tokens, subject=subject)
        Grant.objects.create(
            application=client,
            user=None,
            code=token_checksum(raw_code),
            expires=timezone.now() + timedelta(seconds=oauth2_settings.AUTHORIZATION_CODE_EXPIRE_SECONDS),
            redirect_uri=pending.redirect_uri,
            scope=pending.scope,
            code_challenge=pending.code_challenge,
            code_challenge_method="S256",
            resource=[server.resource_url],
            upstream_session=session,
        )
    metrics.authorization_completed(server=server.slug)
    logger.info(
        "authorization completed server=%s client=%s subject_source=%s", server.slug, client.client_id, subject.source
    )
    return client_redirect_url(
        redirect_uri=pending.redirect_uri,
        params={"code": raw_code, "state": pending.client_state or None, "iss": server.issuer_url},
    )


def _access_refused(
    pending: PendingAuthorization, *, upstream: UpstreamClient, tokens: TokenSet, subject: Subject, reason: str
) -> None:
    """Refuse a user the access policy does not admit: nothing stored but the audit event, the upstream
    tokens revoked where the upstream can; raises ``AccessRefused`` for the page."""
    server = pending.server
    _upstream_tokens_discard(upstream, tokens)
    metrics.authorization_failed(server=server.slug, reason="access_denied")
    user = subject.user
    audit_record(
        kind=AuditEvent.Kind.ACCESS_DENIED,
        server=server,
        client=pending.client,
        subject=subject.value,
        message=f"access denied at login: {reason}",
        detail={"step": "login", "email": user.email, "groups": list(user.groups)[:50]},
    )
    raise AccessRefused(
        server=server,
        client_name=_client_name(pending.client),
        account=user.email or subject.value,
        client_url=_pending_error_url(
            pending, AccessDenied(f"Your account may not use {server.name}. Ask its owners for access.")
        ),
    )


def _upstream_tokens_discard(upstream: UpstreamClient, tokens: TokenSet) -> None:
    """Best effort: revoke upstream tokens the proxy obtained but will not keep."""
    if tokens.refresh_token:
        upstream.revoke(token=tokens.refresh_token, token_type_hint="refresh_token")
    upstream.revoke(token=tokens.access_token, token_type_hint="access_token")
