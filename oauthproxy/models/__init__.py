from .audit import AuditEvent
from .clients import Client
from .consent import Consent, PendingAuthorization
from .introspection import IntrospectionCredential
from .servers import McpServer
from .tokens import AccessToken, Grant, IDToken, RefreshToken
from .upstream import UpstreamSession

__all__ = [
    "AccessToken",
    "AuditEvent",
    "Client",
    "Consent",
    "Grant",
    "IDToken",
    "IntrospectionCredential",
    "McpServer",
    "PendingAuthorization",
    "RefreshToken",
    "UpstreamSession",
]
