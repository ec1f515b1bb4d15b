"""Reusable helpers for tests that need an MCP client, or a proxy authorization code.

The browser flow is driven through the real views (authorize → consent → upstream → callback) with a
Django test client; only the upstream identity provider is mocked, at the HTTP boundary (``responses``).

    from tests.flows.helpers import make_client, run_authorization, DEFAULT_CODE_VERIFIER

    client = make_client(server)
    code = run_authorization(Client(), server, client)        # the proxy code, as the MCP client gets it
    # redeem: code, code_verifier=DEFAULT_CODE_VERIFIER, redirect_uri=DEFAULT_REDIRECT_URI, client_id=...

``authorization_flow`` answers everything the flow produced (code, verifier, state, redirect URI, the
upstream request), for tests that need more than the code.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import jwt
import responses
from cryptography.hazmat.primitives.asymmetric import rsa
from django.test import Client as HttpClient
from jwt.algorithms import RSAAlgorithm

from oauthproxy.models import Client, McpServer
from tests import factories
from tests.factories import DEFAULT_CODE_VERIFIER, DEFAULT_REDIRECT_URI, pkce_challenge

DEFAULT_STATE = "client-state-5c1a"
# An RFC 7636 verifier (43-128 unreserved characters) and its S256 challenge.
UPSTREAM_CODE = "upstream-authorization-code-7f3e"


def pkce_pair(verifier: str | None = None) -> tuple[str, str]:
    """(code_verifier, S256 code_challenge); a fresh random verifier unless one is given."""
    verifier = verifier or secrets.token_urlsafe(48)
    return verifier, pkce_challenge(verifier)


def make_client(server: McpServer, *, name: str = "Test MCP Client", **kwargs) -> Client:
    """A client registered at ``server``, as DCR creates it (see ``tests.factories.make_client``)."""
    return factories.make_client(server, name=name, **kwargs)


def query_of(url: str) -> dict[str, str]:
    """The query parameters of a URL, single-valued."""
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


def authorize_params(
    client: Client,
    *,
    redirect_uri: str = DEFAULT_REDIRECT_URI,
    code_verifier: str = DEFAULT_CODE_VERIFIER,
    state: str | None = DEFAULT_STATE,
    scope: str | None = None,
    resource: str | None = None,
    **extra,
) -> dict[str, str]:
    """A valid authorization request for ``client``; ``extra`` adds or (with ``None``) removes parameters."""
    params = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": redirect_uri,
        "code_challenge": pkce_pair(code_verifier)[1],
        "code_challenge_method": "S256",
        "state": state,
        "scope": scope,
        "resource": resource,
    }
    params.update(extra)
    return {name: value for name, value in params.items() if value is not None}


def authorize(http: HttpClient, server: McpServer, client: Client, **kwargs):
    """GET the authorize endpoint with ``authorize_params(client, **kwargs)``."""
    return http.get(f"/oauth/{server.slug}/authorize", authorize_params(client, **kwargs))


def start_authorization(http: HttpClient, server: McpServer, client: Client, **kwargs) -> str:
    """Authorize and answer the consent page URL it redirects to."""
    response = authorize(http, server, client, **kwargs)
    assert response.status_code == 302, _explain(response)
    location = response["Location"]
    assert location.startswith(f"/oauth/{server.slug}/consent?"), location
    return location


def approve_consent(http: HttpClient, consent_url: str, *, remember: bool = False, decision: str = "approve"):
    """Show the consent page, then answer it; answer the POST response (302 upstream or to the client)."""
    page = http.get(consent_url)
    assert page.status_code == 200, _explain(page)
    data = {"request": query_of(consent_url)["request"], "decision": decision}
    if remember:
        data["remember"] = "yes"
    return http.post(consent_url, data)


def upstream_redirect(http: HttpClient, server: McpServer, client: Client, *, remember: bool = False, **kwargs) -> str:
    """Authorize and approve; answer the upstream authorization URL the browser is sent to."""
    response = approve_consent(http, start_authorization(http, server, client, **kwargs), remember=remember)
    assert response.status_code == 302, _explain(response)
    location = response["Location"]
    assert location.startswith(server.authorization_endpoint), location
    return location


def upstream_token_response(**overrides) -> dict:
    """A typical upstream token endpoint answer (no ID token: the subject is learnt otherwise)."""
    body = {
        "access_token": "upstream-access-" + secrets.token_urlsafe(16),
        "refresh_token": "upstream-refresh-" + secrets.token_urlsafe(16),
        "token_type": "Bearer",
        "expires_in": 3600,
        "scope": "openid email offline_access",
    }
    body.update(overrides)
    return {name: value for name, value in body.items() if value is not None}


def mock_upstream(
    mock: responses.RequestsMock,
    server: McpServer,
    *,
    tokens: dict | None = None,
    userinfo: dict | None = None,
) -> dict:
    """Register the upstream token endpoint (and userinfo, when the server has one) on ``mock``; answer
    the token response body it serves."""
    body = tokens if tokens is not None else upstream_token_response()
    mock.add(responses.POST, server.token_endpoint, json=body)
    if server.userinfo_endpoint:
        mock.add(responses.GET, server.userinfo_endpoint, json=userinfo or {"sub": "user-1234"})
    return body


def callback(http: HttpClient, server: McpServer, *, state: str, code: str = UPSTREAM_CODE, **extra):
    """The upstream redirecting the browser back to the proxy's callback."""
    params = {"state": state, "code": code, **extra}
    return http.get(f"/oauth/{server.slug}/callback", {k: v for k, v in params.items() if v is not None})


@dataclass
class AuthorizationResult:
    code: str
    code_verifier: str
    state: str | None
    redirect_uri: str
    location: str  # the full redirect to the client
    upstream_url: str  # where the proxy sent the browser upstream
    upstream_token_request: object = None  # the PreparedRequest of the code exchange (when mocked here)
    upstream_tokens: dict = field(default_factory=dict)


def authorization_flow(
    http: HttpClient,
    server: McpServer,
    client: Client,
    *,
    code_verifier: str = DEFAULT_CODE_VERIFIER,
    redirect_uri: str = DEFAULT_REDIRECT_URI,
    state: str | None = DEFAULT_STATE,
    scope: str | None = None,
    resource: str | None = None,
    remember: bool = False,
    upstream_tokens: dict | None = None,
    userinfo: dict | None = None,
    mock: bool = True,
) -> AuthorizationResult:
    """Run authorize → consent (approve) → upstream → callback and answer what the client received.

    With ``mock=True`` the upstream token endpoint (and userinfo) are mocked here with ``responses``;
    with ``mock=False`` the caller has registered them (e.g. an ID token signed with its own key)."""
    upstream_url = upstream_redirect(
        http,
        server,
        client,
        remember=remember,
        code_verifier=code_verifier,
        redirect_uri=redirect_uri,
        state=state,
        scope=scope,
        resource=resource,
    )
    upstream_state = query_of(upstream_url)["state"]
    token_request = None
    tokens: dict = {}
    if mock:
        with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
            tokens = mock_upstream(rsps, server, tokens=upstream_tokens, userinfo=userinfo)
            response = callback(http, server, state=upstream_state)
            token_request = next(
                (call.request for call in rsps.calls if call.request.url == server.token_endpoint), None
            )
    else:
        response = callback(http, server, state=upstream_state)
    assert response.status_code == 302, _explain(response)
    location = response["Location"]
    answer = query_of(location)
    assert "code" in answer, f"the client got no code: {location}"
    return AuthorizationResult(
        code=answer["code"],
        code_verifier=code_verifier,
        state=answer.get("state"),
        redirect_uri=redirect_uri,
        location=location,
        upstream_url=upstream_url,
        upstream_token_request=token_request,
        upstream_tokens=tokens,
    )


def run_authorization(http: HttpClient, server: McpServer, client: Client, **kwargs) -> str:
    """The proxy authorization code the client receives after a successful flow (see ``authorization_flow``
    for the keyword arguments). Redeem it with ``DEFAULT_CODE_VERIFIER`` unless you passed ``code_verifier``."""
    return authorization_flow(http, server, client, **kwargs).code


def form_body(request) -> dict[str, str]:
    """The form-encoded body of a captured upstream request."""
    body = request.body.decode() if isinstance(request.body, bytes) else request.body or ""
    return {name: values[0] for name, values in parse_qs(body, keep_blank_values=True).items()}


def json_body(request) -> dict:
    return json.loads(request.body)


def _explain(response) -> str:
    body = response.content.decode(errors="replace")[:1500] if hasattr(response, "content") else ""
    return f"HTTP {response.status_code} Location={response.get('Location')!r}\n{body}"


# -- an OpenID upstream: signing keys, ID tokens, discovery ---------------------------------------------


class SigningKey:
    """An RSA key pair for signing upstream ID tokens in tests, with its JWKS."""

    def __init__(self, kid: str | None = None):
        self.kid = kid or "test-key-" + secrets.token_hex(4)
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict:
        jwk = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}

    def jwks(self) -> dict:
        return {"keys": [self.jwk()]}

    def sign(self, claims: dict, **headers) -> str:
        return jwt.encode(claims, self.private_key, algorithm="RS256", headers={"kid": self.kid, **headers})


def id_token_claims(server: McpServer, **overrides) -> dict:
    """Claims of a valid ID token from ``server``'s upstream (``iss`` = its issuer, ``aud`` = its client)."""
    now = int(time.time())
    claims = {
        "iss": server.issuer,
        "sub": "user-" + secrets.token_hex(4),
        "aud": server.client_id,
        "iat": now,
        "exp": now + 300,
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def mock_oidc_discovery(mock: responses.RequestsMock, server: McpServer, key: SigningKey) -> str:
    """Serve the upstream's OpenID discovery document and JWKS on ``mock``; answer the jwks_uri.
    (``UpstreamClient`` caches both: clear the cache between tests.)"""
    issuer = server.issuer.rstrip("/")
    jwks_uri = f"{issuer}/jwks"
    mock.add(
        responses.GET,
        f"{issuer}/.well-known/openid-configuration",
        json={
            "issuer": server.issuer,
            "authorization_endpoint": server.authorization_endpoint,
            "token_endpoint": server.token_endpoint,
            "jwks_uri": jwks_uri,
        },
    )
    mock.add(responses.GET, jwks_uri, json=key.jwks())
    return jwks_uri
