"""Django admin: where platform admins and teams configure MCP servers (DESIGN §1), and the operator's
console: discovery, connection check, "Try it" (a real upstream login by the admin), clients, sessions,
quotas and the audit log.

Staff who are not superusers see and change only their teams' objects; another team's object answers
404 exactly like a missing one (DESIGN §5.11). Every change goes through an audited service.
"""

from datetime import timedelta
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import widgets
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from django.http import Http404, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join
from knox.models import AuthToken

from oauthproxy.authserver.known_clients import client_known
from oauthproxy.authserver.registration import client_preregister
from oauthproxy.authserver.views.callback import try_it_cookie_set
from oauthproxy.console.access_check import server_access_check
from oauthproxy.console.clients import client_delete, client_update
from oauthproxy.console.forms import (
    AccessCheckForm,
    ClientPreregisterForm,
    IssuerForm,
    McpServerForm,
    RevokeForm,
    pretty_json,
)
from oauthproxy.console.management.commands.team_create import team_permissions
from oauthproxy.console.servers import destination_rule_audit, server_delete, server_save
from oauthproxy.core.audit import audit_record
from oauthproxy.core.destinations import server_destination_policy, user_destination_policy
from oauthproxy.core.exceptions import OAuthError
from oauthproxy.core.public_url import public_url_mismatch, request_origin
from oauthproxy.core.servers import servers_visible_to
from oauthproxy.grants.quotas import quota_usage, quota_usage_many
from oauthproxy.grants.revocation import sessions_revoke
from oauthproxy.grants.sessions import upstream_session_revoke
from oauthproxy.models import (
    AccessToken,
    ApiToken,
    AuditEvent,
    Client,
    DestinationRule,
    Grant,
    IDToken,
    McpServer,
    RefreshToken,
    Team,
    UpstreamSession,
)
from oauthproxy.upstream.check import server_connection_check
from oauthproxy.upstream.discovery import (
    DiscoveryError,
    discovery_default_fields,
    server_discovery_apply,
    upstream_discover,
)
from oauthproxy.upstream.try_it import TryItUnavailable, try_it_result_get, try_it_start

# django-oauth-toolkit registers admin pages for its (here swapped) models. Clients get our own page
# below; raw tokens and codes are hashes, useless to an operator, who manages sessions instead.
# knox registers its AuthToken, whose page lists everyone's tokens: each user manages their own as API tokens.
for _model in (Client, AccessToken, RefreshToken, Grant, IDToken, AuthToken):
    if admin.site.is_registered(_model):
        admin.site.unregister(_model)

SHARED_CLIENT_NOTE = (
    "All users of this server reach the upstream through ONE shared OAuth client (the client ID and "
    "secret below). The upstream therefore cannot tell MCP clients apart: its per-client isolation and "
    "consent are lost, and its rate limits and quotas apply to all of them together. The proxy wins back "
    "what it can: every MCP client registers here, users approve each client on the proxy's consent page, "
    "and each client's tokens can be revoked on their own."
)
QUOTA_NOTE = (
    "The upstream's rate limits apply to the one shared client, so each MCP client gets its own budget of "
    "upstream logins and token refreshes. A client over its budget gets HTTP 429 until the window ends; "
    "the others are unaffected. Counters are shown on each client's page."
)

ACCESS_NOTE = (
    "Who may use this server and each of its tools, from the user's email, subject and groups (in the ID "
    "token or userinfo). Checked at login, at each upstream token refresh and by the gateway on every "
    "request; a change reaches existing sessions within the gateway's cache lifetime. Use "
    "\"Who can use this?\" to check an account."
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


def _quota_text(usage) -> str:
    parts = []
    for window in usage:
        limit = window.limit or "∞"
        text = f"{window.used}/{limit} this {window.window}"
        if window.rejected:
            text += f" ({window.rejected} refused)"
        parts.append(text)
    return "; ".join(parts)


class TeamScopedAdmin(admin.ModelAdmin):
    """Staff who are not superusers see only objects of their teams' servers (DESIGN §5.11)."""

    server_path = "server"

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        if request.user.is_superuser:
            return queryset
        servers = servers_visible_to(user=request.user)
        return queryset.filter(**{f"{self.server_path}__in": servers})

    def _get_obj_does_not_exist_redirect(self, request, opts, object_id):
        # Django redirects to the index with "doesn't exist"; another team's object must be a plain 404.
        raise Http404(f"No {opts.verbose_name} with this ID.")

    def visible_object_or_404(self, request, object_id):
        obj = self.get_object(request, object_id)
        if obj is None:
            raise Http404(f"No {self.opts.verbose_name} with this ID.")
        return obj

    def has_revoke_permission(self, request, obj=None) -> bool:
        return request.user.has_perm("oauthproxy.change_upstreamsession")

    # What "delete" does, said on the delete pages and on the bulk action (None: a plain delete).
    delete_note: str | None = None
    delete_confirmation_template = "admin/oauthproxy/delete_confirmation.html"
    delete_selected_confirmation_template = "admin/oauthproxy/delete_selected_confirmation.html"

    def get_actions(self, request):
        actions = super().get_actions(request)
        if self.delete_note and "delete_selected" in actions:
            function, name, _ = actions["delete_selected"]

            def delete_selected(modeladmin, request, queryset):
                response = function(modeladmin, request, queryset)
                if isinstance(response, TemplateResponse):  # the confirmation page
                    response.context_data["delete_note"] = self.delete_note
                return response

            delete_selected.allowed_permissions = ("delete",)
            actions["delete_selected"] = (
                delete_selected, name, f"Delete the selected {self.opts.verbose_name_plural} (revokes them, "
                "upstream too)",
            )
        return actions

    def render_delete_form(self, request, context):
        context["delete_note"] = self.delete_note
        return super().render_delete_form(request, context)

    def render_page(self, request, template: str, context: dict, *, obj=None):
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": obj,
            "has_view_permission": self.has_view_permission(request, obj),
            **context,
        }
        return TemplateResponse(request, template, context)

    def revoke_confirmation(self, request, *, sessions, title: str, obj=None, done_url: str, action: str = ""):
        """Confirm, then revoke the active sessions of ``sessions`` (a team-scoped queryset)."""
        active = sessions.filter(revoked_at__isnull=True)
        form = RevokeForm(request.POST if request.POST.get("confirm") else None)
        if form.is_bound and form.is_valid():
            revoked = sessions_revoke(
                queryset_or_filters=active, actor=request.user,
                reason=form.cleaned_data["reason"] or f"{title} by {request.user.get_username()}",
            )
            self.message_user(request, f"Revoked {revoked} session(s).", messages.SUCCESS)
            return HttpResponseRedirect(done_url)
        return self.render_page(request, "admin/oauthproxy/revoke_confirm.html", {
            "title": title,
            "form": form,
            "count": active.count(),
            "subjects": active.values_list("subject", flat=True).distinct().order_by("subject")[:20],
            "selected": request.POST.getlist(admin.helpers.ACTION_CHECKBOX_NAME),
            "action": action,
            "cancel_url": done_url,
        }, obj=obj)


class ActiveSessionFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "active"

    def lookups(self, request, model_admin):
        return (("yes", "Active"), ("no", "Revoked"))

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(revoked_at__isnull=True)
        if self.value() == "no":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


# -- servers ---------------------------------------------------------------------------------------

@admin.register(McpServer)
class McpServerAdmin(TeamScopedAdmin):
    form = McpServerForm
    server_path = "pk"
    change_form_template = "admin/oauthproxy/mcpserver/change_form.html"
    formfield_overrides = {
        models.URLField: {"widget": widgets.AdminURLFieldWidget, "assume_scheme": "https"},
    }
    list_display = ("slug", "name", "team", "enabled", "callback_url_display")
    delete_note = ("Deleting a server revokes every session of it (its upstream tokens too, where the upstream "
                   "has a revocation endpoint) and deletes its clients.")
    list_filter = ("enabled", ("team", admin.RelatedOnlyFieldListFilter))
    search_fields = ("slug", "name")
    readonly_fields = ("callback_url_copy", "endpoints_display", "created", "updated")
    actions = ("check_connection", "revoke_all_sessions")
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
        (
            "Who may use this server",
            {"description": ACCESS_NOTE, "fields": ("access", "groups_claim", "tool_policy")},
        ),
        (
            "Identity for the internal server",
            {
                "description": "The gateway can tell the internal MCP server who is calling with a signed JWT "
                "(X-Identity-Assertion), verifiable with the keys at /oauth/<slug>/jwks.json; rotate them with "
                "manage.py rotate_identity_key.",
                "fields": ("identity_assertion", "forward_upstream_token"),
            },
        ),
        (
            "Shared-quota protection",
            {"description": QUOTA_NOTE, "fields": ("client_upstream_rate_limit", "client_upstream_daily_quota")},
        ),
        ("MCP clients", {"fields": ("client_admission", "strict_scopes")}),
        ("What MCP clients see", {"fields": ("endpoints_display", "created", "updated")}),
    )

    @admin.display(description="Callback URL (whitelist at the upstream)")
    def callback_url_display(self, obj):
        return obj.callback_url

    @admin.display(description="Callback URL")
    def callback_url_copy(self, obj):
        if not obj.pk or not obj.slug or obj._state.adding:
            return "Shown once the server is saved: PUBLIC_BASE_URL/oauth/<slug>/callback"
        return format_html(
            "{}<div class='help'>Register this exact URL as the redirect URI of the upstream client.</div>",
            _copyable(obj.callback_url),
        )

    @admin.display(description="URLs")
    def endpoints_display(self, obj):
        if not obj.pk or obj._state.adding:
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
        form = type(form.__name__, (form,), {"actor": request.user})  # the change rules depend on who saves
        if not request.user.is_superuser and "team" in form.base_fields:
            form.base_fields["team"].required = True
            form.base_fields["team"].empty_label = None
        return form

    def get_changeform_initial_data(self, request):
        """The add page accepts values in its query string (discovery fills them in)."""
        initial = super().get_changeform_initial_data(request)
        for name in ("scopes", "token_endpoint_auth_methods_supported"):
            if isinstance(initial.get(name), str):
                initial[name] = initial[name].split()
        if "use_pkce" in initial:
            initial["use_pkce"] = initial["use_pkce"] not in ("", "0", "false", "False")
        return initial

    # Every change is audited (who, which fields, never secret values).
    def save_model(self, request, obj, form, change):
        server_save(server=obj, actor=request.user)

    def delete_model(self, request, obj):
        server_delete(server=obj, actor=request.user)

    def delete_queryset(self, request, queryset):
        for server in queryset:
            server_delete(server=server, actor=request.user)

    def get_urls(self):
        wrap = self._server_page
        return [
            path("discover/", wrap(self.discover_view), name="oauthproxy_mcpserver_discover_new"),
            path("<path:object_id>/discover/", wrap(self.discover_view), name="oauthproxy_mcpserver_discover"),
            path("<path:object_id>/check/", wrap(self.check_view), name="oauthproxy_mcpserver_check"),
            path("<path:object_id>/try-it/<int:event_id>/", wrap(self.try_it_result_view),
                 name="oauthproxy_mcpserver_try_it_result"),
            path("<path:object_id>/try-it/", wrap(self.try_it_view), name="oauthproxy_mcpserver_try_it"),
            path("<path:object_id>/revoke-sessions/", wrap(self.revoke_sessions_view),
                 name="oauthproxy_mcpserver_revoke_sessions"),
            path("<path:object_id>/who-can-use/", wrap(self.who_can_use_view),
                 name="oauthproxy_mcpserver_who_can_use"),
        ] + super().get_urls()

    def _change_url(self, server) -> str:
        return reverse("admin:oauthproxy_mcpserver_change", args=[server.pk])

    # Every server page warns when it is browsed from a host other than PUBLIC_BASE_URL's.

    def _server_page(self, view):
        def page(request, *args, **kwargs):
            self._public_url_warn(request)
            return view(request, *args, **kwargs)

        return self.admin_site.admin_view(page)

    def _public_url_warn(self, request) -> None:
        if request.method == "GET" and (mismatch := public_url_mismatch(origin=request_origin(request))):
            self.message_user(request, mismatch, messages.WARNING)

    def changelist_view(self, request, extra_context=None):
        self._public_url_warn(request)
        return super().changelist_view(request, extra_context)

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        self._public_url_warn(request)
        return super().changeform_view(request, object_id, form_url, extra_context)

    def delete_view(self, request, object_id, extra_context=None):
        self._public_url_warn(request)
        return super().delete_view(request, object_id, extra_context)

    def history_view(self, request, object_id, extra_context=None):
        self._public_url_warn(request)
        return super().history_view(request, object_id, extra_context)

    def discover_view(self, request, object_id=None):
        server = self.visible_object_or_404(request, object_id) if object_id else None
        if server is not None and not self.has_change_permission(request, server):
            raise PermissionDenied
        if server is None and not self.has_add_permission(request):
            raise PermissionDenied
        initial = {"issuer": request.GET.get("issuer") or (server.issuer if server else "")}
        form = IssuerForm(request.POST or None, initial=initial)
        result, chosen = None, []
        if request.method == "POST" and form.is_valid():
            try:
                policy = (server_destination_policy(server=server) if server is not None
                          else user_destination_policy(user=request.user))
                result = upstream_discover(issuer=form.cleaned_data["issuer"], policy=policy)
            except DiscoveryError as exc:
                form.add_error("issuer", exc.reason)
        if result is not None and request.POST.get("apply"):
            chosen = [name for name in request.POST.getlist("fields") if name in result.values]
            if server is None:
                query = {name: _as_query_value(result.values[name]) for name in chosen}
                return HttpResponseRedirect(reverse("admin:oauthproxy_mcpserver_add") + "?" + urlencode(query))
            try:
                changed = server_discovery_apply(server=server, result=result, actor=request.user, fields=chosen)
            except DjangoValidationError as exc:
                for field, errors in exc.message_dict.items():
                    self.message_user(request, f"{field}: {' '.join(errors)}", messages.ERROR)
                server.refresh_from_db()
            else:
                self.message_user(
                    request,
                    f"Discovery applied: {', '.join(changed)} changed." if changed else "Nothing to change.",
                    messages.SUCCESS,
                )
                return HttpResponseRedirect(self._change_url(server))
        rows = []
        if result is not None:
            defaults = set(discovery_default_fields(server=server, result=result))
            for name, value in result.values.items():
                current = getattr(server, name) if server is not None else None
                rows.append({
                    "name": name,
                    "found": _display(value),
                    "current": _display(current) if server is not None else "",
                    "differs": server is None or current != value,
                    "checked": name in defaults,
                })
        return self.render_page(request, "admin/oauthproxy/mcpserver/discover.html", {
            "title": f"Discover from issuer: {server}" if server else "Discover a new server from its issuer",
            "form": form,
            "result": result,
            "rows": rows,
            "server": server,
        }, obj=server)

    def check_view(self, request, object_id):
        server = self.visible_object_or_404(request, object_id)
        if not self.has_change_permission(request, server):
            raise PermissionDenied
        checks = [server_connection_check(server=server, request_origin=request_origin(request))
                  ] if request.method == "POST" else []
        return self.render_page(request, "admin/oauthproxy/mcpserver/check.html", {
            "title": f"Connection check: {server}",
            "checks": checks,
            "server": server,
        }, obj=server)

    def try_it_view(self, request, object_id):
        """GET: what the test does; POST: start it (the browser goes to the upstream's login page)."""
        server = self.visible_object_or_404(request, object_id)
        if not self.has_change_permission(request, server):
            raise PermissionDenied
        if request.method == "POST":
            try:
                start = try_it_start(server=server, actor=request.user)
            except TryItUnavailable as exc:
                self.message_user(request, exc.reason, messages.ERROR)
            else:
                response = HttpResponseRedirect(start.url)
                try_it_cookie_set(response, request, server=server, key=start.browser_key)
                return response
        return self.render_page(request, "admin/oauthproxy/mcpserver/try_it.html", {
            "title": f"Try it: {server}",
            "server": server,
        }, obj=server)

    def try_it_result_view(self, request, object_id, event_id):
        server = self.visible_object_or_404(request, object_id)
        if not self.has_change_permission(request, server):
            raise PermissionDenied
        result = try_it_result_get(server=server, event_id=event_id, user=request.user)
        if result is None:
            raise Http404("No such test of this server.")
        return self.render_page(request, "admin/oauthproxy/mcpserver/try_it.html", {
            "title": f"Try it: {server}",
            "server": server,
            "result": result,
        }, obj=server)

    def who_can_use_view(self, request, object_id):
        """ "Who can use this?": the server's and each tool's decision for an email, a subject and groups."""
        server = self.visible_object_or_404(request, object_id)
        form = AccessCheckForm(request.GET or None)
        result = None
        if form.is_valid():
            result = server_access_check(
                server=server,
                email=form.cleaned_data["email"],
                subject=form.cleaned_data["subject"],
                groups=form.cleaned_data["groups"],
            )
        return self.render_page(request, "admin/oauthproxy/mcpserver/who_can_use.html", {
            "title": f"Who can use this? {server}",
            "server": server,
            "form": form,
            "result": result,
            "access": pretty_json(server.access or {}),
            "tool_policy": pretty_json(server.tool_policy or []),
        }, obj=server)

    def revoke_sessions_view(self, request, object_id):
        server = self.visible_object_or_404(request, object_id)
        if not self.has_revoke_permission(request, server):
            raise PermissionDenied
        return self.revoke_confirmation(
            request, sessions=UpstreamSession.objects.filter(server=server),
            title=f"Revoke all sessions of {server}", obj=server, done_url=self._change_url(server),
        )

    @admin.action(description="Check connection to the upstream", permissions=["change"])
    def check_connection(self, request, queryset):
        return self.render_page(request, "admin/oauthproxy/mcpserver/check.html", {
            "title": "Connection check",
            "checks": [server_connection_check(server=server, request_origin=request_origin(request))
                       for server in queryset[:20]],
        })

    @admin.action(description="Revoke all sessions of the selected servers", permissions=["revoke"])
    def revoke_all_sessions(self, request, queryset):
        return self.revoke_confirmation(
            request, sessions=UpstreamSession.objects.filter(server__in=queryset),
            title="Revoke all sessions of the selected servers", done_url=request.get_full_path(),
            action="revoke_all_sessions",
        )


def _as_query_value(value) -> str:
    if isinstance(value, list):
        return " ".join(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _display(value) -> str:
    if value in (None, "", [], {}):
        return "—"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


# -- clients ---------------------------------------------------------------------------------------

@admin.register(Client)
class ClientAdmin(TeamScopedAdmin):
    change_form_template = "admin/oauthproxy/client/change_form.html"
    # The columns that matter fit a 1280 px screen; the client ID (a long URL for CIMD) is on the page.
    list_display = ("name", "server", "registration_source", "disabled", "last_used", "upstream_quota")
    view_on_site = False  # a client has no page of its own outside the admin
    delete_note = ("Deleting a client first revokes all its sessions: its proxy tokens at once, its upstream "
                   "tokens at the upstream (where it has a revocation endpoint). The application must "
                   "register again to connect.")
    list_display = ("name", "client_id", "server", "registration_source", "known_display", "disabled", "created",
                    "last_used", "upstream_quota")
    list_filter = (("server", admin.RelatedOnlyFieldListFilter), "registration_source", "disabled")
    search_fields = ("name", "client_id")
    fields = ("name", "client_id", "server", "registration_source", "known_display", "verified_domain",
              "client_type", "redirect_uris_display", "token_endpoint_auth_method", "disabled", "created",
              "last_used", "sessions_display", "quota_display")
    readonly_fields = ("client_id", "server", "registration_source", "known_display", "verified_domain",
                       "client_type", "redirect_uris_display", "token_endpoint_auth_method", "created",
                       "last_used", "sessions_display", "quota_display")
    actions = ("disable_clients", "enable_clients", "revoke_client_sessions")

    def has_add_permission(self, request):
        # Clients register themselves (DCR or CIMD); "add" pre-registers one (client_preregister).
        return request.user.has_perm("oauthproxy.add_client")

    def add_view(self, request, form_url="", extra_context=None):
        """Pre-register a client: a plain form, then the client ID and secret shown this once."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = ClientPreregisterForm(request.POST or None, servers=servers_visible_to(user=request.user))
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                registration = client_preregister(
                    server=data["server"], name=data["name"], redirect_uris=data["redirect_uris"],
                    confidential=data["confidential"], actor=request.user,
                )
            except OAuthError as exc:
                form.add_error("redirect_uris", exc.description)
            else:
                response = self.render_page(request, "admin/oauthproxy/client/preregister.html", {
                    "title": f"Client {registration.client.name} pre-registered", "registration": registration,
                }, obj=registration.client)
                response["Cache-Control"] = "no-store"
                return response
        return self.render_page(request, "admin/oauthproxy/client/preregister.html", {
            "title": "Pre-register a client", "form": form,
        })

    @admin.display(description="Known client")
    def known_display(self, obj):
        if obj.registration_source == Client.RegistrationSource.MANUAL:
            return "pre-registered"
        match = client_known(obj)
        return match.label if match else "—"

    def get_changelist_instance(self, request):
        changelist = super().get_changelist_instance(request)
        usage = quota_usage_many(clients=list(changelist.result_list))
        for client in changelist.result_list:
            client.quota_usage = usage[client.pk]
        return changelist

    @admin.display(description="Upstream operations")
    def upstream_quota(self, obj):
        usage = getattr(obj, "quota_usage", None) or quota_usage(client=obj)
        return _quota_text(usage)

    @admin.display(description="Redirect URIs")
    def redirect_uris_display(self, obj):
        return format_html_join("", "<code>{}</code><br>", ((uri,) for uri in obj.redirect_uris.split())) or "—"

    @admin.display(description="Verified domain")
    def verified_domain(self, obj):
        return obj.verified_domain or "— (registered dynamically; its name is self-asserted)"

    @admin.display(description="Sessions")
    def sessions_display(self, obj):
        active = obj.sessions.filter(revoked_at__isnull=True).count()
        url = reverse("admin:oauthproxy_upstreamsession_changelist") + f"?client__id__exact={obj.pk}&active=yes"
        return format_html('<a href="{}">{} active</a>', url, active)

    @admin.display(description="Upstream quota (this client)")
    def quota_display(self, obj):
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} s</td></tr>",
            (
                (f"this {w.window}", w.used, w.limit or "unlimited", w.rejected,
                 ", ".join(f"{op} {n}" for op, n in w.by_operation.items()), w.resets_in)
                for w in quota_usage(client=obj)
            ),
        )
        return format_html(
            "<table><thead><tr><th>window</th><th>used</th><th>limit</th><th>refused</th><th>by operation</th>"
            "<th>resets in</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    def save_model(self, request, obj, form, change):
        # The form already set the new values on obj; the service compares them with the stored row.
        stored = Client.objects.select_related("server").get(pk=obj.pk)
        client_update(client=stored, actor=request.user, name=obj.name, disabled=obj.disabled)

    def delete_model(self, request, obj):
        client_delete(client=obj, actor=request.user)

    def delete_queryset(self, request, queryset):
        for client in queryset.select_related("server"):
            client_delete(client=client, actor=request.user)

    @admin.action(description="Disable the selected clients", permissions=["change"])
    def disable_clients(self, request, queryset):
        changed = sum(bool(client_update(client=c, actor=request.user, disabled=True)) for c in queryset)
        self.message_user(request, f"Disabled {changed} client(s).", messages.SUCCESS)

    @admin.action(description="Enable the selected clients", permissions=["change"])
    def enable_clients(self, request, queryset):
        changed = sum(bool(client_update(client=c, actor=request.user, disabled=False)) for c in queryset)
        self.message_user(request, f"Enabled {changed} client(s).", messages.SUCCESS)

    @admin.action(description="Revoke all sessions of the selected clients", permissions=["revoke"])
    def revoke_client_sessions(self, request, queryset):
        return self.revoke_confirmation(
            request, sessions=UpstreamSession.objects.filter(client__in=queryset),
            title="Revoke all sessions of the selected clients", done_url=request.get_full_path(),
            action="revoke_client_sessions",
        )

    def get_urls(self):
        return [
            path("<path:object_id>/revoke-sessions/", self.admin_site.admin_view(self.revoke_sessions_view),
                 name="oauthproxy_client_revoke_sessions"),
        ] + super().get_urls()

    def revoke_sessions_view(self, request, object_id):
        client = self.visible_object_or_404(request, object_id)
        if not self.has_revoke_permission(request, client):
            raise PermissionDenied
        return self.revoke_confirmation(
            request, sessions=UpstreamSession.objects.filter(client=client),
            title=f"Revoke all sessions of client {client}", obj=client,
            done_url=reverse("admin:oauthproxy_client_change", args=[client.pk]),
        )


# -- sessions --------------------------------------------------------------------------------------

@admin.register(UpstreamSession)
class UpstreamSessionAdmin(TeamScopedAdmin):
    change_form_template = "admin/oauthproxy/upstreamsession/change_form.html"
    list_display = ("subject", "client", "server", "last_used", "active")
    delete_note = ("Deleting a session first revokes it: its proxy tokens at once, its upstream tokens at the "
                   "upstream (where it has a revocation endpoint). Revoking keeps the row for the record.")
    list_filter = (ActiveSessionFilter, ("server", admin.RelatedOnlyFieldListFilter),
                   ("client", admin.RelatedOnlyFieldListFilter))
    search_fields = ("subject", "client__client_id", "client__name")
    list_select_related = ("client", "server")
    fields = ("subject", "subject_source", "client", "server", "scope", "expires_at", "refresh_count",
              "refreshed_at", "created", "last_used", "revoked_at", "revoked_reason")
    readonly_fields = fields
    actions = ("revoke_sessions", "revoke_subjects")

    def has_add_permission(self, request):
        return False

    def change_view(self, request, object_id, form_url="", extra_context=None):
        # Every field is read-only: no Save buttons (revoking has its own button).
        extra_context = {**(extra_context or {}), "show_save": False, "show_save_and_continue": False,
                         "show_save_and_add_another": False}
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.display(boolean=True, description="Active")
    def active(self, obj):
        return obj.is_active

    def lookup_allowed(self, lookup, value, request):
        return lookup in ("subject", "subject__exact") or super().lookup_allowed(lookup, value, request)

    def delete_model(self, request, obj):
        upstream_session_revoke(session=obj, reason="deleted by an operator", actor=request.user)
        obj.delete()

    def delete_queryset(self, request, queryset):
        sessions_revoke(queryset_or_filters=queryset, actor=request.user, reason="deleted by an operator")
        queryset.delete()

    @admin.action(description="Revoke the selected sessions", permissions=["revoke"])
    def revoke_sessions(self, request, queryset):
        return self.revoke_confirmation(
            request, sessions=queryset, title="Revoke the selected sessions", done_url=request.get_full_path(),
            action="revoke_sessions",
        )

    @admin.action(description="Revoke every session of the selected sessions' users", permissions=["revoke"])
    def revoke_subjects(self, request, queryset):
        subjects = queryset.values_list("subject", flat=True).distinct()
        return self.revoke_confirmation(
            request, sessions=self.get_queryset(request).filter(subject__in=list(subjects)),
            title="Revoke all sessions of the selected users", done_url=request.get_full_path(),
            action="revoke_subjects",
        )

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("<path:object_id>/revoke/", wrap(self.revoke_view), name="oauthproxy_upstreamsession_revoke"),
            path("<path:object_id>/revoke-subject/", wrap(self.revoke_subject_view),
                 name="oauthproxy_upstreamsession_revoke_subject"),
        ] + super().get_urls()

    def revoke_view(self, request, object_id):
        session = self.visible_object_or_404(request, object_id)
        if not self.has_revoke_permission(request, session):
            raise PermissionDenied
        return self.revoke_confirmation(
            request, sessions=UpstreamSession.objects.filter(pk=session.pk), title=f"Revoke session {session}",
            obj=session, done_url=reverse("admin:oauthproxy_upstreamsession_change", args=[session.pk]),
        )

    def revoke_subject_view(self, request, object_id):
        session = self.visible_object_or_404(request, object_id)
        if not self.has_revoke_permission(request, session):
            raise PermissionDenied
        return self.revoke_confirmation(
            request, sessions=self.get_queryset(request).filter(subject=session.subject),
            title=f"Revoke all sessions of {session.subject}", obj=session,
            done_url=reverse("admin:oauthproxy_upstreamsession_change", args=[session.pk]),
        )


# -- audit -----------------------------------------------------------------------------------------

@admin.register(AuditEvent)
class AuditEventAdmin(TeamScopedAdmin):
    list_display = ("created", "kind", "server", "client", "subject", "actor", "message")
    list_filter = ("kind", ("server", admin.RelatedOnlyFieldListFilter), ("actor", admin.RelatedOnlyFieldListFilter),
                   "created")
    list_select_related = ("server", "client", "actor")
    search_fields = ("subject", "message", "client__client_id")
    fields = ("created", "kind", "server", "client", "actor", "subject", "message", "detail_display")
    readonly_fields = fields
    date_hierarchy = "created"

    @admin.display(description="Detail")
    def detail_display(self, obj):
        return format_html("<pre>{}</pre>", pretty_json(obj.detail))

    def lookup_allowed(self, lookup, value, request):
        return lookup in ("client__id__exact", "subject") or super().lookup_allowed(lookup, value, request)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


# -- teams -----------------------------------------------------------------------------------------

class TeamForm(forms.ModelForm):
    members = forms.ModelMultipleChoiceField(
        queryset=get_user_model().objects.order_by("username"),
        required=False,
        widget=widgets.FilteredSelectMultiple("members", is_stacked=False),
        help_text="Members become staff users: they log in at this admin and see and change only this team's "
        "servers, and those servers' clients, sessions and audit events.",
    )

    class Meta:
        model = Team
        fields = ("name",)
        help_texts = {"name": "Shown in the 'team' field of a server."}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["members"].initial = self.instance.user_set.all()


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    """Teams are Django groups with the permissions `manage.py team_create` gives (one list of them)."""

    form = TeamForm
    list_display = ("name", "member_list", "server_count")
    search_fields = ("name", "user__username")

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(servers=models.Count("mcp_servers", distinct=True))

    @admin.display(description="Members")
    def member_list(self, obj):
        return ", ".join(obj.user_set.order_by("username").values_list("username", flat=True)) or "—"

    @admin.display(description="Servers", ordering="servers")
    def server_count(self, obj):
        return obj.servers

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        team, members = form.instance, list(form.cleaned_data["members"])
        team.permissions.add(*team_permissions())
        team.user_set.set(members)
        for user in members:
            if not user.is_staff:
                user.is_staff = True
                user.save(update_fields=["is_staff"])


if admin.site.is_registered(Group):
    admin.site.unregister(Group)  # a team is the one kind of group here; edit them as teams


# -- API tokens --------------------------------------------------------------------------------------

class ApiTokenForm(forms.Form):
    expires_in_days = forms.IntegerField(
        min_value=1, max_value=365, initial=90,
        help_text="The token stops working after this many days. Revoke it here at any time.",
    )


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Each user's own management API tokens: created here (the token is shown once), revoked by
    deleting. Only a digest is stored. Superusers also see, and may revoke, everyone's."""

    list_display = ("token_id", "user", "created", "expiry")
    fields = ("token_id", "user", "created", "expiry")
    readonly_fields = fields
    ordering = ("-created",)
    add_form_template = "admin/oauthproxy/apitoken/add_form.html"
    delete_confirmation_template = "admin/oauthproxy/apitoken/delete_confirmation.html"

    def get_queryset(self, request):
        queryset = super().get_queryset(request).select_related("user")
        return queryset if request.user.is_superuser else queryset.filter(user=request.user)

    # Every staff user manages their own tokens, whatever their model permissions.
    def has_module_permission(self, request):
        return request.user.is_active and request.user.is_staff

    def has_view_permission(self, request, obj=None):
        return self.has_module_permission(request) and (obj is None or self._own(request, obj))

    def has_add_permission(self, request):
        return self.has_module_permission(request)

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return self.has_view_permission(request, obj)

    @admin.display(description="Token ID")
    def token_id(self, obj):
        return obj.digest[:12]  # the stored digest, never the token

    @staticmethod
    def _own(request, obj) -> bool:
        return request.user.is_superuser or obj.user_id == request.user.pk

    def get_actions(self, request):
        actions = super().get_actions(request)
        if "delete_selected" in actions:
            function, name, _ = actions["delete_selected"]
            actions["delete_selected"] = (function, name, "Revoke the selected API tokens")
        return actions

    def add_view(self, request, form_url="", extra_context=None):
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = ApiTokenForm(request.POST or None)
        token = None
        if request.method == "POST" and form.is_valid():
            instance, token = ApiToken.objects.create(
                user=request.user, expiry=timedelta(days=form.cleaned_data["expires_in_days"])
            )
            audit_record(kind=AuditEvent.Kind.ADMIN_CHANGE, actor=request.user,
                         message=f"API token {instance.digest[:12]} created in the admin")
        response = TemplateResponse(request, self.add_form_template, {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Your new API token" if token else "Create an API token",
            "form": form,
            "token": token,
            "api_docs_url": reverse("api-docs"),
        })
        response["Cache-Control"] = "no-store"
        return response


@admin.register(DestinationRule)
class DestinationRuleAdmin(admin.ModelAdmin):
    """The outbound destination policy (DESIGN §5.13): platform admins (superusers) only."""

    list_display = ("pattern", "team", "note", "created")
    list_filter = ("team",)
    search_fields = ("pattern", "note")

    def has_module_permission(self, request):
        return request.user.is_active and request.user.is_superuser

    def has_view_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_superuser

    has_add_permission = has_change_permission = has_delete_permission = has_view_permission

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        destination_rule_audit(rule=obj, actor=request.user, action="changed" if change else "created")

    def delete_model(self, request, obj):
        destination_rule_audit(rule=obj, actor=request.user, action="deleted")
        super().delete_model(request, obj)
