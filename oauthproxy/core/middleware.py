"""Turn a database outage into a clear 503 instead of Django's 500 page (DESIGN §5.12).

Only a database that cannot be reached (down, restarting, out of connection slots, SQLite busy:
``db.errors.database_unreachable``) is answered so; other database errors are bugs and stay 500s with
their traceback in the log (SQLite reports a syntax error as ``OperationalError`` too). The gateway has its own
handling (cached tokens keep working while the database is away).
"""

import logging

from django.http import HttpResponse

from oauthproxy.core.exceptions import TemporarilyUnavailable, oauth_error_response
from oauthproxy.db.errors import database_unreachable

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5
_BROWSER_PATHS = ("/authorize", "/consent", "/callback")


class DatabaseUnavailableMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not database_unreachable(exception):
            return None
        return database_unavailable_response(request, exception)


def database_unavailable_response(request, exception: Exception) -> HttpResponse:
    """503 with ``Retry-After``: RFC 6749-shaped JSON for the OAuth endpoints programs call, plain text
    for pages people see."""
    logger.error("database unavailable for %s %s: %s", request.method, request.path, type(exception).__name__)
    if request.path.startswith("/oauth/") and not request.path.endswith(_BROWSER_PATHS):
        response = oauth_error_response(
            TemporarilyUnavailable("The service is temporarily unavailable; retry shortly.")
        )
    else:
        response = HttpResponse(
            "The service is temporarily unavailable; please retry in a few seconds.",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response
