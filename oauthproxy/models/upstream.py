"""One upstream login: the upstream tokens behind a family of proxy tokens (a grant, or session)."""

import uuid

from django.db import models

from oauthproxy.core.fields import EncryptedTextField
from oauthproxy.models.clients import Client
from oauthproxy.models.servers import McpServer


class UpstreamSession(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    server = models.ForeignKey(McpServer, on_delete=models.CASCADE, related_name="sessions")
    client = models.ForeignKey(Client, on_delete=models.CASCADE, related_name="sessions")
    subject = models.CharField(
        max_length=255, db_index=True, help_text="Who logged in, as the upstream identifies them."
    )
    subject_source = models.CharField(max_length=16, default="opaque")  # id_token, userinfo or opaque
    scope = models.TextField(blank=True, help_text="Scopes the upstream granted.")
    # Who the user is beyond the subject (email, name, groups), from the ID token or userinfo, as JSON;
    # encrypted: personal data. The access policies (grants/access.py) and the identity assertion
    # (gateway/identity.py) read it with the token; it is re-read from the upstream at each refresh.
    claims = EncryptedTextField()
    access_token = EncryptedTextField()
    refresh_token = EncryptedTextField()
    token_type = models.CharField(max_length=40, default="Bearer")
    expires_at = models.DateTimeField(
        null=True, blank=True, help_text="When the upstream access token expires (empty: no expiry given)."
    )
    refresh_count = models.PositiveIntegerField(default=0)
    refreshed_at = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(auto_now_add=True)
    last_used = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, db_index=True)
    revoked_reason = models.CharField(max_length=200, blank=True)

    class Meta:
        indexes = [models.Index(fields=["server", "created"]), models.Index(fields=["client", "created"])]

    def __str__(self) -> str:
        """A human title, e.g. "alice with Claude Desktop on CRM tools, since 2026-05-04 09:12"."""
        since = f", since {self.created:%Y-%m-%d %H:%M}" if self.created else ""
        return f"{self.subject} with {self.client} on {self.server.name}{since}"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None
