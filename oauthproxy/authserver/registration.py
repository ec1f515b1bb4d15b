"""Dynamic Client Registration (RFC 7591) and its management protocol (RFC 7592), one MCP server at a time.

A registered client belongs to exactly one server (DESIGN §5.5). Its registration access token is random,
returned once, and stored only as a SHA-256 checksum (DESIGN §5.1); a confidential client's secret is
returned once and stored hashed by DOT's ``ClientSecretField``. Registrations are capped per server and
unused ones expire (DESIGN §5.9).
"""

import hmac
import logging
import re
import secrets
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from django.contrib.auth.hashers import check_password
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction
from django.utils import timezone

from oauthproxy.authserver.known_clients import client_admitted
from oauthproxy.authserver.redirect_uris import redirect_uris_validate
from oauthproxy.core.audit import audit_event, audit_logged, audit_record
from oauthproxy.core.crypto import token_checksum
from oauthproxy.core.exceptions import (
    InvalidClientMetadata,
    InvalidRedirectUri,
    InvalidRequest,
    InvalidToken,
    RateLimited,
)
from oauthproxy.core.settings import proxy_settings
from oauthproxy.db.sql import rows_insert
from oauthproxy.models import AuditEvent, Client, McpServer

logger = logging.getLogger(__name__)

AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post")
GRANT_TYPES = ("authorization_code", "refresh_token")
RESPONSE_TYPES = ("code",)
APPLICATION_TYPES = ("web", "native")
URL_FIELDS = ("client_uri", "logo_uri", "tos_uri", "policy_uri")
TEXT_FIELDS = ("software_id", "software_version")
MAX_TEXT_LENGTH = 255
MAX_URL_LENGTH = 2000
MAX_CONTACTS = 10
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_TOKEN_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
EXPIRE_UNUSED_THROTTLE_KEY = "oauthproxy:registration:expire-unused"
EXPIRE_UNUSED_INTERVAL_SECONDS = 60
SELF_SERVE_SOURCES = (Client.RegistrationSource.DCR, Client.RegistrationSource.CIMD)
CAPACITY_KEY_PREFIX = "oauthproxy:registration:free-slots"
CAPACITY_RECOUNT_SECONDS = EXPIRE_UNUSED_INTERVAL_SECONDS

_url_validator = URLValidator(schemes=["https", "http"])


class RegistrationLimitReached(RateLimited):
    """The server holds its maximum number of registered clients (429, Retry-After)."""

    error = "temporarily_unavailable"


@dataclass(frozen=True)
class ClientMetadata:
    """RFC 7591 client metadata after validation: what is stored and echoed back."""

    redirect_uris: list[str]
    token_endpoint_auth_method: str
    client_name: str
    # Everything else that is echoed back (Client.metadata): grant/response types, URIs, scope, contacts...
    extra: dict = field(default_factory=dict)

    @property
    def is_confidential(self) -> bool:
        """Holds a secret. (A metadata-document client's ``private_key_jwt`` keys are its own: no secret.)"""
        return self.token_endpoint_auth_method not in ("none", "private_key_jwt")


@dataclass(frozen=True)
class ClientRegistration:
    """A registered client with the credentials shown exactly once (``None`` when not issued now)."""

    client: Client
    registration_access_token: str | None = None
    client_secret: str | None = None


def client_metadata_validate(
    *, server: McpServer, data: dict, default_auth_method: str = "client_secret_basic"
) -> ClientMetadata:
    """Validate RFC 7591 client metadata for *server*; raise InvalidRedirectUri / InvalidClientMetadata.

    Unknown fields are ignored (RFC 7591 §2). ``null`` means absent. The server may replace values
    (§3.2.1): requested scopes are narrowed to the server's scopes, and ``grant_types`` is always what the
    proxy really issues (authorization code with refresh tokens).
    """
    if not isinstance(data, dict):
        raise InvalidClientMetadata("The client metadata must be a JSON object.")
    redirect_uris = data.get("redirect_uris")
    if redirect_uris is None:
        raise InvalidRedirectUri("redirect_uris is required: register at least one redirect URI.")
    redirect_uris = redirect_uris_validate(redirect_uris)

    auth_method = _optional(data, "token_endpoint_auth_method", default_auth_method)
    if auth_method not in AUTH_METHODS:
        raise InvalidClientMetadata(
            f"token_endpoint_auth_method must be one of {', '.join(AUTH_METHODS)}."
        )

    # Clients list every grant they can use (VS Code adds device_code); the server registers the ones it
    # supports and says so in the response (RFC 7591 §3.2.1), as long as the authorization code flow is one.
    grant_types = _string_list(data, "grant_types", default=["authorization_code"])
    if "authorization_code" not in grant_types:
        raise InvalidClientMetadata(
            "grant_types must include authorization_code: this server supports authorization_code and "
            "refresh_token."
        )
    response_types = _string_list(data, "response_types", default=["code"])
    if "code" not in response_types:
        raise InvalidClientMetadata('response_types must include "code".')

    extra: dict = {
        "grant_types": list(GRANT_TYPES),
        "response_types": list(RESPONSE_TYPES),
    }
    application_type = _optional(data, "application_type", None)
    if application_type is not None:
        if application_type not in APPLICATION_TYPES:
            raise InvalidClientMetadata('application_type must be "web" or "native".')
        extra["application_type"] = application_type

    client_name = _text(data, "client_name") or ""
    if client_name:
        extra["client_name"] = client_name
    for name in URL_FIELDS:
        if (url := _url(data, name)) is not None:
            extra[name] = url
    for name in TEXT_FIELDS:
        if (text := _text(data, name)) is not None:
            extra[name] = text
    contacts = _string_list(data, "contacts", default=None)
    if contacts is not None:
        if len(contacts) > MAX_CONTACTS or any(len(c) > 320 for c in contacts):
            raise InvalidClientMetadata(f"contacts must hold at most {MAX_CONTACTS} addresses.")
        extra["contacts"] = contacts
    if (scope := _scope(server=server, data=data)) is not None:
        extra["scope"] = scope

    return ClientMetadata(
        redirect_uris=redirect_uris,
        token_endpoint_auth_method=auth_method,
        client_name=client_name,
        extra=extra,
    )


def client_register(*, server: McpServer, data: dict, remote_addr: str = "") -> ClientRegistration:
    """RFC 7591 registration at *server*: validate, enforce the cap, create, audit.

    Returns the client with its registration access token and (confidential clients) its secret, both
    in clear exactly this once.
    """
    metadata = client_metadata_validate(server=server, data=data)
    if server.client_admission == McpServer.ClientAdmission.PREREGISTERED:
        raise InvalidClientMetadata(
            "This server does not accept registrations: its administrator pre-registers clients. "
            "Ask them for a client ID."
        )
    if not client_admitted(server=server, client_id="", redirect_uris=metadata.redirect_uris, preregistered=False):
        raise InvalidClientMetadata(
            "This server accepts registrations from the known MCP clients only (by their redirect URIs); "
            "ask its administrator to pre-register this application."
        )
    client_registration_capacity_check(server=server, expire_unused_first=True)

    client, client_secret = _client_new(server=server, metadata=metadata, source=Client.RegistrationSource.DCR)
    registration_access_token = _registration_token_issue(client)
    event = audit_event(
        kind=AuditEvent.Kind.CLIENT_REGISTERED,
        server=server,
        client=client,
        message=f"registered {client.name or client.client_id} ({metadata.token_endpoint_auth_method})",
        detail={
            "source": "dcr",
            "client_id": client.client_id,
            "redirect_uris": metadata.redirect_uris,
            "token_endpoint_auth_method": metadata.token_endpoint_auth_method,
            "software_id": metadata.extra.get("software_id", ""),
            "remote_addr": remote_addr,
        },
    )
    # The client and its audit row in one statement (atomic, one round trip), fields prepared as save()
    # prepares them (the secret hashed, timestamps set). save()'s post_save only drops cached rows of this
    # client_id, and a new random one has none.
    rows_insert(client, (event, "client"))
    audit_logged(event)
    return ClientRegistration(
        client=client, registration_access_token=registration_access_token, client_secret=client_secret
    )


def _client_new(*, server: McpServer, metadata: ClientMetadata, source: str) -> tuple[Client, str | None]:
    """An unsaved client with a new client ID and, when confidential, a new secret (returned in clear once,
    hashed by ``ClientSecretField`` on save)."""
    client_secret = _client_secret_generate() if metadata.is_confidential else None
    client = Client(server=server, registration_source=source, user=None, client_id=_client_id_generate(),
                    client_secret=client_secret or "")
    client_metadata_apply(client=client, metadata=metadata)
    return client, client_secret


def client_preregister(
    *,
    server: McpServer,
    name: str,
    redirect_uris: list[str],
    confidential: bool,
    actor=None,
) -> ClientRegistration:
    """A client created by a platform admin or team member (admin or management API), for connectors with a
    client ID field (claude.ai's advanced settings, ChatGPT's predefined client, Cursor, Gemini CLI, Codex).

    The redirect URIs pass the same rules as registration. A confidential client authenticates with
    ``client_secret_basic`` or ``client_secret_post`` (either; its secret is returned here, once, and stored
    hashed); a public one with PKCE alone. It is never expired for disuse, does not count against the
    registration cap, and is admitted whatever the server's admission policy."""
    method = "client_secret_basic" if confidential else "none"
    metadata = client_metadata_validate(
        server=server,
        data={"redirect_uris": redirect_uris, "client_name": name, "token_endpoint_auth_method": method},
    )
    client, client_secret = _client_new(server=server, metadata=metadata, source=Client.RegistrationSource.MANUAL)
    with transaction.atomic():
        client.save()
        audit_record(
            kind=AuditEvent.Kind.CLIENT_REGISTERED,
            server=server,
            client=client,
            actor=actor,
            message=f"pre-registered {client.name or client.client_id} "
            f"({'confidential' if confidential else 'public'})",
            detail={"source": "manual", "client_id": client.client_id, "redirect_uris": metadata.redirect_uris},
        )
    return ClientRegistration(client=client, client_secret=client_secret)


def client_registration_authenticate(
    *, server: McpServer, client_id: str, registration_access_token: str | None
) -> Client:
    """The DCR client of *server* this RFC 7592 request may manage, or InvalidToken (401).

    Unknown clients, clients of other servers, non-DCR clients and wrong tokens are indistinguishable.
    """
    if not registration_access_token:
        raise InvalidToken("A registration access token is required (Authorization: Bearer ...).")
    client = None
    if _is_printable(client_id) and len(client_id) <= 255:
        client = (
            Client.objects.select_related("server")
            .filter(server=server, client_id=client_id, registration_source=Client.RegistrationSource.DCR)
            .first()
        )
    presented = token_checksum(registration_access_token)
    stored = client.registration_token_checksum if client else ""
    if not stored or not hmac.compare_digest(stored, presented):
        raise InvalidToken("The registration access token is not valid for this client.")
    return client


def client_registration_update(*, client: Client, data: dict) -> Client:
    """RFC 7592 §2.2: replace the client's metadata with *data* (a full replacement, not a patch)."""
    if not isinstance(data, dict):
        raise InvalidClientMetadata("The client metadata must be a JSON object.")
    if data.get("client_id") not in (None, client.client_id):
        raise InvalidRequest("client_id in the body does not match the client being updated.")
    if "client_secret" in data and not _client_secret_matches(client, data["client_secret"]):
        raise InvalidClientMetadata("client_secret does not match the secret issued to this client.")
    current = client.token_endpoint_auth_method
    metadata = client_metadata_validate(server=client.server, data=data, default_auth_method=current)
    if metadata.is_confidential != (current != "none"):
        raise InvalidClientMetadata(
            "token_endpoint_auth_method cannot change between public (none) and confidential; "
            "register a new client instead."
        )
    client_metadata_apply(client=client, metadata=metadata)
    with transaction.atomic():
        client.save()
        audit_record(
            kind=AuditEvent.Kind.CLIENT_UPDATED,
            server=client.server,
            client=client,
            message=f"updated {client.name or client.client_id}",
            detail={"source": "dcr", "client_id": client.client_id, "redirect_uris": metadata.redirect_uris},
        )
    return client


def client_registration_delete(*, client: Client) -> None:
    """RFC 7592 §2.3: delete the client and, by cascade, its tokens, codes, consents and sessions."""
    with transaction.atomic():
        audit_record(
            kind=AuditEvent.Kind.CLIENT_DELETED,
            server=client.server,
            message=f"deleted {client.name or client.client_id} at the client's request",
            detail={"source": "dcr", "client_id": client.client_id, "reason": "rfc7592"},
        )
        client.delete()


def client_registration_capacity_check(*, server: McpServer, expire_unused_first: bool = False) -> None:
    """Take one of *server*'s MAX_REGISTRATIONS_PER_SERVER self-registered (DCR and CIMD) client slots, or
    raise RegistrationLimitReached.

    Constant cost however many clients the server holds: the free slots are counted in the database at
    most once per CAPACITY_RECOUNT_SECONDS (a count that stops at the cap) and kept in the shared cache,
    where each registration takes one (one round trip). Only the count says no, so the answer at the cap
    is exact. Deleted or expired clients free their slots at the next count; clients this service did not
    create (bulk imports) are seen at the next count too.

    With *expire_unused_first*, unused registrations are expired (at most once a minute per deployment)
    before each count, so that the count sees the room they leave.
    """
    limit = proxy_settings.MAX_REGISTRATIONS_PER_SERVER
    if not limit:
        if expire_unused_first:
            _clients_expire_unused_now_and_then()
        return
    key = f"{CAPACITY_KEY_PREFIX}:{server.pk}:{limit}"
    try:
        if cache.decr(key) >= 0:
            return
    except ValueError:  # not counted yet, or the count expired
        pass
    if expire_unused_first:
        _clients_expire_unused_now_and_then()
    used = (
        Client.objects.filter(server=server, registration_source__in=SELF_SERVE_SOURCES)
        .order_by()
        .values("pk")[:limit]
        .count()
    )
    if used >= limit:
        logger.warning("registration limit of %s clients reached at server %s", limit, server.slug)
        raise RegistrationLimitReached(
            "This server has reached its limit of registered clients; unused registrations expire, "
            "so retry later or ask the operator.",
            retry_after=EXPIRE_UNUSED_INTERVAL_SECONDS,
        )
    cache.set(key, limit - used - 1, timeout=CAPACITY_RECOUNT_SECONDS)


def clients_expire_unused(*, older_than_seconds: int | None = None) -> int:
    """Delete self-registered (DCR and CIMD) clients never used: ``last_used`` empty, no upstream session,
    created more than *older_than_seconds* (default ``UNUSED_REGISTRATION_TTL``) ago. Returns how many.

    CIMD clients come back on their next use by fetching their document again.
    """
    ttl = proxy_settings.UNUSED_REGISTRATION_TTL if older_than_seconds is None else older_than_seconds
    cutoff = timezone.now() - timedelta(seconds=ttl)
    stale = Client.objects.filter(
        registration_source__in=SELF_SERVE_SOURCES,
        last_used__isnull=True,
        created__lt=cutoff,
        sessions__isnull=True,
    )
    per_server = Counter(stale.values_list("server_id", flat=True))
    if not per_server:
        return 0
    with transaction.atomic():
        # Re-select by primary key: a client used since the count above is kept.
        _total, by_model = Client.objects.filter(
            pk__in=stale.values("pk"), last_used__isnull=True, sessions__isnull=True
        ).delete()
        for server in McpServer.objects.filter(pk__in=per_server):
            audit_record(
                kind=AuditEvent.Kind.CLIENT_DELETED,
                server=server,
                message=f"expired up to {per_server[server.pk]} unused client registration(s)",
                detail={"reason": "unused", "ttl_seconds": ttl},
            )
    deleted = by_model.get(Client._meta.label, 0)
    logger.info("expired %s unused client registrations", deleted)
    return deleted


def client_metadata_apply(*, client: Client, metadata: ClientMetadata) -> None:
    """Set *client*'s fields from validated metadata (not saved), then run DOT's model validation as a
    second line behind the rules above; raise InvalidRedirectUri / InvalidClientMetadata."""
    client.redirect_uris = " ".join(metadata.redirect_uris)
    client.name = metadata.client_name
    client.token_endpoint_auth_method = metadata.token_endpoint_auth_method
    client.client_type = Client.CLIENT_CONFIDENTIAL if metadata.is_confidential else Client.CLIENT_PUBLIC
    client.authorization_grant_type = Client.GRANT_AUTHORIZATION_CODE
    client.metadata = metadata.extra
    if not metadata.is_confidential and client._state.adding:
        # django-oauth-toolkit gives every new application a random secret and hashes it; a public client
        # never receives or uses one, and hashing it was 90% of a registration's CPU.
        client.client_secret = ""
        client.hash_client_secret = False
    try:
        client.full_clean(
            exclude=["client_secret", "server", "user"], validate_unique=False, validate_constraints=False
        )
    except ValidationError as exc:
        errors = exc.message_dict if hasattr(exc, "error_dict") else {"metadata": exc.messages}
        if "redirect_uris" in errors:
            raise InvalidRedirectUri("One or more redirect URIs are not valid URIs.")
        raise InvalidClientMetadata("; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in errors.items()))


# Helpers


def _client_id_generate() -> str:
    """40 URL-safe characters, 240 random bits (django-oauth-toolkit's default: 40 alphanumerics, 238
    bits, drawn one ``os.urandom`` call per character)."""
    return secrets.token_urlsafe(30)


def _client_secret_generate() -> str:
    """128 URL-safe characters, 768 random bits (DOT's default: 128 alphanumerics, 762 bits)."""
    return secrets.token_urlsafe(96)


def _registration_token_issue(client: Client) -> str:
    token = secrets.token_urlsafe(32)
    client.registration_token_checksum = token_checksum(token)
    return token


def _client_secret_matches(client: Client, secret: object) -> bool:
    return isinstance(secret, str) and client.client_type == Client.CLIENT_CONFIDENTIAL and check_password(
        secret, client.client_secret
    )


def _clients_expire_unused_now_and_then() -> None:
    """Run the expiry at most once a minute per deployment (a shared-cache flag), from registrations."""
    if cache.add(EXPIRE_UNUSED_THROTTLE_KEY, 1, timeout=EXPIRE_UNUSED_INTERVAL_SECONDS):
        clients_expire_unused()


def _optional(data: dict, name: str, default):
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidClientMetadata(f"{name} must be a string.")
    return value


def _text(data: dict, name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT_LENGTH or not _is_printable(value):
        raise InvalidClientMetadata(
            f"{name} must be a string of at most {MAX_TEXT_LENGTH} characters without control characters."
        )
    return value.strip()


def _url(data: dict, name: str) -> str | None:
    value = data.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_URL_LENGTH or not _is_printable(value):
        raise InvalidClientMetadata(f"{name} must be an http(s) URL.")
    try:
        _url_validator(value)
    except ValidationError:
        raise InvalidClientMetadata(f"{name} must be an http(s) URL.")
    return value


def _string_list(data: dict, name: str, *, default):
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) and _is_printable(v) for v in value):
        raise InvalidClientMetadata(f"{name} must be an array of strings.")
    if len(value) > 50:
        raise InvalidClientMetadata(f"{name} has too many entries.")
    return list(dict.fromkeys(value))


def _scope(*, server: McpServer, data: dict) -> str | None:
    """The registered scope: the requested scopes this server offers (all of them when none requested)."""
    requested = data.get("scope")
    if requested is not None and (not isinstance(requested, str) or len(requested) > 2000):
        raise InvalidClientMetadata("scope must be a string of space-separated scope names.")
    tokens = (requested or "").split()
    if any(not SCOPE_TOKEN_RE.match(token) for token in tokens):
        raise InvalidClientMetadata("scope must be a string of space-separated scope names.")
    offered = list(server.scopes or [])
    if not offered:
        return None
    chosen = [t for t in dict.fromkeys(tokens) if t in offered] or offered
    return " ".join(chosen)


def _is_printable(text: str) -> bool:
    """No control characters (PostgreSQL refuses NUL) and encodable as UTF-8 (no lone surrogates)."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
