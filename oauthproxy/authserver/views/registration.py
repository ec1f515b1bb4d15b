"""RFC 7591 registration (``POST /oauth/<slug>/register``) and RFC 7592 management
(``GET/PUT/DELETE /oauth/<slug>/register/<client_id>`` with the registration access token)."""

import json
from urllib.parse import quote

from django.core.exceptions import RequestDataTooBig
from django.http import HttpResponse, JsonResponse
from oauth2_provider.utils import parse_bearer_token

from oauthproxy.authserver.registration import (
    client_register,
    client_registration_authenticate,
    client_registration_delete,
    client_registration_update,
)
from oauthproxy.authserver.views.protocol import ProtocolEndpoint
from oauthproxy.core import metrics
from oauthproxy.core.exceptions import InvalidClientMetadata, InvalidToken, OAuthError
from oauthproxy.core.ratelimit import client_ip, rate_limit_hit
from oauthproxy.models import Client

MAX_BODY_BYTES = 64 * 1024


class RegistrationTokenMissing(InvalidToken):
    """No Bearer credentials at all: RFC 6750 §3.1 challenges without an error code."""


class ClientRegisterApi(ProtocolEndpoint):
    """RFC 7591 §3: open registration, rate-limited per server and caller address."""


    def post(self, request, slug: str):
        server = self.server_get(slug)
        try:
            rate_limit_hit(name="register:ip", key=f"{server.slug}:{client_ip(request)}")
            registration = client_register(server=server, data=_json_object(request), remote_addr=client_ip(request))
        except OAuthError as exc:
            metrics.registration_record(server=server.slug, outcome=exc.error)
            raise
        metrics.registration_record(server=server.slug, outcome="created")
        body = client_information(
            client=registration.client,
            registration_access_token=registration.registration_access_token,
            client_secret=registration.client_secret,
        )
        return _no_store(JsonResponse(body, status=201))


class ClientConfigurationApi(ProtocolEndpoint):
    """RFC 7592: read, replace or delete a registration with its registration access token."""


    def get(self, request, slug: str, client_id: str):
        client, token = self._authenticate(request, slug, client_id)
        return _no_store(JsonResponse(client_information(client=client, registration_access_token=token)))

    def put(self, request, slug: str, client_id: str):
        client, token = self._authenticate(request, slug, client_id)
        client = client_registration_update(client=client, data=_json_object(request))
        return _no_store(JsonResponse(client_information(client=client, registration_access_token=token)))

    def delete(self, request, slug: str, client_id: str):
        client, _token = self._authenticate(request, slug, client_id)
        client_registration_delete(client=client)
        return _no_store(HttpResponse(status=204))

    def challenge(self, exc: OAuthError) -> str | None:
        """RFC 6750 §3: the Bearer challenge, with ``invalid_token`` once a token was sent."""
        if isinstance(exc, RegistrationTokenMissing):
            return "Bearer"
        if isinstance(exc, InvalidToken):
            return 'Bearer error="invalid_token"'
        return None

    def _authenticate(self, request, slug: str, client_id: str) -> tuple[Client, str]:
        server = self.server_get(slug)
        token = parse_bearer_token(request.META.get("HTTP_AUTHORIZATION", ""))
        if not token:
            raise RegistrationTokenMissing("A registration access token is required (Authorization: Bearer ...).")
        client = client_registration_authenticate(
            server=server, client_id=client_id, registration_access_token=token
        )
        return client, token


def client_information(*, client: Client, registration_access_token: str, client_secret: str | None = None) -> dict:
    """The RFC 7591 §3.2.1 / RFC 7592 §3 client information response. The client secret is only known
    (and so only included) right after registration; the registration access token is echoed."""
    body = dict(client.metadata or {})
    body.update(
        client_id=client.client_id,
        client_id_issued_at=int(client.created.timestamp()),
        redirect_uris=client.redirect_uris.split(),
        token_endpoint_auth_method=client.token_endpoint_auth_method,
        registration_access_token=registration_access_token,
        registration_client_uri=f"{client.server.issuer_url}/register/{quote(client.client_id, safe='')}",
    )
    if client.client_type == Client.CLIENT_CONFIDENTIAL:
        body["client_secret_expires_at"] = 0
        if client_secret:
            body["client_secret"] = client_secret
    return body


def _json_object(request) -> dict:
    """The request body as a JSON object, or InvalidClientMetadata (400): never a 500 or an HTML page."""
    content_type = request.META.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise InvalidClientMetadata("Send the client metadata as a JSON object with Content-Type: application/json.")
    try:
        declared_length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared_length = 0
    if declared_length > MAX_BODY_BYTES:
        raise InvalidClientMetadata(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    try:
        body = request.body
    except RequestDataTooBig:
        raise InvalidClientMetadata(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    if len(body) > MAX_BODY_BYTES:
        raise InvalidClientMetadata(f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # ValueError covers JSONDecodeError and UnicodeDecodeError
        raise InvalidClientMetadata("The request body is not valid JSON.")
    if not isinstance(data, dict):
        raise InvalidClientMetadata("The request body must be a JSON object.")
    return data


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _no_store(response: HttpResponse) -> HttpResponse:
    response["Cache-Control"] = "no-store"
    response["Pragma"] = "no-cache"
    return response
