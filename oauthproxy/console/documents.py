"""The server configuration document (DESIGN §3): one shape for the admin, the API and import/export."""

from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers

from oauthproxy.console.changes import server_change_problems
from oauthproxy.models import McpServer

DOCUMENT_FIELDS = (
    "slug",
    "name",
    "team",
    "mcp_url",
    "authorization_endpoint",
    "token_endpoint",
    "client_id",
    "client_secret",
    "scopes",
    "token_endpoint_auth_methods_supported",
    "revocation_endpoint",
    "userinfo_endpoint",
    "issuer",
    "extra_authorize_params",
    "use_pkce",
    "enabled",
    "access_token_lifetime",
    "refresh_token_lifetime",
    "send_identity_headers",
    "identity_assertion",
    "forward_upstream_token",
    "client_upstream_rate_limit",
    "client_upstream_daily_quota",
    "access",
    "groups_claim",
    "tool_policy",
    "strict_scopes",
    "client_admission",
)


class ServerDocumentSerializer(serializers.ModelSerializer):
    """Validates one configuration document. ``client_secret`` is write-only: never read back.

    On update, an omitted ``client_secret`` keeps the stored one (so an export can be re-imported).
    """

    team = serializers.SlugRelatedField(
        slug_field="name", queryset=Group.objects.all(), required=False, allow_null=True
    )
    client_secret = serializers.CharField(write_only=True, required=False, allow_blank=True, trim_whitespace=True)
    scopes = serializers.ListField(child=serializers.CharField(), required=False)
    token_endpoint_auth_methods_supported = serializers.ListField(child=serializers.CharField(), required=False)
    extra_authorize_params = serializers.DictField(child=serializers.CharField(), required=False)

    class Meta:
        model = McpServer
        fields = DOCUMENT_FIELDS
        extra_kwargs = {"slug": {"validators": []}}  # uniqueness is handled by the upsert

    def validate(self, attrs):
        if _contains_nul(attrs):
            raise serializers.ValidationError("Text must not contain NUL characters.")
        instance = self.instance or McpServer()
        candidate = McpServer(**{f.attname: getattr(instance, f.attname) for f in McpServer._meta.concrete_fields})
        for field, value in attrs.items():
            setattr(candidate, field, value)
        try:
            candidate.full_clean(validate_unique=False, exclude=["team"])
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.message_dict)
        problems = server_change_problems(
            before=self.instance, server=candidate, actor=self._actor(), secret_entered=bool(attrs.get("client_secret"))
        )
        if problems:
            raise serializers.ValidationError(problems)
        return attrs

    def _actor(self):
        """Who saves: the API's user, or import's ``actor`` (None: a management command)."""
        if "actor" in self.context:
            return self.context["actor"]
        request = self.context.get("request")
        return request.user if request is not None else None


def _contains_nul(value) -> bool:
    """PostgreSQL cannot store NUL in text; refuse it as bad input rather than fail at the database."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_contains_nul(k) or _contains_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_contains_nul(v) for v in value)
    return False
