"""The OAuth client side of the benchmarks, over plain HTTP: discovery, registration (RFC 7591), the browser leg
(the proxy's consent page and the IdP's login, driven by ``harness.authorize_in_browser``), code redemption
and refresh. Works against the proxy (``/oauth/<slug>/...``) and FastMCP (``/register``, ``/token``, ...)
alike: every endpoint comes from discovery, as an MCP client finds them.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx

from .stack import harness


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


@dataclass
class AuthServer:
    """An MCP server's authorization server, as discovered from its protected resource metadata."""

    resource: str
    registration_endpoint: str
    authorization_endpoint: str
    token_endpoint: str
    scope: str

    @property
    def origin(self) -> str:
        parts = urlsplit(self.authorization_endpoint)
        return f"{parts.scheme}://{parts.netloc}"


def discover(resource: str) -> AuthServer:
    parts = urlsplit(resource)
    origin = f"{parts.scheme}://{parts.netloc}"
    prm = httpx.get(f"{origin}/.well-known/oauth-protected-resource{parts.path}", timeout=30).raise_for_status().json()
    issuer = urlsplit(str(prm["authorization_servers"][0]).rstrip("/"))
    meta = (
        httpx.get(f"{issuer.scheme}://{issuer.netloc}/.well-known/oauth-authorization-server{issuer.path}", timeout=30)
        .raise_for_status()
        .json()
    )
    return AuthServer(
        resource=str(prm.get("resource") or resource),
        registration_endpoint=meta["registration_endpoint"],
        authorization_endpoint=meta["authorization_endpoint"],
        token_endpoint=meta["token_endpoint"],
        scope=" ".join(prm.get("scopes_supported") or meta.get("scopes_supported") or []),
    )


def registration_body(redirect_uri: str, name: str = "bench client") -> dict[str, Any]:
    """What the MCP Python SDK sends."""
    return {
        "client_name": name,
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }


@dataclass
class Grant:
    server: AuthServer
    client_id: str
    redirect_uri: str
    access_token: str
    refresh_token: str | None
    expires_in: int | None
    obtained: float = field(default_factory=time.time)


class OAuthError(Exception):
    pass


def _token_response(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise OAuthError(f"token endpoint answered {response.status_code}: {response.text[:300]}")
    return response.json()


class TimingTransport(httpx.HTTPTransport):
    """Records the wall time of every request by origin (the proxy vs the IdP), and by method and path, into
    ``spent``."""

    def __init__(self, spent: dict[str, float]) -> None:
        super().__init__()
        self.spent = spent
        self.lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        start = time.perf_counter()
        response = super().handle_request(request)
        response.read()
        elapsed = time.perf_counter() - start
        origin = f"{request.url.scheme}://{request.url.netloc.decode()}"
        with self.lock:
            self.spent[origin] += elapsed
            # per step too: "POST /oauth/bench/token" (IdP steps are all counted under its origin)
            self.spent[f"step {request.method} {request.url.path}"] += elapsed
        return response


@dataclass
class FlowTiming:
    wall: float
    by_origin: dict[str, float]


def full_flow(server: AuthServer, *, username: str = "alice", timing: dict[str, float] | None = None) -> Grant:
    """One MCP client's first connection: register, authorize (consent, IdP login, callback), redeem the code.
    ``timing`` (origin -> seconds) collects where the wall time went."""
    spent = timing if timing is not None else defaultdict(float)
    redirect_uri = f"http://127.0.0.1:{40000 + secrets.randbelow(20000)}/callback"
    with httpx.Client(transport=TimingTransport(spent), timeout=60) as browser:
        response = browser.post(server.registration_endpoint, json=registration_body(redirect_uri))
        if response.status_code != 201:
            raise OAuthError(f"registration answered {response.status_code}: {response.text[:300]}")
        client_id = response.json()["client_id"]
        verifier, challenge = pkce_pair()
        state = secrets.token_urlsafe(16)
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": server.resource,
        }
        if server.scope:
            params["scope"] = server.scope
        outcome = harness.authorize_in_browser(
            browser,
            f"{server.authorization_endpoint}?{urlencode(params)}",
            redirect_uri=redirect_uri,
            username=username,
        )
        if "code" not in outcome.params or outcome.params.get("state") != state:
            raise OAuthError(f"authorization failed: {outcome.params}")
        tokens = _token_response(
            browser.post(
                server.token_endpoint,
                data={
                    "grant_type": "authorization_code",
                    "code": outcome.params["code"],
                    "redirect_uri": redirect_uri,
                    "code_verifier": verifier,
                    "client_id": client_id,
                    "resource": server.resource,
                },
            )
        )
    return Grant(
        server, client_id, redirect_uri, tokens["access_token"], tokens.get("refresh_token"), tokens.get("expires_in")
    )


def refresh_form(grant: Grant) -> dict[str, str]:
    return {
        "grant_type": "refresh_token",
        "refresh_token": grant.refresh_token or "",
        "client_id": grant.client_id,
        "resource": grant.server.resource,
    }


def apply_refresh(grant: Grant, tokens: dict[str, Any]) -> None:
    grant.access_token = tokens["access_token"]
    grant.refresh_token = tokens.get("refresh_token") or grant.refresh_token
    grant.expires_in = tokens.get("expires_in")
    grant.obtained = time.time()


async def refresh_async(http: httpx.AsyncClient, grant: Grant) -> None:
    """One refresh grant, chaining the rotated refresh token into ``grant``."""
    response = await http.post(grant.server.token_endpoint, data=refresh_form(grant))
    apply_refresh(grant, _token_response(response))


# ------------------------------------------------------------------------------------------------
# the bench as a relying party of the IdP itself: the upstream's own refresh time


def _basic(client_id: str, secret: str) -> httpx.BasicAuth:
    # RFC 6749 §2.3.1: both form-urlencoded before Basic (oidc-provider decodes them)
    return httpx.BasicAuth(quote(client_id, safe=""), quote(secret, safe=""))


@dataclass
class UpstreamGrant:
    refresh_token: str


def upstream_grant(
    idp: harness.Upstream, client_id: str, redirect_uri: str, secret: str, username: str = "alice"
) -> UpstreamGrant:
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid offline_access",
        "state": "s",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "prompt": "consent",
    }
    with httpx.Client(timeout=30) as browser:
        location = harness.upstream_login(browser, f"{idp.authorization_endpoint}?{urlencode(params)}", username)
    code = harness.parse_redirect(location)["code"]
    response = httpx.post(
        idp.token_endpoint,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        },
        auth=_basic(client_id, secret),
        timeout=30,
    )
    return UpstreamGrant(_token_response(response)["refresh_token"])


async def upstream_refresh_async(
    http: httpx.AsyncClient, idp: harness.Upstream, client_id: str, secret: str, grant: UpstreamGrant
) -> None:
    response = await http.post(
        idp.token_endpoint,
        data={"grant_type": "refresh_token", "refresh_token": grant.refresh_token},
        auth=_basic(client_id, secret),
    )
    grant.refresh_token = _token_response(response).get("refresh_token") or grant.refresh_token
