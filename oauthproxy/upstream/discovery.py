"""A server's upstream configuration, from the operator's side: discovery from the upstream issuer's
metadata, the connection check, and audited saves and deletions of a server's configuration.

Discovery (RFC 8414 / OpenID Connect Discovery) suggests values; nothing is saved until the operator
applies them. The connection check runs without a user: metadata consistency, endpoint reachability and
whether the upstream accepts the stored client credential (an invalid-code exchange answers
``invalid_grant`` to a known client and ``invalid_client`` to a wrong credential).
"""

import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit, urlunsplit

import requests
from django.conf import settings

from oauthproxy.console.servers import server_save
from oauthproxy.core.crypto import pkce_s256_challenge
from oauthproxy.core.settings import proxy_settings
from oauthproxy.models import McpServer
from oauthproxy.models.servers import AUTH_METHODS
from oauthproxy.upstream.client import UpstreamClient, http_session

SUGGESTED_SCOPES = ("openid", "email", "profile", "offline_access")
_ERROR_CODE = re.compile(r"^[a-z][a-z0-9_]*$")


class DiscoveryError(Exception):
    """The issuer's metadata could not be found or is unusable; ``reason`` says why, for the operator."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# -- HTTP ------------------------------------------------------------------------------------------

def _timeouts() -> tuple[float, float]:
    return proxy_settings.UPSTREAM_CONNECT_TIMEOUT, proxy_settings.UPSTREAM_READ_TIMEOUT


def _describe_failure(exc: requests.RequestException, url: str) -> str:
    if isinstance(exc, requests.Timeout):
        return f"timed out ({urlsplit(url).netloc})"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect to {urlsplit(url).netloc}"
    return f"request failed ({type(exc).__name__})"


def _fetch_json(url: str) -> tuple[int, dict | None, str]:
    """GET a JSON document: (status, object or None, problem)."""
    limit = proxy_settings.UPSTREAM_MAX_RESPONSE_BYTES
    try:
        response = http_session().get(
            url, timeout=_timeouts(), allow_redirects=False, stream=True, headers={"Accept": "application/json"}
        )
    except requests.RequestException as exc:
        return 0, None, _describe_failure(exc, url)
    try:
        if response.status_code != 200:
            return response.status_code, None, f"HTTP {response.status_code}"
        body = response.raw.read(limit + 1, decode_content=True) if response.raw is not None else response.content
    except requests.RequestException as exc:
        return 0, None, _describe_failure(exc, url)
    finally:
        response.close()
    if len(body) > limit:
        return 200, None, f"larger than {limit} bytes"
    try:
        data = json.loads(body)
    except ValueError:
        return 200, None, "not JSON"
    if not isinstance(data, dict):
        return 200, None, "not a JSON object"
    return 200, data, ""


def _probe(url: str, *, method: str = "GET") -> tuple[int, str, str]:
    """Send one request and read nothing: (status or 0, Location header, problem)."""
    try:
        response = http_session().request(method, url, timeout=_timeouts(), allow_redirects=False, stream=True)
    except requests.RequestException as exc:
        return 0, "", _describe_failure(exc, url)
    response.close()
    return response.status_code, response.headers.get("Location", ""), ""


# -- discovery -------------------------------------------------------------------------------------

@dataclass
class DiscoveryResult:
    issuer: str
    metadata_url: str
    values: dict = field(default_factory=dict)  # server field -> value found
    notes: list[str] = field(default_factory=list)  # what the operator should know
    scopes_supported: list[str] = field(default_factory=list)
    auth_methods_supported: list[str] = field(default_factory=list)
    code_challenge_methods_supported: list[str] | None = None
    grant_types_supported: list[str] | None = None


def _acceptable_url(url: str) -> bool:
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and (settings.DEBUG or parts.hostname in ("localhost", "127.0.0.1", "::1"))


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


def _str_list(value) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def upstream_metadata_fetch(*, issuer: str) -> tuple[str, dict]:
    """(metadata URL, metadata) of an issuer, checked: its ``issuer`` matches (RFC 8414 §3.3) and it
    names the authorization and token endpoints. Raises ``DiscoveryError``."""
    issuer = (issuer or "").strip()
    if not _acceptable_url(issuer):
        raise DiscoveryError("The issuer must be an https:// URL (http:// only for localhost or with DEBUG).")
    if urlsplit(issuer).query or urlsplit(issuer).fragment:
        raise DiscoveryError("An issuer URL has no query or fragment (RFC 8414 §2).")
    problems = []
    for url in issuer_metadata_urls(issuer):
        _status, data, problem = _fetch_json(url)
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


def upstream_discover(*, issuer: str) -> DiscoveryResult:
    """Fetch an issuer's RFC 8414 / OIDC metadata and work out the server fields it implies: endpoints,
    the auth methods the proxy can use, PKCE and suggested scopes. Saves nothing."""
    url, data = upstream_metadata_fetch(issuer=issuer)
    result = DiscoveryResult(issuer=data["issuer"], metadata_url=url)
    values = result.values
    values["issuer"] = data["issuer"]
    for name in ("authorization_endpoint", "token_endpoint", "revocation_endpoint", "userinfo_endpoint"):
        value = data.get(name)
        if isinstance(value, str) and value:
            values[name] = value
            if not _acceptable_url(value):
                result.notes.append(f"{name} {value} is not an https:// URL; the proxy will refuse it.")
    if "revocation_endpoint" not in values:
        result.notes.append("No revocation endpoint: revoking a session ends it at the proxy only.")

    # RFC 8414 §2: omitted means client_secret_basic.
    supported = _str_list(data.get("token_endpoint_auth_methods_supported")) or ["client_secret_basic"]
    result.auth_methods_supported = supported
    usable = [m for m in ("client_secret_basic", "client_secret_post") if m in supported]
    if not usable and "none" in supported:
        usable = ["none"]
    if usable:
        values["token_endpoint_auth_methods_supported"] = usable
    else:
        result.notes.append(
            f"The upstream supports none of the proxy's client authentication methods "
            f"({', '.join(AUTH_METHODS)}); it offers {', '.join(supported)}."
        )

    pkce = data.get("code_challenge_methods_supported")
    if isinstance(pkce, list):
        result.code_challenge_methods_supported = _str_list(pkce)
        values["use_pkce"] = "S256" in pkce
        if "S256" not in pkce:
            result.notes.append("The upstream does not support PKCE with S256; PKCE upstream is turned off.")
    else:
        result.notes.append(
            "The upstream does not advertise PKCE support (code_challenge_methods_supported); "
            "the current setting is kept (most providers ignore PKCE parameters they do not use)."
        )

    result.scopes_supported = _str_list(data.get("scopes_supported"))
    if result.scopes_supported:
        suggested = [s for s in SUGGESTED_SCOPES if s in result.scopes_supported]
        if suggested:
            values["scopes"] = suggested
    grant_types = data.get("grant_types_supported")
    if isinstance(grant_types, list):
        result.grant_types_supported = _str_list(grant_types)
        if "authorization_code" not in grant_types:
            result.notes.append("The upstream does not list the authorization_code grant.")
        if "refresh_token" not in grant_types:
            result.notes.append(
                "The upstream does not list the refresh_token grant: a session ends when its upstream "
                "access token expires."
            )
    response_types = data.get("response_types_supported")
    if isinstance(response_types, list) and "code" not in response_types:
        result.notes.append("The upstream does not list the 'code' response type.")
    return result


def discovery_default_fields(*, server: McpServer | None, result: DiscoveryResult) -> list[str]:
    """Which found values to apply unless the operator chooses: all, except scopes already chosen."""
    return [name for name in result.values if not (name == "scopes" and server is not None and server.scopes)]


def server_discovery_apply(
    *, server: McpServer, result: DiscoveryResult, actor, fields: Iterable[str] | None = None
) -> list[str]:
    """Apply found values to a saved server (validated, audited). Returns the fields that changed.
    Raises ``django.core.exceptions.ValidationError`` when the result makes the server invalid."""
    chosen = list(fields) if fields is not None else discovery_default_fields(server=server, result=result)
    for name in chosen:
        if name in result.values:
            setattr(server, name, result.values[name])
    server.full_clean()
    return server_save(server=server, actor=actor, message_prefix="discovery applied: ")


# -- connection check ------------------------------------------------------------------------------

OK, WARNING, ERROR, SKIPPED, INFO = "ok", "warning", "error", "skipped", "info"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # ok, warning, error, skipped, info
    detail: str


@dataclass
class ConnectionCheck:
    server: McpServer
    callback_url: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(r.status == ERROR for r in self.results)

    @property
    def summary(self) -> str:
        errors = sum(r.status == ERROR for r in self.results)
        warnings = sum(r.status == WARNING for r in self.results)
        if errors:
            return f"{errors} problem(s), {warnings} warning(s)"
        return f"No problems found, {warnings} warning(s)" if warnings else "No problems found"


_CREDENTIAL_VERDICTS = {
    # The client was authenticated, then the fake code was refused: the credential is good.
    "invalid_grant": (OK, "The upstream accepted the client credential (it answered invalid_grant to a "
                          "deliberately invalid code)."),
    "bad_verification_code": (OK, "The upstream accepted the client credential (it answered "
                                  "bad_verification_code to a deliberately invalid code)."),
    "invalid_client": (ERROR, "The upstream rejected the client credential (invalid_client): check the client "
                              "ID, the secret and the auth method."),
    "incorrect_client_credentials": (ERROR, "The upstream rejected the client credential "
                                            "(incorrect_client_credentials): check the client ID and secret."),
    "unauthorized_client": (ERROR, "The upstream does not allow this client the authorization code grant "
                                   "(unauthorized_client)."),
    "unsupported_grant_type": (ERROR, "The upstream does not support the authorization code grant at this "
                                      "token endpoint (unsupported_grant_type)."),
    "redirect_uri_mismatch": (ERROR, "The upstream does not accept the callback URL (redirect_uri_mismatch): "
                                     "whitelist it at the upstream."),
    "invalid_request": (WARNING, "The upstream answered invalid_request without judging the credential; "
                                 "it may want other parameters. Try a real login to be sure."),
    "unexpected_success": (WARNING, "The upstream issued tokens for a made-up code; it is not a strict "
                                    "OAuth server."),
}


def _check_credential(server: McpServer) -> CheckResult:
    name = "Client credential at the token endpoint"
    if not server.client_id:
        return CheckResult(name, ERROR, "No client ID is configured.")
    verdict = UpstreamClient(server).check_credentials()
    if verdict in _CREDENTIAL_VERDICTS:
        status, detail = _CREDENTIAL_VERDICTS[verdict]
        return CheckResult(name, status, detail)
    if _ERROR_CODE.match(verdict):
        return CheckResult(name, WARNING, f"The upstream answered {verdict} to an invalid code; it did not "
                                          "say whether the credential is right.")
    return CheckResult(name, ERROR, f"The token endpoint failed: {verdict}")


def _check_metadata(server: McpServer) -> list[CheckResult]:
    name = "Upstream metadata"
    if not server.issuer:
        return [CheckResult(name, SKIPPED, "No upstream issuer is configured; set one to compare the "
                                           "configuration with the upstream's metadata.")]
    try:
        url, data = upstream_metadata_fetch(issuer=server.issuer)
    except DiscoveryError as exc:
        return [CheckResult(name, ERROR, exc.reason)]
    results = [CheckResult(name, OK, f"Found at {url}.")]
    for field_name in ("authorization_endpoint", "token_endpoint", "revocation_endpoint", "userinfo_endpoint"):
        configured, published = getattr(server, field_name), data.get(field_name)
        if not isinstance(published, str) or not published:
            continue
        if configured and configured != published:
            results.append(CheckResult(f"Metadata: {field_name}", WARNING,
                                       f"Configured {configured}, but the upstream publishes {published}."))
        elif not configured and field_name == "revocation_endpoint":
            results.append(CheckResult(f"Metadata: {field_name}", WARNING,
                                       f"The upstream offers {published}; set it so revocations reach the "
                                       "upstream."))
    supported = _str_list(data.get("token_endpoint_auth_methods_supported")) or ["client_secret_basic"]
    method = server.upstream_auth_method
    if method not in supported:
        results.append(CheckResult("Metadata: auth method", ERROR,
                                   f"The proxy would use {method}, which the upstream does not list "
                                   f"(it lists {', '.join(supported)})."))
    pkce = data.get("code_challenge_methods_supported")
    if isinstance(pkce, list):
        if server.use_pkce and "S256" not in pkce:
            results.append(CheckResult("Metadata: PKCE", WARNING,
                                       "PKCE is on, but the upstream does not list S256."))
        elif not server.use_pkce and "S256" in pkce:
            results.append(CheckResult("Metadata: PKCE", WARNING,
                                       "The upstream supports PKCE (S256); turn it on for the upstream leg."))
    scopes_supported = _str_list(data.get("scopes_supported"))
    unknown = [s for s in server.scopes or [] if scopes_supported and s not in scopes_supported]
    if unknown:
        results.append(CheckResult("Metadata: scopes", WARNING,
                                   f"The upstream does not list the scope(s) {', '.join(unknown)}."))
    grant_types = data.get("grant_types_supported")
    if isinstance(grant_types, list) and "refresh_token" not in grant_types:
        results.append(CheckResult("Metadata: refresh tokens", WARNING,
                                   "The upstream does not list the refresh_token grant."))
    return results


def _check_authorization_endpoint(server: McpServer) -> CheckResult:
    name = "Authorization endpoint"
    verifier = secrets.token_urlsafe(48)
    url = UpstreamClient(server).authorization_url(
        state=secrets.token_urlsafe(16),
        code_challenge=pkce_s256_challenge(verifier) if server.use_pkce else None,
    )
    status, location, problem = _probe(url)
    if problem:
        return CheckResult(name, ERROR, f"Unreachable: {problem}.")
    if status >= 500:
        return CheckResult(name, ERROR, f"The upstream answered HTTP {status}.")
    if 300 <= status < 400 and location.startswith(server.callback_url):
        error = parse_qs(urlsplit(location).query).get("error", ["?"])[0]
        return CheckResult(name, ERROR, f"The upstream redirected straight back with error={error}: check the "
                                        "client ID, the scopes and the extra authorization parameters.")
    if status >= 400:
        return CheckResult(name, WARNING, f"The upstream answered HTTP {status} to an authorization request: it "
                                          "may not know the client ID or accept the callback URL "
                                          f"{server.callback_url}.")
    return CheckResult(name, OK, f"Reachable (HTTP {status}).")


def _check_reachable(name: str, url: str, *, blocking: bool = True) -> CheckResult:
    status, _location, problem = _probe(url)
    if problem:
        return CheckResult(name, ERROR if blocking else WARNING, f"Unreachable: {problem}.")
    if status >= 500:
        return CheckResult(name, ERROR if blocking else WARNING, f"Answered HTTP {status}.")
    return CheckResult(name, OK, f"Reachable (HTTP {status}).")


def server_connection_check(*, server: McpServer) -> ConnectionCheck:
    """Check a saved server against its upstream without a user. Nothing is changed anywhere."""
    check = ConnectionCheck(server=server, callback_url=server.callback_url)
    check.results.append(CheckResult(
        "Callback URL", INFO, f"Whitelist {server.callback_url} as a redirect URI of the upstream client."
    ))
    check.results.extend(_check_metadata(server))
    check.results.append(_check_authorization_endpoint(server))
    check.results.append(_check_credential(server))
    if server.revocation_endpoint:
        check.results.append(_check_reachable("Revocation endpoint", server.revocation_endpoint))
    if server.userinfo_endpoint:
        check.results.append(_check_reachable("Userinfo endpoint", server.userinfo_endpoint))
    if server.mcp_url:
        check.results.append(_check_reachable("Internal MCP server", server.mcp_url, blocking=False))
    else:
        check.results.append(CheckResult("Internal MCP server", WARNING,
                                         "No internal MCP URL: the gateway cannot forward traffic."))
    return check
