"""The management API (``/api/v1/``): servers, registered clients, sessions, audit events, API tokens.

Each ViewSet method parses its input with a nested serializer, calls one service and serializes the
result. Staff who are not superusers see their own teams' objects only: querysets are scoped with
``servers_visible_to``, so another team's object answers 404, exactly like one that does not exist
(DESIGN §5.11). Secrets are write-only; tokens are never returned.
"""

from datetime import UTC, timedelta

from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError
from django.db.models import Count, Q
from django_filters import rest_framework as filters
from django_filters.fields import IsoDateTimeField
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import extend_schema, extend_schema_field, extend_schema_view
from knox.models import AuthToken
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.authentication import SessionAuthentication
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.exceptions import ValidationError as ApiValidationError
from rest_framework.filters import OrderingFilter
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.response import Response

from oauthproxy.authserver.known_clients import client_known
from oauthproxy.authserver.registration import client_preregister
from oauthproxy.console.clients import client_delete, client_update
from oauthproxy.console.documents import DOCUMENT_FIELDS, ServerDocumentSerializer
from oauthproxy.console.servers import destination_rule_audit, server_delete, server_save
from oauthproxy.core.destinations import server_destination_policy, user_destination_policy
from oauthproxy.core.exceptions import OAuthError
from oauthproxy.core.http import DestinationPattern
from oauthproxy.core.public_url import request_origin
from oauthproxy.core.servers import servers_visible_to
from oauthproxy.grants.quotas import quota_usage_many
from oauthproxy.grants.revocation import sessions_revoke
from oauthproxy.grants.sessions import upstream_session_revoke
from oauthproxy.models import AuditEvent, Client, DestinationRule, McpServer, UpstreamSession
from oauthproxy.upstream.check import server_connection_check
from oauthproxy.upstream.discovery import (
    DiscoveryError,
    server_discovery_apply,
    upstream_discover,
)

QUOTA_FIELDS = ("client_upstream_rate_limit", "client_upstream_daily_quota")
DISCOVERABLE_FIELDS = (
    "issuer", "authorization_endpoint", "token_endpoint", "revocation_endpoint", "userinfo_endpoint",
    "token_endpoint_auth_methods_supported", "use_pkce", "scopes",
)
MAX_OFFSET = 10**9


class UtcIsoDateTimeField(IsoDateTimeField):
    """An ISO 8601 date-time, normalised to UTC: PostgreSQL refuses offsets Python accepts (up to 24 h)."""

    def to_python(self, value):
        value = super().to_python(value)
        if value is None:
            return None
        try:
            return value.astimezone(UTC)
        except (OverflowError, ValueError):
            raise DjangoValidationError("Enter a date-time between the years 1 and 9999.", code="invalid")


class UtcIsoDateTimeFilter(filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField


def schema_management_endpoints_only(endpoints):
    """drf-spectacular preprocessing hook: the OpenAPI document describes the management API only."""
    return [endpoint for endpoint in endpoints if endpoint[0].startswith("/api/v1/")]


# -- policy ----------------------------------------------------------------------------------------

class StaffWithModelPermission(permissions.BasePermission):
    """Active staff only; each action needs the model permission the view names for it (superusers have
    all). Object access is decided by the team-scoped queryset, which answers 404, not here."""

    message = "You need staff access and the permission for this action."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and user.is_active and user.is_staff):
            return False
        if view.action is None:
            return True  # a method this endpoint does not have: DRF answers 405
        if view.action not in view.action_permissions:
            return False
        needed = view.action_permissions[view.action]
        return needed is None or user.has_perm(f"oauthproxy.{needed}")


class ManagementPagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 500

    def get_offset(self, request) -> int:
        return min(super().get_offset(request), MAX_OFFSET)


class ErrorDetail(serializers.Serializer):
    detail = serializers.CharField()


class ManagementSchema(AutoSchema):
    """Documents the errors every operation can answer, so clients (and schema tests) can rely on them."""

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        detail = self._get_response_for_code(ErrorDetail, "401", direction=direction)
        free_form = {
            "description": "Invalid input: the offending fields with their messages.",
            "content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}},
        }
        if self.method in ("POST", "PUT", "PATCH") or self._is_list_view():
            responses.setdefault("400", free_form)
        responses.setdefault("401", {**detail, "description": "Not authenticated."})
        responses.setdefault("403", {**detail, "description": "Not staff, or missing the permission."})
        if "{" in self.path:
            responses.setdefault("404", {**detail, "description": "No such object among your teams' objects."})
        return responses


class ManagementViewSet(viewsets.GenericViewSet):
    permission_classes = [StaffWithModelPermission]
    pagination_class = ManagementPagination
    filter_backends = [filters.DjangoFilterBackend, OrderingFilter]
    schema = ManagementSchema()
    action_permissions: dict[str, str | None] = {}

    def visible_servers(self):
        return servers_visible_to(user=self.request.user)

    def paginated(self, queryset, **context):
        page = self.paginate_queryset(self.filter_queryset(queryset))
        serializer = self.get_serializer(page, many=True, context={**self.get_serializer_context(), **context})
        return self.get_paginated_response(serializer.data)


# -- servers ---------------------------------------------------------------------------------------

class ServerDocument(ServerDocumentSerializer):
    """A server's configuration document (DESIGN §3) with its per-client quota limits. ``client_secret``
    is write-only; ``has_client_secret`` says whether one is stored."""

    id = serializers.UUIDField(read_only=True)
    has_client_secret = serializers.SerializerMethodField()
    callback_url = serializers.CharField(read_only=True, help_text="Whitelist this at the upstream.")
    issuer_url = serializers.CharField(read_only=True)
    resource_url = serializers.CharField(read_only=True)
    resource_metadata_url = serializers.CharField(read_only=True)

    class Meta(ServerDocumentSerializer.Meta):
        fields = ("id", *DOCUMENT_FIELDS, *QUOTA_FIELDS, "has_client_secret", "callback_url", "issuer_url",
                  "resource_url", "resource_metadata_url", "created", "updated")
        read_only_fields = ("created", "updated")

    def get_has_client_secret(self, server) -> bool:
        return bool(server.client_secret)

    def get_fields(self):
        fields = super().get_fields()
        request = self.context.get("request")
        if request is not None and not request.user.is_superuser:
            fields["team"].queryset = request.user.groups.all()  # other teams read as "does not exist"
        return fields

    def validate_extra_authorize_params(self, value: dict) -> dict:
        # DictField checks the values only; PostgreSQL's jsonb refuses NUL and lone surrogates in keys too.
        for key in value:
            if "\x00" in key or any("\ud800" <= char <= "\udfff" for char in key):
                raise serializers.ValidationError("Parameter names cannot contain NUL or surrogate characters.")
        return value

    def validate_slug(self, value: str) -> str:
        taken = McpServer.objects.filter(slug=value)
        if self.instance is not None:
            taken = taken.exclude(pk=self.instance.pk)
        if taken.exists():
            raise serializers.ValidationError("A server with this slug already exists.")
        return value

    def validate(self, attrs):
        request = self.context.get("request")
        if request is not None and not request.user.is_superuser:
            if self.instance is None and "team" not in attrs:
                teams = list(request.user.groups.all()[:2])
                if len(teams) != 1:
                    raise serializers.ValidationError({"team": ["Choose which of your teams owns the server."]})
                attrs["team"] = teams[0]
            if "team" in attrs and attrs["team"] is None:
                raise serializers.ValidationError({"team": ["A server must belong to one of your teams."]})
        return super().validate(attrs)


class ServerFilter(filters.FilterSet):
    team = filters.CharFilter(field_name="team__name")

    class Meta:
        model = McpServer
        fields = ["team", "enabled"]


class CheckResultOutput(serializers.Serializer):
    name = serializers.CharField()
    status = serializers.ChoiceField(choices=["ok", "warning", "error", "skipped", "info"])
    detail = serializers.CharField()


class ConnectionCheckOutput(serializers.Serializer):
    ok = serializers.BooleanField(help_text="False when any check found a problem.")
    summary = serializers.CharField()
    callback_url = serializers.CharField(help_text="The redirect URI to whitelist at the upstream.")
    results = CheckResultOutput(many=True)


class DiscoveredValues(serializers.Serializer):
    issuer = serializers.CharField(required=False)
    authorization_endpoint = serializers.CharField(required=False)
    token_endpoint = serializers.CharField(required=False)
    revocation_endpoint = serializers.CharField(required=False)
    userinfo_endpoint = serializers.CharField(required=False)
    token_endpoint_auth_methods_supported = serializers.ListField(child=serializers.CharField(), required=False)
    use_pkce = serializers.BooleanField(required=False)
    scopes = serializers.ListField(child=serializers.CharField(), required=False)


class DiscoveryOutput(serializers.Serializer):
    issuer = serializers.CharField()
    metadata_url = serializers.CharField()
    values = DiscoveredValues(help_text="Server fields filled from the metadata.")
    notes = serializers.ListField(child=serializers.CharField())
    scopes_supported = serializers.ListField(child=serializers.CharField())
    auth_methods_supported = serializers.ListField(child=serializers.CharField())
    code_challenge_methods_supported = serializers.ListField(child=serializers.CharField(), allow_null=True)
    grant_types_supported = serializers.ListField(child=serializers.CharField(), allow_null=True)


class DiscoveryInput(serializers.Serializer):
    issuer = serializers.URLField(max_length=500)


class ServerDiscoveryInput(serializers.Serializer):
    issuer = serializers.URLField(max_length=500, required=False, help_text="Default: the server's issuer.")
    apply = serializers.BooleanField(default=False, help_text="Save the found values to the server.")
    fields = serializers.ListField(
        child=serializers.ChoiceField(choices=DISCOVERABLE_FIELDS),
        required=False,
        help_text="Which found values to apply. Default: all, except scopes when the server has some.",
    )


class ServerDiscoveryOutput(serializers.Serializer):
    discovery = DiscoveryOutput()
    applied = serializers.ListField(child=serializers.CharField(), help_text="Fields that changed.")
    server = ServerDocument()


class RevokedOutput(serializers.Serializer):
    revoked = serializers.IntegerField(help_text="How many sessions were revoked.")


class ReasonInput(serializers.Serializer):
    reason = serializers.CharField(max_length=200, required=False, allow_blank=True)


def _discover(issuer: str, *, policy):
    try:
        return upstream_discover(issuer=issuer, policy=policy)
    except DiscoveryError as exc:
        raise ApiValidationError({"issuer": [exc.reason]})


@extend_schema_view(
    list=extend_schema(summary="List your teams' MCP servers"),
    retrieve=extend_schema(summary="A server's configuration document"),
    create=extend_schema(summary="Create a server"),
    update=extend_schema(summary="Replace a server's configuration"),
    partial_update=extend_schema(summary="Change some of a server's fields"),
    destroy=extend_schema(summary="Delete a server, revoking its sessions (upstream too)"),
)
class ServerViewSet(ManagementViewSet):
    serializer_class = ServerDocument
    lookup_field = "slug"
    lookup_value_regex = "[^/]+"
    filterset_class = ServerFilter
    ordering_fields = ["slug", "name", "created", "updated"]
    ordering = ["slug"]
    action_permissions = {
        "list": "view_mcpserver", "retrieve": "view_mcpserver", "create": "add_mcpserver",
        "update": "change_mcpserver", "partial_update": "change_mcpserver", "destroy": "delete_mcpserver",
        "discover": "change_mcpserver", "check": "change_mcpserver", "revoke_sessions": "change_upstreamsession",
        "metadata": None,
    }

    def get_queryset(self):
        return self.visible_servers().select_related("team")

    def list(self, request):
        return self.paginated(self.get_queryset())

    def retrieve(self, request, slug=None):
        return Response(self.get_serializer(self.get_object()).data)

    def create(self, request):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        server = McpServer(**serializer.validated_data)
        self._save(server)
        return Response(self.get_serializer(server).data, status=status.HTTP_201_CREATED)

    def update(self, request, slug=None, partial=False):
        server = self.get_object()
        serializer = self.get_serializer(server, data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        for name, value in serializer.validated_data.items():
            setattr(server, name, value)
        self._save(server)
        return Response(self.get_serializer(server).data)

    def partial_update(self, request, slug=None):
        return self.update(request, slug=slug, partial=True)

    def destroy(self, request, slug=None):
        server_delete(server=self.get_object(), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _save(self, server: McpServer) -> None:
        try:
            server_save(server=server, actor=self.request.user)
        except IntegrityError:  # a concurrent request took the slug
            raise ApiValidationError({"slug": ["A server with this slug already exists."]})

    @extend_schema(
        summary="Discover the upstream endpoints from its issuer's metadata, optionally applying them",
        request=ServerDiscoveryInput,
        responses=ServerDiscoveryOutput,
    )
    @action(detail=True, methods=["post"])
    def discover(self, request, slug=None):
        server = self.get_object()
        params = ServerDiscoveryInput(data=request.data)
        params.is_valid(raise_exception=True)
        issuer = params.validated_data.get("issuer") or server.issuer
        if not issuer:
            raise ApiValidationError({"issuer": ["The server has no issuer; give one."]})
        result = _discover(issuer, policy=server_destination_policy(server=server))
        applied: list[str] = []
        if params.validated_data["apply"]:
            try:
                applied = server_discovery_apply(
                    server=server, result=result, actor=request.user, fields=params.validated_data.get("fields")
                )
            except DjangoValidationError as exc:
                raise ApiValidationError(exc.message_dict)
        else:
            server.refresh_from_db()
        return Response(ServerDiscoveryOutput(
            {"discovery": result, "applied": applied, "server": server}, context=self.get_serializer_context()
        ).data)

    @extend_schema(
        summary="Check the configuration against the upstream, without a user",
        request=None,
        responses=ConnectionCheckOutput,
    )
    @action(detail=True, methods=["post"])
    def check(self, request, slug=None):
        check = server_connection_check(server=self.get_object(), request_origin=request_origin(request))
        return Response(ConnectionCheckOutput(check).data)

    @extend_schema(summary="Revoke all sessions of this server (upstream too)", request=ReasonInput,
                   responses=RevokedOutput)
    @action(detail=True, methods=["post"], url_path="revoke-sessions")
    def revoke_sessions(self, request, slug=None):
        server = self.get_object()
        params = ReasonInput(data=request.data)
        params.is_valid(raise_exception=True)
        revoked = sessions_revoke(
            queryset_or_filters={"server": server}, actor=request.user,
            reason=params.validated_data.get("reason") or f"all sessions of {server.slug} revoked by an operator",
        )
        return Response(RevokedOutput({"revoked": revoked}).data)


class DiscoveryViewSet(ManagementViewSet):
    """Discovery for a server that does not exist yet."""

    serializer_class = DiscoveryOutput
    action_permissions = {"create": "add_mcpserver", "metadata": None}

    @extend_schema(summary="Fetch an upstream issuer's metadata and show the server fields it implies",
                   request=DiscoveryInput, responses={200: DiscoveryOutput})
    def create(self, request):
        params = DiscoveryInput(data=request.data)
        params.is_valid(raise_exception=True)
        policy = user_destination_policy(user=request.user)
        return Response(DiscoveryOutput(_discover(params.validated_data["issuer"], policy=policy)).data)


# -- clients ---------------------------------------------------------------------------------------

class QuotaWindowOutput(serializers.Serializer):
    window = serializers.ChoiceField(choices=["minute", "day"])
    limit = serializers.IntegerField(help_text="0: unlimited.")
    used = serializers.IntegerField()
    rejected = serializers.IntegerField()
    remaining = serializers.IntegerField(allow_null=True)
    resets_in = serializers.IntegerField(help_text="Seconds until this window's counters reset.")
    by_operation = serializers.DictField(child=serializers.IntegerField())


class ClientOutput(serializers.ModelSerializer):
    server = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    redirect_uris = serializers.SerializerMethodField()
    verified_domain = serializers.CharField(read_only=True, allow_null=True)
    active_sessions = serializers.IntegerField(read_only=True)
    quota = serializers.SerializerMethodField(help_text="Upstream operations this minute and today.")
    known_client = serializers.SerializerMethodField(
        help_text="The catalog's name for this client and the basis of the match, or null (unknown)."
    )

    class Meta:
        model = Client
        fields = ("id", "client_id", "name", "server", "registration_source", "verified_domain", "client_type",
                  "token_endpoint_auth_method", "redirect_uris", "metadata", "disabled", "created", "updated",
                  "last_used", "active_sessions", "quota", "known_client")
        read_only_fields = fields

    def get_known_client(self, client) -> str | None:
        match = client_known(client)
        return match.label if match else None

    def get_redirect_uris(self, client) -> list[str]:
        return client.redirect_uris.split()

    @extend_schema_field(QuotaWindowOutput(many=True))
    def get_quota(self, client):
        usage = self.context.get("quota_usage", {}).get(client.pk)
        if usage is None:
            usage = quota_usage_many(clients=[client])[client.pk]
        return QuotaWindowOutput(usage, many=True).data


class ClientPreregisterInput(serializers.Serializer):
    server = serializers.SlugField(help_text="The slug of the MCP server the client is for.")
    name = serializers.CharField(max_length=255, help_text="Shown on the consent page and in the admin.")
    redirect_uris = serializers.ListField(child=serializers.CharField(max_length=2000), min_length=1,
                                         max_length=20, help_text="Exactly as the connector documents them.")
    confidential = serializers.BooleanField(
        default=True, help_text="True: a client secret is issued (returned once; HTTP Basic or form). "
        "False: a public client (PKCE only)."
    )


class ClientPreregisteredOutput(ClientOutput):
    client_secret = serializers.CharField(read_only=True, allow_null=True,
                                          help_text="Shown this once; stored hashed. Null for public clients.")

    class Meta(ClientOutput.Meta):
        fields = (*ClientOutput.Meta.fields, "client_secret")
        read_only_fields = fields


class ClientFilter(filters.FilterSet):
    server = filters.CharFilter(field_name="server__slug")
    client_id = filters.CharFilter()

    class Meta:
        model = Client
        fields = ["server", "client_id", "registration_source", "disabled"]


@extend_schema_view(
    list=extend_schema(summary="List registered clients (DCR and CIMD)"),
    retrieve=extend_schema(summary="A registered client, with its upstream quota counters"),
    destroy=extend_schema(summary="Delete a client, revoking its sessions (upstream too)"),
)
class ClientViewSet(ManagementViewSet):
    serializer_class = ClientOutput
    filterset_class = ClientFilter
    lookup_value_regex = "[^/]+"
    ordering_fields = ["created", "last_used", "name", "client_id"]
    ordering = ["-created"]
    action_permissions = {
        "list": "view_client", "retrieve": "view_client", "destroy": "delete_client",
        "disable": "change_client", "enable": "change_client", "revoke_sessions": "change_upstreamsession",
        "metadata": None, "create": "add_client",
    }

    @extend_schema(summary="Pre-register a client for a server (its secret is returned once)",
                   request=ClientPreregisterInput, responses={201: ClientPreregisteredOutput})
    def create(self, request):
        params = ClientPreregisterInput(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        server = self.visible_servers().filter(slug=data["server"]).first()
        if server is None:
            raise serializers.ValidationError({"server": ["No such server among yours."]})
        try:
            registration = client_preregister(
                server=server, name=data["name"], redirect_uris=data["redirect_uris"],
                confidential=data["confidential"], actor=request.user,
            )
        except OAuthError as exc:
            raise serializers.ValidationError({"redirect_uris": [exc.description]})
        client = registration.client
        client.active_sessions = 0
        body = {**ClientOutput(client, context=self.get_serializer_context()).data,
                "client_secret": registration.client_secret}  # the clear secret, in this answer only
        return Response(body, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})

    def get_queryset(self):
        active = Count("sessions", filter=Q(sessions__revoked_at__isnull=True))
        return (Client.objects.filter(server__in=self.visible_servers()).select_related("server")
                .annotate(active_sessions=active))

    def list(self, request):
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        usage = quota_usage_many(clients=page)
        data = self.get_serializer(page, many=True, context={**self.get_serializer_context(), "quota_usage": usage})
        return self.get_paginated_response(data.data)

    def retrieve(self, request, pk=None):
        return Response(self.get_serializer(self.get_object()).data)

    def destroy(self, request, pk=None):
        client_delete(client=self.get_object(), actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _set_disabled(self, request, disabled: bool):
        client = self.get_object()
        client_update(client=client, actor=request.user, disabled=disabled)
        return Response(self.get_serializer(self.get_object()).data)

    @extend_schema(summary="Disable a client: it can no longer authorize, redeem codes or refresh",
                   request=None, responses=ClientOutput)
    @action(detail=True, methods=["post"])
    def disable(self, request, pk=None):
        return self._set_disabled(request, True)

    @extend_schema(summary="Enable a disabled client", request=None, responses=ClientOutput)
    @action(detail=True, methods=["post"])
    def enable(self, request, pk=None):
        return self._set_disabled(request, False)

    @extend_schema(summary="Revoke all sessions of this client (upstream too)", request=ReasonInput,
                   responses=RevokedOutput)
    @action(detail=True, methods=["post"], url_path="revoke-sessions")
    def revoke_sessions(self, request, pk=None):
        client = self.get_object()
        params = ReasonInput(data=request.data)
        params.is_valid(raise_exception=True)
        revoked = sessions_revoke(
            queryset_or_filters={"client": client}, actor=request.user,
            reason=params.validated_data.get("reason") or f"sessions of client {client.client_id} revoked by an "
                                                           "operator",
        )
        return Response(RevokedOutput({"revoked": revoked}).data)


# -- sessions --------------------------------------------------------------------------------------

class SessionClientOutput(serializers.ModelSerializer):
    class Meta:
        model = Client
        fields = ("id", "client_id", "name")
        read_only_fields = fields


class SessionOutput(serializers.ModelSerializer):
    """A grant family: one upstream login behind a client's proxy tokens. Tokens are never shown."""

    server = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    client = SessionClientOutput(read_only=True)
    active = serializers.BooleanField(source="is_active", read_only=True)

    class Meta:
        model = UpstreamSession
        fields = ("id", "server", "client", "subject", "subject_source", "scope", "created", "last_used",
                  "expires_at", "refresh_count", "refreshed_at", "active", "revoked_at", "revoked_reason")
        read_only_fields = fields


class SessionFilter(filters.FilterSet):
    server = filters.CharFilter(field_name="server__slug")
    # A client id in range: an out-of-range number is a 400, not an overflow in the database driver (SQLite).
    client = filters.NumberFilter(field_name="client_id", min_value=1, max_value=2**62)
    client_id = filters.CharFilter(field_name="client__client_id")
    subject = filters.CharFilter()
    active = filters.BooleanFilter(field_name="revoked_at", lookup_expr="isnull")
    created_after = UtcIsoDateTimeFilter(field_name="created", lookup_expr="gte")
    created_before = UtcIsoDateTimeFilter(field_name="created", lookup_expr="lt")

    class Meta:
        model = UpstreamSession
        fields = ["server", "client", "client_id", "subject", "active", "created_after", "created_before"]


class SessionsRevokeInput(serializers.Serializer):
    server = serializers.SlugField(required=False, max_length=64, help_text="Slug of one of your servers.")
    client = serializers.IntegerField(required=False, min_value=1, max_value=2**62, help_text="A client's id.")
    subject = serializers.CharField(required=False, max_length=255, help_text="A user, as the upstream names them.")
    reason = serializers.CharField(required=False, max_length=200, allow_blank=True)

    def validate(self, attrs):
        if not any(attrs.get(name) for name in ("server", "client", "subject")):
            raise serializers.ValidationError("Name a server, a client or a subject (or a combination).")
        return attrs


@extend_schema_view(
    list=extend_schema(summary="List sessions (grants): subject, client, created, last used, upstream expiry"),
    retrieve=extend_schema(summary="One session"),
)
class SessionViewSet(ManagementViewSet):
    serializer_class = SessionOutput
    filterset_class = SessionFilter
    lookup_value_regex = "[^/]+"
    ordering_fields = ["created", "last_used", "expires_at", "subject"]
    ordering = ["-created"]
    action_permissions = {
        "list": "view_upstreamsession", "retrieve": "view_upstreamsession",
        "revoke": "change_upstreamsession", "revoke_many": "change_upstreamsession", "metadata": None,
    }

    def get_queryset(self):
        return UpstreamSession.objects.filter(server__in=self.visible_servers()).select_related("server", "client")

    def list(self, request):
        return self.paginated(self.get_queryset())

    def retrieve(self, request, pk=None):
        return Response(self.get_serializer(self.get_object()).data)

    @extend_schema(summary="Revoke one session (its proxy tokens, and upstream tokens where possible)",
                   request=ReasonInput, responses=SessionOutput)
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        session = self.get_object()
        params = ReasonInput(data=request.data)
        params.is_valid(raise_exception=True)
        upstream_session_revoke(
            session=session, actor=request.user,
            reason=params.validated_data.get("reason") or "revoked by an operator",
        )
        return Response(self.get_serializer(self.get_object()).data)

    @extend_schema(summary="Revoke all sessions of a server, a client or a user (subject), or a combination",
                   operation_id="sessions_revoke_many", request=SessionsRevokeInput, responses=RevokedOutput)
    @action(detail=False, methods=["post"], url_path="revoke")
    def revoke_many(self, request):
        params = SessionsRevokeInput(data=request.data)
        params.is_valid(raise_exception=True)
        data = params.validated_data
        sessions = self.get_queryset()
        if data.get("server"):
            server = self.visible_servers().filter(slug=data["server"]).first()
            if server is None:
                raise ApiValidationError({"server": ["No such server."]})
            sessions = sessions.filter(server=server)
        if data.get("client"):
            client = Client.objects.filter(pk=data["client"], server__in=self.visible_servers()).first()
            if client is None:
                raise ApiValidationError({"client": ["No such client."]})
            sessions = sessions.filter(client=client)
        if data.get("subject"):
            sessions = sessions.filter(subject=data["subject"])
        revoked = sessions_revoke(
            queryset_or_filters=sessions, actor=request.user,
            reason=data.get("reason") or "revoked by an operator",
        )
        return Response(RevokedOutput({"revoked": revoked}).data)


# -- audit -----------------------------------------------------------------------------------------

class AuditEventOutput(serializers.ModelSerializer):
    server = serializers.SlugRelatedField(slug_field="slug", read_only=True, allow_null=True)
    client_id = serializers.CharField(source="client.client_id", read_only=True, allow_null=True, default=None)
    actor = serializers.CharField(source="actor.get_username", read_only=True, allow_null=True, default=None)

    class Meta:
        model = AuditEvent
        fields = ("id", "created", "kind", "server", "client_id", "actor", "subject", "message", "detail")
        read_only_fields = fields


class AuditEventFilter(filters.FilterSet):
    kind = filters.MultipleChoiceFilter(choices=AuditEvent.Kind.choices)
    server = filters.CharFilter(field_name="server__slug")
    client_id = filters.CharFilter(field_name="client__client_id")
    subject = filters.CharFilter()
    actor = filters.CharFilter(field_name="actor__username")
    created_after = UtcIsoDateTimeFilter(field_name="created", lookup_expr="gte")
    created_before = UtcIsoDateTimeFilter(field_name="created", lookup_expr="lt")

    class Meta:
        model = AuditEvent
        fields = ["kind", "server", "client_id", "subject", "actor", "created_after", "created_before"]


@extend_schema_view(
    list=extend_schema(summary="The audit log: who did what, when (never secrets)"),
    retrieve=extend_schema(summary="One audit event"),
)
class AuditEventViewSet(ManagementViewSet):
    serializer_class = AuditEventOutput
    filterset_class = AuditEventFilter
    lookup_value_regex = "[^/]+"
    ordering_fields = ["created"]
    ordering = ["-created"]
    action_permissions = {"list": "view_auditevent", "retrieve": "view_auditevent", "metadata": None}

    def get_queryset(self):
        events = AuditEvent.objects.select_related("server", "client", "actor")
        if self.request.user.is_superuser:
            return events
        return events.filter(server__in=self.visible_servers())

    def list(self, request):
        return self.paginated(self.get_queryset())

    def retrieve(self, request, pk=None):
        return Response(self.get_serializer(self.get_object()).data)


# -- outbound destination rules (platform admins) -----------------------------------------------

class PlatformAdminOnly(permissions.BasePermission):
    """Superusers only: the destination policy is the platform's, not the teams'."""

    message = "Only platform admins (superusers) manage destination rules."

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.is_active and user.is_superuser)


class DestinationRuleDocument(serializers.ModelSerializer):
    team = serializers.SlugRelatedField(slug_field="name", queryset=Group.objects.all(), required=False,
                                        allow_null=True, help_text="The team's name; null: every team.")

    class Meta:
        model = DestinationRule
        fields = ("id", "team", "pattern", "note", "created")
        read_only_fields = ("id", "created")
        validators: list = []  # the one uniqueness rule is validate() below (a missing team means every team)

    def validate_pattern(self, value: str) -> str:
        try:
            return DestinationPattern.parse(value).text
        except ValueError as exc:
            raise ApiValidationError(str(exc))

    def validate(self, attrs: dict) -> dict:
        team = attrs.get("team")
        if DestinationRule.objects.filter(team=team, pattern=attrs["pattern"]).exists():
            whose = f"team {team.name}" if team else "every team"
            raise ApiValidationError({"pattern": [f"{attrs['pattern']} is already allowed for {whose}."]})
        return attrs


@extend_schema_view(
    list=extend_schema(summary="Outbound destination rules: where each team's servers may send requests"),
    retrieve=extend_schema(summary="One destination rule"),
    create=extend_schema(summary="Allow a destination for a team (or every team)"),
    destroy=extend_schema(summary="Remove a destination rule"),
)
class DestinationRuleViewSet(mixins.CreateModelMixin, mixins.DestroyModelMixin, ManagementViewSet):
    serializer_class = DestinationRuleDocument
    permission_classes = [PlatformAdminOnly]
    lookup_value_regex = "[^/]+"
    ordering = ["id"]
    queryset = DestinationRule.objects.select_related("team")

    def list(self, request):
        return self.paginated(self.get_queryset())

    def retrieve(self, request, pk=None):
        return Response(self.get_serializer(self.get_object()).data)

    def perform_create(self, serializer):
        rule = serializer.save()
        destination_rule_audit(rule=rule, actor=self.request.user, action="created")

    def perform_destroy(self, instance):
        destination_rule_audit(rule=instance, actor=self.request.user, action="deleted")
        instance.delete()


# -- API tokens ------------------------------------------------------------------------------------

class TokenOutput(serializers.ModelSerializer):
    id = serializers.CharField(source="digest", read_only=True, help_text="Identifies the token; not the token.")
    prefix = serializers.SerializerMethodField(help_text="The first characters of the token, to recognise it.")

    class Meta:
        model = AuthToken
        fields = ("id", "prefix", "created", "expiry")
        read_only_fields = fields

    def get_prefix(self, token) -> str:
        return token.token_key[:8]


class TokenInput(serializers.Serializer):
    expires_in_days = serializers.IntegerField(min_value=1, max_value=365, default=90)


class TokenCreatedOutput(serializers.Serializer):
    token = serializers.CharField(help_text="Shown once. Send it as 'Authorization: Token <token>'.")
    id = serializers.CharField()
    expiry = serializers.DateTimeField()


@extend_schema_view(
    list=extend_schema(summary="Your API tokens (never the tokens themselves)"),
    destroy=extend_schema(summary="Revoke one of your API tokens"),
)
class TokenViewSet(ManagementViewSet):
    """Per-user API tokens, stored as digests. Creating one needs a logged-in (admin) session, so a
    leaked token cannot mint others."""

    serializer_class = TokenOutput
    filter_backends = []
    lookup_value_regex = "[^/]+"
    action_permissions = {"list": None, "create": None, "destroy": None, "metadata": None}

    def get_queryset(self):
        return AuthToken.objects.filter(user=self.request.user).order_by("-created")

    def list(self, request):
        return self.paginated(self.get_queryset())

    @extend_schema(summary="Create an API token for yourself (needs a logged-in session)",
                   request=TokenInput, responses={201: TokenCreatedOutput})
    def create(self, request):
        if not isinstance(request.successful_authenticator, SessionAuthentication):
            raise PermissionDenied("Create API tokens from a logged-in session (the admin), not with a token.")
        params = TokenInput(data=request.data)
        params.is_valid(raise_exception=True)
        instance, token = AuthToken.objects.create(
            user=request.user, expiry=timedelta(days=params.validated_data["expires_in_days"])
        )
        body = TokenCreatedOutput({"token": token, "id": instance.digest, "expiry": instance.expiry}).data
        return Response(body, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})

    def destroy(self, request, pk=None):
        self.get_object().delete()
        return Response(status=status.HTTP_204_NO_CONTENT)

