from oauthproxy.models.audit import AuditEvent
from oauthproxy.models.clients import Client
from oauthproxy.models.consent import Consent, PendingAuthorization
from oauthproxy.models.destinations import DestinationRule
from oauthproxy.models.identity import IdentityKey
from oauthproxy.models.introspection import IntrospectionCredential
from oauthproxy.models.servers import McpServer
from oauthproxy.models.teams import ApiToken, Team
from oauthproxy.models.tokens import AccessToken, Grant, IDToken, RefreshToken
from oauthproxy.models.upstream import UpstreamSession

__all__ = [
    "AccessToken",
    "ApiToken",
    "AuditEvent",
    "Client",
    "Consent",
    "DestinationRule",
    "Grant",
    "IDToken",
    "IdentityKey",
    "IntrospectionCredential",
    "McpServer",
    "PendingAuthorization",
    "RefreshToken",
    "Team",
    "UpstreamSession",
]
