"""The project's exceptions, each carrying its RFC-shaped error and HTTP status, and one renderer.

Views raise these; ``oauth_error_response`` (and DRF's ``exception_handler`` below) render them as
``{"error": ..., "error_description": ...}`` with ``Cache-Control: no-store``. Nothing here ever
includes a token or secret in a message.
"""

from django.http import JsonResponse
from oauthlib.oauth2.rfc6749 import errors as oauthlib_errors
from rest_framework.views import exception_handler as drf_exception_handler


class OAuthError(Exception):
    error = "invalid_request"
    status = 400

    def __init__(self, description: str = "", *, error: str | None = None, status: int | None = None):
        super().__init__(description)
        self.description = description
        if error:
            self.error = error
        if status:
            self.status = status

    def as_dict(self) -> dict:
        body = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        return body


class InvalidRequest(OAuthError):
    error = "invalid_request"


class InvalidClient(OAuthError):
    error = "invalid_client"
    status = 401


class InvalidGrant(OAuthError):
    error = "invalid_grant"


class UnauthorizedClient(OAuthError):
    error = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class InvalidScope(OAuthError):
    error = "invalid_scope"


class InvalidTarget(OAuthError):
    error = "invalid_target"


class InvalidToken(OAuthError):
    error = "invalid_token"
    status = 401


class AccessDenied(OAuthError):
    error = "access_denied"
    status = 403


class InvalidClientMetadata(OAuthError):
    """RFC 7591 §3.2.2."""

    error = "invalid_client_metadata"


class InvalidRedirectUri(OAuthError):
    """RFC 7591 §3.2.2."""

    error = "invalid_redirect_uri"


class TemporarilyUnavailable(OAuthError):
    error = "temporarily_unavailable"
    status = 503


class RateLimited(OAuthError):
    error = "slow_down"
    status = 429

    def __init__(self, description: str = "Too many requests; retry later.", *, retry_after: int = 60):
        super().__init__(description)
        self.retry_after = retry_after


class UpstreamError(Exception):
    """The upstream identity provider failed or refused. ``reason`` is for operators (audit log), never
    for clients; ``oauth_error`` is what the MCP client is told."""

    def __init__(self, reason: str, *, oauth_error: str = "server_error", upstream_error: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.oauth_error = oauth_error
        self.upstream_error = upstream_error


class OAuthlibError(oauthlib_errors.OAuth2Error):
    """One of the errors above, raised inside an oauthlib grant (oauthlib renders only its own error
    class): the same error code, description and status as the ``OAuthError`` it carries."""

    def __init__(self, error: OAuthError, *, request=None):
        self.error = error.error
        super().__init__(description=error.description, status_code=error.status, request=request)
        self.oauth_error = error


def oauth_error_response(exc: OAuthError, *, headers: dict | None = None) -> JsonResponse:
    response = JsonResponse(exc.as_dict(), status=exc.status)
    response["Cache-Control"] = "no-store"
    response["Pragma"] = "no-cache"
    if isinstance(exc, RateLimited):
        response["Retry-After"] = str(exc.retry_after)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def exception_handler(exc, context):
    """DRF exception handler: our OAuthError subclasses become RFC-shaped bodies."""
    if isinstance(exc, OAuthError):
        return oauth_error_response(exc)
    return drf_exception_handler(exc, context)
