"""Credentials for resource servers that introspect the proxy's tokens themselves (RFC 7662)."""

import secrets

from django.contrib.auth.hashers import check_password, make_password
from django.db import models

from oauthproxy.models.servers import McpServer


def _generate_credential_id() -> str:
    return "rs_" + secrets.token_urlsafe(16)


class IntrospectionCredential(models.Model):
    server = models.ForeignKey(McpServer, on_delete=models.CASCADE, related_name="introspection_credentials")
    name = models.CharField(max_length=200, help_text="Which resource server uses this credential.")
    client_id = models.CharField(max_length=64, unique=True, default=_generate_credential_id, editable=False)
    secret_hash = models.CharField(max_length=200, editable=False)
    created = models.DateTimeField(auto_now_add=True)
    revoked = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"{self.name} ({self.client_id})"

    def set_secret(self) -> str:
        """Generate a new secret, store its hash and return it (shown once)."""
        secret = secrets.token_urlsafe(32)
        self.secret_hash = make_password(secret, hasher="pbkdf2_sha256_generated_secret")  # 256 random bits
        return secret

    def check_secret(self, secret: str) -> bool:
        return not self.revoked and check_password(secret, self.secret_hash)
