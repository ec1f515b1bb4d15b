"""What happened, for operators: who, what, when. Never secrets or tokens."""

from django.conf import settings
from django.db import models


class AuditEvent(models.Model):
    class Kind(models.TextChoices):
        CLIENT_REGISTERED = "client.registered"
        CLIENT_UPDATED = "client.updated"
        CLIENT_DELETED = "client.deleted"
        CONSENT_GIVEN = "consent.given"
        CONSENT_DENIED = "consent.denied"
        TOKEN_ISSUED = "token.issued"
        TOKEN_REFRESHED = "token.refreshed"
        TOKEN_REVOKED = "token.revoked"
        REFRESH_REUSE = "token.refresh_reuse"
        UPSTREAM_REFRESHED = "upstream.refreshed"
        UPSTREAM_FAILURE = "upstream.failure"
        SESSION_REVOKED = "session.revoked"
        QUOTA_EXCEEDED = "quota.exceeded"
        ADMIN_CHANGE = "admin.change"
        ADMIN_TRY_IT = "admin.try_it", "Admin test login (Try it)"
        ACCESS_DENIED = "access.denied", "Access denied by policy"
        USER_DISCONNECTED = "user.disconnected", "User disconnected a client (My connections)"

    created = models.DateTimeField(auto_now_add=True, db_index=True)
    kind = models.CharField(max_length=40, choices=Kind.choices, db_index=True)
    server = models.ForeignKey(
        "oauthproxy.McpServer", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    client = models.ForeignKey(
        settings.OAUTH2_PROVIDER_APPLICATION_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    subject = models.CharField(max_length=255, blank=True)
    message = models.TextField(blank=True)
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created"]
        indexes = [
            models.Index(fields=["server", "-created"]),
            models.Index(fields=["client", "-created"]),
            models.Index(fields=["kind", "-created"]),
        ]

    def __str__(self) -> str:
        return f"{self.created:%Y-%m-%d %H:%M:%S} {self.kind}"
