"""Django admin: where platform admins and teams configure MCP servers (DESIGN §1)."""

from django.contrib import admin
from django.contrib.admin import widgets
from django.db import models
from django.utils.html import format_html

from .forms import McpServerForm
from .models import AccessToken, AuditEvent, Client, Grant, IDToken, McpServer, RefreshToken, UpstreamSession
from .selectors import servers_visible_to

# django-oauth-toolkit registers admin pages for its (here swapped) models. Clients get our own page
# below; raw tokens and codes are hashes, useless to an operator, who manages sessions instead.
for _model in (Client, AccessToken, RefreshToken, Grant, IDToken):
    if admin.site.is_registered(_model):
        admin.site.unregister(_model)

SHARED_CLIENT_NOTE = (
    "All users of this server reach the upstream through ONE shared OAuth client (the client ID and "
    "secret below). The upstream therefore cannot tell MCP clients apart: its per-client isolation and "
    "consent are lost, and its rate limits and quotas apply to all of them together. The proxy wins back "
    "what it can: every MCP client registers here, users approve each client on the proxy's consent page, "
    "and each client's tokens can be revoked on their own."
)


def _copyable(value: str):
    return format_html(
        '<code id="cb-{id}" style="user-select:all">{value}</code> '
        '<button type="button" class="button" '
        "onclick=\"navigator.clipboard.writeText(document.getElementById('cb-{id}').textContent);"
        "this.textContent='Copied';\">Copy</button>",
        id=abs(hash(value)) % 10**8,
        value=value,
    )


class TeamScopedAdmin(admin.ModelAdmin):
    """Staff who are not superusers see only objects of their teams' servers (DESIGN §5.11)."""

    server_path = "server"

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        if request.user.is_superuser:
            return queryset
        servers = servers_visible_to(user=request.user)
        return queryset.filter(**{f"{self.server_path}__in": servers})


@admin.register(McpServer)
class McpServerAdmin(TeamScopedAdmin):
    form = McpServerForm
    server_path = "pk"
    formfield_overrides = {
        models.URLField: {"widget": widgets.AdminURLFieldWidget, "assume_scheme": "https"},
    }
    list_display = ("slug", "name", "team", "enabled", "callback_url_display")
    list_filter = ("enabled", "team")
    search_fields = ("slug", "name")
    readonly_fields = ("callback_url_copy", "endpoints_display", "created", "updated")
    fieldsets = (
        (None, {"fields": ("slug", "name", "team", "enabled", "mcp_url")}),
        (
            "Upstream identity provider",
            {
                "description": SHARED_CLIENT_NOTE,
                "fields": (
                    "callback_url_copy",
                    "issuer",
                    "authorization_endpoint",
                    "token_endpoint",
                    "client_id",
                    "client_secret",
                    "token_endpoint_auth_methods_supported",
                    "scopes",
                    "use_pkce",
                    "extra_authorize_params",
                    "userinfo_endpoint",
                    "revocation_endpoint",
                ),
            },
        ),
        (
            "Tokens and gateway",
            {"fields": ("access_token_lifetime", "refresh_token_lifetime", "send_identity_headers")},
        ),
        ("What MCP clients see", {"fields": ("endpoints_display", "created", "updated")}),
    )

    @admin.display(description="Callback URL (whitelist at the upstream)")
    def callback_url_display(self, obj):
        return obj.callback_url

    @admin.display(description="Callback URL")
    def callback_url_copy(self, obj):
        if not obj.pk or not obj.slug:
            return "Shown once the server is saved: PUBLIC_BASE_URL/oauth/<slug>/callback"
        return format_html(
            "{}<div class='help'>Register this exact URL as the redirect URI of the upstream client.</div>",
            _copyable(obj.callback_url),
        )

    @admin.display(description="URLs")
    def endpoints_display(self, obj):
        if not obj.pk:
            return "-"
        return format_html(
            "MCP endpoint: <code>{}</code><br>Issuer: <code>{}</code><br>Protected resource metadata: "
            "<code>{}</code>",
            obj.resource_url,
            obj.issuer_url,
            obj.resource_metadata_url,
        )

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "team" and not request.user.is_superuser:
            kwargs["queryset"] = request.user.groups.all()
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        if not request.user.is_superuser and "team" in form.base_fields:
            form.base_fields["team"].required = True
            form.base_fields["team"].empty_label = None
        return form


@admin.register(Client)
class ClientAdmin(TeamScopedAdmin):
    list_display = ("name", "client_id", "server", "registration_source", "client_type", "disabled", "created",
                    "last_used")
    list_filter = ("server", "registration_source", "disabled")
    search_fields = ("name", "client_id")
    fields = ("name", "client_id", "server", "registration_source", "client_type", "redirect_uris",
              "token_endpoint_auth_method", "disabled", "created", "last_used")
    readonly_fields = ("client_id", "server", "registration_source", "client_type", "redirect_uris",
                       "token_endpoint_auth_method", "created", "last_used")

    def has_add_permission(self, request):
        return False  # clients register themselves (DCR or CIMD)


@admin.register(UpstreamSession)
class UpstreamSessionAdmin(TeamScopedAdmin):
    list_display = ("subject", "client", "server", "created", "last_used", "expires_at", "revoked_at")
    list_filter = ("server", "revoked_at")
    search_fields = ("subject",)
    fields = ("subject", "subject_source", "client", "server", "scope", "expires_at", "refresh_count",
              "refreshed_at", "created", "last_used", "revoked_at", "revoked_reason")
    readonly_fields = fields

    def has_add_permission(self, request):
        return False


@admin.register(AuditEvent)
class AuditEventAdmin(TeamScopedAdmin):
    list_display = ("created", "kind", "server", "client", "subject", "actor", "message")
    list_filter = ("kind", "server")
    search_fields = ("subject", "message")
    readonly_fields = ("created", "kind", "server", "client", "actor", "subject", "message", "detail")
    date_hierarchy = "created"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
