"""GET /oauth/<slug>/callback: the upstream sends the user back here (DESIGN §4, §5.7).

It also ends an admin's "Try it" test (``upstream.try_it``), whose browser binding lives in its own cookie
(set by the admin page that starts the test, sent only to this URL) so that a test never replaces the
browser key of the admin's own MCP logins.
"""

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from oauthproxy.authserver.authorization import AccessRefused, authorization_complete, callback_pending_read
from oauthproxy.authserver.connections import ConnectionsSignedIn, connections_signin_complete
from oauthproxy.authserver.views.authorize import (
    ERROR_PAGE_CSP,
    ClientRedirect,
    browser_key_from_request,
    error_page,
    not_found_page,
    page_headers,
)
from oauthproxy.authserver.views.connections import SIGNIN_COOKIE, connections_cookie_add
from oauthproxy.authserver.views.cookies import callback_cookie_set
from oauthproxy.core.exceptions import OAuthError
from oauthproxy.core.servers import server_get_enabled
from oauthproxy.models import McpServer
from oauthproxy.upstream.try_it import try_it_complete

TRY_IT_COOKIE = "oauthproxy_try_it"


def try_it_cookie_set(response: HttpResponse, request: HttpRequest, *, server: McpServer, key: str) -> None:
    """The browser key of an admin's test: HttpOnly, Lax (the upstream's redirect back carries it), sent
    only to this server's callback, and gone when the upstream state expires."""
    callback_cookie_set(response, request, name=TRY_IT_COOKIE, server=server, key=key)


@never_cache
@require_GET
def callback(request: HttpRequest, slug: str) -> HttpResponse:
    server = server_get_enabled(slug=slug)
    if server is None:
        return not_found_page(request)
    params = dict(request.GET.lists())
    try:
        state, pending = callback_pending_read(server=server, params=params)
        if pending is not None and pending.for_connections:  # a My connections sign-in
            url = connections_signin_complete(server=server, state=state, params=params,
                                              browser_key=request.COOKIES.get(SIGNIN_COOKIE))
        elif pending is not None and pending.tester_id is not None:  # an admin's "Try it" test
            url = try_it_complete(server=server, state=state, params=params,
                                  browser_key=request.COOKIES.get(TRY_IT_COOKIE), user=getattr(request, "user", None))
        else:
            url = authorization_complete(
                server=server, pending=pending, params=params, browser_key=browser_key_from_request(request)
            )
    except OAuthError as exc:
        return error_page(request, error=exc, server=server)
    except AccessRefused as refused:
        return access_denied_page(request, refused)
    if isinstance(url, ConnectionsSignedIn):  # a My connections sign-in: back to that page, signed in
        response = HttpResponseRedirect(url.url)
        connections_cookie_add(response, request, signed_in=url)
        return response
    return ClientRedirect(url)


def access_denied_page(request: HttpRequest, refused: AccessRefused) -> HttpResponse:
    """The user signed in upstream but may not use this server: say so, and offer the way back to the
    application (which then receives ``access_denied`` with its ``state``)."""
    response = render(request, "oauthproxy/access_denied.html", {
        "title": "You do not have access to this MCP server",
        "server": refused.server,
        "account": refused.account,
        "team": refused.team,
        "client_name": refused.client_name,
        "client_url": refused.client_url,
    }, status=403)
    return page_headers(response, csp=ERROR_PAGE_CSP)
