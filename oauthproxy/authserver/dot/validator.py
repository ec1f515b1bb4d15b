"""The oauthlib request validator, bound to one MCP server per request.

django-oauth-toolkit's validator and oauthlib do the OAuth work: grant validation, PKCE verification and
token generation. This subclass fits them to the proxy:

- one validator per request, bound to the MCP server of the URL: clients are looked up at that server
  only, so a client of another server is unknown here (``invalid_client``, DESIGN §5.5);
- client authentication as registered: public clients by ``client_id`` alone, confidential clients with
  the method they registered (``client_secret_basic`` or ``client_secret_post``);
- codes are stored as SHA-256 checksums, verified with PKCE ``S256`` only, and marked redeemed instead of
  deleted, so a replay is recognised: an immediate retry by the same client (same verifier) is refused
  plainly, any other replay also ends the session the code created (RFC 6749 §4.1.2);
- tokens are bound to the server's resource URI (audience) and to their upstream session;
- refresh rotation serialises on the upstream session row. A duplicate refresh within the grace window
  gets the first answer again, from ``RefreshToken.replay_response``: the token response encrypted under
  a key derived from the refresh token presented, which the database does not hold (DOT's own grace path
  answers blank tokens under hashed storage). Reuse outside the window ends the session;
- work that must outlive the request's transaction (ending a session, which also calls the upstream) is
  collected in ``outcome`` for the caller (``authserver.tokens``) to run after commit.

It has one mode: ``authserver.tokens`` builds it with the server of the URL. (The ``OAUTH2_VALIDATOR_CLASS``
setting names it for completeness; no django-oauth-toolkit view that would build it without a server is
routed.)
"""

import base64
import hashlib
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import unquote_plus

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.utils import timezone
from oauth2_provider.models import set_token_value
from oauth2_provider.oauth2_validators import OAuth2Validator
from oauth2_provider.settings import oauth2_settings
from oauthlib.oauth2.rfc6749 import errors
from oauthlib.oauth2.rfc6749.grant_types.authorization_code import code_challenge_method_s256

from oauthproxy.authserver.cimd import client_resolve
from oauthproxy.authserver.client_auth import (
    PRIVATE_KEY_JWT,
    client_accepts_public_auth,
    client_assertion_authenticate,
    client_assertion_subject,
)
from oauthproxy.authserver.known_clients import client_row_admitted
from oauthproxy.core.audit import audit_event
from oauthproxy.core.crypto import token_checksum
from oauthproxy.core.exceptions import (
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidTarget,
    OAuthError,
    OAuthlibError,
    TemporarilyUnavailable,
    UpstreamError,
)
from oauthproxy.core.settings import proxy_settings
from oauthproxy.db.sql import rows_insert
from oauthproxy.db.tokens import refresh_session_locked, refresh_token_read, rotation_write
from oauthproxy.grants.sessions import UpstreamSessionEnded, upstream_session_ensure_fresh
from oauthproxy.models import AccessToken, AuditEvent, Client, Grant, McpServer, RefreshToken, UpstreamSession

SUPPORTED_GRANT_TYPES = ("authorization_code", "refresh_token")
CONFIDENTIAL_METHODS = ("client_secret_basic", "client_secret_post")
# RFC 7636 §4.1: 43 to 128 unreserved characters.
_CODE_VERIFIER_RE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


def one_or_none(queryset):
    """The row of a lookup that matches at most one (by a unique key or a random token), or None. Unlike
    ``first()`` it adds no ORDER BY, which costs a sort in the database and compile time in Django."""
    return next(iter(queryset[:1]), None)


# -- client credentials ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientCredentials:
    """What the client presented: ``method`` is client_secret_basic, client_secret_post, private_key_jwt
    (``assertion`` holds the JWT) or none."""

    client_id: str | None
    client_secret: str | None
    method: str
    assertion: str | None = field(default=None, repr=False)


def client_credentials_parse(
    *,
    authorization: str | None,
    client_id: str | None,
    client_secret: str | None,
    client_assertion: str | None = None,
    client_assertion_type: str | None = None,
) -> ClientCredentials:
    """The client's credentials from the HTTP Basic header (RFC 6749 §2.3.1: form-encoded, then base64), the
    body, or a JWT client assertion (RFC 7523 §2.2, whose ``sub`` is the client_id). Raises ``InvalidClient``
    for unreadable Basic credentials or assertions and ``InvalidRequest`` when two authentication methods are
    mixed (§2.3: one per request)."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    if client_assertion or client_assertion_type:
        if client_secret or scheme.lower() == "basic":
            raise InvalidRequest("Use one client authentication method: a client assertion or a secret, not both.")
        subject = client_assertion_subject(assertion=client_assertion or "", assertion_type=client_assertion_type)
        if client_id and client_id != subject:
            raise InvalidClient("client_id differs from the client assertion's sub.")
        return ClientCredentials(subject, None, PRIVATE_KEY_JWT, client_assertion)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise InvalidClient("The HTTP Basic credentials are not readable.")
        basic_id, separator, basic_secret = decoded.partition(":")
        basic_id, basic_secret = unquote_plus(basic_id), unquote_plus(basic_secret)
        if not separator or not basic_id or "\x00" in decoded:
            raise InvalidClient("The HTTP Basic credentials are not readable.")
        if client_secret:
            raise InvalidRequest("Use one client authentication method: HTTP Basic or client_secret, not both.")
        if client_id and client_id != basic_id:
            raise InvalidClient("client_id differs from the HTTP Basic credentials.")
        return ClientCredentials(basic_id, basic_secret or None, "client_secret_basic")
    return ClientCredentials(client_id, client_secret, "client_secret_post" if client_secret else "none")


def client_is_confidential(client: Client) -> bool:
    return client.client_type == Client.CLIENT_CONFIDENTIAL or client.token_endpoint_auth_method in CONFIDENTIAL_METHODS


class _VerifiedSecrets:
    """Remembers, for a minute, that a presented secret matched a stored hash.

    Client and introspection secrets are stored with Django's password hashers, which are deliberately
    slow (hundreds of milliseconds); a client refreshing often or a resource server introspecting every
    request would pay that each time. Only positive results are kept, keyed by the stored hash and a
    digest of the presented secret, so a changed secret or hash never matches a stale entry.
    """

    def __init__(self, ttl: float = 60.0, size: int = 4096):
        self._ttl, self._size = ttl, size
        self._entries: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, provided: str, stored: str, checker) -> bool:
        key = hashlib.sha256(f"{stored}\x00{provided}".encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            expiry = self._entries.get(key)
            if expiry is not None and expiry > now:
                return True
        if not checker(provided, stored):
            return False
        with self._lock:
            if len(self._entries) >= self._size:
                self._entries = {k: v for k, v in self._entries.items() if v > now}
                if len(self._entries) >= self._size:
                    self._entries.clear()
            self._entries[key] = now + self._ttl
        return True


verified_secrets = _VerifiedSecrets()


def client_lookup(*, server: McpServer, client_id: str) -> Client | None:
    """The client of *server* with this id (registered, or a Client ID Metadata Document fetched now), or
    None. A client of another server is not found."""
    if not client_id or len(client_id) > 2048 or "\x00" in client_id:
        return None
    try:
        client = client_resolve(server=server, client_id=client_id)
    except OAuthError:  # an unusable metadata document, or the server is full: the client cannot authenticate
        return None
    if client is None or client.server_id != server.pk:
        return None
    client.server = server  # already loaded: spares is_usable() a query
    return client


# -- the encrypted replay of a refresh answer -----------------------------------------------------


def _replay_key(raw_token: str) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"oauthproxy refresh replay v1").derive(
        raw_token.encode("utf-8")
    )
    return AESGCM(key)


def replay_seal(*, raw_token: str, context: str, plaintext: str) -> str:
    """Encrypt *plaintext* (AES-256-GCM) under a key derived (HKDF-SHA256) from *raw_token*, bound to
    *context* (the row). Only a holder of the raw token can open it."""
    nonce = os.urandom(12)
    sealed = _replay_key(raw_token).encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
    return "v1:" + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")


def replay_open(*, raw_token: str, context: str, sealed: str) -> str | None:
    if not sealed.startswith("v1:"):
        return None
    try:
        blob = base64.urlsafe_b64decode(sealed[3:].encode("ascii"))
        return _replay_key(raw_token).decrypt(blob[:12], blob[12:], context.encode("utf-8")).decode("utf-8")
    except (ValueError, InvalidTag):
        return None


def replay_context(refresh_token: RefreshToken) -> str:
    return f"{refresh_token._meta.db_table}.replay_response.{refresh_token.pk}"


# -- errors the grants raise ----------------------------------------------------------------------


class ReplayAnswer(OAuthlibError):
    """Stops the grant: ``outcome.replay_body`` holds the answer to send again (the caller substitutes it;
    should one forget, the client sees a plain invalid_grant)."""

    def __init__(self, *, request):
        super().__init__(InvalidGrant(), request=request)


# -- the validator --------------------------------------------------------------------------------


@dataclass
class TokenRequestOutcome:
    """What happened during one request, for the caller to finish after the transaction."""

    client: Client | None = None
    session: UpstreamSession | None = None
    rotated: RefreshToken | None = None  # the refresh token exchanged in this request
    sealed_body: str = ""  # the answer as sealed into rotated.replay_response
    presented_refresh_token: str = field(default="", repr=False)  # raw, in memory only: the replay key
    replay_body: str | None = None  # a duplicate refresh: send this answer again
    revoked_token: bool = False
    audit: AuditEvent | None = None  # the audit event, written with the tokens
    sessions_to_end: list[tuple[UpstreamSession, str, str]] = field(default_factory=list)  # session, reason, kind


class ProxyOAuth2Validator(OAuth2Validator):
    def __init__(self, server: McpServer, *, credentials: ClientCredentials | None = None):
        super().__init__()
        self.server = server
        self.credentials = credentials or ClientCredentials(None, None, "none")
        self.outcome = TokenRequestOutcome()

    # -- clients ------------------------------------------------------------------------------------

    def _load_application(self, client_id, request):
        client = self.outcome.client
        if client is None or client.client_id != client_id:
            client = client_lookup(server=self.server, client_id=client_id)
        if client is None or not client.is_usable(request):
            return None
        if not client_row_admitted(server=self.server, client=client):
            return None  # the server's admission policy changed since this client registered
        if client.client_secret_expires_at and client.client_secret_expires_at <= timezone.now():
            return None
        self.outcome.client = request.client = client
        return client

    def client_authentication_required(self, request, *args, **kwargs):
        client_id = self.credentials.client_id
        client = self._load_application(client_id, request) if client_id else None
        # An unknown client "requires" authentication, which then fails: invalid_client (DESIGN §6).
        if client is None or client_is_confidential(client) or self.credentials.method == PRIVATE_KEY_JWT:
            return True
        return not client_accepts_public_auth(client)

    def authenticate_client(self, request, *args, **kwargs):
        credentials = self.credentials
        client = self._load_application(credentials.client_id, request) if credentials.client_id else None
        if client is not None and credentials.method == PRIVATE_KEY_JWT:
            try:
                client_assertion_authenticate(server=self.server, client=client, assertion=credentials.assertion)
            except InvalidClient as exc:
                raise errors.InvalidClientError(description=exc.description, request=request)
            request.client_id = client.client_id
            return True
        if client is None or not client_is_confidential(client) or not credentials.client_secret:
            return False
        registered = client.token_endpoint_auth_method
        # A pre-registered client may send its secret either way: the connectors it is typed into differ.
        either_way = client.registration_source == Client.RegistrationSource.MANUAL
        if registered in CONFIDENTIAL_METHODS and credentials.method != registered and not either_way:
            return False
        if not verified_secrets.check(credentials.client_secret, client.client_secret, self._check_secret):
            return False
        request.client_id = client.client_id
        return True

    def authenticate_client_id(self, client_id, request, *args, **kwargs):
        client_id = client_id or self.credentials.client_id
        client = self._load_application(client_id, request) if client_id else None
        if client is None or client_is_confidential(client) or not client_accepts_public_auth(client):
            return False
        request.client_id = client.client_id
        return True

    def validate_grant_type(self, client_id, grant_type, client, request, *args, **kwargs):
        return grant_type in SUPPORTED_GRANT_TYPES

    def _check_resource(self, request) -> None:
        """RFC 8707: a ``resource`` sent to the token endpoint must be this server's MCP endpoint."""
        expected = self.server.resource_url
        for key, value in request.decoded_body or []:
            if key == "resource" and value.rstrip("/") != expected:
                raise OAuthlibError(
                    InvalidTarget(f"This authorization server issues tokens for {expected} only."), request=request
                )

    # -- authorization codes ------------------------------------------------------------------------

    def validate_code(self, client_id, code, client, request, *args, **kwargs):
        # The row lock makes redemption single-use under concurrency: a parallel redemption waits here,
        # then finds the code redeemed (DESIGN §5.8).
        grant = one_or_none(
            Grant.objects.select_for_update(of=("self",))
            .select_related("upstream_session")
            .filter(code=token_checksum(code), application=client)
        )
        if grant is None:
            return False
        self._check_resource(request)
        if grant.redeemed_at is not None:
            self._code_replayed(grant, request)
        if grant.is_expired():
            raise errors.InvalidGrantError(description="The authorization code has expired.", request=request)
        if grant.code_challenge_method != Grant.CODE_CHALLENGE_S256 or not grant.code_challenge:
            return False  # never issued by this proxy: S256 is the only method (DESIGN §5.3)
        if not request.code_verifier:
            raise errors.InvalidGrantError(description="code_verifier is required (PKCE).", request=request)
        if not _CODE_VERIFIER_RE.fullmatch(request.code_verifier):
            raise errors.InvalidGrantError(description="code_verifier is malformed (RFC 7636).", request=request)
        if request.redirect_uri is not None and request.redirect_uri != grant.redirect_uri:
            raise errors.InvalidGrantError(
                description="redirect_uri differs from the one of the authorization request.", request=request
            )
        session = grant.upstream_session
        if session.revoked_at is not None or session.server_id != self.server.pk:
            return False
        request.scopes = grant.scope.split()
        request.user = None
        request.grant_instance = grant
        request.upstream_session = session
        self.outcome.session = session
        return True

    def _code_replayed(self, grant: Grant, request) -> None:
        """A redeemed code again. The same client retrying at once, with the verifier and redirect URI of
        the first redemption, is told plainly and its tokens stay valid (a hosted client that calls the
        token endpoint twice, DESIGN §6); any other replay also ends the session the code created
        (RFC 6749 §4.1.2)."""
        retry_seconds = proxy_settings.CODE_RETRY_SECONDS
        verifier = request.code_verifier or ""
        is_retry = (
            timezone.now() - grant.redeemed_at <= timedelta(seconds=retry_seconds)
            and _CODE_VERIFIER_RE.fullmatch(verifier) is not None
            and grant.code_challenge.isascii()
            and code_challenge_method_s256(verifier, grant.code_challenge)
            and request.redirect_uri == grant.redirect_uri
        )
        if not is_retry and grant.upstream_session.revoked_at is None:
            self.outcome.sessions_to_end.append(
                (grant.upstream_session, "authorization code replayed", "code_replay")
            )
        raise errors.InvalidGrantError(description="The authorization code was already used.", request=request)

    def get_code_challenge(self, code, request):
        return request.grant_instance.code_challenge

    def get_code_challenge_method(self, code, request):
        return Grant.CODE_CHALLENGE_S256

    def get_default_redirect_uri(self, client_id, request, *args, **kwargs):
        return None  # redirect_uri is required at the token endpoint: the authorization request had one

    def confirm_redirect_uri(self, client_id, code, redirect_uri, client, *args, **kwargs):
        request = kwargs.get("request") or args[0]  # oauthlib passes it positionally
        return redirect_uri == request.grant_instance.redirect_uri

    def invalidate_authorization_code(self, client_id, code, request, *args, **kwargs):
        # Still under the row lock taken in validate_code.
        Grant.objects.filter(pk=request.grant_instance.pk).update(redeemed_at=timezone.now())

    # -- refresh tokens -----------------------------------------------------------------------------

    def validate_refresh_token(self, refresh_token, client, request, *args, **kwargs):
        self._check_resource(request)
        checksum = token_checksum(refresh_token)
        # Every rotation, upstream refresh and revocation of a session takes its row lock first, so
        # concurrent duplicates queue here and cannot deadlock with a revocation. The refresh token is read
        # after the lock is granted, so a duplicate that waited sees the first one's rotation.
        session = refresh_session_locked(checksum=checksum, client_pk=client.pk)
        if session is None:
            return False
        refresh = refresh_token_read(checksum=checksum, client_pk=client.pk, session_pk=session.pk)
        if refresh is None:
            return False
        self.outcome.session = session
        if refresh.revoked is not None:
            return self._refresh_token_replayed(refresh, session, refresh_token, request)
        if session.revoked_at is not None or refresh.access_token_id is None:
            return False
        lifetime = timedelta(seconds=self.server.effective_refresh_token_lifetime)
        if refresh.created + lifetime <= timezone.now():
            raise errors.InvalidGrantError(description="The refresh token has expired.", request=request)
        # The upstream is called only when its access token is due (DESIGN §4), once per session under
        # concurrency: upstream_session_ensure_fresh locks the same row.
        try:
            session.server, session.client = self.server, client  # for an upstream refresh: no reads
            session = upstream_session_ensure_fresh(session=session, locked=True)
        except UpstreamSessionEnded as exc:
            self.outcome.sessions_to_end.append((session, f"upstream session ended: {exc}", "upstream_ended"))
            raise errors.InvalidGrantError(
                description="The sign-in at the identity provider has ended; authorize again.", request=request
            )
        except UpstreamError:
            # RFC 6749 §4.1.2.1's error, with 503 so clients retry instead of discarding their refresh token.
            raise OAuthlibError(
                TemporarilyUnavailable("The identity provider cannot be reached; retry later."), request=request
            )
        request.user = None
        request.refresh_token = refresh_token
        request.refresh_token_instance = refresh
        request.upstream_session = session
        self.outcome.session = session
        self.outcome.presented_refresh_token = refresh_token
        return True

    def _refresh_token_replayed(self, refresh: RefreshToken, session: UpstreamSession, raw: str, request) -> bool:
        """A refresh token that was already exchanged. Within the grace window, while the tokens it was
        exchanged for are still the current ones, answer what the first exchange answered; otherwise it
        is reuse: end the session (RFC 9700 §4.14.2)."""
        grace = timedelta(seconds=oauth2_settings.REFRESH_TOKEN_GRACE_PERIOD_SECONDS or 0)
        if (
            session.revoked_at is None
            and refresh.revoked > timezone.now() - grace
            and refresh.replay_response
            and AccessToken.objects.filter(source_refresh_token=refresh).exists()
        ):
            body = replay_open(raw_token=raw, context=replay_context(refresh), sealed=refresh.replay_response)
            if body is not None:
                self.outcome.replay_body = body
                raise ReplayAnswer(request=request)
        if session.revoked_at is None and oauth2_settings.REFRESH_TOKEN_REUSE_PROTECTION:
            self.outcome.sessions_to_end.append((session, "refresh token reused after rotation", "refresh_reuse"))
        return False

    def get_original_scopes(self, refresh_token, request, *args, **kwargs):
        return request.refresh_token_instance.access_token_scope

    def rotate_refresh_token(self, request):
        return True if self.server is not None else super().rotate_refresh_token(request)

    # -- issuing ------------------------------------------------------------------------------------

    def save_bearer_token(self, token, request, *args, **kwargs):
        # The caller's transaction holds the code or session lock; no savepoint needed.
        return self._save_bearer_token(token, request, *args, **kwargs)

    def _save_bearer_token(self, token, request, *args, **kwargs):
        now = timezone.now()
        resource = [self.server.resource_url]
        session = request.upstream_session
        previous = getattr(request, "refresh_token_instance", None)
        family = previous.token_family if previous is not None and previous.token_family else uuid.uuid4()
        access_token = AccessToken(
            user=None,
            application=request.client,
            scope=token["scope"],
            expires=now + timedelta(seconds=token["expires_in"]),
            source_refresh_token=previous,
            resource=resource,
            upstream_session=session,
        )
        set_token_value(access_token, token["access_token"])
        refresh_token = RefreshToken(
            user=None,
            application=request.client,
            token_family=family,
            resource=resource,
            upstream_session=session,
        )
        set_token_value(refresh_token, token["refresh_token"])
        if previous is None:  # a code redeemed: the two tokens and the audit event in one statement
            self.outcome.audit = self._issue_audit(AuditEvent.Kind.TOKEN_ISSUED, "authorization_code", request)
            rows_insert(access_token, (refresh_token, "access_token"), (self.outcome.audit, None))
            return
        # Retire the refresh token presented (and its access token) and seal the answer into it for a
        # duplicate within the grace window. The answer is the token dict as oauthlib serialises it next;
        # the caller checks that and seals again should it ever differ. The sealed answers of earlier
        # tokens in the family are left alone: what they hold is retired now.
        body = json.dumps(token)
        self.outcome.rotated, self.outcome.sealed_body = previous, body
        sealed = replay_seal(
            raw_token=self.outcome.presented_refresh_token, context=replay_context(previous), plaintext=body
        )
        self.outcome.audit = self._issue_audit(AuditEvent.Kind.TOKEN_REFRESHED, "refresh_token", request)
        rotation_write(
            retired=previous, sealed_answer=sealed, now=now, access_token=access_token, refresh_token=refresh_token,
            audit=self.outcome.audit,
        )

    def _issue_audit(self, kind: str, grant_type: str, request) -> AuditEvent:
        """The audit event of tokens issued, written in the same statement as the tokens."""
        session = request.upstream_session
        return audit_event(
            kind=kind,
            server=self.server,
            client=request.client,
            subject=session.subject,
            detail={"grant_type": grant_type, "session": str(session.pk)},
        )

    # -- revocation (RFC 7009) ----------------------------------------------------------------------

    def revoke_token(self, token, token_type_hint, request, *args, **kwargs):
        """Revoking an access or refresh token ends its whole grant: the upstream session, every proxy
        token of it, and the upstream tokens where the upstream can revoke (run by the caller). Only the
        authenticated client's own tokens are found; anything else is silently ignored (RFC 7009 §2.2)."""
        client = request.client
        if client is None or not token or "\x00" in token:
            return
        checksum = token_checksum(token)
        models = [AccessToken, RefreshToken]
        if token_type_hint == "refresh_token":
            models.reverse()
        for model in models:
            row = one_or_none(
                model.objects.select_related("upstream_session").filter(token_checksum=checksum, application=client)
            )
            if row is None:
                continue
            session = row.upstream_session
            self.outcome.revoked_token = True
            if session is not None:
                self.outcome.session = session
                if session.revoked_at is None:
                    self.outcome.sessions_to_end.append((session, "revoked by the client (RFC 7009)", "revoked"))
            elif isinstance(row, AccessToken):
                row.delete()
            elif row.token_family:
                RefreshToken.revoke_family(row.token_family)
            else:
                row.revoke()
            return
