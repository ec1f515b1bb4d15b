"""The connection check: a saved server against its upstream, without a user. Nothing is changed.

It compares the configuration with the upstream's metadata (``upstream_metadata_fetch``), probes the
endpoints, and asks whether the upstream accepts the stored client credential (an invalid-code exchange
answers ``invalid_grant`` to a known client and ``invalid_client`` to a wrong credential).
"""

import re
import secrets
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from oauthproxy.core.crypto import pkce_s256_challenge
from oauthproxy.core.destinations import server_destination_policy
from oauthproxy.core.http import OutboundError
from oauthproxy.core.public_url import public_url_mismatch
from oauthproxy.models import McpServer
from oauthproxy.upstream.client import (
    DiscoveryError,
    UpstreamClient,
    metadata_strings,
    request_failure_reason,
    upstream_fetch,
    upstream_metadata_fetch,
)

_ERROR_CODE = re.compile(r"^[a-z][a-z0-9_]*$")


# -- HTTP ------------------------------------------------------------------------------------------

def _probe(url: str, *, server: McpServer, method: str = "GET") -> tuple[int, str, str]:
    """Send one request under the server's destination policy and read nothing: (status or 0, Location
    header, problem). A refused destination answers the same whether or not something listens there."""
    try:
        response = upstream_fetch(url, policy=server_destination_policy(server=server), max_bytes=0, method=method)
    except OutboundError as exc:
        return 0, "", request_failure_reason(exc, url)
    return response.status, response.headers.get("Location", ""), ""


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
        url, data = upstream_metadata_fetch(
            issuer=server.issuer, policy=server_destination_policy(server=server), server=server.slug
        )
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
    supported = metadata_strings(data.get("token_endpoint_auth_methods_supported")) or ["client_secret_basic"]
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
    scopes_supported = metadata_strings(data.get("scopes_supported"))
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
    status, location, problem = _probe(url, server=server)
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


def _check_reachable(name: str, url: str, *, server: McpServer, blocking: bool = True) -> CheckResult:
    status, _location, problem = _probe(url, server=server)
    if problem:
        return CheckResult(name, ERROR if blocking else WARNING, f"Unreachable: {problem}.")
    if status >= 500:
        return CheckResult(name, ERROR if blocking else WARNING, f"Answered HTTP {status}.")
    return CheckResult(name, OK, f"Reachable (HTTP {status}).")


def server_connection_check(*, server: McpServer, request_origin: str | None = None) -> ConnectionCheck:
    """Check a saved server against its upstream without a user. Nothing is changed anywhere.
    *request_origin*: where the admin or API client reached the proxy; a host other than PUBLIC_BASE_URL's
    is a problem (clients and the upstream's redirect are sent to PUBLIC_BASE_URL)."""
    check = ConnectionCheck(server=server, callback_url=server.callback_url)
    mismatch = public_url_mismatch(origin=request_origin) if request_origin else None
    if mismatch:
        check.results.append(CheckResult("Public URL", ERROR, mismatch))
    check.results.append(CheckResult(
        "Callback URL", INFO, f"Whitelist {server.callback_url} as a redirect URI of the upstream client."
    ))
    check.results.extend(_check_metadata(server))
    check.results.append(_check_authorization_endpoint(server))
    check.results.append(_check_credential(server))
    if server.revocation_endpoint:
        check.results.append(_check_reachable("Revocation endpoint", server.revocation_endpoint, server=server))
    if server.userinfo_endpoint:
        check.results.append(_check_reachable("Userinfo endpoint", server.userinfo_endpoint, server=server))
    if server.mcp_url:
        check.results.append(_check_reachable("Internal MCP server", server.mcp_url, server=server,
                                              blocking=False))
    else:
        check.results.append(CheckResult("Internal MCP server", WARNING,
                                         "No internal MCP URL: the gateway cannot forward traffic."))
    return check
