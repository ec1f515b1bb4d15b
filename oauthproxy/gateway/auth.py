"""Access-token validation for the gateway (``/mcp/<slug>``) without a database query per request.

Every proxy request needs three facts: which MCP server the slug names, whether the bearer token is a
live proxy token for that server, and which upstream access token to send on. All three are read from
the database once and then kept in per-process memory:

- validated tokens, keyed by the SHA-256 of the raw token (the same checksum the database stores), for
  a few seconds (``proxy_settings.GATEWAY_CACHE_SECONDS``, default 5) in a bounded LRU;
- the upstream credential of each upstream session (plaintext upstream access token and when it is
  due), refreshed through ``upstream_session_ensure_fresh`` only when due or refused by the internal
  server. It lives in this process only, never in Redis or any other shared cache.

Revocation is not pushed to the gateway: a revoked or deleted token, a disabled client or server, an
ended session stops working on every instance once the token's cache entry expires, so within
``GATEWAY_CACHE_SECONDS``. The expiry of the proxy token itself is checked on every request, so a token
never outlives its ``expires``. (Server configuration comes from the one server cache, see
``gateway.servers.gateway_server_get``.)

Database work runs in worker threads (``sync_to_async(thread_sensitive=False)``) so one slow query or
upstream refresh never serialises other requests, and concurrent cache misses for the same key share one
load (``SingleFlight``).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from uuid import UUID

from oauthproxy.core.caching import SingleFlight, TTLCache
from oauthproxy.core.crypto import token_checksum
from oauthproxy.core.exceptions import InvalidToken, OAuthError
from oauthproxy.core.settings import proxy_settings
from oauthproxy.core.threads import run_in_db_thread
from oauthproxy.gateway.servers import GatewayServer
from oauthproxy.grants.access import UserClaims
from oauthproxy.grants.sessions import (
    UpstreamSessionEnded,
    session_user,
    upstream_session_ensure_fresh,
    upstream_token_due_at,
)
from oauthproxy.models import AccessToken, UpstreamSession

TOKEN_CACHE_SIZE = 10_000
# When a due refresh fails but the upstream token is still valid, use it and retry the refresh after
# this many seconds, rather than on every request while the upstream is down.
REFRESH_RETRY_SECONDS = 5.0
MAX_TOKEN_LENGTH = 4096  # a longer "token" is refused before it is hashed
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 §2.1 b64token


# -- errors ------------------------------------------------------------------------------------------

class TokenMissing(OAuthError):
    """No bearer token at all: RFC 6750 §3.1 says the challenge then carries no error code."""

    error = "invalid_token"
    status = 401


class InsufficientScope(OAuthError):
    """The token is valid but lacks scopes this server requires (MCP step-up authorization)."""

    error = "insufficient_scope"
    status = 403

    def __init__(self, description: str, *, scope: str):
        super().__init__(description)
        self.scope = scope


def bearer_challenge(server: GatewayServer, exc: OAuthError) -> str:
    """The ``WWW-Authenticate`` value for a refused request (RFC 6750 §3, RFC 9728 §5.1)."""
    params = []
    if not isinstance(exc, TokenMissing):
        params.append(f'error="{exc.error}"')
        if exc.description:
            params.append(f'error_description="{_quoted(exc.description)}"')
    params.append(f'resource_metadata="{server.resource_metadata_url}"')
    scope = exc.scope if isinstance(exc, InsufficientScope) else " ".join(server.scopes)
    if scope:
        params.append(f'scope="{_quoted(scope)}"')
    return "Bearer " + ", ".join(params)


def _quoted(value: str) -> str:
    return value.replace("\\", "").replace('"', "'")


# -- per-process building blocks ---------------------------------------------------------------------

def cache_seconds() -> float:
    """How long a validated token is trusted without looking at the database again: the bound on how
    late a revocation takes effect at the gateway."""
    return float(proxy_settings.GATEWAY_CACHE_SECONDS)


# -- validated tokens --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What the gateway needs to know about a valid proxy access token."""

    server_id: UUID
    resources: tuple[str, ...]
    expires: float  # epoch seconds
    scopes: frozenset[str]
    client_id: str
    subject: str
    session_id: UUID
    # The user's claims (email, name, groups): the access and tool policies (gateway/policy.py) and the
    # identity assertion (gateway/identity.py) read them.
    user: UserClaims | None = None


@dataclass(frozen=True, slots=True)
class _Refused:
    """A token that will not become valid again (cached too, so repeated bad tokens cost no query)."""

    description: str


@dataclass(frozen=True, slots=True)
class UpstreamCredential:
    """The upstream access token of one upstream session and when it must be refreshed."""

    access_token: str
    refresh_at: float  # epoch seconds; math.inf when the upstream gave no expiry
    expires_at: float  # epoch seconds; math.inf when the upstream gave no expiry


_UNKNOWN = _Refused("The access token is unknown, revoked or expired.")
_SESSION_ENDED = _Refused("The session ended; authorize again.")

_tokens: TTLCache[TokenGrant | _Refused] = TTLCache(maxsize=TOKEN_CACHE_SIZE)
# Per upstream session; _SESSION_ENDED marks a session found ended, so its other tokens are refused at once.
_credentials: TTLCache[UpstreamCredential | _Refused] = TTLCache(maxsize=TOKEN_CACHE_SIZE)
_token_loads = SingleFlight()
_credential_loads = SingleFlight()


def gateway_auth_caches_clear() -> None:
    """Forget every validated token and upstream credential held by this process."""
    _tokens.clear()
    _credentials.clear()


def gateway_invalidation_handle(kind: str, key: str) -> None:
    """Forget what an invalidation names (``oauthproxy.core.invalidation``): an ended session's tokens are
    refused from the next request on; a disabled or deleted client or a changed server drops every
    validated token, so each is checked against the database again."""
    if kind == "session":
        try:
            _credentials.set(UUID(key), _SESSION_ENDED, ttl=max(cache_seconds(), 1.0))
        except ValueError:
            return
    elif kind in ("client", "server"):
        _tokens.clear()


def gateway_token_forget(raw_token: str) -> None:
    """Drop one token from this process's cache (other processes drop it within the cache TTL)."""
    _tokens.pop(token_checksum(raw_token))


async def gateway_token_authenticate(*, server: GatewayServer, authorization: str | None) -> TokenGrant:
    """Validate the request's ``Authorization`` header for this server.

    Raises ``TokenMissing`` (no bearer token), ``InvalidToken`` (malformed, unknown, expired, revoked,
    disabled client, ended session, another server's token) or ``InsufficientScope``.
    """
    scheme, _, raw_token = (authorization or "").partition(" ")
    raw_token = raw_token.strip()
    if scheme.lower() != "bearer" or not raw_token:
        raise TokenMissing("An access token is required.")
    if len(raw_token) > MAX_TOKEN_LENGTH or not _BEARER_TOKEN.fullmatch(raw_token):
        raise InvalidToken("The access token is malformed.")
    checksum = token_checksum(raw_token)

    record = _tokens.get(checksum)
    if record is None:
        record = await _token_loads.run(checksum, lambda: _token_load(checksum))
    if isinstance(record, _Refused):
        raise InvalidToken(record.description)
    if _credentials.get(record.session_id) is _SESSION_ENDED:  # ended here or announced by another process
        raise InvalidToken(_SESSION_ENDED.description)
    if record.expires <= time.time():
        raise InvalidToken("The access token expired.")
    # Audience (DESIGN §5.5): the token must name this server's resource and belong to its client.
    if record.server_id != server.id or server.resource_url not in record.resources:
        raise InvalidToken("The access token is not valid for this MCP server.")
    if server.required_scopes and not server.required_scopes <= record.scopes:
        missing = " ".join(sorted(server.required_scopes - record.scopes))
        wanted = list(dict.fromkeys([*server.scopes, *sorted(record.scopes), *sorted(server.required_scopes)]))
        raise InsufficientScope(f"This MCP server requires the scope(s): {missing}.", scope=" ".join(wanted))
    return record


async def _token_load(checksum: str) -> TokenGrant | _Refused:
    record, credential = await run_in_db_thread(_token_read, checksum, cache_load=True)
    _tokens.set(checksum, record, ttl=cache_seconds())
    if credential is not None:
        # This read may predate a refresh or a session end that this process already saw: never let
        # it replace a newer credential or the ended-session mark.
        known = _credentials.get(record.session_id)
        if known is None or (known is not _SESSION_ENDED and known.expires_at < credential.expires_at):
            _credentials.set(record.session_id, credential, ttl=math.inf)
    return record


def _token_read(checksum: str) -> tuple[TokenGrant | _Refused, UpstreamCredential | None]:
    token = (
        AccessToken.objects.select_related("application__server", "upstream_session")
        .filter(token_checksum=checksum)
        .first()
    )
    if token is None:
        return _UNKNOWN, None
    client, session = token.application, token.upstream_session
    if client is None or session is None:
        return _Refused("The access token was not issued for an MCP server."), None
    if client.disabled:
        return _Refused("The client is disabled."), None
    if not client.server.enabled:
        return _Refused("The MCP server is disabled."), None
    if session.revoked_at is not None:
        return _SESSION_ENDED, None
    resources = token.resource or []
    if isinstance(resources, str):
        resources = [resources]
    grant = TokenGrant(
        server_id=client.server_id,
        resources=tuple(str(r).rstrip("/") for r in resources),
        expires=token.expires.timestamp(),
        scopes=frozenset(token.scope.split()),
        client_id=client.client_id,
        subject=session.subject,
        session_id=session.pk,
        user=session_user(session),
    )
    # The session row is at hand: prime (or correct) this process's view of its upstream credential.
    return grant, _credential_of(session)


# -- upstream credentials ----------------------------------------------------------------------------

async def gateway_upstream_credential(
    *, grant: TokenGrant, rejected_access_token: str | None = None
) -> UpstreamCredential:
    """The upstream access token to send for this grant, refreshed first when it is due.

    ``rejected_access_token``: the internal server answered 401 to it; refresh unless another request
    already replaced it. Raises ``InvalidToken`` when the upstream session ended (the client must
    authorize again) and ``UpstreamError`` when the upstream is unreachable and no usable token is left.
    """
    credential = _credentials.get(grant.session_id)
    if credential is _SESSION_ENDED:
        raise InvalidToken(_SESSION_ENDED.description)
    if rejected_access_token is None and credential is not None and time.time() < credential.refresh_at:
        return credential  # the hot path: no thread, no query, no upstream call
    key = (grant.session_id, rejected_access_token)
    return await _credential_loads.run(key, lambda: _credential_refresh(grant, rejected_access_token))


async def _credential_refresh(grant: TokenGrant, rejected_access_token: str | None) -> UpstreamCredential:
    try:
        credential = await run_in_db_thread(_credential_read_fresh, grant.session_id, rejected_access_token)
    except UpstreamSessionEnded:
        # Every token of the session is refused from now on in this process; the tokens themselves
        # were deleted with the session, so other processes refuse them within the cache TTL.
        _credentials.set(grant.session_id, _SESSION_ENDED, ttl=cache_seconds())
        raise InvalidToken(_SESSION_ENDED.description)
    now = time.time()
    if credential.refresh_at <= now:  # refresh failed, token still usable (see upstream_session_ensure_fresh)
        credential = UpstreamCredential(
            access_token=credential.access_token,
            refresh_at=min(now + REFRESH_RETRY_SECONDS, credential.expires_at),
            expires_at=credential.expires_at,
        )
    _credentials.set(grant.session_id, credential, ttl=math.inf)
    return credential


def _credential_read_fresh(session_id: UUID, rejected_access_token: str | None) -> UpstreamCredential:
    session = UpstreamSession.objects.filter(pk=session_id).first()
    if session is None:
        raise UpstreamSessionEnded("session deleted")
    session = upstream_session_ensure_fresh(session=session, rejected_access_token=rejected_access_token)
    return _credential_of(session)


def _credential_of(session: UpstreamSession) -> UpstreamCredential:
    expires_at = session.expires_at.timestamp() if session.expires_at is not None else math.inf
    due_at = upstream_token_due_at(session)
    refresh_at = due_at.timestamp() if due_at is not None else math.inf
    return UpstreamCredential(access_token=session.access_token, refresh_at=refresh_at, expires_at=expires_at)
