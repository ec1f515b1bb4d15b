"""The wire client for the upstream identity provider: URLs, code exchange, refresh, revoke, userinfo.

Only wire work lives here (the allauth "client" role): one pooled ``requests`` session, a timeout on
every call, response size bounded, errors caught narrowly and turned into ``UpstreamError`` with a reason
an operator can act on. Policy (when to refresh, what to store) lives in ``upstream_sessions``.
"""

import base64
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import jwt
from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from oauthproxy.core import metrics
from oauthproxy.core.destinations import server_destination_policy
from oauthproxy.core.exceptions import UpstreamError
from oauthproxy.core.http import (
    DestinationPolicy,
    OutboundConnectionError,
    OutboundError,
    OutboundResponse,
    OutboundTimeout,
    ResponseTooLarge,
    outbound_fetch,
)
from oauthproxy.core.settings import proxy_settings
from oauthproxy.models import McpServer

logger = logging.getLogger(__name__)


def _read_json(response: OutboundResponse, *, what: str) -> dict:
    try:
        data = json.loads(response.body)
    except ValueError:
        content_type = response.headers.get("Content-Type", "?")
        raise UpstreamError(
            f"{what}: HTTP {response.status} with a non-JSON body ({content_type})",
            oauth_error="server_error" if response.status < 500 else "temporarily_unavailable",
        )
    if not isinstance(data, dict):
        raise UpstreamError(f"{what}: JSON body is not an object", oauth_error="server_error")
    return data


def upstream_deadline() -> float:
    """Seconds one upstream call may take in all: connecting, sending and reading the whole response."""
    return proxy_settings.UPSTREAM_DEADLINE_SECONDS


def _request(
    method: str, url: str, *, what: str, server: McpServer, read_body: bool = True, **kwargs
) -> OutboundResponse:
    """One upstream call of *server*, under its team's destination policy and the upstream deadline."""
    outcome = "error"
    started = time.perf_counter()
    try:
        response = outbound_fetch(
            method, url, policy=server_destination_policy(server=server, cached=True), timeout=upstream_deadline(),
            connect_timeout=proxy_settings.UPSTREAM_CONNECT_TIMEOUT,
            read_timeout=proxy_settings.UPSTREAM_READ_TIMEOUT,
            max_bytes=proxy_settings.UPSTREAM_MAX_RESPONSE_BYTES if read_body else 0, **kwargs,
        )
        outcome = metrics.status_class(response.status)
    except OutboundTimeout:
        outcome = "timeout"
        raise UpstreamError(f"{what}: timed out", oauth_error="temporarily_unavailable")
    except OutboundConnectionError as exc:
        outcome = "connection_error"
        raise UpstreamError(f"{what}: {exc.reason}", oauth_error="temporarily_unavailable")
    except OutboundError as exc:
        raise UpstreamError(f"{what}: {exc.reason}", oauth_error="server_error")
    finally:
        metrics.upstream_request_record(
            server=server.slug, what=what, outcome=outcome, seconds=time.perf_counter() - started
        )
    return response


# -- issuer metadata (RFC 8414 / OpenID Connect Discovery) ---------------------------------------

class DiscoveryError(Exception):
    """The issuer's metadata could not be found or is unusable; ``reason`` says why, for the operator."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def request_failure_reason(exc: OutboundError, url: str) -> str:
    """Why a request failed, for the operator (no URL path or query: they may carry secrets). A refused
    destination reads the same whether or not something listens there: nothing was sent."""
    if isinstance(exc, OutboundTimeout):
        return f"timed out ({urlsplit(url).netloc})"
    if isinstance(exc, OutboundConnectionError):
        return f"cannot connect to {urlsplit(url).netloc}"
    return exc.reason


def upstream_fetch(url: str, *, policy: DestinationPolicy, max_bytes: int, method: str = "GET",
                   headers: dict | None = None) -> OutboundResponse:
    """One request of discovery or the connection check: under *policy* and the upstream deadline. Raises
    ``OutboundError``."""
    return outbound_fetch(
        method, url, policy=policy, timeout=upstream_deadline(), max_bytes=max_bytes,
        connect_timeout=proxy_settings.UPSTREAM_CONNECT_TIMEOUT, read_timeout=proxy_settings.UPSTREAM_READ_TIMEOUT,
        headers=headers,
    )


def _fetch_json(url: str, *, policy: DestinationPolicy, server: str | None) -> tuple[int, dict | None, str]:
    """GET a JSON document: (status, object or None, problem). ``server``: the slug, for the metrics."""
    limit = proxy_settings.UPSTREAM_MAX_RESPONSE_BYTES
    outcome, started = "error", time.perf_counter()
    try:
        response = upstream_fetch(url, policy=policy, max_bytes=limit, headers={"Accept": "application/json"})
        outcome = metrics.status_class(response.status)
    except ResponseTooLarge:
        return 200, None, f"larger than {limit} bytes"
    except OutboundError as exc:
        outcome = {OutboundTimeout: "timeout", OutboundConnectionError: "connection_error"}.get(type(exc), "error")
        return 0, None, request_failure_reason(exc, url)
    finally:
        metrics.upstream_request_record(
            server=server, what="upstream discovery", outcome=outcome, seconds=time.perf_counter() - started
        )
    if response.status != 200:
        return response.status, None, f"HTTP {response.status}"
    try:
        data = json.loads(response.body)
    except ValueError:
        return 200, None, "not JSON"
    if not isinstance(data, dict):
        return 200, None, "not a JSON object"
    return 200, data, ""


def issuer_url_is_acceptable(url: str) -> bool:
    """https, or http for localhost (or anywhere with DEBUG)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and (settings.DEBUG or parts.hostname in ("localhost", "127.0.0.1", "::1"))


def metadata_strings(value) -> list[str]:
    """The strings of a metadata list value (``[]`` when it is not a list)."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def issuer_metadata_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may live, in the order the MCP authorization spec tries them:
    RFC 8414 path insertion, OIDC path insertion, OIDC path appending."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")

    def at(path_: str) -> str:
        return urlunsplit((parts.scheme, parts.netloc, path_, "", ""))

    urls = [at("/.well-known/oauth-authorization-server" + path)]
    if path:
        urls.append(at("/.well-known/openid-configuration" + path))
    urls.append(at(path + "/.well-known/openid-configuration"))
    return urls


def upstream_metadata_fetch(
    *, issuer: str, policy: DestinationPolicy, server: str | None = None
) -> tuple[str, dict]:
    """THE fetcher of an issuer's metadata: (metadata URL, metadata), tried at ``issuer_metadata_urls`` in
    order and checked: its ``issuer`` matches (RFC 8414 §3.3) and it names the authorization and token
    endpoints. Discovery, the connection check and ``UpstreamClient.provider_metadata`` (ID token keys)
    all use it. Requests go only where *policy* allows. ``server``: the slug, for the metrics. Raises
    ``DiscoveryError``."""
    issuer = (issuer or "").strip()
    if not issuer_url_is_acceptable(issuer):
        raise DiscoveryError("The issuer must be an https:// URL (http:// only for localhost or with DEBUG).")
    if urlsplit(issuer).query or urlsplit(issuer).fragment:
        raise DiscoveryError("An issuer URL has no query or fragment (RFC 8414 §2).")
    problems = []
    for url in issuer_metadata_urls(issuer):
        _status, data, problem = _fetch_json(url, policy=policy, server=server)
        if data is not None:
            break
        problems.append(f"{url}: {problem}")
    else:
        raise DiscoveryError("No metadata found. Tried " + "; ".join(problems))
    found_issuer = data.get("issuer")
    if not isinstance(found_issuer, str) or found_issuer.rstrip("/") != issuer.rstrip("/"):
        raise DiscoveryError(
            f"The metadata at {url} names the issuer {found_issuer!r}, not {issuer!r}: "
            "use the issuer exactly as the upstream states it."
        )
    for name in ("authorization_endpoint", "token_endpoint"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise DiscoveryError(f"The metadata at {url} has no {name}.")
    return url, data


@dataclass
class TokenSet:
    access_token: str
    token_type: str = "Bearer"
    refresh_token: str = ""
    expires_in: int | None = None
    scope: str = ""
    id_token: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_response(cls, data: dict, *, what: str) -> "TokenSet":
        access_token = data.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise UpstreamError(f"{what}: the response has no access_token", oauth_error="server_error")
        expires_in = data.get("expires_in")
        try:
            expires_in = int(expires_in) if expires_in not in (None, "") else None
        except (TypeError, ValueError):
            expires_in = None
        scope = data.get("scope") or ""
        if isinstance(scope, list):  # some providers send a list
            scope = " ".join(str(s) for s in scope)
        return cls(
            access_token=access_token,
            token_type=str(data.get("token_type") or "Bearer"),
            refresh_token=str(data.get("refresh_token") or ""),
            expires_in=expires_in,
            scope=str(scope),
            id_token=str(data.get("id_token") or ""),
        )


ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def upstream_nonce(state: str) -> str:
    """The OpenID ``nonce`` of the login whose upstream state is ``state``: derived from it with a key of
    this deployment, so the callback, which holds the raw state, can check the ID token's ``nonce``
    without storing anything (the state itself is random, single-use and bound to the browser)."""
    key = hashlib.sha256(b"oauthproxy.upstream.nonce\x00" + settings.SECRET_KEY.encode()).digest()
    return base64.urlsafe_b64encode(hmac.new(key, state.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()


def upstream_nonce_expected(server: McpServer, state: str) -> str | None:
    """The nonce the ID token must carry: only OpenID logins (``openid`` in the scopes) send one."""
    return upstream_nonce(state) if "openid" in (server.scopes or []) else None


class UpstreamClient:
    """Talks to one server's upstream with its single stored credential."""

    def __init__(self, server: McpServer):
        self.server = server

    # -- authorization -------------------------------------------------------------------------
    def authorization_url(self, *, state: str, code_challenge: str | None) -> str:
        server = self.server
        params: dict[str, str] = {
            "response_type": "code",
            "client_id": server.client_id,
            "redirect_uri": server.callback_url,
            "state": state,
        }
        scopes = list(server.scopes or [])
        if scopes:
            params["scope"] = " ".join(scopes)
        if server.use_pkce and code_challenge:
            params["code_challenge"] = code_challenge
            params["code_challenge_method"] = "S256"
        nonce = upstream_nonce_expected(server, state)
        if nonce:  # OpenID: the ID token must echo it (checked in id_token_claims)
            params["nonce"] = nonce
        extra = dict(server.extra_authorize_params or {})
        # OpenID providers issue a refresh token for offline_access only with prompt=consent (DESIGN §6).
        if "offline_access" in scopes and "prompt" not in extra:
            extra["prompt"] = "consent"
        params.update(extra)
        # The MCP client's `resource` is never forwarded: the upstream does not know our resource URIs.
        parts = urlsplit(server.authorization_endpoint)
        query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
        return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query, quote_via=quote), ""))

    # -- token endpoint ------------------------------------------------------------------------
    def _token_request(self, data: dict, *, what: str) -> TokenSet:
        server = self.server
        headers = {"Accept": "application/json"}
        method = server.upstream_auth_method
        body = dict(data)
        if method == "client_secret_basic":
            # RFC 6749 §2.3.1: form-encode id and secret before base64. client_id is NOT repeated in the
            # body: some upstreams reject credentials sent twice (DESIGN §6).
            raw = f"{quote(server.client_id, safe='')}:{quote(server.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
        elif method == "client_secret_post":
            body["client_id"] = server.client_id
            body["client_secret"] = server.client_secret
        else:  # none: a public upstream client
            body["client_id"] = server.client_id
        response = _request("POST", server.token_endpoint, what=what, data=body, headers=headers, server=server)
        if response.status >= 500:
            raise UpstreamError(f"{what}: HTTP {response.status}", oauth_error="temporarily_unavailable")
        payload = _read_json(response, what=what)
        if response.status != 200 or "error" in payload:
            error = str(payload.get("error") or f"http_{response.status}")[:100]
            description = str(payload.get("error_description") or "")[:300]
            oauth_error = "invalid_grant" if error == "invalid_grant" else "server_error"
            raise UpstreamError(
                f"{what}: upstream answered {error}" + (f" ({description})" if description else ""),
                oauth_error=oauth_error,
                upstream_error=error,
            )
        return TokenSet.from_response(payload, what=what)

    def exchange_code(self, *, code: str, code_verifier: str | None) -> TokenSet:
        data = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.server.callback_url}
        if code_verifier:
            data["code_verifier"] = code_verifier
        return self._token_request(data, what="code exchange")

    def refresh(self, *, refresh_token: str) -> TokenSet:
        return self._token_request(
            {"grant_type": "refresh_token", "refresh_token": refresh_token}, what="token refresh"
        )

    def check_credentials(self) -> str:
        """Exchange an invalid code: ``invalid_grant`` means the credential was accepted."""
        try:
            self.exchange_code(code="proxy-connection-check-invalid-code", code_verifier=None)
        except UpstreamError as exc:
            return exc.upstream_error or exc.reason
        return "unexpected_success"

    def revoke(self, *, token: str, token_type_hint: str) -> bool:
        """Best effort RFC 7009 revocation at the upstream; True when the upstream accepted it."""
        endpoint = self.server.revocation_endpoint
        if not endpoint or not token:
            return False
        server = self.server
        body = {"token": token, "token_type_hint": token_type_hint}
        headers = {}
        if server.upstream_auth_method == "client_secret_basic":
            raw = f"{quote(server.client_id, safe='')}:{quote(server.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(raw.encode()).decode()
        else:
            body["client_id"] = server.client_id
            if server.upstream_auth_method == "client_secret_post":
                body["client_secret"] = server.client_secret
        try:
            response = _request("POST", endpoint, what="revocation", data=body, headers=headers, server=server,
                                read_body=False)
        except UpstreamError as exc:
            logger.warning("upstream revocation failed for %s: %s", server.slug, exc.reason)
            return False
        return response.status == 200

    # -- identity ------------------------------------------------------------------------------
    def userinfo(self, *, access_token: str) -> dict:
        response = _request(
            "GET",
            self.server.userinfo_endpoint,
            what="userinfo",
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            server=self.server,
        )
        if response.status != 200:
            raise UpstreamError(f"userinfo: HTTP {response.status}", oauth_error="server_error")
        return _read_json(response, what="userinfo")

    def provider_metadata(self) -> dict:
        """The upstream issuer's metadata (``upstream_metadata_fetch``), cached for an hour."""
        cache_key = f"upstream-metadata:{self.server.issuer.rstrip('/')}"
        cached = cache.get(cache_key)
        if cached is not None:
            return cached
        try:
            _url, data = upstream_metadata_fetch(
                issuer=self.server.issuer, policy=server_destination_policy(server=self.server, cached=True),
                server=self.server.slug,
            )
        except DiscoveryError as exc:
            raise UpstreamError(f"upstream discovery failed: {exc.reason}", oauth_error="server_error")
        cache.set(cache_key, data, 3600)
        return data

    def id_token_claims(self, *, id_token: str, nonce: str | None = None) -> dict:
        """The verified claims (see ``_id_token_decode``); with ``nonce``, the token must carry it."""
        claims = self._id_token_decode(id_token)
        if nonce is not None and claims.get("nonce") != nonce:
            raise UpstreamError("id_token rejected: the nonce does not match this login", oauth_error="server_error")
        return claims

    def _id_token_decode(self, id_token: str) -> dict:
        """The claims of an ID token received from the token endpoint.

        With an ``issuer`` configured the signature is checked against the upstream's JWKS, with
        ``iss`` and ``aud``. Without one, the token came straight from the token endpoint over the
        server-authenticated channel (OIDC Core §3.1.3.7 permits relying on TLS then); ``aud`` is still
        checked.
        """
        options = {"require": ["sub"]}
        try:
            if not self.server.issuer:
                return self._authorized_party_check(jwt.decode(
                    id_token,
                    options={"verify_signature": False, "verify_aud": True, **options},
                    audience=self.server.client_id,
                ))
            metadata = self.provider_metadata()
            jwks_uri = metadata.get("jwks_uri")
            if not jwks_uri:
                raise UpstreamError("id_token: upstream metadata has no jwks_uri", oauth_error="server_error")
            header = jwt.get_unverified_header(id_token)
            algorithm = header.get("alg")
            # Asymmetric algorithms only: a symmetric one would turn the public key into an HMAC secret
            # (algorithm confusion), and "none" is no signature at all.
            if algorithm not in ASYMMETRIC_ALGORITHMS:
                raise UpstreamError(f"id_token signed with unsupported algorithm {algorithm!r}",
                                    oauth_error="server_error")
            key = self._signing_key(jwks_uri, header.get("kid"))
            return self._authorized_party_check(jwt.decode(
                id_token,
                key=key,
                algorithms=[algorithm],
                audience=self.server.client_id,
                issuer=metadata.get("issuer", self.server.issuer),
                leeway=60,
                options=options,
            ))
        except jwt.PyJWTError as exc:
            raise UpstreamError(f"id_token rejected: {exc}", oauth_error="server_error")

    def _authorized_party_check(self, claims: dict) -> dict:
        """OIDC Core §3.1.3.7 (4, 5): with several audiences the token must name us as ``azp``; an ``azp``
        present must be us (a token issued to another client that lists us among its audiences is not a
        login at our client)."""
        audiences = claims.get("aud")
        azp = claims.get("azp")
        several = isinstance(audiences, list) and len(audiences) > 1
        if (several and azp is None) or (azp is not None and azp != self.server.client_id):
            raise UpstreamError("id_token rejected: issued to another authorized party (azp)",
                                oauth_error="server_error")
        return claims

    def _signing_key(self, jwks_uri: str, kid: str | None):
        cache_key = f"upstream-jwks:{jwks_uri}"
        jwks = cache.get(cache_key)
        for _attempt in range(2):
            if jwks is None:
                response = _request("GET", jwks_uri, what="jwks", headers={"Accept": "application/json"},
                                    server=self.server)
                jwks = _read_json(response, what="jwks")
                cache.set(cache_key, jwks, 3600)
            try:
                key_set = jwt.PyJWKSet.from_dict(jwks)
            except jwt.PyJWTError as exc:
                raise UpstreamError(f"jwks unusable: {exc}", oauth_error="server_error")
            for key in key_set.keys:
                if kid is None or key.key_id == kid:
                    return key.key
            jwks = None  # unknown kid: the upstream may have rotated keys; fetch once more
        raise UpstreamError("id_token signed with an unknown key", oauth_error="server_error")


def expires_at_from(expires_in: int | None):
    """Absolute expiry for an upstream ``expires_in`` (None: the upstream gave no expiry)."""
    if expires_in is None or expires_in <= 0:
        return None
    return timezone.now() + timedelta(seconds=expires_in)
