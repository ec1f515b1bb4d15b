"""Discovery, from the operator's side: the server fields an upstream issuer's metadata implies
(RFC 8414 / OpenID Connect Discovery, fetched by ``upstream.client.upstream_metadata_fetch``), and their
audited application. Discovery suggests values; nothing is saved until the operator applies them. The
connection check is ``upstream.check``.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field

from django.core.exceptions import ValidationError

from oauthproxy.console.changes import server_change_problems
from oauthproxy.console.servers import server_save
from oauthproxy.core.http import DestinationPolicy
from oauthproxy.models import McpServer
from oauthproxy.models.servers import AUTH_METHODS
from oauthproxy.upstream.client import (  # noqa: F401 (DiscoveryError: the console imports it from here)
    DiscoveryError,
    issuer_metadata_urls,
    issuer_url_is_acceptable,
    metadata_strings,
    upstream_metadata_fetch,
)

SUGGESTED_SCOPES = ("openid", "email", "profile", "offline_access")


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


def upstream_discover(*, issuer: str, policy: DestinationPolicy) -> DiscoveryResult:
    """Fetch an issuer's RFC 8414 / OIDC metadata and work out the server fields it implies: endpoints,
    the auth methods the proxy can use, PKCE and suggested scopes. Saves nothing. Requests go only where
    *policy* (the operator's or the server's) allows."""
    url, data = upstream_metadata_fetch(issuer=issuer, policy=policy)
    result = DiscoveryResult(issuer=data["issuer"], metadata_url=url)
    values = result.values
    values["issuer"] = data["issuer"]
    for name in ("authorization_endpoint", "token_endpoint", "revocation_endpoint", "userinfo_endpoint"):
        value = data.get(name)
        if isinstance(value, str) and value:
            values[name] = value
            if not issuer_url_is_acceptable(value):
                result.notes.append(f"{name} {value} is not an https:// URL; the proxy will refuse it.")
    if "revocation_endpoint" not in values:
        result.notes.append("No revocation endpoint: revoking a session ends it at the proxy only.")

    # RFC 8414 §2: omitted means client_secret_basic.
    supported = metadata_strings(data.get("token_endpoint_auth_methods_supported")) or ["client_secret_basic"]
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
        result.code_challenge_methods_supported = metadata_strings(pkce)
        values["use_pkce"] = "S256" in pkce
        if "S256" not in pkce:
            result.notes.append("The upstream does not support PKCE with S256; PKCE upstream is turned off.")
    else:
        result.notes.append(
            "The upstream does not advertise PKCE support (code_challenge_methods_supported); "
            "the current setting is kept (most providers ignore PKCE parameters they do not use)."
        )

    result.scopes_supported = metadata_strings(data.get("scopes_supported"))
    if result.scopes_supported:
        suggested = [s for s in SUGGESTED_SCOPES if s in result.scopes_supported]
        if suggested:
            values["scopes"] = suggested
    grant_types = data.get("grant_types_supported")
    if isinstance(grant_types, list):
        result.grant_types_supported = metadata_strings(grant_types)
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
    before = McpServer.objects.filter(pk=server.pk).first()
    for name in chosen:
        if name in result.values:
            setattr(server, name, result.values[name])
    server.full_clean()
    # Found values move endpoints like any edit: the same rules (the secret is not part of discovery).
    if problems := server_change_problems(before=before, server=server, actor=actor, secret_entered=False):
        raise ValidationError(problems)
    return server_save(server=server, actor=actor, message_prefix="discovery applied: ")
