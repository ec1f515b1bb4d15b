"""Discovery documents, one set per MCP server (DESIGN §2).

- RFC 8414 authorization server metadata; the issuer is ``server.issuer_url`` byte for byte everywhere.
  The two OpenID discovery locations MCP clients also try answer 404: the proxy issues no ID tokens and
  has no ID-token signing keys, so a complete, true OpenID Provider document cannot be served there, and a
  partial one makes OpenID clients choke. Clients fall back to RFC 8414 (the MCP specification's order).
- RFC 9728 protected resource metadata for the server's MCP endpoint.

Both are public and cacheable; browser-based MCP clients (the MCP Inspector, web IDEs) fetch them
cross-origin (``ProtocolEndpoint``'s CORS).
"""

from django.http import JsonResponse

from oauthproxy.authserver.client_auth import ALGORITHMS, PRIVATE_KEY_JWT
from oauthproxy.authserver.views.protocol import ProtocolEndpoint, ServerNotFound
from oauthproxy.core.identity import identity_jwks
from oauthproxy.models import McpServer

METADATA_CACHE_CONTROL = "public, max-age=300"
CLIENT_AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post", PRIVATE_KEY_JWT]
RESOURCE_SERVER_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


class AuthorizationServerMetadataApi(ProtocolEndpoint):
    """RFC 8414 at ``/.well-known/oauth-authorization-server/oauth/<slug>`` and the OpenID locations."""

    def get(self, request, slug: str):
        return _metadata_response(authorization_server_metadata(server=self.server_get(slug)))


class OpenIdConfigurationApi(ProtocolEndpoint):
    """``/.well-known/openid-configuration/oauth/<slug>`` and ``/oauth/<slug>/.well-known/openid-configuration``:
    404 for every server (see the module docstring); RFC 8414 is the source of truth."""

    def get(self, request, slug: str):
        raise OpenIdConfigurationNotServed()


class OpenIdConfigurationNotServed(ServerNotFound):
    def __init__(self):
        super().__init__("This is an OAuth 2.0 authorization server, not an OpenID Provider: its metadata is at "
                         "/.well-known/oauth-authorization-server/oauth/<slug> (RFC 8414).")


class IdentityJwksApi(ProtocolEndpoint):
    """``/oauth/<slug>/jwks.json``: the public keys of the server's identity assertions (RFC 7517)."""

    def get(self, request, slug: str):
        response = JsonResponse(identity_jwks(server=self.server_get(slug)))
        # Short: verifiers refetch on an unknown kid anyway; a rotation's new key is seen within this.
        response["Cache-Control"] = "public, max-age=60"
        return response


class ProtectedResourceMetadataApi(ProtocolEndpoint):
    """RFC 9728 at ``/.well-known/oauth-protected-resource/mcp/<slug>``."""

    def get(self, request, slug: str):
        return _metadata_response(protected_resource_metadata(server=self.server_get(slug)))


def authorization_server_metadata(*, server: McpServer) -> dict:
    issuer = server.issuer_url
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/authorize",
        "token_endpoint": f"{issuer}/token",
        "registration_endpoint": f"{issuer}/register",
        "revocation_endpoint": f"{issuer}/revoke",
        "introspection_endpoint": f"{issuer}/introspect",
        "scopes_supported": list(server.scopes or []),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": CLIENT_AUTH_METHODS,
        # private_key_jwt: metadata-document clients only (their document's keys, see client_auth).
        "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
        "revocation_endpoint_auth_methods_supported": CLIENT_AUTH_METHODS,
        "revocation_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
        "introspection_endpoint_auth_methods_supported": RESOURCE_SERVER_AUTH_METHODS,
        "client_id_metadata_document_supported": True,
        "authorization_response_iss_parameter_supported": True,
        # RFC 9728 §4: the resources this authorization server issues tokens for.
        "protected_resources": [server.resource_url],
        # The keys of the X-Identity-Assertion JWTs the gateway sends the internal server.
        **({"jwks_uri": server.jwks_url} if server.identity_assertion else {}),
    }


def protected_resource_metadata(*, server: McpServer) -> dict:
    return {
        "resource": server.resource_url,
        "authorization_servers": [server.issuer_url],
        "scopes_supported": list(server.scopes or []),
        "bearer_methods_supported": ["header"],
        "resource_name": server.name,
    }


def _metadata_response(document: dict) -> JsonResponse:
    response = JsonResponse(document)
    response["Cache-Control"] = METADATA_CACHE_CONTROL
    return response
