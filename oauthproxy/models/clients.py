"""MCP clients: django-oauth-toolkit's application model, swapped so each client belongs to one server."""

from urllib.parse import urlsplit

from django.db import models
from oauth2_provider.generators import generate_client_id
from oauth2_provider.models import AbstractApplication

from oauthproxy.models.servers import McpServer


class Client(AbstractApplication):
    # Unique per server, not globally: a Client ID Metadata Document URL (CIMD) is one client_id that
    # several MCP servers each know as their own client row. Look clients up with their server.
    client_id = models.CharField(
        "client ID", max_length=255, default=generate_client_id, db_index=True
    )
    server = models.ForeignKey(
        McpServer,
        on_delete=models.CASCADE,
        related_name="clients",
        help_text="The MCP server this client was registered at. It is unusable at any other server.",
    )
    # The RFC 7591 metadata as registered (redirect URIs and secrets excluded), echoed back on read.
    metadata = models.JSONField(default=dict, blank=True)
    token_endpoint_auth_method = models.CharField(max_length=32, default="none")
    client_secret_expires_at = models.DateTimeField(null=True, blank=True)
    # RFC 7592 registration access token, stored as a SHA-256 hex checksum only (set by the registration
    # service; DOT's TokenChecksumField expects a ``token`` attribute this model does not have).
    registration_token_checksum = models.CharField(max_length=64, blank=True, default="", editable=False)
    disabled = models.BooleanField(
        default=False, help_text="Disabled clients cannot authorize, redeem codes or refresh."
    )
    last_used = models.DateTimeField(null=True, blank=True)

    class Meta(AbstractApplication.Meta):
        swappable = "OAUTH2_PROVIDER_APPLICATION_MODEL"
        verbose_name = "client"
        indexes = [models.Index(fields=["server", "created"])]
        constraints = [
            models.UniqueConstraint(fields=["server", "client_id"], name="oauthproxy_client_unique_per_server"),
        ]

    def __str__(self) -> str:
        return self.name or self.client_id

    @property
    def verified_domain(self) -> str | None:
        """For CIMD clients the host of the metadata URL is proven by fetching it; DCR clients have none."""
        if self.registration_source == self.RegistrationSource.CIMD:
            return urlsplit(self.client_id).hostname
        return None

    def is_usable(self, request) -> bool:
        return not self.disabled and self.server.enabled

    def get_allowed_schemes(self) -> list[str]:
        """DOT's swap point for redirect schemes (used by ``clean()`` and its redirect responses): http(s)
        plus the private-use schemes (RFC 8252 §7.1) this client registered and the proxy's rules allow."""
        from oauthproxy.authserver.redirect_uris import redirect_uri_scheme_is_private_use

        schemes = list(super().get_allowed_schemes())
        for uri in self.redirect_uris.split():
            scheme = urlsplit(uri).scheme
            if scheme not in schemes and redirect_uri_scheme_is_private_use(scheme):
                schemes.append(scheme)
        return schemes
