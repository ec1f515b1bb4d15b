"""The proxy's settings: one object with defaults, as django-oauth-toolkit's ``oauth2_settings``.

Every knob of the proxy is read as ``proxy_settings.NAME``. A deployment sets any of them in the Django
setting ``OAUTHPROXY`` (a dict; ``proxy_site/settings/oauth.py`` fills it from the environment); a name it
leaves out takes its default from ``DEFAULTS`` below. Values are read from Django's settings on every
access, so ``override_settings`` and pytest-django's ``settings`` fixture take effect at once. Per-server
values (endpoints, credentials, lifetimes) live in the database, never here.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Revocations reach the other processes through PostgreSQL LISTEN/NOTIFY (core/invalidation.py);
    # off: the per-process caches' lifetimes bound how late they take effect there.
    "INVALIDATION_LISTEN": True,
    # Proxy tokens (each server may override the lifetimes).
    "ACCESS_TOKEN_LIFETIME": 3600,
    "REFRESH_TOKEN_LIFETIME": 30 * 24 * 3600,
    # A client that retries a code it just redeemed gets a clean invalid_grant (its tokens stay valid);
    # any other replay of a code ends the session it created (RFC 6749 §4.1.2).
    "CODE_RETRY_SECONDS": 10,
    # The login: upstream state lifetime, how long an approval is remembered.
    "UPSTREAM_STATE_LIFETIME": 600,
    "CONSENT_REMEMBER_SECONDS": 30 * 24 * 3600,
    # Upstream tokens are refreshed this many seconds before they expire.
    "UPSTREAM_REFRESH_MARGIN": 60,
    # Outbound calls to the upstream identity provider.
    "UPSTREAM_CONNECT_TIMEOUT": 5,
    "UPSTREAM_READ_TIMEOUT": 15,
    "UPSTREAM_MAX_RESPONSE_BYTES": 1024 * 1024,
    # The whole of one upstream call (connect, send, read the response), enforced on the socket.
    "UPSTREAM_DEADLINE_SECONDS": 20,
    # Outbound destination policy (DESIGN §5.13): True lets loopback, link-local and private addresses
    # through every policy. For the test and local (`make run`) settings only; never in production.
    "OUTBOUND_ALLOW_SPECIAL_ADDRESSES": False,
    # Client ID Metadata Documents: loopback/private hosts only in tests.
    "CIMD_ALLOW_PRIVATE_ADDRESSES": False,
    # Registration: a cap per server, and how long an unused registration lives.
    "MAX_REGISTRATIONS_PER_SERVER": 10000,
    "UNUSED_REGISTRATION_TTL": 24 * 3600,
    # Private-use redirect URI schemes must look like reversed domains (com.example.app:/cb); these
    # single-word schemes of well-known MCP clients are accepted too (Cursor: cursor://anysphere...).
    "REDIRECT_URI_EXTRA_SCHEMES": ["cursor"],
    # Per-process caches of server and client rows; a change made elsewhere reaches a process within this.
    "SERVER_CACHE_SECONDS": 5,
    "CLIENT_CACHE_SECONDS": 5,
    # Threads per process running the /oauth/<slug>/... endpoints (proxy_site/asgi.py).
    "DIRECT_ENDPOINT_THREADS": 16,
    # Per-client budget of upstream-touching operations; each server may override; 0 is unlimited.
    "CLIENT_UPSTREAM_PER_MINUTE": 120,
    "CLIENT_UPSTREAM_PER_DAY": 20000,
    # Rate limits of the open endpoints: {name: (requests, window seconds)} overriding core.ratelimit's.
    "RATE_LIMITS": {},
    # The gateway (/mcp/<slug>) and its connections to internal servers.
    "GATEWAY_CACHE_SECONDS": 5.0,  # token and upstream-credential cache per process
    "GATEWAY_CONNECT_TIMEOUT": 5.0,  # seconds to open a connection to the internal server
    "GATEWAY_READ_TIMEOUT": 120.0,  # POST/DELETE: to the response headers, and between two body chunks
    "GATEWAY_WRITE_TIMEOUT": 30.0,  # seconds to send the request body
    "GATEWAY_POOL_TIMEOUT": 5.0,  # seconds to wait for a free connection
    "GATEWAY_STREAM_KEEPALIVE_SECONDS": 15.0,  # GET SSE: an SSE comment to the client after this much silence
    "GATEWAY_STREAM_IDLE_TIMEOUT": 600.0,  # GET SSE: close after this long without a byte from the server
    "GATEWAY_MAX_REQUEST_BYTES": 16 * 1024 * 1024,  # the largest request body the gateway forwards
    "GATEWAY_REQUIRED_SCOPES": None,  # optional dotted path of a function (server) -> scopes
    # Identity assertions (X-Identity-Assertion): lifetime (at most 60 s), how long before its expiry a
    # cached assertion is replaced, how long a process keeps a server's signing key, the default overlap
    # of `manage.py rotate_identity_key` (the retired key stays published that long).
    "IDENTITY_ASSERTION_LIFETIME": 60,
    "IDENTITY_ASSERTION_RENEW_BEFORE": 15,
    "IDENTITY_KEY_CACHE_SECONDS": 60,
    "IDENTITY_KEY_ROTATION_OVERLAP": 24 * 3600,
    # My connections: how long a sign-in there lasts in the browser.
    "CONNECTIONS_SIGNIN_SECONDS": 3600,
}


class ProxySettings:
    """Attribute access to ``settings.OAUTHPROXY`` with ``DEFAULTS``; unknown names are an error."""

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"no proxy setting {name!r}")
        configured = getattr(settings, "OAUTHPROXY", None) or {}
        return configured.get(name, DEFAULTS[name])


proxy_settings = ProxySettings()
