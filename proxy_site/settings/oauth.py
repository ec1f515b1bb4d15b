"""OAuth settings: django-oauth-toolkit's swap points and the proxy's own knobs.

Per-server values (endpoints, credentials, lifetimes) live in the database, never here.
"""

from .env import env_bool, env_int, env_list

# The client model is swapped in oauthproxy's first migration: each client is bound to one MCP
# server. Tokens, codes and id tokens are swapped too so each can point at its upstream session.
OAUTH2_PROVIDER_APPLICATION_MODEL = "oauthproxy.Client"
OAUTH2_PROVIDER_ACCESS_TOKEN_MODEL = "oauthproxy.AccessToken"
OAUTH2_PROVIDER_REFRESH_TOKEN_MODEL = "oauthproxy.RefreshToken"
OAUTH2_PROVIDER_GRANT_MODEL = "oauthproxy.Grant"
OAUTH2_PROVIDER_ID_TOKEN_MODEL = "oauthproxy.IDToken"

OAUTH2_PROVIDER = {
    "PKCE_REQUIRED": True,
    "CLIENT_SECRET_HASHER": "pbkdf2_sha256_generated_secret",
    "COMPLIANT_BCP_RFC9700_PKCE_METHOD": True,
    "COMPLIANT_BCP_RFC9700_IMPLICIT_GRANT": True,
    "COMPLIANT_BCP_RFC9700_PASSWORD_GRANT": True,
    "COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS": True,
    # Tokens are stored only as SHA-256 checksums (DESIGN §5.1).
    "COMPLIANT_BCP_RFC9700_TOKEN_STORAGE": True,
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": env_int("REFRESH_TOKEN_GRACE_SECONDS", 30),
    "AUTHORIZATION_CODE_EXPIRE_SECONDS": 60,
    "ALLOWED_REDIRECT_URI_SCHEMES": ["https", "http"],
    "ALLOW_LOCALHOST_LOOPBACK": True,
    # Client ID metadata documents are fetched through the proxy's guarded outbound HTTP (core/http.py).
    "CIMD_METADATA_FETCHER": "oauthproxy.authserver.cimd.ProxyMetadataFetcher",
    "OAUTH2_VALIDATOR_CLASS": "oauthproxy.authserver.dot.validator.ProxyOAuth2Validator",
    "SCOPES_BACKEND_CLASS": "oauthproxy.authserver.dot.scopes.ServerScopes",
    "DEFAULT_SCOPES": [],
    "SCOPES": {},
}

# Proxy knobs read as oauthproxy.core.settings.proxy_settings.NAME (defaults and the full list there;
# lifetimes can be overridden per server).
OAUTHPROXY = {
    "ACCESS_TOKEN_LIFETIME": env_int("ACCESS_TOKEN_LIFETIME", 3600),
    # Revocations reach the other processes through PostgreSQL LISTEN/NOTIFY (oauthproxy/core/invalidation.py).
    "INVALIDATION_LISTEN": env_bool("INVALIDATION_LISTEN", True),
    "REFRESH_TOKEN_LIFETIME": env_int("REFRESH_TOKEN_LIFETIME", 30 * 24 * 3600),
    "UPSTREAM_STATE_LIFETIME": env_int("UPSTREAM_STATE_LIFETIME", 600),
    # A client that retries a code it just redeemed gets a clean invalid_grant (its tokens stay valid);
    # any other replay of a code ends the session it created (RFC 6749 §4.1.2).
    "CODE_RETRY_SECONDS": env_int("CODE_RETRY_SECONDS", 10),
    "CONSENT_REMEMBER_SECONDS": env_int("CONSENT_REMEMBER_SECONDS", 30 * 24 * 3600),
    # Upstream tokens are refreshed this many seconds before they expire.
    "UPSTREAM_REFRESH_MARGIN": env_int("UPSTREAM_REFRESH_MARGIN", 60),
    "UPSTREAM_CONNECT_TIMEOUT": 5,
    "UPSTREAM_READ_TIMEOUT": 15,
    "UPSTREAM_MAX_RESPONSE_BYTES": 1024 * 1024,
    # The whole of one upstream call (connect, send, read the response), enforced on the socket.
    "UPSTREAM_DEADLINE_SECONDS": env_int("UPSTREAM_DEADLINE_SECONDS", 20),
    # Loopback, link-local and cloud metadata destinations for everyone: tests and `make run` only.
    "OUTBOUND_ALLOW_SPECIAL_ADDRESSES": env_bool("OUTBOUND_ALLOW_SPECIAL_ADDRESSES", False),
    # Client ID Metadata Documents: loopback/private hosts only in tests.
    "CIMD_ALLOW_PRIVATE_ADDRESSES": env_bool("CIMD_ALLOW_PRIVATE_ADDRESSES", False),
    "MAX_REGISTRATIONS_PER_SERVER": env_int("MAX_REGISTRATIONS_PER_SERVER", 10000),
    "UNUSED_REGISTRATION_TTL": env_int("UNUSED_REGISTRATION_TTL", 24 * 3600),
    # Private-use redirect URI schemes must look like reversed domains (com.example.app:/cb); these
    # single-word schemes of well-known MCP clients are accepted too (Cursor: cursor://anysphere...).
    "REDIRECT_URI_EXTRA_SCHEMES": env_list("REDIRECT_URI_EXTRA_SCHEMES", ["cursor"]),
    # Each process keeps the server and client rows it reads on every OAuth request for this many seconds;
    # a change made through another process (or host) reaches this one within that time.
    "SERVER_CACHE_SECONDS": env_int("SERVER_CACHE_SECONDS", 5),
    "CLIENT_CACHE_SECONDS": env_int("CLIENT_CACHE_SECONDS", 5),
    # Threads per process running the token, revoke, register and introspect endpoints (proxy_site/asgi.py).
    "DIRECT_ENDPOINT_THREADS": env_int("DIRECT_ENDPOINT_THREADS", 16),
    # Per-client budget of upstream-touching operations (trips to the upstream login, upstream refreshes),
    # protecting the one shared upstream client's rate limits; each server may override; 0 is unlimited.
    "CLIENT_UPSTREAM_PER_MINUTE": env_int("CLIENT_UPSTREAM_PER_MINUTE", 120),
    "CLIENT_UPSTREAM_PER_DAY": env_int("CLIENT_UPSTREAM_PER_DAY", 20000),
}
