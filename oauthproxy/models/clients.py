"""MCP clients: django-oauth-toolkit's application model, swapped so each client belongs to one server."""

from urllib.parse import urlsplit

from django.db import models
from oauth2_provider.models import AbstractApplication, TokenChecksumField

from .servers import McpServer


class Client(AbstractApplication):
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
    # RFC 7592 registration access token, stored as a SHA-256 checksum only.
    registration_token_checksum = TokenChecksumField(max_length=64, blank=True, default="", db_index=True)
    disabled = models.BooleanField(
        default=False, help_text="Disabled clients cannot authorize, redeem codes or refresh."
    )
    last_used = models.DateTimeField(null=True, blank=True)

    class Meta(AbstractApplication.Meta):
        swappable = "OAUTH2_PROVIDER_APPLICATION_MODEL"
        verbose_name = "client"
        indexes = [models.Index(fields=["server", "created"])]

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
