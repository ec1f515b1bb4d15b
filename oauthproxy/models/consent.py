"""Consent memory and the server-side state of an authorization in flight (DESIGN §4, §5.6, §5.7)."""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from oauthproxy.core.fields import EncryptedTextField
from oauthproxy.models.clients import Client
from oauthproxy.models.servers import McpServer


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
    """An authorization request from the authorize endpoint until the upstream callback.

    Created when ``authorize`` has validated the request (``approved_at`` empty, no upstream state yet:
    the consent page shows it). Approval sets ``approved_at`` and the upstream ``state``, stored as a
    checksum only; it is single use (``consumed_at``), expires quickly and is bound to the browser that
    started the flow and approved it (``browser_key_checksum``).

    An admin's "Try it" test of a server (``services.try_it``) is the same row with a ``tester`` instead
    of a ``client``: no client, redirect URI or client PKCE; it is created approved (the admin asked for
    it) and its callback ends on an admin result page instead of at a client.

    A user's sign-in to "My connections" (``BASE/connections/``) is the same row with neither: no client
    and no tester, ``for_connections`` set; its callback ends on the connections page.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    server = models.ForeignKey(McpServer, on_delete=models.CASCADE, related_name="+")
    # Exactly one of the two: an MCP client's authorization, or an admin's test of the upstream.
    client = models.ForeignKey(Client, on_delete=models.CASCADE, related_name="+", null=True, blank=True)
    tester = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+", null=True, blank=True
    )
    for_connections = models.BooleanField(default=False)
    # Empty until consent is given: no upstream state exists before approval (DESIGN §5.6).
    state_checksum = models.CharField(max_length=64, unique=True, null=True, blank=True)
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
    approved_at = models.DateTimeField(null=True, blank=True)
    consumed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(Q(client__isnull=False) & Q(tester__isnull=True) & Q(for_connections=False))
                | (Q(client__isnull=True) & Q(tester__isnull=False) & Q(for_connections=False))
                | (Q(client__isnull=True) & Q(tester__isnull=True) & Q(for_connections=True)),
                name="pendingauthorization_one_purpose",
            )
        ]

    def __str__(self) -> str:
        if self.is_try_it:
            return f"test authorization {self.pk} by user {self.tester_id}"
        if self.for_connections:
            return f"connections sign-in {self.pk}"
        return f"pending authorization {self.pk} for {self.client_id}"

    @property
    def is_try_it(self) -> bool:
        return self.tester_id is not None
