"""The keys that sign a server's identity assertions (``X-Identity-Assertion``, DESIGN §4 Gateway).

One current key per server signs; retired keys stay published in the server's JWKS until ``retires_at``
(the rotation overlap), so an assertion signed just before a rotation, or a verifier's cached key set,
keeps verifying. The private key is stored encrypted (``EncryptedTextField``, bound to its row).
"""

import uuid

from django.db import models

from oauthproxy.core.fields import EncryptedTextField
from oauthproxy.models.servers import McpServer


class IdentityKeyQuerySet(models.QuerySet):
    def published(self, *, now):
        """The keys a verifier may meet: the current one and those still in their overlap."""
        return self.filter(models.Q(retires_at__isnull=True) | models.Q(retires_at__gt=now))


class IdentityKey(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    server = models.ForeignKey(McpServer, on_delete=models.CASCADE, related_name="identity_keys")
    kid = models.CharField("key ID", max_length=64, unique=True)
    algorithm = models.CharField(max_length=16, default="ES256")
    private_key = EncryptedTextField(help_text="PEM (PKCS #8), encrypted at rest.")
    public_jwk = models.JSONField(help_text="The public key as published in the JWKS.")
    created = models.DateTimeField(auto_now_add=True)
    # Empty: the current signing key. Set at rotation: published until then, never used to sign again.
    retires_at = models.DateTimeField(null=True, blank=True)

    objects = IdentityKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]
        verbose_name = "identity assertion key"
        constraints = [
            models.UniqueConstraint(
                fields=["server"], condition=models.Q(retires_at__isnull=True), name="identitykey_one_current"
            )
        ]

    def __str__(self) -> str:
        return f"{self.kid} ({self.algorithm})"
