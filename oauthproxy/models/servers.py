"""An MCP server the proxy fronts, and the one upstream OAuth client it uses (DESIGN §3)."""

import re
import uuid
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models

from oauthproxy.core.fields import EncryptedTextField
from oauthproxy.core.settings import proxy_settings
from oauthproxy.grants.access import access_policy_problems, groups_claim_problems, tool_policy_problems

AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")
SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")


def _default_auth_methods() -> list[str]:
    return ["client_secret_basic"]


class McpServerQuerySet(models.QuerySet):
    def enabled(self):
        return self.filter(enabled=True)


class McpServer(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.CharField(
        max_length=64,
        unique=True,
        validators=[
            RegexValidator(
                SLUG_RE,
                "Use lowercase letters, digits and hyphens (not at the start or end), up to 64 characters.",
            )
        ],
        help_text="The URL name of this server: clients connect to /mcp/<slug>. Lowercase letters, digits "
        "and hyphens. Changing it changes every URL, including the callback registered at the upstream.",
    )
    name = models.CharField(max_length=200, help_text="Shown to users on the consent page.")
    team = models.ForeignKey(
        Group,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="mcp_servers",
        help_text="The team that owns this server. Its members (staff users in this group) can manage it.",
    )
    mcp_url = models.URLField(
        "internal MCP URL",
        max_length=500,
        blank=True,
        help_text="The internal MCP server's streamable-HTTP endpoint, e.g. http://tools.internal:8080/mcp. "
        "The gateway forwards authorized traffic there with the user's upstream access token.",
    )
    authorization_endpoint = models.URLField(
        max_length=500,
        help_text="Where the upstream identity provider asks the user to log in, "
        "e.g. https://login.example.com/oauth2/v1/authorize.",
    )
    token_endpoint = models.URLField(
        max_length=500,
        help_text="Where the proxy exchanges the upstream's authorization code for tokens, "
        "e.g. https://login.example.com/oauth2/v1/token.",
    )
    client_id = models.CharField(
        "upstream client ID",
        max_length=500,
        help_text="The client ID the upstream issued for this proxy (one, shared by all MCP clients).",
    )
    client_secret = EncryptedTextField(
        "upstream client secret",
        help_text="The client secret the upstream issued. Stored encrypted; it is never shown again. "
        "Not needed when the upstream auth method is 'none'.",
    )
    scopes = models.JSONField(
        default=list,
        blank=True,
        help_text="Upstream scopes to request, e.g. [\"openid\", \"email\", \"offline_access\"]. "
        "These are shown to the user on the consent page.",
    )
    token_endpoint_auth_methods_supported = models.JSONField(
        default=_default_auth_methods,
        blank=True,
        help_text="How the upstream wants the client secret sent, in order of preference: "
        "client_secret_basic (HTTP Basic header), client_secret_post (form body), or none. "
        "The proxy uses the first one it supports.",
    )
    revocation_endpoint = models.URLField(
        max_length=500, blank=True, help_text="Optional. Lets the proxy revoke upstream tokens too."
    )
    userinfo_endpoint = models.URLField(
        max_length=500,
        blank=True,
        help_text="Optional. Used to learn who logged in when the upstream returns no ID token.",
    )
    issuer = models.URLField(
        "upstream issuer",
        max_length=500,
        blank=True,
        help_text="Optional. The upstream's issuer URL; enables endpoint discovery and ID token checks.",
    )
    extra_authorize_params = models.JSONField(
        default=dict,
        blank=True,
        help_text="Extra parameters for the upstream authorization request, "
        "e.g. {\"audience\": \"https://api.example.com\", \"access_type\": \"offline\"}.",
    )
    use_pkce = models.BooleanField(
        "send PKCE upstream",
        default=True,
        help_text="Protect the upstream leg with PKCE (S256). Turn off only for upstreams that reject it.",
    )
    enabled = models.BooleanField(
        default=True, help_text="Disabled servers answer 404 on every URL and their tokens stop working."
    )
    access_token_lifetime = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Seconds a proxy access token lives. Empty: the deployment default (1 hour).",
    )
    refresh_token_lifetime = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Seconds an unused proxy refresh token lives. Empty: the deployment default (30 days).",
    )
    send_identity_headers = models.BooleanField(
        default=False,
        help_text="Send X-MCP-Subject and X-MCP-Client-Id to the internal MCP server.",
    )
    identity_assertion = models.BooleanField(
        default=False,
        help_text="Send X-Identity-Assertion with every forwarded request: a JWT signed by the proxy (ES256), "
        "valid for at most 60 seconds, with the user's sub, email, name and groups and the MCP client's ID. "
        "The internal server verifies it with the keys at /oauth/<slug>/jwks.json.",
    )
    forward_upstream_token = models.BooleanField(
        default=True,
        help_text="Send the user's upstream access token (Authorization: Bearer) to the internal MCP server. "
        "Turn off when the internal server relies on the identity assertion alone.",
    )
    # Shared-quota protection (DESIGN §1): the upstream's rate limits apply to the one shared client, so
    # each MCP client gets its own budget of upstream-touching operations (logins sent upstream, upstream
    # token refreshes). Empty: the deployment default (CLIENT_UPSTREAM_PER_MINUTE/_PER_DAY); 0: unlimited.
    client_upstream_rate_limit = models.PositiveIntegerField(
        "upstream operations per client per minute",
        null=True,
        blank=True,
        help_text="How many upstream logins and token refreshes one MCP client may cause per minute. "
        "Empty: the deployment default. 0: no limit.",
    )
    client_upstream_daily_quota = models.PositiveIntegerField(
        "upstream operations per client per day",
        null=True,
        blank=True,
        help_text="How many upstream logins and token refreshes one MCP client may cause per day (UTC). "
        "Empty: the deployment default. 0: no limit.",
    )
    # Who may use the server, and each tool (DESIGN §3, §4 "Access"; the rules: grants/access.py).
    access = models.JSONField(
        default=dict,
        blank=True,
        help_text="Who may use this server: {\"emails\": [...], \"email_domains\": [...], \"subjects\": [...], "
        "\"groups\": [...]}. A user matching any entry is admitted. Empty: anyone the upstream lets sign in.",
    )
    groups_claim = models.CharField(
        max_length=255,
        blank=True,
        help_text="The ID token / userinfo claim with the user's groups; a dotted path for nested claims "
        "(e.g. realm_access.roles). Empty: groups.",
    )
    tool_policy = models.JSONField(
        default=list,
        blank=True,
        help_text="Tool rules, e.g. [{\"tools\": [\"admin_*\"], \"groups\": [\"admins\"]}]: a tool matched by a "
        "rule is listed and callable only for users in one of its groups; other tools are open to every "
        "admitted user. Empty: every tool for everyone admitted.",
    )
    # Clients (issue 16): what happens to requested scopes this server does not offer, and who may connect.
    strict_scopes = models.BooleanField(
        default=False,
        help_text="Refuse authorization requests that ask for a scope this server does not offer "
        "(invalid_scope). Off: such scopes are dropped and the token's scope says what was granted "
        "(RFC 6749 §3.3); hosted clients such as claude.ai send scopes of their own.",
    )

    class ClientAdmission(models.TextChoices):
        ANY = "any", "Any client (registration and metadata documents open)"
        KNOWN = "known", "Known clients and pre-registered clients only"
        PREREGISTERED = "preregistered", "Pre-registered clients only"

    client_admission = models.CharField(
        "client admission",
        max_length=16,
        choices=ClientAdmission.choices,
        default=ClientAdmission.ANY,
        help_text="Which clients may register and connect. Known clients are the major MCP clients of the "
        "catalog shipped with the proxy (by metadata-document URL or redirect URI).",
    )
    # The origins (scheme://host:port) of this server's destinations as a superuser last saved them: they
    # pass the destination policy as they are (e.g. a loopback internal server). A save by anyone else keeps
    # only those its destinations still use (DESIGN §5.13).
    trusted_origins = models.JSONField(default=list, blank=True, editable=False)
    created = models.DateTimeField(auto_now_add=True)
    updated = models.DateTimeField(auto_now=True)

    objects = McpServerQuerySet.as_manager()

    class Meta:
        ordering = ["slug"]
        verbose_name = "MCP server"
        verbose_name_plural = "MCP servers"

    def __str__(self) -> str:
        return f"{self.name} ({self.slug})"

    # URLs (DESIGN §2). PUBLIC_BASE_URL is read at call time, never at import time.
    @property
    def issuer_url(self) -> str:
        return f"{settings.PUBLIC_BASE_URL}/oauth/{self.slug}"

    @property
    def resource_url(self) -> str:
        return f"{settings.PUBLIC_BASE_URL}/mcp/{self.slug}"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer_url}/jwks.json"

    @property
    def callback_url(self) -> str:
        return f"{self.issuer_url}/callback"

    @property
    def resource_metadata_url(self) -> str:
        return f"{settings.PUBLIC_BASE_URL}/.well-known/oauth-protected-resource/mcp/{self.slug}"

    @property
    def destination_urls(self) -> dict[str, str]:
        """The URLs this server sends requests to, by field (empty ones left out)."""
        return {name: getattr(self, name) for name in DESTINATION_FIELDS if getattr(self, name)}

    @property
    def upstream_auth_method(self) -> str:
        for method in self.token_endpoint_auth_methods_supported or _default_auth_methods():
            if method in AUTH_METHODS:
                return method
        return "client_secret_basic"

    @property
    def effective_access_token_lifetime(self) -> int:
        return self.access_token_lifetime or proxy_settings.ACCESS_TOKEN_LIFETIME

    @property
    def effective_refresh_token_lifetime(self) -> int:
        return self.refresh_token_lifetime or proxy_settings.REFRESH_TOKEN_LIFETIME

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}
        for field in ("authorization_endpoint", "token_endpoint", "revocation_endpoint", "userinfo_endpoint",
                      "issuer"):
            value = getattr(self, field)
            if value and not _is_acceptable_endpoint(value):
                errors.setdefault(field, []).append(
                    "Use an https:// URL (http:// is accepted only for localhost or when DEBUG is on)."
                )
        if self.mcp_url and urlsplit(self.mcp_url).scheme not in ("http", "https"):
            errors.setdefault("mcp_url", []).append("Use an http:// or https:// URL.")
        errors.update(_validate_str_list(self.scopes, "scopes", "scope"))
        methods = self.token_endpoint_auth_methods_supported
        method_errors = _validate_str_list(methods, "token_endpoint_auth_methods_supported", "auth method")
        if method_errors:
            errors.update(method_errors)
        else:
            unknown = [m for m in methods or [] if m not in AUTH_METHODS]
            if unknown:
                errors["token_endpoint_auth_methods_supported"] = [
                    f"Unknown method {', '.join(map(repr, unknown))}: use {', '.join(AUTH_METHODS)}."
                ]
        if not isinstance(self.extra_authorize_params, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in (self.extra_authorize_params or {}).items()
        ):
            errors["extra_authorize_params"] = ["Use an object of string names to string values."]
        elif reserved := sorted(set(self.extra_authorize_params) & RESERVED_AUTHORIZE_PARAMS):
            errors["extra_authorize_params"] = [
                f"{', '.join(reserved)} cannot be overridden: the proxy sets them itself."
            ]
        for field, problems in (
            ("access", access_policy_problems(self.access)),
            ("groups_claim", groups_claim_problems(self.groups_claim)),
            ("tool_policy", tool_policy_problems(self.tool_policy)),
        ):
            if problems:
                errors[field] = problems
        if (
            not errors.get("token_endpoint_auth_methods_supported")
            and self.upstream_auth_method != "none"
            and not self.client_secret
        ):
            errors["client_secret"] = [
                f"A client secret is required for {self.upstream_auth_method}; "
                "use the 'none' auth method for public upstream clients."
            ]
        if errors:
            raise ValidationError(errors)


# The fields naming where the proxy sends requests (the connection check probes the authorization endpoint).
DESTINATION_FIELDS = (
    "mcp_url", "authorization_endpoint", "token_endpoint", "revocation_endpoint", "userinfo_endpoint", "issuer",
)
# Those receiving the upstream client secret or users' tokens: changing their origin needs the secret.
CREDENTIAL_FIELDS = ("token_endpoint", "revocation_endpoint", "userinfo_endpoint", "issuer")

RESERVED_AUTHORIZE_PARAMS = frozenset(
    {"client_id", "redirect_uri", "response_type", "state", "code_challenge", "code_challenge_method", "scope"}
)


def _validate_str_list(value, field: str, noun: str) -> dict[str, list[str]]:
    if value in (None, ""):
        return {}
    if not isinstance(value, list) or not all(isinstance(v, str) and v and " " not in v for v in value):
        return {field: [f"Use a list of {noun}s, each a non-empty string without spaces."]}
    return {}


def _is_acceptable_endpoint(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    if parts.scheme == "http":
        return settings.DEBUG or parts.hostname in ("localhost", "127.0.0.1", "::1")
    return False
