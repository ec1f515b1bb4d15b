"""The token, revocation and introspection endpoints (RFC 6749 §4.1.3 and §6, RFC 7636, RFC 7009, RFC 7662).

The views hand over the HTTP request. Here the form is checked (RFC 6749 §5.2 errors for anything
malformed, never a 500), the rate limit applied, and oauthlib's grant run with the validator bound to the
server (``oauth.validator``) inside one transaction, which holds the code or session row lock until the
new tokens are committed. What must outlive that transaction runs after it: ending sessions (that also
calls the upstream's revocation endpoint), audit records, last-used stamps.

Tokens are never returned to anyone but the client they were issued to, and never an upstream token.
"""

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.core.exceptions import BadRequest, SuspiciousOperation
from django.db import transaction
from django.http import HttpRequest, UnreadablePostError
from django.utils import timezone
from oauth2_provider.oauth2_backends import OAuthLibCore
from oauthlib.oauth2.rfc6749.endpoints import RevocationEndpoint, TokenEndpoint
from oauthlib.oauth2.rfc6749.grant_types import AuthorizationCodeGrant, RefreshTokenGrant
from oauthlib.oauth2.rfc6749.tokens import BearerToken

from oauthproxy.authserver.dot.validator import (
    SUPPORTED_GRANT_TYPES,
    ClientCredentials,
    ProxyOAuth2Validator,
    TokenRequestOutcome,
    client_credentials_parse,
    one_or_none,
    replay_context,
    replay_seal,
    verified_secrets,
)
from oauthproxy.core import metrics
from oauthproxy.core.audit import audit_logged, audit_record
from oauthproxy.core.caching import TTLCache
from oauthproxy.core.exceptions import InvalidClient, InvalidRequest, OAuthError, UnsupportedGrantType
from oauthproxy.core.ratelimit import client_ip, rate_limit_check, rate_limit_count, rate_limit_hit
from oauthproxy.grants.selectors import access_token_get_active
from oauthproxy.grants.sessions import upstream_session_revoke
from oauthproxy.models import AuditEvent, Client, IntrospectionCredential, McpServer, RefreshToken, UpstreamSession

TOKEN_PARAMETERS = frozenset(
    {"grant_type", "code", "redirect_uri", "code_verifier", "client_id", "client_secret", "refresh_token",
     "scope", "resource", "client_assertion", "client_assertion_type"}
)
REVOCATION_PARAMETERS = frozenset(
    {"token", "token_type_hint", "client_id", "client_secret", "client_assertion", "client_assertion_type"}
)
INTROSPECTION_PARAMETERS = frozenset({"token", "token_type_hint", "client_id", "client_secret"})
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# How often last_used is written at most (it is for operators, not for security).
LAST_USED_RESOLUTION = timedelta(seconds=60)
UNAVAILABLE_RETRY_AFTER = 30
_recently_touched: TTLCache[bool] = TTLCache(maxsize=10_000)


@dataclass(frozen=True)
class EndpointResponse:
    """An answer of the token or revocation endpoint; the view turns it into an HttpResponse."""

    status: int
    body: str
    headers: dict[str, str]


# -- oauthlib wiring ------------------------------------------------------------------------------


def _new_token(request) -> str:
    return secrets.token_urlsafe(32)  # 256 bits


class ProxyOAuthServer(TokenEndpoint, RevocationEndpoint):
    """oauthlib's endpoints for the two grants the proxy offers (no password, client credentials,
    implicit or device grants: they answer ``unsupported_grant_type``), for one MCP server."""

    def __init__(self, validator: ProxyOAuth2Validator, *, access_token_lifetime: int):
        self.auth_grant = AuthorizationCodeGrant(validator)
        self.refresh_grant = RefreshTokenGrant(validator)
        self.bearer = BearerToken(validator, _new_token, access_token_lifetime, _new_token)
        TokenEndpoint.__init__(
            self,
            default_grant_type="authorization_code",
            grant_types={"authorization_code": self.auth_grant, "refresh_token": self.refresh_grant},
            default_token_type=self.bearer,
        )
        RevocationEndpoint.__init__(self, validator)


class _ProxyOAuthLibCore(OAuthLibCore):
    """django-oauth-toolkit's Django ↔ oauthlib bridge, fed the form as checked by ``form_read``."""

    def __init__(self, server: ProxyOAuthServer, form: list[tuple[str, str]]):
        self.server = server
        self._form = form

    def extract_body(self, request):
        return self._form


def _core(
    *, server: McpServer, credentials: ClientCredentials, form: list[tuple[str, str]]
) -> tuple[_ProxyOAuthLibCore, ProxyOAuth2Validator]:
    validator = ProxyOAuth2Validator(server, credentials=credentials)
    oauth_server = ProxyOAuthServer(validator, access_token_lifetime=server.effective_access_token_lifetime)
    return _ProxyOAuthLibCore(oauth_server, form), validator


# -- request checks -------------------------------------------------------------------------------


def form_read(request: HttpRequest, *, allowed: frozenset[str]) -> list[tuple[str, str]]:
    """The form parameters, checked: form-encoded body only, nothing in the URL, no parameter twice
    (RFC 6749 §3.2; ``resource`` may repeat, RFC 8707), empty values as omitted, unknown ones ignored."""
    if request.META.get("QUERY_STRING"):
        raise InvalidRequest("Send the parameters in the request body, not in the URL.")
    if request.content_type != FORM_CONTENT_TYPE:
        raise InvalidRequest(f"The request body must be {FORM_CONTENT_TYPE}.")
    charset = request.content_params.get("charset", "utf-8").strip().lower()
    if charset not in ("utf-8", "utf8", "us-ascii", "ascii"):  # RFC 6749 Appendix B: UTF-8 only
        raise InvalidRequest("The request body must be encoded as UTF-8.")
    try:
        fields = list(request.POST.lists())
    except (SuspiciousOperation, BadRequest, UnreadablePostError):  # too large, too many fields, lost
        raise InvalidRequest("The request body could not be read.")
    except (UnicodeDecodeError, LookupError):  # an encoding Django could not apply
        raise InvalidRequest("The request body must be encoded as UTF-8.")
    form = []
    for name, values in fields:
        if name not in allowed:
            continue
        if len(values) > 1 and name != "resource":
            raise InvalidRequest(f"The {name} parameter is repeated.")
        for value in values:
            if "\x00" in value:
                raise InvalidRequest(f"The {name} parameter is malformed.")
            if value != "":
                form.append((name, value))
    return form


def _credentials(request: HttpRequest, params: dict[str, str]) -> ClientCredentials:
    return client_credentials_parse(
        authorization=request.META.get("HTTP_AUTHORIZATION"),
        client_id=params.get("client_id"),
        client_secret=params.get("client_secret"),
        client_assertion=params.get("client_assertion"),
        client_assertion_type=params.get("client_assertion_type"),
    )


def _rate_limit(*, server: McpServer, request: HttpRequest, client_id: str | None) -> None:
    """Every request counts per address and client_id (a stranger spends only their own budget); the
    client's own limit is only checked here, and counted once a request succeeded (``_client_counted``)."""
    if client_id:
        rate_limit_hit(name="token:source", key=f"{server.slug}:{client_ip(request)}:{_client_key(client_id)}")
        rate_limit_check(name="token:client", key=f"{server.slug}:{_client_key(client_id)}")
    else:
        rate_limit_hit(name="token:ip", key=f"{server.slug}:{client_ip(request)}")


def _client_counted(*, server: McpServer, client_id: str) -> None:
    rate_limit_count(name="token:client", key=f"{server.slug}:{_client_key(client_id)}")


def _client_key(client_id: str) -> str:
    return client_id if len(client_id) <= 200 else hashlib.sha256(client_id.encode()).hexdigest()


def _json_headers(*, server: McpServer, status: int) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", "Pragma": "no-cache"}
    if status == 401:
        # RFC 6749 §5.2: the client authentication scheme, not the Bearer challenge oauthlib adds.
        headers["WWW-Authenticate"] = f'Basic realm="{server.issuer_url}"'
    elif status == 503:
        headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER)
    return headers


def oauth_error_endpoint_response(exc: OAuthError, *, server: McpServer) -> EndpointResponse:
    headers = _json_headers(server=server, status=exc.status)
    if retry_after := getattr(exc, "retry_after", None):
        headers["Retry-After"] = str(retry_after)
    return EndpointResponse(exc.status, json.dumps(exc.as_dict()), headers)


# -- token endpoint -------------------------------------------------------------------------------


def token_request_handle(*, server: McpServer, request: HttpRequest) -> EndpointResponse:
    """POST /oauth/<slug>/token: authorization_code (with PKCE) and refresh_token grants."""
    grant_type = None
    try:
        form = form_read(request, allowed=TOKEN_PARAMETERS)
        params = dict(form)
        grant_type = params.get("grant_type")
        if not grant_type:
            raise InvalidRequest("grant_type is required.")
        if grant_type not in SUPPORTED_GRANT_TYPES:
            raise UnsupportedGrantType("Use the authorization_code or refresh_token grant.")
        credentials = _credentials(request, params)
        _rate_limit(server=server, request=request, client_id=credentials.client_id)
        if not credentials.client_id:
            raise InvalidClient("Client authentication failed: send client_id.")
        form = _scope_narrow(server=server, form=form)
    except OAuthError as exc:
        metrics.token_request_record(server=server.slug, grant_type=grant_type, outcome=exc.error)
        return oauth_error_endpoint_response(exc, server=server)

    core, validator = _core(server=server, credentials=credentials, form=form)
    outcome = validator.outcome
    with transaction.atomic():
        _uri, _headers, body, status = core.create_token_response(request)
        if outcome.replay_body is not None:
            # A duplicate refresh within the grace window: the first answer again, byte for byte.
            status, body = 200, outcome.replay_body
        elif status == 200:
            _tokens_issued(server=server, grant_type=grant_type, outcome=outcome, body=body)
    if status == 200:
        _client_counted(server=server, client_id=credentials.client_id)
    _sessions_end(server=server, outcome=outcome)
    metrics.token_request_record(
        server=server.slug,
        grant_type=grant_type,
        outcome=("replayed" if outcome.replay_body is not None else "issued") if status == 200 else _error_code(body),
    )
    return EndpointResponse(status, body, _json_headers(server=server, status=status))


def _scope_narrow(*, server: McpServer, form: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """A refresh's ``scope`` without the scopes this server does not offer (as at authorize, RFC 6749
    §3.3), or without ``scope`` at all when none is left (the grant's scopes then). A server with
    ``strict_scopes`` leaves it to oauthlib, which refuses scopes beyond the grant's."""
    if server.strict_scopes:
        return form
    offered = set(server.scopes or [])
    narrowed = []
    for name, value in form:
        if name == "scope":
            value = " ".join(scope for scope in value.split() if scope in offered)
            if not value:
                continue
        narrowed.append((name, value))
    return narrowed


def _error_code(body: str) -> str:
    """The ``error`` of an RFC 6749 §5.2 error body (for the metrics)."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return "server_error"
    return error if isinstance(error, str) else "server_error"


def _tokens_issued(*, server: McpServer, grant_type: str, outcome: TokenRequestOutcome, body: str) -> None:
    """Inside the issuing transaction: make sure the sealed replay is the answer sent, stamp, audit."""
    rotated = outcome.rotated
    if rotated is not None and body != outcome.sealed_body:
        sealed = replay_seal(raw_token=outcome.presented_refresh_token, context=replay_context(rotated), plaintext=body)
        RefreshToken.objects.filter(pk=rotated.pk).update(replay_response=sealed)
    session, client = outcome.session, outcome.client
    _last_used_touch(client=client, session=session)
    if outcome.audit is not None:  # written with the tokens
        audit_logged(outcome.audit)
        return
    audit_record(
        kind=AuditEvent.Kind.TOKEN_ISSUED if grant_type == "authorization_code" else AuditEvent.Kind.TOKEN_REFRESHED,
        server=server,
        client=client,
        subject=session.subject if session else "",
        detail={"grant_type": grant_type, "session": str(session.pk) if session else ""},
    )


def _last_used_touch(*, client: Client | None, session: UpstreamSession | None) -> None:
    """Stamp ``last_used`` at most once per ``LAST_USED_RESOLUTION`` per row and process (the client row
    comes from a per-process cache, whose copy would look stale until it expires)."""
    now = timezone.now()
    stale = now - LAST_USED_RESOLUTION
    for model, row in ((Client, client), (UpstreamSession, session)):
        if row is None or (row.last_used is not None and row.last_used >= stale):
            continue
        key = (model.__name__, row.pk)
        if _recently_touched.get(key) is None:
            model.objects.filter(pk=row.pk).update(last_used=now)
            _recently_touched.set(key, True, ttl=LAST_USED_RESOLUTION.total_seconds())


def _sessions_end(*, server: McpServer, outcome: TokenRequestOutcome) -> None:
    """After the transaction: end the sessions the request condemned (reuse, code replay, upstream
    refusal, client revocation), revoking their proxy tokens and, where possible, the upstream tokens."""
    done = set()
    for session, reason, kind in outcome.sessions_to_end:
        if session.pk in done:
            continue
        done.add(session.pk)
        if kind == "refresh_reuse":
            audit_record(kind=AuditEvent.Kind.REFRESH_REUSE, server=server, client=outcome.client,
                         subject=session.subject, message=reason)
        upstream_session_revoke(session=session, reason=reason)


# -- revocation endpoint (RFC 7009) ---------------------------------------------------------------


def revocation_request_handle(*, server: McpServer, request: HttpRequest) -> EndpointResponse:
    """POST /oauth/<slug>/revoke: the client's own token ends its whole grant; any other token (unknown,
    another client's, another server's) is answered 200 too and nothing happens (RFC 7009 §2.2)."""
    try:
        form = form_read(request, allowed=REVOCATION_PARAMETERS)
        params = dict(form)
        credentials = _credentials(request, params)
        _rate_limit(server=server, request=request, client_id=credentials.client_id)
        if not credentials.client_id:
            raise InvalidClient("Client authentication failed: send client_id.")
        if not params.get("token"):
            raise InvalidRequest("token is required.")
    except OAuthError as exc:
        return oauth_error_endpoint_response(exc, server=server)

    core, validator = _core(server=server, credentials=credentials, form=form)
    outcome = validator.outcome
    _uri, _headers, body, status = core.create_revocation_response(request)
    if status == 200 and outcome.revoked_token:
        _client_counted(server=server, client_id=credentials.client_id)
        audit_record(
            kind=AuditEvent.Kind.TOKEN_REVOKED,
            server=server,
            client=outcome.client,
            subject=outcome.session.subject if outcome.session else "",
            message="revoked by the client",
        )
    _sessions_end(server=server, outcome=outcome)
    headers = _json_headers(server=server, status=status)
    return EndpointResponse(status, body or "", headers)


# -- introspection endpoint (RFC 7662) ------------------------------------------------------------


def introspection_credential_create(*, server: McpServer, name: str) -> tuple[IntrospectionCredential, str]:
    """A credential for a resource server of *server*; the secret is returned once and stored hashed."""
    credential = IntrospectionCredential(server=server, name=name)
    secret = credential.set_secret()
    credential.save()
    return credential, secret


def introspection_credential_authenticate(
    *, server: McpServer, authorization: str | None, client_id: str | None, client_secret: str | None
) -> IntrospectionCredential:
    """The resource server's credential of *server* (HTTP Basic or form), or ``InvalidClient``. A
    credential of another server is not found (DESIGN §5.5)."""
    try:
        credentials = client_credentials_parse(
            authorization=authorization, client_id=client_id, client_secret=client_secret
        )
    except OAuthError:
        raise InvalidClient("Resource server authentication failed.")
    if not credentials.client_id or not credentials.client_secret or len(credentials.client_id) > 64:
        raise InvalidClient("Resource server authentication failed.")
    credential = one_or_none(
        IntrospectionCredential.objects.filter(server=server, client_id=credentials.client_id, revoked=False)
    )
    if credential is None or not verified_secrets.check(
        credentials.client_secret, credential.secret_hash, lambda provided, _stored: credential.check_secret(provided)
    ):
        raise InvalidClient("Resource server authentication failed.")
    return credential


def token_introspect(*, server: McpServer, token: str) -> dict:
    """RFC 7662 §2.2 for a proxy access token of *server*; ``{"active": false}`` for anything else
    (expired, revoked, unknown, a refresh token, or a token of another server). Upstream tokens are never
    part of the answer."""
    access_token = access_token_get_active(server=server, token=token)
    if access_token is None:
        return {"active": False}
    return {
        "active": True,
        "scope": access_token.scope,
        "client_id": access_token.application.client_id,
        "token_type": "Bearer",
        "exp": int(access_token.expires.timestamp()),
        "iat": int(access_token.created.timestamp()),
        "aud": server.resource_url,
        "sub": access_token.upstream_session.subject,
        "iss": server.issuer_url,
    }
