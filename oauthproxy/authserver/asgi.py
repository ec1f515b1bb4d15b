"""The OAuth endpoints of each MCP server, served straight from ASGI on a fixed pool of threads.

``proxy_site.asgi`` sends ``/oauth/<slug>/...`` requests here instead of through Django's ASGI handler,
which runs each request's synchronous part in a new thread and hops threads around every synchronous
middleware (about half of a refresh's CPU and a third of a login flow's, ``docs/PERFORMANCE.md`` findings 4
and 7). The views are found by Django's URL resolver (the routes stay the one source of truth) and run on
a fixed pool of threads, each reusing its database connection from the pool between requests:

- the endpoints programs call (token, revocation, registration, introspection) have no cookie, session,
  user, CSRF token or HTML, so they skip the middleware stack. What it did that still matters is kept: the
  ``Host`` check (``ALLOWED_HOSTS``), the security headers (``SecurityMiddleware``,
  ``XFrameOptionsMiddleware``), a 503 with ``Retry-After`` when the database is unreachable
  (``DatabaseUnavailableMiddleware``), Django's exception responses and logging, a bounded request body;
- the pages a browser visits (authorize, consent, callback) get the whole middleware stack of the settings
  (CSRF, sessions, the admin's user for "Try it", security headers), run synchronously as a WSGI server
  runs it: the same behaviour without the thread hops.

Either way the request signals are sent on the pool thread (connection hygiene).
"""

from __future__ import annotations

import asyncio
import io
import logging
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.core import signals
from django.core.exceptions import BadRequest
from django.core.handlers.asgi import ASGIRequest
from django.core.handlers.base import BaseHandler
from django.core.handlers.exception import response_for_exception
from django.http import HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import Resolver404, ResolverMatch, get_resolver

from oauthproxy.core.asgi import BodyTooLarge, body_read, django_response_send
from oauthproxy.core.exceptions import InvalidRequest, oauth_error_response
from oauthproxy.core.middleware import database_unavailable_response
from oauthproxy.core.settings import proxy_settings
from oauthproxy.db.errors import database_unreachable
from oauthproxy.urls import OAUTH_PATH_PREFIX

logger = logging.getLogger(__name__)

PROGRAM_URL_NAMES = frozenset({"oauth-token", "oauth-revoke", "oauth-register", "oauth-introspect"})
PAGE_URL_NAMES = frozenset({"oauth-authorize", "oauth-consent", "oauth-callback"})

_executor: ThreadPoolExecutor | None = None
_page_handler_instance: BaseHandler | None = None
_security_middleware = SecurityMiddleware(lambda request: None)
_frame_options_middleware = XFrameOptionsMiddleware(lambda request: None)


def direct_endpoint_match(scope: dict) -> ResolverMatch | None:
    """The route of this HTTP scope when it is one of the direct endpoints, else None."""
    path = scope["path"]
    root_path = scope.get("root_path") or ""
    if root_path and path.startswith(root_path):
        path = path[len(root_path):]
    if not path.startswith(OAUTH_PATH_PREFIX):
        return None
    try:
        match = get_resolver().resolve(path)
    except Resolver404:
        return None
    return match if match.url_name in PROGRAM_URL_NAMES or match.url_name in PAGE_URL_NAMES else None


async def direct_endpoint_asgi(scope: dict, receive, send, *, match: ResolverMatch) -> None:
    """Serve one request to a direct endpoint: read the body, run the view on the pool, send the answer."""
    try:
        body = await body_read(receive, limit=settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 2_621_440)
    except BodyTooLarge:
        response = oauth_error_response(InvalidRequest("The request body is too large."))
        response.status_code = 413
        await django_response_send(response, send)
        return
    if body is None:  # the client went away
        return
    try:
        request = ASGIRequest(scope, io.BytesIO(body))
    except UnicodeDecodeError:  # as Django's handler: a query string that is not UTF-8
        await django_response_send(oauth_error_response(InvalidRequest("The request could not be decoded.")), send)
        return
    loop = asyncio.get_running_loop()
    response = await loop.run_in_executor(_threads(), _respond, request, match)
    await django_response_send(response, send)


def direct_endpoint_threads_shutdown() -> None:
    global _executor
    if _executor is not None:
        _executor.shutdown(wait=False)
        _executor = None


def _threads() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        size = proxy_settings.DIRECT_ENDPOINT_THREADS
        _executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="oauth-endpoint")
    return _executor


def _respond(request: ASGIRequest, match: ResolverMatch) -> HttpResponseBase:
    """On a pool thread: the view's response, as Django's handler and middleware would have shaped it."""
    signals.request_started.send(sender=DirectEndpointHandler)
    try:
        if match.url_name in PAGE_URL_NAMES:
            return _page_handler().get_response(request)
        return _program_response(request, match)
    finally:
        signals.request_finished.send(sender=DirectEndpointHandler)  # returns the connection to the pool


def _program_response(request: ASGIRequest, match: ResolverMatch) -> HttpResponseBase:
    request.resolver_match = match
    try:
        request.get_host()  # ALLOWED_HOSTS (DisallowedHost: 400, logged as Django does)
        response = match.func(request, *match.args, **match.kwargs)
    except (BadRequest, UnicodeDecodeError, LookupError):  # a body Django cannot decode: RFC error, not HTML
        response = oauth_error_response(InvalidRequest("The request body could not be decoded."))
    except Exception as exc:
        if database_unreachable(exc):
            response = database_unavailable_response(request, exc)
        else:  # Django's answer to any exception: 400/403/404, or a 500 logged with its traceback
            response = response_for_exception(request, exc)
    _security_middleware.process_response(request, response)
    _frame_options_middleware.process_response(request, response)
    return response


def _page_handler() -> BaseHandler:
    """Django's handler with the settings' middleware loaded synchronously (as ``WSGIHandler`` loads it)."""
    global _page_handler_instance
    if _page_handler_instance is None:
        handler = BaseHandler()
        handler.load_middleware(is_async=False)
        _page_handler_instance = handler
    return _page_handler_instance


class DirectEndpointHandler:
    """The ``sender`` of the request signals sent for direct endpoint requests."""
