"""Read-side queries for the proxy's own tokens (introspection, and the gateway's token check)."""

from oauthproxy.authserver.dot.validator import one_or_none
from oauthproxy.core.crypto import token_checksum
from oauthproxy.models import AccessToken, McpServer


def access_token_get_active(*, server: McpServer, token: str) -> AccessToken | None:
    """The proxy access token *token* if it is usable at *server* right now, else None.

    Usable: issued by this proxy (looked up by SHA-256 checksum), not expired, issued to a client of
    *server* that is not disabled, audience-bound to *server*'s resource URI, and its upstream session of
    *server* not ended. One query; ``application`` and ``upstream_session`` come loaded. The caller checks
    that *server* itself is enabled (``selectors.server_get_enabled``).
    """
    if not isinstance(token, str) or not token or len(token) > 4096 or "\x00" in token:
        return None
    access_token = one_or_none(
        AccessToken.objects.select_related("application", "upstream_session").filter(
            token_checksum=token_checksum(token)
        )
    )
    if access_token is None or access_token.is_expired():
        return None
    client, session = access_token.application, access_token.upstream_session
    if client is None or client.server_id != server.pk or client.disabled:
        return None
    if session is None or session.server_id != server.pk or session.revoked_at is not None:
        return None
    if server.resource_url not in (access_token.resource or []):
        return None
    return access_token
