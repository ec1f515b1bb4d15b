"""Consent memory and the server-side state of an authorization in flight (DESIGN §4, §5.6, §5.7)."""

import uuid

from django.db import models

from ..fields import EncryptedTextField
from .clients import Client
from .servers import McpServer


class Consent(models.Model):
    """A browser approved a client for one redirect URI; remembered for a configurable period."""

    browser_key_checksum = models.CharField(max_length=64)
    client = models.ForeignKey(Client, on_delete=models.CASCADE, related_name="consents")
    redirect_uri = models.TextField()
    scope = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["browser_key_checksum", "client"])]

    def __str__(self) -> str:
        return f"consent for {self.client_id} to {self.redirect_uri}"


class PendingAuthorization(models.Model):
    """An authorization request from consent until the upstream callback.

    The upstream ``state`` is stored as a checksum; it is single use (``consumed_at``), expires
    quickly and is bound to the browser that approved (``browser_key_checksum``).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    server = models.ForeignKey(McpServer, on_delete=models.CASCADE, related_name="+")
    client = models.ForeignKey(Client, on_delete=models.CASCADE, related_name="+")
    state_checksum = models.CharField(max_length=64, unique=True)
    browser_key_checksum = models.CharField(max_length=64)
    redirect_uri = models.TextField()
    client_state = models.TextField(blank=True)
    code_challenge = models.CharField(max_length=128)
    code_challenge_method = models.CharField(max_length=10, default="S256")
    scope = models.TextField(blank=True)
    resource = models.TextField(blank=True)
    upstream_code_verifier = EncryptedTextField()
    created = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)
    consumed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"pending authorization {self.pk} for {self.client_id}"
