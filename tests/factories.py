"""Test helpers that build clients, upstream sessions, codes and tokens directly in the database, without the
browser flow (for that, see ``tests.flows.helpers``). Usable by any area's tests:

    from tests.factories import issue_tokens, make_client

    client = make_client(server)
    tokens = issue_tokens(http, server, client)      # http: django.test.Client
    http.post("/mcp/crm", HTTP_AUTHORIZATION=f"Bearer {tokens['access_token']}")

Upstream tokens are plain strings here; nothing calls the upstream unless a test registers ``responses``.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
from datetime import timedelta
from urllib.parse import quote, urlencode

from django.db import connections
from django.utils import timezone

from oauthproxy.models import Client, Grant, IntrospectionCredential, McpServer, UpstreamSession
from tests.conftest import UPSTREAM

DEFAULT_REDIRECT_URI = "http://127.0.0.1:33418/callback"
# An RFC 7636 verifier (43-128 unreserved characters); its S256 challenge is computed by pkce_challenge().
DEFAULT_CODE_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"


def pkce_challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


def pkce_pair() -> tuple[str, str]:
    """A fresh (code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(48)
    return verifier, pkce_challenge(verifier)


def make_client(
    server: McpServer,
    *,
    public: bool = True,
    redirect_uris: list[str] | tuple[str, ...] = (DEFAULT_REDIRECT_URI,),
    auth_method: str | None = None,
    name: str = "Test MCP client",
    **overrides,
) -> Client:
    """A client of *server*, as dynamic registration creates it. Confidential clients (``public=False``)
    use ``client_secret_basic`` unless *auth_method* says ``client_secret_post``; their secret is available
    as ``client.plain_client_secret`` (the row keeps its hash)."""
    secret = "" if public else secrets.token_urlsafe(32)
    values = dict(
        server=server,
        name=name,
        redirect_uris=" ".join(redirect_uris),
        client_type=Client.CLIENT_PUBLIC if public else Client.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Client.GRANT_AUTHORIZATION_CODE,
        token_endpoint_auth_method="none" if public else (auth_method or "client_secret_basic"),
        registration_source=Client.RegistrationSource.DCR,
        client_secret=secret,
        hash_client_secret=not public,
        metadata={"client_name": name},
    )
    values.update(overrides)
    client = Client.objects.create(**values)
    client.plain_client_secret = secret
    return client


def make_upstream_session(
    server: McpServer,
    client: Client,
    *,
    access_token: str | None = None,
    refresh_token: str | None = None,
    expires_in: int | None = 3600,
    subject: str = "user-42",
    scope: str = "openid email offline_access",
) -> UpstreamSession:
    """An upstream login as the callback stores it. ``expires_in=None``: an upstream token without expiry
    (GitHub); ``refresh_token=""``: no upstream refresh token. Negative ``expires_in``: already expired."""
    session = UpstreamSession(
        server=server,
        client=client,
        subject=subject,
        subject_source="id_token",
        scope=scope,
        expires_at=None if expires_in is None else timezone.now() + timedelta(seconds=expires_in),
    )
    session.access_token = access_token if access_token is not None else "upstream-at-" + secrets.token_hex(8)
    session.refresh_token = refresh_token if refresh_token is not None else "upstream-rt-" + secrets.token_hex(8)
    session.save()
    return session


def make_code(
    session: UpstreamSession,
    client: Client | None = None,
    redirect_uri: str = DEFAULT_REDIRECT_URI,
    code_verifier: str = DEFAULT_CODE_VERIFIER,
    *,
    scope: str = "",
    expires_in: int = 60,
    code_challenge_method: str = "S256",
) -> str:
    """A proxy authorization code for *session* (stored as its SHA-256, as the callback stores it); returns
    the raw code the MCP client would receive."""
    client = client or session.client
    raw_code = secrets.token_urlsafe(32)
    challenge = pkce_challenge(code_verifier) if code_challenge_method == "S256" else code_verifier
    Grant.objects.create(
        application=client,
        user=None,
        code=hashlib.sha256(raw_code.encode()).hexdigest(),
        expires=timezone.now() + timedelta(seconds=expires_in),
        redirect_uri=redirect_uri,
        scope=scope,
        code_challenge=challenge,
        code_challenge_method=code_challenge_method,
        resource=[session.server.resource_url],
        upstream_session=session,
    )
    return raw_code


def basic_auth(client_id: str, secret: str) -> str:
    """An HTTP Basic header value, form-encoding id and secret first (RFC 6749 §2.3.1)."""
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(raw.encode()).decode()


def token_post(http, server: McpServer, data: dict, *, client: Client | None = None, endpoint: str = "token"):
    """POST a form to ``/oauth/<slug>/<endpoint>`` authenticated as *client* the way it registered: Basic
    or body secret for confidential clients, ``client_id`` alone for public ones."""
    data = dict(data)
    headers = {}
    if client is not None:
        method = client.token_endpoint_auth_method
        if method == "client_secret_basic":
            headers["HTTP_AUTHORIZATION"] = basic_auth(client.client_id, client.plain_client_secret)
        else:
            data.setdefault("client_id", client.client_id)
            if method == "client_secret_post":
                data.setdefault("client_secret", client.plain_client_secret)
    return form_post(http, f"/oauth/{server.slug}/{endpoint}", data, **headers)


def form_post(http, path: str, data: dict, **headers):
    """POST *data* form-encoded (list values repeat the parameter)."""
    pairs = [(k, v) for k, values in data.items() for v in (values if isinstance(values, list) else [values])]
    return http.post(path, data=urlencode(pairs), content_type="application/x-www-form-urlencoded", **headers)


def redeem_code(
    http,
    server: McpServer,
    client: Client,
    code: str,
    *,
    redirect_uri: str = DEFAULT_REDIRECT_URI,
    code_verifier: str = DEFAULT_CODE_VERIFIER,
    **extra,
):
    """The authorization_code token request; returns the response."""
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": code_verifier, **extra}
    return token_post(http, server, data, client=client)


def refresh(http, server: McpServer, client: Client, refresh_token: str, **extra):
    """The refresh_token token request; returns the response."""
    return token_post(http, server, {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra},
                      client=client)


def issue_tokens(
    http,
    server: McpServer,
    client: Client,
    *,
    session: UpstreamSession | None = None,
    redirect_uri: str | None = None,
    scope: str = "",
    **session_kwargs,
) -> dict:
    """Proxy tokens for *client* through the real token endpoint: an upstream session (made here unless
    given; *session_kwargs* go to ``make_upstream_session``) and a code, redeemed. Returns the token
    response, plus ``"session"`` (the UpstreamSession)."""
    session = session or make_upstream_session(server, client, **session_kwargs)
    redirect_uri = redirect_uri or client.redirect_uris.split()[0]
    code = make_code(session, client, redirect_uri, DEFAULT_CODE_VERIFIER, scope=scope)
    response = redeem_code(http, server, client, code, redirect_uri=redirect_uri)
    assert response.status_code == 200, response.content
    return {**response.json(), "session": session}


def make_introspection_credential(
    server: McpServer, name: str = "resource server"
) -> tuple[IntrospectionCredential, str]:
    """A resource server's credential for *server*: (credential, plain secret)."""
    credential = IntrospectionCredential(server=server, name=name)
    secret = credential.set_secret()
    credential.save()
    return credential, secret


def run_in_threads(count: int, work) -> list:
    """Run *work(i)* in *count* threads released together; each thread has its own DB connection."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def target(i):
        try:
            barrier.wait(timeout=10)
            results[i] = work(i)
        except Exception as exc:  # surfaced by the assertions on results
            results[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def oidc_metadata(issuer: str = UPSTREAM, **overrides) -> dict:
    """An upstream's RFC 8414 / OpenID metadata document; ``None`` overrides drop a field."""
    document = {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/auth",
        "token_endpoint": f"{issuer}/oauth/token",
        "revocation_endpoint": f"{issuer}/oauth/revoke",
        "userinfo_endpoint": f"{issuer}/userinfo",
        "jwks_uri": f"{issuer}/jwks",
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_post", "client_secret_basic"],
        "code_challenge_methods_supported": ["plain", "S256"],
        "scopes_supported": ["openid", "profile", "email", "offline_access", "groups", "api:read"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "response_types_supported": ["code"],
    }
    document.update(overrides)
    return {k: v for k, v in document.items() if v is not None}
