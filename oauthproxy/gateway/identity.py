"""The identity assertion the gateway adds to forwarded requests (``X-Identity-Assertion``, DESIGN §4).

A JWT signed with the server's current key (``core.identity``): ``iss`` the server's issuer, ``aud`` its
``mcp_url``, ``sub``, ``email``, ``name``, ``groups`` (the claims kept on the upstream session, the same
ones the access policies read: ``grants.access.UserClaims``), the MCP client's ``client_id``, ``iat``,
``exp`` (``IDENTITY_ASSERTION_LIFETIME``, at most 60 s) and ``jti``.

The hot path signs nothing and queries nothing: an assertion is kept per grant (upstream session) and
reused until ``IDENTITY_ASSERTION_RENEW_BEFORE`` seconds before it expires, and the signing key is kept
per process (``IDENTITY_KEY_CACHE_SECONDS``). The claims come with the validated token
(``TokenGrant.user``); they are re-read from the upstream at each upstream refresh, and a cached
assertion is not reused once the grant carries other claims.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jwt

from oauthproxy.core import metrics
from oauthproxy.core.caching import SingleFlight, TTLCache
from oauthproxy.core.identity import SigningKey, identity_signing_key
from oauthproxy.core.settings import proxy_settings
from oauthproxy.core.threads import run_in_db_thread
from oauthproxy.gateway.auth import TokenGrant
from oauthproxy.grants.access import UserClaims

if TYPE_CHECKING:
    from oauthproxy.gateway.servers import GatewayServer

HEADER = "x-identity-assertion"
MAX_LIFETIME = 60


@dataclass(frozen=True, slots=True)
class _Assertion:
    token: str
    kid: str


_assertions: TTLCache[_Assertion] = TTLCache(maxsize=10_000)
_keys: TTLCache[SigningKey] = TTLCache(maxsize=1000)
_key_loads = SingleFlight()


def identity_caches_clear() -> None:
    _assertions.clear()
    _keys.clear()


def _lifetime() -> int:
    return max(1, min(int(proxy_settings.IDENTITY_ASSERTION_LIFETIME), MAX_LIFETIME))


async def gateway_identity_headers(*, server: GatewayServer, grant: TokenGrant) -> list[tuple[str, str]]:
    """The identity header for this request: none unless the server has ``identity_assertion`` on."""
    if not server.identity_assertion:
        return []
    user = _user(grant)
    cache_key = (server.id, server.audience, grant.session_id, grant.client_id, user)
    cached = _assertions.get(cache_key)
    if cached is None:
        key = _keys.get(server.id)
        if key is None:
            key = await _key_loads.run(server.id, lambda: _key_load(server.id))
        cached = _Assertion(identity_assertion_sign(server=server, grant=grant, key=key), key.kid)
        lifetime = _lifetime()
        reuse = max(lifetime - int(proxy_settings.IDENTITY_ASSERTION_RENEW_BEFORE), 0)
        _assertions.set(cache_key, cached, ttl=reuse)
    return [(HEADER, cached.token)]


async def _key_load(server_id) -> SigningKey:
    key = await run_in_db_thread(identity_signing_key, server_id=server_id)
    _keys.set(server_id, key, ttl=float(proxy_settings.IDENTITY_KEY_CACHE_SECONDS))
    return key


def _user(grant: TokenGrant) -> UserClaims:
    return grant.user if grant.user is not None else UserClaims(subject=grant.subject)


def identity_assertion_sign(*, server: GatewayServer, grant: TokenGrant, key: SigningKey) -> str:
    now = int(time.time())
    user = _user(grant)
    payload = {
        "iss": server.issuer_url,
        "aud": server.audience,
        "sub": grant.subject,
        **({"email": user.email} if user.email else {}),
        **({"name": user.name} if user.name else {}),
        "groups": list(user.groups),
        "client_id": grant.client_id,
        "iat": now,
        "exp": now + _lifetime(),
        "jti": secrets.token_urlsafe(16),
    }
    token = jwt.encode(payload, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, "typ": "JWT"})
    metrics.identity_assertion_issued(server=server.slug)
    return token
